"""Distil a block-removed student U-Net from a frozen teacher.

python -m bksdm_lab.train                                  # the paper: BK-SDM-Tiny from SD-v1.4
python -m bksdm_lab.train arch=base teacher=sd21base       # BK-SDM-v2-Base
python -m bksdm_lab.train experiment=demo                  # offline, 2 CPU cores, < 3 minutes
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
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bksdm_lab import CONF_DIR
from bksdm_lab.common.checkpoint import AtomicCheckpointIO
from bksdm_lab.common.secrets import redact, redact_dirname, redact_override, scrub_hydra_dir
from bksdm_lab.data.common import DataError
from bksdm_lab.data.folder import check_folder
from bksdm_lab.data.latents import read_meta
from bksdm_lab.distill.module import DistillModule, NonFiniteLossError
from bksdm_lab.models.export import card_info, export_pipeline, push_to_hub
from bksdm_lab.models.students import WeightMapError, count_params, init_student_from_teacher, removed_blocks
from bksdm_lab.models.teachers import TeacherLoadError, load_teacher, probe_teacher
from bksdm_lab.tools import demo

log = logging.getLogger("bksdm_lab")


class InputError(RuntimeError):
    """The teacher or the data cannot be found; lists every such problem at once."""


def prepare_inputs(cfg: DictConfig) -> None:
    """Build the demo's teacher and data if asked to; fail fast, before any heavy loading, on missing inputs."""
    if cfg.teacher.get("build_if_missing"):
        demo.build_demo_teacher(cfg.teacher.pretrained, configs=cfg.teacher.configs)
    if cfg.data.get("synthetic"):
        demo.make_synthetic_dataset(cfg.data.root, **cfg.data.synthetic)
    problems = []
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
    """Fail fast on a missing data folder or latent cache (streamed formats are checked when read)."""
    if uses_cached_latents(data_cfg):
        read_meta(data_cfg.root)
    elif str(data_cfg.get("_target_", "")).endswith("FolderDataModule"):
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


def train(cfg: DictConfig) -> dict:
    """data -> teacher -> student -> loss -> module -> loggers -> callbacks -> trainer -> fit -> export."""
    out_dir = Path(cfg.paths.output_dir)
    scrub_hydra_dir(out_dir)
    sys.argv[:] = [redact_override(a) for a in sys.argv]  # W&B records the command line
    if cfg.run_name is None:
        cfg.run_name = run_name(cfg)
    run_config = redact(OmegaConf.to_container(cfg, resolve=True))
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.hub.push and not cfg.hub.repo_id:
        raise InputError("hub.push=true needs hub.repo_id=<user>/<name>")
    prepare_inputs(cfg)
    ckpt_path = resolve_ckpt_path(cfg, out_dir)

    teacher = load_teacher(cfg.teacher, load_vae=not uses_cached_latents(cfg.data))  # cached: no VAE at all
    student = init_student_from_teacher(teacher.unet, cfg.arch)
    loss = instantiate(cfg.loss)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg.pop("synthetic", None)
    max_skipped_fraction = data_cfg.pop("max_skipped_fraction", 0.05)
    skip_check_after = data_cfg.pop("skip_check_after", 1000)
    datamodule = instantiate(data_cfg, tokenizer=teacher.tokenizer)
    module = DistillModule(
        teacher,
        student,
        loss,
        optimizer=instantiate(cfg.optimizer),
        lr_scheduler=instantiate(cfg.lr_scheduler) if cfg.lr_scheduler else None,
        gradient_checkpointing=cfg.gradient_checkpointing,
        ema=cfg.ema,
        nonfinite=cfg.nonfinite,
        seed=cfg.seed,
        run_config=run_config,
        max_skipped_fraction=max_skipped_fraction,
        skip_check_after=skip_check_after,
    )
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()])

    summary = {
        "arch": cfg.arch.name,
        "teacher": cfg.teacher.name,
        "params/teacher_unet": count_params(teacher.unet),
        "params/student_unet": count_params(student),
        "params/total": count_params(module),
        "params/trainable": count_params(module, trainable_only=True),
        "params/frozen": count_params(module) - count_params(module, trainable_only=True),
    }
    removed = removed_blocks(student.state_dict(), teacher.unet.state_dict(), cfg.arch.weight_map or {})
    log.info(
        "student %s: %s U-Net parameters (teacher %s); removed: %s",
        cfg.arch.name,
        f"{summary['params/student_unet']:,}",
        f"{summary['params/teacher_unet']:,}",
        ", ".join(removed) or "nothing",
    )
    for logger in loggers:
        logger.log_hyperparams({"config": run_config, **summary, "removed_blocks": removed})

    wandb_dir = None
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        for logger in loggers:
            if type(logger).__name__ == "WandbLogger":
                wandb_dir = logger.experiment.dir
        if cfg.export_pipeline and trainer.is_global_zero:
            weights = "ema" if module.ema_student is not None else "student"
            unet = module.ema_student if weights == "ema" else module.student
            card = card_info(
                run_config,
                teacher,
                unet,
                trainer.global_step,
                weights,
                checkpoint=str(out_dir / "checkpoints" / "last.ckpt"),
            )
            summary["pipeline"] = str(export_pipeline(teacher, unet, out_dir / "pipeline", card=card))
            if cfg.hub.push:
                summary["hub"] = push_to_hub(
                    out_dir / "pipeline", cfg.hub.repo_id, token=cfg.hub.token, private=cfg.hub.private
                )
    finally:
        import wandb

        wandb.finish()  # one failed multirun job must not break the next

    ckpt = trainer.checkpoint_callback
    summary.update(
        run_dir=str(out_dir),
        checkpoint=str(Path(ckpt.dirpath) / "last.ckpt") if ckpt is not None and ckpt.dirpath else None,
        csv=next((str(Path(lg.log_dir) / "metrics.csv") for lg in loggers if type(lg).__name__ == "CSVLogger"), None),
        wandb=str(Path(wandb_dir).parent) if wandb_dir else None,
        steps=trainer.global_step,
    )
    print("\nbksdm_lab: run finished")
    for key in ("run_dir", "checkpoint", "csv", "wandb", "pipeline", "hub", "steps"):
        if summary.get(key) is not None:
            print(f"  {key:<10} {summary[key]}")
    return summary


USER_ERRORS = (TeacherLoadError, DataError, InputError, WeightMapError, FileNotFoundError, NonFiniteLossError)


FAILED_MARKER = "FAILED"


class SweepFailures(Callback):
    """Hydra callback: after a multirun, exit non-zero listing the jobs that failed (the others still ran)."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        failed = sorted(Path(config.hydra.sweep.dir).glob(f"*/{FAILED_MARKER}"))
        if failed:
            print(f"bksdm_lab.train: {len(failed)} multirun job(s) failed:", file=sys.stderr)
            for marker in failed:
                print(f"  {marker.parent}: {marker.read_text().strip()}", file=sys.stderr)
            raise SystemExit(1)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    torch.set_float32_matmul_precision("high")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if cfg.offline:
        os.environ["WANDB_MODE"] = "offline"
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        train(cfg)
    except USER_ERRORS as err:  # a clear message, not a traceback
        print(f"bksdm_lab.train: error: {err}", file=sys.stderr)
        if not multirun:
            raise SystemExit(2) from None
        Path(cfg.paths.output_dir, FAILED_MARKER).write_text(f"{type(err).__name__}: {err}\n")
    except Exception as err:
        if not multirun:
            raise
        # one failed sweep job must not stop the others: record it, SweepFailures reports at the end
        traceback.print_exc()
        Path(cfg.paths.output_dir, FAILED_MARKER).write_text(f"{type(err).__name__}: {err}\n")


if __name__ == "__main__":
    main()
