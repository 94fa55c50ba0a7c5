"""When the held-out validation loss (``val/loss``, :meth:`DistillModule.validation_step`) is computed during a fit.

Lightning's ``val_check_interval`` counts micro-batches, not optimizer steps, and skips the last step unless the count
divides; :class:`ValidationSchedule` drives Lightning's own validation loop in optimizer steps instead.
"""

from __future__ import annotations

import pytorch_lightning as pl

NEVER = 2**62  # a micro-batch count Lightning never reaches: no validation unless this callback asks for one


class ValidationSchedule(pl.Callback):
    """Validate after every ``every_n_steps``-th optimizer step and, with ``at_end``, after the last one, so a run ends
    with the ``val/loss`` of its final weights (what a sweeper compares); nothing when ``data.val_samples=0``.
    Validation leaves training unchanged: its own loader generator, fixed-key noise, no EMA update, no checkpoint."""

    def __init__(self, every_n_steps: int = 500, at_end: bool = True):
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"callbacks.validation.every_n_steps={every_n_steps!r} must be an integer >= 1")
        self.every_n_steps, self.at_end = every_n_steps, at_end
        self._step = 0  # the optimizer step at the end of the previous micro-batch

    @staticmethod
    def _held_out(trainer) -> bool:
        return bool(getattr(trainer.datamodule, "val_samples", 0)) and trainer.limit_val_batches != 0

    def due(self, step: int, max_steps: int | None) -> bool:
        """Validate after optimizer step ``step``: every ``every_n_steps``, and at the last (``at_end``)."""
        last = self.at_end and max_steps is not None and max_steps > 0 and step >= max_steps
        return step > 0 and (step % self.every_n_steps == 0 or last)

    def on_train_start(self, trainer, module) -> None:
        self._step = trainer.global_step
        if self._held_out(trainer):
            # Lightning's own schedule (micro-batches, per epoch) off: on_train_batch_end decides
            trainer.check_val_every_n_epoch, trainer.val_check_batch = None, NEVER

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        stepped, self._step = trainer.global_step != self._step, trainer.global_step
        if not self._held_out(trainer):
            return
        # Lightning validates right after this hook when this micro-batch's count (over epochs, 1-based) is a
        # multiple of val_check_batch: make it one exactly when an optimizer step that is due has just ended
        due = stepped and self.due(trainer.global_step, trainer.max_steps)
        trainer.val_check_batch = trainer.fit_loop.epoch_loop.total_batch_idx + 1 if due else NEVER
