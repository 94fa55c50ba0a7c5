"""Training callbacks: fixed-prompt sample images (teacher, student, EMA student) and throughput."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from PIL import Image

from bksdm_lab.models.export import build_pipeline


class SampleImages(pl.Callback):
    """The teacher's images once at the start; the student's and the EMA student's every ``every_n_steps``
    optimizer steps and at the end.

    Sampling (scheduler, steps, guidance, resolution, seed) comes from ``sampling``, the run's ``sampling``
    config group (``conf/sampling/paper.yaml`` by default); ``seed``, ``num_inference_steps`` and
    ``guidance_scale``, when given, override it for the sample images only. Prompt ``i`` always uses a CPU
    generator seeded ``seed + i``, so images are comparable across steps and runs. PNGs go to
    ``out_dir/<model>_step<step>/<i>.png``; W&B gets one image panel per model and a table ``samples/table``
    (step, prompt, seed, teacher, student, ema) with the models side by side.
    """

    def __init__(
        self,
        prompts: list[str],
        sampling=None,
        every_n_steps: int = 1000,
        out_dir: str | None = None,
        seed: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
    ):
        from bksdm_lab.evaluation.sampling import sampling_dict

        self.sampling = sampling_dict(sampling)
        overrides = {"seed": seed, "steps": num_inference_steps, "guidance": guidance_scale}
        self.sampling.update({k: v for k, v in overrides.items() if v is not None})
        self.prompts, self.seed, self.every_n_steps = list(prompts), int(self.sampling["seed"]), every_n_steps
        self.out_dir = Path(out_dir) if out_dir else None
        self._last_step = -1
        self._teacher_images: list[Image.Image] = []

    @torch.no_grad()
    def generate(self, module, unet) -> list[Image.Image]:
        from bksdm_lab.evaluation.sampling import set_scheduler

        pipe = set_scheduler(build_pipeline(module.teacher, unet), self.sampling["scheduler"])
        pipe.set_progress_bar_config(disable=True)
        size = self.sampling.get("resolution")
        was_training = unet.training
        unet.eval()
        images = []
        for i, prompt in enumerate(self.prompts):
            generator = torch.Generator(device="cpu").manual_seed(self.seed + i)
            with torch.autocast(module.device.type, enabled=module.device.type == "cuda"):
                out = pipe(
                    prompt,
                    num_inference_steps=self.sampling["steps"],
                    guidance_scale=self.sampling["guidance"],
                    height=size,
                    width=size,
                    generator=generator,
                    output_type="pil",
                )
            images.append(out.images[0])
        unet.train(was_training)
        return images

    def _save(self, who: str, step: int, images: list[Image.Image]) -> None:
        if self.out_dir is None:
            return
        folder = self.out_dir / f"{who}_step{step:06d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(folder / f"{i:02d}.png")

    def _sample(self, trainer, module, models: dict) -> None:
        if not self.prompts or not trainer.is_global_zero:
            return
        step = trainer.global_step
        panels = {}
        for who, unet in models.items():
            panels[who] = self.generate(module, unet)
            self._save(who, step, panels[who])
        if "teacher" in panels:
            self._teacher_images = panels["teacher"]
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):
                for who, images in panels.items():
                    logger.log_image(key=f"samples/{who}", images=images, caption=self.prompts, step=step)
        if "student" in panels:
            self._log_table(trainer, step, panels)

    def _log_table(self, trainer, step: int, panels: dict) -> None:
        wandb_loggers = [lg for lg in trainer.loggers if hasattr(lg, "log_table")]
        if not wandb_loggers:
            return
        import wandb

        columns = ["step", "prompt", "seed", "teacher", "student", "ema"]
        rows = []
        for i, prompt in enumerate(self.prompts):
            cells = [panels.get(w, []) for w in ("teacher", "student", "ema")]
            cells[0] = cells[0] or self._teacher_images
            rows.append([step, prompt, self.seed + i, *(wandb.Image(c[i]) if c else None for c in cells)])
        for logger in wandb_loggers:
            logger.log_table(key="samples/table", columns=columns, data=rows, step=step)

    def _students(self, module) -> dict:
        models = {"student": module.student}
        if getattr(module, "ema_student", None) is not None:
            models["ema"] = module.ema_student
        return models

    def on_train_start(self, trainer, module) -> None:
        if trainer.global_step == 0:
            self._sample(trainer, module, {"teacher": module.teacher_unet})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self._sample(trainer, module, self._students(module))

    def on_train_end(self, trainer, module) -> None:
        if trainer.global_step != self._last_step:
            self._last_step = trainer.global_step
            self._sample(trainer, module, self._students(module))


class Throughput(pl.Callback):
    """Logs per optimizer step: wall time, images/s (micro-batch x accumulation x devices) and peak memory."""

    def __init__(self):
        self._start: float | None = None
        self._step = -1

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self._start is None or trainer.global_step != self._step:
            self._start, self._step = time.perf_counter(), trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._step or self._start is None:
            return  # still accumulating
        seconds = time.perf_counter() - self._start
        images = batch["input_ids"].shape[0] * trainer.accumulate_grad_batches * trainer.world_size
        metrics = {
            "perf/step_time_s": seconds,
            "perf/images_per_s": images / seconds,
            "perf/peak_mem_gb": peak_memory_gb(module.device),
        }
        module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=batch["input_ids"].shape[0])
        self._start = None


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated (CUDA), else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20
