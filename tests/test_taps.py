"""Feature-KD taps under the wrappers a run puts around the student: DDP and torch.compile.

Each wrapped forward must leave in the taps every student feature of `arch.feature_pairs`, under its unwrapped
name, with its teacher partner's shape and equal to the plain forward's feature."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
from test_module import make_batch, make_module


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
