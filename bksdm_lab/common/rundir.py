"""A run folder holds one run: a new run never writes into a folder holding another unless ``overwrite=true``; a
resumed run (``ckpt_path`` inside the folder) adds to it, its ``.hydra/`` record and log under ``.resumes/<time>/``.
A running run holds its folder (an OS lock on ``.lock``, released by the kernel however the process ends).

The guard is a Hydra callback because Hydra writes ``.hydra/`` and opens the log before the task function runs.
"""

from __future__ import annotations

import csv
import fcntl
import os
import shutil
import socket
from datetime import datetime
from pathlib import Path

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from bksdm_lab.common.cli import fail

# what a training run writes into its folder (the Hydra log is <job name>.log); RESULTS make it hold a run (a start
# that failed its checks leaves only Hydra's record, .hydra/, which the next start may rewrite)
RESULTS = ("checkpoints", "pipeline", "lora", "validation", "csv", "samples", "tensorboard", "wandb")
RUN_FILES = (".hydra", *RESULTS, ".resumes", "FAILED")
RESUMES = ".resumes"
STAGED = ".overwrite"  # the Hydra record and log of an overwrite=true start, until its inputs have passed the checks
LOCK = ".lock"  # held (flock) by the process running in the folder; it says which process that is
_HELD: dict[str, int] = {}  # folder -> open lock file of this process, kept until the process exits


def hold(folder: str | Path, key: str, command: str = "train") -> None:
    """Hold ``folder`` for this process (created if missing) until it exits, however it exits: the kernel drops the
    lock with the process. Exit 2, one line, if another process holds it (naming it) or the folder is not writable."""
    folder = Path(folder).resolve()
    if str(folder) in _HELD:  # this process already runs here (a command run again in-process)
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        fail(command, f"{key}={str(folder)!r} is not writable ({err.strerror}): choose a folder you can write to")
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
        os.close(fd)
        fail(command, f"{key}={str(folder)!r} is in use by a run that is still going ({holder}): wait for it to end, "
                      f"or choose another {key}")  # fmt: skip
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {datetime.now():%Y-%m-%d %H:%M:%S}".encode())
    _HELD[str(folder)] = fd


def release(folder: str | Path) -> None:
    """Let go of a folder :func:`hold` took (a multirun job that ended, in the process that runs the next)."""
    fd = _HELD.pop(str(Path(folder).resolve()), None)
    if fd is not None:
        os.close(fd)


def launched_rank() -> int:
    """This process's rank when a launcher started it (Lightning's DDP children, torchrun, SLURM tasks), else 0.
    Only rank 0 guards, clears or records a run folder; the other ranks join the run rank 0 started."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def run_files(run_dir: str | Path) -> list[str]:
    """The names in ``run_dir`` that belong to a run, if it holds one (results), else none."""
    run_dir = Path(run_dir)
    present = [name for name in RUN_FILES if (run_dir / name).exists()] if run_dir.is_dir() else []
    return present if any(name in RESULTS for name in present) else []


def resumes_here(ckpt_path, run_dir: str | Path) -> bool:
    """``ckpt_path`` continues the run of ``run_dir`` (``last``, a checkpoint in its ``checkpoints/``, or the
    ``hpc_ckpt_<n>.ckpt`` Lightning's SLURM requeue handler saves in it)."""
    if ckpt_path in (None, ""):
        return False
    if str(ckpt_path) == "last":
        return True
    path = Path(str(ckpt_path)).expanduser().resolve()
    if path.parent == Path(run_dir).resolve() and path.name.startswith("hpc_ckpt_"):
        return True
    return path.parent == (Path(run_dir) / "checkpoints").resolve()


def slurm_restarts() -> int:
    """How often SLURM has restarted this job: ``SLURM_RESTART_COUNT``, which SLURM sets in a job requeued after a
    node failure, a pre-emption or an explicit ``scontrol requeue``. The latter is how submitit (hence Hydra's
    submitit launcher, whose ``checkpoint()`` resubmits the same job with the same overrides) and Lightning's own
    SLURM handler requeue a job that is about to time out. 0 outside SLURM or on a first start."""
    try:
        return max(0, int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0))
    except ValueError:
        return 0


def requeue_checkpoint(run_dir: str | Path) -> Path | None:
    """In a requeued SLURM job, the newest checkpoint of the run in ``run_dir`` to continue: ``checkpoints/last.ckpt``,
    or a newer ``hpc_ckpt_<n>.ckpt`` written by Lightning's SLURM handler when the requeue signal came; else None."""
    if not slurm_restarts():
        return None
    run_dir = Path(run_dir)
    found = [p for p in [run_dir / "checkpoints" / "last.ckpt", *run_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def refusal(run_dir: Path, present: list[str], key: str = "hydra.run.dir") -> str:
    return (
        f"{key}={str(run_dir)!r} already holds a run ({', '.join(present)}): nothing there is overwritten unless "
        f"asked. Choose another {key}, continue that run with ckpt_path=last, or replace it with overwrite=true"
    )


def _stamp(run_dir: Path) -> str:
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    n, name = 1, stamp
    while (run_dir / RESUMES / name).exists():
        n, name = n + 1, f"{stamp}_{n}"
    return name


def command_of(config: DictConfig) -> str:
    """The command a Hydra app's config belongs to (its job name: train, finetune, ...), for its error lines."""
    return str(OmegaConf.select(config, "hydra.job.name", default=None) or "train")


class GuardRunDir(Callback):
    """Hold the run folder (:func:`hold`), then refuse (exit 2, one line) to start a run into a folder holding another
    run, unless the run resumes that folder's checkpoint (its Hydra record and log go to ``.resumes/<time>/``) or
    ``overwrite=true`` (they go to ``.overwrite/`` until the inputs have passed their checks: :func:`replace_run`)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if launched_rank() > 0:
            return
        run_dir, command = Path(str(config.hydra.run.dir)), command_of(config)
        hold(run_dir, "hydra.run.dir", command)
        present = run_files(run_dir)
        if not present:
            return
        requeued = config.get("ckpt_path") in (None, "") and requeue_checkpoint(run_dir) is not None
        if requeued or resumes_here(config.get("ckpt_path"), run_dir):
            record = f"{RESUMES}/{_stamp(run_dir)}"
        elif config.get("overwrite"):
            shutil.rmtree(run_dir / STAGED, ignore_errors=True)  # left by a start that was killed
            record = STAGED
        else:
            fail(command, refusal(run_dir, present))
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.output_subdir = f"{record}/.hydra"
            handlers = OmegaConf.select(config, "hydra.job_logging.handlers", default=None)
            if handlers is not None and "file" in handlers:
                (run_dir / record).mkdir(parents=True, exist_ok=True)
                handlers.file.filename = str(run_dir / record / f"{config.hydra.job.name}.log")

    def on_job_start(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.mode == RunMode.MULTIRUN and launched_rank() == 0:  # each job holds its own folder
            hold(config.hydra.runtime.output_dir, "hydra.sweep.subdir", command_of(config))

    def on_job_end(self, config: DictConfig, **kwargs) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            release(config.hydra.runtime.output_dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir, command = Path(str(config.hydra.sweep.dir)), command_of(config)
        hold(sweep_dir, "hydra.sweep.dir", command)
        jobs = [p for p in sorted(sweep_dir.iterdir()) if p.is_dir() and run_files(p)]
        if not jobs:
            return
        if config.get("overwrite"):  # every job's record waits in .overwrite/ until its inputs have passed the checks
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.overrides.hydra.append(f"hydra.output_subdir={STAGED}/.hydra")
            return
        if config.get("ckpt_path") in (None, "") and OmegaConf.select(config, "hydra.sweeper.storage", default=None):
            # a sweeper continuing a stored study (Optuna's SQLite, hparams_search): its new trials are new jobs, each
            # in a new folder beside the earlier ones (its job numbers start at 0 again), never in one of theirs
            subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False)["subdir"]
            prefix = f"continued_{_stamp(sweep_dir)}"
            with read_write(config.hydra), open_dict(config.hydra):
                config.hydra.overrides.hydra.append(f"hydra.sweep.subdir='{prefix}_{subdir}'")
            return
        if config.get("ckpt_path") in (None, ""):
            fail(command, refusal(sweep_dir, [p.name for p in jobs], "hydra.sweep.dir"))  # the whole sweep
        # every job of a resumed sweep records its start beside its run's (the jobs' configs are composed again
        # from these overrides)
        record = f"{RESUMES}/{_stamp(sweep_dir)}"
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.overrides.hydra.append(f"hydra.output_subdir={record}/.hydra")


class ContinuedCSVWriter(ExperimentWriter):
    """``metrics.csv`` of a resumed run: the rows already there are kept and the new ones appended (Lightning's
    writer deletes the file); a new column rewrites the header over all rows. ``hparams.yaml`` is kept as it was
    (the resumed run's config is in its ``.resumes/<time>/.hydra/``)."""

    def _check_log_dir_exists(self) -> None:
        if os.path.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = list(next(csv.reader(f), []))

    def log_hparams(self, params: dict) -> None:
        self.hparams.update(params)
        if not os.path.isfile(os.path.join(self.log_dir, self.NAME_HPARAMS_FILE)):
            super().log_hparams(params)


def clear_run(run_dir: str | Path, keep: tuple[str, ...] = (".hydra",)) -> list[str]:
    """Remove what an earlier run left in ``run_dir`` (but ``keep``)."""
    removed = []
    for name in RUN_FILES if Path(run_dir).is_dir() else ():
        if not (Path(run_dir) / name).exists():
            continue
        if name in keep:
            continue
        path = Path(run_dir) / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        removed.append(name)
    for path in sorted(Path(run_dir).glob("hpc_ckpt_*.ckpt")):  # on SLURM Lightning would resume from these
        path.unlink()
        removed.append(path.name)
    return removed


def replace_run(run_dir: str | Path) -> list[str]:
    """``overwrite=true``, once this run's inputs have passed their checks: remove the earlier run's files and put
    this run's Hydra record and log (staged in ``.overwrite/`` by the guard) in their place."""
    run_dir, staged = Path(run_dir), Path(run_dir) / STAGED
    removed = clear_run(run_dir, keep=() if staged.is_dir() else (".hydra",))
    if staged.is_dir():
        for item in staged.iterdir():
            os.replace(item, run_dir / item.name)  # the log replaces the earlier run's; it stays open where it goes
        staged.rmdir()
    return removed


def drop_staged(run_dir: str | Path) -> None:
    """An ``overwrite=true`` start refused by its checks: the earlier run stays exactly as it was."""
    shutil.rmtree(Path(run_dir) / STAGED, ignore_errors=True)
