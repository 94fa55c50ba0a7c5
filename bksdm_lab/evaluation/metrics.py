"""Image-quality metrics of the paper's protocol: FID, Inception Score, CLIP score; and the models behind them.

The metric code takes any feature extractor, so it runs offline with tiny models built from config:

- an *image feature extractor* is any ``nn.Module`` mapping images ``(N, 3, H, W)`` (uint8 0..255, or float
  0..1) to pool features ``(N, D)``, or to a tuple ``(pool features, class logits)`` (the logits give IS);
- a *CLIP model* is a :class:`ClipModel`: ``encode_images(list of PIL images)`` and ``encode_texts(list of str)``
  return embeddings with the same width.

The paper's models are built lazily and need the ``eval`` extra (``pip install -e ".[eval]"``):
:func:`inception_extractor` (torch-fidelity's InceptionV3, the FID/IS network of pytorch-fid and torch-fidelity)
and :func:`open_clip_model` (open_clip ViT-g-14 laion2b_s34b_b88k); :func:`transformers_clip` loads any
``transformers`` CLIP. :func:`demo_extractor` and :func:`demo_clip` build tiny random models for smoke tests:
their numbers are meaningless.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

EVAL_EXTRA = 'pip install -e ".[eval]"'
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP normalisation (open_clip uses the same for ViT-g-14)
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


# ---- Frechet distance -------------------------------------------------------------------------------
class FeatureStats:
    """Running mean and covariance of features, accumulated in float64 (sum and sum of outer products).

    ``sigma`` is the unbiased covariance (``np.cov(x, rowvar=False)``), as in pytorch-fid.
    """

    def __init__(self, dim: int | None = None):
        self.n = 0
        self._sum: torch.Tensor | None = None
        self._outer: torch.Tensor | None = None
        if dim is not None:
            self._init(dim)

    def _init(self, dim: int) -> None:
        self._sum = torch.zeros(dim, dtype=torch.float64)
        self._outer = torch.zeros(dim, dim, dtype=torch.float64)

    def update(self, features: torch.Tensor | np.ndarray) -> FeatureStats:
        x = torch.as_tensor(features).detach().to("cpu", torch.float64)
        if x.ndim != 2:
            x = x.reshape(x.shape[0], -1)
        if self._sum is None:
            self._init(x.shape[1])
        if x.shape[1] != self._sum.shape[0]:
            raise ValueError(f"features of width {x.shape[1]} added to statistics of width {self._sum.shape[0]}")
        self.n += x.shape[0]
        self._sum += x.sum(0)
        self._outer += x.T @ x
        return self

    @classmethod
    def from_features(cls, features) -> FeatureStats:
        return cls().update(features)

    @property
    def mu(self) -> np.ndarray:
        if not self.n:
            raise ValueError("no features were added")
        return (self._sum / self.n).numpy()

    @property
    def sigma(self) -> np.ndarray:
        if self.n < 2:
            raise ValueError(f"a covariance needs at least 2 feature vectors, got {self.n}")
        mean = self._sum / self.n
        cov = (self._outer - self.n * torch.outer(mean, mean)) / (self.n - 1)
        return ((cov + cov.T) / 2).numpy()


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix (negative round-off clipped)."""
    vals, vecs = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """``|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr sqrt(s1 s2)``, the FID of two Gaussians, in float64.

    ``tr sqrt(s1 s2)`` is taken as ``tr sqrt(sqrt(s1) s2 sqrt(s1))``: the same eigenvalues, but of a symmetric
    positive semi-definite matrix, so a symmetric eigendecomposition is exact where ``scipy.linalg.sqrtm`` of the
    non-symmetric product can return complex parts or NaNs for (near-)singular covariances.
    """
    mu1, mu2 = np.asarray(mu1, np.float64).reshape(-1), np.asarray(mu2, np.float64).reshape(-1)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    root1 = _sqrt_psd(s1)
    inner = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def save_stats(path: str | Path, mu, sigma) -> Path:
    """Write ``mu``/``sigma`` as an ``.npz`` in the pytorch-fid layout (``np.load(path)["mu"]``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:  # a file object: np.savez would otherwise append ".npz" to other suffixes
        np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
    return path


def load_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(mu, sigma)`` of a pytorch-fid / torch-fidelity style ``.npz`` (keys ``mu`` and ``sigma``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics file {str(path)!r} does not exist")
    with np.load(path) as data:
        missing = [k for k in ("mu", "sigma") if k not in data]
        if missing:
            raise ValueError(f"{path} has no {', '.join(missing)} (keys: {sorted(data.files)}); not FID statistics")
        return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)


# ---- Inception Score and CLIP score ------------------------------------------------------------------
def inception_score(
    logits_or_probs, splits: int = 10, *, probs: bool | None = None, shuffle: bool = True, seed: int = 2020
) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) || p(y)))``: mean and std over ``splits`` chunks (torch-fidelity's way).

    Input: class logits ``(N, C)`` (torch-fidelity uses the Inception's ``logits_unbiased``) or probabilities;
    ``probs=None`` takes rows of non-negative numbers summing to 1 as probabilities. As torch-fidelity, the rows
    are shuffled with ``np.random.RandomState(2020)`` before splitting (``shuffle=False`` keeps their order).
    """
    x = torch.as_tensor(logits_or_probs).detach().to("cpu", torch.float64)
    if x.ndim != 2:
        raise ValueError(f"expected (N, classes), got shape {tuple(x.shape)}")
    n = x.shape[0]
    if not 1 <= splits <= n:
        raise ValueError(f"splits={splits} needs 1..{n} (the number of images)")
    if probs is None:
        probs = bool((x >= 0).all()) and torch.allclose(x.sum(1), torch.ones(n, dtype=x.dtype), atol=1e-4)
    if shuffle:
        x = x[torch.as_tensor(np.random.RandomState(seed).permutation(n))]
    if probs:
        p = x / x.sum(1, keepdim=True)
        log_p = torch.log(p.clamp_min(1e-300))
    else:
        p, log_p = x.softmax(1), x.log_softmax(1)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_chunk, log_p_chunk = p[lo:hi], log_p[lo:hi]
        log_q = torch.log(p_chunk.mean(0, keepdim=True).clamp_min(1e-300))
        kl = (p_chunk * (log_p_chunk - log_q)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


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
    ``(2048-d pool3 features, 1008 unbiased logits)``, as torch-fidelity's FID and IS use them."""

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        fidelity = _require("torch_fidelity", "The default Inception feature extractor (FID, IS)")
        self.net = fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=weights_path
        )
        self.net.eval()
        self.name = "inception-v3-compat (torch-fidelity)"

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


def open_clip_model(name: str = "ViT-g-14", pretrained: str = "laion2b_s34b_b88k") -> OpenClip:
    """The paper's CLIP (open_clip ViT-g-14, laion2b_s34b_b88k) or any other open_clip model."""
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

    from bksdm_lab.tools.demo import byte_level_tokenizer

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
        return open_clip_model(name or "ViT-g-14", pretrained or "laion2b_s34b_b88k")
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
