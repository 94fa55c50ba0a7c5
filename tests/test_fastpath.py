"""The fast training path (docs/fastpath.md, ``module.step``): each switch changes nothing in the loss.

Every switch is compared with the plain path on the same seed, weights and batch (the loss parts and, where the switch
touches the backward, the student's gradients), on CPU with the demo-sized teacher and BK-SDM-Tiny student. What
needs CUDA (the inductor backend, 16-mixed on a GPU, the speed of each switch) is named in docs/fastpath.md; the CPU tests
check the decisions and the code paths that can run here."""

import csv
import functools
import logging
import sys

import pytest
import pytorch_lightning as pl
import torch
from conftest import arch_cfg
from test_module import make_batch, make_module

from bksdm_lab.distill import callbacks as cb
from bksdm_lab.distill.checks import check_values
from bksdm_lab.distill.fastpath import FastPath
from bksdm_lab.distill.module import FROZEN, DistillModule
from bksdm_lab.models.students import init_student_from_teacher

ADAMW = functools.partial(torch.optim.AdamW, lr=1e-3)


def batch_of(teacher, n: int = 2) -> dict:
    """make_batch with sample indices: the draws come from the per-sample generators of (seed, step, index)."""
    return {**make_batch(teacher.tokenizer, n), "index": torch.arange(n)}


def fast_module(teacher, **step) -> DistillModule:
    """make_module's module with the fast-path switches ``step`` (module.step.*)."""
    student = init_student_from_teacher(teacher.unet, arch_cfg("tiny"))
    return DistillModule(teacher, student, make_module(teacher).loss, ADAMW, step=step)


def loss_and_grads(module, batch) -> tuple[dict, dict]:
    """The loss parts (and total) and the student's gradients of one micro-step at optimizer step 0."""
    module.train()
    module.student.zero_grad(set_to_none=True)
    total, parts = module.compute_loss(batch, step=0)
    total.backward()
    grads = {n: p.grad.detach().clone() for n, p in module.student.named_parameters() if p.grad is not None}
    module.student.zero_grad(set_to_none=True)
    return {"total": total.detach(), **{k: v.detach() for k, v in parts.items()}}, grads


def assert_close(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name].float(), b[name].float(), rtol=rtol, atol=atol, msg=name)


# ---- gradient checkpointing ---------------------------------------------------------------------


def test_gradient_checkpointing_changes_neither_loss_nor_gradients(teacher):
    module = make_module(teacher)
    batch = batch_of(teacher)
    loss, grads = loss_and_grads(module, batch)
    module.student.enable_gradient_checkpointing()
    assert module.student.is_gradient_checkpointing
    loss_ckpt, grads_ckpt = loss_and_grads(module, batch)
    assert_close(loss_ckpt, loss, rtol=0, atol=0)
    assert_close(grads_ckpt, grads, rtol=1e-5, atol=1e-7)
    assert loss["feat_kd"] > 0


def test_gradient_checkpointing_is_set_at_setup_and_logged(teacher, caplog):
    for on in (True, False):
        module = fast_module(teacher, gradient_checkpointing=on)
        assert not module.student.is_gradient_checkpointing  # the switches are set at setup, not at construction
        with caplog.at_level(logging.INFO, logger="bksdm_lab"):
            assert module.fast.apply(module, "cpu")["gradient_checkpointing"] is on
        assert module.student.is_gradient_checkpointing is on
        assert f"gradient_checkpointing={on}" in caplog.text


# ---- torch.compile ------------------------------------------------------------------------------


class CompileSpy:
    """What torch.compile returns, minus the compilation: counts the calls the module routes through it."""

    def __init__(self, model, **options):
        self._orig_mod, self.options, self.calls = model, options, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._orig_mod(*args, **kwargs)


def test_compile_switches_route_student_and_teacher_through_torch_compile(teacher, monkeypatch):
    """The wiring (the compilation itself is the slow test below and tests/test_taps.py's): both models are called
    through torch.compile's wrapper with the configured options, the loss and gradients are the plain path's, every
    tap fires, and the checkpoint keys are unchanged."""
    plain = make_module(teacher)
    batch = batch_of(teacher)
    loss, grads = loss_and_grads(plain, batch)
    layers = dict(plain.loss.terms["feat_kd"].last_layer_losses)
    monkeypatch.setattr(torch, "compile", CompileSpy)
    module = fast_module(teacher, compile={"student": True, "teacher": True, "backend": "eager", "mode": None})
    resolved = module.fast.apply(module, "cpu")
    assert resolved["compile_student"] and resolved["compile_teacher"]
    spies = {name: compiled for name, (_, compiled) in module.fast.compiled.items()}
    assert spies["student"]._orig_mod is module.student and spies["teacher"]._orig_mod is teacher.unet
    assert spies["student"].options == {"backend": "eager", "fullgraph": False}  # null options left to torch
    loss_c, grads_c = loss_and_grads(module, batch)
    assert spies["student"].calls == 1 and spies["teacher"].calls == 1
    assert_close(loss_c, loss, rtol=0, atol=0)
    assert_close(grads_c, grads, rtol=0, atol=0)
    assert module.loss.terms["feat_kd"].last_layer_losses.keys() == layers.keys()
    assert not any("_orig_mod" in k for k in module.state_dict())
    assert module.fast.model("student", plain.student) is plain.student  # another module in place: called as it is


@pytest.mark.slow  # dynamo tracing the student: about 30 s on 2 loaded cores
def test_compiled_student_gives_the_same_loss_and_gradients_and_taps_fire(teacher):
    """module.compile.student=true with backend=eager (dynamo's graph capture, the part that could lose the taps, no
    code generation); inductor is tests/test_taps.py's opt-in test (BKSDM_TEST_INDUCTOR=1)."""
    torch._dynamo.reset()
    plain = make_module(teacher)
    batch = batch_of(teacher)
    loss, grads = loss_and_grads(plain, batch)
    layers = dict(plain.loss.terms["feat_kd"].last_layer_losses)
    module = fast_module(teacher, compile={"student": True, "backend": "eager"})
    assert module.fast.apply(module, "cpu")["compile_student"]
    for _ in range(2):  # the compiling call and a call of the compiled graph
        loss_c, grads_c = loss_and_grads(module, batch)
        assert_close(loss_c, loss, rtol=1e-5, atol=1e-7)
        assert_close(grads_c, grads, rtol=1e-4, atol=1e-7)
        assert module.loss.terms["feat_kd"].last_layer_losses.keys() == layers.keys()  # every tap fired
    torch._dynamo.reset()


def test_compile_and_channels_last_auto_are_off_on_cpu_and_on_for_cuda(teacher, monkeypatch):
    module = fast_module(teacher, compile={"student": "auto", "teacher": "auto"}, channels_last="auto")
    resolved = module.fast.apply(module, "cpu")
    assert not resolved["compile_student"] and not resolved["compile_teacher"] and not resolved["channels_last"]
    assert module.fast.model("student", module.student) is module.student
    monkeypatch.setattr(torch, "compile", CompileSpy)  # the decision for a CUDA device; nothing runs there
    resolved = module.fast.apply(module, "cuda")
    assert resolved["compile_student"] and resolved["compile_teacher"] and resolved["channels_last"]


# ---- channels_last, frozen dtype -----------------------------------------------------------------


def test_channels_last_changes_nothing(teacher):
    plain = make_module(teacher)
    batch = batch_of(teacher)
    loss, grads = loss_and_grads(plain, batch)
    plain.fast.channels_last = True
    assert plain.fast.apply(plain, "cpu")["channels_last"]
    conv = plain.student.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert teacher.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    loss_cl, grads_cl = loss_and_grads(plain, batch)
    assert_close(loss_cl, loss, rtol=1e-5, atol=1e-6)
    assert_close(grads_cl, grads, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("frozen_dtype", "precision", "expected"),
    [
        ("auto", "32-true", torch.float32),
        ("auto", "16-mixed", torch.float16),
        ("auto", "bf16-mixed", torch.bfloat16),
        ("fp32", "16-mixed", torch.float32),
        ("bf16", "32-true", torch.bfloat16),
    ],
)
def test_frozen_dtype_follows_the_precision_unless_set(teacher, frozen_dtype, precision, expected):
    module = make_module(teacher)
    module.fast.frozen_dtype = frozen_dtype
    module.fast.apply(module, "cpu", precision)
    for name in FROZEN:
        assert {p.dtype for p in getattr(module, name).parameters()} == {expected}, name
    assert {p.dtype for p in module.student.parameters()} == {torch.float32}


def test_frozen_parts_in_bf16_and_bf16_autocast_change_the_loss_only_by_rounding(teacher):
    """fp16 frozen parts are the same code with another dtype (fp16 convolutions are a GPU matter)."""
    module = make_module(teacher)
    batch = batch_of(teacher)
    loss, grads = loss_and_grads(module, batch)
    module.fast.frozen_dtype = "bf16"
    module.fast.apply(module, "cpu", "32-true")
    loss_bf16, _ = loss_and_grads(module, batch)  # the student in fp32, fed bf16 text conditioning and teacher
    assert_close(loss_bf16, loss, rtol=5e-2, atol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # trainer.precision=bf16-mixed
        loss_mixed, grads_mixed = loss_and_grads(module, batch)
    assert_close(loss_mixed, loss, rtol=5e-2, atol=1e-3)
    cosines = [
        torch.nn.functional.cosine_similarity(grads_mixed[n].flatten(), g.flatten(), dim=0) for n, g in grads.items()
    ]
    assert min(c for c, g in zip(cosines, grads.values(), strict=True) if g.abs().sum() > 0) > 0.95


# ---- fused AdamW ----------------------------------------------------------------------------------


def test_fused_adamw_takes_the_same_steps(teacher):
    batch = batch_of(teacher)
    _, grads = loss_and_grads(make_module(teacher), batch)
    results = []
    for fused in (False, True):
        module = make_module(teacher)
        module.optimizer_factory = functools.partial(torch.optim.AdamW, lr=1e-3, fused=fused)
        optimizer = module.configure_optimizers()
        assert bool(optimizer.defaults["fused"]) is fused
        for _ in range(3):
            for n, p in module.student.named_parameters():
                p.grad = grads[n].clone() if n in grads else None
            optimizer.step()
        results.append({n: p.detach().clone() for n, p in module.student.named_parameters()})
    assert_close(results[1], results[0], rtol=1e-5, atol=1e-7)


def test_fused_null_is_fused_on_cuda_only(teacher, monkeypatch):
    module = make_module(teacher)
    module.optimizer_factory = functools.partial(torch.optim.AdamW, lr=1e-3, fused=None)
    assert not module.configure_optimizers().defaults["fused"]  # CPU: torch's default (foreach)
    seen = {}
    module.optimizer_factory = lambda params, **kw: seen.update(kw) or torch.optim.AdamW(params, lr=1e-3)
    module.optimizer_factory.keywords = {"fused": None}
    monkeypatch.setattr(DistillModule, "device", property(lambda self: torch.device("cuda")))
    module.configure_optimizers()
    assert seen == {"fused": True}


def fit(module, steps: int, tmp_path, n_batches=None, **trainer_kwargs):
    batches = [batch_of(module.teacher) | {"index": torch.arange(2) + 2 * i} for i in range(n_batches or steps)]
    defaults = dict(
        max_steps=steps,
        accelerator="cpu",
        logger=pl.loggers.CSVLogger(tmp_path, name="csv", version=0),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        gradient_clip_val=1.0,
    )
    trainer = pl.Trainer(**(defaults | trainer_kwargs))
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer


class GradsAfterStep(pl.Callback):
    """The student's gradients as the optimizer used them (unscaled, clipped)."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.grads = {n: p.grad.clone() for n, p in module.student.named_parameters() if p.grad is not None}


def test_fused_adamw_under_a_grad_scaler_clips_and_steps_as_the_plain_one(teacher, tmp_path):
    """16-mixed's GradScaler with a fused AdamW and gradient clipping (Lightning refuses that pair; the module
    unscales first and clips itself): the optimizer sees the same unscaled, clipped gradients as the non-fused one
    under the same scaler and takes the same step. (One step: fp16 autocast turns the last-bit differences of fused
    and foreach AdamW into visibly different gradients at the next step.)"""
    from pytorch_lightning.plugins.precision import MixedPrecision

    weights, grads = [], []
    modules = [make_module(teacher) for _ in range(2)]  # both students from the fp32 teacher (a fit casts it to fp16)
    for fused, module in zip((False, True), modules, strict=True):
        module.optimizer_factory = functools.partial(torch.optim.AdamW, lr=1e-3, fused=fused)
        scaler, seen = torch.amp.GradScaler("cpu", init_scale=2.0**8), GradsAfterStep()
        plugins = [MixedPrecision("16-mixed", "cpu", scaler)]
        fit(module, 1, tmp_path, plugins=plugins, logger=False, callbacks=[seen], gradient_clip_val=0.01)
        assert scaler.get_scale() == 2.0**8  # the step was not skipped
        assert bool(module.trainer.optimizers[0].defaults["fused"]) is fused
        weights.append({n: p.detach().clone() for n, p in module.student.named_parameters()})
        grads.append(seen.grads)
    assert_close(grads[1], grads[0], rtol=0, atol=0)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads[1].values()]))
    assert abs(norm.item() - 0.01) < 1e-4  # unscaled, then clipped to 0.01
    assert_close(weights[1], weights[0], rtol=1e-5, atol=1e-7)


# ---- no host syncs in the hot loop ----------------------------------------------------------------


def read_rows(tmp_path) -> list[dict]:
    return list(csv.DictReader((tmp_path / "csv" / "version_0" / "metrics.csv").open()))


def test_logging_every_n_steps_changes_no_weight_and_logs_what_it_did(teacher, tmp_path):
    """log_every_n_steps=2 (metrics, grad norm, throughput on every 2nd optimizer step) ends with the same weights
    as logging every step; the logged loss is the last micro-batch's; the first step is timed on its own."""
    finals = []
    for every in (1, 2):
        module = make_module(teacher)
        module.optimizer_factory = ADAMW
        fit(
            module,
            4,
            tmp_path / str(every),
            n_batches=8,
            log_every_n_steps=every,
            accumulate_grad_batches=2,
            callbacks=[cb.Throughput(), cb.EMA(decay=0.9)],
        )
        finals.append({n: p.detach().clone() for n, p in module.student.named_parameters()})
        rows = read_rows(tmp_path / str(every))
        logged = {int(r["step"]) for r in rows if r.get("train/loss")}
        assert logged == ({0, 1, 2, 3} if every == 1 else {1, 3})  # Lightning's step: optimizer steps - 1
        assert logged == {int(r["step"]) for r in rows if r.get("train/grad_norm")}
        assert {int(r["step"]) for r in rows if r.get("perf/images_per_s")} == logged - {0}  # not the first step
        first = [float(r["perf/first_step_s"]) for r in rows if r.get("perf/first_step_s")]
        assert len(first) == 1 and first[0] > 0
        assert all(float(r["train/loss"]) > 0 for r in rows if r.get("train/loss"))
    assert_close(finals[1], finals[0], rtol=0, atol=0)


def test_no_log_and_no_host_read_on_steps_that_log_nothing(teacher, tmp_path, monkeypatch):
    """Between logging steps neither the module nor the callbacks log anything (a float logged on CUDA is a host
    sync) nor read a tensor on the host (.item(), bool(), .tolist(), .cpu()) but for the non-finite check, one
    bool() a micro-step: counted on steps 2 and 3 of 4 with log_every_n_steps=4."""
    counting = {"on": False, "reads": [], "logs": 0}
    host_side = set()  # the batch's sample indices, which the per-sample generators read on the host

    def count(name, original):
        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if counting["on"] and "bksdm_lab" in caller and id(self) not in host_side:
                counting["reads"].append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return original(self, *args, **kwargs)

        return wrapper

    for name in ("item", "__bool__", "tolist", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, count(name, getattr(torch.Tensor, name)))
    log = pl.LightningModule.log

    def counted_log(self, *args, **kwargs):
        counting["logs"] += counting["on"]
        return log(self, *args, **kwargs)

    monkeypatch.setattr(pl.LightningModule, "log", counted_log)

    class Window(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            host_side.add(id(batch["index"]))
            counting["on"] = trainer.global_step in (1, 2)

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            counting["on"] = False

    module = make_module(teacher)
    callbacks = [cb.DataQuality(), cb.EMA(decay=0.9), cb.Throughput(), Window()]
    fit(module, 4, tmp_path, log_every_n_steps=4, callbacks=callbacks)
    reads = counting.pop("reads")
    assert counting == {"on": False, "logs": 0}
    assert [r.split(" from ")[0] for r in reads] == ["__bool__"] * 2, reads  # torch.isfinite(total), steps 2 and 3
    assert all("distill/module.py" in r for r in reads), reads
    assert any(r.get("train/loss") for r in read_rows(tmp_path))  # step 4 logged


# ---- config values are checked before anything loads -----------------------------------------------


def test_bad_fast_path_values_are_one_line_each_before_loading(compose_train):
    cfg = compose_train(
        "experiment=demo",
        "module.step.gradient_checkpointing=sometimes",
        "module.step.compile.student=yes",
        "module.step.frozen_dtype=fp8",
        "+module.step.compile.backnd=eager",
        "+module.step.attention=sdpa",
    )
    lines = [
        "module.step.gradient_checkpointing='sometimes' is not one of true, false",
        "module.step.compile.student='yes' is not one of auto, true, false",
        "module.step.frozen_dtype='fp8' is not one of auto, fp32, fp16, bf16",
        "module.step.compile has no key 'backnd'; its keys are student, teacher, backend, mode, dynamic, fullgraph",
        "module.step has no key 'attention'; its keys are seed, gradient_checkpointing, compile, channels_last, "
        "frozen_dtype",
    ]
    assert [p for p in check_values(cfg) if p.startswith("module.step")] == lines
    with pytest.raises(ValueError, match=r"^module.step.channels_last='yes' is not one of auto, true, false$"):
        FastPath(channels_last="yes")  # the module refuses the same values
    assert not check_values(compose_train("experiment=demo", "module.step.channels_last=true"))
