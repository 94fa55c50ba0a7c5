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
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from bksdm_lab.data.common import (
    BadSample,
    CaptionDataModule,
    DataError,
    check_caption,
    collate,
    finish_sample,
    load_image,
    resumable_loader,
)
from bksdm_lab.data.split import TrainPart, check_val_samples, held_out_loader

log = logging.getLogger(__name__)

METADATA_FILES = ("metadata.csv", "metadata.jsonl")


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
    try:
        text = path.read_bytes().decode("utf-8-sig")  # a BOM (Excel's "CSV UTF-8") is not part of the header
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(
            f"{path} is not UTF-8 text: byte 0x{err.object[err.start]:02x} on line {line} cannot be decoded "
            f"({err.reason}); save it as UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed.csv`)"
        ) from None
    if path.suffix == ".csv":
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    else:
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            try:
                row = json.loads(line) if line.strip() else None
            except json.JSONDecodeError as err:
                raise DataError(f"{path}, line {n}: not a JSON object ({err.msg})") from None
            if row is not None:
                if not isinstance(row, dict):
                    raise DataError(f"{path}, line {n}: not a JSON object")
                rows.append(row)
    columns = list(rows[0]) if rows else []
    for column, key in ((image_column, "data.image_column"), (caption_column, "data.caption_column")):
        if rows and column not in rows[0]:
            raise DataError(f"{path} has no {column!r} column ({key}); columns found: {columns}")
    return [(r[image_column], r[caption_column]) for r in rows]


def outside_root(root: Path, file_name) -> Path | None:
    """Where a metadata entry resolves when that is outside ``root`` (resolved: ``../``, an absolute path, a symlink
    out of it), else None."""
    path = (root / str(file_name)).resolve()
    return None if path.is_relative_to(root.resolve()) else path


class ImageCaptionFolder(Dataset):
    """An image folder with metadata; yields ``pixel_values``, ``input_ids`` and ``index``.

    A sample that cannot be used yields ``{"skipped": reason}`` instead of raising: the collate function
    drops it and counts it, so a bad file never kills a run and is never silently lost. Images smaller than
    the resolution are upscaled (``small_images: upscale``) or skipped (``skip``); odd modes (CMYK, RGBA,
    grayscale, 16-bit) are converted to 8-bit RGB and counted. An entry that resolves outside ``root`` is skipped
    and counted (``outside``) unless ``allow_outside_root``.
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
        allow_outside_root: bool = False,
    ):
        if small_images not in ("upscale", "skip"):
            raise DataError(f"data.small_images={small_images!r} is not one of: upscale, skip")
        self.root = check_folder(root, caption_column, image_column)
        self.allow_outside_root = allow_outside_root
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
            outside = None if self.allow_outside_root else outside_root(self.root, file_name)
            if outside is not None:
                raise BadSample(
                    "outside", f"{file_name} is {outside}, outside data.root (data.allow_outside_root=true reads it)"
                )
            pixels, converted = load_image(
                self.root / str(file_name),
                self.resolution,
                self.random_flip and flip,
                self.small_images,
                self.max_pixels,
            )
            return caption, pixels, converted

        return finish_sample(index, self.tokenizer, read)


class FolderDataModule(CaptionDataModule):
    """``data=folder``: an image folder with metadata; the shared arguments are :class:`CaptionDataModule`'s."""

    def __init__(
        self,
        root,
        tokenizer,
        resolution: int,
        batch_size: int,
        caption_column: str = "text",
        image_column: str = "file_name",
        max_samples: int | None = None,
        small_images: str = "upscale",
        max_pixels: int = 16384 * 16384,
        allow_outside_root: bool = False,
        **shared,
    ):
        super().__init__(tokenizer, resolution, batch_size, **shared)
        self.dataset = ImageCaptionFolder(
            root,
            tokenizer,
            resolution,
            self.random_flip,
            caption_column,
            image_column,
            max_samples,
            small_images,
            max_pixels,
            allow_outside_root,
        )
        # the last val_samples samples are held out: never trained on, served by val_dataloader
        self.val_samples = check_val_samples(self.val_samples, len(self.dataset), f"data.root={str(root)!r}")

    def train_dataloader(self) -> DataLoader:
        return resumable_loader(self, TrainPart(self.dataset, len(self.dataset) - self.val_samples), collate)

    def val_dataloader(self) -> DataLoader | list:
        return held_out_loader(self, self.dataset, collate, self.val_samples)
