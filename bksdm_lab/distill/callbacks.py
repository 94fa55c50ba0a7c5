"""Training callbacks: the side jobs of a run (EMA, data-quality counts, throughput, export)."""

from __future__ import annotations

import copy
import logging
import resource
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn

from bksdm_lab.data.common import DataError
from bksdm_lab.distill.fastpath import logging_step
from bksdm_lab.models.export import WEIGHTS, card_info, export_pipeline, push_to_hub, write_model_card
from bksdm_lab.models.lora import merged, save_lora

log = logging.getLogger("bksdm_lab")


class Throughput(pl.Callback):
    """Logs, on Lightning's logging steps (``trainer.log_every_n_steps``): the mean optimizer-step time and images/s
    (the usable images of the micro-batches x devices) since the previous logging step, and peak memory. The first
    optimizer step of a fit is timed on its own (``perf/first_step_s``, also in the log: it holds torch.compile's
    compilation) and counted in neither. The
    clock is read once per micro-batch and the CUDA stream synchronised only on logging steps, so the hot loop has no
    host sync. A micro-batch whose samples were all unusable (no ``input_ids``: the data-quality callback counts
    them) adds no image and crashes nothing."""

    def __init__(self):
        self._start: float | None = None  # start of the current window (None: the fit's first step is running)
        self._fit_start: float | None = None
        self._step = -1  # the optimizer step count seen at the end of the last micro-batch
        self._images = 0
        self._steps = 0
        self._log_now = False  # whether the current micro-batch is on a logging step (fastpath.logging_step)
        self.first_step_s: float | None = None

    def on_train_start(self, trainer, module) -> None:
        self._start, self._fit_start, self._step, self._images, self._steps = None, None, trainer.global_step, 0, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._log_now = logging_step(trainer, batch_idx)
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
                logger.log_metrics(
                    {"perf/first_step_s": self.first_step_s}, step=trainer.global_step - 1
                )  # as Lightning
            log.info(
                "first optimizer step: %.2f s (with torch.compile's compilation when it is on; not in perf/*)",
                self.first_step_s,
            )
            return
        self._steps += 1
        if not self._log_now:
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

    def __init__(self, decay: float = 0.9999, start_step: int = 0):  # decay in [0, 1]: checks.RULES, before loading
        self.decay, self.start_step = float(decay), int(start_step)
        self._update = get_ema_multi_avg_fn(self.decay)  # one foreach lerp over the tensor lists
        self.model: torch.nn.Module | None = None
        self._step = -1
        self._pairs: tuple[int, list, list] | None = None  # (id of the student, EMA tensors, student tensors)

    def setup(self, trainer, module, stage: str) -> None:
        if self.model is None:
            self.model = copy.deepcopy(module.student).requires_grad_(False).eval()
            # the copied feature-tap hooks would write into the student's taps; torch removes a hook only through
            # the handle its registration returned (the taps hold the student's), so the copies' dicts are cleared
            for part in self.model.modules():
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
            for e, p in zip(ema, params, strict=True):
                e.copy_(p)
        else:
            self._update(ema, params, step)

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
        log_now = logging_step(
            trainer, batch_idx
        )  # cumulative counts: logged when Lightning writes metrics, as CPU tensors
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
    to the Hub if asked. A fit that trained nothing exports nothing (``exported`` stays empty); the final checkpoint
    is written before (``FinalCheckpoint``), and a fit whose checkpoint could not be written stops before the export."""

    def __init__(self, out_dir: str, weights: str = "ema", hub: dict | None = None, safety_checker: bool = True):
        if weights not in WEIGHTS:
            raise ValueError(f"callbacks.export.weights={weights!r} is not one of {WEIGHTS}")
        self.out_dir, self.weights, self.hub = Path(out_dir), weights, dict(hub or {})
        self.safety_checker = bool(safety_checker)  # the teacher's, when it has one
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
        if getattr(unet, "peft_config", None):  # LoRA adapters (experiment=lcm_lora): they go beside, merged here
            lora_dir = save_lora(self.out_dir.with_name("lora"), unet=unet).parent
            write_model_card(lora_dir, {**card, "lora_folder": True})
            self.exported["lora"] = str(lora_dir)
            unet = merged(unet)
        self.exported["pipeline"] = str(
            export_pipeline(module.teacher, unet, self.out_dir, card=card, safety_checker=self.safety_checker)
        )
        if self.hub.get("push"):
            self.exported["hub"] = push_to_hub(
                self.out_dir, self.hub["repo_id"], token=self.hub.get("token"), private=self.hub.get("private", True)
            )
