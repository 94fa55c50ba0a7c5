"""Distil a block-removed student U-Net from a frozen teacher.

python -m bksdm_lab.train                                  # the paper: BK-SDM-Tiny from SD-v1.4
python -m bksdm_lab.train experiment=demo                  # offline, 2 CPU cores, about 3 minutes
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from bksdm_lab import CONF_DIR
from bksdm_lab.common import rundir
from bksdm_lab.common.checkpoint import AtomicCheckpointIO, CheckpointError, DiskFullError, FinalCheckpoint
from bksdm_lab.common.cli import check_group_choices, guarded
from bksdm_lab.common.interrupt import EXIT_CODE as INTERRUPTED_EXIT
from bksdm_lab.common.interrupt import Interrupted, StopOnInterrupt
from bksdm_lab.common.quiet import quiet_libraries
from bksdm_lab.common.secrets import redact, redact_dirname, redact_text, shareable
from bksdm_lab.data.common import DataError, build_datamodule
from bksdm_lab.distill import checks
from bksdm_lab.distill.callbacks import ExportPipeline
from bksdm_lab.distill.module import NonFiniteLossError
from bksdm_lab.evaluation.callback import generation_problems
from bksdm_lab.models.students import WeightMapError, count_params, init_student_from_teacher, removed_blocks
from bksdm_lab.models.teachers import TeacherLoadError, load_teacher, probe_teacher

log = logging.getLogger("bksdm_lab")


class InputError(RuntimeError):
    """An input that cannot work (a config value, the teacher, the data, the checkpoint); lists every one at once."""


class NothingTrainedError(RuntimeError):
    """The fit ended without a single optimizer step: nothing is exported and the run does not exit 0."""


def check_inputs(cfg: DictConfig, ckpt_path: str | None, probe_teacher_models: bool = True) -> None:
    """Fail fast, before any heavy loading, on every bad input at once: config values and the optimizer's arguments,
    the checkpoint to resume, the data, the teacher (``probe_teacher_models=False`` when the caller brings the
    teacher's models itself)."""
    problems = checks.check_values(cfg)
    problems += checks.check_call_args(cfg, "optimizer", given_later=("params",))
    problems += checks.check_call_args(cfg, "lr_scheduler", given_later=("optimizer",))
    problems += checks.check_global_batch(cfg)
    problems += generation_problems(cfg)  # sampling values, the evaluation's reference statistics
    if ckpt_path is not None:
        problems += checks.check_resume(cfg, ckpt_path)
    if probe_teacher_models:
        try:
            probe_teacher(cfg.teacher)
        except TeacherLoadError as err:
            problems.append(str(err))
    problems += checks.check_data(cfg)
    if problems:
        raise InputError("\n".join(problems))


def run_name(cfg: DictConfig) -> str:
    if cfg.run_name:
        return str(cfg.run_name)
    overrides = HydraConfig.get().job.override_dirname if HydraConfig.initialized() else ""
    return redact_dirname(overrides) or f"{cfg.arch.name}-{cfg.teacher.name}"


def resolve_ckpt_path(cfg: DictConfig, out_dir: Path) -> str | None:
    """The checkpoint to resume: ``ckpt_path`` (``last``: ``<run dir>/checkpoints/last.ckpt``), or, when it is unset
    and SLURM has requeued this job (after a time-out or a pre-emption; the same job runs again in the same run
    folder), the run folder's newest checkpoint (:func:`bksdm_lab.common.rundir.requeue_checkpoint`)."""
    if cfg.ckpt_path in (None, ""):
        requeued = rundir.requeue_checkpoint(out_dir)
        if requeued is not None:
            log.info(
                "SLURM requeued this job (SLURM_RESTART_COUNT=%d): resuming from %s", rundir.slurm_restarts(), requeued
            )
            print(f"bksdm_lab: requeued job: resuming from {requeued}", file=sys.stderr, flush=True)
            return str(requeued)
        return None
    if cfg.ckpt_path == "last":
        path = out_dir / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path=last but {path} does not exist (resume needs the same hydra.run.dir)")
        return str(path)
    if not Path(cfg.ckpt_path).expanduser().is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r} does not exist")
    return str(Path(cfg.ckpt_path).expanduser())


def parameter_summary(module, teacher, student, cfg: DictConfig) -> dict:
    """Parameter counts and the removed teacher blocks, logged with the config."""
    trainable = count_params(module, trainable_only=True)
    removed = removed_blocks(student.state_dict(), teacher.unet.state_dict(), cfg.arch.weight_map or {})
    log.info(
        "student %s: %s U-Net parameters (teacher %s); removed: %s",
        cfg.arch.name,
        f"{count_params(student):,}",
        f"{count_params(teacher.unet):,}",
        ", ".join(removed) or "nothing",
    )
    return {
        "arch": cfg.arch.name,
        "teacher": cfg.teacher.name,
        "params/teacher_unet": count_params(teacher.unet),
        "params/student_unet": count_params(student),
        "params/total": count_params(module),
        "params/trainable": trainable,
        "params/frozen": count_params(module) - trainable,
        "removed_blocks": removed,
    }


def train(cfg: DictConfig) -> tuple[dict, pl.Trainer]:
    """inputs -> teacher -> student -> loss -> module -> data -> loggers -> callbacks -> trainer -> fit. Logs the config
    first and finishes the W&B run (marked failed unless the fit returned after training a step)."""
    out_dir = Path(cfg.paths.output_dir)
    cfg.run_name = run_name(cfg)
    run_config = shareable(redact(OmegaConf.to_container(cfg, resolve=True)))  # W&B, hparams, checkpoint, card
    pl.seed_everything(cfg.seed, workers=True)
    try:
        ckpt_path = resolve_ckpt_path(cfg, out_dir)
        check_inputs(cfg, ckpt_path)
    except Exception:
        rundir.drop_staged(out_dir)  # an overwrite=true start refused: the earlier run stays as it was
        raise
    clear = cfg.overwrite and rundir.launched_rank() == 0 and not rundir.resumes_here(ckpt_path, out_dir)
    if clear and (removed := rundir.replace_run(out_dir)):
        log.info("overwrite=true: removed the earlier run's %s from %s", ", ".join(removed), out_dir)

    teacher = load_teacher(cfg.teacher, load_vae=not checks.uses_cached_latents(cfg.data))  # cached: no VAE at all
    student = init_student_from_teacher(teacher.unet, cfg.arch)
    module = instantiate(cfg.module)(
        teacher=teacher, student=student, loss=instantiate(cfg.loss), run_config=run_config
    )
    datamodule = build_datamodule(cfg.data, teacher.tokenizer)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    # a resumed run continues metrics.csv: Lightning's writer would delete it, and CSVLogger takes no writer argument
    if ckpt_path is not None:
        for logger in loggers:
            if isinstance(logger, CSVLogger):
                logger._experiment = rundir.ContinuedCSVWriter(logger.log_dir)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    warn_at_end(callbacks)
    callbacks = [FinalCheckpoint(), *callbacks, interrupt := StopOnInterrupt(out_dir)]
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()])
    set_accumulation(trainer, datamodule, run_config)
    if not getattr(datamodule, "val_samples", 0):
        trainer.limit_val_batches = 0  # nothing held out: no validation loop, so Lightning asks for no empty loader
    summary = parameter_summary(module, teacher, module.student, cfg)

    for logger in loggers:
        logger.log_hyperparams({"config": run_config, **summary})
    fit(
        trainer, module, datamodule, ckpt_path, interrupt,
        "so nothing was exported: check trainer.max_steps, trainer.max_epochs and trainer.limit_train_batches against "
        "the data",
    )  # fmt: skip
    return {**summary, **outputs(trainer, out_dir)}, trainer


def fit(trainer: pl.Trainer, module, datamodule, ckpt_path, interrupt: StopOnInterrupt, hint: str) -> None:
    """``trainer.fit``, refused (:class:`NothingTrainedError`, ``hint`` says what to check) when it trained no optimizer
    step, and the W&B run finished: marked failed unless the fit returned after training a step."""
    exit_code = 1  # what W&B records: anything but a fit that returned is a failure
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        if interrupt.start_step is None or trainer.global_step <= interrupt.start_step:
            raise NothingTrainedError(
                f"the run trained 0 optimizer steps (it ended at step {trainer.global_step}), {hint}"
            )
        exit_code = 0
    except Interrupted:
        exit_code = INTERRUPTED_EXIT
        raise
    finally:
        import wandb

        wandb.finish(exit_code=exit_code)  # failed or interrupted runs are marked failed; the next job starts clean


def warn_at_end(callbacks: list[pl.Callback]) -> None:
    """A side job failing as training ends (a logger's upload of the last samples, ...) is a warning, not a failed
    run: the final checkpoint is written before (:class:`FinalCheckpoint`). The checkpoint and export are no side job."""
    for callback in callbacks:
        if not isinstance(callback, (ModelCheckpoint, ExportPipeline)):
            callback.on_train_end = _warning_on_failure(callback.on_train_end, type(callback).__name__)


def _warning_on_failure(hook, name: str):
    def on_train_end(trainer, module) -> None:
        try:
            hook(trainer, module)
        except Exception as err:  # noqa: BLE001 - the trained weights are saved; say what did not work
            log.warning("%s failed at the end of training (the checkpoint is saved): %s", name, redact_text(err))

    return on_train_end


def set_accumulation(trainer: pl.Trainer, datamodule, run_config: dict | None = None) -> None:
    """The accumulation, now that the world size is known (:func:`bksdm_lab.distill.checks.accumulation`: the global
    batch decides when set), recorded in ``run_config`` (logged, checkpointed, on the model card) as it runs."""
    try:
        trainer.accumulate_grad_batches = checks.accumulation(
            getattr(datamodule, "global_batch_size", None),
            datamodule.batch_size,
            trainer.world_size,
            trainer.accumulate_grad_batches,
        )
    except ValueError as err:
        raise InputError(str(err)) from None
    if run_config is not None:
        run_config["trainer"]["accumulate_grad_batches"] = trainer.accumulate_grad_batches
    log.info(
        "global batch %d = micro-batch %d x accumulation %d x %d device(s)",
        datamodule.batch_size * trainer.accumulate_grad_batches * trainer.world_size,
        datamodule.batch_size,
        trainer.accumulate_grad_batches,
        trainer.world_size,
    )


def outputs(trainer: pl.Trainer, out_dir: Path) -> dict:
    """Where the run wrote what (printed at the end)."""
    ckpt = trainer.checkpoint_callback
    export = next((c for c in trainer.callbacks if isinstance(c, ExportPipeline)), None)
    csv = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
    wandb_logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
    wandb_dir = getattr(wandb_logger.experiment, "dir", None) if wandb_logger and trainer.is_global_zero else None
    files = {
        "checkpoint": Path(ckpt.dirpath) / "last.ckpt" if ckpt is not None and ckpt.dirpath else None,
        "csv": Path(csv.log_dir) / "metrics.csv" if csv else None,
        "wandb": Path(wandb_dir).parent if isinstance(wandb_dir, str) else None,
    }
    return {
        "run_dir": str(out_dir),
        **{key: str(path) for key, path in files.items() if path is not None and path.exists()},  # only what exists
        **(export.exported if export else {}),
        "steps": trainer.global_step,
    }


USER_ERRORS = (
    TeacherLoadError,
    DataError,
    InputError,
    WeightMapError,
    FileNotFoundError,
    NonFiniteLossError,
    CheckpointError,
    DiskFullError,
    NothingTrainedError,
)


def start_process(offline: bool = False) -> None:
    """What a command that trains sets first: the libraries' known notes off, TF32 matmuls, no tokenizer threads,
    and W&B offline when the run config says ``offline``."""
    quiet_libraries()
    torch.set_float32_matmul_precision("high")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if offline:
        os.environ["WANDB_MODE"] = "offline"


def until_interrupted(command: str, fn):
    """``fn`` (a command's run); Ctrl-C (which stops a sweep too) exits with its own code, naming the checkpoint saved."""

    def run(cfg: DictConfig):
        try:
            return fn(cfg)
        except Interrupted as stop:
            print(
                f"bksdm_lab.{command}: {stop}; resume with the same hydra.run.dir and ckpt_path=last", file=sys.stderr
            )
            raise SystemExit(INTERRUPTED_EXIT) from None

    return run


def print_finished(what: str, rows: dict, keys, metrics) -> None:
    """The end of a run on the console: where it wrote what (``keys`` of ``rows`` that are set) and its last losses."""
    losses = [f"{k} {float(v):.4g}" for k, v in metrics.items() if k == "train/loss" or k.startswith("train/loss_")]
    print(f"\nbksdm_lab: {what} finished")
    for key in keys:
        if rows.get(key) is not None:
            print(f"  {key:<10} {rows[key]}")
    if losses:
        print(f"  {'losses':<10} {', '.join(losses)}")


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train; returns ``cfg.optimized_metric`` (its last logged value) for sweepers."""
    start_process(offline=cfg.offline)
    finished = guarded("train", until_interrupted("train", train), cfg, USER_ERRORS)
    if finished is None:  # a failed job of a sweep (marked FAILED; the others still run)
        return None
    summary, trainer = finished
    if trainer.is_global_zero:
        samples = ((cfg.get("callbacks") or {}).get("samples") or {}).get("out_dir")
        rows = {**summary, "samples": samples if samples and Path(samples).is_dir() else None}
        keys = ("run_dir", "checkpoint", "csv", "wandb", "samples", "pipeline", "lora", "hub", "steps")
        print_finished("run", rows, keys, trainer.callback_metrics)
    metric = trainer.callback_metrics.get(cfg.optimized_metric)
    return float(metric) if metric is not None else None


if __name__ == "__main__":
    check_group_choices("train")
    main()
