"""The distillation LightningModule: a frozen teacher (U-Net, VAE, text encoder) and a trainable student."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch

from bksdm_lab.features import FeatureTaps
from bksdm_lab.losses import KDInputs, KDLoss
from bksdm_lab.teachers import Teacher

FROZEN = ("teacher_unet", "vae", "text_encoder")
FROZEN_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


class DistillModule(pl.LightningModule):
    """Block-removed knowledge distillation (BK-SDM).

    Only the student trains and only the student is checkpointed; the frozen parts are rebuilt from the
    config on resume. Under mixed precision the frozen parts are cast to the half dtype.
    """

    def __init__(
        self,
        teacher: Teacher,
        student: torch.nn.Module,
        loss: KDLoss,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.student = student
        self.teacher_unet = teacher.unet
        self.vae = teacher.vae
        self.text_encoder = teacher.text_encoder
        for name in FROZEN:
            getattr(self, name).requires_grad_(False).eval()
        self.noise_scheduler = teacher.noise_scheduler
        self.teacher = teacher  # tokenizer and inference scheduler, for samples and export
        self.loss = loss
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        if gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        pairs = loss.feature_pairs
        # Hooks on the unwrapped modules: later DDP / torch.compile wrappers cannot rename them away.
        self.student_taps = FeatureTaps(self.student, [s for _, s in pairs]) if pairs else None
        self.teacher_taps = FeatureTaps(self.teacher_unet, [t for t, _ in pairs]) if pairs else None
        self.strict_loading = False  # checkpoints hold the student only; see on_load_checkpoint

    def train(self, mode: bool = True):
        super().train(mode)
        for name in FROZEN:
            getattr(self, name).eval()
        return self

    def setup(self, stage: str) -> None:
        dtype = FROZEN_DTYPES.get(str(self.trainer.precision))
        if dtype is not None:
            for name in FROZEN:
                getattr(self, name).to(dtype)

    # ---- the loss -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents (sampled from the VAE posterior, scaled) and text conditioning of a batch."""
        pixels = batch["pixel_values"].to(self.vae.dtype)
        latents = self.vae.encode(pixels).latent_dist.sample() * self.vae.config.scaling_factor
        cond = self.text_encoder(batch["input_ids"])[0]
        return latents.float(), cond

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        latents, cond = self.encode(batch)
        noise = torch.randn_like(latents)
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (latents.shape[0],), device=latents.device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        elif self.noise_scheduler.config.prediction_type == "epsilon":
            target = noise
        else:
            raise ValueError(f"unsupported prediction_type {self.noise_scheduler.config.prediction_type!r}")

        student_out = self.student(noisy, t, cond).sample
        teacher_out = None
        if self.loss.needs_teacher:
            with torch.no_grad():
                teacher_out = self.teacher_unet(noisy.to(self.teacher_unet.dtype), t, cond.to(self.teacher_unet.dtype)).sample
        inputs = KDInputs(
            student_out=student_out,
            target=target,
            teacher_out=teacher_out,
            student_features=self.student_taps.pop() if self.student_taps else {},
            teacher_features=self.teacher_taps.pop() if self.teacher_taps else {},
        )
        return self.loss(inputs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        total, parts = self.compute_loss(batch)
        bs = batch["input_ids"].shape[0]
        self.log("train/loss", total, prog_bar=True, batch_size=bs)
        for name, value in parts.items():
            self.log(f"train/loss_{name}", value, batch_size=bs)
        feat = self.loss.terms["feat_kd"] if "feat_kd" in self.loss.active else None
        for layer, value in getattr(feat, "last_layer_losses", {}).items():
            self.log(f"train/feat_kd/{layer}", value, batch_size=bs)
        return total

    # ---- optimisation -------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=[p for p in self.student.parameters() if p.requires_grad])
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---- checkpoints hold the student only ----------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("student.")}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        expected = {f"student.{k}" for k in self.student.state_dict()}
        missing = sorted(expected - set(checkpoint["state_dict"]))
        if missing:
            raise KeyError(f"checkpoint lacks {len(missing)} student tensors, e.g. {missing[:5]}: wrong arch= for it?")
