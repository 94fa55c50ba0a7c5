"""The paper's evaluation, small, during training: a Lightning callback (``callbacks=with_eval``)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning import Callback

from bksdm_lab.evaluation import sampling as gen
from bksdm_lab.evaluation.evaluate import DEFAULT_CLIP, evaluate
from bksdm_lab.evaluation.metrics import check_available, clip_from_spec, extractor_from_spec


def ema_of(trainer, module) -> torch.nn.Module | None:
    """The run's EMA student, whichever way the run keeps it (the EMA callback, or the module's attribute)."""
    from bksdm_lab.distill import callbacks

    find = getattr(callbacks, "find_ema", None)
    ema = find(trainer) if find is not None and hasattr(trainer, "callbacks") else None
    return ema if ema is not None else getattr(module, "ema_student", None)


class EvalCallback(Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end of training): generate images for the first
    ``num_prompts`` prompts with the student (its EMA if the run keeps one), then FID against ``ref_stats`` (if
    given), IS and CLIP score, logged as ``eval/fid``, ``eval/is``, ``eval/clip_score`` to every logger.

    Sampling (scheduler, steps, guidance, resolution, seed) comes from ``sampling``, the run's ``sampling`` config
    group (``conf/sampling/paper.yaml`` by default); prompt ``i`` is always seeded ``seed + i`` (per-prompt mode),
    so steps compare with each other and ``batch_size`` (here, not the group's) only changes the speed. A few
    hundred images give a biased but trend-faithful FID (use the same N throughout a run). The metric models and
    the prompts are checked when training starts, not at the first evaluation. Add it from the command line::

        python -m bksdm_lab.train experiment=paper callbacks=with_eval callbacks.eval.ref_stats=val2014_256.npz
    """

    def __init__(
        self,
        metadata: str | None = None,
        prompts: Sequence[str] | None = None,
        num_prompts: int = 200,
        ref_stats: str | None = None,
        every_n_steps: int = 5000,
        sampling: Mapping | None = None,
        batch_size: int = 8,
        feature_extractor: str = "inception",
        clip: str = DEFAULT_CLIP,
        eval_resolution: int | None = 256,
        out_dir: str | None = None,
        use_ema: bool = True,
    ):
        self.metadata, self.prompt_list, self.num_prompts = metadata, list(prompts or []), num_prompts
        self.ref_stats, self.every_n_steps = ref_stats, every_n_steps
        self.sampling, self.batch_size = gen.sampling_dict(sampling), batch_size
        self.feature_extractor, self.clip, self.eval_resolution = feature_extractor, clip, eval_resolution
        self.out_dir, self.use_ema = Path(out_dir) if out_dir else None, use_ema
        self.prompts: list[str] = []
        self._models: tuple | None = None
        self._last_step = -1
        self.history: list[dict[str, Any]] = []

    def setup(self, trainer, pl_module, stage: str | None = None) -> None:
        check_available(self.feature_extractor, self.clip)
        self.prompts = gen.read_prompts(self.prompt_list, None, self.metadata, self.num_prompts)
        if self.ref_stats and not Path(self.ref_stats).is_file():
            raise FileNotFoundError(f"EvalCallback: ref_stats {self.ref_stats!r} does not exist")

    def _metric_models(self, device: torch.device):
        if self._models is None:
            extractor = extractor_from_spec(self.feature_extractor).to(device)
            clip = None if self.clip == "none" else clip_from_spec(self.clip).to(device)
            self._models = (extractor, clip)
        return self._models

    @torch.no_grad()
    def evaluate_now(self, trainer, module) -> dict[str, Any]:
        from bksdm_lab.models.export import build_pipeline

        step = trainer.global_step
        ema = ema_of(trainer, module)
        unet = ema if (self.use_ema and ema is not None) else module.student
        pipe = gen.set_scheduler(build_pipeline(module.teacher, unet), self.sampling["scheduler"])
        pipe.set_progress_bar_config(disable=True)
        was_training = unet.training
        unet.eval()
        tmp = None
        if self.out_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="bksdm_eval_")
        folder = (self.out_dir or Path(tmp.name)) / f"step{step:06d}"
        kwargs = {**gen.sampling_kwargs(self.sampling), "batch_size": self.batch_size, "seed_mode": "per-prompt"}
        try:
            with torch.autocast(module.device.type, enabled=module.device.type == "cuda"):
                result = gen.generate_images(pipe, self.prompts, folder, **kwargs, grid=0, progress=False)
            extractor, clip = self._metric_models(module.device)
            results = evaluate(
                folder,
                self.prompts,
                feature_extractor=extractor,
                clip_model=clip,
                ref_stats=self.ref_stats,
                resize=self.eval_resolution,
            )
        finally:
            unet.train(was_training)
            if tmp is not None:
                tmp.cleanup()
        metrics = {f"eval/{k}": results[k] for k in ("fid", "is", "clip_score") if results.get(k) is not None}
        if result.images_per_s:
            metrics["eval/images_per_s"] = result.images_per_s
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        self.history.append({"step": step, **metrics})
        return metrics

    def _maybe(self, trainer, module) -> None:
        if trainer.is_global_zero and trainer.global_step != self._last_step and self.prompts:
            self._last_step = trainer.global_step
            self.evaluate_now(trainer, module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0:
            self._maybe(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._maybe(trainer, pl_module)
