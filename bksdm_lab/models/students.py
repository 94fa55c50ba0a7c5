"""Build BK-SDM students from a teacher U-Net config and copy the teacher's weights into them.

A student is a stock diffusers ``UNet2DConditionModel``: the teacher's config plus the overrides of an
architecture variant (``conf/arch/*.yaml``). Nothing here performs module surgery, so an exported
student loads in plain diffusers.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from omegaconf import DictConfig, OmegaConf

from bksdm_lab.models.keep import WeightMapError, check_derived_from

# Config keys that hold one value per U-Net stage (down stage i mirrors up stage n-1-i).
_PER_STAGE_DOWN = ("block_out_channels", "down_block_types")
_PER_STAGE_UP = ("up_block_types",)
_MAYBE_PER_STAGE = ("attention_head_dim", "num_attention_heads", "transformer_layers_per_block", "layers_per_block")


def student_config(teacher_config: Mapping[str, Any], arch: Mapping[str, Any]) -> dict[str, Any]:
    """Return the student's U-Net config: the teacher config, minus dropped stages, plus overrides."""
    if isinstance(arch, DictConfig):  # a composed arch config: its derived keys (keep patterns) resolved, lists plain
        arch = OmegaConf.to_container(arch, resolve=True)
    cfg = {k: v for k, v in dict(teacher_config).items() if not k.startswith("_")}
    drop = int(arch.get("drop_deepest_stages", 0) or 0)
    if drop:
        n = len(cfg["block_out_channels"])
        if drop >= n:
            raise ValueError(f"arch.drop_deepest_stages={drop} leaves no stage of the teacher's {n}")
        keep = n - drop
        for key in _PER_STAGE_DOWN:
            cfg[key] = list(cfg[key])[:keep]
        for key in _PER_STAGE_UP:
            cfg[key] = list(cfg[key])[drop:]
        for key in _MAYBE_PER_STAGE:
            if isinstance(cfg.get(key), (list, tuple)):
                cfg[key] = list(cfg[key])[:keep]
    for key, value in dict(arch.get("unet_config") or {}).items():
        cfg[key] = list(value) if isinstance(value, (list, tuple)) else value
    return cfg


def build_student(teacher_config: Mapping[str, Any], arch: Mapping[str, Any]) -> UNet2DConditionModel:
    """A freshly initialised student U-Net (on the current default device)."""
    return UNet2DConditionModel.from_config(student_config(teacher_config, arch))


def map_key(student_key: str, weight_map: Mapping[str, str]) -> str:
    """The teacher key a student key copies from: the longest matching prefix remap, else the same name."""
    best = ""
    for prefix in weight_map:
        if student_key.startswith(prefix) and len(prefix) > len(best):
            best = prefix
    return weight_map[best] + student_key[len(best) :] if best else student_key


def student_names(student_keys, weight_map: Mapping[str, str]) -> dict[str, str]:
    """Teacher name -> student name, for every teacher tensor (or module) a student one copies from: the weight map
    read backwards, for carrying what was made for the teacher's layers (a LoRA, an IP-Adapter) onto the student's."""
    return {map_key(key, weight_map): key for key in student_keys}


def plan_weight_copy(
    student_shapes: Mapping[str, torch.Size], teacher_shapes: Mapping[str, torch.Size], weight_map: Mapping[str, str]
) -> dict[str, str]:
    """Student key -> teacher key for every student tensor; raises WeightMapError listing every problem."""
    plan, missing, mismatched = {}, [], []
    for skey, sshape in student_shapes.items():
        tkey = map_key(skey, weight_map)
        if tkey not in teacher_shapes:
            missing.append(f"{skey} <- {tkey} (no such teacher tensor)")
        elif tuple(teacher_shapes[tkey]) != tuple(sshape):
            mismatched.append(f"{skey} {tuple(sshape)} <- {tkey} {tuple(teacher_shapes[tkey])}")
        else:
            plan[skey] = tkey
    if missing or mismatched:
        lines = [f"weight map does not cover the student: {len(missing)} uncovered, {len(mismatched)} mismatched"]
        lines += [f"  uncovered: {m}" for m in missing[:50]]
        lines += [f"  shape mismatch: {m}" for m in mismatched[:50]]
        raise WeightMapError("\n".join(lines))
    return plan


def copy_teacher_weights(
    student: torch.nn.Module, teacher: torch.nn.Module, weight_map: Mapping[str, str]
) -> dict[str, str]:
    """Initialise every student tensor from the teacher by ``weight_map``; returns the plan used."""
    sstate, tstate = student.state_dict(), teacher.state_dict()
    plan = plan_weight_copy(
        {k: v.shape for k, v in sstate.items()}, {k: v.shape for k, v in tstate.items()}, weight_map
    )
    with torch.no_grad():
        for skey, tkey in plan.items():
            assert sstate[skey].shape == tstate[tkey].shape, (skey, tkey)
            sstate[skey].copy_(tstate[tkey])
    return plan


STUDENT_INITS = ("teacher", "random")


class StudentInitError(WeightMapError):
    """``arch.init`` names no known initialisation (a WeightMapError, so commands report it as one line)."""


def student_init(arch: Mapping[str, Any]) -> str:
    """``arch.init``: ``teacher`` (default: copy the teacher's weights by the weight map) or ``random``."""
    init = arch.get("init") or "teacher"
    if init not in STUDENT_INITS:
        raise StudentInitError(f"arch.init={init!r} is not one of: {', '.join(STUDENT_INITS)}")
    return str(init)


def init_student_from_teacher(
    teacher: UNet2DConditionModel, arch: Mapping[str, Any], seed: int | None = None
) -> UNet2DConditionModel:
    """Build the student for ``arch`` and initialise it as ``arch.init`` says.

    ``teacher`` (the paper): every student tensor is copied from the teacher by ``arch.weight_map``.
    ``random`` (the paper's ablation): the student keeps diffusers' default initialisation, drawn from torch's
    global RNG (``train`` seeds it with ``seed`` first) or, given ``seed``, from that seed alone; nothing is
    copied, but the weight map is still checked against the teacher, so the architecture is the same.
    """
    init = student_init(arch)
    check_derived_from(arch, teacher.config)
    device = teacher.device
    seeded = seed is not None and device.type != "meta"
    accelerator = device.type if device.type != "cpu" else None  # the CPU RNG is always forked
    fork = torch.random.fork_rng(devices=[device] if accelerator else [], enabled=seeded, device_type=accelerator)
    with torch.device(device), fork:  # a given seed leaves the caller's RNG state as it was
        if seeded:
            torch.manual_seed(seed)
        student = build_student(teacher.config, arch)
    if student.dtype != teacher.dtype:
        student.to(teacher.dtype)
    weight_map = arch.get("weight_map") or {}
    if init == "teacher":
        copy_teacher_weights(student, teacher, weight_map)
    else:
        plan_weight_copy(
            {k: v.shape for k, v in student.state_dict().items()},
            {k: v.shape for k, v in teacher.state_dict().items()},
            weight_map,
        )
    return student


def count_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


_BLOCK = re.compile(
    r"^(down_blocks\.\d+\.(?:resnets|attentions|downsamplers)\.\d+|up_blocks\.\d+\.(?:resnets|attentions|upsamplers)\.\d+|mid_block)\."
)


def block_of(key: str) -> str | None:
    """The removable building block a U-Net key lies in (``up_blocks.1.attentions.2``, ``mid_block``), else None."""
    m = _BLOCK.match(key)
    return m.group(1) if m else None


def teacher_blocks(teacher_keys) -> list[str]:
    """The removable building blocks of a U-Net (resnets, attentions, samplers, the mid block), in order."""
    seen: dict[str, None] = {}
    for key in teacher_keys:
        m = _BLOCK.match(key)
        if m:
            seen.setdefault(m.group(1))
    return list(seen)


def removed_blocks(student_keys, teacher_keys, weight_map: Mapping[str, str]) -> list[str]:
    """Teacher blocks that no student tensor copies from: what the variant removed."""
    used = {m.group(1) for k in student_keys if (m := _BLOCK.match(map_key(k, weight_map)))}
    return [b for b in teacher_blocks(teacher_keys) if b not in used]


_KIND_ORDER = {"resnets": 0, "attentions": 1, "downsamplers": 2, "upsamplers": 2}


def _stage(block: str) -> str:
    parts = block.split(".")
    return ".".join(parts[:2]) if parts[0] in ("down_blocks", "up_blocks") else parts[0]


def _stage_order(stage: str) -> tuple[int, int]:
    kind, _, index = stage.partition(".")
    return {"down_blocks": 0, "mid_block": 1, "up_blocks": 2}.get(kind, 3), int(index or 0)


def _block_order(block: str) -> tuple[bool, int, int]:
    kind, _, index = block.partition(".")
    order = _KIND_ORDER.get(kind, 3)
    return order >= 2, int(index or 0), order  # resnet i, attention i, ..., then the down/upsampler


def removed_by_stage(removed, teacher_keys) -> list[dict]:
    """Removed blocks grouped by U-Net stage in order (down, mid, up): ``[{stage, removed, whole}]``.

    ``removed`` lists block names relative to the stage ("resnets.1"); ``whole`` says the stage is gone.
    """
    removed = set(removed)
    stages: dict[str, list[str]] = {}
    for block in teacher_blocks(teacher_keys):
        stages.setdefault(_stage(block), []).append(block)
    out = []
    for stage in sorted(stages, key=_stage_order):
        blocks = stages[stage]
        gone = sorted((b[len(stage) + 1 :] for b in blocks if b in removed and b != stage), key=_block_order)
        whole = all(b in removed for b in blocks)
        if whole or gone:
            out.append({"stage": stage, "removed": gone, "whole": whole})
    return out
