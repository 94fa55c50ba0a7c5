"""Checkpoints written atomically (a write killed half-way never leaves a corrupt file, ``last`` included), and
read by one reader that unpickles only tensors and plain data: reading a checkpoint never runs code."""

from __future__ import annotations

import errno
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

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
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            kept = f"; the previous {path.name} is intact" if path.is_file() else ""
            raise DiskFullError(
                err.errno,
                f"no space left on device while writing the checkpoint {path}{kept}: free space in "
                f"{path.parent} (or point callbacks.checkpoint.dirpath elsewhere) and resume with ckpt_path=last",
            ) from None
        finally:
            tmp.unlink(missing_ok=True)
