"""Training callbacks: the side jobs of a run (EMA, data-quality counts, sample images, throughput, export)."""

from __future__ import annotations

import copy
import logging
import resource
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from PIL import Image

from bksdm_lab.data.common import DataError
from bksdm_lab.models.export import WEIGHTS, build_pipeline, card_info, export_pipeline, push_to_hub

log = logging.getLogger("bksdm_lab")


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
        ema = find_ema(module.trainer)
        if ema is not None:
            models["ema"] = ema
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
    """Logs, on Lightning's logging steps (``trainer.log_every_n_steps``): the mean optimizer-step time and images/s
    (the usable images of the micro-batches x devices) since the previous logging step, and peak memory. The first
    optimizer step of a fit is timed on its own (``perf/first_step_s``, also in the log: on CUDA it holds
    torch.compile's compilation and the memory probe of gradient_checkpointing=auto) and counted in neither. The
    clock is read once per micro-batch and the CUDA stream synchronised only on logging steps, so the hot loop has no
    host sync. A micro-batch whose samples were all unusable (no ``input_ids``: the data-quality callback counts
    them) adds no image and crashes nothing."""

    def __init__(self):
        self._start: float | None = None  # start of the current window (None: the fit's first step is running)
        self._fit_start: float | None = None
        self._step = -1  # the optimizer step count seen at the end of the last micro-batch
        self._images = 0
        self._steps = 0
        self.first_step_s: float | None = None

    def on_train_start(self, trainer, module) -> None:
        self._start, self._fit_start, self._step, self._images, self._steps = None, None, trainer.global_step, 0, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self._fit_start is None:
            self._fit_start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._images += usable_samples(batch)
        if trainer.global_step == self._step:
            return  # still accumulating
        self._step = trainer.global_step
        if self._start is None:  # the first optimizer step of this fit
            _synchronize(module.device)
            now = time.perf_counter()
            self.first_step_s = now - (self._fit_start or now)
            self._start, self._images, self._steps = now, 0, 0
            for logger in trainer.loggers:
                logger.log_metrics({"perf/first_step_s": self.first_step_s}, step=_logged_step(trainer))
            log.info(
                "first optimizer step: %.2f s (with torch.compile's compilation when it is on; not in perf/*)",
                self.first_step_s,
            )
            return
        self._steps += 1
        if not logging_step(trainer):
            return
        _synchronize(module.device)
        seconds = max(time.perf_counter() - self._start, 1e-9)
        metrics = {
            "perf/step_time_s": seconds / self._steps,
            "perf/images_per_s": self._images * trainer.world_size / seconds,
            "perf/peak_mem_gb": peak_memory_gb(module.device),
        }
        metrics = {k: torch.tensor(float(v)) for k, v in metrics.items()}  # CPU tensors: no host-device copy
        module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=max(self._images, 1))
        self._start, self._images, self._steps = time.perf_counter(), 0, 0


def logging_step(trainer) -> bool:
    """Whether Lightning writes the metrics of the current optimizer step (``trainer.log_every_n_steps``)."""
    connector = getattr(trainer, "_logger_connector", None)
    try:
        return bool(connector.should_update_logs) if connector is not None else True
    except (AttributeError, NotImplementedError):
        return True


def _logged_step(trainer) -> int:
    """The step Lightning's loggers record for the current optimizer step."""
    loop = getattr(getattr(trainer, "fit_loop", None), "epoch_loop", None)
    return int(getattr(loop, "_batches_that_stepped", trainer.global_step))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def usable_samples(batch) -> int:
    """The samples of a collated micro-batch that are trained on (0 when all of them were unusable)."""
    ids = batch.get("input_ids") if isinstance(batch, dict) else None
    return int(ids.shape[0]) if ids is not None else 0


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory allocated (CUDA), else the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


class EMA(pl.Callback):
    """An exponential moving average of the student, kept for the sample images and the export.

    Our own (a few lines) rather than Lightning's ``EMAWeightAveraging``: that one averages a copy of the whole
    LightningModule (the frozen teacher, VAE and text encoder too), stores it in the checkpoint's ``state_dict``
    and copies the average over the student at the end; we average the student only, checkpoint it as
    ``ema_student.*`` beside ``student.*``, and keep both. Before ``start_step`` the EMA copies the student.
    """

    def __init__(self, decay: float = 0.9999, start_step: int = 0):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"callbacks.ema.decay={decay} must be in [0, 1]")
        self.decay, self.start_step = float(decay), int(start_step)
        self.model: torch.nn.Module | None = None
        self._step = -1
        self._pairs: tuple[int, list, list] | None = None  # (id of the student, EMA tensors, student tensors)

    def setup(self, trainer, module, stage: str) -> None:
        if self.model is None:
            self.model = copy.deepcopy(module.student).requires_grad_(False).eval()
            for part in self.model.modules():  # the copied feature-tap hooks would write into the student's taps
                part._forward_hooks.clear()

    def on_fit_start(self, trainer, module) -> None:
        self.model.to(module.device)
        with torch.no_grad():  # the student's memory format (channels_last), so the foreach update is one fast pass
            for e, p in zip(self.model.parameters(), module.student.parameters(), strict=True):
                if e.stride() != p.stride() and e.shape == p.shape:
                    e.data = torch.empty_like(p, dtype=e.dtype).copy_(e.data)
        self._pairs = None

    @torch.no_grad()
    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._step or self.model is None:
            return  # no optimizer step since the last update (accumulating)
        self._step = step
        if self._pairs is None or self._pairs[0] != id(module.student):  # the tensor lists, built once
            student = [p.detach() for p in module.student.parameters()]
            self._pairs = (id(module.student), list(self.model.parameters()), student)
        _, ema, params = self._pairs
        if step < self.start_step:  # before the start: the EMA follows the student
            torch._foreach_copy_(ema, params)
        else:
            torch._foreach_lerp_(ema, params, 1.0 - self.decay)

    def on_save_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        if self.model is not None:
            checkpoint["state_dict"].update({f"ema_student.{k}": v for k, v in self.model.state_dict().items()})

    def on_load_checkpoint(self, trainer, module, checkpoint: dict) -> None:
        state = {
            k[len("ema_student.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("ema_student.")
        }
        self.setup(trainer, module, "fit")
        self._pairs = None
        if state:
            self.model.load_state_dict(state)
        else:  # EMA turned on when resuming a run without it: start from the student
            student = {k[len("student.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("student.")}
            self.model.load_state_dict(student)
        self._step = checkpoint.get("global_step", -1)


def find_ema(trainer) -> torch.nn.Module | None:
    """The EMA student of a run, when the EMA callback is on."""
    ema = next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
    return ema.model if ema is not None else None


class DataQuality(pl.Callback):
    """Counts the samples the collate function skipped or converted, by reason (``data/skipped_<reason>``,
    ``data/converted_<reason>``), keeps the counts across resumes (checkpointed callback state), and stops the
    run when more than the data module's ``max_skipped_fraction`` of the samples read were unusable."""

    def __init__(self):
        self.counts: dict[str, int] = {"seen": 0}

    def state_dict(self) -> dict:
        return {"counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.counts = dict(state.get("counts") or {"seen": 0})

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if "skipped" not in batch:
            return
        counts = self.counts
        counts["seen"] += int(batch["num_samples"])
        log_now = logging_step(trainer)  # cumulative counts: logged when Lightning writes metrics, as CPU tensors
        for kind in ("skipped", "converted"):
            for reason, n in batch[kind].items():
                key = f"{kind}_{reason}"
                counts[key] = counts.get(key, 0) + int(n)
                if log_now:
                    module.log(f"data/{key}", torch.tensor(float(counts[key])), reduce_fx="max", batch_size=1)
        data = trainer.datamodule
        limit, after = getattr(data, "max_skipped_fraction", None), getattr(data, "skip_check_after", 0)
        skipped = sum(v for k, v in counts.items() if k.startswith("skipped_"))
        if limit is not None and counts["seen"] >= after and skipped > limit * counts["seen"]:
            reasons = {k: v for k, v in counts.items() if k.startswith("skipped_") and v}
            raise DataError(
                f"{skipped} of the {counts['seen']} samples read so far were unusable ({reasons}), more than "
                f"data.max_skipped_fraction={limit}: check the data (the log names each bad file) or raise the limit"
            )


class ExportPipeline(pl.Callback):
    """At the end of a successful fit that trained at least one optimizer step, rank 0 saves the (EMA) student with
    the teacher's VAE, text encoder, tokenizer and scheduler as a diffusers pipeline with a model card, and pushes it
    to the Hub if asked. A fit that trained nothing exports nothing (``exported`` stays empty)."""

    def __init__(self, out_dir: str, weights: str = "ema", hub: dict | None = None):
        if weights not in WEIGHTS:
            raise ValueError(f"callbacks.export.weights={weights!r} is not one of {WEIGHTS}")
        self.out_dir, self.weights, self.hub = Path(out_dir), weights, dict(hub or {})
        if self.hub.get("push") and not self.hub.get("repo_id"):
            raise ValueError("hub.push=true needs hub.repo_id=<user>/<name>")
        self.exported: dict[str, str] = {}  # what was written: {"pipeline": path, "hub": url}
        self._start_step: int | None = None

    def on_train_start(self, trainer, module) -> None:
        self._start_step = trainer.global_step  # after a resume: the checkpoint's step

    def on_train_end(self, trainer, module) -> None:
        if not trainer.is_global_zero or trainer.global_step == self._start_step:
            return  # nothing trained in this fit: the pipeline on disk (if any) is not replaced
        ema = find_ema(trainer)
        weights = "ema" if self.weights == "ema" and ema is not None else "student"
        unet = ema if weights == "ema" else module.student
        ckpt = trainer.checkpoint_callback
        checkpoint = str(Path(ckpt.dirpath) / "last.ckpt") if ckpt is not None and ckpt.dirpath else None
        card = card_info(module.run_config, module.teacher, unet, trainer.global_step, weights, checkpoint=checkpoint)
        self.exported["pipeline"] = str(export_pipeline(module.teacher, unet, self.out_dir, card=card))
        if self.hub.get("push"):
            self.exported["hub"] = push_to_hub(
                self.out_dir, self.hub["repo_id"], token=self.hub.get("token"), private=self.hub.get("private", True)
            )
