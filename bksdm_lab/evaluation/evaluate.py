"""The paper's evaluation: generate from MS-COCO captions, then FID, Inception Score and CLIP score.

    python -m bksdm_lab.evaluate --pipeline nota-ai/bk-sdm-tiny --ref-stats val2014_256.npz --out eval/tiny
    python -m bksdm_lab.evaluate --pipeline EXPORT_DIR --num-prompts 1000 --ref-stats val2014_256.npz --out eval/q
    python -m bksdm_lab.evaluate --out eval/tiny --ref-stats val2014_256.npz       # score images already there
    python -m bksdm_lab.evaluate stats --images coco/val2014 --out val2014_256.npz  # real-image statistics

Defaults are the paper's protocol (BK-SDM, arXiv 2305.15798, MS-COCO 30K): the captions of ``--metadata
data/mscoco_val2014_30k/metadata.csv`` (``python -m bksdm_lab.data.download coco30k``; all 30,000, or
``--num-prompts N``), PNDM 25 steps, guidance 7.5, 512 px, ONE generator
seeded 1234 consumed in prompt order (``--seed-mode paper``), batch 1, fp16 on CUDA; images squashed to 256 x 256
(PIL bicubic); FID against ``--ref-stats`` (pytorch-fid ``.npz`` with ``mu``/``sigma``, e.g. the 40,504 val2014
images at 256 px made by the ``stats`` sub-command), Inception Score (torch-fidelity's way: 10 splits), CLIP score
(mean cosine similarity, open_clip ViT-g-14 laion2b_s34b_b88k, no x100) on the 256 px images.

Generation is resumable (see :mod:`bksdm_lab.generate`): run the same command again after a crash and only the
missing images are generated. ``results.json`` holds the numbers and settings; the console shows them beside the
paper's for the same model (``--paper-model``, or recognised from the model name); ``--wandb`` logs them.

During training, :class:`EvalCallback` runs a small version of this (a few hundred prompts, FID and CLIP score)
every N steps and logs it.

The default models need the ``eval`` extra (``pip install -e ".[eval]"``). ``--feature-extractor demo --clip demo``
use tiny random models built from config so the command runs offline end to end: smoke tests only, their
numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pytorch_lightning import Callback

from bksdm_lab.evaluation import sampling as gen
from bksdm_lab.evaluation.metrics import (
    FeatureStats,
    MissingEvalDependency,
    check_available,
    clip_from_spec,
    cosine_similarities,
    extract_features,
    extractor_from_spec,
    frechet_distance,
    inception_score,
    load_stats,
    resize_image,
    save_stats,
    to_uint8_batch,
)
from bksdm_lab.evaluation.paper import PAPER_IMAGES, PAPER_RESULTS, PAPER_SETTINGS, paper_model

DEFAULT_CLIP = "open_clip:ViT-g-14:laion2b_s34b_b88k"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


class EvaluationError(RuntimeError):
    """The evaluation cannot run as asked; the message says why."""


# ---- images ------------------------------------------------------------------------------------------
def list_images(folder: str | Path, limit: int | None = None) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted; hidden and temporary files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {str(folder)!r} does not exist")
    paths = sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
    )
    if not paths:
        raise EvaluationError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {folder}")
    return paths[:limit] if limit else paths


def generated_paths(images: str | Path | Sequence[str | Path], num: int) -> list[Path]:
    """The ``num`` images of a generation folder (``DIR/images/<i:05d>.png`` or ``DIR/<i:05d>.png``) or a list."""
    if isinstance(images, (str, Path)):
        folder = Path(images)
        if (folder / gen.IMAGE_DIR).is_dir():
            folder = folder / gen.IMAGE_DIR
        paths = [folder / gen.image_name(i) for i in range(num)]
    else:
        paths = [Path(p) for p in images]
        if len(paths) != num:
            raise EvaluationError(f"{len(paths)} images for {num} prompts")
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {num} images are missing, e.g. {missing[0]}")
    return paths


def image_batches(paths: Sequence[Path], resize: int | None, batch_size: int) -> Iterator[list[Image.Image]]:
    """RGB PIL images squashed to ``resize`` px (bicubic), in batches; without resize, one size per batch."""
    batch: list[Image.Image] = []
    for path in paths:
        with Image.open(path) as im:
            image = resize_image(im, resize)
        if batch and (len(batch) == batch_size or image.size != batch[0].size):
            yield batch
            batch = []
        batch.append(image)
    if batch:
        yield batch


# ---- scoring -----------------------------------------------------------------------------------------
def score_images(
    paths: Sequence[Path],
    prompts: Sequence[str] | None = None,
    *,
    feature_extractor: torch.nn.Module | None = None,
    clip_model=None,
    resize: int | None = 256,
    batch_size: int = 50,
    progress: bool = False,
) -> dict[str, Any]:
    """One pass over the images: ``stats`` (FeatureStats of the pool features), ``logits`` (for IS, if the
    extractor gives them) and ``clip`` (per-image cosine similarity with its prompt)."""
    from tqdm.auto import tqdm

    if clip_model is not None and (prompts is None or len(prompts) != len(paths)):
        raise EvaluationError("the CLIP score needs one prompt per image")
    stats = FeatureStats() if feature_extractor is not None else None
    logits, sims, start = [], [], 0
    bar = tqdm(total=len(paths), unit="img", desc="score", disable=not progress)
    for batch in image_batches(paths, resize, batch_size):
        if feature_extractor is not None:
            feats, batch_logits = extract_features(feature_extractor, to_uint8_batch(batch))
            stats.update(feats)
            if batch_logits is not None:
                logits.append(batch_logits)
        if clip_model is not None:
            texts = list(prompts[start : start + len(batch)])
            sims.append(cosine_similarities(clip_model.encode_images(batch), clip_model.encode_texts(texts)))
        start += len(batch)
        bar.update(len(batch))
    bar.close()
    return {
        "stats": stats,
        "logits": torch.cat(logits) if logits else None,
        "clip": torch.cat(sims) if sims else None,
    }


def evaluate(
    images: str | Path | Sequence[str | Path],
    prompts: Sequence[str],
    *,
    feature_extractor: torch.nn.Module | None = None,
    clip_model=None,
    ref_stats: str | Path | tuple[np.ndarray, np.ndarray] | None = None,
    resize: int | None = 256,
    batch_size: int = 50,
    is_splits: int = 10,
    progress: bool = False,
    stats_out: str | Path | None = None,
) -> dict[str, Any]:
    """FID (if ``ref_stats``), IS (if the extractor gives logits) and CLIP score (if ``clip_model``) of the images
    of prompts ``0..len(prompts)-1``: a generation folder (see :func:`generated_paths`) or a list of paths.

    ``feature_extractor``: an ``nn.Module`` uint8 ``(N,3,H,W)`` -> features or ``(features, logits)``;
    ``clip_model``: a :class:`bksdm_lab.evaluation.metrics.ClipModel`; ``stats_out``: also save the images' ``mu``/``sigma``.
    """
    paths = generated_paths(images, len(prompts))
    if ref_stats is not None and feature_extractor is None:
        raise EvaluationError("FID needs a feature extractor")
    scores = score_images(
        paths,
        prompts,
        feature_extractor=feature_extractor,
        clip_model=clip_model,
        resize=resize,
        batch_size=batch_size,
        progress=progress,
    )
    results: dict[str, Any] = {"num_images": len(paths), "fid": None, "is": None, "is_std": None, "clip_score": None}
    stats = scores["stats"]
    if stats is not None and stats_out is not None and stats.n >= 2:
        save_stats(stats_out, stats.mu, stats.sigma)
    if ref_stats is not None:
        mu_ref, sigma_ref = load_stats(ref_stats) if isinstance(ref_stats, (str, Path)) else ref_stats
        if np.shape(mu_ref) != stats.mu.shape:
            raise EvaluationError(
                f"the reference statistics have {np.shape(mu_ref)[0]}-d features but the feature extractor gives "
                f"{stats.mu.shape[0]}-d ones: compute them with the same --feature-extractor"
            )
        results["fid"] = frechet_distance(stats.mu, stats.sigma, mu_ref, sigma_ref)
    if scores["logits"] is not None:
        splits = min(is_splits, len(paths))
        results["is"], results["is_std"] = inception_score(scores["logits"], splits=splits)
        results["is_splits"] = splits
    if scores["clip"] is not None:
        results["clip_score"] = float(scores["clip"].mean())
        results["clip_score_std"] = float(scores["clip"].std()) if len(paths) > 1 else 0.0
    return results


def compute_stats(
    folder: str | Path,
    feature_extractor: torch.nn.Module,
    *,
    resize: int | None = 256,
    batch_size: int = 50,
    num_images: int | None = None,
    progress: bool = False,
) -> FeatureStats:
    """FeatureStats of the images under ``folder`` (e.g. the 40,504 MS-COCO val2014 images, squashed to 256 px)."""
    paths = list_images(folder, num_images)
    scores = score_images(
        paths, feature_extractor=feature_extractor, resize=resize, batch_size=batch_size, progress=progress
    )
    return scores["stats"]


# ---- reporting ---------------------------------------------------------------------------------------
def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def format_table(results: dict[str, Any]) -> str:
    """This run's numbers beside the paper's for the same model (when known)."""
    model = results.get("paper_model")
    paper = PAPER_RESULTS.get(model) if model else None
    header = ["metric", "this run"] + ([f"paper ({model})"] if paper else [])
    rows = [
        ("FID", _fmt(results.get("fid"), 2), _fmt(paper[0], 2) if paper else None),
        ("IS", _fmt(results.get("is"), 2), _fmt(paper[1], 2) if paper else None),
        ("CLIP score", _fmt(results.get("clip_score"), 4), _fmt(paper[2], 4) if paper else None),
        ("images", _fmt(results.get("num_images"), 0), _fmt(PAPER_IMAGES, 0) if paper else None),
    ]
    table = [header] + [[c for c in row if c is not None] for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths)))
        for r in table
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = results.get("notes") or []
    return "\n".join(lines + [f"note: {n}" for n in notes])


def comparability_notes(results: dict[str, Any], extractor: str, clip: str, settings: dict | None) -> list[str]:
    notes = []
    if extractor == "demo" or clip == "demo":
        notes.append("tiny random demo models (--feature-extractor/--clip demo): the numbers are meaningless")
    if results.get("num_images") != PAPER_IMAGES:
        notes.append(f"{results.get('num_images'):,} images; the paper uses {PAPER_IMAGES:,} (FID is biased by N)")
    if extractor != "inception" or clip != DEFAULT_CLIP:
        if extractor != "demo" and clip != "demo":
            notes.append("not the paper's feature extractor / CLIP model")
    if settings:
        diff = [f"{k}={settings.get(k)!r}" for k, v in PAPER_SETTINGS.items() if settings.get(k) != v]
        if diff:
            notes.append(f"sampling differs from the paper's: {', '.join(diff)}")
    if results.get("fid") is None:
        notes.append("no FID: give --ref-stats (see `python -m bksdm_lab.evaluate stats`)")
    return notes


def log_wandb(results: dict[str, Any], out_dir: Path, project: str, name: str | None) -> str:
    import wandb

    run = wandb.init(
        project=project, name=name, job_type="eval", dir=str(out_dir), config=results, reinit="finish_previous"
    )
    try:
        metrics = {f"eval/{k}": results[k] for k in ("fid", "is", "is_std", "clip_score") if results.get(k) is not None}
        grid = out_dir / "grid.png"
        if grid.is_file():
            metrics["eval/grid"] = wandb.Image(str(grid))
        run.log(metrics)
        run.summary.update({k: v for k, v in metrics.items() if k != "eval/grid"})
        return run.dir
    finally:
        run.finish()


# ---- during training ---------------------------------------------------------------------------------
class EvalCallback(Callback):
    """Every ``every_n_steps`` optimizer steps (and at the end of training): generate images for the first
    ``num_prompts`` prompts with the student (its EMA if the run keeps one), then FID against ``ref_stats`` (if
    given), IS and CLIP score, logged as ``eval/fid``, ``eval/is``, ``eval/clip_score`` to every logger.

    Prompt ``i`` is seeded ``seed + i`` (per-prompt mode), so steps compare with each other. A few hundred images
    give a biased but trend-faithful FID (use the same N throughout a run). The metric models and the prompts are
    checked when training starts, not at the first evaluation. Add it from the command line, e.g.::

        python -m bksdm_lab.train experiment=paper callbacks=with_eval callbacks.eval.ref_stats=val2014_256.npz
    """

    def __init__(
        self,
        metadata: str | None = None,
        prompts: Sequence[str] | None = None,
        num_prompts: int = 200,
        ref_stats: str | None = None,
        every_n_steps: int = 5000,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        resolution: int | None = None,
        batch_size: int = 8,
        seed: int = 1234,
        feature_extractor: str = "inception",
        clip: str = DEFAULT_CLIP,
        eval_resolution: int | None = 256,
        out_dir: str | None = None,
        use_ema: bool = True,
    ):
        self.metadata, self.prompt_list, self.num_prompts = metadata, list(prompts or []), num_prompts
        self.ref_stats, self.every_n_steps = ref_stats, every_n_steps
        self.num_inference_steps, self.guidance_scale = num_inference_steps, guidance_scale
        self.resolution, self.batch_size, self.seed = resolution, batch_size, seed
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
        import tempfile

        from bksdm_lab.models.export import build_pipeline

        step = trainer.global_step
        ema = getattr(module, "ema_student", None)
        unet = ema if (self.use_ema and ema is not None) else module.student
        pipe = build_pipeline(module.teacher, unet)
        pipe.set_progress_bar_config(disable=True)
        was_training = unet.training
        unet.eval()
        tmp = None
        if self.out_dir is None:
            tmp = tempfile.TemporaryDirectory(prefix="bksdm_eval_")
        folder = (self.out_dir or Path(tmp.name)) / f"step{step:06d}"
        try:
            with torch.autocast(module.device.type, enabled=module.device.type == "cuda"):
                result = gen.generate_images(
                    pipe,
                    self.prompts,
                    folder,
                    steps=self.num_inference_steps,
                    guidance=self.guidance_scale,
                    resolution=self.resolution,
                    batch_size=self.batch_size,
                    seed=self.seed,
                    seed_mode="per-prompt",
                    grid=0,
                    progress=False,
                )
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


# ---- CLI ---------------------------------------------------------------------------------------------
def _add_model_args(parser: argparse.ArgumentParser, clip: bool = True) -> None:
    group = parser.add_argument_group("metric models")
    group.add_argument(
        "--feature-extractor",
        default="inception",
        help="inception (torch-fidelity InceptionV3, the paper's; needs the eval extra) or demo (a tiny random conv "
        "net: meaningless numbers, smoke tests only). Default: inception",
    )
    if clip:
        group.add_argument(
            "--clip",
            default=DEFAULT_CLIP,
            help="open_clip:NAME:PRETRAINED, transformers:MODEL_ID_OR_DIR, demo (tiny random CLIP) or none. "
            f"Default: {DEFAULT_CLIP}",
        )
    group.add_argument("--eval-batch-size", type=int, default=50, help="images per feature-extractor batch (50)")


def parse_run_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bksdm_lab.evaluate",
        description="Generate images for MS-COCO captions and compute FID, IS and CLIP score with the paper's protocol "
        "(resumable). `python -m bksdm_lab.evaluate stats --help`: real-image FID statistics.",
    )
    gen.add_pipeline_args(parser)
    data_dir = os.environ.get("BKSDM_DATA_DIR", "data")  # where `python -m bksdm_lab.data.download coco30k` puts it
    gen.add_prompt_args(parser, metadata_default=f"{data_dir}/mscoco_val2014_30k/metadata.csv")
    gen.add_sampling_args(parser)
    parser.add_argument("--out", required=True, help="folder for images/, grid.png, prompts.csv, results.json")
    group = parser.add_argument_group("metrics")
    group.add_argument("--ref-stats", metavar="NPZ", help="real-image statistics (mu, sigma) for FID")
    group.add_argument("--eval-resolution", type=int, default=256, help="squash images to this size first (256)")
    group.add_argument("--is-splits", type=int, default=10, help="Inception Score splits (10)")
    _add_model_args(parser)
    group = parser.add_argument_group("reporting")
    group.add_argument("--paper-model", help=f"compare with the paper's numbers of: {', '.join(PAPER_RESULTS)}")
    group.add_argument("--wandb", action="store_true", help="log to W&B (WANDB_MODE=offline works)")
    group.add_argument("--wandb-project", default="bksdm_lab")
    group.add_argument("--wandb-name", help="W&B run name (default: the output folder's name)")
    return parser.parse_args(argv)


def parse_stats_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bksdm_lab.evaluate stats",
        description="FID statistics (mu, sigma; the pytorch-fid .npz layout) of a folder of real images, e.g. the "
        "40,504 MS-COCO val2014 images squashed to 256 px.",
    )
    parser.add_argument("--images", required=True, help="image folder (searched recursively)")
    parser.add_argument("--out", required=True, help="the .npz to write")
    parser.add_argument("--resize", type=int, default=256, help="squash to this size first, PIL bicubic; 0: keep")
    parser.add_argument("--num-images", type=int, help="only the first N images (sorted by path)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--no-progress", action="store_true")
    _add_model_args(parser, clip=False)
    return parser.parse_args(argv)


def _fail(message: str) -> None:
    print(f"bksdm_lab.evaluate: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _device(arg: str | None) -> torch.device:
    return torch.device(arg) if arg else gen.default_device()


def stats_main(argv: Sequence[str]) -> Path:
    args = parse_stats_args(argv)
    try:
        check_available(args.feature_extractor)
        extractor = extractor_from_spec(args.feature_extractor).to(_device(args.device))
        stats = compute_stats(
            args.images,
            extractor,
            resize=args.resize or None,
            batch_size=args.eval_batch_size,
            num_images=args.num_images,
            progress=not args.no_progress,
        )
        if stats.n < 2:
            raise EvaluationError(f"statistics need at least 2 images, found {stats.n}")
        out = save_stats(args.out, stats.mu, stats.sigma)
    except (EvaluationError, MissingEvalDependency, FileNotFoundError, ValueError) as err:
        _fail(str(err))
    print(
        f"bksdm_lab.evaluate: wrote {out} ({stats.n:,} images, {stats.mu.shape[0]}-d features, "
        f"feature extractor {args.feature_extractor})"
    )
    return out


def run_main(argv: Sequence[str] | None) -> dict[str, Any]:
    args = parse_run_args(argv)
    from bksdm_lab.models.export import ExportError

    out_dir = Path(args.out)
    has_source = any(getattr(args, k) for k in ("pipeline", "unet", "checkpoint"))
    try:
        if args.ref_stats and not Path(args.ref_stats).is_file():
            raise FileNotFoundError(f"--ref-stats {args.ref_stats!r} does not exist")
        check_available(args.feature_extractor, args.clip)
        prompts = gen.read_prompts(args.prompt, args.prompts_file, args.metadata, args.num_prompts)
        generation: dict[str, Any] = {}
        model = None
        if has_source:
            pipe, model = gen.pipeline_from_args(args)
            result = gen.generate_from_args(args, pipe, model, prompts, out_dir)
            print(f"bksdm_lab.evaluate: {gen.summary(result)}", flush=True)
            generation = {
                **result.settings,
                "generated": result.generated,
                "skipped": result.skipped,
                "seconds": result.seconds,
                "wall_seconds": result.wall_seconds,
                "images_per_s": result.images_per_s,
            }
            del pipe
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        else:
            manifest = out_dir / gen.MANIFEST
            if manifest.is_file():
                generation = json.loads(manifest.read_text()).get("settings", {})
                model = generation.get("model")
        device = _device(args.device)
        extractor = extractor_from_spec(args.feature_extractor).to(device)
        clip = None if args.clip == "none" else clip_from_spec(args.clip).to(device)
        results = evaluate(
            out_dir,
            prompts,
            feature_extractor=extractor,
            clip_model=clip,
            ref_stats=args.ref_stats,
            resize=args.eval_resolution or None,
            batch_size=args.eval_batch_size,
            is_splits=args.is_splits,
            progress=not args.no_progress,
            stats_out=out_dir / "generated_stats.npz",
        )
    except FileNotFoundError as err:
        hint = "" if has_source else " (no pipeline given: only images already in --out are scored)"
        _fail(f"{err}{hint}")
    except (gen.GenerationError, EvaluationError, MissingEvalDependency, ValueError) as err:
        _fail(str(err))
    except (gen.TeacherLoadError, ExportError) as err:
        _fail(str(err))

    results = {
        "model": model,
        "paper_model": args.paper_model or paper_model(model),
        **results,
        "ref_stats": str(args.ref_stats) if args.ref_stats else None,
        "feature_extractor": getattr(extractor, "name", args.feature_extractor),
        "clip_model": getattr(clip, "name", None) if clip is not None else None,
        "eval_resolution": args.eval_resolution,
        "metadata": args.metadata,
        "generation": generation,
    }
    if results["paper_model"] and results["paper_model"] not in PAPER_RESULTS:
        print(
            f"bksdm_lab.evaluate: unknown --paper-model {results['paper_model']!r}; known: {', '.join(PAPER_RESULTS)}"
        )
        results["paper_model"] = None
    if results["paper_model"]:
        fid, is_, clip_score = PAPER_RESULTS[results["paper_model"]]
        results["paper"] = {"fid": fid, "is": is_, "clip_score": clip_score, "num_images": PAPER_IMAGES}
    results["notes"] = comparability_notes(results, args.feature_extractor, args.clip, generation)
    results["comparable_to_paper"] = not results["notes"]
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))
    print(f"bksdm_lab.evaluate: wrote {out_dir / 'results.json'}")
    if args.wandb:
        wandb_dir = log_wandb(results, out_dir, args.wandb_project, args.wandb_name or out_dir.name)
        print(f"bksdm_lab.evaluate: logged to W&B ({wandb_dir})")
    return results


def main(argv: Sequence[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["stats"]:
        return stats_main(argv[1:])
    return run_main(argv)
