"""Checkpoints written atomically (a write killed half-way never leaves a corrupt file, ``last`` included), the final
one before anything else at the end of a fit, and read by one reader that unpickles only tensors and plain data:
reading a checkpoint never runs code."""

from __future__ import annotations

import errno
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


class CheckpointError(ValueError):
    """A checkpoint cannot be read or used; the message says why in one line, naming the file."""


def read_checkpoint(path: str | Path, name: str | None = None, *, mmap: bool = False) -> Any:
    """What ``torch.save`` wrote to ``path``, on the CPU, unpickling only tensors and plain data (``weights_only``):
    a missing file, an incomplete archive or one holding other objects is a CheckpointError naming the file as
    ``name`` (default ``checkpoint '<path>'``), and no message ever suggests loading it unsafely. ``mmap``: the
    tensors stay in the file until read (a quick look at a large checkpoint)."""
    name = name or f"checkpoint {str(path)!r}"
    if not Path(path).is_file():
        raise CheckpointError(f"{name} does not exist")
    unreadable = f"{name} is not a readable PyTorch checkpoint (truncated, or not written by bksdm_lab.train)"
    if not zipfile.is_zipfile(path):  # torch.save's format is a zip archive; a truncated one has lost its directory
        raise CheckpointError(f"{unreadable}: not a complete PyTorch checkpoint archive")
    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as err:  # noqa: BLE001 - a corrupt or foreign file: one line, never an unsafe hint
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, pickle.UnpicklingError):  # torch's weights_only refusal, whose text says how to force it
            first = f"it holds objects other than tensors and plain data{_unsafe_globals(path)}"
        raise CheckpointError(f"{unreadable}: {first}") from None


def _unsafe_globals(path: str | Path) -> str:
    """`` (module.Name, ...)``: the classes and functions a checkpoint's pickle names that are not plain data, read
    from the pickle without running it."""
    try:
        found = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # noqa: BLE001 - only a detail of the message
        return ""
    return f" ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''})" if found else ""


class DiskFullError(OSError):
    """A checkpoint could not be written for lack of space; the message says where (the previous file is intact)."""

    def __str__(self) -> str:
        return str(self.strerror)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temporary file beside the target, flush it to disk, then rename it over the target; load (a resume)
    through :func:`read_checkpoint`, tensors and plain data only whatever the caller asks."""

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return read_checkpoint(path)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a process killed mid-write
            if stale != tmp:
                stale.unlink(missing_ok=True)
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:
            if not (code := _disk_full(err, path.parent)):
                raise
            kept = f"; the previous {path.name} is intact" if path.is_file() else ""
            raise DiskFullError(
                code,
                f"no space left on device while writing the checkpoint {path}{kept}: free space in "
                f"{path.parent} (or point callbacks.checkpoint.dirpath elsewhere) and resume with ckpt_path=last",
            ) from None
        finally:
            tmp.unlink(missing_ok=True)


def _disk_full(err: BaseException, folder: Path) -> int:
    """The errno (ENOSPC, EDQUOT) when ``err``, raised while writing into ``folder``, means no space is left, else 0.
    torch's zip writer reports a failed write as ``RuntimeError: ... unexpected pos ...`` / ``file write failed``,
    with the OSError at most as its context."""
    cause, seen = err, 0
    while cause is not None and seen < 8:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return cause.errno
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    try:
        return errno.ENOSPC if isinstance(err, RuntimeError) and shutil.disk_usage(folder).free == 0 else 0
    except OSError:
        return 0


class FinalCheckpoint(pl.Callback):
    """At the end of a fit, write ``last.ckpt`` before any other end hook runs (Lightning runs the checkpoint
    callback's own last): a logger or side job failing at the end cannot lose the trained weights, and the export,
    which comes after, holds only what a written checkpoint holds (a failed write stops the fit before it)."""

    def on_train_end(self, trainer, module) -> None:
        ckpt = trainer.checkpoint_callback
        if ckpt is None or not ckpt.save_last or ckpt._last_global_step_saved == trainer.global_step:
            return  # no last.ckpt kept, or written at this step already
        # private: no public ModelCheckpoint call writes last.ckpt with its own bookkeeping (what resume reads)
        ckpt._save_last_checkpoint(trainer, ckpt._monitor_candidates(trainer))
