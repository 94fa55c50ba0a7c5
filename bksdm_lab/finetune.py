"""DreamBooth on an exported student: personalise it with a few photos of a subject (a Hydra app).

python -m bksdm_lab.finetune pipeline=outputs/<run>/pipeline instance.dir=photos/my_dog                 # LoRA
python -m bksdm_lab.finetune finetune=full pipeline=nota-ai/bk-sdm-small instance.dir=photos/my_dog     # every weight
"""

from __future__ import annotations

import re
from pathlib import Path

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger, WandbLogger

import bksdm_lab.common.quiet  # noqa: F401  (first: its log filters drop the libraries' notes printed on import)
from bksdm_lab import CONF_DIR
from bksdm_lab import dreambooth as db
from bksdm_lab.common import rundir
from bksdm_lab.common.checkpoint import AtomicCheckpointIO, CheckpointError, FinalCheckpoint, read_checkpoint
from bksdm_lab.common.cli import check_group_choices, guarded
from bksdm_lab.common.interrupt import StopOnInterrupt
from bksdm_lab.common.secrets import redact, redact_dirname, shareable
from bksdm_lab.distill.checks import check_call_args
from bksdm_lab.evaluation import sampling as gen
from bksdm_lab.evaluation.app import BOOL, Rule, rule_problems, whole
from bksdm_lab.train import (
    USER_ERRORS,
    InputError,
    fit,
    print_finished,
    resolve_ckpt_path,
    start_process,
    until_interrupted,
)


def _positive(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


POSITIVE: Rule = (_positive, "a number > 0")
MODE_RULES: dict[str, Rule] = {"lr": POSITIVE, "train_text_encoder": BOOL, "gradient_checkpointing": BOOL}
LORA_RULES: dict[str, Rule] = {"rank": whole(1), "alpha": POSITIVE}
PRIOR_RULES: dict[str, Rule] = {
    "loss_weight": ((lambda v: _positive(v) or v == 0), "a number >= 0 (0: no prior preservation)"),
    "num_images": whole(1),
}
TOP_RULES: dict[str, Rule] = {
    "resolution": ((lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 8 and v % 8 == 0), "a whole "
                   "number >= 8 divisible by 8"),
    "batch_size": whole(1),
    "num_workers": whole(0),
    "seed": whole(0),
}  # fmt: skip
VALIDATION_RULES: dict[str, Rule] = {"steps": whole(1), "seed": whole(0), "guidance": ((lambda v: _positive(v) and v >= 1),
                                     "a number >= 1")}  # fmt: skip


def words(text: str) -> list[str]:
    return re.findall(r"[^\s,.;:!?()\[\]\"]+", str(text))


def _missing(node, key: str) -> bool:
    return OmegaConf.is_missing(node, key) or node.get(key) in (None, "")


def instance_problems(cfg: DictConfig) -> list[str]:
    """The subject's folder holds images; the identifier is a word of the instance prompt, not of the class prompt."""
    inst, problems = cfg.instance, []
    if _missing(inst, "dir"):
        problems.append("instance.dir= is required: a folder of the subject's photos (png, jpg; 3 to 5 in the paper)")
    elif not Path(str(inst.dir)).expanduser().is_dir():
        problems.append(
            f"instance.dir={str(inst.dir)!r} does not exist ({Path(str(inst.dir)).expanduser().absolute()})"
        )
    elif not db.subject_images(inst.dir):
        found = sorted(p.name for p in Path(str(inst.dir)).expanduser().iterdir())[:10]
        problems.append(
            f"instance.dir={str(inst.dir)!r} holds no images ({', '.join(db.IMAGE_SUFFIXES)}); found: {found}"
        )
    identifier, prompt = str(inst.get("identifier") or ""), str(inst.get("prompt") or "")
    if not identifier or identifier not in words(prompt):
        problems.append(
            f"instance.identifier={identifier!r} is not a word of instance.prompt={prompt!r}: the prompt names the "
            f"subject by it, e.g. instance.prompt='a photo of {identifier or 'sks'} dog'"
        )
    elif cfg.prior.loss_weight and identifier in words(cfg.prior.class_prompt):
        problems.append(
            f"prior.class_prompt={cfg.prior.class_prompt!r} holds the identifier {identifier!r}: the class images "
            "stand for the class without the subject (e.g. prior.class_prompt='a photo of dog')"
        )
    return problems


def check_config(cfg: DictConfig) -> list[str]:
    """One line per bad value of a fine-tuning config, from the config alone (nothing is loaded)."""
    problems = []
    if _missing(cfg, "pipeline"):
        problems.append(
            "pipeline= is required: the student to fine-tune, an exported pipeline folder (python -m bksdm_lab.train "
            "writes <run dir>/pipeline) or a hub id like nota-ai/bk-sdm-small"
        )
    else:
        try:
            gen.check_source("pipeline", str(cfg.pipeline), pipeline_folder=True)
        except gen.GenerationError as err:
            problems.append(str(err))
    problems += instance_problems(cfg)
    mode = cfg.finetune
    problems += rule_problems(mode, MODE_RULES, "finetune.")
    if mode.name == "lora":
        problems += rule_problems(mode, LORA_RULES, "finetune.")
        if mode.get("train_text_encoder"):
            problems += rule_problems(mode.get("text_encoder") or {}, LORA_RULES, "finetune.text_encoder.")
    problems += rule_problems(cfg.prior, PRIOR_RULES, "prior.")
    problems += gen.sampling_problems(cfg.prior.sampling, "prior.sampling.")
    problems += rule_problems(cfg, TOP_RULES)
    problems += rule_problems(cfg.validation, VALIDATION_RULES, "validation.")
    problems += rule_problems(cfg.trainer, {"max_steps": whole(1)}, "trainer.")
    problems += check_call_args(cfg, "optimizer", given_later=("params",))
    if cfg.hub.push and not cfg.hub.repo_id:
        problems.append("hub.push=true needs hub.repo_id=<user>/<name>")
    return problems


def check_resume(cfg: DictConfig, path: str) -> list[str]:
    """The checkpoint is a fine-tuning checkpoint of this mode with steps left to train."""
    try:
        ckpt = read_checkpoint(path, f"ckpt_path={path!r}", mmap=True)
    except CheckpointError as err:
        return [str(err)]
    meta = ckpt.get("finetune") if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict):
        return [f"ckpt_path={path!r} is not a bksdm_lab.finetune checkpoint"]
    if meta.get("mode") != cfg.finetune.name:
        return [f"ckpt_path={path!r} is a finetune={meta.get('mode')} run: resume it with finetune={meta.get('mode')}"]
    step, max_steps = int(ckpt.get("global_step", 0)), int(cfg.trainer.max_steps)
    if step >= max_steps:
        return [
            f"ckpt_path={path!r} is at step {step}, and trainer.max_steps={max_steps}: nothing left to train; raise "
            "trainer.max_steps to continue the run"
        ]
    return []


def run_name(cfg: DictConfig) -> str:
    if cfg.run_name:
        return str(cfg.run_name)
    overrides = HydraConfig.get().job.override_dirname if HydraConfig.initialized() else ""
    return redact_dirname(overrides) or f"{cfg.finetune.name}-{cfg.instance.identifier}"


def class_images(cfg: DictConfig) -> db.ClassImages | None:
    """The class images of this run (None without prior preservation): generated once, then reused."""
    if not cfg.prior.loss_weight:
        return None
    device = gen.default_device()
    settings, sampling = db.class_settings(
        str(cfg.pipeline), cfg.prior.class_prompt, cfg.prior.num_images, cfg.resolution, cfg.prior.sampling, device
    )
    folder = Path(str(cfg.prior.dir)) if cfg.prior.dir else db.class_dir(cfg.paths.cache_dir, settings)
    found = db.ensure_class_images(str(cfg.pipeline), folder, settings, sampling, device)
    db.say(f"class images: {found.generated} generated, {found.reused} reused, in {found.folder}")
    return found


def finetune(cfg: DictConfig) -> tuple[dict, pl.Trainer]:
    """checks -> the student's parts -> class images -> data -> module -> loggers -> callbacks -> trainer -> fit."""
    out_dir = Path(cfg.paths.output_dir)
    problems = check_config(cfg)
    ckpt_path = None
    if not problems:
        try:
            ckpt_path = resolve_ckpt_path(cfg, out_dir)
        except FileNotFoundError as err:
            problems.append(str(err))
        if ckpt_path is not None:
            problems += check_resume(cfg, ckpt_path)
    if problems:
        rundir.drop_staged(out_dir)  # an overwrite=true start refused: the earlier run stays as it was
        raise InputError("\n".join(problems))
    cfg.run_name = run_name(cfg)
    run_config = shareable(redact(OmegaConf.to_container(cfg, resolve=True)))
    pl.seed_everything(cfg.seed, workers=True)
    if cfg.overwrite and rundir.launched_rank() == 0 and not rundir.resumes_here(ckpt_path, out_dir):
        removed = rundir.replace_run(out_dir)
        if removed:
            db.say(f"overwrite=true: removed the earlier run's {', '.join(removed)} from {out_dir}")

    parts = db.load_parts(str(cfg.pipeline))
    classes = class_images(cfg)
    datamodule = db.DreamBoothDataModule(
        cfg.instance.dir,
        cfg.instance.prompt,
        parts.tokenizer,
        cfg.resolution,
        cfg.batch_size,
        class_paths=classes.paths if classes else (),
        class_prompt=cfg.prior.class_prompt,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
    )
    skipped = ", ".join(f"{n} {reason}" for reason, n in datamodule.skipped.items())
    db.say(f"subject images: {datamodule.num_instance}" + (f" ({skipped} skipped)" if skipped else ""))
    mode = cfg.finetune
    module = db.DreamBoothModule(
        parts,
        mode.name,
        optimizer=instantiate(cfg.optimizer),
        prior_loss_weight=cfg.prior.loss_weight,
        train_text_encoder=mode.train_text_encoder,
        gradient_checkpointing=mode.gradient_checkpointing,
        lora=OmegaConf.to_container(mode, resolve=True) if mode.name == "lora" else None,
        seed=cfg.seed,
        run_config=run_config,
    )
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    if ckpt_path is not None:  # a resumed run continues metrics.csv (Lightning's writer would delete it)
        for logger in loggers:
            if isinstance(logger, CSVLogger):
                logger._experiment = rundir.ContinuedCSVWriter(logger.log_dir)
    v = cfg.validation
    validation = db.SubjectImages(v.prompts, out_dir / "validation", v.seed, v.steps, v.guidance, cfg.resolution)
    card = db.card_info(run_config, datamodule.num_instance, len(classes.paths) if classes else 0)
    result = db.SaveResult(out_dir, card, OmegaConf.to_container(cfg.hub, resolve=True))
    checkpoint = [instantiate(cfg.checkpoint)] if cfg.get("checkpoint") else []
    callbacks = [FinalCheckpoint(), *checkpoint, validation, result, interrupt := StopOnInterrupt(out_dir)]
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, plugins=[AtomicCheckpointIO()])
    summary = {
        "mode": mode.name,
        "params/trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "data/subject_images": datamodule.num_instance,
        **{f"data/skipped_{reason}": n for reason, n in datamodule.skipped.items()},
        "data/class_images": len(classes.paths) if classes else 0,
        "data/class_images_generated": classes.generated if classes else 0,
    }
    for logger in loggers:
        logger.log_hyperparams({"config": run_config, **summary})
    fit(trainer, module, datamodule, ckpt_path, interrupt, "check trainer.max_steps")
    return {**summary, **outputs(trainer, out_dir, result)}, trainer


def outputs(trainer: pl.Trainer, out_dir: Path, result: db.SaveResult) -> dict:
    """Where the run wrote what (printed at the end)."""
    ckpt = trainer.checkpoint_callback
    csv = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
    wandb_logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
    wandb_dir = getattr(wandb_logger.experiment, "dir", None) if wandb_logger and trainer.is_global_zero else None
    files = {
        "checkpoint": Path(ckpt.dirpath) / "last.ckpt" if ckpt is not None and ckpt.dirpath else None,
        "csv": Path(csv.log_dir) / "metrics.csv" if csv else None,
        "wandb": Path(wandb_dir).parent if isinstance(wandb_dir, str) else None,
        "validation": out_dir / "validation",
    }
    return {
        "run_dir": str(out_dir),
        **{key: str(path) for key, path in files.items() if path is not None and path.exists()},
        **result.exported,
        "steps": trainer.global_step,
    }


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="finetune")
def main(cfg: DictConfig) -> float | None:
    """Fine-tune; returns the last logged train/loss (for sweepers)."""
    start_process(offline=cfg.offline)
    errors = (*USER_ERRORS, gen.GenerationError)
    finished = guarded("finetune", until_interrupted("finetune", finetune), cfg, errors)
    if finished is None:  # a failed job of a sweep (marked FAILED; the others still run)
        return None
    summary, trainer = finished
    if trainer.is_global_zero:
        keys = ("run_dir", "checkpoint", "csv", "wandb", "validation", "lora", "pipeline", "hub", "steps")
        print_finished("fine-tuning", summary, keys, trainer.callback_metrics)
    loss = trainer.callback_metrics.get("train/loss")
    return float(loss) if loss is not None else None


if __name__ == "__main__":
    check_group_choices("finetune")
    main()
