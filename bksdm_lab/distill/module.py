"""The distillation LightningModule: a frozen teacher (U-Net, VAE, text encoder) and a trainable student."""

from __future__ import annotations

import hashlib
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from diffusers.utils.torch_utils import randn_tensor
from pytorch_lightning.utilities.warnings import PossibleUserWarning

from bksdm_lab.common.checkpoint import CheckpointError
from bksdm_lab.distill.fastpath import FastPath, clip_fused, fused_kwargs, logging_step, unscale_fused
from bksdm_lab.distill.losses import KDInputs, KDLoss
from bksdm_lab.models.taps import FeatureTaps
from bksdm_lab.models.teachers import Teacher

log = logging.getLogger("bksdm_lab")

FROZEN = ("teacher_unet", "vae", "text_encoder")
CHECKPOINTED = ("student.", "ema_student.")  # ema_student.*: written by the EMA callback
NONFINITE_POLICIES = ("skip", "stop")
# run-config keys (and the keys under them) that are not options of what trains: how this command was invoked, where
# it logs, and the arch's note of which teacher config it was derived from (its topology is checked on load)
PER_INVOCATION = ("resumes", "ckpt_path", "overwrite", "run_name", "logger", "hydra", "arch.derived_from.teacher")
PER_INVOCATION_PREFIXES = tuple(k for key in PER_INVOCATION for k in (key, f"{key}."))
UNSET = "(unset)"


def flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (lists stay values)."""
    out = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_options(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list]:
    """``{dotted key: [old value, new value]}`` of the options two run configs differ in."""
    a, b = ({k: v for k, v in flat(c).items() if not k.startswith(PER_INVOCATION_PREFIXES)} for c in (old, new))
    return {
        k: [a.get(k, UNSET), b.get(k, UNSET)] for k in sorted(a.keys() | b.keys()) if a.get(k, UNSET) != b.get(k, UNSET)
    }


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
    """A loss part became NaN or Inf and nonfinite=stop."""


class DistillModule(pl.LightningModule):
    """Block-removed knowledge distillation (BK-SDM).

    Only the student trains and only the student is checkpointed; the frozen parts are rebuilt from the
    config on resume. ``step`` holds the seed of the random draws and the fast-path switches
    (:class:`~bksdm_lab.distill.fastpath.FastPath`, set at ``setup``). Side jobs are callbacks
    (``bksdm_lab.distill.callbacks``): EMA, data-quality counts, samples, export.
    """

    def __init__(
        self,
        teacher: Teacher,
        student: torch.nn.Module,
        loss: KDLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        nonfinite: str = "stop",
        run_config: Mapping[str, Any] | None = None,
        step: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite={nonfinite!r} is not one of {', '.join(NONFINITE_POLICIES)}")
        step = dict(step or {})
        self.seed = int(step.pop("seed", 0))  # noise, timesteps and posterior samples (see sample_generators)
        self.fast = FastPath(**step)
        self.fast_path: dict[str, Any] = {}  # what each switch resolved to, at setup
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
        self.nonfinite = nonfinite
        self.run_config = dict(run_config or {})  # stored in checkpoints, so export can rebuild the teacher
        self._rng: torch.Generator | None = None  # for batches without sample indices only (see sample_generators)
        pairs = loss.feature_pairs
        # Hooks on the unwrapped modules: later DDP / torch.compile wrappers cannot rename them away.
        self.student_taps = FeatureTaps(self.student, [s for _, s in pairs]) if pairs else None
        self.teacher_taps = FeatureTaps(self.teacher_unet, [t for t, _ in pairs]) if pairs else None
        self.strict_loading = False  # checkpoints hold the student only; see on_load_checkpoint
        self.log_now = True  # whether this micro-batch's metrics are logged (fastpath.logging_step)

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
        self.fast_path = self.fast.apply(self, self.trainer.strategy.root_device, str(self.trainer.precision))
        # Lightning warns of every submodule in eval mode at the start of a fit and has no setting to say it is
        # meant: the frozen parts' modules, exactly, are not worth a warning (any other one still is).
        count = sum(1 for name in self.frozen for _ in getattr(self, name).modules())
        warnings.filterwarnings("ignore", rf"Found {count} module\(s\) in eval mode", PossibleUserWarning)

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
        student_out = self.fast.model("student", self.student)(noisy, t, student_cond).sample
        teacher_out = None
        if self.loss.needs_teacher:
            with torch.no_grad():
                teacher_out = self.fast.model("teacher", self.teacher_unet)(
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

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.log_now = logging_step(self.trainer, batch_idx)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        if "input_ids" not in batch:  # every sample of this batch was unusable
            return None
        total, parts = self.compute_loss(batch)
        bs = batch["input_ids"].shape[0]
        if not torch.isfinite(total):  # the one host read of a micro-step
            bad = [f"{name}={value.item()}" for name, value in parts.items() if not torch.isfinite(value)]
            message = (
                f"non-finite loss at step {self.global_step} (batch {batch_idx}): "
                f"{', '.join(bad) or f'total={total.item()}'}"
            )
            if self.nonfinite == "skip":
                self.log("train/nonfinite_skipped", 1.0, reduce_fx="sum", batch_size=bs)
                print(f"bksdm_lab: {message}; batch skipped (nonfinite=skip)")
                return None
            path = self.save_last_good_state()
            raise NonFiniteLossError(f"{message}. Stopped (nonfinite=stop); last good state saved to {path}")
        if self.log_now:
            self._log_losses(total, parts, bs)
        return total

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
        unscale_fused(self.trainer, optimizer)
        if not self.log_now:
            return  # lr and grad norm are logged (and the norm computed) on logging steps only
        self.log("train/lr", torch.tensor(float(optimizer.param_groups[0]["lr"])))
        grads = [p.grad for p in self.student.parameters() if p.grad is not None]
        if grads:  # before clipping
            self.log("train/grad_norm", torch.nn.utils.get_total_norm(grads).reshape(()).cpu())

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        if not clip_fused(self.trainer, optimizer, gradient_clip_val, gradient_clip_algorithm):
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self):
        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params=params, **fused_kwargs(self.optimizer_factory, self.device))
        self.fast_path["fused_optimizer"] = bool(getattr(optimizer, "defaults", {}).get("fused"))
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints hold the student only ----------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
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
        self.record_resume(meta.get("config"), int(checkpoint.get("global_step", 0)))

    def record_resume(self, stored: Mapping[str, Any] | None, step: int) -> None:
        """Keep in ``run_config["resumes"]`` (checkpointed, on the model card) the step of this resume and the options
        it changed against the checkpoint's run config, and warn of the changes: a resumed run says what ran."""
        if not isinstance(stored, Mapping) or not self.run_config:
            return
        changes = changed_options(stored, self.run_config)
        self.run_config["resumes"] = [*(stored.get("resumes") or []), {"step": step, "changes": changes}]
        if changes:
            listed = "; ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())
            log.warning("resumed at step %d with changed options: %s", step, listed)
