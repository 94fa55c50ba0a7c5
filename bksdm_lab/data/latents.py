"""Precomputed VAE latents: shards written by ``python -m bksdm_lab.prepare``, read without a VAE.

A shard holds ``index``, ``input_ids`` (int32) and the unscaled VAE posterior of each good image (``mean``, ``std``)
and of its mirror image (``mean_flip``, ``std_flip``), sampled as the online path samples it; ``meta.json`` lists them.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from bksdm_lab.data.common import CaptionDataModule, DataError, resumable_loader
from bksdm_lab.data.split import TrainPart, check_val_samples, held_out_loader

META = "meta.json"


def read_meta(root: str | Path) -> dict:
    root = Path(root).expanduser()
    path = root / META
    if not path.is_file():
        raise DataError(
            f"data.root={str(root)!r} has no {META}: not a latent cache. Write one with "
            f"`python -m bksdm_lab.prepare data=<your data> teacher=<teacher> out={root}`"
        )
    meta = json.loads(path.read_text())
    if not meta.get("complete"):
        raise DataError(
            f"the latent cache {root} is incomplete ({meta.get('done', 0)} of {meta.get('num_rows')} "
            f"rows): rerun `python -m bksdm_lab.prepare` with out={root} to finish it (it resumes)"
        )
    return meta


class LatentShards(Dataset):
    """Every cached sample, addressed by position; shards are memory-mapped, so a sample reads only its rows."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        self.meta = read_meta(self.root)
        self.scaling_factor = float(self.meta["scaling_factor"])
        self._where: list[tuple[int, int]] = []
        for k, shard in enumerate(self.meta["shards"]):
            self._where += [(k, row) for row in range(shard["count"])]
        self._open: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self._where)

    def _shard(self, k: int) -> dict:
        if k not in self._open:
            path = self.root / self.meta["shards"][k]["file"]
            self._open[k] = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        return self._open[k]

    def __getitem__(self, item: int | tuple[int, bool]) -> dict:
        position, flip = item if isinstance(item, tuple) else (item, False)
        k, row = self._where[position]
        shard = self._shard(k)
        suffix = "_flip" if flip else ""
        return {
            "latent_mean": shard["mean" + suffix][row].float(),
            "latent_std": shard["std" + suffix][row].float(),
            "input_ids": shard["input_ids"][row].long(),
            "index": int(shard["index"][row]),
        }


def collate_latents(samples: list[dict], scaling_factor: float) -> dict:
    batch = {key: torch.stack([s[key] for s in samples]) for key in ("latent_mean", "latent_std", "input_ids")}
    batch["index"] = torch.tensor([s["index"] for s in samples])
    batch["scaling_factor"] = torch.full((len(samples),), scaling_factor)
    return batch


class LatentDataModule(CaptionDataModule):
    """Cached latents with the same exactly-once, resumable sampler as the image folder. ``random_flip`` takes the
    cached mirror-image posterior; ``resolution`` (optional) is checked against the cache; the tokenizer is unused
    (the captions were tokenised when preparing)."""

    def __init__(self, root, batch_size: int, tokenizer=None, resolution: int | None = None, **shared):
        super().__init__(tokenizer, resolution, batch_size, **shared)
        self.dataset = LatentShards(root)
        if resolution is not None and int(self.dataset.meta["resolution"]) != int(resolution):
            raise DataError(
                f"the latent cache {root} was made at {self.dataset.meta['resolution']} px, the teacher trains at "
                f"{resolution} px: prepare it again for this teacher"
            )
        # the last val_samples samples are held out: never trained on, served by val_dataloader
        self.val_samples = check_val_samples(self.val_samples, len(self.dataset), f"the latent cache {root}")

    def train_dataloader(self) -> DataLoader:
        collate_fn = partial(collate_latents, scaling_factor=self.dataset.scaling_factor)
        train = TrainPart(self.dataset, len(self.dataset) - self.val_samples)
        return resumable_loader(self, train, collate_fn, random_flip=self.random_flip)

    def val_dataloader(self) -> DataLoader | list:
        collate_fn = partial(collate_latents, scaling_factor=self.dataset.scaling_factor)
        return held_out_loader(self, self.dataset, collate_fn, self.val_samples)
