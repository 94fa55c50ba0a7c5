"""Building blocks shared by every data format: the arguments every data module takes (:class:`CaptionDataModule`),
image loading and conversion, bad-sample handling, collation and the resumable, rank-sharded sampler and loader.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The data folder or its metadata is not usable; the message says what was found, in one line, also when a
    DataLoader worker raised it (torch raises it again in the main process with the worker's traceback)."""

    def __init__(self, message: str = ""):
        if message.startswith(f"Caught {type(self).__name__} in DataLoader worker"):
            message = message.rstrip().rsplit("\n", 1)[-1].partition(f"{type(self).__name__}: ")[2]
        super().__init__(message)


SKIP_REASONS = ("missing", "corrupt", "bomb", "caption", "small", "outside")
CONVERT_REASONS = ("mode", "16bit", "alpha", "small")


def build_datamodule(data_cfg, tokenizer) -> pl.LightningDataModule:
    """``instantiate(data_cfg)``; a DataError the data module raises stays itself (one line, exit 2), where Hydra
    would wrap it."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(data_cfg, tokenizer=tokenizer)
    except InstantiationException as err:
        if isinstance(err.__cause__, DataError):
            raise err.__cause__ from None
        raise


class CaptionDataModule(pl.LightningDataModule):
    """What every data format takes (the ``conf/data/*.yaml`` keys of the same names), stored as attributes.

    ``tokenizer`` and ``resolution`` (the teacher's), ``batch_size`` (the micro-batch per device), ``num_workers``,
    ``random_flip``, ``seed`` (shuffling and flips are a function of (seed, epoch): resumable), ``val_samples`` (the
    last N samples held out: never trained on, the validation loss), ``global_batch_size`` (images per optimizer step
    over all devices: decides the accumulation), and the skip limits the DataQuality callback reads: stop when more
    than ``max_skipped_fraction`` of the samples read were unusable, checked once ``skip_check_after`` were read.
    """

    def __init__(
        self,
        tokenizer,
        resolution: int | None,
        batch_size: int,
        num_workers: int = 0,
        random_flip: bool = True,
        seed: int = 0,
        val_samples: int = 0,
        max_skipped_fraction: float | None = 0.05,
        skip_check_after: int = 1000,
        global_batch_size: int | None = None,
    ):
        super().__init__()
        self.tokenizer, self.resolution, self.batch_size = tokenizer, resolution, batch_size
        self.num_workers, self.random_flip, self.seed, self.val_samples = num_workers, random_flip, seed, val_samples
        self.max_skipped_fraction, self.skip_check_after = max_skipped_fraction, skip_check_after
        self.global_batch_size = global_batch_size

    def transfer_batch_to_device(self, batch, device, dataloader_idx: int):
        """As Lightning (non-blocking copies from pinned memory), but the sample indices stay on the host: the module
        seeds each sample's draws from them, which on the device would be a host sync per micro-step."""
        if isinstance(batch, dict) and isinstance(batch.get("index"), torch.Tensor):
            rest = {k: v for k, v in batch.items() if k != "index"}
            return {**super().transfer_batch_to_device(rest, device, dataloader_idx), "index": batch["index"]}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)


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
    exactly the samples it already trained on (``resume``) and then see what an uninterrupted run sees.
    Each of ``world_size`` ranks takes every ``world_size``-th sample of the shuffled order (the tail
    that does not fill a step on every rank is dropped), so each sample is seen at most once per epoch.
    """

    def __init__(self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1, random_flip: bool = True):
        self.num_samples, self.seed, self.rank, self.world_size = num_samples, seed, rank, world_size
        self.random_flip = random_flip
        self.epoch = 0
        self._start: tuple[int, int] | None = None  # (epoch, samples to skip) of the next pass

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at the start of every epoch
        self.epoch = epoch

    def resume(self, epoch: int, samples_done: int) -> None:
        """The next pass is epoch ``epoch`` without its first ``samples_done`` samples (of this rank), whatever
        ``set_epoch`` says in between: the loader, not Lightning's epoch counter, knows where the data stands."""
        self._start = (epoch, samples_done)

    def _order(self) -> tuple[list[int], list[bool]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=g)
        flips = (torch.rand(self.num_samples, generator=g) < 0.5) & self.random_flip
        per_rank = self.num_samples // self.world_size
        mine = slice(self.rank, per_rank * self.world_size, self.world_size)
        return order[mine].tolist(), flips[mine].tolist()

    def __iter__(self):
        skip = 0
        if self._start is not None:
            (self.epoch, skip), self._start = self._start, None
        order, flips = self._order()
        return iter(list(zip(order, flips))[skip:])

    def __len__(self) -> int:
        return self.num_samples // self.world_size


def trained_position(trainer) -> int | None:
    """Batches this rank has trained on so far (Lightning's loop progress, checkpointed and only ever increasing);
    None when the loader is not iterated by a fit."""
    loop = getattr(trainer, "fit_loop", None)
    return None if loop is None else int(loop.epoch_loop.batch_progress.total.processed)


class StatefulLoader(DataLoader):
    """A DataLoader whose data position Lightning checkpoints: Lightning saves ``state_dict()`` of a stateful
    train loader with every checkpoint and hands it to ``load_state_dict()`` before iterating on resume.

    The position is the data epoch and the samples of it this rank has trained on (samples, not batches, so it
    stays exact when the batch size changes). The loader, not Lightning's epoch counter, decides which data epoch
    a pass reads: a pass continues the data epoch until fewer than a batch of it is left. So a run stopped by
    ``trainer.max_steps`` mid-epoch (Lightning counts that epoch as finished) and extended later continues that
    epoch, exactly as an uninterrupted run does. ``position_fn`` returns the batches this rank has trained on so
    far (:func:`trained_position`); ``resume(epoch, samples)`` (overridden per data format) starts a pass there.
    """

    def __init__(self, *args, position_fn=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.position_fn = position_fn
        self._pass: tuple[int, int, int] | None = None  # (data epoch, samples done before the pass, batches then)
        self._loaded: tuple[int, int] | None = None  # a checkpoint's position, for the next pass

    def _batches(self) -> int | None:
        return self.position_fn() if self.position_fn is not None else None

    def position(self) -> tuple[int, int]:
        """(data epoch, samples of it this rank has trained on)."""
        if self._loaded is not None:
            return self._loaded
        if self._pass is None:
            return 0, 0
        epoch, done, mark = self._pass
        batches = self._batches()
        return epoch, done + (mark if batches is None else batches - mark) * int(self.batch_size)

    def state_dict(self) -> dict[str, int]:
        epoch, samples = self.position()
        return {"epoch": int(epoch), "samples": int(samples)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._loaded = (int(state["epoch"]), int(state["samples"]))
        if self._batches() is None:  # not in a fit (a test, a tool): the sampler takes the epoch from set_epoch
            self.resume(*self._loaded)

    def _samples_left(self, done: int) -> int | None:
        try:
            per_epoch = len(self.sampler)
        except TypeError:  # a stream: unknown
            return None
        return per_epoch - done

    def __iter__(self):
        batches = self._batches()
        if batches is not None:  # iterated by a fit: continue the data epoch, or start the next one
            epoch, done = self.position()
            left = self._samples_left(done)
            enough = int(self.batch_size) if self.drop_last else 1
            if (left is not None and left < enough) or (left is None and self._loaded is None and self._pass):
                epoch, done = epoch + 1, 0
            self._pass, self._loaded = (epoch, done, batches), None
            self.resume(epoch, done)
        return super().__iter__()

    def resume(self, epoch: int, samples: int) -> None:
        self.sampler.resume(epoch, samples)


def resumable_loader(datamodule: pl.LightningDataModule, dataset: Dataset, collate_fn, random_flip: bool = True):
    """A :class:`StatefulLoader` over a map-style dataset with :class:`ResumableSampler`, sharded by the
    trainer's rank; a resumed run starts where the checkpoint stopped."""
    trainer = datamodule.trainer
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    sampler = ResumableSampler(len(dataset), seed=datamodule.seed, rank=rank, world_size=world, random_flip=random_flip)
    return StatefulLoader(
        dataset,
        position_fn=(lambda: trained_position(trainer)) if trainer is not None else None,
        batch_size=datamodule.batch_size,
        sampler=sampler,
        drop_last=True,
        collate_fn=collate_fn,
        num_workers=datamodule.num_workers,
        persistent_workers=datamodule.num_workers > 0,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(datamodule.seed),  # worker seeds do not consume the global RNG
    )
