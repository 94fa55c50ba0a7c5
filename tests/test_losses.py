"""The KD loss: task + output KD + feature KD, weights, zero-weight terms, the feature taps, and the KD loss options
(normalised feature KD, self-attention pairs, per-pair weights, x0-space output KD)."""

import csv
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import CONF, arch_cfg, compose_train_cfg, train_in_process
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bksdm_lab.distill.checks import check_values
from bksdm_lab.distill.losses import (
    FeatureKD,
    KDInputs,
    KDLoss,
    LossConfigError,
    OutputKD,
    TaskLoss,
    check_config,
    predicted_x0,
)
from bksdm_lab.distill.module import DistillModule
from bksdm_lab.models.students import init_student_from_teacher
from bksdm_lab.models.taps import FeatureTaps

TINY_PAIRS = [
    ("down_blocks.0", "down_blocks.0"),
    ("down_blocks.1", "down_blocks.1"),
    ("down_blocks.2.attentions.1.proj_out", "down_blocks.2.attentions.0.proj_out"),
    ("up_blocks.1", "up_blocks.0"),
    ("up_blocks.2", "up_blocks.1"),
    ("up_blocks.3", "up_blocks.2"),
]
BASE_PAIRS = [(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(4)] + [
    (f"up_blocks.{i}", f"up_blocks.{i}") for i in range(4)
]

# A student identical to the teacher: same config, every tensor copied by name.
COPY_ARCH = {
    "name": "copy",
    "unet_config": {},
    "drop_deepest_stages": 0,
    "weight_map": {},
    "feature_pairs": [list(p) for p in BASE_PAIRS],
}


def kd_loss(pairs, weights=None, layer_weights=None) -> KDLoss:
    weights = {"task": 1.0, "out_kd": 1.0, "feat_kd": 1.0} if weights is None else weights
    terms = {"task": TaskLoss(), "out_kd": OutputKD(), "feat_kd": FeatureKD(pairs, layer_weights)}
    return KDLoss(terms=terms, weights=weights)


def make_batch(tokenizer, n: int = 2, size: int = 64) -> dict[str, torch.Tensor]:
    captions = ["a red circle on a blue background", "a yellow square on a black background", "a green triangle"]
    ids = tokenizer(captions[:n], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    pixels = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return {"pixel_values": pixels, "input_ids": ids}


def realign(module: torch.nn.Module) -> None:
    """Give every tensor fresh (64-byte aligned) storage.

    diffusers' from_pretrained leaves the loaded tensors as unaligned views of the safetensors file, and
    CPU kernels round differently on unaligned data (~1e-13 on the demo); a freshly built student is
    aligned. Re-materialising the teacher makes "an exact copy gives exactly 0" a bitwise statement.
    """
    with torch.no_grad():
        for p in module.parameters():
            p.data = p.data.clone()
        for b in module.buffers():
            b.data = b.data.clone()


def random_inputs(pairs, seed=0, shapes=None) -> KDInputs:
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or [(2, 3, 4, 4)] * len(pairs)
    sfeat = {s: torch.randn(*shape, generator=g) for (_, s), shape in zip(pairs, shapes)}
    tfeat = {t: torch.randn(*shape, generator=g) for (t, _), shape in zip(pairs, shapes)}
    return KDInputs(
        student_out=torch.randn(2, 4, 8, 8, generator=g),
        target=torch.randn(2, 4, 8, 8, generator=g),
        teacher_out=torch.randn(2, 4, 8, 8, generator=g),
        student_features=sfeat,
        teacher_features=tfeat,
    )


# ---- the config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("arch", "pairs"), [("tiny", TINY_PAIRS), ("base", BASE_PAIRS), ("small", BASE_PAIRS)])
def test_loss_from_train_config(arch, pairs):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=demo", f"arch={arch}"])
    loss = instantiate(cfg.loss)
    assert isinstance(loss, KDLoss)
    assert list(loss.terms) == ["task", "out_kd", "feat_kd"]
    assert isinstance(loss.terms["task"], TaskLoss)
    assert isinstance(loss.terms["out_kd"], OutputKD)
    assert isinstance(loss.terms["feat_kd"], FeatureKD)
    assert loss.weights == {"task": 1.0, "out_kd": 1.0, "feat_kd": 1.0}
    assert loss.active == ["task", "out_kd", "feat_kd"]
    assert loss.needs_teacher is True
    assert loss.feature_pairs == pairs
    assert loss.terms["feat_kd"].layer_weights == [1.0] * len(pairs)
    assert [tuple(p) for p in arch_cfg(arch)["feature_pairs"]] == pairs
    # the options default to the paper's loss
    assert (loss.terms["feat_kd"].at, loss.terms["feat_kd"].normalize) == ("blocks", "none")
    assert loss.terms["out_kd"].space == "output"


def test_loss_config_overrides_weights_and_layer_weights():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["arch=tiny", "loss.weights.out_kd=0", "loss.terms.feat_kd.layer_weights=[1,2,3,4,5,6]"],
        )
    loss = instantiate(cfg.loss)
    assert loss.active == ["task", "feat_kd"]
    assert loss.terms["feat_kd"].layer_weights == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_task_only_loss_needs_neither_teacher_nor_features():
    loss = kd_loss(TINY_PAIRS, weights={"task": 1.0, "out_kd": 0.0, "feat_kd": 0.0})
    assert loss.active == ["task"]
    assert loss.needs_teacher is False
    assert loss.feature_pairs == []
    x = random_inputs(TINY_PAIRS)
    x.teacher_out, x.student_features, x.teacher_features = None, {}, {}
    total, parts = loss(x)
    assert list(parts) == ["task"]
    assert total == F.mse_loss(x.student_out, x.target)


# ---- an exact copy of the teacher gives exactly zero KD ------------------------------------------


def test_exact_copy_gives_exactly_zero_kd(teacher):
    realign(teacher.unet)
    student = init_student_from_teacher(teacher.unet, COPY_ARCH)
    module = DistillModule(teacher, student, kd_loss(BASE_PAIRS), optimizer=torch.optim.AdamW)
    module.train()
    torch.manual_seed(0)
    total, parts = module.compute_loss(make_batch(teacher.tokenizer))
    assert parts["out_kd"].item() == 0.0
    assert parts["feat_kd"].item() == 0.0
    assert module.loss.terms["feat_kd"].last_layer_losses.keys() == {s for _, s in BASE_PAIRS}
    for value in module.loss.terms["feat_kd"].last_layer_losses.values():
        assert value.item() == 0.0
    assert parts["task"].item() > 0.1  # the student still has to match the noise
    assert total.item() == parts["task"].item()


def test_copy_with_one_perturbed_tensor_gives_nonzero_kd(teacher):
    realign(teacher.unet)
    student = init_student_from_teacher(teacher.unet, COPY_ARCH)
    with torch.no_grad():
        student.up_blocks[3].resnets[2].conv2.weight.mul_(1.5)
    module = DistillModule(teacher, student, kd_loss(BASE_PAIRS), optimizer=torch.optim.AdamW)
    torch.manual_seed(0)
    _, parts = module.compute_loss(make_batch(teacher.tokenizer))
    assert parts["out_kd"].item() > 0
    layer = module.loss.terms["feat_kd"].last_layer_losses
    assert layer["up_blocks.3"].item() > 0
    for name in ("down_blocks.0", "down_blocks.3", "up_blocks.0", "up_blocks.2"):  # upstream of the change
        assert layer[name].item() == 0.0


# ---- weights ----------------------------------------------------------------------------------


def test_zero_weighted_term_contributes_nothing():
    loss = kd_loss(TINY_PAIRS, weights={"task": 1.0, "out_kd": 1.0, "feat_kd": 0.0})
    assert loss.active == ["task", "out_kd"]
    assert loss.feature_pairs == []  # no taps are registered for it
    x = random_inputs(TINY_PAIRS)
    total, parts = loss(x)
    assert set(parts) == {"task", "out_kd"}
    assert total == parts["task"] + parts["out_kd"]
    assert parts["task"] == F.mse_loss(x.student_out, x.target)
    assert parts["out_kd"] == F.mse_loss(x.student_out, x.teacher_out)


def demo_arch(name: str) -> dict:
    """conf/arch/<name>.yaml as a demo run composes it (against the demo teacher's topology)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["experiment=demo", f"arch={name}"])
    return OmegaConf.to_container(cfg.arch, resolve=True)


def test_zero_weighted_feat_kd_in_the_module(teacher):
    arch = demo_arch("tiny")
    student = init_student_from_teacher(teacher.unet, arch)
    loss = kd_loss(arch["feature_pairs"], weights={"task": 1.0, "out_kd": 1.0, "feat_kd": 0.0})
    module = DistillModule(teacher, student, loss, optimizer=torch.optim.AdamW)
    assert module.student_taps is None and module.teacher_taps is None
    torch.manual_seed(0)
    total, parts = module.compute_loss(make_batch(teacher.tokenizer))
    assert set(parts) == {"task", "out_kd"}
    assert total == parts["task"] + parts["out_kd"]


def test_weights_scale_terms():
    x = random_inputs(TINY_PAIRS)
    _, parts = kd_loss(TINY_PAIRS)(x)
    total, _ = kd_loss(TINY_PAIRS, weights={"task": 2.0, "out_kd": 0.5, "feat_kd": 3.0})(x)
    torch.testing.assert_close(total, 2.0 * parts["task"] + 0.5 * parts["out_kd"] + 3.0 * parts["feat_kd"])


def test_all_weights_zero_raises():
    with pytest.raises(ValueError, match="every loss weight is 0"):
        kd_loss(TINY_PAIRS, weights={"task": 0.0, "out_kd": 0.0, "feat_kd": 0})


def test_unknown_weight_name_raises_naming_it():
    with pytest.raises(ValueError, match="feature_kd") as info:
        kd_loss(TINY_PAIRS, weights={"task": 1.0, "out_kd": 1.0, "feat_kd": 1.0, "feature_kd": 1.0})
    assert "unknown ['feature_kd']" in str(info.value)


def test_missing_weight_raises_naming_it():
    with pytest.raises(ValueError) as info:
        kd_loss(TINY_PAIRS, weights={"task": 1.0, "out_kd": 1.0})
    assert "missing ['feat_kd']" in str(info.value)


# ---- FeatureKD ---------------------------------------------------------------------------------


def test_feature_kd_is_sum_of_per_pair_mse():
    pairs = [("t.a", "s.a"), ("t.b", "s.b"), ("t.c", "s.c")]
    x = random_inputs(pairs, shapes=[(2, 8, 4, 4), (2, 5, 3), (3, 7)])
    term = FeatureKD(pairs)
    by_hand = [((x.student_features[s] - x.teacher_features[t]) ** 2).mean() for t, s in pairs]
    torch.testing.assert_close(term(x), sum(by_hand), rtol=1e-6, atol=0)
    assert list(term.last_layer_losses) == ["s.a", "s.b", "s.c"]
    for (_, s), value in zip(pairs, by_hand):
        torch.testing.assert_close(term.last_layer_losses[s], value, rtol=1e-6, atol=0)
        assert not term.last_layer_losses[s].requires_grad


def test_feature_kd_layer_weights_scale_pairs():
    pairs = [("t.a", "s.a"), ("t.b", "s.b")]
    x = random_inputs(pairs)
    m = [F.mse_loss(x.student_features[s], x.teacher_features[t]) for t, s in pairs]
    torch.testing.assert_close(FeatureKD(pairs, layer_weights=[2.0, 0.25])(x), 2.0 * m[0] + 0.25 * m[1])
    assert FeatureKD(pairs, layer_weights=[0.0, 1.0])(x) == m[1]


def test_feature_kd_computes_in_fp32():
    pairs = [("t", "s")]
    s = torch.randn(2, 3, 8, 8).to(torch.bfloat16)
    t = torch.randn(2, 3, 8, 8).to(torch.bfloat16)
    x = KDInputs(student_out=s, target=s, student_features={"s": s}, teacher_features={"t": t})
    value = FeatureKD(pairs)(x)
    assert value.dtype == torch.float32
    assert value == F.mse_loss(s.float(), t.float())


def test_feature_kd_gradient_reaches_student_features_only():
    pairs = [("t", "s")]
    s = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(4, 5, requires_grad=True)
    FeatureKD(pairs)(
        KDInputs(student_out=s, target=s, student_features={"s": s}, teacher_features={"t": t.detach()})
    ).backward()
    torch.testing.assert_close(s.grad, 2 * (s - t).detach() / s.numel())
    assert t.grad is None


def test_feature_kd_shape_mismatch_names_the_pair():
    pairs = [("t.a", "s.a")]
    x = random_inputs(pairs)
    x.student_features["s.a"] = torch.zeros(2, 3, 2, 2)
    with pytest.raises(ValueError, match=r"t\.a -> s\.a: teacher \(2, 3, 4, 4\) vs student \(2, 3, 2, 2\)"):
        FeatureKD(pairs)(x)


def test_feature_kd_rejects_bad_configs():
    with pytest.raises(ValueError, match="pairs is empty"):
        FeatureKD([])
    with pytest.raises(ValueError, match="has 1 values for 2 pairs"):
        FeatureKD([("a", "a"), ("b", "b")], layer_weights=[1.0])


def test_output_and_task_terms_are_mse_in_fp32():
    g = torch.Generator().manual_seed(3)
    s, target, t = (torch.randn(2, 4, 8, 8, generator=g).half() for _ in range(3))
    x = KDInputs(student_out=s, target=target, teacher_out=t)
    task, out = TaskLoss()(x), OutputKD()(x)
    assert task.dtype == out.dtype == torch.float32
    assert task == F.mse_loss(s.float(), target.float())
    assert out == F.mse_loss(s.float(), t.float())
    assert OutputKD.needs_teacher and FeatureKD.needs_teacher and not TaskLoss.needs_teacher


# ---- FeatureTaps -------------------------------------------------------------------------------


class _TupleBlock(torch.nn.Module):
    def forward(self, x):
        return x * 2, (x * 3, x * 4)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _TupleBlock()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x):
        hidden, _skips = self.block(x)
        return self.lin(hidden)


def test_feature_taps_keep_first_element_of_tuple_outputs():
    net = _Net()
    taps = FeatureTaps(net, ["block", "lin", "block"])  # duplicates are tapped once
    assert len(taps._handles) == 2
    x = torch.randn(2, 3)
    out = net(x)
    features = taps.pop()
    assert set(features) == {"block", "lin"}
    assert torch.equal(features["block"], x * 2)
    assert torch.equal(features["lin"], out)
    assert taps.pop() == {}  # pop forgets
    taps.remove()
    net(x)
    assert taps.pop() == {}


def test_feature_taps_unknown_name_raises():
    with pytest.raises(ValueError, match="'nope' names no submodule of _Net"):
        FeatureTaps(_Net(), ["block", "nope"])


def test_feature_taps_on_a_diffusers_down_block(teacher):
    taps = FeatureTaps(teacher.unet, ["down_blocks.0", "down_blocks.0.resnets.0"])
    size = teacher.unet.config.sample_size
    with torch.no_grad():
        teacher.unet(torch.randn(1, 4, size, size), torch.tensor([3]), torch.randn(1, 77, 32))
    features = taps.pop()
    # A down block returns (hidden, skips): the hidden states (after the downsampler) are kept.
    assert features["down_blocks.0"].shape == (1, 32, size // 2, size // 2)
    assert features["down_blocks.0.resnets.0"].shape == (1, 32, size, size)
    taps.remove()


# ==== KD loss options ===========================================================================================
# Self-attention pairs of the demo's tiny student (teacher attn1 -> student attn1 of the same width), given explicitly
# so these tests do not depend on which arch configs define arch.self_attention_pairs.
ATTN = "transformer_blocks.0.attn1"
TINY_ATTN_PAIRS = [
    (f"down_blocks.0.attentions.1.{ATTN}", f"down_blocks.0.attentions.0.{ATTN}"),
    (f"down_blocks.2.attentions.1.{ATTN}", f"down_blocks.2.attentions.0.{ATTN}"),
    (f"up_blocks.1.attentions.2.{ATTN}", f"up_blocks.0.attentions.1.{ATTN}"),
    (f"up_blocks.3.attentions.2.{ATTN}", f"up_blocks.2.attentions.1.{ATTN}"),
]
COPY_ATTN_PAIRS = [(n, n) for n in (f"down_blocks.1.attentions.1.{ATTN}", f"up_blocks.2.attentions.0.{ATTN}")]


def override_pairs(pairs) -> str:
    return "[" + ",".join(f"[{t},{s}]" for t, s in pairs) + "]"


def compose_loss_cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="train", overrides=["experiment=demo", *overrides])


def leaf_inputs(*tensors, requires_grad=True):
    """Copies of ``tensors`` as fresh leaves (so ``.grad`` tells which received a gradient)."""
    return [t.detach().clone().requires_grad_(requires_grad) for t in tensors]


# ---- the config: one override per option ---------------------------------------------------------------------


def test_each_option_is_one_override():
    pairs = override_pairs(TINY_ATTN_PAIRS)
    loss = instantiate(compose_loss_cfg("loss.terms.feat_kd.normalize=teacher").loss)
    assert loss.terms["feat_kd"].normalize == "teacher" and loss.feature_pairs == TINY_PAIRS
    loss = instantiate(compose_loss_cfg("loss.terms.out_kd.space=x0").loss)
    assert loss.terms["out_kd"].space == "x0"
    # instead of the block outputs: the same term, at the self-attention pairs (arch.self_attention_pairs)
    loss = instantiate(
        compose_loss_cfg("loss.terms.feat_kd.at=self_attention", f"++arch.self_attention_pairs={pairs}").loss
    )
    assert list(loss.terms) == ["task", "out_kd", "feat_kd"]
    assert loss.terms["feat_kd"].feature_pairs == TINY_ATTN_PAIRS == loss.feature_pairs
    # beside them: loss=bksdm_attn adds the term attn_kd with its own weight
    cfg = compose_loss_cfg("loss=bksdm_attn", f"++arch.self_attention_pairs={pairs}", "loss.weights.attn_kd=0.5")
    loss = instantiate(cfg.loss)
    assert list(loss.terms) == ["task", "out_kd", "feat_kd", "attn_kd"] and loss.active == list(loss.terms)
    assert loss.weights == {"task": 1.0, "out_kd": 1.0, "feat_kd": 1.0, "attn_kd": 0.5}
    assert loss.terms["feat_kd"].feature_pairs == TINY_PAIRS
    assert loss.terms["attn_kd"].feature_pairs == TINY_ATTN_PAIRS
    assert loss.feature_pairs == TINY_PAIRS + TINY_ATTN_PAIRS  # every tap the module registers
    assert check_config(cfg) == []


@pytest.mark.parametrize("group", ["bksdm", "bksdm_attn"])
def test_self_attention_pairs_come_from_the_arch_when_it_has_them(group):
    """The wiring: both terms read arch.self_attention_pairs (null when the arch does not define them)."""
    cfg = compose_loss_cfg(f"loss={group}")
    loss, arch = (OmegaConf.to_container(cfg[k], resolve=True) for k in ("loss", "arch"))
    for name in ("feat_kd", "attn_kd") if group == "bksdm_attn" else ("feat_kd",):
        assert loss["terms"][name]["self_attention_pairs"] == arch.get("self_attention_pairs")


def test_layer_weights_by_student_module_override():
    """Per-pair weights, readable: {student module: weight} (the layer names of train/feat_kd/<layer>); others 1."""
    cfg = compose_loss_cfg(
        "loss.terms.feat_kd.layer_weights={up_blocks.0: 2, down_blocks.2.attentions.0.proj_out: 0.5}"
    )
    assert instantiate(cfg.loss).terms["feat_kd"].layer_weights == [1.0, 1.0, 0.5, 2.0, 1.0, 1.0]
    assert check_config(cfg) == []


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["loss.terms.feat_kd.normalize=l2"], "loss.terms.feat_kd.normalize='l2' must be one of none, teacher"),
        (
            ["loss.terms.feat_kd.at=attention"],
            "loss.terms.feat_kd.at='attention' must be one of blocks, self_attention",
        ),
        (["loss.terms.out_kd.space=eps"], "loss.terms.out_kd.space='eps' must be one of output, x0"),
        (
            ["loss.terms.feat_kd.layer_weights=[1,2]"],
            "loss.terms.feat_kd.layer_weights has 2 values for 6 pairs: give one per pair, or a mapping {student "
            "module: weight} (the student modules: down_blocks.0, down_blocks.1, down_blocks.2.attentions.0.proj_out, "
            "up_blocks.0, up_blocks.1, up_blocks.2)",
        ),
        (
            ["loss.terms.feat_kd.layer_weights={up_blocks.3: 2}"],
            "loss.terms.feat_kd.layer_weights names up_blocks.3, not a student module of the pairs; they are: "
            "down_blocks.0, down_blocks.1, down_blocks.2.attentions.0.proj_out, up_blocks.0, up_blocks.1, up_blocks.2",
        ),
        (
            ["loss.terms.feat_kd.layer_weights=[1,1,1,1,-1,1]"],
            "loss.terms.feat_kd.layer_weights holds -1: each weight must be a number >= 0",
        ),
        (
            ["loss=bksdm_attn", "++arch.self_attention_pairs=null"],
            "loss.terms.attn_kd.at=self_attention needs self_attention_pairs, [teacher module, student module] pairs "
            "at the self-attention layers (...attentions.<i>.transformer_blocks.0.attn1); the config takes them from "
            "arch.self_attention_pairs, which this arch does not define",
        ),
        (
            ["loss=bksdm_attn", "++arch.self_attention_pairs=[[a,b,c]]"],
            "loss.terms.attn_kd.self_attention_pairs.0=['a', 'b', 'c'] must be a [teacher module, student module] pair",
        ),
        (
            ["loss.terms.feat_kd.pairs=[[down_blocks.0,down_blocks.0],[up_blocks.3,up_blocks.3]]"],
            "loss.terms.feat_kd.pairs.1: the student U-Net has no module 'up_blocks.3'; the names there: "
            "up_blocks.0, up_blocks.1, up_blocks.2",
        ),
        (
            ["loss=bksdm_attn", "++arch.self_attention_pairs=[[down_blocks.0.attentions.0.attn1,up_blocks.1]]"],
            "loss.terms.attn_kd.self_attention_pairs.0: the teacher U-Net has no module "
            "'down_blocks.0.attentions.0.attn1'; the names there: down_blocks.0.attentions.0.norm, "
            "down_blocks.0.attentions.0.proj_in, down_blocks.0.attentions.0.transformer_blocks, "
            "down_blocks.0.attentions.0.proj_out",
        ),
    ],
    ids=[
        "normalize",
        "at",
        "space",
        "layer_weights-count",
        "layer_weights-name",
        "layer_weights-negative",
        "no-attention-pairs",
        "bad-pair",
        "no-such-student-module",
        "no-such-teacher-module",
    ],
)
def test_a_wrong_option_is_one_line_naming_the_key_and_the_allowed_values(overrides, line):
    cfg = compose_loss_cfg(*overrides)
    assert check_config(cfg) == [line]
    assert check_values(cfg) == [line]  # what a run reports before loading anything


def test_a_wrong_option_stops_the_run_before_loading(tmp_path, cache_dir, demo_teacher_dir, monkeypatch, capsys):
    from bksdm_lab import train as train_app

    monkeypatch.setenv("BKSDM_CACHE_DIR", str(cache_dir))
    monkeypatch.setattr(train_app, "load_teacher", lambda *a, **k: pytest.fail("loaded the teacher"))
    from hydra.core.hydra_config import HydraConfig

    try:
        cfg = compose_train_cfg(tmp_path / "run", "experiment=demo", "loss.terms.out_kd.space=x_0")
        with pytest.raises(SystemExit) as exc:
            train_app.main(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == "bksdm_lab.train: error: loss.terms.out_kd.space='x_0' must be one of output, x0"


def test_option_errors_name_the_argument_when_built_directly():
    with pytest.raises(LossConfigError, match=r"^normalize='l2' must be one of none, teacher$"):
        FeatureKD(TINY_PAIRS, normalize="l2")
    with pytest.raises(LossConfigError, match=r"^space='eps' must be one of output, x0$"):
        OutputKD(space="eps")
    with pytest.raises(LossConfigError, match=r"^at=self_attention needs self_attention_pairs"):
        FeatureKD(TINY_PAIRS, at="self_attention")
    with pytest.raises(LossConfigError, match=r"^layer_weights=3.0 must be null, a list"):
        FeatureKD(TINY_PAIRS, layer_weights=3.0)


# ---- normalised feature KD (normalize=teacher) ---------------------------------------------------------------


def test_normalized_feature_kd_by_hand():
    """Each pair: ||s - t||^2 / ||t||^2 over the micro-batch, then the layer weights."""
    pairs = [("t.a", "s.a"), ("t.b", "s.b")]
    x = random_inputs(pairs, shapes=[(2, 8, 4, 4), (2, 16, 5)])
    x.teacher_features["t.b"] = x.teacher_features["t.b"] * 300  # a layer of another scale
    term = FeatureKD(pairs, layer_weights=[1.0, 0.5], normalize="teacher")
    by_hand = {}
    for t, s in pairs:
        num = sum(
            (a - b) ** 2
            for a, b in zip(x.student_features[s].flatten().tolist(), x.teacher_features[t].flatten().tolist())
        )
        den = sum(b**2 for b in x.teacher_features[t].flatten().tolist())
        by_hand[s] = num / den
    value = term(x)
    assert value.item() == pytest.approx(by_hand["s.a"] + 0.5 * by_hand["s.b"], rel=1e-5)
    for s, expected in by_hand.items():
        assert term.last_layer_losses[s].item() == pytest.approx(expected, rel=1e-5)
    assert by_hand["s.b"] == pytest.approx(1.0, rel=0.01)  # a student far smaller than its teacher scores ~1
    assert FeatureKD(pairs)(x).item() > 1000 * value.item()  # the raw MSE is dominated by the large layer


def test_normalized_feature_kd_is_scale_free_and_zero_for_equal_features():
    pairs = [("t", "s")]
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 6, 4, 4, generator=g), torch.randn(2, 6, 4, 4, generator=g)
    term = FeatureKD(pairs, normalize="teacher")

    def value(s_, t_):
        return term(KDInputs(student_out=s_, target=s_, student_features={"s": s_}, teacher_features={"t": t_}))

    torch.testing.assert_close(value(s * 1000, t * 1000), value(s, t))
    assert value(t.clone(), t).item() == 0.0


def test_normalized_feature_kd_gradient_reaches_the_student_only():
    s, t = leaf_inputs(torch.randn(3, 5), torch.randn(3, 5))
    x = KDInputs(student_out=s, target=s, student_features={"s": s}, teacher_features={"t": t})  # t not detached
    FeatureKD([("t", "s")], normalize="teacher")(x).backward()
    assert t.grad is None  # the teacher's norm is a constant
    torch.testing.assert_close(s.grad, 2 * (s - t).detach() / t.detach().square().sum())


# ---- x0-space output KD (space=x0) -----------------------------------------------------------------------------


def scheduler_step(prediction_type: str, seed=0):
    """A diffusers DDPM noising (SD's schedule) of random latents: (latents, noise, t, noisy, target, scheduler)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    )
    g = torch.Generator().manual_seed(seed)
    latents, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    noisy = sched.add_noise(latents, noise, t)
    target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, t)
    return latents, noise, t, noisy, target, sched


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_x0_inverts_the_noising(prediction_type):
    """The true noise (or velocity) gives back the clean latents diffusers noised."""
    latents, _, t, noisy, target, sched = scheduler_step(prediction_type)
    x = KDInputs(
        student_out=target,
        target=target,
        noisy=noisy,
        timesteps=t,
        alphas_cumprod=sched.alphas_cumprod,
        prediction_type=prediction_type,
    )
    torch.testing.assert_close(predicted_x0(target, x), latents, rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_x0_output_kd_by_hand(prediction_type):
    _, _, t, noisy, target, sched = scheduler_step(prediction_type)
    g = torch.Generator().manual_seed(1)
    student, teacher = target + 0.1 * torch.randn(target.shape, generator=g), target
    x = KDInputs(
        student_out=student,
        target=target,
        teacher_out=teacher,
        noisy=noisy,
        timesteps=t,
        alphas_cumprod=sched.alphas_cumprod,
        prediction_type=prediction_type,
    )
    total = 0.0
    for i, step in enumerate(t.tolist()):
        a = sched.alphas_cumprod[step].item()
        # x0_s - x0_t = -sqrt(1 - a) / sqrt(a) * (eps_s - eps_t)   or   -sqrt(1 - a) * (v_s - v_t)
        factor = (1 - a) / a if prediction_type == "epsilon" else 1 - a
        total += factor * ((student[i] - teacher[i]) ** 2).sum().item()
    expected = total / student.numel()
    assert OutputKD(space="x0")(x).item() == pytest.approx(expected, rel=1e-4)
    assert OutputKD()(x).item() == pytest.approx(F.mse_loss(student, teacher).item(), rel=1e-6)  # the paper's term


def test_x0_output_kd_zero_for_equal_outputs_and_gradient_to_the_student_only():
    _, _, t, noisy, target, sched = scheduler_step("epsilon")
    s, tea = leaf_inputs(target + 0.3, target)
    x = KDInputs(
        student_out=s, target=target, teacher_out=tea, noisy=noisy, timesteps=t, alphas_cumprod=sched.alphas_cumprod
    )
    OutputKD(space="x0")(x).backward()
    assert tea.grad is None
    a = sched.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(s.grad, 2 * (1 - a) / a * 0.3 / s.numel() * torch.ones_like(s), rtol=1e-4, atol=0)
    x.student_out = target.clone()
    assert OutputKD(space="x0")(x).item() == 0.0


def test_x0_output_kd_needs_the_noising():
    x = KDInputs(
        student_out=torch.zeros(1, 4, 2, 2), target=torch.zeros(1, 4, 2, 2), teacher_out=torch.ones(1, 4, 2, 2)
    )
    with pytest.raises(ValueError, match="needs the step's noising: KDInputs.noisy, .timesteps and .alphas_cumprod"):
        OutputKD(space="x0")(x)
    x.noisy, x.timesteps, x.alphas_cumprod, x.prediction_type = x.target, torch.tensor([3]), torch.ones(10), "flow"
    with pytest.raises(ValueError, match=r"prediction_type='flow' must be one of epsilon, v_prediction, sample"):
        OutputKD(space="x0")(x)


# ---- in the module: a copy of the teacher scores 0; the gradient reaches the student only ----------------------


def options_loss(block_pairs, attn_pairs, layer_weights=None) -> KDLoss:
    terms = {
        "task": TaskLoss(),
        "out_kd": OutputKD(space="x0"),
        "feat_kd": FeatureKD(block_pairs, layer_weights=layer_weights, normalize="teacher"),
        "attn_kd": FeatureKD(at="self_attention", self_attention_pairs=attn_pairs, normalize="teacher"),
    }
    return KDLoss(terms, {"task": 1.0, "out_kd": 1.0, "feat_kd": 1.0, "attn_kd": 1.0})


def test_every_option_gives_exactly_zero_for_a_copy_of_the_teacher(teacher):
    realign(teacher.unet)
    student = init_student_from_teacher(teacher.unet, COPY_ARCH)
    module = DistillModule(teacher, student, options_loss(BASE_PAIRS, COPY_ATTN_PAIRS), optimizer=torch.optim.AdamW)
    torch.manual_seed(0)
    total, parts = module.compute_loss(make_batch(teacher.tokenizer))
    assert (parts["out_kd"].item(), parts["feat_kd"].item(), parts["attn_kd"].item()) == (0.0, 0.0, 0.0)
    attn = module.loss.terms["attn_kd"].last_layer_losses
    assert list(attn) == [s for _, s in COPY_ATTN_PAIRS] and all(v.item() == 0.0 for v in attn.values())
    assert total.item() == parts["task"].item() > 0.1


def test_every_option_trains_the_student_only(teacher):
    """One backward through the tiny student with all options on: the teacher gets no gradient, every term moves
    the student, and the self-attention taps hold (batch, tokens, channels) tensors."""
    arch = demo_arch("tiny")
    student = init_student_from_teacher(teacher.unet, arch)
    module = DistillModule(
        teacher, student, options_loss(arch["feature_pairs"], TINY_ATTN_PAIRS), optimizer=torch.optim.AdamW
    )
    torch.manual_seed(0)
    batch = make_batch(teacher.tokenizer)
    total, parts = module.compute_loss(batch)
    assert all(torch.isfinite(v) and v.item() > 0 for v in parts.values())
    attn = module.loss.terms["attn_kd"].last_layer_losses
    assert list(attn) == [s for _, s in TINY_ATTN_PAIRS]
    total.backward()
    assert all(p.grad is None for p in module.teacher_unet.parameters())
    for _, s in TINY_ATTN_PAIRS:  # the attn_kd pairs reach their modules
        assert module.student.get_submodule(s).to_q.weight.grad.abs().sum() > 0
    module.student.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    _, parts = module.compute_loss(batch)
    parts["attn_kd"].backward()  # attn_kd alone: only the student modules upstream of its taps move
    assert module.student.up_blocks[2].attentions[1].proj_out.weight.grad is None
    assert module.student.get_submodule(TINY_ATTN_PAIRS[0][1]).to_q.weight.grad.abs().sum() > 0


# ---- in the demo: every option on, a few steps, the per-term and per-layer metrics logged ----------------------


def test_demo_trains_with_every_option_and_logs_each_term_and_layer(cache_dir, tmp_path):
    run_dir = tmp_path / "run"
    result = train_in_process(
        cache_dir,
        run_dir,
        "experiment=demo",
        "loss=bksdm_attn",
        f"loss.terms.attn_kd.self_attention_pairs={override_pairs(TINY_ATTN_PAIRS)}",
        "loss.terms.attn_kd.normalize=teacher",
        "loss.terms.feat_kd.normalize=teacher",
        "loss.terms.feat_kd.layer_weights={up_blocks.2: 2}",
        "loss.terms.out_kd.space=x0",
        "loss.weights.attn_kd=0.5",
        "trainer.max_steps=3",
        "trainer.accumulate_grad_batches=1",
        "trainer.log_every_n_steps=1",
        "data.batch_size=2",
        "logger=csv",
        "~callbacks.samples",
        "~callbacks.export",
    )
    assert result is not None and math.isfinite(result)
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    logged = {}
    for row in rows:
        for key, value in row.items():
            if value not in ("", None):
                logged.setdefault(key, []).append(float(value))
    expected = {f"train/loss_{name}" for name in ("task", "out_kd", "feat_kd", "attn_kd")}
    expected |= {f"train/feat_kd/{s}" for _, s in TINY_PAIRS}
    expected |= {f"train/attn_kd/{s}" for _, s in TINY_ATTN_PAIRS}
    assert expected <= set(logged), sorted(expected - set(logged))
    for key in expected:
        assert len(logged[key]) == 3 and all(math.isfinite(v) for v in logged[key]), (key, logged[key])
