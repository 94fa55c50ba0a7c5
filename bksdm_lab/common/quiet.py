"""The commands' console: the libraries' notes that are known and harmless here are not printed, so that what is
left (the run's own lines, a progress bar, warnings that need an action) gets read. Every command calls
:func:`quiet_libraries` first (``WANDB_SHOW_INFO=true`` brings W&B's banner and end-of-run tables back). The log
filters go on when this module is imported: a library may log while it is imported, before a command's first line."""

from __future__ import annotations

import logging
import os
import warnings

# logger -> parts of the messages it drops: notes that say nothing about the run (the fast-path line names the
# device; the seed is in the config; torchvision is only for the paper's metric models)
NOTES = {
    "transformers.utils.import_utils": ("requires torchvision (not installed); falling back",),
    "pytorch_lightning.utilities.rank_zero": (
        "💡 Tip:",
        "GPU available:",
        "TPU available:",
        "HPU available:",
        "`Trainer(limit_val_batches=1.0)` was configured",
    ),
    "lightning_fabric.utilities.seed": ("Seed set to",),
}
# Python warnings of one library about another's API (Lightning on torch's pytree)
WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


class _DropNotes(logging.Filter):
    def __init__(self, parts: tuple[str, ...]):
        super().__init__()
        self.parts = parts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in self.parts)


def quiet_libraries() -> None:
    """Drop :data:`NOTES` and :data:`WARNINGS`; no loading bars of transformers and diffusers; W&B without its
    banner and end-of-run tables (``WANDB_SHOW_INFO``, unless set; its warnings still print). Idempotent."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    diffusers_logging.disable_progress_bar()
    _drop_notes()
    for message in WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    os.environ.setdefault("WANDB_SHOW_INFO", "false")


def _drop_notes() -> None:
    for name, parts in NOTES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotes) for f in logger.filters):
            logger.addFilter(_DropNotes(parts))


_drop_notes()
