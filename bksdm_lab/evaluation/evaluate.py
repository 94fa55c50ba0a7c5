"""The paper's evaluation: FID, Inception Score and CLIP score of generated images, and the report beside the
paper's numbers (BK-SDM, arXiv 2305.15798, MS-COCO 30K; the protocol: docs/evaluation.md). The command is
:mod:`bksdm_lab.evaluate`; during training, :class:`bksdm_lab.evaluation.callback.EvalCallback`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bksdm_lab.evaluation import sampling as gen
from bksdm_lab.evaluation.metrics import (
    PAPER_CLIP,
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

DEFAULT_CLIP = PAPER_CLIP  # the `clip` default of the evaluation callback
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
log = logging.getLogger(__name__)


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


def read_image(path: Path, resize: int | None) -> Image.Image:
    """An RGB image squashed to ``resize`` px (bicubic); a file that is no usable image raises the BadSample (reason:
    missing, corrupt, bomb) training gives it."""
    try:
        with Image.open(path) as im:
            return resize_image(im, resize)
    except Exception:
        from bksdm_lab.data.common import load_image

        load_image(path, 1, False, "upscale", 2**63, name=str(path))  # only its verdict; PIL's bomb limit holds
        raise


def image_batches(
    paths: Sequence[Path], resize: int | None, batch_size: int, skipped: list | None = None
) -> Iterator[list[Image.Image]]:
    """RGB PIL images squashed to ``resize`` px (bicubic), in batches; without resize, one size per batch. With a
    ``skipped`` list, unusable files are skipped and their BadSamples appended to it, else raised."""
    from bksdm_lab.data.common import BadSample

    batch: list[Image.Image] = []
    for path in paths:
        try:
            image = read_image(path, resize)
        except BadSample as bad:
            if skipped is None:
                raise
            log.warning("skipping %s (%s)", bad, bad.reason)
            skipped.append(bad)
            continue
        if batch and (len(batch) == batch_size or image.size != batch[0].size):
            yield batch
            batch = []
        batch.append(image)
    if batch:
        yield batch


# ---- scoring -----------------------------------------------------------------------------------------
class Scorer:
    """FID/IS/KID (:class:`ImageMetrics`) and CLIP score fed one generated image at a time, in prompt order.

    Images (PIL, or paths read here) are squashed to ``resize`` and scored in batches of ``batch_size``, cut where
    the image size changes: the same batches as :func:`image_batches` over the same images, so feeding images as they
    are generated (:class:`BackgroundScorer`) gives the numbers of scoring them from disk afterwards. ``seconds``: the
    time spent in here (reading, resizing, the metric models), for the scoring rate.
    """

    def __init__(
        self,
        prompts: Sequence[str] | None = None,
        *,
        feature_extractor: torch.nn.Module | None = None,
        clip_model=None,
        resize: int | None = 256,
        batch_size: int = 50,
        ref_stats: str | Path | FeatureStats | tuple | None = None,
        real_paths: Sequence[Path] = (),
        is_splits: int = 10,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        progress: bool = False,
        total: int | None = None,
    ):
        from tqdm.auto import tqdm

        if (ref_stats is not None or real_paths) and feature_extractor is None:
            raise EvaluationError("FID and KID need a feature extractor")
        self.prompts, self.clip_model, self.resize, self.batch_size = prompts, clip_model, resize, batch_size
        self.metrics: ImageMetrics | None = None
        if feature_extractor is not None:
            self.metrics = ImageMetrics(
                feature_extractor,
                kid=bool(real_paths),
                is_splits=is_splits,
                kid_subsets=kid_subsets,
                kid_subset_size=kid_subset_size,
            )
            if ref_stats is not None:
                try:
                    self.metrics.load_reference(ref_stats)
                except ValueError as err:
                    raise EvaluationError(str(err)) from err
        self.count, self.seconds = 0, 0.0
        self._batch: list[Image.Image] = []
        self._sims: list[torch.Tensor] = []
        self.bar = tqdm(total=(total or 0) + len(real_paths), unit="img", desc="score", disable=not progress)
        start = time.perf_counter()
        for batch in image_batches(real_paths, resize, batch_size):
            self.metrics.update(to_uint8_batch(batch), real=True)
            self.bar.update(len(batch))
        self.seconds += time.perf_counter() - start

    def add(self, image: Image.Image | str | Path) -> None:
        """The next image (of prompt ``count``)."""
        start = time.perf_counter()
        if isinstance(image, (str, Path)):
            image = read_image(Path(image), self.resize)
        else:
            image = resize_image(image, self.resize)
        if self._batch and (len(self._batch) == self.batch_size or image.size != self._batch[0].size):
            self._flush()
        self._batch.append(image)
        self.count += 1
        self.seconds += time.perf_counter() - start

    def _flush(self) -> None:
        batch, first = self._batch, self.count - len(self._batch)
        self._batch = []
        if not batch:
            return
        if self.metrics is not None:
            self.metrics.update(to_uint8_batch(batch), real=False)
        if self.clip_model is not None:
            if self.prompts is None or len(self.prompts) < self.count:
                raise EvaluationError("the CLIP score needs one prompt per image")
            texts = list(self.prompts[first : first + len(batch)])
            self._sims.append(
                cosine_similarities(self.clip_model.encode_images(batch), self.clip_model.encode_texts(texts))
            )
        self.bar.update(len(batch))

    def finish(self) -> dict[str, Any]:
        """The scores (see :func:`score_images`)."""
        start = time.perf_counter()
        self._flush()
        scores = self.metrics.compute() if self.metrics is not None else {}
        self.seconds += time.perf_counter() - start
        self.bar.close()
        return {
            "stats": self.metrics.generated_stats() if self.metrics is not None else None,
            "logits": self.metrics.logits() if self.metrics is not None else None,
            "clip": torch.cat(self._sims) if self._sims else None,
            "metrics": self.metrics,
            **{k: scores.get(k) for k in ("fid", "is", "is_std", "kid", "kid_std")},
            "scored": self.count,
            "seconds": self.seconds,
        }


class BackgroundScorer:
    """A :class:`Scorer` in a thread of its own: the generation's ``sink`` (see
    :func:`bksdm_lab.evaluation.sampling.generate_images`) hands it ``(indices, images or paths)``, in any order; it
    scores them in prompt order ``0..num-1`` while the next batch generates. On CUDA its work goes to a stream of its
    own so the metric models' kernels can run beside the pipeline's. ``close()`` returns the scores."""

    def __init__(self, scorer: Scorer, num: int, device: torch.device | None = None, max_pending: int = 4):
        self.scorer, self.num = scorer, num
        self.queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self.error: BaseException | None = None
        self.scores: dict[str, Any] | None = None
        self.device = device
        self.thread = threading.Thread(target=self._run, name="scorer", daemon=True)
        self.thread.start()

    def __call__(self, indices: Sequence[int], items: Sequence) -> None:
        if self.error is not None:
            raise EvaluationError(f"scoring failed: {type(self.error).__name__}: {self.error}") from self.error
        self.queue.put(list(zip(indices, items)))

    def _run(self) -> None:
        stream = None
        if self.device is not None and self.device.type == "cuda":
            stream = torch.cuda.Stream(self.device)
        pending: dict[int, Any] = {}
        done = False
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            while not done:
                item = self.queue.get()
                if item is None:
                    done = True
                elif self.error is None:
                    try:
                        pending.update(item)
                        while self.scorer.count in pending:
                            self.scorer.add(pending.pop(self.scorer.count))
                    except BaseException as err:  # kept for the producer; the queue is still drained
                        self.error = err
            if self.error is None:
                try:
                    if self.scorer.count != self.num:
                        missing = sorted(set(range(self.scorer.count, self.num)) - set(pending))
                        raise EvaluationError(
                            f"{len(missing)} of {self.num} images never came, e.g. prompt {missing[0]}"
                        )
                    self.scores = self.scorer.finish()
                except BaseException as err:
                    self.error = err
            if stream is not None:
                stream.synchronize()

    def close(self) -> dict[str, Any]:
        """Wait for the last images to be scored; the scores (an error of the thread is raised here)."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.scores

    def abort(self) -> None:
        """Stop without scores (the generation failed)."""
        self.error = self.error or EvaluationError("aborted")
        self.queue.put(None)
        self.thread.join()


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
    them), ``clip`` (per-image cosine similarity with its prompt), ``metrics`` (the :class:`ImageMetrics`), the
    scores ``fid`` (against ``ref_stats``, an ``.npz`` / FeatureStats / ``(mu, sigma[, n])``, else against
    ``real_images``), ``is``/``is_std`` and ``kid``/``kid_std`` (``None`` where not computable), and ``scored`` /
    ``seconds`` (the scoring rate). KID needs the real features themselves, so it is computed only with
    ``real_images`` (a folder or a list of paths, resized like the generated ones); with both, FID uses
    ``ref_stats`` and the real images serve KID only.
    """
    if clip_model is not None and (prompts is None or len(prompts) != len(paths)):
        raise EvaluationError("the CLIP score needs one prompt per image")
    real_paths: list[Path] = []
    if real_images is not None:
        is_folder = isinstance(real_images, (str, Path))
        real_paths = list_images(real_images) if is_folder else [Path(p) for p in real_images]
    scorer = Scorer(
        prompts,
        feature_extractor=feature_extractor,
        clip_model=clip_model,
        resize=resize,
        batch_size=batch_size,
        ref_stats=ref_stats,
        real_paths=real_paths,
        is_splits=is_splits,
        kid_subsets=kid_subsets,
        kid_subset_size=kid_subset_size,
        progress=progress,
        total=len(paths),
    )
    for path in paths:
        scorer.add(path)
    return scorer.finish()


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
    return results_of(scores, ref_stats=ref_stats, is_splits=is_splits, stats_out=stats_out)


def results_of(
    scores: dict[str, Any],
    *,
    ref_stats: str | Path | tuple[np.ndarray, np.ndarray] | None = None,
    is_splits: int = 10,
    stats_out: str | Path | None = None,
    overlapped: bool = False,
) -> dict[str, Any]:
    """The results record of :func:`score_images` / :class:`Scorer` scores: FID, IS, CLIP score and the scoring
    rate (``scoring``: images, seconds, images/s, whether it ran beside the generation)."""
    n = scores["scored"]
    results: dict[str, Any] = {"num_images": n, "fid": None, "is": None, "is_std": None, "clip_score": None}
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
        splits = min(is_splits, n)
        results["is"], results["is_std"] = inception_score(scores["logits"], splits=splits)
        results["is_splits"] = splits
    if scores["clip"] is not None:
        results["clip_score"] = float(scores["clip"].mean())
        results["clip_score_std"] = float(scores["clip"].std()) if n > 1 else 0.0
    seconds = scores["seconds"]
    results["scoring"] = {
        "images": n,
        "seconds": seconds,
        "images_per_s": n / seconds if n and seconds > 0 else None,
        "overlapped": overlapped,
    }
    return results


def compute_stats(
    folder: str | Path,
    feature_extractor: torch.nn.Module,
    *,
    resize: int | None = 256,
    batch_size: int = 50,
    num_images: int | None = None,
    progress: bool = False,
) -> tuple[FeatureStats, list]:
    """FeatureStats (``mu``, ``sigma``, ``n``) of the images under ``folder`` (e.g. the 40,504 MS-COCO val2014
    images, squashed to 256 px): the real side of torchmetrics' FID; ``.save(path)`` writes the reference npz. Files
    that are no usable image are skipped, as in training: returned too (their BadSamples, with reason and file)."""
    from tqdm.auto import tqdm

    paths = list_images(folder, num_images)
    image_metrics = ImageMetrics(feature_extractor, inception_score=False)
    skipped: list = []
    with tqdm(total=len(paths), unit="img", desc="stats", disable=not progress) as bar:
        for batch in image_batches(paths, resize, batch_size, skipped):
            image_metrics.update(to_uint8_batch(batch), real=True)
            bar.update(len(batch))
        bar.update(len(skipped))
    return image_metrics.real_stats(), skipped


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
    if extractor != "inception" or clip not in ("open_clip", PAPER_CLIP):
        if extractor != "demo" and clip != "demo":
            notes.append("not the paper's feature extractor / CLIP model")
    if settings:
        expected = {**PAPER_SETTINGS, "scheduler": gen.SCHEDULERS[PAPER_SETTINGS["scheduler"]]}
        expected.pop("batch_size", None)  # the images do not depend on it (paper seeding replayed per prompt)
        diff = [f"{k}={settings.get(k)!r}" for k, v in expected.items() if settings.get(k) != v]
        if diff:
            notes.append(f"sampling differs from the paper's: {', '.join(diff)}")
    if results.get("fid") is None:
        notes.append("no FID: give ref_stats= (see `python -m bksdm_lab.evaluate stats`)")
    return notes
