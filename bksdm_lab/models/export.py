"""Export a student as a plain diffusers ``StableDiffusionPipeline`` folder, with a model card; push it to the Hub.

python -m bksdm_lab.export outputs/<run>/checkpoints/last.ckpt                  # EMA weights, if the run had EMA
python -m bksdm_lab.export CKPT --push-to-hub me/bk-sdm-tiny [--public]          # token: --token or $HF_TOKEN
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from huggingface_hub import HfApi
from omegaconf import OmegaConf

from bksdm_lab.common.checkpoint import CheckpointError, read_checkpoint
from bksdm_lab.common.cli import fail
from bksdm_lab.common.quiet import quiet_libraries
from bksdm_lab.common.secrets import public_source
from bksdm_lab.models.students import build_student, count_params, removed_blocks, removed_by_stage
from bksdm_lab.models.teachers import Teacher, TeacherLoadError, load_teacher

WEIGHTS = ("ema", "student")
PAPER = "https://arxiv.org/abs/2305.15798"
LCM_PAPER = "https://arxiv.org/abs/2310.04378"
LICENSE_URL = "https://huggingface.co/spaces/CompVis/stable-diffusion-license"
CARD_TAGS = ["stable-diffusion", "text-to-image", "bk-sdm", "knowledge-distillation"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_LOCAL_PATH = re.compile(r"(?<![\w.:/<>~-])~?/[^\s,;'\"\])]+")  # an absolute or home path, not a URL's


class ExportError(RuntimeError):
    """The checkpoint cannot be exported as asked; the message says why."""


def build_pipeline(
    teacher: Teacher, unet: UNet2DConditionModel, safety_checker: bool = True
) -> StableDiffusionPipeline:
    """The teacher's VAE, text encoder, tokenizer and scheduler around a (student) U-Net, and the teacher's safety
    checker and feature extractor when it has them (``safety_checker=False`` leaves them out)."""
    checker, extractor = teacher.safety_parts() if safety_checker else (None, None)
    return StableDiffusionPipeline(
        vae=teacher.ensure_vae(device=unet.device),
        text_encoder=teacher.text_encoder,
        tokenizer=teacher.tokenizer,
        unet=unet,
        scheduler=teacher.scheduler,
        safety_checker=checker,
        feature_extractor=extractor,
        requires_safety_checker=checker is not None,
    )


def export_pipeline(
    teacher: Teacher,
    unet: UNet2DConditionModel,
    out_dir: str | Path,
    *,
    card: Mapping[str, Any] | None = None,
    safety_checker: bool = True,
) -> Path:
    """Save the pipeline in fp32 with safetensors; ``StableDiffusionPipeline.from_pretrained`` loads it.

    With ``card`` (the ``info`` of :func:`load_checkpoint_student`) a model card ``README.md`` is written too, saying
    whether the teacher's safety checker is included (:func:`build_pipeline`).
    """
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")  # written whole beside it, then swapped in
    for stale in [tmp, *out_dir.parent.glob(f".{out_dir.name}.tmp*"), *out_dir.parent.glob(f".{out_dir.name}.old*")]:
        shutil.rmtree(stale, ignore_errors=True)  # left by an export that was killed
    pipe = build_pipeline(teacher, unet, safety_checker)
    dtypes = {name: getattr(pipe, name).dtype for name in ("vae", "text_encoder", "unet")}
    for name, dtype in dtypes.items():
        if dtype != torch.float32:
            getattr(pipe, name).to(torch.float32)
    sources = _hide_sources(pipe)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if card is not None:
            write_model_card(tmp, {**card, "safety_checker": pipe.safety_checker is not None})
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed export leaves the folder as it was
        raise
    finally:
        for component, source in sources.items():  # leave the caller's modules as they were
            component.register_to_config(_name_or_path=source)
        for name, dtype in dtypes.items():
            if dtype != torch.float32:
                getattr(pipe, name).to(dtype)
    return out_dir


def _swap_in(new: Path, out_dir: Path) -> None:
    """Replace ``out_dir`` (if any) by the folder ``new`` as a whole: nothing of the earlier one is left in it."""
    old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
    if out_dir.exists():
        os.rename(out_dir, old)
    os.rename(new, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _hide_sources(pipe) -> dict:
    """Name the folder each diffusers component was loaded from (``_name_or_path``, saved in its config.json) by its
    hub id or folder name only while the pipeline is saved; returns the components' real sources."""
    sources = {}
    for component in pipe.components.values():
        source = getattr(getattr(component, "config", None), "_name_or_path", None)
        if isinstance(source, str) and source and hasattr(component, "register_to_config"):
            sources[component] = source
            component.register_to_config(_name_or_path=public_source(source))
    return sources


# ---- checkpoint -> student -------------------------------------------------------------------------
def read_training_checkpoint(ckpt_path: str | Path) -> dict:
    """The checkpoint dict of a bksdm_lab training run (tensors and plain data only); ExportError otherwise."""
    path = Path(ckpt_path)
    try:
        ckpt = read_checkpoint(path)
    except CheckpointError as err:
        raise ExportError(str(err)) from None
    meta = ckpt.get("bksdm") if isinstance(ckpt, dict) else None
    config = meta.get("config") if isinstance(meta, dict) else None
    if not isinstance(config, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ExportError(
            f"{path} is not a bksdm_lab training checkpoint (no 'bksdm' entry with the run's config); "
            "export a checkpoint written by `python -m bksdm_lab.train`"
        )
    missing = [key for key in ("teacher", "arch") if not isinstance(config.get(key), dict)]
    if missing:
        raise ExportError(f"{path}: the run config stored in the checkpoint lacks {', '.join(missing)}")
    return ckpt


def _choose_weights(ckpt: dict, weights: str | None, path: str | Path) -> str:
    has_ema = bool(ckpt["bksdm"].get("ema")) and any(k.startswith("ema_student.") for k in ckpt["state_dict"])
    if weights is None:
        return "ema" if has_ema else "student"
    if weights not in WEIGHTS:
        raise ExportError(f"weights={weights!r} is not one of {WEIGHTS}")
    if weights == "ema" and not has_ema:
        raise ExportError(
            f"{path} has no EMA weights (the run had no callbacks.ema); export the raw student with --weights student"
        )
    return weights


def _is_hub_id(source: Any) -> bool:
    return isinstance(source, str) and bool(_HUB_ID.match(source)) and not Path(source).expanduser().exists()


def card_info(
    cfg: Mapping[str, Any],
    teacher: Teacher,
    unet: UNet2DConditionModel,
    global_step: int,
    weights: str,
    trained_source: str | None = None,
    checkpoint: str | None = None,
) -> dict[str, Any]:
    """What the model card says about a student of run config ``cfg`` (the resolved train config)."""
    arch = cfg["arch"]
    teacher_cfg = cfg["teacher"]
    trained_source = trained_source or teacher_cfg.get("pretrained")
    expected = unet.state_dict()
    teacher_keys = list(teacher.unet.state_dict())
    removed = removed_blocks(list(expected), teacher_keys, arch.get("weight_map") or {})
    data, trainer = cfg.get("data") or {}, cfg.get("trainer") or {}
    ema_cfg = (cfg.get("callbacks") or {}).get("ema") or {}
    base_model = next((s for s in (teacher.source, trained_source) if _is_hub_id(s)), None)
    info = {
        "arch_name": arch.get("name"),
        "init": arch.get("init", "teacher"),
        "arch_title": arch.get("title") or arch.get("name"),
        "teacher_name": teacher.name,
        "teacher_title": teacher_cfg.get("title") or teacher.name,
        "teacher_source": teacher.source,
        "teacher_trained_source": trained_source,
        "base_model": base_model,
        "resolution": teacher_cfg.get("resolution") or data.get("resolution"),
        "params_student": count_params(unet),
        "params_teacher": count_params(teacher.unet),
        "removed_blocks": removed,
        "removed_by_stage": removed_by_stage(removed, teacher_keys),
        "data": _public_data(next((data[k] for k in ("root", "path", "shards") if data.get(k)), None)),
        "global_step": int(global_step),
        "batch_size": data.get("batch_size"),
        "global_batch_size": data.get("global_batch_size"),
        "accumulate_grad_batches": trainer.get("accumulate_grad_batches") or 1,
        "devices": trainer.get("devices") if isinstance(trainer.get("devices"), int) else None,
        "num_nodes": trainer.get("num_nodes") if isinstance(trainer.get("num_nodes"), int) else None,
        "precision": trainer.get("precision"),
        "lr": (cfg.get("optimizer") or {}).get("lr"),
        "kd_weights": dict((cfg.get("loss") or {}).get("weights") or {}),
        "weights": weights,
        "ema": weights == "ema",
        "ema_decay": ema_cfg.get("decay"),
        "seed": cfg.get("seed"),
        "experiment_name": cfg.get("experiment_name"),
        "checkpoint": checkpoint,
        "resumes": list(cfg.get("resumes") or []),
        "lcm": ((cfg.get("module") or {}).get("lcm") or None),  # experiment=lcm: the few-step card
        "loss_kind": (cfg.get("loss") or {}).get("kind"),
        "sampling": {k: (cfg.get("sampling") or {}).get(k) for k in ("steps", "guidance")},
    }
    return info


def _public_data(source: Any) -> str | None:
    """How a model card names the training data: a hub dataset id or a URL (without its query) as it is, a local
    path by its folder or file name only (:func:`~bksdm_lab.common.secrets.public_source`)."""
    if isinstance(source, (list, tuple)):
        return ", ".join(str(_public_data(s)) for s in source)
    if not isinstance(source, str):
        return None if source is None else str(source)
    if "://" in source and not source.startswith("file://"):
        return source.split("?", 1)[0]
    return public_source(source.removeprefix("file://"))


def _public_value(value: Any) -> str:
    """A config value as the card shows it, every local path in it by its name only."""
    return _LOCAL_PATH.sub(lambda path: str(public_source(path.group())), _fmt(value))


def load_checkpoint_student(
    ckpt_path: str | Path, weights: str | None = None, teacher_pretrained: str | None = None
) -> tuple[Teacher, UNet2DConditionModel, dict[str, Any]]:
    """Rebuild the teacher and the student of a training checkpoint and load the student's weights strictly.

    ``weights``: "ema" (the default when the run kept an EMA) or "student" (the raw weights).
    ``teacher_pretrained``: load the teacher from this hub id / folder instead of the one in the run config.
    Returns ``(teacher, unet, info)``; ``info`` describes the model for :func:`write_model_card`.
    """
    ckpt = read_training_checkpoint(ckpt_path)
    cfg, state = ckpt["bksdm"]["config"], ckpt["state_dict"]
    weights = _choose_weights(ckpt, weights, ckpt_path)

    teacher_cfg = dict(cfg["teacher"])
    trained_source = teacher_cfg.get("pretrained")
    if teacher_pretrained is not None:
        teacher_cfg["pretrained"] = str(teacher_pretrained)
    teacher = load_teacher(OmegaConf.create(teacher_cfg))  # a stored `~/...` (see common.secrets) is expanded

    arch = cfg["arch"]
    try:
        unet = build_student(teacher.unet.config, arch)
    except (ValueError, KeyError, TypeError) as err:
        raise ExportError(
            f"cannot build the {arch.get('name')!r} student from teacher {teacher.source!r}: {err}"
        ) from err
    prefix = "ema_student." if weights == "ema" else "student."
    student_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    expected = unet.state_dict()
    missing, unexpected = sorted(set(expected) - set(student_state)), sorted(set(student_state) - set(expected))
    mismatched = [k for k in expected if k in student_state and student_state[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise ExportError(
            f"the {prefix}* tensors of {ckpt_path} do not fit a {arch.get('name')!r} student of teacher "
            f"{teacher.source!r}: {len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} of another "
            f"shape (e.g. {(missing + unexpected + mismatched)[:3]}); is --teacher the model the run distilled from?"
        )
    unet.load_state_dict(student_state, strict=True)
    unet.eval()

    info = card_info(cfg, teacher, unet, int(ckpt.get("global_step", 0)), weights, trained_source, str(ckpt_path))
    return teacher, unet, info


# ---- model card ------------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "?" if value is None else str(value)


def _global_batch(info: Mapping[str, Any]) -> str:
    """``micro-batch x accumulation [x devices x nodes] = images per step``; the accumulation is the one the run
    used (``train.set_accumulation`` records it), and ``data.global_batch_size``, when set, is the total."""
    bs, acc = info.get("batch_size"), int(info.get("accumulate_grad_batches") or 1)
    if not isinstance(bs, int):
        return f"{_fmt(bs)} per device x {acc} accumulation"
    factors = [f"{bs} per device", f"{acc} accumulation"]
    total, given = bs * acc, info.get("global_batch_size")
    for key, label in (("devices", "devices"), ("num_nodes", "nodes")):
        n = info.get(key)
        if isinstance(n, int) and n > 1:
            factors.append(f"{n} {label}")
            total *= n
    if isinstance(given, int) and given != total and given % total == 0:  # devices=auto: known only at run time
        factors.append(f"{given // total} ranks")
        total = given
    return f"{' x '.join(factors)} = {total}"


def model_card(info: Mapping[str, Any]) -> str:
    """The text of a Hugging Face model card (YAML front matter + markdown) for an exported student."""
    front: dict[str, Any] = {
        "license": "creativeml-openrail-m",
        "library_name": "diffusers",
        "tags": list(CARD_TAGS),
        "pipeline_tag": "text-to-image",
    }
    if info.get("base_model"):
        front["base_model"] = info["base_model"]
    arch = info.get("arch_title") or info.get("arch_name")
    teacher = info.get("teacher_title") or info.get("teacher_name")
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", ""]
    model = _card_lcm(info) if info.get("lcm") else _card_model(info, arch, teacher)
    lines += model + _card_training(info, teacher) + _card_usage(info, teacher)
    return "\n".join(lines)


def _card_lcm(info: Mapping[str, Any]) -> list[str]:
    """The card's title and what a latent consistency student is, how it was distilled, how it generates."""
    lcm, source = info["lcm"], public_source(info.get("teacher_trained_source") or info.get("teacher_source"))
    start = public_source(lcm.get("init_from")) or source
    w_min, w_max = lcm.get("guidance") or ("?", "?")
    if lcm.get("guidance_embedding"):
        guidance = (
            f"it takes the guidance as an input (`time_cond_proj_dim={lcm['guidance_embedding']}`, trained for "
            f"w in [{_fmt(w_min)}, {_fmt(w_max)}]): `guidance_scale` = w + 1, with no unconditional pass"
        )
    else:
        guidance = (
            f"the guidance (w in [{_fmt(w_min)}, {_fmt(w_max)}]) is distilled in: generate with `guidance_scale=1`"
        )
    lora = lcm.get("lora")
    return [
        f"# `{start}`, few-step: a latent consistency model",
        "",
        f"Latent consistency distillation ([Luo et al., arXiv 2310.04378]({LCM_PAPER})) of `{start}`, with `{source}` "
        f"as the ODE teacher (a DDIM solver of {_fmt(lcm.get('ode_solver_steps'))} steps, classifier-free guided). "
        f"The U-Net keeps the architecture it started from"
        + (f" and was trained through LoRA adapters (rank {_fmt(lora.get('rank'))})" if lora else "")
        + (", merged here" if lora and not info.get("lora_folder") else "")
        + f"; {guidance}. "
        + (
            f"This folder holds the adapters, in the diffusers LoRA format: load them onto `{start}` with "
            "`LCMScheduler` and generate in 2-8 steps."
            if info.get("lora_folder")
            else "The scheduler of this folder is `LCMScheduler`: generate in 2-8 steps. The folder loads in plain "
            "diffusers."
        ),
        "",
        f"- U-Net parameters: **{_fmt(info.get('params_student'))}**",
        f"- Consistency loss: {_fmt(info.get('loss_kind'))}",
    ]


def _card_model(info: Mapping[str, Any], arch: str, teacher: str) -> list[str]:
    """The card's title and what the student is: its size, the blocks removed."""
    student_p, teacher_p = info.get("params_student"), info.get("params_teacher")
    share = f" ({100 * student_p / teacher_p:.1f}% of the teacher's)" if student_p and teacher_p else ""
    init_text = (
        "initialised at random (the random-init ablation, arch.init=random)"
        if info.get("init") == "random"
        else "initialised from the teacher's remaining weights"
    )
    lines = [
        f"# {arch} distilled from {teacher}",
        "",
        f"A block-removed Stable Diffusion U-Net trained by knowledge distillation: **BK-SDM** "
        f"([Kim et al., *BK-SDM: A Lightweight, Fast, and Cheap Version of Stable Diffusion*, arXiv 2305.15798]({PAPER})). "
        f"The student is **{arch}**: the teacher's U-Net with residual/attention blocks removed, {init_text} "
        f"and trained to match the teacher's outputs and features. The VAE, text encoder, "
        f"tokenizer and scheduler are the teacher's, unchanged. The folder loads in plain diffusers.",
        "",
        f"- U-Net parameters: **{_fmt(student_p)}** (student) vs {_fmt(teacher_p)} (teacher){share}",
        f"- Removed from the teacher's U-Net ({len(info.get('removed_blocks') or [])} blocks):",
    ]
    stages = info.get("removed_by_stage") or []
    for stage in stages:
        what = (
            ("removed" if stage["stage"] == "mid_block" else "the whole stage")
            if stage["whole"]
            else ", ".join(f"`{b}`" for b in stage["removed"])
        )
        lines.append(f"  - `{stage['stage']}`: {what}")
    if not stages:
        lines.append("  - nothing")
    if info.get("teacher_name") == "demo":
        lines += [
            "",
            "> This is the offline demo: the teacher is a tiny, randomly initialised model with the SD-v1 block "
            "topology, trained on synthetic shapes. Its images are not meaningful.",
        ]
    return lines


def _card_training(info: Mapping[str, Any], teacher: str) -> list[str]:
    """The card's training section: teacher, data, steps, batch, learning rate, loss weights, weights exported."""
    weights = (
        f"the exponential moving average of the student (decay {_fmt(info.get('ema_decay'))})"
        if info.get("ema")
        else "the raw student weights (no EMA)"
    )
    # sources by hub id or local folder name only: a card is meant to be shared (pushed to the Hub)
    source = public_source(info.get("teacher_source"))
    trained = public_source(info.get("teacher_trained_source"))
    teacher_line = f"{teacher} (`{trained or source}`)"
    if trained and source and trained != source:
        teacher_line += f"; VAE, text encoder, tokenizer and scheduler exported from `{source}`"
    decay = info.get("ema_decay")
    target = (
        "the student itself"
        if decay is None
        else f"the exponential moving average of the student (decay {_fmt(decay)})"
    )
    kd = ", ".join(f"{k} {_fmt(v)}" for k, v in (info.get("kd_weights") or {}).items()) or "?"
    return [
        "",
        "## Training",
        "",
        f"- Teacher: {teacher_line}",
        f"- Data: `{_fmt(info.get('data'))}`",
        f"- Steps: {_fmt(info.get('global_step'))} optimizer steps",
        f"- Batch: {_global_batch(info)}",
        f"- Learning rate: {_fmt(info.get('lr'))}",
        f"- Loss weights: {kd} (task = denoising target, out_kd = teacher output, feat_kd = teacher features)"
        if not info.get("lcm")
        else f"- Target network: {target}",
        f"- Weights exported: {weights}",
        f"- Precision: {_fmt(info.get('precision'))}; seed: {_fmt(info.get('seed'))}",
        *_card_resumes(info.get("resumes") or []),
        "",
        "Trained with `bksdm_lab` (Hydra + PyTorch Lightning).",
    ]


def _card_resumes(resumes: Sequence[Mapping[str, Any]]) -> list[str]:
    """One line per resume that changed the run's options (``resumed at step 4: loss.weights.feat_kd 1 -> 0.5``);
    the lines above show the options of the last one."""
    lines = []
    for resume in resumes:
        changes = "; ".join(
            f"{key} {_public_value(old)} -> {_public_value(new)}" for key, (old, new) in resume["changes"].items()
        )
        lines.append(f"- Resumed at step {_fmt(resume['step'])}: {changes or 'no option changed'}")
    return lines


def _card_usage(info: Mapping[str, Any], teacher: str) -> list[str]:
    """The card's usage example (the pipeline's hub id or a folder, its resolution) and license sections."""
    repo = info.get("repo_id") or "path/to/this/folder"
    res = info.get("resolution")
    size = f", height={res}, width={res}" if isinstance(res, int) else ""
    sampling = info.get("sampling") or {}
    steps = "num_inference_steps=25"
    lora = info.get("lora_folder")  # a LoRA folder (experiment=lcm_lora): loaded onto the pipeline it was trained on
    base = public_source(info.get("teacher_trained_source") or info.get("teacher_source"))
    if info.get("lcm"):  # its folder's scheduler is LCMScheduler
        steps = f"num_inference_steps={sampling.get('steps') or 4}, guidance_scale={_fmt(sampling.get('guidance'))}"
    return [
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        f"from diffusers import {'LCMScheduler, ' if lora else ''}StableDiffusionPipeline",
        "",
        f'pipe = StableDiffusionPipeline.from_pretrained("{base if lora else repo}", torch_dtype=torch.float16).to("cuda")',
        *(
            ["pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)", f'pipe.load_lora_weights("{repo}")']
            if lora
            else []
        ),
        f'image = pipe("a golden retriever floating in the ocean", {steps}{size}).images[0]',
        'image.save("sample.png")',
        "```",
        "",
        (
            "The teacher's safety checker and its feature extractor are included, as with the teacher."
            if info.get("safety_checker")
            else "No safety checker is included (`safety_checker=None`): the teacher has none, or it was left out on "
            "export (`callbacks.export.safety_checker=false`, `--no-safety-checker`); add one if your use needs it."
        ),
        "",
        "## License",
        "",
        f"These weights derive from Stable Diffusion ({teacher}) and are released under the **CreativeML OpenRAIL-M** "
        f"license, like the model they were distilled from. Read it: {LICENSE_URL}",
        "",
        "1. You can't use the model to deliberately produce nor share illegal or harmful outputs or content.",
        "2. The authors claim no rights on the outputs you generate; you are free to use them and are accountable for "
        "their use, which must not go against the provisions set in the license.",
        "3. You may redistribute the weights and use the model commercially and/or as a service. If you do, you must "
        "include the same use restrictions as the ones in the license and share a copy of the CreativeML OpenRAIL-M "
        "with all your users.",
        "",
        "You are responsible for how you use the model and what you generate with it.",
        "",
    ]


def write_model_card(out_dir: str | Path, info: Mapping[str, Any]) -> Path:
    """Write ``<out_dir>/README.md``, a Hugging Face model card for the exported student."""
    path = Path(out_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(model_card(info), encoding="utf-8")
    return path


# ---- the Hub ---------------------------------------------------------------------------------------
def push_to_hub(
    folder: str | Path, repo_id: str, token: str | None = None, private: bool = True, commit_message: str | None = None
) -> str:
    """Create the model repo (if needed) and upload ``folder``; returns the commit URL (or the repo URL)."""
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    commit = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        repo_type="model",
        commit_message=commit_message or f"Upload BK-SDM student from {Path(folder).name}",
    )
    return str(getattr(commit, "commit_url", None) or getattr(commit, "repo_url", None) or repo_url or commit)


# ---- CLI -------------------------------------------------------------------------------------------
def default_out_dir(ckpt_path: str | Path, weights: str, global_step: int) -> Path:
    """``<run dir>/export-<weights>-step<NNNNNN>``; the run dir is the checkpoint folder's parent."""
    return Path(ckpt_path).resolve().parent.parent / f"export-{weights}-step{global_step:06d}"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bksdm_lab.export",
        description="Export a bksdm_lab training checkpoint as a diffusers StableDiffusionPipeline folder with a "
        "model card, and optionally push it to the Hugging Face Hub.",
    )
    parser.add_argument(
        "ckpt", help="a checkpoint of `python -m bksdm_lab.train` (e.g. <run dir>/checkpoints/last.ckpt)"
    )
    parser.add_argument("--out", help="output folder (default: <run dir>/export-<weights>-step<NNNNNN>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output folder if it holds files")
    parser.add_argument(
        "--weights", choices=WEIGHTS, help="EMA or raw student weights (default: ema if the run kept one)"
    )
    parser.add_argument(
        "--teacher", metavar="PATH_OR_ID", help="load the teacher from here instead of the run config's"
    )
    parser.add_argument(
        "--no-safety-checker", action="store_true", help="leave out the teacher's safety checker (default: keep it)"
    )
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the folder to this Hugging Face model repo")
    parser.add_argument("--public", action="store_true", help="create the Hub repo public (default: private)")
    parser.add_argument("--token", default=os.environ.get("HF_TOKEN"), help="Hub token (default: $HF_TOKEN)")
    return parser.parse_args(argv)


def _scrub(text: str, token: str | None) -> str:
    return text.replace(token, "<redacted>") if token else text


def _refuse_existing(out_dir: Path, overwrite: bool) -> None:
    if not overwrite and out_dir.is_dir() and any(out_dir.iterdir()):
        fail("export", f"{out_dir} already holds files: nothing there is replaced unless asked (--overwrite "
                       "replaces the whole folder), or choose another --out")  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    quiet_libraries()
    if args.out:
        _refuse_existing(Path(args.out), args.overwrite)  # before loading anything
    try:
        teacher, unet, info = load_checkpoint_student(args.ckpt, weights=args.weights, teacher_pretrained=args.teacher)
    except (ExportError, TeacherLoadError, FileNotFoundError) as err:
        hint = " (For the export: --teacher PATH_OR_ID loads the teacher from elsewhere.)"
        fail("export", f"{err}{hint if isinstance(err, TeacherLoadError) else ''}")
    out_dir = Path(args.out) if args.out else default_out_dir(args.ckpt, info["weights"], info["global_step"])
    _refuse_existing(out_dir, args.overwrite)
    if args.push_to_hub:
        info["repo_id"] = args.push_to_hub
    export_pipeline(teacher, unet, out_dir, card=info, safety_checker=not args.no_safety_checker)
    print(
        f"bksdm_lab.export: wrote {out_dir} ({info['arch_title']}, {info['weights']} weights, "
        f"step {info['global_step']}, {info['params_student']:,} U-Net parameters)"
    )
    if args.push_to_hub:
        message = (
            f"{info['arch_title']} from {info['teacher_title']}: {info['weights']} weights, step {info['global_step']}"
        )
        try:
            url = push_to_hub(
                out_dir, args.push_to_hub, token=args.token, private=not args.public, commit_message=message
            )
        except Exception as err:  # network, auth, permissions: a message, never the token
            reason = _scrub(f"{type(err).__name__}: {err}", args.token)
            fail("export", f"push to {args.push_to_hub} failed ({reason}); the export is in {out_dir}")
        print(f"bksdm_lab.export: pushed to {args.push_to_hub} ({'public' if args.public else 'private'}): {url}")
