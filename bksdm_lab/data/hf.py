"""A Hugging Face ``datasets`` dataset of images and captions, by hub name or local path (``data=hf``).

Map-style, so it shares the folder set's resumable sampler and sample dicts. ``datasets.Image`` columns are decoded
here, not by ``datasets``, so that corrupt files and decompression bombs are counted instead of raised.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path

from torch.utils.data import Dataset

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

SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


def check_local_path(path) -> None:
    """A ``data.path`` written as a local path (``/``, ``~``, ``.``) exists and holds files (a saved dataset or data
    files), else a DataError; a hub name is looked up when loaded."""
    text = str(path)
    local = Path(text).expanduser()
    if not text.startswith(("/", "~", ".")):
        return
    if not local.exists():
        raise DataError(f"data.path={text!r} does not exist: give a local dataset folder or data files, or a hub name")
    if local.is_dir() and not any(p.is_file() for p in local.rglob("*")):
        raise DataError(f"data.path={text!r} is an empty folder: no saved dataset or data files in it")


def load_hf_dataset(path: str, name: str | None = None, split: str = "train", **kwargs):
    """``load_from_disk`` for a saved dataset folder, else ``load_dataset(path, name, split=split)``."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - a default dependency
        raise DataError("data=hf needs the `datasets` package: pip install datasets") from err
    check_local_path(path)
    local = Path(str(path)).expanduser()
    try:
        if local.is_dir() and any((local / m).is_file() for m in SAVED_MARKERS):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(f"data.path={path!r} has no split {split!r} (data.split); splits: {list(ds)}")
                ds = ds[split]
            return ds
        return datasets.load_dataset(str(path), name, split=split, **kwargs)
    except DataError:
        raise
    except (FileNotFoundError, ValueError, OSError) as err:  # missing path / hub name (offline), bad split, ...
        raise DataError(f"data=hf cannot load data.path={path!r} (name={name!r}, split={split!r}): {err}") from None


class HFImageCaption(Dataset):
    """A ``datasets.Dataset``'s image and caption columns as training samples (like ImageCaptionFolder)."""

    def __init__(
        self,
        path: str,
        tokenizer,
        resolution: int,
        name: str | None = None,
        split: str = "train",
        image_column: str = "image",
        caption_column: str = "text",
        random_flip: bool = True,
        max_samples: int | None = None,
        small_images: str = "upscale",
        max_pixels: int = 16384 * 16384,
    ):
        import datasets

        if small_images not in ("upscale", "skip"):
            raise DataError(f"data.small_images={small_images!r} is not one of: upscale, skip")
        ds = load_hf_dataset(path, name, split)
        columns = list(ds.column_names)
        for column, key in ((image_column, "data.image_column"), (caption_column, "data.caption_column")):
            if column not in columns:
                raise DataError(f"data.path={path!r} has no {column!r} column ({key}); columns found: {columns}")
        ds = ds.select_columns([image_column, caption_column])
        if isinstance(ds.features[image_column], datasets.Image) and ds.features[image_column].decode:
            ds = ds.cast_column(image_column, datasets.Image(decode=False))  # {"bytes", "path"}: we decode
        if max_samples is not None:
            ds = ds.select(range(min(max_samples, len(ds))))
        if len(ds) == 0:
            raise DataError(f"data.path={path!r} split {split!r} has no samples")
        self.data, self.path = ds, str(path)
        self.image_column, self.caption_column = image_column, caption_column
        self.tokenizer, self.resolution, self.random_flip = tokenizer, resolution, random_flip
        self.small_images, self.max_pixels = small_images, max_pixels

    def __len__(self) -> int:
        return len(self.data)

    def _image_source(self, value, index: int):
        """What load_image takes: bytes, a path or a PIL image, from any form the column holds."""
        if isinstance(value, dict):
            if value.get("bytes"):
                return value["bytes"]
            if value.get("path"):
                return Path(value["path"])
            raise BadSample("missing", f"row {index}: image {value!r} has neither bytes nor a path")
        if value is None:
            raise BadSample("missing", f"row {index}: no image")
        if isinstance(value, str):
            return Path(value)
        return value  # bytes or a PIL image

    def __getitem__(self, item: int | tuple[int, bool]) -> dict:
        """``item`` is an index, or ``(index, flip)`` from :class:`ResumableSampler` (flip decided there)."""
        index, flip = item if isinstance(item, tuple) else (item, random.random() < 0.5)
        row = self.data[index]

        def read():
            caption = check_caption(row[self.caption_column], f"row {index}")
            pixels, converted = load_image(
                self._image_source(row[self.image_column], index),
                self.resolution,
                self.random_flip and flip,
                self.small_images,
                self.max_pixels,
                name=f"{self.path}[{index}]",
            )
            return caption, pixels, converted

        return finish_sample(index, self.tokenizer, read)


class HFDataModule(CaptionDataModule):
    """The folder set's sharded, resumable ``train_dataloader`` over an :class:`HFImageCaption` set."""

    def __init__(
        self,
        path: str,
        tokenizer,
        resolution: int,
        batch_size: int,
        name: str | None = None,
        split: str = "train",
        image_column: str = "image",
        caption_column: str = "text",
        max_samples: int | None = None,
        small_images: str = "upscale",
        max_pixels: int = 16384 * 16384,
        **shared,
    ):
        super().__init__(tokenizer, resolution, batch_size, **shared)
        self.dataset = HFImageCaption(
            path,
            tokenizer,
            resolution,
            name=name,
            split=split,
            image_column=image_column,
            caption_column=caption_column,
            random_flip=self.random_flip,
            max_samples=max_samples,
            small_images=small_images,
            max_pixels=max_pixels,
        )
        # the last val_samples samples are held out: never trained on, served by val_dataloader
        self.val_samples = check_val_samples(self.val_samples, len(self.dataset), f"data.path={path!r}")

    def train_dataloader(self):
        train = TrainPart(self.dataset, len(self.dataset) - self.val_samples)
        return resumable_loader(self, train, collate, random_flip=self.random_flip)

    def val_dataloader(self):
        return held_out_loader(self, self.dataset, collate, self.val_samples)
