"""Image-quality metrics of the paper's protocol: FID, Inception Score, KID, CLIP score; and the models behind them.

FID, IS and KID are torchmetrics' over one extractor (uint8 images -> pool features, or ``(features, logits)`` for IS)
that :class:`ImageMetrics` runs once per batch. The paper's models need the ``eval`` extra; ``demo_*``: smoke tests.
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.inception import InceptionScore
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.utilities.data import dim_zero_cat

EVAL_EXTRA = 'pip install -e ".[eval]"'
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation (open_clip's for the paper's CLIP too)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class MissingEvalDependency(ImportError):
    """A default evaluation model needs a package of the ``eval`` extra."""


def _require(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingEvalDependency(
            f"{what} needs the `{module}` package, which is not installed: {EVAL_EXTRA} "
            f"(it needs torchvision, i.e. a torch build with a matching torchvision). For an offline smoke test use "
            f"the tiny random models instead (`--feature-extractor demo --clip demo`; their numbers are meaningless)."
        ) from err


# ---- FID statistics ---------------------------------------------------------------------------------
PLACEHOLDER_N = 2  # FID depends on mu and sigma only; an npz without n is loaded as if from this many images


class FeatureStats:
    """Mean ``mu``, covariance ``sigma`` and count ``n`` of a set's pool features: one side of torchmetrics' FID.

    ``sigma`` is torchmetrics' (and pytorch-fid's ``np.cov``) unbiased covariance. Read one from a metric with
    :meth:`of_metric`, load one into a metric's real (or fake) state with :meth:`load_into`; ``.npz`` files in the
    pytorch-fid layout (``mu``, ``sigma``, plus ``n`` here) with :meth:`save` / :meth:`load`. ``n`` is ``None`` for
    an npz written without it (FID does not depend on it). ``FeatureStats().update(features)`` accumulates
    ``(N, D)`` features batch by batch in a torchmetrics FID.
    """

    def __init__(self, mu=None, sigma=None, n: int | None = None):
        self._mu = None if mu is None else np.asarray(mu, np.float64).reshape(-1)
        self._sigma = None if sigma is None else np.atleast_2d(np.asarray(sigma, np.float64))
        self.n = None if n is None else int(n)
        self._fid: FrechetInceptionDistance | None = None  # set by update()
        if self._mu is not None and self._sigma is not None and self._sigma.shape != (self._mu.size,) * 2:
            raise ValueError(f"mu {self._mu.shape} and sigma {self._sigma.shape} do not match")

    def __repr__(self) -> str:
        width = None if self._mu is None else self._mu.size
        return f"FeatureStats(n={self.n}, features={width})"

    def update(self, features) -> FeatureStats:
        """Add ``(N, D)`` features (any batching gives the same statistics)."""
        x = _as_tensor(features)
        x = x.reshape(x.shape[0], -1)
        if self._fid is None:
            if self._mu is not None:
                raise ValueError("statistics given as mu/sigma cannot be updated with features")
            self._fid = fid_metric(Features(x.shape[1]))
        width = self._fid.fake_features_sum.shape[0]
        if x.shape[1] != width:
            raise ValueError(f"features of width {x.shape[1]} added to statistics of width {width}")
        self._fid.update(x, real=False)
        self.n = int(self._fid.fake_features_num_samples)
        self._mu = self._sigma = None  # recomputed from the metric's state when read
        return self

    def _refresh(self) -> None:
        if self._fid is not None and self._mu is None and self.n:
            done = FeatureStats.of_metric(self._fid, real=False)
            self._mu, self._sigma = done._mu, done._sigma

    @property
    def mu(self) -> np.ndarray:
        self._refresh()
        if self._mu is None:
            raise ValueError("no features were added")
        return self._mu

    @property
    def sigma(self) -> np.ndarray:
        self._refresh()
        if self._sigma is None:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")
        return self._sigma

    @property
    def dim(self) -> int:
        return self.mu.size

    @classmethod
    def of_metric(cls, fid: FrechetInceptionDistance, real: bool = False) -> FeatureStats:
        """The statistics a torchmetrics FID holds for its real (or fake) images, as its ``compute`` forms them."""
        side = "real" if real else "fake"
        n = int(getattr(fid, f"{side}_features_num_samples"))
        total = getattr(fid, f"{side}_features_sum").detach().double().cpu()
        outer = getattr(fid, f"{side}_features_cov_sum").detach().double().cpu()
        mu = total / n if n else None
        sigma = (outer - n * torch.outer(mu, mu)) / (n - 1) if n >= 2 else None
        return cls(None if mu is None else mu.numpy(), None if sigma is None else sigma.numpy(), n)

    @classmethod
    def from_features(cls, features) -> FeatureStats:
        """Statistics of ``(N, D)`` features, accumulated by a torchmetrics FID fed with them."""
        return cls().update(features)

    def load_into(self, fid: FrechetInceptionDistance, real: bool = True) -> FrechetInceptionDistance:
        """Set ``fid``'s real (or fake) state, sum and sum of outer products, to these statistics (``n`` images)."""
        side = "real" if real else "fake"
        width = getattr(fid, f"{side}_features_sum").shape[0]
        if self.dim != width:
            raise ValueError(
                f"the statistics have {self.dim}-d features but the feature extractor gives {width}-d ones: "
                f"compute them with the same feature extractor"
            )
        n = self.n if self.n and self.n >= 2 else PLACEHOLDER_N
        device = getattr(fid, f"{side}_features_sum").device
        mu = torch.as_tensor(self.mu, dtype=torch.float64, device=device)
        sigma = torch.as_tensor(self.sigma, dtype=torch.float64, device=device)
        setattr(fid, f"{side}_features_sum", n * mu)
        setattr(fid, f"{side}_features_cov_sum", (n - 1) * sigma + n * torch.outer(mu, mu))
        setattr(fid, f"{side}_features_num_samples", torch.tensor(n, dtype=torch.long, device=device))
        fid._computed = None  # a value cached by an earlier compute() is stale now
        return fid

    def save(self, path: str | Path) -> Path:
        return save_stats(path, self.mu, self.sigma, n=self.n)

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        return cls(*_read_stats(path))


def save_stats(path: str | Path, mu, sigma, n: int | None = None) -> Path:
    """Write ``mu``/``sigma`` (and ``n``, the number of images, if given) as a pytorch-fid style ``.npz``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    if n is not None:
        arrays["n"] = np.asarray(int(n), np.int64)
    with path.open("wb") as f:  # a file object: np.savez would otherwise append ".npz" to other suffixes
        np.savez(f, **arrays)
    return path


def _as_tensor(x) -> torch.Tensor:
    return (x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))).detach()


def _read_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray, int | None]:
    """``(mu, sigma, n)`` of a statistics ``.npz``, read without pickle (anything else: a one-line ValueError)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics file {str(path)!r} does not exist")
    not_stats = ValueError(
        f"{path} is not a statistics file written by `python -m bksdm_lab.evaluate stats` (an .npz of mu and sigma)"
    )
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):  # a pickle, text, a cut file: not read any further
        raise not_stats from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise not_stats
    with data:
        missing = [k for k in ("mu", "sigma") if k not in data]
        if missing:
            raise ValueError(f"{path} has no {', '.join(missing)} (keys: {sorted(data.files)}); not FID statistics")
        try:
            n = int(data["n"]) if "n" in data else None
            return data["mu"].astype(np.float64), data["sigma"].astype(np.float64), n
        except (ValueError, TypeError, OSError, zipfile.BadZipFile):  # object arrays, text, a cut member
            raise not_stats from None


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of a pytorch-fid / torch-fidelity style ``.npz`` (keys ``mu`` and ``sigma``)."""
    mu, sigma, _ = _read_stats(path)
    return mu, sigma


# ---- torchmetrics' FID, IS and KID over our feature extractors ---------------------------------------
def _quiet(metric_class, *args, **kwargs):
    """Build a torchmetrics metric without its "saves all features in a buffer" warning (IS, KID)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        return metric_class(*args, **kwargs)


def _metric_kwargs() -> dict:
    # each process computes on its own: EvalCallback scores on rank 0 only, and a gather there would hang DDP
    return {"sync_on_compute": False}


class Features(torch.nn.Module):
    """Identity "extractor" for features computed elsewhere: torchmetrics' metrics then take ``(N, D)`` features."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(x).reshape(len(x), self.num_features).double()


class ExtractorOutputs(torch.nn.Module):
    """Runs an image feature extractor once per batch for several metrics: the last batch's output is kept and
    returned again for the same tensor. Features and logits come back in float64 on the extractor's device."""

    def __init__(self, extractor: torch.nn.Module):
        super().__init__()
        self.extractor = extractor
        self._last: tuple[torch.Tensor, tuple] | None = None
        self.num_features, self.num_classes = feature_widths(extractor)

    @property
    def device(self) -> torch.device:
        return next((p.device for p in self.extractor.parameters()), torch.device("cpu"))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self._last is None or self._last[0] is not images:
            feats, logits = split_features(self.extractor(images.to(self.device)))
            feats = feats.reshape(feats.shape[0], -1).double()
            logits = logits.reshape(logits.shape[0], -1).double() if logits is not None else None
            self._last = (images, (feats, logits))
        return self._last[1]

    def clear(self) -> None:
        self._last = None


class PoolFeatures(torch.nn.Module):
    """``feature=`` module for torchmetrics' FID and KID: uint8 images -> the extractor's pool features."""

    def __init__(self, outputs: ExtractorOutputs):
        super().__init__()
        self.outputs, self.num_features = outputs, outputs.num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.outputs(images)[0]


class ClassLogits(torch.nn.Module):
    """``feature=`` module for torchmetrics' IS: uint8 images -> the extractor's class logits."""

    def __init__(self, outputs: ExtractorOutputs):
        super().__init__()
        if outputs.num_classes is None:
            raise ValueError("the Inception Score needs a feature extractor that returns (features, logits)")
        self.outputs, self.num_features = outputs, outputs.num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.outputs(images)[1]


@torch.no_grad()
def feature_widths(extractor: torch.nn.Module) -> tuple[int, int | None]:
    """``(pool feature width, number of classes or None)``: the extractor's ``num_features`` / ``num_classes``
    attributes, else one probe on a blank 64 px uint8 image (torchmetrics would probe at 299 px)."""
    width = getattr(extractor, "num_features", None)
    if isinstance(width, int):
        return width, getattr(extractor, "num_classes", None)
    device = next((p.device for p in extractor.parameters()), torch.device("cpu"))
    feats, logits = split_features(extractor(torch.zeros(1, 3, 64, 64, dtype=torch.uint8, device=device)))
    return feats.reshape(1, -1).shape[1], (logits.reshape(1, -1).shape[1] if logits is not None else None)


def fid_metric(feature: torch.nn.Module) -> FrechetInceptionDistance:
    """torchmetrics' FID over ``feature`` (uint8 images in, as our extractors take them); real state kept on reset."""
    return FrechetInceptionDistance(feature=feature, reset_real_features=False, normalize=False, **_metric_kwargs())


def kid_metric(feature: torch.nn.Module, subsets: int = 100, subset_size: int = 1000) -> KernelInceptionDistance:
    """torchmetrics' KID (cubic polynomial kernel; ``subsets`` subsets of ``subset_size``, capped at the set sizes)."""
    return _quiet(
        KernelInceptionDistance,
        feature=feature,
        subsets=subsets,
        subset_size=subset_size,
        reset_real_features=False,
        normalize=False,
        **_metric_kwargs(),
    )


class TorchFidelityInceptionScore(InceptionScore):
    """torchmetrics' Inception Score with torch-fidelity's conventions: the rows are shuffled with
    ``np.random.RandomState(seed)`` (2020) instead of ``torch.randperm``, and ``std`` is the population std
    (``np.std``) over the splits. torchmetrics' own shuffle is undone by seeding it: its math is kept as is.

    Splits are ``torch.chunk``'s: equal to torch-fidelity's ``i * N // splits`` boundaries when ``splits`` divides
    ``N`` (30,000 / 10 in the paper); otherwise chunks of ``ceil(N / splits)`` (and possibly fewer of them).
    Logits are float64 here: a class probability underflows to 0 (and the score to NaN, as in torchmetrics) only
    for logit gaps above ~745.
    """

    def __init__(self, feature: torch.nn.Module, splits: int = 10, seed: int = 2020, shuffle: bool = True, **kwargs):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
            super().__init__(feature=feature, splits=splits, normalize=False, **{**_metric_kwargs(), **kwargs})
        self.seed, self.shuffle = seed, shuffle

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        logits = dim_zero_cat(self.features)
        n = logits.shape[0]
        if not 1 <= self.splits <= n:
            raise ValueError(f"splits={self.splits} needs 1..{n} (the number of images)")
        order = np.random.RandomState(self.seed).permutation(n) if self.shuffle else np.arange(n)
        order = torch.as_tensor(order, device=logits.device)
        saved = self.features
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            theirs = torch.randperm(n)  # the permutation InceptionScore.compute will draw after the same seed
            arranged = torch.empty_like(logits)
            arranged[theirs.to(logits.device)] = logits[order]  # so that arranged[theirs] == logits[order]
            self.features = [arranged]
            try:
                torch.manual_seed(0)
                with warnings.catch_warnings():  # one split: torch's std() of one value warns (and is NaN)
                    warnings.filterwarnings("ignore", message=".*degrees of freedom.*")
                    mean, std = super().compute()
            finally:
                self.features = saved
        chunks = len(torch.arange(n).chunk(self.splits))
        std = std * ((chunks - 1) / chunks) ** 0.5 if chunks > 1 else torch.zeros_like(std)
        return mean, std


def _seeded(compute, seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return compute()


class ImageMetrics:
    """torchmetrics' FID, IS and (optionally) KID over one image feature extractor, run once per batch.

    ``update(images, real=False)`` with uint8 batches ``(N, 3, H, W)``: generated images feed FID's fake side, IS
    and KID's fake side; real images feed FID's real side (unless reference statistics were loaded with
    :meth:`load_reference`) and KID's real side. ``kid=True`` keeps every pool feature for KID (memory N x D).
    The metrics live on the extractor's device, their states in float64.
    """

    def __init__(
        self,
        extractor: torch.nn.Module,
        *,
        inception_score: bool = True,
        kid: bool = False,
        is_splits: int = 10,
        kid_subsets: int = 100,
        kid_subset_size: int = 1000,
        kid_seed: int = 0,
    ):
        self.outputs = ExtractorOutputs(extractor)
        device = self.outputs.device
        self.fid = fid_metric(PoolFeatures(self.outputs)).to(device)
        with_is = inception_score and self.outputs.num_classes is not None
        self.inception = (
            TorchFidelityInceptionScore(ClassLogits(self.outputs), is_splits).to(device) if with_is else None
        )
        self.kid = kid_metric(PoolFeatures(self.outputs), kid_subsets, kid_subset_size).to(device) if kid else None
        self.is_splits, self.kid_subset_size, self.kid_seed = is_splits, kid_subset_size, kid_seed
        self.reference: FeatureStats | None = None

    def load_reference(self, stats: FeatureStats | str | Path | tuple) -> FeatureStats:
        """FID's real side from precomputed statistics: a :class:`FeatureStats`, an ``.npz`` or ``(mu, sigma[, n])``."""
        if isinstance(stats, (str, Path)):
            stats = FeatureStats.load(stats)
        elif not isinstance(stats, FeatureStats):
            stats = FeatureStats(*stats)
        stats.load_into(self.fid, real=True)
        self.reference = stats
        return stats

    @torch.no_grad()
    def update(self, images: torch.Tensor, real: bool = False) -> None:
        try:
            if not real or self.reference is None:
                self.fid.update(images, real=real)
            if self.kid is not None:
                self.kid.update(images, real=real)
            if not real and self.inception is not None:
                self.inception.update(images)
        finally:
            self.outputs.clear()

    @property
    def num_generated(self) -> int:
        return int(self.fid.fake_features_num_samples)

    @property
    def num_real(self) -> int:
        return int(self.fid.real_features_num_samples) if self.reference is None else (self.reference.n or 0)

    def generated_stats(self) -> FeatureStats:
        return FeatureStats.of_metric(self.fid, real=False)

    def real_stats(self) -> FeatureStats:
        return FeatureStats.of_metric(self.fid, real=True)

    def logits(self) -> torch.Tensor | None:
        if self.inception is None or not self.inception.features:
            return None
        return dim_zero_cat(self.inception.features).cpu()

    def compute(self) -> dict[str, float | int | None]:
        """``fid`` (with a reference or real images), ``is``/``is_std`` (with logits), ``kid``/``kid_std`` (with real
        images); ``None`` where a metric cannot be computed."""
        out: dict[str, float | int | None] = {"fid": None, "is": None, "is_std": None, "kid": None, "kid_std": None}
        n_fake = self.num_generated
        has_real = self.reference is not None or int(self.fid.real_features_num_samples) >= 2
        if has_real and n_fake >= 2:
            out["fid"] = float(self.fid.compute())
        if self.inception is not None and n_fake:
            self.inception.splits = min(self.is_splits, n_fake)
            mean, std = self.inception.compute()
            out["is"], out["is_std"], out["is_splits"] = float(mean), float(std), self.inception.splits
        if self.kid is not None and self.kid.real_features and self.kid.fake_features:
            n_real = sum(len(f) for f in self.kid.real_features)
            self.kid.subset_size = min(self.kid_subset_size, n_real, n_fake)
            if self.kid.subset_size >= 2:
                mean, std = _seeded(self.kid.compute, self.kid_seed)
                out["kid"], out["kid_std"], out["kid_subset_size"] = float(mean), float(std), self.kid.subset_size
        return out


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The FID of two Gaussians, ``|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr sqrt(s1 s2)``, by torchmetrics' FID
    (float64) with the two sets of statistics loaded into its state."""
    first, second = FeatureStats(mu1, sigma1), FeatureStats(mu2, sigma2)
    if first.dim != second.dim:
        raise ValueError(f"statistics do not match: {first.dim}-d features vs {second.dim}-d")
    fid = fid_metric(Features(first.dim))
    fid.update(torch.empty(0, first.dim, dtype=torch.float64), real=False)  # no samples: sets the result dtype
    second.load_into(fid, real=True)
    first.load_into(fid, real=False)
    return float(fid.compute())


def kernel_inception_distance(
    real_features, fake_features, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID (mean, std over ``subsets`` random subsets) of two feature sets ``(N, D)``, by torchmetrics' KID;
    ``subset_size`` is capped at the smaller set. Needs the features themselves: mean and covariance do not do."""
    real, fake = _as_tensor(real_features), _as_tensor(fake_features)
    kid = kid_metric(Features(real.shape[1]), subsets, min(subset_size, len(real), len(fake)))
    kid.update(real, real=True)
    kid.update(fake, real=False)
    mean, std = _seeded(kid.compute, seed)
    return float(mean), float(std)


def inception_score(
    logits_or_probs, splits: int = 10, *, probs: bool | None = None, shuffle: bool = True, seed: int = 2020
) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))`` of class logits ``(N, C)`` (torch-fidelity uses the
    Inception's ``logits_unbiased``) or probabilities, by :class:`TorchFidelityInceptionScore`: mean and std over
    ``splits`` chunks. ``probs=None`` takes rows of non-negative numbers summing to 1 as probabilities."""
    x = _as_tensor(logits_or_probs).to("cpu", torch.float64)
    if x.ndim != 2:
        raise ValueError(f"expected (N, classes), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if probs is None:
        probs = bool((x >= 0).all()) and torch.allclose(x.sum(1), torch.ones(n, dtype=x.dtype), atol=1e-4)
    if probs:  # softmax(log p) = p
        x = torch.log((x / x.sum(1, keepdim=True)).clamp_min(1e-300))
    metric = TorchFidelityInceptionScore(Features(x.shape[1]), splits=splits, seed=seed, shuffle=shuffle)
    metric.update(x)
    mean, std = metric.compute()
    return float(mean), float(std)


# ---- CLIP score --------------------------------------------------------------------------------------
# Own code, not torchmetrics' CLIPScore: in torchmetrics 1.9 it fails with transformers 5, whose get_*_features
# return an output object, not a tensor.
def cosine_similarities(image_embeds, text_embeds) -> torch.Tensor:
    """Per-pair cosine similarity of L2-normalised image and text embeddings (float64)."""
    a = torch.as_tensor(image_embeds).detach().to("cpu", torch.float64)
    b = torch.as_tensor(text_embeds).detach().to("cpu", torch.float64)
    if a.shape != b.shape:
        raise ValueError(f"image embeddings {tuple(a.shape)} and text embeddings {tuple(b.shape)} do not pair up")
    a = a / a.norm(dim=-1, keepdim=True)
    b = b / b.norm(dim=-1, keepdim=True)
    return (a * b).sum(-1)


def clip_score(image_embeds, text_embeds) -> float:
    """The paper's CLIP score: mean cosine similarity of paired image and text embeddings (no x100, no clipping)."""
    return float(cosine_similarities(image_embeds, text_embeds).mean())


# ---- images -> tensors -------------------------------------------------------------------------------
def resize_image(image: Image.Image, size: int | None) -> Image.Image:
    """RGB, squashed to ``size`` x ``size`` with PIL bicubic (the paper's 512 -> 256 step); None keeps the size."""
    image = image.convert("RGB")
    if size and image.size != (size, size):
        image = image.resize((size, size), Image.BICUBIC)
    return image


def to_uint8_batch(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> uint8 tensor ``(N, 3, H, W)``."""
    arrays = [np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def split_features(output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(pool features, logits or None)`` of a feature extractor's output (a tensor, tuple or dict)."""
    if isinstance(output, torch.Tensor):
        return output, None
    if isinstance(output, dict):
        return output["features"], output.get("logits")
    if isinstance(output, (tuple, list)):
        return output[0], (output[1] if len(output) > 1 else None)
    raise TypeError(f"a feature extractor returned {type(output).__name__}; expected a tensor or (features, logits)")


@torch.no_grad()
def extract_features(extractor: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run ``extractor`` on a uint8 batch on its own device; features (and logits) come back on the CPU."""
    device = next((p.device for p in extractor.parameters()), torch.device("cpu"))
    feats, logits = split_features(extractor(images.to(device)))
    feats = feats.reshape(feats.shape[0], -1).float().cpu()
    return feats, (logits.reshape(logits.shape[0], -1).float().cpu() if logits is not None else None)


# ---- feature extractors ------------------------------------------------------------------------------
class InceptionExtractor(torch.nn.Module):
    """torch-fidelity's InceptionV3 (``inception-v3-compat``, the TF FID network): uint8 images of any size ->
    ``(2048-d pool3 features, 1008 unbiased logits)``, as torch-fidelity's FID and IS use them. Passed to
    torchmetrics through :class:`ImageMetrics` rather than torchmetrics' own ``feature=2048`` Inception, whose
    default resize (antialiased bilinear) is not torch-fidelity's TF1-compatible one."""

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        fidelity = _require("torch_fidelity", "The default Inception feature extractor (FID, IS)")
        self.net = fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights_path
        )
        self.net.eval()
        self.name = "inception-v3-compat (torch-fidelity)"
        self.num_features, self.num_classes = 2048, 1008

    def forward(self, images: torch.Tensor):
        if images.dtype != torch.uint8:
            images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        features, logits = self.net(images)
        return features, logits


def inception_extractor(weights_path: str | None = None) -> InceptionExtractor:
    """The paper's FID/IS network (torch-fidelity; the weights are downloaded once to the torch hub cache)."""
    return InceptionExtractor(weights_path)


DEMO_EXTRACTOR = {"channels": [8, 16, 32], "num_classes": 10, "logit_scale": 20.0, "seed": 0}


class DemoExtractor(torch.nn.Module):
    """A tiny random conv net standing in for the Inception: uint8 images -> (features, logits). Smoke tests only."""

    def __init__(
        self, channels: Sequence[int] = (8, 16, 32), num_classes: int = 10, logit_scale: float = 20.0, seed: int = 0
    ):
        super().__init__()
        self.logit_scale = logit_scale
        self.num_features, self.num_classes = int(channels[-1]), int(num_classes)
        layers, c_in = [], 3
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for c in channels:
                layers += [torch.nn.Conv2d(c_in, c, 3, stride=2, padding=1), torch.nn.SiLU()]
                c_in = c
            self.body = torch.nn.Sequential(*layers, torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
            self.head = torch.nn.Linear(c_in, num_classes)
        self.name = f"demo (random conv net {list(channels)}, seed {seed}; meaningless numbers)"
        self.eval()

    def forward(self, images: torch.Tensor):
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        features = self.body(x * 2 - 1)
        return features, self.head(features) * self.logit_scale


def demo_extractor(config: dict | None = None) -> DemoExtractor:
    return DemoExtractor(**{**DEMO_EXTRACTOR, **(config or {})})


# ---- CLIP models -------------------------------------------------------------------------------------
class ClipModel(torch.nn.Module):
    """Interface: ``encode_images(PIL images)`` and ``encode_texts(strings)`` -> embeddings ``(N, D)``."""

    name = "clip"

    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        raise NotImplementedError

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next((p.device for p in self.parameters()), torch.device("cpu"))


def _embeds(output: Any) -> torch.Tensor:
    """transformers <5 returns a tensor from ``get_*_features``; 5 an output object whose pooler_output it is."""
    if isinstance(output, torch.Tensor):
        return output
    for key in ("image_embeds", "text_embeds", "pooler_output"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"cannot find embeddings in a {type(output).__name__}")


def clip_preprocess(images: Sequence[Image.Image], size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """CLIP's image preprocessing without torchvision: shorter side to ``size`` (bicubic), centre crop, normalise."""
    out = []
    for image in images:
        image = image.convert("RGB")
        w, h = image.size
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - size) // 2, (nh - size) // 2
        out.append(image.crop((left, top, left + size, top + size)))
    x = to_uint8_batch(out).float() / 255
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


class TransformersClip(ClipModel):
    """A ``transformers.CLIPModel`` with its tokenizer; the image preprocessing of :func:`clip_preprocess`."""

    def __init__(self, model, tokenizer, image_size: int | None = None, mean=CLIP_MEAN, std=CLIP_STD, name=None):
        super().__init__()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.image_size = image_size or model.config.vision_config.image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.name = name or "transformers CLIP"

    @torch.no_grad()
    def encode_images(self, images):
        pixels = clip_preprocess(images, self.image_size, self.mean, self.std).to(self.device, self.model.dtype)
        return _embeds(self.model.get_image_features(pixel_values=pixels)).float()

    @torch.no_grad()
    def encode_texts(self, texts):
        max_len = self.model.config.text_config.max_position_embeddings
        tokens = self.tokenizer(
            list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt"
        )
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return _embeds(self.model.get_text_features(**tokens)).float()


def transformers_clip(model_id: str, **kwargs) -> TransformersClip:
    """Any transformers CLIP (hub id or folder), e.g. ``openai/clip-vit-large-patch14``."""
    import json

    from transformers import CLIPModel, CLIPTokenizer
    from transformers.utils import cached_file

    model = CLIPModel.from_pretrained(model_id, **kwargs)
    tokenizer = CLIPTokenizer.from_pretrained(model_id, **kwargs)
    mean, std, size = CLIP_MEAN, CLIP_STD, None
    try:
        cfg = json.loads(Path(cached_file(model_id, "preprocessor_config.json", **kwargs)).read_text())
        mean, std = cfg.get("image_mean", mean), cfg.get("image_std", std)
        crop = cfg.get("crop_size")
        size = crop.get("height") if isinstance(crop, dict) else crop
    except Exception:  # no preprocessor config: OpenAI CLIP defaults
        pass
    return TransformersClip(model, tokenizer, size, mean, std, name=f"transformers:{model_id}")


class OpenClip(ClipModel):
    """An open_clip model with its own preprocessing and tokenizer."""

    def __init__(self, model, preprocess, tokenizer, name: str):
        super().__init__()
        self.model, self.preprocess, self.tokenizer, self.name = model.eval(), preprocess, tokenizer, name

    @torch.no_grad()
    def encode_images(self, images):
        pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images]).to(self.device)
        return self.model.encode_image(pixels).float()

    @torch.no_grad()
    def encode_texts(self, texts):
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float()


# The paper's CLIP-score model as a `clip=` spec (open_clip:NAME:PRETRAINED); a bare `clip=open_clip` names it.
PAPER_CLIP = "open_clip:ViT-g-14:laion2b_s34b_b88k"


def open_clip_model(name: str | None = None, pretrained: str | None = None) -> OpenClip:
    """An open_clip model; without a name, the paper's (:data:`PAPER_CLIP`)."""
    if name is None:
        _, name, pretrained = PAPER_CLIP.split(":")
    open_clip = _require("open_clip", f"The CLIP score with open_clip {name}/{pretrained}")
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained)
    return OpenClip(model, preprocess, open_clip.get_tokenizer(name), name=f"open_clip:{name}:{pretrained}")


DEMO_CLIP = {
    "text_config": {
        "vocab_size": 514,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "max_position_embeddings": 77,
        "bos_token_id": 512,
        "eos_token_id": 513,
        "pad_token_id": 513,
    },
    "vision_config": {
        "image_size": 32,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
    },
    "projection_dim": 16,
}


def demo_clip(config: dict | None = None, seed: int = 0) -> TransformersClip:
    """A tiny random ``transformers.CLIPModel`` with the demo's byte-level tokenizer. Smoke tests only."""
    from transformers import CLIPConfig, CLIPModel

    from bksdm_lab.models.demo import byte_level_tokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(**(config or DEMO_CLIP)))
    return TransformersClip(model, byte_level_tokenizer(), name=f"demo (random tiny CLIP, seed {seed}; meaningless)")


def clip_from_spec(spec: str) -> ClipModel:
    """``demo``, ``open_clip[:NAME[:PRETRAINED]]`` or ``transformers:MODEL_ID_OR_PATH`` (alias ``hf:``)."""
    kind, _, rest = spec.partition(":")
    if kind == "demo":
        return demo_clip()
    if kind == "open_clip":
        name, _, pretrained = rest.partition(":")
        if name and not pretrained:
            raise ValueError(f"CLIP {spec!r}: name the weights too, open_clip:{name}:PRETRAINED")
        return open_clip_model(name or None, pretrained or None)
    if kind in ("transformers", "hf") and rest:
        return transformers_clip(rest)
    raise ValueError(f"unknown CLIP {spec!r}: use demo, open_clip[:NAME[:PRETRAINED]] or transformers:MODEL_ID")


def check_available(feature_extractor: str | None = None, clip: str | None = None) -> None:
    """Fail fast (before hours of generation) if a named metric model is unknown or its package is missing."""
    if feature_extractor not in (None, "inception", "demo"):
        raise ValueError(f"unknown feature extractor {feature_extractor!r}: use inception or demo")
    if feature_extractor == "inception":
        _require("torch_fidelity", "The default Inception feature extractor (FID, IS)")
    if clip is not None and clip not in ("none", "demo"):
        kind = clip.partition(":")[0]
        if kind == "open_clip":
            _require("open_clip", f"The CLIP score with {clip}")
        elif kind not in ("transformers", "hf") or not clip.partition(":")[2]:
            raise ValueError(f"unknown CLIP {clip!r}: use demo, open_clip[:NAME:PRETRAINED] or transformers:MODEL_ID")


def extractor_from_spec(spec: str) -> torch.nn.Module:
    """``inception`` (torch-fidelity, the paper's) or ``demo`` (tiny random conv net)."""
    if spec == "inception":
        return inception_extractor()
    if spec == "demo":
        return demo_extractor()
    raise ValueError(f"unknown feature extractor {spec!r}: use inception or demo")
