"""Write a folder once, atomically: built beside its place and renamed into it, so a crash never leaves half."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path


def publish(build: Callable[[Path], None], out: Path) -> Path:
    """``build(tmp)`` into a temporary sibling of ``out``, then rename it to ``out``; a no-op if ``out`` exists. When
    several processes build at once (the ranks of a run), the first rename wins and the others' copies are removed."""
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    build(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process published first
        shutil.rmtree(tmp, ignore_errors=True)
    return out
