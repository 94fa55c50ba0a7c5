"""Precompute the teacher VAE's latents (and token ids) once, so training never loads or runs the VAE.

Captions are cached as token ids, not text-encoder outputs: 308 bytes a sample against 118 KB of SD-v1 encodings
(77 x 768 in fp16), and encoding text is a small part of a step (the breakdown in docs/benchmark.md). Preparing into
an existing cache checks every shard against its size and sha256 and encodes again what is missing or damaged.
"""

from __future__ import annotations

import itertools
import json
import tempfile
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, IterableDataset, Subset
from tqdm import tqdm

from bksdm_lab.common.checkpoint import AtomicCheckpointIO
from bksdm_lab.common.cli import fail, guarded
from bksdm_lab.common.conf import CONF_DIR
from bksdm_lab.common.quiet import quiet_libraries
from bksdm_lab.common.secrets import redact_override
from bksdm_lab.data.common import SKIP_REASONS, DataError, collate
from bksdm_lab.data.download import file_sha256
from bksdm_lab.data.latents import META, shard_problem
from bksdm_lab.models.teachers import TeacherLoadError, load_teacher

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@torch.no_grad()
def encode_shard(vae, batches, device, dtype) -> tuple[dict, dict]:
    """Posterior mean/std of every good image of ``batches`` and of its mirror image."""
    parts = {k: [] for k in ("index", "input_ids", "mean", "std", "mean_flip", "std_flip")}
    skipped = dict.fromkeys(SKIP_REASONS, 0)
    for batch in batches:
        for reason, n in batch["skipped"].items():
            skipped[reason] += n
        if "pixel_values" not in batch:
            continue
        pixels = batch["pixel_values"].to(device, vae.dtype)
        for suffix, images in (("", pixels), ("_flip", pixels.flip(-1))):
            posterior = vae.encode(images).latent_dist
            parts["mean" + suffix].append(posterior.mean.to("cpu", dtype))
            parts["std" + suffix].append(posterior.std.to("cpu", dtype))
        parts["index"].append(batch["index"])
        parts["input_ids"].append(batch["input_ids"].to(torch.int32))
    shard = {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}
    return shard, skipped


def build_dataset(data_cfg: DictConfig, tokenizer):
    """The data set of the data config's module (folder, webdataset, hf), without random flips (both the image
    and its mirror image are cached); a stream is read in order, unshuffled."""
    target = str(data_cfg.get("_target_", ""))
    if target.endswith("LatentDataModule"):
        raise DataError("data=latents is already a latent cache: give the images' data config (folder, webdataset, hf)")
    extra = {"random_flip": False}
    if "webdataset" in target.lower():
        extra.update(shuffle_shards=False, shuffle_buffer=1)
    try:
        return instantiate(data_cfg, tokenizer=tokenizer, **extra).dataset
    except InstantiationException as err:  # the data module's own one-line error, not Hydra's wrapping of it
        if isinstance(err.__cause__, DataError | OSError):
            raise DataError(str(err.__cause__)) from None
        raise


def writable_out(out: str | Path) -> Path:
    """``out`` as a folder this process can write in (made if missing), else a DataError naming it."""
    out = Path(out).expanduser()
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()
    except OSError as err:
        raise DataError(f"out={str(out)!r} cannot be written ({err.strerror}): choose a folder you can write") from None
    return out


class WritableOut(Callback):
    """Before Hydra makes its log folder in ``out``: an ``out`` that cannot be written is one line, exit 2."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if not OmegaConf.is_missing(config, "out"):
            try:
                writable_out(config.out)
            except DataError as err:
                fail("prepare", err)


def data_source(data_cfg: DictConfig) -> str:
    for key in ("root", "path", "shards"):
        if data_cfg.get(key) is not None:
            value = data_cfg[key]
            return str(list(value)) if not isinstance(value, str) else str(value)
    return str(data_cfg.get("_target_"))


def _save_shard(out: Path, meta: dict, k: int, batches, rows: tuple[int, int], vae, device, dtype) -> None:
    """Encode ``batches`` (an iterable: a shard's DataLoader, or a stream's batches), write shard ``k``, list it."""
    batches = _Counted(batches)
    shard, skipped = encode_shard(vae, batches, device, dtype)
    name = f"shard-{k:05d}.pt"
    AtomicCheckpointIO().save_checkpoint(shard, out / name)  # never a half-written shard
    entry = {"file": name, "rows": list(rows), "count": len(shard["index"]), "batches": batches.n}
    entry |= {"bytes": (out / name).stat().st_size, "sha256": file_sha256(out / name)}
    entry["skipped"] = {r: n for r, n in skipped.items() if n}
    meta["shards"].append(entry)
    meta["shards"].sort(key=lambda s: s["file"])
    meta["skipped"] = {r: meta["skipped"].get(r, 0) + n for r, n in skipped.items()}
    meta["done"] += rows[1] - rows[0]
    (out / META).write_text(json.dumps(meta, indent=2))  # the shard is on disk before it is listed


class _Counted:
    def __init__(self, iterable):
        self.iterable, self.n = iterable, 0

    def __iter__(self):
        for item in self.iterable:
            self.n += 1
            yield item


def drop_damaged(out: Path, meta: dict) -> list[dict]:
    """Take the listed shards whose file is missing or damaged (size, sha256) out of ``meta``, with their rows and
    skip counts, and return them: they are encoded again."""
    bad = [entry for entry in meta["shards"] if shard_problem(out, entry, verify=True)]
    for entry in bad:
        meta["shards"].remove(entry)
        meta["done"] -= entry["rows"][1] - entry["rows"][0]
        for reason, n in (entry.get("skipped") or {}).items():
            meta["skipped"][reason] = meta["skipped"].get(reason, 0) - n
    if bad:
        names = ", ".join(entry["file"] for entry in bad)
        print(f"bksdm_lab.prepare: {len(bad)} shard(s) of {out} missing or damaged ({names}): encoding them again")
    return bad


def prepare(cfg: DictConfig) -> Path:
    out = writable_out(cfg.out)
    teacher = load_teacher(cfg.teacher)
    device = torch.device(cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    vae = teacher.vae.to(device, torch.float16 if device.type == "cuda" else torch.float32)
    dataset = build_dataset(cfg.data, teacher.tokenizer)
    streamed = isinstance(dataset, IterableDataset)
    size, batch_size = int(cfg.shard_size), int(cfg.batch_size)
    if streamed and size % batch_size:
        raise DataError(f"shard_size={size} must be a multiple of batch_size={batch_size} for streamed data")
    rows = None if streamed else len(dataset)
    meta_path = out / META
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    args = meta.get("prepare_args")  # the arguments that made it: the command that repairs it
    if HydraConfig.initialized():
        args = [redact_override(a) for a in HydraConfig.get().overrides.task if not a.startswith("out=")]
    identity = {
        "teacher": cfg.teacher.name,
        "teacher_source": teacher.source,
        "data_root": data_source(cfg.data),
        "resolution": int(cfg.data.resolution),
        "shard_size": size,
    }
    if not streamed:
        identity["num_rows"] = rows
    if meta and any(meta.get(k) != v for k, v in identity.items()):
        changed = {k: (meta.get(k), v) for k, v in identity.items() if meta.get(k) != v}
        raise DataError(f"{out} holds a latent cache of other data or teacher {changed}: choose another out=")
    meta = {
        **identity,
        "num_rows": rows,
        "scaling_factor": float(vae.config.scaling_factor),
        "dtype": cfg.dtype,
        "shards": meta.get("shards", []),
        "skipped": meta.get("skipped", dict.fromkeys(SKIP_REASONS, 0)),
        "done": meta.get("done", 0),
        "complete": False,
        **({"prepare_args": args} if args is not None else {}),
    }
    redo = drop_damaged(out, meta)
    dtype = DTYPES[cfg.dtype]
    if streamed:
        _prepare_stream(dataset, cfg, out, meta, vae, device, dtype, redo)
    else:
        done_files = {s["file"] for s in meta["shards"]}
        shards = [(k, range(k * size, min(rows, (k + 1) * size))) for k in range((rows + size - 1) // size)]
        todo = [(k, r) for k, r in shards if f"shard-{k:05d}.pt" not in done_files]
        bar = tqdm(total=rows, initial=rows - sum(len(r) for _, r in todo), unit="img", desc=f"prepare -> {out}")
        for k, row_range in todo:
            loader = DataLoader(
                Subset(dataset, list(row_range)),
                batch_size=batch_size,
                num_workers=int(cfg.num_workers),
                collate_fn=collate,
            )
            _save_shard(out, meta, k, loader, (row_range.start, row_range.stop), vae, device, dtype)
            bar.update(len(row_range))
        bar.close()
    meta["num_rows"] = meta["done"]
    meta["complete"] = True
    meta_path.write_text(json.dumps(meta, indent=2))
    kept = sum(s["count"] for s in meta["shards"])
    print(
        f"bksdm_lab.prepare: {kept} of {meta['num_rows']} samples cached in {out} ({len(meta['shards'])} shards); "
        f"skipped {({k: v for k, v in meta['skipped'].items() if v}) or 'none'}"
    )
    print(f"  train with: python -m bksdm_lab.train data=latents data.root={out} teacher={cfg.teacher.name}")
    return out


def _prepare_stream(dataset, cfg: DictConfig, out: Path, meta: dict, vae, device, dtype, redo: list[dict]) -> None:
    """A stream (WebDataset shards), read in order: shard k holds the next shard_size / batch_size batches.
    A resumed run skips, undecoded, the batches of the shards already written; a damaged shard (``redo``) is encoded
    again from its place in the stream."""
    batch_size, per_shard = int(cfg.batch_size), int(cfg.shard_size) // int(cfg.batch_size)
    dataset.batch_size = batch_size

    def batches_from(done_batches: int) -> DataLoader:
        dataset.set_epoch(0)
        dataset.resume_epoch, dataset.resume_batches = (0, done_batches) if done_batches else (-1, 0)
        return DataLoader(dataset, batch_size=batch_size, num_workers=int(cfg.num_workers), collate_fn=collate)

    listed = meta["shards"] + redo
    for entry in redo:
        before = sum(s["batches"] for s in listed if s["file"] < entry["file"])
        batches = itertools.islice(batches_from(before), entry["batches"])
        k = int(entry["file"].removeprefix("shard-").removesuffix(".pt"))
        _save_shard(out, meta, k, batches, tuple(entry["rows"]), vae, device, dtype)
    loader = batches_from(sum(s.get("batches", 0) for s in meta["shards"]))
    k, start, pending = len(meta["shards"]), meta["done"], []
    bar = tqdm(initial=start, unit="img", desc=f"prepare -> {out}")
    for batch in loader:
        pending.append(batch)
        if len(pending) == per_shard:
            stop = start + sum(b["num_samples"] for b in pending)
            _save_shard(out, meta, k, pending, (start, stop), vae, device, dtype)
            bar.update(stop - start)
            k, start, pending = k + 1, stop, []
    if pending:
        stop = start + sum(b["num_samples"] for b in pending)
        _save_shard(out, meta, k, pending, (start, stop), vae, device, dtype)
        bar.update(stop - start)
    bar.close()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="prepare")
def main(cfg: DictConfig) -> None:
    quiet_libraries()
    guarded("prepare", prepare, cfg, (TeacherLoadError, DataError))
