"""WebDataset tar shards as img2dataset writes them, streamed: for sets too large to list.

Not the webdataset package (1.0.2 shards by worker before shuffling, can't skip undecoded samples, hides tar-header
cuts): the members are read in order by the standard library's ``tarfile`` in stream mode, from files or URLs.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import random
import tarfile
import time
import urllib.request
from collections.abc import Iterable, Iterator
from glob import glob
from pathlib import Path

import torch
from braceexpand import UnbalancedBracesError, braceexpand
from torch.utils.data import IterableDataset, get_worker_info

from bksdm_lab.data.common import (
    BadSample,
    CaptionDataModule,
    DataError,
    StatefulLoader,
    check_caption,
    collate,
    finish_sample,
    load_image,
    trained_position,
)

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
INDEX_STRIDE = 1 << 32  # a sample's index is shard * INDEX_STRIDE + its ordinal in the shard


def expand_braces(pattern: str) -> list[str]:
    """``a{00..02}b{x,y}`` -> ``a00bx a00by a01bx ...`` with :mod:`braceexpand` (bash's rules: numeric ranges keep
    their zero padding, ``{1..9..2}`` steps, nesting, ``\\{``/``\\}`` escapes; a brace without a comma or range stays)."""
    try:
        return list(braceexpand(pattern))
    except UnbalancedBracesError as err:
        raise DataError(f"data.shards: unbalanced braces in {pattern!r}") from err


def is_url(shard: str) -> bool:
    return shard.startswith(("http://", "https://", "file://"))


def expand_shards(shards: str | Iterable[str]) -> list[str]:
    """A brace pattern, a glob of local files, or a list of either -> the shard list, in order."""
    patterns = [shards] if isinstance(shards, str | Path) else list(shards)
    out = []
    for pattern in patterns:
        for shard in expand_braces(str(pattern)):
            if not is_url(shard) and any(c in shard for c in "*?["):
                out += sorted(glob(str(Path(shard).expanduser())))
            else:
                out.append(shard if is_url(shard) else str(Path(shard).expanduser()))
    return out


def find_shards(shards: str | Iterable[str]) -> list[str]:
    """The shards ``data.shards`` names; a DataError when it matches none or names local shards that do not exist."""
    found = expand_shards(shards)
    if not found:
        raise DataError(f"data.shards={shards!r} matches no shard")
    missing = [s for s in found if not is_url(s) and not Path(s).is_file()]
    if missing:
        raise DataError(f"data.shards: {len(missing)} of the {len(found)} shards do not exist, e.g. {missing[:3]}")
    return found


def open_shard(shard: str, timeout: float = 60.0):
    """A binary stream of the shard: a local file, or a ``file://`` / ``http(s)://`` URL read as it arrives."""
    if is_url(shard):
        request = urllib.request.Request(shard, headers={"User-Agent": "bksdm_lab"})
        return urllib.request.urlopen(request, timeout=timeout)
    return open(shard, "rb")


def split_key(name: str) -> tuple[str, str]:
    """``dir/000001.jpg`` -> (``dir/000001``, ``jpg``); the extension starts at the basename's first dot."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :].lower()


class _Header(tarfile.TarInfo):
    """A tar header that tells a shard's end (a zero block) from a cut: tarfile's stream mode ends a shard quietly at
    a header that is missing (no end-of-archive blocks), cut short or not a header, and the rest is lost unsaid."""

    @classmethod
    def frombuf(cls, buf, encoding, errors):
        if len(buf) != tarfile.BLOCKSIZE:
            where = "inside a tar header" if buf else "before the tar end-of-archive blocks"
            raise tarfile.ReadError(f"the file ends {where}: cut short")
        try:
            return super().frombuf(buf, encoding, errors)
        except tarfile.InvalidHeaderError as err:  # a zero block (EOFHeaderError) is the end, and passes
            raise tarfile.ReadError(f"not a tar header where one should be ({err})") from None


def iter_shard(stream, shard_index: int) -> Iterator[dict]:
    """Group the members of a tar stream by key: ``{"__key__", "index", <ext>: bytes, ...}``, in order. A shard
    that ends early anywhere (inside a member or a header, or without its end-of-archive blocks) raises ReadError
    after the sample read so far (the members before the cut)."""
    sample, ordinal = None, 0
    try:
        with tarfile.open(fileobj=stream, mode="r|*", tarinfo=_Header) as tar:
            for member in tar:
                tar.members = []  # stream mode keeps every TarInfo otherwise
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if not ext or Path(key).name.startswith("."):  # no extension, or ._ / .DS_Store litter
                    continue
                data = tar.extractfile(member).read()
                if sample is not None and sample["__key__"] != key:
                    yield sample
                    sample, ordinal = None, ordinal + 1
                if sample is None:
                    sample = {"__key__": key, "index": shard_index * INDEX_STRIDE + ordinal}
                sample[ext] = data
    except (tarfile.TarError, OSError, EOFError):
        if sample is not None:
            yield sample
        raise
    if sample is not None:
        yield sample


def worker_batches(batches: int, worker: int, workers: int) -> int:
    """How many of a rank's first ``batches`` batches worker ``worker`` made (the DataLoader takes turns)."""
    return max(0, math.ceil((batches - worker) / workers))


class WebDatasetShards(IterableDataset):
    """Streams img2dataset shards; yields the sample dicts of :class:`bksdm_lab.data.folder.ImageCaptionFolder`."""

    def __init__(
        self,
        shards: str | Iterable[str],
        tokenizer,
        resolution: int,
        random_flip: bool = True,
        caption_field: str = "caption",
        image_extensions: Iterable[str] = IMAGE_EXTENSIONS,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        small_images: str = "upscale",
        max_pixels: int = 16384 * 16384,
        retries: int = 3,
        timeout: float = 60.0,
    ):
        if small_images not in ("upscale", "skip"):
            raise DataError(f"data.small_images={small_images!r} is not one of: upscale, skip")
        self.shards = find_shards(shards)
        self.tokenizer, self.resolution, self.random_flip = tokenizer, resolution, random_flip
        self.caption_field = caption_field
        self.image_extensions = tuple(e.lower().lstrip(".") for e in image_extensions)
        self.shuffle_shards, self.shuffle_buffer, self.seed = shuffle_shards, max(1, int(shuffle_buffer)), seed
        self.small_images, self.max_pixels, self.retries, self.timeout = small_images, max_pixels, retries, timeout
        self.rank, self.world_size, self.batch_size = 0, 1, 1
        self.resume_epoch, self.resume_batches = -1, 0
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()  # persistent workers see set_epoch

    # ---- which shards, in which order ---------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def shards_of(self, epoch: int, rank: int, world: int, worker: int = 0, workers: int = 1) -> list[int]:
        """Indices into ``self.shards`` read by one worker of one rank in ``epoch``: the shards shuffled by ``(seed,
        epoch)``, every ``world``-th to rank ``rank`` (the tail that does not divide is dropped, a different one each
        epoch), every ``workers``-th of those to ``worker``. Each sample is read once per epoch when there are at
        least ``world x workers`` shards."""
        order = list(range(len(self.shards)))
        if self.shuffle_shards:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            order = torch.randperm(len(order), generator=g).tolist()
        per_rank = len(order) // world
        return order[rank : per_rank * world : world][worker::workers]

    # ---- reading ------------------------------------------------------------------------------
    def _raw(self, shard_index: int) -> Iterator[dict]:
        """One shard's raw samples; retries opening, and turns a broken shard into one counted bad sample."""
        shard, stream = self.shards[shard_index], None
        for attempt in range(self.retries + 1):
            try:
                stream = open_shard(shard, self.timeout)
                break
            except OSError as err:
                if attempt == self.retries:
                    log.error("shard %s cannot be opened (%s): skipped", shard, err)
                    yield {"__key__": shard, "index": shard_index * INDEX_STRIDE, "__bad__": ("missing", str(err))}
                    return
                time.sleep(min(2**attempt, 30))
        count = 0
        try:
            with stream:
                for sample in iter_shard(stream, shard_index):
                    count += 1
                    yield sample
        except (tarfile.TarError, OSError, EOFError) as err:  # truncated / corrupt tar, connection dropped
            log.error("shard %s is broken after %d samples (%s): the rest of it is skipped", shard, count, err)
            bad = {"__key__": shard, "index": shard_index * INDEX_STRIDE + count, "__bad__": ("corrupt", str(err))}
            yield bad

    def _shuffled(self, raw: Iterator[dict], rng: random.Random) -> Iterator[dict]:
        buffer: list[dict] = []
        for sample in raw:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(sample)
                continue
            i = rng.randrange(len(buffer))
            buffer[i], sample = sample, buffer[i]
            yield sample
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        resumed = epoch == self.resume_epoch
        if resumed:  # the DataLoader starts with worker 0, the interrupted run's next batch was worker B % W's
            worker = (worker + self.resume_batches) % workers
        mine = self.shards_of(epoch, self.rank, self.world_size, worker, workers)
        rng = random.Random(f"bksdm-wds-{self.seed}-{epoch}-{self.rank}-{worker}")
        raw = itertools.chain.from_iterable(self._raw(s) for s in mine)
        samples = ((s, rng.random() < 0.5) for s in self._shuffled(raw, rng))  # the flip is drawn when skipping
        if resumed:  # drop, undecoded, what this worker had yielded before the checkpoint
            done = worker_batches(self.resume_batches, worker, workers) * self.batch_size
            samples = itertools.islice(samples, done, None)
        for sample, flip in samples:
            yield self.decode(sample, flip)

    def decode(self, sample: dict, flip: bool) -> dict:
        key = sample["__key__"]

        def read():
            if "__bad__" in sample:
                raise BadSample(*sample["__bad__"])
            caption = self._caption(sample)
            ext = next((e for e in self.image_extensions if e in sample), None)
            if ext is None:
                found = sorted(k for k in sample if not k.startswith("__") and k != "index")
                raise BadSample(
                    "missing", f"{key}: no image member ({', '.join(self.image_extensions)}); found {found}"
                )
            pixels, converted = load_image(
                sample[ext],
                self.resolution,
                self.random_flip and flip,
                self.small_images,
                self.max_pixels,
                name=f"{key}.{ext}",
            )
            return caption, pixels, converted

        return finish_sample(sample["index"], self.tokenizer, read)

    def _caption(self, sample: dict) -> str:
        key = sample["__key__"]
        if "txt" in sample:
            raw, where = sample["txt"], f"{key}.txt"
            try:
                caption = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise BadSample("caption", f"{where}: not UTF-8 ({err})") from None
        elif "json" in sample:
            where = f"{key}.json[{self.caption_field!r}]"
            try:
                caption = json.loads(sample["json"]).get(self.caption_field)
            except (ValueError, AttributeError) as err:
                raise BadSample("caption", f"{key}.json: not a JSON object ({err})") from None
        else:
            raise BadSample("caption", f"{key}: no .txt or .json caption member")
        return check_caption(caption, where)


class StreamLoader(StatefulLoader):
    """A DataLoader that tells its stream the epoch when iterated (Lightning's ``set_epoch`` reaches samplers
    only, and an IterableDataset has none) and, with ``num_batches``, stops every epoch after that many.
    A resumed run replays each worker's stream without decoding up to the checkpointed position: it reads (for URL
    shards: downloads) the consumed part of the epoch again, and is exact while all of the rank's workers still have
    shards (near an epoch's end a few samples may be seen twice). Batches are not padded: a worker's last may be
    short."""

    def __init__(self, dataset: WebDatasetShards, *, epoch_fn=None, num_batches: int | None = None, **kwargs):
        super().__init__(dataset, **kwargs)
        self.epoch_fn, self.num_batches, self.skip_epoch, self.skip_batches = epoch_fn, num_batches, -1, 0

    def resume(self, epoch: int, samples: int) -> None:
        batches = samples // self.batch_size
        self.dataset.resume_epoch, self.dataset.resume_batches = epoch, batches
        self.skip_epoch, self.skip_batches = epoch, batches

    def __iter__(self):
        if self.epoch_fn is not None:
            self.dataset.set_epoch(self.epoch_fn())
        iterator = super().__iter__()
        if self.num_batches is None:
            return iterator
        done = self.skip_batches if self.dataset.epoch == self.skip_epoch else 0
        return itertools.islice(iterator, max(0, self.num_batches - done))

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("a streamed WebDataset has no length (set data.samples_per_epoch)")
        return self.num_batches


class WebDatasetDataModule(CaptionDataModule):
    """``data=webdataset``: streamed tar shards; the shared arguments are :class:`CaptionDataModule`'s (a stream holds
    no samples out: ``val_samples`` must be 0)."""

    def __init__(
        self,
        shards,
        tokenizer,
        resolution: int,
        batch_size: int,
        caption_field: str = "caption",
        image_extensions: Iterable[str] = IMAGE_EXTENSIONS,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 1000,
        samples_per_epoch: int | None = None,
        small_images: str = "upscale",
        max_pixels: int = 16384 * 16384,
        retries: int = 3,
        timeout: float = 60.0,
        **shared,
    ):
        super().__init__(tokenizer, resolution, batch_size, **shared)
        if self.val_samples:
            raise DataError(
                f"data.val_samples={self.val_samples}: data=webdataset streams its samples and holds none out"
            )
        self.dataset = WebDatasetShards(
            shards,
            tokenizer,
            resolution,
            random_flip=self.random_flip,
            caption_field=caption_field,
            image_extensions=image_extensions,
            shuffle_shards=shuffle_shards,
            shuffle_buffer=shuffle_buffer,
            seed=self.seed,
            small_images=small_images,
            max_pixels=max_pixels,
            retries=retries,
            timeout=timeout,
        )
        self.samples_per_epoch = samples_per_epoch

    def train_dataloader(self) -> StreamLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        shards, workers = len(self.dataset.shards), max(1, self.num_workers)
        if shards < world:
            raise DataError(f"data.shards: {shards} shard(s) for {world} ranks: every rank needs at least one shard")
        if shards < world * workers:
            log.warning(
                "data.shards: %d shard(s) for %d rank(s) x %d worker(s): some workers get no shard and sit idle; "
                "use at least %d shards (many more balance better), or fewer data.num_workers",
                shards,
                world,
                workers,
                world * workers,
            )
        if shards % world:
            log.warning(
                "data.shards: %d shards do not split evenly over %d ranks: %d shard(s) are left out each epoch "
                "(a different one each epoch)",
                shards,
                world,
                shards % world,
            )
        num_batches = None
        if self.samples_per_epoch:
            num_batches = self.samples_per_epoch // (world * self.batch_size)
            if num_batches < 1:
                raise DataError(
                    f"data.samples_per_epoch={self.samples_per_epoch} is less than one batch on each of {world} ranks"
                )
        elif world > 1:
            log.warning(
                "data=webdataset on %d ranks without data.samples_per_epoch: if the ranks' shards hold different "
                "numbers of samples, the ranks run different numbers of batches and DDP hangs at the end of the "
                "epoch; set data.samples_per_epoch a little under the set's size",
                world,
            )
        ds = self.dataset
        ds.rank, ds.world_size, ds.batch_size = rank, world, self.batch_size
        loader = StreamLoader(
            ds,
            epoch_fn=(lambda: trainer.current_epoch) if trainer is not None else None,
            position_fn=(lambda: trained_position(trainer)) if trainer is not None else None,
            num_batches=num_batches,
            batch_size=self.batch_size,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            generator=torch.Generator().manual_seed(self.seed),  # worker seeds do not consume the global RNG
        )
        return loader
