"""Hydra callbacks shared by the commands: secret redaction and multirun failure reporting."""

from __future__ import annotations

import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from bksdm_lab.common.secrets import redact_override, scrub_hydra_dir

FAILED_MARKER = "FAILED"  # written into a multirun job's folder when the job failed


class RedactSecrets(Callback):
    """After Hydra has written ``.hydra/*.yaml``: rewrite them without secret values, and redact the command
    line (W&B records ``sys.argv``)."""

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.output_subdir is not None:  # .hydra, or .resumes/<time>/.hydra for a resumed run
            scrub_hydra_dir(Path(config.hydra.runtime.output_dir, config.hydra.output_subdir).parent)
        sys.argv[:] = [redact_override(a) for a in sys.argv]


class SweepFailures(Callback):
    """After a multirun, exit non-zero listing the jobs that failed (the others still ran)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        failed = sorted(Path(config.hydra.sweep.dir).glob(f"*/{FAILED_MARKER}"))
        if failed:
            print(f"bksdm_lab: {len(failed)} multirun job(s) failed:", file=sys.stderr)
            for marker in failed:
                print(f"  {marker.parent}: {marker.read_text().strip()}", file=sys.stderr)
            raise SystemExit(1)


class SweepStorage(Callback):
    """Before a multirun: create the folder of a SQLite sweeper storage (SQLite creates the file, not its folder)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        storage = str(config.hydra.sweeper.get("storage") or "")
        if storage.startswith("sqlite:///"):
            Path(storage[len("sqlite:///") :]).expanduser().parent.mkdir(parents=True, exist_ok=True)
