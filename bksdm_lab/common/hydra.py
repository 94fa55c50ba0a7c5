"""Hydra callbacks shared by the commands: secret redaction, multirun failure reporting, stored sweeper studies."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict, read_write

from bksdm_lab.common.secrets import redact_override, scrub_config_file, scrub_hydra_dir

FAILED_MARKER = "FAILED"  # written into a multirun job's folder when the job failed


class RedactSecrets(Callback):
    """Before a run: no secret value in its overrides (Hydra writes them to ``.hydra/`` and prints them when the job
    fails). After Hydra has written ``.hydra/*.yaml``: rewrite them without secret values, and redact the command
    line (W&B records ``sys.argv``). Hydra's log handlers filter secrets out of messages (``RedactLog``)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        with read_write(config.hydra):  # the task's config is composed already: only the record changes
            config.hydra.overrides.task = [redact_override(a) for a in config.hydra.overrides.task]

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.output_subdir is not None:  # .hydra, or .resumes/<time>/.hydra for a resumed run
            scrub_hydra_dir(Path(config.hydra.runtime.output_dir, config.hydra.output_subdir).parent)
        if config.hydra.mode == RunMode.MULTIRUN:  # the sweep's record, written after the sweep started
            scrub_config_file(Path(config.hydra.sweep.dir) / "multirun.yaml")
        sys.argv[:] = [redact_override(a) for a in sys.argv]


class SlurmAvailable(Callback):
    """Before a multirun through SLURM (``hydra/launcher=slurm``): one line and exit 2 where SLURM's ``srun`` and
    ``sbatch``, which submit the jobs, are not on this machine."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        missing = [tool for tool in ("srun", "sbatch") if shutil.which(tool) is None]
        if "SlurmLauncher" in str(config.hydra.launcher.get("_target_", "")) and missing:
            print(
                f"bksdm_lab.train: error: hydra/launcher=slurm submits the jobs with SLURM, but {' and '.join(missing)} "
                "is not on this machine's PATH: start the sweep where SLURM is installed (a login node), or leave out "
                "hydra/launcher=slurm to run the jobs here",
                file=sys.stderr,
            )
            raise SystemExit(2)


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
    """Before a multirun with a stored study (``hydra.sweeper.storage``, as ``hparams_search`` sets): create the folder
    of a SQLite storage (SQLite creates the file, not its folder), and make ``hydra.sweeper.n_trials`` the study's
    total. Hydra's Optuna sweeper runs ``n_trials`` new trials on every start, so the same command run again would add
    as many again; here it runs only the trials the study lacks (finished ones count: complete or pruned; a failed
    or interrupted trial is run again), so a search stopped half-way is resumed by its own command."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweeper = config.hydra.sweeper
        storage = str(sweeper.get("storage") or "")
        if storage.startswith("sqlite:///"):
            Path(storage[len("sqlite:///") :]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        if not storage or "optuna" not in str(sweeper.get("_target_", "")) or sweeper.get("n_trials") is None:
            return
        done = finished_trials(storage, str(sweeper.study_name))
        if not done:
            return
        total = int(sweeper.n_trials)
        left = max(0, total - done)
        print(
            f"bksdm_lab: the study {sweeper.study_name!r} ({storage}) holds {done} finished trial(s): "
            f"{f'running {left} more' if left else 'nothing left to run'} (hydra.sweeper.n_trials={total} in all)",
            file=sys.stderr,
            flush=True,
        )
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.sweeper.n_trials = left


def finished_trials(storage: str, study_name: str) -> int:
    """Complete or pruned trials of an Optuna study (0 when it does not exist yet)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage)
    except KeyError:  # no such study in this storage yet
        return 0
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))
