"""A command's user errors (a missing file, a bad value, a model that does not load, ...) as one line,
``bksdm_lab.<command>: error: <message>`` on stderr, and exit 2, never a traceback. In a multirun (``-m``) of a
command whose sweep lists its failures at the end (:class:`~bksdm_lab.common.hydra.SweepFailures` in its
``hydra.callbacks``), a failed job is marked ``FAILED`` in its folder instead and the other jobs still run.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from bksdm_lab.common.hydra import FAILED_MARKER, SweepFailures


def say_error(command: str, message: object) -> None:
    """Print ``bksdm_lab.<command>: error: <message>`` on stderr."""
    print(f"bksdm_lab.{command}: error: {message}", file=sys.stderr)


def fail(command: str, message: object) -> NoReturn:
    """:func:`say_error`, then exit 2."""
    say_error(command, message)
    raise SystemExit(2) from None


def guarded(command: str, fn: Callable[[Any], Any], cfg: Any, errors: tuple[type[BaseException], ...]) -> Any:
    """``fn(cfg)``, with ``errors`` turned into :func:`fail`; in a sweep that goes on past a failure, any error
    marks the job ``FAILED`` (``errors`` in one line, others with their traceback) and returns None."""
    try:
        return fn(cfg)
    except errors as err:
        if not _sweep_goes_on():
            fail(command, err)
        say_error(command, err)
        _mark_failed(err)
    except Exception as err:
        if not _sweep_goes_on():
            raise
        traceback.print_exc()
        _mark_failed(err)
    return None


def _sweep_goes_on() -> bool:
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return False
    target = f"{SweepFailures.__module__}.{SweepFailures.__qualname__}"
    return any(callback.get("_target_") == target for callback in (HydraConfig.get().callbacks or {}).values())


def _mark_failed(err: BaseException) -> None:
    folder = Path(HydraConfig.get().runtime.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FAILED_MARKER).write_text(f"{type(err).__name__}: {err}\n")


def check_group_choices(command: str, argv: list[str] | None = None) -> None:
    """A config-group override naming no option of its group (``arch=tinyy``, ``finetune=ful``) as one line, exit 2,
    before Hydra composes anything (Hydra's own report spans a dozen lines, with its search path)."""
    from bksdm_lab.common.conf import CONF_DIR

    for arg in sys.argv[1:] if argv is None else argv:
        key, sep, value = arg.partition("=")
        group = CONF_DIR / key.lstrip("+")
        # plugins add options to hydra/*; sweep functions (choice(...), range(...)) are Hydra's to expand
        if not sep or key.startswith(("~", "hydra")) or "." in key or "(" in value or not group.is_dir():
            continue
        choices = sorted(p.stem for p in group.glob("*.yaml"))
        for option in value.split(","):  # a multirun's a,b,c
            if option not in (*choices, "null") and not (group / option).is_dir():
                fail(command, f"{key}={option!r} is not one of: {', '.join(choices)}")
