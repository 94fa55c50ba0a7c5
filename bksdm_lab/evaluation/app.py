"""An evaluation command run as a Hydra app: where its run folder is, and errors as one-line messages.

Shared by ``python -m bksdm_lab.generate`` and ``python -m bksdm_lab.evaluate``: a user error (a missing file,
a model that does not load, ...) prints ``bksdm_lab.<command>: error: <message>`` and exits 2; in a multirun
(``-m``) the job is marked ``FAILED`` in its folder instead, the other jobs still run, and the sweep exits 1 at
the end listing the failures (``bksdm_lab.common.hydra.SweepFailures``, in the command's ``hydra.callbacks``).
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from bksdm_lab.common.hydra import FAILED_MARKER


def run_dir(cfg) -> Path:
    """This run's folder: Hydra's output dir (``hydra.run.dir``, or the job's folder of a sweep); without Hydra
    (a config composed in Python), ``cfg.out``."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path(cfg.out)


def _multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def guarded(command: str, fn: Callable[[Any], Any], cfg, errors: tuple[type[BaseException], ...]) -> Any:
    """``fn(cfg)``, with ``errors`` turned into a one-line message and exit 2 (or a FAILED job of a sweep)."""
    try:
        return fn(cfg)
    except errors as err:
        print(f"bksdm_lab.{command}: error: {err}", file=sys.stderr)
        if not _multirun():
            raise SystemExit(2) from None
        _mark_failed(cfg, err)
    except Exception as err:
        if not _multirun():
            raise
        traceback.print_exc()
        _mark_failed(cfg, err)
    return None


def _mark_failed(cfg, err: BaseException) -> None:
    folder = run_dir(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FAILED_MARKER).write_text(f"{type(err).__name__}: {err}\n")
