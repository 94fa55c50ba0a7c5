"""Feature-KD taps under the wrappers a run puts around the student: DDP, torch.compile and FSDP (issue 9, point 3),
and the FSDP strategy config (conf/trainer/fsdp.yaml).

Each wrapped forward must leave in the taps every student feature of `arch.feature_pairs`, under its unwrapped
name, with its teacher partner's shape and equal to the plain forward's feature."""

import os
import socket

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from conftest import arch_cfg, compose_train_cfg
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from test_module import make_batch, make_module

from bksdm_lab.distill.module import CHECKPOINTED

TINY_STUDENT_PARAMS = 1_476_484  # the demo's BK-SDM-Tiny student


def unet_inputs(unet, n: int = 2):
    g = torch.Generator().manual_seed(3)
    size, cfg = unet.config.sample_size, unet.config
    return (
        torch.randn(n, cfg.in_channels, size, size, generator=g),
        torch.tensor([10, 700][:n]),
        torch.randn(n, 77, cfg.cross_attention_dim, generator=g),
    )


@pytest.fixture()
def module(teacher):
    """A DistillModule (arch=tiny, all three KD terms) with its student and teacher taps."""
    return make_module(teacher)


@pytest.fixture()
def plain(module):
    """The unwrapped student's and teacher's tapped features on fixed inputs."""
    inputs = unet_inputs(module.student)
    with torch.no_grad():
        out = module.student(*inputs).sample
        module.teacher_unet(*inputs)
    return inputs, out, module.student_taps.pop(), module.teacher_taps.pop()


def assert_same_features(module, features: dict, reference: dict, teacher_features: dict, atol: float = 0.0):
    pairs = module.loss.feature_pairs
    assert set(features) == {s for _, s in pairs}, sorted(features)  # every pair, unwrapped names
    for tname, sname in pairs:
        assert features[sname].shape == teacher_features[tname].shape, (sname, tname)
        torch.testing.assert_close(features[sname], reference[sname], rtol=0, atol=atol, msg=sname)


def loss_parts(module, batch) -> dict[str, torch.Tensor]:
    module._rng = None  # the same noise, timesteps and posterior samples for every call
    _, parts = module.compute_loss(batch)
    return parts


@pytest.fixture()
def process_group():
    """A single-process gloo group on a free localhost port, destroyed at the end."""
    assert not dist.is_initialized()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ---- DDP ----------------------------------------------------------------------------------------


def test_taps_fire_through_ddp(module, plain, process_group):
    from torch.nn.parallel import DistributedDataParallel as DDP

    inputs, out, reference, teacher_features = plain
    batch = make_batch(module.teacher.tokenizer)
    unwrapped = loss_parts(module, batch)

    ddp = DDP(module.student)
    assert "module.down_blocks.0" in dict(ddp.named_modules())
    wrapped_out = ddp(*inputs).sample
    assert_same_features(module, module.student_taps.pop(), reference, teacher_features)
    assert torch.equal(wrapped_out.detach(), out)
    wrapped_out.mean().backward()  # a full DDP step (gradient all-reduce) with the hooks in place

    module.student = ddp  # what the loss sees when the strategy has wrapped the student
    through_ddp = loss_parts(module, batch)
    assert through_ddp.keys() == unwrapped.keys() and through_ddp["feat_kd"].item() > 0
    for name, value in unwrapped.items():
        torch.testing.assert_close(through_ddp[name], value, rtol=0, atol=0, msg=name)


# ---- torch.compile ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_taps_fire_through_torch_compile(module, plain, backend):
    torch._dynamo.reset()
    inputs, out, reference, teacher_features = plain
    compiled = torch.compile(module.student, backend=backend)
    assert "_orig_mod.down_blocks.0" in dict(compiled.named_modules())
    for _ in range(2):  # the compiling call and a call of the compiled graph
        with torch.no_grad():
            compiled_out = compiled(*inputs).sample
        assert_same_features(module, module.student_taps.pop(), reference, teacher_features)
        assert torch.equal(compiled_out, out)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_student_in_the_module_gives_the_same_loss(teacher, backend):
    """A DistillModule built around torch.compile(student) taps the same modules and gives the same loss."""
    torch._dynamo.reset()
    plain_module = make_module(teacher)
    compiled_module = make_module(teacher)
    compiled_module.student.load_state_dict(plain_module.student.state_dict())
    batch = make_batch(teacher.tokenizer)
    reference = loss_parts(plain_module, batch)

    compiled_module.student = torch.compile(compiled_module.student, backend=backend)
    for _ in range(2):
        parts = loss_parts(compiled_module, batch)
        assert parts.keys() == reference.keys() and parts["feat_kd"].item() > 0
        for name, value in reference.items():
            torch.testing.assert_close(parts[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert (
        compiled_module.loss.terms["feat_kd"].last_layer_losses.keys()
        == plain_module.loss.terms["feat_kd"].last_layer_losses.keys()
    )
    torch._dynamo.reset()


# ---- FSDP ---------------------------------------------------------------------------------------


@pytest.fixture()
def fsdp_cfg(tmp_path, monkeypatch, cache_dir):
    monkeypatch.setenv("BKSDM_CACHE_DIR", str(cache_dir))
    yield compose_train_cfg(tmp_path / "run", "experiment=demo", "trainer=fsdp")
    HydraConfig.instance().cfg = None


def test_fsdp_config_is_lightnings_fsdp_strategy(fsdp_cfg):
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel
    from pytorch_lightning.strategies import FSDPStrategy
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    assert fsdp_cfg.trainer.num_nodes == fsdp_cfg.cluster.nodes and fsdp_cfg.trainer.devices == -1  # as trainer=ddp
    strategy = instantiate(fsdp_cfg.trainer.strategy)
    assert isinstance(strategy, FSDPStrategy)
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD
    assert strategy._state_dict_type == "full"  # one last.ckpt file, written by rank 0 through the CheckpointIO
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    assert policy._module_classes == {ResnetBlock2D, Transformer2DModel, BasicTransformerBlock}
    assert strategy.kwargs["use_orig_params"] is True


def test_lightning_refuses_fsdp_on_cpu(fsdp_cfg):
    """Why there is no CPU run of trainer=fsdp: Lightning 2.6 refuses it when the Trainer is built. If this fails,
    Lightning runs FSDP on CPU now: add the 2-rank demo run (as the DDP one) in place of this test."""
    with pytest.raises(ValueError, match="The strategy `fsdp` requires a GPU accelerator"):
        pl.Trainer(accelerator="cpu", devices=2, strategy=instantiate(fsdp_cfg.trainer.strategy), logger=False)


def wrap_student_as_configured(module, strategy) -> None:
    """What trainer=fsdp needs DistillModule.configure_model to do: wrap only the student, inside the strategy's
    enable_wrap context (Lightning enters it around configure_model). On CPU torch FSDP needs device_id=cpu, which
    FSDPStrategy does not pass."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp.wrap import enable_wrap, wrap

    kwargs = {**strategy.kwargs, "sharding_strategy": strategy.sharding_strategy, "device_id": torch.device("cpu")}
    with enable_wrap(wrapper_cls=FSDP, **kwargs):
        module.student = wrap(module.student)


def test_fsdp_wraps_the_student_blocks_only_and_taps_fire(module, plain, fsdp_cfg, process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import StateDictType

    inputs, out, reference, teacher_features = plain
    batch = make_batch(module.teacher.tokenizer)
    unwrapped = loss_parts(module, batch)
    student = module.student
    blocks = [
        m
        for m in student.modules()
        if type(m).__name__ in ("ResnetBlock2D", "Transformer2DModel", "BasicTransformerBlock")
    ]
    frozen_before = {n: p.detach().clone() for n, p in module.named_parameters() if not n.startswith("student.")}
    student_keys = sorted(f"student.{k}" for k in student.state_dict())

    wrap_student_as_configured(module, instantiate(fsdp_cfg.trainer.strategy))

    # the policy wrapped each of the student's blocks (plus the student itself) and nothing else
    units = [m for m in module.modules() if isinstance(m, FSDP)]
    assert len(units) == len(blocks) + 1 and units[0] is module.student
    assert {id(u.module) for u in units[1:]} == {id(b) for b in blocks}
    for name in module.frozen:
        frozen = getattr(module, name)
        assert not any(isinstance(m, FSDP) for m in frozen.modules()), name
    frozen_after = {n: p for n, p in module.named_parameters() if not n.startswith("student.")}
    assert frozen_after.keys() == frozen_before.keys()  # whole, unflattened, under their own names
    for name, param in frozen_after.items():
        assert not param.requires_grad and torch.equal(param, frozen_before[name]), name

    # the taps and the loss through the wrapped student
    with torch.no_grad():
        fsdp_out = module.student(*inputs).sample
    assert_same_features(module, module.student_taps.pop(), reference, teacher_features, atol=1e-6)
    torch.testing.assert_close(fsdp_out, out, rtol=0, atol=1e-6)
    parts = loss_parts(module, batch)
    for name, value in unwrapped.items():
        torch.testing.assert_close(parts[name], value, rtol=1e-5, atol=1e-6, msg=name)
    parts["task"].backward()
    assert all(p.grad is not None for p in module.student.parameters())
    assert all(p.grad is None for n, p in module.named_parameters() if not n.startswith("student."))

    # a full state dict (state_dict_type: full) has the unwrapped student keys: the student-only filter keeps them all
    with FSDP.state_dict_type(module.student, StateDictType.FULL_STATE_DICT):
        state = module.state_dict()
    checkpoint = {"state_dict": state}
    module.on_save_checkpoint(checkpoint)
    assert sorted(checkpoint["state_dict"]) == student_keys
    assert all(k.startswith(CHECKPOINTED) for k in checkpoint["state_dict"])
    assert sum(v.numel() for v in checkpoint["state_dict"].values()) == TINY_STUDENT_PARAMS  # the U-Net has no buffers
    optimizer = module.configure_optimizers()  # over the wrapped student's original parameters
    assert sum(p.numel() for p in optimizer.param_groups[0]["params"]) == TINY_STUDENT_PARAMS


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("BKSDM_TEST_INDUCTOR"), reason="about 4 minutes of C++ compilation: set BKSDM_TEST_INDUCTOR=1"
)
def test_taps_fire_through_torch_compile_inductor(module, plain, tmp_path, monkeypatch):
    """The default backend: generated C++ compiled by the C compiler (about 4 minutes cold on 2 CPU cores)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # cold, and this test's own
    torch._dynamo.reset()
    inputs, out, reference, teacher_features = plain
    compiled = torch.compile(module.student)
    with torch.no_grad():
        compiled_out = compiled(*inputs).sample
    assert_same_features(module, module.student_taps.pop(), reference, teacher_features, atol=1e-5)
    torch.testing.assert_close(compiled_out, out, rtol=0, atol=1e-5)
    torch._dynamo.reset()


def _fsdp_rank(rank: int, port: int, teacher_dir: str, policy_classes: list[str]) -> None:
    """One of 2 gloo ranks: the student FULL_SHARD-wrapped as trainer=fsdp configures it; taps vs the plain forward."""
    import importlib

    from omegaconf import OmegaConf
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from bksdm_lab.models.students import init_student_from_teacher
    from bksdm_lab.models.taps import FeatureTaps
    from bksdm_lab.models.teachers import load_teacher

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        teacher = load_teacher(OmegaConf.create({"name": "demo", "pretrained": teacher_dir}))
        arch = arch_cfg("tiny")
        student = init_student_from_teacher(teacher.unet, arch)
        taps = FeatureTaps(student, [s for _, s in arch["feature_pairs"]])
        inputs = unet_inputs(student)
        with torch.no_grad():
            out = student(*inputs).sample
        reference = taps.pop()
        classes = {getattr(importlib.import_module(p.rpartition(".")[0]), p.rpartition(".")[2]) for p in policy_classes}
        wrapped = FSDP(
            student,
            auto_wrap_policy=ModuleWrapPolicy(classes),
            sharding_strategy=ShardingStrategy.FULL_SHARD,
            use_orig_params=True,
            device_id=torch.device("cpu"),
        )
        local = sum(p.numel() for p in wrapped.parameters())
        assert local < TINY_STUDENT_PARAMS, local  # this rank holds its shard only
        for _ in range(2):
            sharded_out = wrapped(*inputs).sample
            features = taps.pop()
            assert features.keys() == reference.keys()
            for name, value in reference.items():
                torch.testing.assert_close(features[name].detach(), value, rtol=0, atol=1e-6, msg=name)
            torch.testing.assert_close(sharded_out.detach(), out, rtol=0, atol=1e-6)
            sharded_out.mean().backward()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.xdist_group("two_ranks")  # as test_distributed's 2-rank runs: one at a time under -n 2
def test_taps_fire_through_fsdp_sharded_on_two_ranks(demo_teacher_dir, fsdp_cfg):
    """FULL_SHARD over 2 gloo processes (torch FSDP with device_id=cpu, as Lightning cannot on CPU): every forward
    gathers and frees each unit's parameters, and the taps still hold the plain forward's features."""
    import torch.multiprocessing as mp

    classes = [c.path for c in fsdp_cfg.trainer.strategy.auto_wrap_policy.module_classes]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fsdp_rank, args=(port, str(demo_teacher_dir), classes), nprocs=2, join=True)
