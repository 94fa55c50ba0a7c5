"""The distillation LightningModule: a frozen teacher (U-Net, VAE, text encoder) and a trainable student."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
from diffusers.utils.torch_utils import randn_tensor

from bksdm_lab.distill.checks import CheckpointError
from bksdm_lab.distill.losses import KDInputs, KDLoss
from bksdm_lab.models.taps import FeatureTaps
from bksdm_lab.models.teachers import Teacher

log = logging.getLogger("bksdm_lab")

FROZEN = ("teacher_unet", "vae", "text_encoder")
FROZEN_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
CHECKPOINTED = ("student.", "ema_student.")  # ema_student.*: written by the EMA callback
NONFINITE_POLICIES = ("skip", "stop")

# ---- the fast path (README 'Fast path'): each switch, its values; "auto" decides from the device at setup ----
AUTO = "auto"
CHECKPOINTING_VALUES = (AUTO, True, False)
ATTENTION_VALUES = ("sdpa", "classic")  # PyTorch SDPA (diffusers AttnProcessor2_0) | diffusers' AttnProcessor
FROZEN_DTYPE_VALUES = {AUTO: None, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SWITCH_VALUES = (AUTO, True, False)  # compile.student, compile.teacher, channels_last
NONFINITE_CHECK_VALUES = (AUTO, "step", "deferred")
COMPILE_KEYS = ("student", "teacher", "backend", "mode", "dynamic", "fullgraph")
CHECKPOINTING_MARGIN = 0.9  # auto: checkpoint when a micro-step would need more than this fraction of free memory
PROBE_KEY = -2  # the "step" of the memory probe's draws: never a training step, nor VALIDATION_KEY


def _switch(name: str, value, allowed) -> Any:
    """A config value checked against its allowed values (strings "true"/"false" read as booleans)."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not any(value is v or (isinstance(v, str) and value == v) for v in allowed):
        shown = ", ".join(str(v).lower() if isinstance(v, bool) else str(v) for v in allowed)
        raise ValueError(f"{name}={value!r} is not one of {shown}")
    return value


def fast_path_problems(
    gradient_checkpointing=False,
    compile: Mapping[str, Any] | None = None,
    channels_last=False,
    attention="sdpa",
    frozen_dtype=AUTO,
    nonfinite_check="step",
    nonfinite="stop",
) -> list[str]:
    """One line per bad fast-path value: what :func:`check_config` reports before loading and what
    :class:`DistillModule` refuses."""
    compile = dict(compile or {})
    checks = [
        ("gradient_checkpointing", gradient_checkpointing, CHECKPOINTING_VALUES),
        ("module.compile.student", compile.get("student", False), SWITCH_VALUES),
        ("module.compile.teacher", compile.get("teacher", False), SWITCH_VALUES),
        ("module.channels_last", channels_last, SWITCH_VALUES),
        ("module.attention", attention, ATTENTION_VALUES),
        ("module.frozen_dtype", frozen_dtype, tuple(FROZEN_DTYPE_VALUES)),
        ("module.nonfinite_check", nonfinite_check, NONFINITE_CHECK_VALUES),
    ]
    problems = []
    for name, value, allowed in checks:
        try:
            _switch(name, value, allowed)
        except ValueError as err:
            problems.append(str(err))
    problems += [
        f"module.compile has no key {key!r}; its keys are {', '.join(COMPILE_KEYS)}"
        for key in compile
        if key not in COMPILE_KEYS
    ]
    if nonfinite_check == "deferred" and nonfinite == "skip":
        problems.append(
            "module.nonfinite_check=deferred cannot skip a batch (it learns of a NaN only steps later): "
            "use nonfinite=stop, or nonfinite_check=step with nonfinite=skip"
        )
    return problems


def check_config(cfg) -> list[str]:
    """One line per bad fast-path value of a train config (``gradient_checkpointing``, ``module.*``), before loading."""
    module = cfg.get("module") or {}
    return fast_path_problems(
        gradient_checkpointing=cfg.get("gradient_checkpointing", False),
        compile=module.get("compile"),
        channels_last=module.get("channels_last", False),
        attention=module.get("attention", "sdpa"),
        frozen_dtype=module.get("frozen_dtype", AUTO),
        nonfinite_check=module.get("nonfinite_check", "step"),
        nonfinite=cfg.get("nonfinite", "stop"),
    )


def needs_checkpointing(need_bytes: float, available_bytes: float, margin: float = CHECKPOINTING_MARGIN) -> bool:
    """gradient_checkpointing=auto's rule: on when a micro-step without it would need more than ``margin`` of the
    accelerator memory available to this process."""
    return need_bytes > margin * available_bytes


def set_attention(model: torch.nn.Module | None, attention: str) -> None:
    """Every attention layer of a diffusers model on PyTorch SDPA (``sdpa``: ``AttnProcessor2_0``, which picks the
    flash / memory-efficient kernels on CUDA) or on diffusers' explicit softmax(QK^T)V (``classic``)."""
    if model is None or not hasattr(model, "set_attn_processor"):
        return
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    model.set_attn_processor(AttnProcessor2_0() if attention == "sdpa" else AttnProcessor())


def first_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype of a model's first parameter: what a frozen part was cast to. Not diffusers' ``.dtype``, which walks
    every submodule (about 3 ms a call on an SD U-Net, twice per micro-batch on the hot path)."""
    return next(model.parameters()).dtype


def sample_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed from (run seed, optimizer step, sample index): independent streams per sample and step."""
    digest = hashlib.blake2b(f"{seed}/{step}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def random_timesteps(num_steps: int, batch: int, generators, device) -> torch.Tensor:
    """Uniform timesteps in [0, num_steps): one draw per sample from its own generator (or one generator)."""
    if isinstance(generators, list):
        return torch.cat([torch.randint(0, num_steps, (1,), generator=g, device=device) for g in generators]).long()
    return torch.randint(0, num_steps, (batch,), generator=generators, device=device).long()


class NonFiniteLossError(FloatingPointError):
    """A loss part became NaN or Inf and loss.nonfinite=stop."""


class DistillModule(pl.LightningModule):
    """Block-removed knowledge distillation (BK-SDM).

    Only the student trains and only the student is checkpointed; the frozen parts are rebuilt from the
    config on resume. Under mixed precision the frozen parts are cast to the half dtype. Side jobs are
    callbacks (``bksdm_lab.distill.callbacks``): EMA, data-quality counts, samples, export.
    """

    def __init__(
        self,
        teacher: Teacher,
        student: torch.nn.Module,
        loss: KDLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        gradient_checkpointing: bool | str = False,
        nonfinite: str = "stop",
        seed: int = 0,
        run_config: Mapping[str, Any] | None = None,
        compile: Mapping[str, Any] | None = None,
        channels_last: bool | str = False,
        attention: str = "sdpa",
        frozen_dtype: str = AUTO,
        nonfinite_check: str = "step",
    ):
        super().__init__()
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite={nonfinite!r} is not one of {NONFINITE_POLICIES}")
        problems = fast_path_problems(
            gradient_checkpointing, compile, channels_last, attention, frozen_dtype, nonfinite_check, nonfinite
        )
        if problems:
            raise ValueError("; ".join(problems))
        gradient_checkpointing = _switch("gradient_checkpointing", gradient_checkpointing, CHECKPOINTING_VALUES)
        compile = dict(compile or {})
        self.compile_options = {
            "student": _switch("module.compile.student", compile.get("student", False), SWITCH_VALUES),
            "teacher": _switch("module.compile.teacher", compile.get("teacher", False), SWITCH_VALUES),
            **{k: compile.get(k) for k in ("backend", "mode", "dynamic")},
            "fullgraph": bool(compile.get("fullgraph") or False),
        }
        self.channels_last = _switch("module.channels_last", channels_last, SWITCH_VALUES)
        self.attention = _switch("module.attention", attention, ATTENTION_VALUES)
        self.frozen_dtype = _switch("module.frozen_dtype", frozen_dtype, tuple(FROZEN_DTYPE_VALUES))
        self.nonfinite_check = _switch("module.nonfinite_check", nonfinite_check, NONFINITE_CHECK_VALUES)
        self.student = student
        self.teacher_unet = teacher.unet
        self.vae = teacher.vae
        self.text_encoder = teacher.text_encoder
        for name in self.frozen:
            getattr(self, name).requires_grad_(False).eval()
        self.noise_scheduler = teacher.noise_scheduler
        self.teacher = teacher  # tokenizer and inference scheduler, for samples and export
        self.loss = loss
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.gradient_checkpointing = gradient_checkpointing  # auto: decided at the first training step
        if gradient_checkpointing is True:
            self.student.enable_gradient_checkpointing()
        for part in (self.student, self.teacher_unet, self.vae):
            set_attention(part, self.attention)
        self.nonfinite = nonfinite
        self.seed = seed
        self.run_config = dict(run_config or {})  # stored in checkpoints, so export can rebuild the teacher
        self._rng: torch.Generator | None = None  # for batches without sample indices only (see sample_generators)
        pairs = loss.feature_pairs
        # Hooks on the unwrapped modules: later DDP / torch.compile wrappers cannot rename them away.
        self.student_taps = FeatureTaps(self.student, [s for _, s in pairs]) if pairs else None
        self.teacher_taps = FeatureTaps(self.teacher_unet, [t for t, _ in pairs]) if pairs else None
        self.strict_loading = False  # checkpoints hold the student only; see on_load_checkpoint
        # fast-path state (not modules: a plain dict keeps compiled wrappers out of state_dict and named_modules)
        self._compiled: dict[str, torch.nn.Module] = {}
        self._use_compiled = True
        self.fast_path: dict[str, Any] = {}  # what each switch resolved to (configure_fast_path), logged once
        self._log_now = True  # whether this micro-step's metrics are logged (Lightning's log_every_n_steps)
        self._first_bad: torch.Tensor | None = None  # nonfinite_check=deferred: first non-finite step, on device
        self._bad_parts: torch.Tensor | None = None
        self._part_names: list[str] = []

    @property
    def frozen(self) -> list[str]:
        """The frozen parts present (no VAE when training from cached latents)."""
        return [name for name in FROZEN if getattr(self, name, None) is not None]

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen:
            getattr(self, name).eval()
        return self

    @property
    def rng(self) -> torch.Generator:
        """One generator seeded with ``seed``, for batches that carry no sample indices (hand-made batches)."""
        if self._rng is None or self._rng.device != self.device:
            self._rng = torch.Generator(device=self.device).manual_seed(self.seed)
        return self._rng

    def sample_generators(self, batch: dict, step: int | None = None) -> list[torch.Generator] | torch.Generator:
        """A generator per sample, seeded by (seed, optimizer step, sample index): the VAE posterior sample, the
        noise and the timestep of a sample are a function of what it is and when it is trained, not of the rank,
        the micro-batch split or the world size. So every rank draws its own noise (its samples differ), a
        resumed or extended run draws what an uninterrupted one draws (nothing to checkpoint), and N ranks equal
        one process holding the same global batch. ``step`` defaults to the current optimizer step; a fixed one
        gives fixed draws (validation). Batches without ``index`` fall back to :attr:`rng`."""
        if "index" not in batch:
            return self.rng
        step = self.global_step if step is None else step
        return [
            torch.Generator(device=self.device).manual_seed(sample_seed(self.seed, step, int(i)))
            for i in batch["index"].tolist()
        ]

    def setup(self, stage: str) -> None:
        self.configure_fast_path(self.trainer.strategy.root_device, str(self.trainer.precision))

    def configure_fast_path(self, device: torch.device | str, precision: str = "32-true") -> dict[str, Any]:
        """Resolve every ``auto`` switch for ``device`` and apply the switches: the frozen parts' dtype, channels_last,
        torch.compile wrappers and (``true``) gradient checkpointing; ``gradient_checkpointing=auto`` is decided at
        the first training step (it needs a batch). Returns (and logs once) what each switch resolved to."""
        device = torch.device(device)
        cuda = device.type == "cuda"
        dtype = FROZEN_DTYPE_VALUES[self.frozen_dtype] if self.frozen_dtype != AUTO else FROZEN_DTYPES.get(precision)
        if dtype is not None:
            for name in self.frozen:
                getattr(self, name).to(dtype)
        channels_last = cuda if self.channels_last == AUTO else self.channels_last
        if channels_last:
            for part in (self.student, self.teacher_unet, self.vae):
                if part is not None:
                    part.to(memory_format=torch.channels_last)
        self._compiled = {}
        options = {k: v for k, v in self.compile_options.items() if k not in ("student", "teacher") and v is not None}
        for name, attr in (("student", "student"), ("teacher", "teacher_unet")):
            on = cuda if self.compile_options[name] == AUTO else self.compile_options[name]
            if on:
                self._compiled[name] = torch.compile(getattr(self, attr), **options)
        checkpointing = self.gradient_checkpointing
        if checkpointing == AUTO and not cuda:
            checkpointing = False  # nothing to measure free memory against on the CPU
        nonfinite_check = self.nonfinite_check
        if nonfinite_check == AUTO:
            nonfinite_check = "deferred" if cuda and self.nonfinite == "stop" else "step"
        self.fast_path = {
            "device": str(device),
            "gradient_checkpointing": checkpointing,
            "compile_student": "student" in self._compiled,
            "compile_teacher": "teacher" in self._compiled,
            "channels_last": bool(channels_last),
            "attention": self.attention,
            "frozen_dtype": str(dtype or torch.float32).removeprefix("torch."),
            "nonfinite_check": nonfinite_check,
        }
        log.info("fast path: %s", ", ".join(f"{k}={v}" for k, v in self.fast_path.items()))
        return self.fast_path

    @contextmanager
    def eager(self):
        """Run the models uncompiled inside this block (the memory probe: no compilation for its batch shapes)."""
        before, self._use_compiled = self._use_compiled, False
        try:
            yield
        finally:
            self._use_compiled = before

    def _model(self, name: str) -> torch.nn.Module:
        attr = "student" if name == "student" else "teacher_unet"
        compiled = self._compiled.get(name) if self._use_compiled else None
        # a compiled wrapper of the module in place (the test of taps through DDP swaps self.student)
        if compiled is not None and getattr(compiled, "_orig_mod", None) is getattr(self, attr):
            return compiled
        return getattr(self, attr)

    # ---- the loss -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, batch: dict[str, torch.Tensor], generators=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (sampled from the VAE posterior, scaled) and text conditioning of a batch.

        A batch of cached latents (``latent_mean``, ``latent_std``: the VAE posterior, precomputed by
        ``bksdm_lab.prepare``) is sampled the same way, with no VAE.
        """
        generators = self.rng if generators is None else generators
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].float(), batch["latent_std"].float()
            eps = randn_tensor(mean.shape, generator=generators, device=mean.device, dtype=mean.dtype)
            latents = (mean + std * eps) * batch["scaling_factor"][0]
        else:
            pixels = batch["pixel_values"].to(first_dtype(self.vae))
            posterior = self.vae.encode(pixels).latent_dist
            latents = posterior.sample(generator=generators) * self.vae.config.scaling_factor
        cond = self.text_encoder(batch["input_ids"])[0]
        return latents.float(), cond

    def compute_loss(
        self, batch: dict[str, torch.Tensor], step: int | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted KD loss and its parts; the random draws come from :meth:`sample_generators` (``step``)."""
        generators = self.sample_generators(batch, step)
        latents, cond = self.encode(batch, generators)
        noise = randn_tensor(latents.shape, generator=generators, device=latents.device, dtype=latents.dtype)
        t = random_timesteps(
            self.noise_scheduler.config.num_train_timesteps, latents.shape[0], generators, latents.device
        )
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        elif self.noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            raise ValueError(f"unsupported prediction_type {self.noise_scheduler.config.prediction_type!r}")

        student_cond = cond
        if not torch.is_autocast_enabled(cond.device.type):  # frozen parts in half precision, student in fp32
            student_cond = cond.to(next(self.student.parameters()).dtype)
        student_out = self._model("student")(noisy, t, student_cond).sample
        teacher_out = None
        if self.loss.needs_teacher:
            with torch.no_grad():
                teacher_out = self._model("teacher")(
                    noisy.to(teacher_dtype := first_dtype(self.teacher_unet)), t, cond.to(teacher_dtype)
                ).sample
        inputs = KDInputs(
            student_out=student_out,
            target=target,
            teacher_out=teacher_out,
            student_features=self.student_taps.pop() if self.student_taps else {},
            teacher_features=self.teacher_taps.pop() if self.teacher_taps else {},
            noisy=noisy,
            timesteps=t,
            alphas_cumprod=self.noise_scheduler.alphas_cumprod,
            prediction_type=self.noise_scheduler.config.prediction_type,
        )
        return self.loss(inputs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if "input_ids" not in batch:  # every sample of this batch was unusable
            return None
        if self.gradient_checkpointing == AUTO and self.fast_path.get("gradient_checkpointing") == AUTO:
            self.decide_checkpointing(batch)
        self._log_now = self._is_logging_step()
        total, parts = self.compute_loss(batch)
        bs = batch["input_ids"].shape[0]
        if self.fast_path.get("nonfinite_check") == "deferred":
            self._note_nonfinite(total, parts)  # on the device: no host sync; checked on logging steps
        elif not torch.isfinite(total):
            bad = [f"{name}={value.item()}" for name, value in parts.items() if not torch.isfinite(value)]
            message = (
                f"non-finite loss at step {self.global_step} (batch {batch_idx}): "
                f"{', '.join(bad) or f'total={total.item()}'}"
            )
            if self.nonfinite == "skip":
                self.log("train/nonfinite_skipped", 1.0, reduce_fx="sum", batch_size=bs)
                print(f"bksdm_lab: {message}; batch skipped (loss.nonfinite=skip)")
                return None
            path = self.save_last_good_state()
            raise NonFiniteLossError(f"{message}. Stopped (loss.nonfinite=stop); last good state saved to {path}")
        if self._log_now:
            self._log_losses(total, parts, bs)
        return total

    def _is_logging_step(self) -> bool:
        """Whether Lightning writes this micro-step's metrics: the last micro-batch before an optimizer step that is a
        multiple of ``trainer.log_every_n_steps`` (or the run stopping). Metrics of other micro-steps would never reach
        a logger, and each ``self.log`` costs CPU time (and, on CUDA, a host sync for a float or a progress-bar value),
        so they are not logged. True without a trainer."""
        trainer = self._trainer
        connector = getattr(trainer, "_logger_connector", None)
        if trainer is None or connector is None:
            return True
        try:
            if trainer.fit_loop._should_accumulate():
                return False
            return bool(connector.should_update_logs)
        except (AttributeError, NotImplementedError):  # another Lightning: log every step
            return True

    def _log_losses(self, total: torch.Tensor, parts: dict, bs: int) -> None:
        """The loss, its parts and the per-layer values in one device-to-host copy, logged as CPU tensors (a CUDA
        tensor in the progress bar costs a host sync at every micro-step; these cost one on logging steps only)."""
        layers = {
            f"train/{name}/{layer}": value
            for name in self.loss.active  # per-layer values of feature terms: train/<term>/<student module>
            for layer, value in getattr(self.loss.terms[name], "last_layer_losses", {}).items()
        }
        names = ["train/loss", *(f"train/loss_{name}" for name in parts), *layers]
        values = torch.stack([v.detach().float().reshape(()) for v in (total, *parts.values(), *layers.values())])
        for name, value in zip(names, values.cpu(), strict=True):
            self.log(name, value, prog_bar=name == "train/loss", batch_size=bs)

    # ---- nonfinite_check=deferred: the check without a host sync per micro-step ---------------------
    def _note_nonfinite(self, total: torch.Tensor, parts: dict) -> None:
        values = torch.stack(
            [total.detach().float().reshape(()), *(v.detach().float().reshape(()) for v in parts.values())]
        )
        bad = ~torch.isfinite(values)
        if self._first_bad is None:
            self._first_bad = torch.full((), -1, dtype=torch.long, device=values.device)
            self._bad_parts = torch.zeros_like(bad)
            self._part_names = ["total", *parts]
        first = (self._first_bad < 0) & bad.any()
        self._first_bad = torch.where(first, torch.full_like(self._first_bad, self.global_step), self._first_bad)
        self._bad_parts = torch.where(first, bad, self._bad_parts)

    def check_nonfinite(self) -> None:
        """nonfinite_check=deferred: one host sync; raises when a micro-step since the start had a non-finite loss."""
        if self._first_bad is None:
            return
        step = int(self._first_bad.item())
        if step < 0:
            return
        names = [n for n, b in zip(self._part_names, self._bad_parts.tolist(), strict=True) if b and n != "total"]
        raise NonFiniteLossError(
            f"non-finite loss at step {step} ({', '.join(names) or 'total'}), found at step {self.global_step}. Stopped "
            f"(loss.nonfinite=stop). nonfinite_check=deferred checks every trainer.log_every_n_steps steps, so the "
            f"updates of steps {step} to {self.global_step} were applied and no last good state was saved: resume "
            f"from the last checkpoint written before step {step} (module.nonfinite_check=step stops at once)"
        )

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self._log_now and self.fast_path.get("nonfinite_check") == "deferred":
            self.check_nonfinite()

    def on_train_epoch_end(self) -> None:
        if self.fast_path.get("nonfinite_check") == "deferred":
            self.check_nonfinite()

    # ---- gradient_checkpointing=auto -------------------------------------------------------------
    def decide_checkpointing(self, batch: dict) -> bool:
        """gradient_checkpointing=auto, at the first training step: off on the CPU; on CUDA, a two-point probe
        (forward + backward of the student on 1 and 2 samples of this batch, uncompiled, gradients not kept) gives
        the memory of a micro-step as fixed + per-sample x micro-batch, plus AdamW's state if not yet allocated;
        checkpointing goes on when that exceeds 90% of the memory free to this process. Logged."""
        device = self.device
        n = int(batch["input_ids"].shape[0])
        if device.type != "cuda":
            on, why = False, f"device {device.type}: only CUDA memory is measured"
        else:
            try:
                need, available = self.estimate_step_memory(batch)
            except torch.OutOfMemoryError:  # even 2 samples do not fit without it
                torch.cuda.empty_cache()
                on, why = True, "the probe of 1 and 2 samples ran out of memory"
            else:
                on = needs_checkpointing(need, available)
                why = (
                    f"a micro-batch of {n} needs about {need / 2**30:.1f} GiB without it, "
                    f"{available / 2**30:.1f} GiB free"
                )
        if on:
            self.student.enable_gradient_checkpointing()
        self.fast_path["gradient_checkpointing"] = on
        log.info("gradient_checkpointing=auto: %s (%s)", "on" if on else "off", why)
        return on

    def estimate_step_memory(self, batch: dict) -> tuple[float, float]:
        """(bytes a micro-step of this batch needs without checkpointing, bytes available) on CUDA."""
        device = self.device
        params = [p for p in self.student.parameters() if p.requires_grad]
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        peaks = []
        with self.eager():
            for n in (1, 2):
                probe = {k: v[:n] for k, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() > 0}
                probe["index"] = torch.arange(n)  # the probe's own draws: the training draws stay untouched
                torch.cuda.reset_peak_memory_stats(device)
                total, _ = self.compute_loss(probe, step=PROBE_KEY)
                torch.autograd.grad(total, params)  # no .grad written, no DDP hook fired
                del total
                peaks.append(torch.cuda.max_memory_allocated(device) - base)
        per_sample = max(peaks[1] - peaks[0], 0)
        fixed = max(peaks[0] - per_sample, 0)
        optimizer = self.trainer.optimizers[0] if self._trainer is not None and self.trainer.optimizers else None
        state = 0 if optimizer is not None and optimizer.state else 2 * sum(p.numel() * 4 for p in params)  # AdamW
        need = base + fixed + per_sample * int(batch["input_ids"].shape[0]) + state
        free, _ = torch.cuda.mem_get_info(device)
        available = free + torch.cuda.memory_reserved(device)  # this process's cache counts as free to it
        return float(need), float(available)

    def save_last_good_state(self) -> str | None:
        """Checkpoint the state before this step (its update has not happened) next to the others."""
        callback = self.trainer.checkpoint_callback
        if callback is None or not callback.dirpath:
            return None
        path = f"{callback.dirpath}/nonfinite_step{self.global_step:06d}.ckpt"
        self.trainer.save_checkpoint(path)
        return path

    # ---- the held-out loss (data.val_samples) -------------------------------------------------
    VALIDATION_KEY = -1  # the "step" of the held-out draws: fixed, and never a training step

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        """The KD loss of held-out samples (``val/loss``, ``val/loss_<part>``), what ``hparams_search`` minimises.
        Their VAE posterior samples, noise and timesteps are drawn from per-sample generators keyed by
        (seed, :attr:`VALIDATION_KEY`, sample index), so every evaluation, of any run with this seed, sees the
        same inputs, and the training draws are untouched. Averaged over all held-out samples of all ranks."""
        if "input_ids" not in batch:  # every sample of this batch was unusable
            return None
        with torch.no_grad():
            total, parts = self.compute_loss(batch, step=self.VALIDATION_KEY)
        bs = batch["input_ids"].shape[0]
        self.log("val/loss", total, batch_size=bs, sync_dist=True, prog_bar=True)
        for name, value in parts.items():
            self.log(f"val/loss_{name}", value, batch_size=bs, sync_dist=True)
        return total

    # ---- optimisation -------------------------------------------------------------------------
    def on_before_optimizer_step(self, optimizer) -> None:
        self._unscale_for_fused(optimizer)
        if not self._log_now:
            return  # lr and grad norm are logged (and the norm computed) on logging steps only
        grads = [p.grad for p in self.student.parameters() if p.grad is not None]
        values = [torch.tensor(float(optimizer.param_groups[0]["lr"]))]
        if grads:
            grads = [g if g.dtype == torch.float32 else g.float() for g in grads]
            values.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).reshape(()).cpu())
        self.log("train/lr", values[0])
        if grads:
            self.log("train/grad_norm", values[1])  # before clipping

    def _grad_scaler(self, optimizer):
        """Lightning's GradScaler (16-mixed) when the optimizer is a fused one that takes unscaling over."""
        scaler = getattr(getattr(self._trainer, "precision_plugin", None), "scaler", None)
        return scaler if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False) else None

    def _unscale_for_fused(self, optimizer) -> None:
        """A fused AdamW under 16-mixed: Lightning leaves the gradients scaled (the fused step unscales them) and
        refuses to clip them. Unscaled here (on the device, no sync) the grad norm and clipping see true gradients;
        the scaler's step then passes only found_inf to the fused kernel, which skips the update on inf/NaN."""
        scaler = self._grad_scaler(optimizer)
        if scaler is not None:
            from torch.amp.grad_scaler import OptState

            if scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY:
                scaler.unscale_(optimizer)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if self._grad_scaler(optimizer) is not None and gradient_clip_val:
            params = [p for group in optimizer.param_groups for p in group["params"]]
            if gradient_clip_algorithm in (None, "norm"):
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad]
        keywords = getattr(self.optimizer_factory, "keywords", {}) or {}
        extra = {}
        if "fused" in keywords and keywords["fused"] is None and self.device.type == "cuda":
            extra["fused"] = True  # optimizer.fused=null: fused on CUDA (one kernel for all tensors, no host sync)
        optimizer = self.optimizer_factory(params=params, **extra)
        self.fast_path["fused_optimizer"] = bool(getattr(optimizer, "defaults", {}).get("fused"))
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        """As Lightning (non_blocking copies from the loader's pinned memory on CUDA), but the sample indices stay on
        the host: :meth:`sample_generators` reads them, which on the device would be a sync per micro-step."""
        if isinstance(batch, dict) and isinstance(batch.get("index"), torch.Tensor):
            index = batch["index"]
            moved = super().transfer_batch_to_device(
                {k: v for k, v in batch.items() if k != "index"}, device, dataloader_idx
            )
            moved["index"] = index
            return moved
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # ---- checkpoints hold the student only ----------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.fast_path.get("nonfinite_check") == "deferred":
            self.check_nonfinite()  # never write the weights of a run that went non-finite
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith(CHECKPOINTED)}
        checkpoint["bksdm"] = {
            "config": self.run_config,
            "ema": any(k.startswith("ema_student.") for k in checkpoint["state_dict"]),
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        meta = checkpoint.get("bksdm") or {}
        state = checkpoint["state_dict"]
        expected = {f"student.{k}": v.shape for k, v in self.student.state_dict().items()}
        missing = sorted(set(expected) - set(state))
        wrong = sorted(k for k, shape in expected.items() if k in state and tuple(state[k].shape) != tuple(shape))
        if missing or wrong:
            arch = ((meta.get("config") or {}).get("arch") or {}).get("name", "unknown")
            what = f"lacks {len(missing)} student tensors, e.g. {missing[:3]}" if missing else ""
            what += ("; " if what else "") + (f"has {len(wrong)} of another shape, e.g. {wrong[:3]}" if wrong else "")
            raise CheckpointError(
                f"the checkpoint (a student of arch={arch}) does not fit this run's student: it {what}. Resume with "
                f"the arch= and teacher= it was trained with"
            )
