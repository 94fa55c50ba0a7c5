"""The fast training path (docs/fastpath.md): switches that change the speed or memory of a training step and
nothing in its loss (tests/test_fastpath.py compares each one on and off on the same seed). They are one config
group, ``module.step``; ``auto`` is on for a CUDA device and off on the CPU. :meth:`FastPath.apply` sets them when
the trainer sets the module up, and the run's log says what each resolved to."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.amp.grad_scaler import OptState

log = logging.getLogger("bksdm_lab")

KEY = "module.step"
AUTO = "auto"
SWITCH = (AUTO, True, False)
FROZEN_DTYPES = {AUTO: None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MIXED_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}  # what frozen_dtype=auto gives
COMPILE_KEYS = ("student", "teacher", "backend", "mode", "dynamic", "fullgraph")
STEP_KEYS = ("seed", "gradient_checkpointing", "compile", "channels_last", "frozen_dtype")


def _allowed(value, allowed) -> bool:
    return any(value is v or (isinstance(v, str) and value == v) for v in allowed)


def problems(step: Mapping) -> list[str]:
    """One line per bad value of ``module.step``: what the pre-load check reports and what :class:`FastPath`
    refuses."""
    compile = dict(step.get("compile") or {})
    checks = (
        ("gradient_checkpointing", step.get("gradient_checkpointing", False), (True, False)),
        ("compile.student", compile.get("student", False), SWITCH),
        ("compile.teacher", compile.get("teacher", False), SWITCH),
        ("channels_last", step.get("channels_last", False), SWITCH),
        ("frozen_dtype", step.get("frozen_dtype", AUTO), tuple(FROZEN_DTYPES)),
    )
    shown = lambda allowed: ", ".join(str(v).lower() if isinstance(v, bool) else v for v in allowed)  # noqa: E731
    lines = [f"{KEY}.{k}={v!r} is not one of {shown(a)}" for k, v, a in checks if not _allowed(v, a)]
    lines += [
        f"{KEY}.compile has no key {k!r}; its keys are {', '.join(COMPILE_KEYS)}"
        for k in compile
        if k not in COMPILE_KEYS
    ]
    return lines + [f"{KEY} has no key {k!r}; its keys are {', '.join(STEP_KEYS)}" for k in step if k not in STEP_KEYS]


def check_config(cfg) -> list[str]:
    """:func:`problems` of a train config's ``module.step``, before anything loads."""
    return problems((cfg.get("module") or {}).get("step") or {})


@dataclass
class FastPath:
    """The switches of ``module.step`` (the defaults are the plain path; conf/module/distill.yaml sets the run's)."""

    gradient_checkpointing: bool = False  # recompute the student's activations in the backward
    compile: Mapping[str, Any] = field(default_factory=dict)  # torch.compile of the student / teacher U-Net
    channels_last: bool | str = False  # student, teacher U-Net and VAE in channels_last memory format
    frozen_dtype: str = AUTO  # teacher, VAE, text encoder: auto follows the mixed precision
    resolved: dict[str, Any] = field(default_factory=dict, init=False)  # what each switch resolved to (apply)
    # (module, its compiled wrapper) by name: outside the module tree, so state_dict and named_modules are unchanged
    compiled: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = field(default_factory=dict, init=False)

    def __post_init__(self):
        self.compile = dict(self.compile or {})
        if bad := problems({k: getattr(self, k) for k in STEP_KEYS if k != "seed"}):
            raise ValueError("; ".join(bad))

    def apply(self, module, device: torch.device | str, precision: str = "32-true") -> dict[str, Any]:
        """Resolve ``auto`` for ``device`` and set every switch on ``module`` (a DistillModule); logged once."""
        cuda = torch.device(device).type == "cuda"
        on = lambda value: cuda if value == AUTO else bool(value)  # noqa: E731
        dtype = MIXED_DTYPES.get(precision) if self.frozen_dtype == AUTO else FROZEN_DTYPES[self.frozen_dtype]
        for name in module.frozen if dtype is not None else ():
            getattr(module, name).to(dtype)
        channels_last = on(self.channels_last)
        for part in (module.student, module.teacher_unet, module.vae) if channels_last else ():
            if part is not None:
                part.to(memory_format=torch.channels_last)
        if self.gradient_checkpointing:
            module.student.enable_gradient_checkpointing()
        options = {k: self.compile.get(k) for k in ("backend", "mode", "dynamic") if self.compile.get(k) is not None}
        options["fullgraph"] = bool(self.compile.get("fullgraph"))
        self.compiled = {
            name: (part, torch.compile(part, **options))
            for name, part in (("student", module.student), ("teacher", module.teacher_unet))
            if on(self.compile.get(name, False))
        }
        self.resolved = {
            "device": str(device),
            "gradient_checkpointing": bool(self.gradient_checkpointing),
            "compile_student": "student" in self.compiled,
            "compile_teacher": "teacher" in self.compiled,
            "channels_last": channels_last,
            "frozen_dtype": str(dtype or torch.float32).removeprefix("torch."),
        }
        log.info("fast path: %s", ", ".join(f"{k}={v}" for k, v in self.resolved.items()))
        return self.resolved

    def model(self, name: str, plain: torch.nn.Module) -> torch.nn.Module:
        """The compiled wrapper of ``plain`` when ``name`` was compiled around this very module, else ``plain``
        (a test or a strategy may have swapped the module since)."""
        part, compiled = self.compiled.get(name, (None, None))
        return compiled if part is plain else plain


# ---- metrics on logging steps only --------------------------------------------------------------------------------
def logging_step(trainer, batch_idx: int) -> bool:
    """Whether Lightning writes the metrics of this micro-batch, asked before its optimizer step (training_step,
    on_train_batch_start): the micro-batch that ends an optimizer step whose count is a multiple of
    ``trainer.log_every_n_steps``, or the run stopping. Lightning's own rule (its logger connector's
    ``should_update_logs``) from public trainer attributes; the other micro-batches' metrics would never reach a
    logger, and each ``self.log`` costs CPU time (on CUDA, a float or a progress-bar value is a host sync)."""
    every = trainer.log_every_n_steps
    steps = (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or batch_idx + 1 == trainer.num_training_batches
    return bool(every) and steps and ((trainer.global_step + 1) % every == 0 or trainer.should_stop)


# ---- fused AdamW under 16-mixed's GradScaler ----------------------------------------------------------------------
def fused_kwargs(factory, device: torch.device) -> dict:
    """``optimizer.fused=null`` means fused on CUDA (one kernel for all tensors, no host sync in the scaler's step)."""
    keywords = getattr(factory, "keywords", None) or {}  # a functools.partial (Hydra's _partial_)
    return {"fused": True} if "fused" in keywords and keywords["fused"] is None and device.type == "cuda" else {}


def fused_scaler(trainer, optimizer):
    """Lightning's GradScaler (16-mixed) when the optimizer is fused: a fused step unscales the gradients itself, so
    Lightning leaves them scaled before ``on_before_optimizer_step`` and refuses to clip them."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and optimizer.defaults.get("fused") else None


def unscale_fused(trainer, optimizer) -> None:
    """Unscale a fused optimizer's gradients on the device (no sync), so the grad norm and clipping see true values;
    the scaler's step then hands only ``found_inf`` to the fused kernel, which skips the update on inf/NaN."""
    scaler = fused_scaler(trainer, optimizer)
    # GradScaler has no public "already unscaled" query; a step whose training_step returned None is not stepped
    if scaler is not None and scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY:
        scaler.unscale_(optimizer)


def clip_fused(trainer, optimizer, value, algorithm) -> bool:
    """Clip the (unscaled) gradients of a fused optimizer under a GradScaler; False when Lightning's clipping serves."""
    if not value or fused_scaler(trainer, optimizer) is None:
        return False
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if algorithm in (None, "norm"):
        torch.nn.utils.clip_grad_norm_(params, value)
    else:
        torch.nn.utils.clip_grad_value_(params, value)
    return True
