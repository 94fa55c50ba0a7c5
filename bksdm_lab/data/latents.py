"""Precomputed VAE latents: shards written by ``python -m bksdm_lab.prepare``, read without a VAE.

A shard holds ``index``, ``input_ids`` (int32) and the unscaled VAE posterior of each good image (``mean``, ``std``)
and of its mirror image (``mean_flip``, ``std_flip``), sampled as the online path samples it; ``meta.json`` lists them
with their size and sha256 (a cache written before these were recorded is checked for missing files only).
"""

from __future__ import annotations

import json
import shlex
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from bksdm_lab.data.common import CaptionDataModule, DataError, resumable_loader
from bksdm_lab.data.download import file_sha256
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


def shard_problem(root: Path, entry: dict, verify: bool) -> str | None:
    """What is wrong with a listed shard's file (missing, another size than listed, with ``verify`` another sha256),
    or None; an entry written without size and checksum is checked for a missing file only."""
    path = root / entry["file"]
    if not path.is_file():
        return f"{entry['file']} is missing"
    size = path.stat().st_size
    if entry.get("bytes") is not None and size != entry["bytes"]:
        return f"{entry['file']} is {size} bytes, meta.json lists {entry['bytes']} (damaged or cut short)"
    if verify and entry.get("sha256") and file_sha256(path) != entry["sha256"]:
        return f"{entry['file']} does not match its sha256 in meta.json (damaged)"
    return None


def repair_command(root: Path, meta: dict) -> str:
    """The ``prepare`` command that repairs the cache at ``root`` (the arguments it was made with)."""
    args = meta.get("prepare_args")
    if args is None:
        args = [f"teacher={meta.get('teacher')}", f"data=<the data of {meta.get('data_root')}>"]
        args.append(f"shard_size={meta.get('shard_size')}")
    return f"python -m bksdm_lab.prepare {shlex.join([*args, f'out={root}'])}"


def damaged(root: str | Path, meta: dict, verify: bool = False) -> str | None:
    """One line naming the damaged shards of a cache and the command that repairs it, or None."""
    root = Path(root).expanduser()
    problems = [p for entry in meta.get("shards", []) if (p := shard_problem(root, entry, verify))]
    if not problems:
        return None
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return (
        f"the latent cache {root} is damaged: {'; '.join(problems[:3])}{more}: repair it with "
        f"`{repair_command(root, meta)}`"
    )


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
        if k not in self._open:  # checked whole once (a shard is read whole over an epoch anyway), then mapped
            entry = self.meta["shards"][k]
            problem = damaged(self.root, {**self.meta, "shards": [entry]}, verify=True)
            if problem:
                raise DataError(problem)
            try:
                self._open[k] = torch.load(self.root / entry["file"], map_location="cpu", mmap=True, weights_only=True)
            except (OSError, RuntimeError) as err:
                raise DataError(
                    f"the latent cache {self.root}: {entry['file']} cannot be read ({err}): repair it with "
                    f"`{repair_command(self.root, self.meta)}`"
                ) from None
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
