"""Callbacks that generate during training: sample images of the teacher, student and EMA (:class:`SampleImages`),
and the paper's evaluation, small (:class:`EvalCallback`, ``callbacks=with_eval``)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pytorch_lightning import Callback

from bksdm_lab.distill.callbacks import find_ema
from bksdm_lab.evaluation import sampling as gen
from bksdm_lab.evaluation.evaluate import DEFAULT_CLIP, evaluate
from bksdm_lab.evaluation.metrics import check_available, clip_from_spec, extractor_from_spec, load_stats
from bksdm_lab.models.export import build_pipeline

log = logging.getLogger(__name__)

# the sampling values SampleImages takes under names of its own (callbacks.samples.*): sampling key -> its name
SAMPLE_OVERRIDES = {"seed": "seed", "steps": "num_inference_steps", "guidance": "guidance_scale"}


def generation_problems(cfg) -> list[str]:
    """One line per bad generation value of a training run (its ``sampling`` group, the sample callback's own
    overrides, the evaluation callback's ``ref_stats``), checked before anything loads."""
    from omegaconf import OmegaConf

    samples = OmegaConf.select(cfg, "callbacks.samples") or {}
    own = {k: samples[k] for k in SAMPLE_OVERRIDES.values() if samples.get(k) is not None}
    problems = gen.sampling_problems(cfg.get("sampling")) + gen.sampling_problems(
        own, "callbacks.samples.", SAMPLE_OVERRIDES
    )
    ref_stats = OmegaConf.select(cfg, "callbacks.eval.ref_stats")
    try:
        if ref_stats:
            load_stats(ref_stats)
    except (FileNotFoundError, ValueError) as err:
        problems.append(f"callbacks.eval.ref_stats: {err}")
    return problems


def ema_of(trainer, module) -> torch.nn.Module | None:
    """The run's EMA student, whichever way the run keeps it (the EMA callback, or the module's attribute)."""
    ema = find_ema(trainer) if hasattr(trainer, "callbacks") else None
    return ema if ema is not None else getattr(module, "ema_student", None)


class SampleImages(Callback):
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
        self.sampling = gen.sampling_dict(sampling)
        overrides = {"seed": seed, "steps": num_inference_steps, "guidance": guidance_scale}
        self.sampling.update({k: v for k, v in overrides.items() if v is not None})
        self.prompts, self.seed, self.every_n_steps = list(prompts), int(self.sampling["seed"]), every_n_steps
        self.out_dir = Path(out_dir) if out_dir else None
        self._last_step = -1
        self._teacher_images: list[Image.Image] = []

    @torch.no_grad()
    def generate(self, module, unet) -> list[Image.Image]:
        pipe = gen.set_scheduler(build_pipeline(module.teacher, unet), self.sampling["scheduler"])
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
        try:
            for logger in trainer.loggers:
                if hasattr(logger, "log_image"):
                    for who, images in panels.items():
                        logger.log_image(key=f"samples/{who}", images=images, caption=self.prompts, step=step)
            if "student" in panels:
                self._log_table(trainer, step, panels)
        except OSError as err:  # W&B stages media under $HOME (or WANDB_DATA_DIR): training goes on, the PNGs stay
            where = f"; they are in {self.out_dir}" if self.out_dir else ""
            log.warning("the sample images of step %d were not logged (%s)%s", step, err, where)

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
        if self.ref_stats:
            load_stats(self.ref_stats)  # a file that is no statistics npz: one line now, not at the first evaluation

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
        shutil.rmtree(folder, ignore_errors=True)  # an earlier attempt at this step (a resumed run): not these weights
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
