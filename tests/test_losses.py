"""The KD loss: task + output KD + feature KD, weights, zero-weight terms, and the feature taps."""

import pytest
import torch
import torch.nn.functional as F
from conftest import CONF, arch_cfg
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from bksdm_lab.distill.losses import FeatureKD, KDInputs, KDLoss, OutputKD, TaskLoss
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


def test_zero_weighted_feat_kd_in_the_module(teacher):
    arch = arch_cfg("tiny")
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
