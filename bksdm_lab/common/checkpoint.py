"""Checkpoints written atomically: a write killed half-way never leaves a corrupt file (``last`` included)."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO


class DiskFullError(OSError):
    """A checkpoint could not be written for lack of space; the message says where (the previous file is intact)."""

    def __str__(self) -> str:
        return str(self.strerror)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Save to a temporary file beside the target, flush it to disk, then rename it over the target."""

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
