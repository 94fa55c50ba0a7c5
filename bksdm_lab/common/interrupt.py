"""Ctrl-C during training: finish the optimizer step in progress, save a checkpoint, say where, stop non-zero.

Lightning's own KeyboardInterrupt handling stops wherever the interrupt lands (mid-accumulation, mid-``optimizer.step``)
and exits 1 without a checkpoint; at a step boundary the state is whole, so the resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path

import pytorch_lightning as pl

EXIT_CODE = 130  # the shell's code for a process stopped by SIGINT


class Interrupted(Exception):
    """The run was stopped by Ctrl-C after saving a checkpoint (``path``) at step ``step``."""

    def __init__(self, step: int, path: str):
        super().__init__(f"interrupted (Ctrl-C) at step {step}; checkpoint saved to {path}")
        self.step, self.path = step, path


class StopOnInterrupt(pl.Callback):
    """The first SIGINT of a fit stops it at the next optimizer step and saves ``<checkpoint dir>/last.ckpt``
    (``ckpt_path=last`` resumes it); the callback raises :class:`Interrupted` with where it saved."""

    def __init__(self, fallback_dir: str | Path):
        self.fallback_dir = Path(fallback_dir)  # without a ModelCheckpoint callback
        self.requested = False
        self._previous = None
        self._step = -1
        self.start_step: int | None = None  # the step this fit started at (None: training never started)

    def _on_sigint(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)  # a second Ctrl-C: stop now
        print(
            "\nbksdm_lab: Ctrl-C: stopping after this optimizer step and saving a checkpoint (Ctrl-C again to stop "
            "at once, without one)",
            file=sys.stderr,
            flush=True,
        )

    def on_train_start(self, trainer, module) -> None:
        self._step = self.start_step = trainer.global_step
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)

    def _restore(self) -> None:
        if self._previous is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        stepped, self._step = trainer.global_step != self._step, trainer.global_step
        if not (self.requested and stepped):
            return  # no stop asked, or still accumulating: the state is whole only after an optimizer step
        ckpt = trainer.checkpoint_callback
        folder = Path(ckpt.dirpath) if ckpt is not None and ckpt.dirpath else self.fallback_dir / "checkpoints"
        path = str(folder / "last.ckpt")
        trainer.save_checkpoint(path)
        self._restore()
        raise Interrupted(trainer.global_step, path)

    def on_train_end(self, trainer, module) -> None:
        self._restore()

    def on_exception(self, trainer, module, exception) -> None:
        self._restore()
