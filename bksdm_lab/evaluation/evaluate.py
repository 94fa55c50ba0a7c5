"""The paper's evaluation: FID, Inception Score and CLIP score of generated images, and the report beside the
paper's numbers. The command is :mod:`bksdm_lab.evaluate` (conf/evaluate.yaml); during training,
:class:`bksdm_lab.evaluation.callback.EvalCallback`; W&B logging, :mod:`bksdm_lab.evaluation.wandb_log`.

The paper's protocol (BK-SDM, arXiv 2305.15798, MS-COCO 30K): the 30,000 val2014 captions, sampling as in
``conf/sampling/paper.yaml``, images squashed to 256 x 256 (PIL bicubic); FID against real-image statistics
(pytorch-fid ``.npz`` with ``mu``/``sigma``, e.g. the 40,504 val2014 images at 256 px, see
:func:`compute_stats`), Inception Score (torch-fidelity's way: 10 splits), CLIP score (mean cosine similarity,
open_clip ViT-g-14 laion2b_s34b_b88k, no x100) on the 256 px images.

The default models need the ``eval`` extra (``pip install -e ".[eval]"``). ``feature_extractor=demo clip=demo``
use tiny random models built from config so the command runs offline end to end: smoke tests only, their
numbers mean nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bksdm_lab.evaluation import sampling as gen
from bksdm_lab.evaluation.metrics import (
    FeatureStats,
    ImageMetrics,
    cosine_similarities,
    frechet_distance,
    inception_score,
    load_stats,
    resize_image,
    save_stats,
    to_uint8_batch,
)
from bksdm_lab.evaluation.paper import PAPER_IMAGES, PAPER_RESULTS, PAPER_SETTINGS

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
    ref_stats: str | Path | FeatureStats | tuple | None = None,
    real_images: str | Path | Sequence[str | Path] | None = None,
    is_splits: int = 10,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
) -> dict[str, Any]:
    """One pass over the images with torchmetrics' FID, IS and KID (:class:`ImageMetrics`) and the CLIP score.

    Returns ``stats`` (:class:`FeatureStats` of the pool features), ``logits`` (for IS, if the extractor gives
    them), ``clip`` (per-image cosine similarity with its prompt), ``metrics`` (the :class:`ImageMetrics`) and the
    scores ``fid`` (against ``ref_stats``, an ``.npz`` / FeatureStats / ``(mu, sigma[, n])``, else against
    ``real_images``), ``is``/``is_std`` and ``kid``/``kid_std``; ``None`` where not computable. KID needs the real
    features themselves, so it is computed only with ``real_images`` (a folder or a list of paths, resized like the
    generated ones); with both, FID uses ``ref_stats`` and the real images serve KID only.
    """
    from tqdm.auto import tqdm

    if clip_model is not None and (prompts is None or len(prompts) != len(paths)):
        raise EvaluationError("the CLIP score needs one prompt per image")
    real_paths: list[Path] = []
    if real_images is not None:
        is_folder = isinstance(real_images, (str, Path))
        real_paths = list_images(real_images) if is_folder else [Path(p) for p in real_images]
    if (ref_stats is not None or real_paths) and feature_extractor is None:
        raise EvaluationError("FID and KID need a feature extractor")
    image_metrics = None
    if feature_extractor is not None:
        image_metrics = ImageMetrics(
            feature_extractor,
            kid=bool(real_paths),
            is_splits=is_splits,
            kid_subsets=kid_subsets,
            kid_subset_size=kid_subset_size,
        )
        if ref_stats is not None:
            try:
                image_metrics.load_reference(ref_stats)
            except ValueError as err:
                raise EvaluationError(str(err)) from err
    sims, start = [], 0
    bar = tqdm(total=len(paths) + len(real_paths), unit="img", desc="score", disable=not progress)
    for batch in image_batches(real_paths, resize, batch_size):
        image_metrics.update(to_uint8_batch(batch), real=True)
        bar.update(len(batch))
    for batch in image_batches(paths, resize, batch_size):
        if image_metrics is not None:
            image_metrics.update(to_uint8_batch(batch), real=False)
        if clip_model is not None:
            texts = list(prompts[start : start + len(batch)])
            sims.append(cosine_similarities(clip_model.encode_images(batch), clip_model.encode_texts(texts)))
        start += len(batch)
        bar.update(len(batch))
    bar.close()
    scores = image_metrics.compute() if image_metrics is not None else {}
    return {
        "stats": image_metrics.generated_stats() if image_metrics is not None else None,
        "logits": image_metrics.logits() if image_metrics is not None else None,
        "clip": torch.cat(sims) if sims else None,
        "metrics": image_metrics,
        **{k: scores.get(k) for k in ("fid", "is", "is_std", "kid", "kid_std")},
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
                f"{stats.mu.shape[0]}-d ones: compute them with the same feature_extractor="
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
    """FeatureStats (``mu``, ``sigma``, ``n``) of the images under ``folder`` (e.g. the 40,504 MS-COCO val2014
    images, squashed to 256 px): the real side of torchmetrics' FID; ``.save(path)`` writes the reference npz."""
    from tqdm.auto import tqdm

    paths = list_images(folder, num_images)
    image_metrics = ImageMetrics(feature_extractor, inception_score=False)
    with tqdm(total=len(paths), unit="img", desc="stats", disable=not progress) as bar:
        for batch in image_batches(paths, resize, batch_size):
            image_metrics.update(to_uint8_batch(batch), real=True)
            bar.update(len(batch))
    return image_metrics.real_stats()


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
        notes.append("tiny random demo models (feature_extractor/clip=demo): the numbers are meaningless")
    if results.get("num_images") != PAPER_IMAGES:
        notes.append(f"{results.get('num_images'):,} images; the paper uses {PAPER_IMAGES:,} (FID is biased by N)")
    if extractor != "inception" or clip != DEFAULT_CLIP:
        if extractor != "demo" and clip != "demo":
            notes.append("not the paper's feature extractor / CLIP model")
    if settings:
        expected = {**PAPER_SETTINGS, "scheduler": gen.SCHEDULERS[PAPER_SETTINGS["scheduler"]]}
        diff = [f"{k}={settings.get(k)!r}" for k, v in expected.items() if settings.get(k) != v]
        if diff:
            notes.append(f"sampling differs from the paper's: {', '.join(diff)}")
    if results.get("fid") is None:
        notes.append("no FID: give ref_stats= (see `python -m bksdm_lab.evaluate stats`)")
    return notes
