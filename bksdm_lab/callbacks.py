"""Training callbacks: sample images with fixed prompts and seeds, logged to every logger and to PNGs."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from PIL import Image

from bksdm_lab.export import build_pipeline


class SampleImages(pl.Callback):
    """The teacher's images once at the start, the student's every ``every_n_steps`` and at the end.

    Each prompt uses its own generator seeded ``seed + i``, so samples are comparable across steps and runs.
    PNGs go to ``out_dir/<who>_step<step>/``; W&B gets an image panel per model.
    """

    def __init__(self, prompts: list[str], seed: int = 1234, every_n_steps: int = 1000,
                 num_inference_steps: int = 25, guidance_scale: float = 7.5, out_dir: str | None = None):
        self.prompts, self.seed, self.every_n_steps = list(prompts), seed, every_n_steps
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.out_dir = Path(out_dir) if out_dir else None
        self._last_step = -1

    @torch.no_grad()
    def generate(self, module, unet) -> list[Image.Image]:
        pipe = build_pipeline(module.teacher, unet)
        pipe.set_progress_bar_config(disable=True)
        was_training = unet.training
        unet.eval()
        images = []
        for i, prompt in enumerate(self.prompts):
            generator = torch.Generator(device="cpu").manual_seed(self.seed + i)
            with torch.autocast(module.device.type, enabled=module.device.type == "cuda"):
                out = pipe(prompt, num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                           generator=generator, output_type="pil")
            images.append(out.images[0])
        unet.train(was_training)
        return images

    def _log(self, trainer, module, who: str, unet) -> None:
        if not self.prompts or not trainer.is_global_zero:
            return
        step = trainer.global_step
        images = self.generate(module, unet)
        if self.out_dir is not None:
            folder = self.out_dir / f"{who}_step{step:06d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, image in enumerate(images):
                image.save(folder / f"{i:02d}.png")
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image(key=f"samples/{who}", images=images, caption=self.prompts, step=step)

    def on_train_start(self, trainer, module) -> None:
        if trainer.global_step == 0:
            self._log(trainer, module, "teacher", module.teacher_unet)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self._log(trainer, module, "student", module.student)

    def on_train_end(self, trainer, module) -> None:
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self._log(trainer, module, "student", module.student)
