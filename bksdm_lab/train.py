"""Distil a block-removed student U-Net from a frozen teacher.

python -m bksdm_lab.train                                  # the paper: BK-SDM-Tiny from SD-v1.4
python -m bksdm_lab.train arch=base teacher=sd21base       # BK-SDM-v2-Base
python -m bksdm_lab.train experiment=demo                  # offline, 2 CPU cores, about 70 s
python -m bksdm_lab.train -m experiment=demo arch=base,small,tiny
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, WandbLogger

from bksdm_lab import CONF_DIR
from bksdm_lab.common.checkpoint import AtomicCheckpointIO
from bksdm_lab.common.hydra import FAILED_MARKER
from bksdm_lab.common.secrets import redact, redact_dirname, shareable
from bksdm_lab.data.common import DataError
from bksdm_lab.data.folder import check_folder
from bksdm_lab.data.latents import read_meta
from bksdm_lab.distill.callbacks import ExportPipeline
from bksdm_lab.distill.module import NonFiniteLossError
from bksdm_lab.models.students import WeightMapError, count_params, init_student_from_teacher, removed_blocks
from bksdm_lab.models.teachers import TeacherLoadError, load_teacher, probe_teacher
from bksdm_lab.tools import demo

log = logging.getLogger("bksdm_lab")


class InputError(RuntimeError):
    """The teacher or the data cannot be found; lists every such problem at once."""


def check_inputs(cfg: DictConfig) -> None:
    """Build the demo teacher if asked to; fail fast, before any heavy loading, on every missing input at once."""
    if cfg.teacher.get("build_if_missing"):
        demo.build_demo_teacher(cfg.teacher.pretrained, configs=cfg.teacher.configs)
    problems = ["hub.push=true needs hub.repo_id=<user>/<name>"] if cfg.hub.push and not cfg.hub.repo_id else []
    for check in (lambda: probe_teacher(cfg.teacher), lambda: check_data(cfg.data)):
        try:
            check()
        except (TeacherLoadError, DataError) as err:
            problems.append(str(err))
    if problems:
        raise InputError("\n".join(problems))


def uses_cached_latents(data_cfg: DictConfig) -> bool:
    return str(data_cfg.get("_target_", "")).endswith("LatentDataModule")


def check_data(data_cfg: DictConfig) -> None:
    """A missing data folder or latent cache (streamed formats are checked when read; a synthetic set is written)."""
    if uses_cached_latents(data_cfg):
        read_meta(data_cfg.root)
    elif "root" in data_cfg and not data_cfg.get("synthetic"):
        check_folder(data_cfg.root, data_cfg.caption_column, data_cfg.image_column)


def run_name(cfg: DictConfig) -> str:
    if cfg.run_name:
        return str(cfg.run_name)
    overrides = HydraConfig.get().job.override_dirname if HydraConfig.initialized() else ""
    return redact_dirname(overrides) or f"{cfg.arch.name}-{cfg.teacher.name}"


def resolve_ckpt_path(cfg: DictConfig, out_dir: Path) -> str | None:
    if cfg.ckpt_path in (None, ""):
        return None
    if cfg.ckpt_path == "last":
        path = out_dir / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise FileNotFoundError(f"ckpt_path=last but {path} does not exist (resume needs the same hydra.run.dir)")
        return str(path)
    if not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path!r} does not exist")
    return str(cfg.ckpt_path)


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
    """inputs -> teacher -> student -> loss -> module -> data -> loggers -> callbacks -> trainer -> fit."""
    out_dir = Path(cfg.paths.output_dir)
    cfg.run_name = run_name(cfg)
    run_config = shareable(redact(OmegaConf.to_container(cfg, resolve=True)))  # W&B, hparams, checkpoint, card
    pl.seed_everything(cfg.seed, workers=True)
    check_inputs(cfg)
    ckpt_path = resolve_ckpt_path(cfg, out_dir)

    teacher = load_teacher(cfg.teacher, load_vae=not uses_cached_latents(cfg.data))  # cached: no VAE at all
    student = init_student_from_teacher(teacher.unet, cfg.arch)
    module = instantiate(cfg.module)(
        teacher=teacher, student=student, loss=instantiate(cfg.loss), run_config=run_config
    )
    datamodule = instantiate(cfg.data, tokenizer=teacher.tokenizer)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()])

    summary = parameter_summary(module, teacher, student, cfg)
    for logger in loggers:
        logger.log_hyperparams({"config": run_config, **summary})
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        import wandb

        wandb.finish()  # one failed multirun job must not break the next
    return {**summary, **outputs(trainer, out_dir)}, trainer


def outputs(trainer: pl.Trainer, out_dir: Path) -> dict:
    """Where the run wrote what (printed at the end)."""
    ckpt = trainer.checkpoint_callback
    export = next((c for c in trainer.callbacks if isinstance(c, ExportPipeline)), None)
    csv = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
    wandb_logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
    wandb_dir = getattr(wandb_logger.experiment, "dir", None) if wandb_logger and trainer.is_global_zero else None
    return {
        "run_dir": str(out_dir),
        "checkpoint": str(Path(ckpt.dirpath) / "last.ckpt") if ckpt is not None and ckpt.dirpath else None,
        "csv": str(Path(csv.log_dir) / "metrics.csv") if csv else None,
        "wandb": str(Path(wandb_dir).parent) if isinstance(wandb_dir, str) else None,
        **(export.exported if export else {}),
        "steps": trainer.global_step,
    }


USER_ERRORS = (TeacherLoadError, DataError, InputError, WeightMapError, FileNotFoundError, NonFiniteLossError)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Train; returns ``cfg.optimized_metric`` (its last logged value) for sweepers."""
    torch.set_float32_matmul_precision("high")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.offline:
        os.environ["WANDB_MODE"] = "offline"
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        summary, trainer = train(cfg)
    except USER_ERRORS as err:  # a clear message, not a traceback
        print(f"bksdm_lab.train: error: {err}", file=sys.stderr)
        if not multirun:
            raise SystemExit(2) from None
        Path(cfg.paths.output_dir, FAILED_MARKER).write_text(f"{type(err).__name__}: {err}\n")
        return None
    except Exception as err:
        if not multirun:
            raise
        # one failed sweep job must not stop the others: record it, SweepFailures reports at the end
        traceback.print_exc()
        Path(cfg.paths.output_dir, FAILED_MARKER).write_text(f"{type(err).__name__}: {err}\n")
        return None
    if trainer.is_global_zero:
        print("\nbksdm_lab: run finished")
        for key in ("run_dir", "checkpoint", "csv", "wandb", "pipeline", "hub", "steps"):
            if summary.get(key) is not None:
                print(f"  {key:<10} {summary[key]}")
    metric = trainer.callback_metrics.get(cfg.optimized_metric)
    return float(metric) if metric is not None else None


if __name__ == "__main__":
    main()
