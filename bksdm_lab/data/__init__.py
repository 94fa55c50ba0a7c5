"""Captioned-image data: the Hugging Face imagefolder layout used by the LAION-Aesthetics subsets.

A folder of images plus ``metadata.csv`` (or ``metadata.jsonl``) with a ``file_name`` column and a
caption column (``text``). Images are resized (shorter side), center-cropped, randomly flipped and
normalised to [-1, 1]; captions are tokenised to the tokenizer's length (77 for SD).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

log = logging.getLogger(__name__)

METADATA_FILES = ("metadata.csv", "metadata.jsonl")


class DataError(ValueError):
    """The data folder or its metadata is not usable; the message says what was found."""


def check_folder(root: str | Path, caption_column: str = "text", image_column: str = "file_name") -> Path:
    """Fail fast on a missing folder or metadata, listing what was found instead."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"data.root={str(root)!r} does not exist. Download a LAION-Aesthetics subset there (see README.md, "
            f"'Data'), point `data.root=/path/to/folder` at an image folder with metadata.csv, or run the offline "
            f"demo: `python -m bksdm_lab.train experiment=demo`."
        )
    if not any((root / m).is_file() for m in METADATA_FILES):
        found = sorted(p.name for p in root.iterdir())[:10]
        raise DataError(f"data.root={str(root)!r} has no {' or '.join(METADATA_FILES)}; found: {found}")
    return root


def read_metadata(root: Path, caption_column: str = "text", image_column: str = "file_name") -> list[tuple[str, str]]:
    path = next(root / m for m in METADATA_FILES if (root / m).is_file())
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    columns = list(rows[0]) if rows else []
    for column, key in ((image_column, "data.image_column"), (caption_column, "data.caption_column")):
        if rows and column not in rows[0]:
            raise DataError(f"{path} has no {column!r} column ({key}); columns found: {columns}")
    return [(r[image_column], r[caption_column]) for r in rows]


SKIP_REASONS = ("missing", "corrupt", "bomb", "caption", "small")
CONVERT_REASONS = ("mode", "16bit", "alpha", "small")


def to_rgb(image: Image.Image) -> tuple[Image.Image, list[str]]:
    """8-bit RGB from any PIL mode; returns the image and what was converted (``alpha``, ``16bit``, ``mode``)."""
    converted = []
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit / 32-bit grayscale: scale, don't clip
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        converted.append("16bit")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))  # transparent -> white, not black
        image = Image.alpha_composite(background, rgba)
        converted.append("alpha")
    if image.mode != "RGB":
        if image.mode not in ("RGBA",) and "16bit" not in converted:
            converted.append("mode")  # CMYK, grayscale, palette, YCbCr, ...
        image = image.convert("RGB")
    return image, converted


def image_to_tensor(image: Image.Image, resolution: int, flip: bool) -> torch.Tensor:
    """Resize the shorter side to ``resolution``, center-crop, optionally flip, scale to [-1, 1], CHW."""
    image, _ = to_rgb(image)
    w, h = image.size
    scale = resolution / min(w, h)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    image = image.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class BadSample(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def load_image(
    source: str | Path | bytes | Image.Image, resolution: int, flip: bool, small: str, max_pixels: int, name: str = ""
) -> tuple[torch.Tensor, list[str]]:
    """Open, verify and transform one image (a path, encoded bytes or a PIL image); raises BadSample(reason)
    for what cannot be used, and returns the tensor and what was converted."""
    name = name or str(source if isinstance(source, str | Path) else "<image>")
    if isinstance(source, str | Path) and not Path(source).is_file():
        raise BadSample("missing", f"{source} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if isinstance(source, Image.Image):
                image = source
            else:
                image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            with image:
                if image.width * image.height > max_pixels:
                    raise BadSample("bomb", f"{name}: {image.width}x{image.height} pixels > data.max_pixels")
                image.load()  # decode now: truncated files fail here
                rgb, converted = to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadSample("bomb", f"{name}: {err}") from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL's UnidentifiedImageError is an OSError
        raise BadSample("corrupt", f"{name}: {err}") from None
    if min(rgb.size) < resolution:
        if small == "skip":
            raise BadSample("small", f"{name}: {rgb.size[0]}x{rgb.size[1]} < {resolution}")
        converted.append("small")  # upscaled by the resize below
    return image_to_tensor(rgb, resolution, flip), converted


def check_caption(caption, name: str) -> str:
    if not isinstance(caption, str) or not caption.strip():
        raise BadSample("caption", f"{name}: caption {caption!r} is empty or not text")
    return caption


def finish_sample(index: int, tokenizer, read) -> dict:
    """The sample dict every format yields: ``read() -> (caption, pixels, converted)`` is run, a BadSample it
    raises becomes ``{"skipped": reason, "index"}`` (counted by :func:`collate`), and the caption is tokenised."""
    try:
        caption, pixels, converted = read()
    except BadSample as bad:
        log.warning("skipping sample %s (%s): %s", index, bad.reason, bad)
        return {"skipped": bad.reason, "index": index}
    ids = tokenizer(
        caption, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids[0]
    return {"pixel_values": pixels, "input_ids": ids, "index": index, "converted": converted}


class ImageCaptionFolder(Dataset):
    """An image folder with metadata; yields ``pixel_values``, ``input_ids`` and ``index``.

    A sample that cannot be used yields ``{"skipped": reason}`` instead of raising: the collate function
    drops it and counts it, so a bad file never kills a run and is never silently lost. Images smaller than
    the resolution are upscaled (``small_images: upscale``) or skipped (``skip``); odd modes (CMYK, RGBA,
    grayscale, 16-bit) are converted to 8-bit RGB and counted.
    """

    def __init__(
        self,
        root,
        tokenizer,
        resolution: int,
        random_flip: bool = True,
        caption_column: str = "text",
        image_column: str = "file_name",
        max_samples: int | None = None,
        small_images: str = "upscale",
        max_pixels: int = 16384 * 16384,
    ):
        if small_images not in ("upscale", "skip"):
            raise DataError(f"data.small_images={small_images!r} is not one of: upscale, skip")
        self.root = check_folder(root, caption_column, image_column)
        self.samples = read_metadata(self.root, caption_column, image_column)[:max_samples]
        if not self.samples:
            raise DataError(f"data.root={str(self.root)!r}: the metadata lists no samples")
        self.tokenizer, self.resolution, self.random_flip = tokenizer, resolution, random_flip
        self.small_images, self.max_pixels = small_images, max_pixels

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, bool]) -> dict:
        """``item`` is an index, or ``(index, flip)`` from :class:`ResumableSampler` (flip decided there)."""
        index, flip = item if isinstance(item, tuple) else (item, random.random() < 0.5)
        file_name, caption = self.samples[index]

        def read():
            check_caption(caption, str(file_name))
            pixels, converted = load_image(
                self.root / str(file_name),
                self.resolution,
                self.random_flip and flip,
                self.small_images,
                self.max_pixels,
            )
            return caption, pixels, converted

        return finish_sample(index, self.tokenizer, read)


def collate(samples: list[dict]) -> dict:
    """Stack the good samples; count the skipped (``skipped``) and converted (``converted``) ones by reason."""
    good = [s for s in samples if "skipped" not in s]
    skipped = {r: sum(s.get("skipped") == r for s in samples) for r in SKIP_REASONS}
    converted = {r: sum(r in s.get("converted", ()) for s in good) for r in CONVERT_REASONS}
    batch = {"skipped": skipped, "converted": converted, "num_samples": len(samples)}
    if good:
        batch["pixel_values"] = torch.stack([s["pixel_values"] for s in good])
        batch["input_ids"] = torch.stack([s["input_ids"] for s in good])
        batch["index"] = torch.tensor([s["index"] for s in good])
    return batch


class ResumableSampler(Sampler):
    """Shuffles each epoch with a generator seeded by ``(seed, epoch)`` and yields ``(index, flip)``.

    The order and the flips are a function of the seed and the epoch only, so a resumed run can skip
    exactly the batches it already trained on (``resume``) and then see what an uninterrupted run sees.
    Each of ``world_size`` ranks takes every ``world_size``-th sample of the shuffled order (the tail
    that does not fill a step on every rank is dropped), so each sample is seen at most once per epoch.
    """

    def __init__(self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1, random_flip: bool = True):
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.random_flip = random_flip
        self.epoch, self._skip_epoch, self._skip = 0, -1, 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def resume(self, epoch: int, samples_done: int) -> None:
        """In epoch ``epoch``, skip the first ``samples_done`` samples of this rank."""
        self._skip_epoch, self._skip = epoch, samples_done

    def _order(self) -> tuple[list[int], list[bool]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)
        flips = (torch.rand(self.num_samples, generator=g) < 0.5) & self.random_flip
        per_rank = self.num_samples // self.world_size
        mine = slice(self.rank, per_rank * self.world_size, self.world_size)
        return order[mine].tolist(), flips[mine].tolist()

    def __iter__(self):
        order, flips = self._order()
        skip = self._skip if self.epoch == self._skip_epoch else 0
        self._skip_epoch, self._skip = -1, 0
        return iter(list(zip(order, flips))[skip:])

    def __len__(self) -> int:
        return self.num_samples // self.world_size


class FolderDataModule(pl.LightningDataModule):
    def __init__(
        self,
        root,
        tokenizer,
        resolution: int,
        batch_size: int,
        num_workers: int = 0,
        random_flip: bool = True,
        caption_column: str = "text",
        image_column: str = "file_name",
        max_samples: int | None = None,
        seed: int = 0,
        small_images: str = "upscale",
        max_pixels: int = 16384 * 16384,
    ):
        super().__init__()
        self.seed = seed
        self.dataset = ImageCaptionFolder(
            root,
            tokenizer,
            resolution,
            random_flip,
            caption_column,
            image_column,
            max_samples,
            small_images,
            max_pixels,
        )
        self.batch_size, self.num_workers = batch_size, num_workers

    def train_dataloader(self) -> DataLoader:
        return resumable_loader(self, self.dataset, collate)


def resumable_loader(datamodule: pl.LightningDataModule, dataset: Dataset, collate_fn, random_flip: bool = True):
    """A DataLoader over a map-style dataset with :class:`ResumableSampler`: sharded by the trainer's rank, and
    started where a resumed checkpoint stopped (``lightning_module.resume_position``)."""
    trainer = datamodule.trainer
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    sampler = ResumableSampler(len(dataset), seed=datamodule.seed, rank=rank, world_size=world, random_flip=random_flip)
    position = getattr(trainer.lightning_module, "resume_position", None) if trainer is not None else None
    if position:  # a resumed run: skip what the checkpointed run already trained on in this epoch
        sampler.resume(position["epoch"], position["batches"] * datamodule.batch_size)
    return DataLoader(
        dataset,
        batch_size=datamodule.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_fn,
        num_workers=datamodule.num_workers,
        persistent_workers=datamodule.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(datamodule.seed),  # worker seeds do not consume the global RNG
    )
