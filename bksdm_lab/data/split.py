"""The held-out split of a map-style data set (``data.val_samples``): the last ``val_samples`` samples are never
trained on; ``val_dataloader()`` serves them, unflipped and in a fixed order, so that a validation loss compares
runs (an Optuna trial against another) on the same inputs.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from bksdm_lab.data.common import DataError


def check_val_samples(val_samples, total: int, what: str = "the data set") -> int:
    """``val_samples`` as an int, or a DataError naming ``data.val_samples`` (it must leave samples to train on)."""
    if isinstance(val_samples, bool) or not isinstance(val_samples, int) or val_samples < 0:
        raise DataError(f"data.val_samples={val_samples!r} must be an integer >= 0 (0: no held-out set)")
    if val_samples >= total:
        raise DataError(
            f"data.val_samples={val_samples} holds out all {total} samples of {what}: nothing is left to train on"
        )
    return val_samples


class TrainPart(Dataset):
    """The first ``length`` samples of ``dataset`` (the rest is held out). Items pass through unchanged, so the
    ``(index, flip)`` items of :class:`bksdm_lab.data.common.ResumableSampler` work, unlike with a ``Subset``."""

    def __init__(self, dataset: Dataset, length: int):
        self.dataset, self.length = dataset, int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, item):
        index = item[0] if isinstance(item, tuple) else item
        if not 0 <= int(index) < self.length:
            raise IndexError(f"sample {index} is held out (training uses 0..{self.length - 1})")
        return self.dataset[item]


def held_out_indices(total: int, val_samples: int, rank: int = 0, world_size: int = 1) -> list[int]:
    """This rank's held-out samples: the last ``val_samples`` of ``total``, every ``world_size``-th from ``rank``.
    Every rank gets the same count (``val_samples // world_size``; the remainder is not used), so every rank runs
    the same number of validation batches and the mean over ranks is the mean over the samples."""
    per_rank = val_samples // world_size
    if val_samples and per_rank == 0:
        raise DataError(
            f"data.val_samples={val_samples} is fewer than the {world_size} ranks: each rank needs a held-out sample"
        )
    start = total - val_samples
    return list(range(start + rank, start + per_rank * world_size, world_size))


def held_out_loader(datamodule, dataset: Dataset, collate_fn, val_samples: int) -> DataLoader | list:
    """The held-out samples of this rank, unflipped, in order, the last batch kept; ``[]`` when none are held out
    (Lightning then runs no validation)."""
    if not val_samples:
        return []
    trainer = getattr(datamodule, "trainer", None)
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    items = [(i, False) for i in held_out_indices(len(dataset), val_samples, rank, world)]
    return DataLoader(
        dataset,
        batch_size=datamodule.batch_size,
        sampler=items,
        drop_last=False,
        collate_fn=collate_fn,
        num_workers=datamodule.num_workers,
        # its own generator: iterating it never draws from the global RNG, so validation leaves training unchanged
        generator=torch.Generator().manual_seed(int(datamodule.seed)),
    )
