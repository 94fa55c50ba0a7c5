"""What each architecture variant keeps and removes, with exact sizes and costs (``python -m bksdm_lab.arch``).

Offline, from the teacher's shipped config.json files on the meta device. MACs per U-Net forward at the teacher's
resolution, the paper's way (conv + linear + norm, as thop; no attention matmuls) and with every matmul (FLOPs / 2).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

from bksdm_lab.common.conf import CONF_DIR
from bksdm_lab.models.keep import KeepPatternError, derive, teacher_unet_config
from bksdm_lab.models.students import build_student, count_params, removed_blocks, removed_by_stage
from bksdm_lab.models.teachers import shipped_configs

_COUNTED = (torch.nn.Conv2d, torch.nn.Linear, torch.nn.GroupNorm, torch.nn.LayerNorm)


def unet_macs(unet: UNet2DConditionModel) -> tuple[int, int]:
    """(MACs the paper's way, MACs of every matmul) of one forward at the config's sample size, batch 1."""
    cfg = unet.config
    device = next(unet.parameters()).device
    size = cfg.sample_size
    x = torch.zeros(1, cfg.in_channels, size, size, device=device)
    cond = torch.zeros(1, 77, cfg.cross_attention_dim, device=device)
    t = torch.tensor([500], device=device)
    layer_macs = 0

    def hook(module, _inputs, out):
        nonlocal layer_macs
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            layer_macs += out.numel() * (module.in_channels // module.groups) * k
        elif isinstance(module, torch.nn.Linear):
            layer_macs += out.numel() * module.in_features
        else:  # normalisation: one MAC per element, as thop counts it
            layer_macs += out.numel()

    handles = [m.register_forward_hook(hook) for m in unet.modules() if isinstance(m, _COUNTED)]
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            unet(x, t, cond)
    finally:
        for h in handles:
            h.remove()
    return layer_macs, counter.get_total_flops() // 2


def describe(teacher_cfg, arch_cfgs: Mapping[str, Mapping]) -> dict:
    """The report: ``{"meta": ..., "models": {"teacher": ..., <arch name>: ...}}``."""
    cfgs = shipped_configs(teacher_cfg.configs)
    with torch.device("meta"):
        teacher = UNet2DConditionModel.from_config(cfgs["unet"])
        text_params = count_params(CLIPTextModel(CLIPTextConfig(**cfgs["text_encoder"])))
        decoder_params = count_params(AutoencoderKL.from_config(cfgs["vae"]).decoder)
        tkeys = list(teacher.state_dict())
        n_stages = len(teacher.config.block_out_channels)
        latent = teacher.config.sample_size

        def entry(title: str, unet, weight_map, keep=None) -> dict:
            macs, macs_all = unet_macs(unet)
            removed = removed_blocks(unet.state_dict(), tkeys, weight_map) if weight_map is not None else []
            by_stage = {g["stage"]: g["removed"] or ["all"] for g in removed_by_stage(removed, tkeys)}
            return {
                "title": title,
                "unet_params": count_params(unet),
                "whole_params": count_params(unet) + text_params + decoder_params,
                "text_encoder_params": text_params,
                "vae_decoder_params": decoder_params,
                "macs": macs,
                "macs_with_attention": macs_all,
                "config": {
                    k: unet.config[k]
                    for k in (
                        "block_out_channels",
                        "layers_per_block",
                        "mid_block_type",
                        "down_block_types",
                        "up_block_types",
                    )
                },
                "removed": by_stage,
                **({"keep": derive(keep, cfgs["unet"]).pattern} if keep is not None else {}),
            }

        report = {"teacher": entry(teacher_cfg.title, teacher, None)}
        for name, arch in arch_cfgs.items():
            student = build_student(cfgs["unet"], arch)
            title = str(arch.get("title", name)).replace("BK-SDM", teacher_cfg.get("family") or "BK-SDM", 1)
            report[name] = entry(title, student, arch.get("weight_map") or {}, arch.get("keep"))
    for item in report.values():
        item["unet_fraction_of_teacher"] = round(item["unet_params"] / report["teacher"]["unet_params"], 4)
    meta = {
        "teacher_name": teacher_cfg.name,
        "teacher_source": str(teacher_cfg.pretrained),
        "resolution_px": teacher_cfg.resolution,
        "latent_size": latent,
        "text_encoder_params": text_params,
        "vae_decoder_params": decoder_params,
        "stage_resolutions": {
            **{f"down_blocks.{i}": latent // 2**i for i in range(n_stages)},
            "mid_block": latent // 2 ** (n_stages - 1),
            **{f"up_blocks.{j}": latent // 2 ** (n_stages - 1 - j) for j in range(n_stages)},
        },
    }
    return {"meta": meta, "models": report}


def _stages(stages) -> str:
    return " | ".join("-" if s is None else ",".join(map(str, s)) for s in stages)


def format_table(report: dict) -> str:
    meta, models = report["meta"], report["models"]
    labels = {n: m["title"] if n == "teacher" else f"{m['title']} [{n}]" for n, m in models.items()}
    width = max(25, *(len(label) + 2 for label in labels.values()))
    lines = [
        f"Teacher {models['teacher']['title']} ({meta['teacher_source']}), {meta['resolution_px']} px "
        f"({meta['latent_size']}x{meta['latent_size']} latent)",
        "",
        f"{'model':<{width}}{'U-Net params':>15}{'% teacher':>11}{'whole params':>16}{'MACs (paper)':>14}{'MACs (+attn)':>14}",
    ]
    for name, m in models.items():
        lines.append(
            f"{labels[name]:<{width}}{m['unet_params']:>15,}{100 * m['unet_fraction_of_teacher']:>10.1f}%"
            f"{m['whole_params']:>16,}{m['macs'] / 1e9:>13.1f}G{m['macs_with_attention'] / 1e9:>13.1f}G"
        )
    lines += [
        "",
        f"whole = U-Net + text encoder ({meta['text_encoder_params']:,}) + VAE decoder ({meta['vae_decoder_params']:,}).",
        "MACs per U-Net forward, batch 1: (paper) conv+linear+norm as thop counts; (+attn) every matmul.",
    ]
    patterns = {n: m["keep"] for n, m in models.items() if "keep" in m}
    if patterns:
        cols = [(_stages(k["down"]), "yes" if k["mid"] else "no", _stages(k["up"])) for k in patterns.values()]
        w_down = max(len("down_blocks.0 .. 3"), *(len(c[0]) for c in cols)) + 3
        names = list(patterns)
        w_name = max(len(n) for n in names) + 4
        lines += [
            "",
            "Kept teacher layers (keep patterns; '-' = stage dropped):",
            f"  {'variant':<{w_name}}{'down_blocks.0 .. ' + str(len(next(iter(patterns.values()))['down']) - 1):<{w_down}}"
            f"{'mid':<6}up_blocks.0 .. {len(next(iter(patterns.values()))['up']) - 1}",
        ]
        for name, (down, mid, up) in zip(names, cols):
            lines.append(f"  {name:<{w_name}}{down:<{w_down}}{mid:<6}{up}")
    lines += ["", "Removed teacher blocks, stage by stage:"]
    res = meta["stage_resolutions"]
    for name, m in models.items():
        if name == "teacher":
            continue
        lines.append(f"  {labels[name]}")
        if not m["removed"]:
            lines.append("    nothing")
        for stage, blocks in m["removed"].items():
            lines.append(f"    {stage:<14} ({res[stage]:>3}x{res[stage]:<3}) {', '.join(blocks)}")
    return "\n".join(lines)


def _composing(fn):
    """``fn()`` with Hydra initialised on CONF_DIR: from Python, or inside a Hydra app (already initialised)."""
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return fn()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return fn()


class ReportError(ValueError):
    """The report cannot be made as asked."""


PATTERN = "keep"  # conf/arch/keep.yaml: the base of every pattern, reported only when named


def variant_names(variants=None) -> list[str]:
    """``variants``, or (null) every conf/arch/*.yaml but keep.yaml (a pattern's base, the teacher's size as shipped)
    and same.yaml (the teacher's own architecture)."""
    if variants is not None:
        return [str(v) for v in variants]
    return sorted(p.stem for p in (CONF_DIR / "arch").glob("*.yaml") if p.stem not in (PATTERN, "same"))


def load_archs(names, overrides=()) -> dict:
    """``{variant: conf/arch/<variant>.yaml}`` composed by Hydra (``defaults:`` inheritance applies) with the other
    ``overrides`` of conf/arch.yaml (``teacher=``: a keep pattern is derived from the teacher's config)."""
    overrides = [o for o in overrides if not o.lstrip("+~").startswith(("arch=", "arch."))]
    return _composing(
        lambda: {n: compose(config_name="arch", overrides=[*overrides, f"+arch={n}"]).arch for n in names}
    )


_PATTERN_KEYS = ("name", "title", "down", "up", "mid")


def pattern_archs(patterns, overrides=(), taken=(), teacher=None) -> dict:
    """``{name: arch config}`` of ``patterns=[{name:, down:, up:, mid:}, ...]``: conf/arch/keep.yaml with each pattern
    (checked against ``teacher``'s U-Net config when given: a bad one is a ReportError naming ``patterns.<i>``)."""
    if patterns is None:
        return {}
    if not isinstance(patterns, (list, tuple, ListConfig)):
        raise ReportError(
            f"patterns={patterns!r} must be a list of keep patterns, e.g. patterns=[{{up: [[0,2],[0,2]]}}]"
        )
    base = load_archs([PATTERN], overrides)[PATTERN] if patterns else None
    out = {}
    for i, pattern in enumerate(patterns):
        if not isinstance(pattern, (dict, DictConfig)):
            raise ReportError(f"patterns.{i}={pattern!r} must be a mapping with keys among: {', '.join(_PATTERN_KEYS)}")
        pattern = OmegaConf.to_container(pattern) if isinstance(pattern, DictConfig) else dict(pattern)
        if unknown := [k for k in pattern if k not in _PATTERN_KEYS]:
            raise ReportError(
                f"patterns.{i}.{unknown[0]} is not a pattern key; the keys are: {', '.join(_PATTERN_KEYS)}"
            )
        name = str(pattern.get("name") or f"p{i + 1}")
        if name in out or name in taken:
            raise ReportError(f"patterns.{i}.name={name!r} is taken by another variant or pattern: give each its own")
        keep = {k: pattern[k] for k in ("down", "up", "mid") if k in pattern}
        if teacher is not None:
            try:
                derive(keep, *teacher_unet_config(teacher), key=f"patterns.{i}")
            except KeepPatternError as err:
                raise ReportError(str(err)) from None
        arch = OmegaConf.merge(base, {"name": name, "keep": keep})
        arch.title = str(pattern.get("title") or "keep pattern")
        out[name] = arch
    return out


def load_config(overrides: list[str]):
    """``(cfg, {variant or pattern: arch config})`` of conf/arch.yaml with ``overrides``."""
    cfg = _composing(lambda: compose(config_name="arch", overrides=overrides))
    names = variant_names(cfg.variants)
    return cfg, {**load_archs(names, overrides), **pattern_archs(cfg.get("patterns"), overrides, names, cfg.teacher)}


def resolve_arch(arch, teacher) -> dict:
    """An arch config resolved against ``teacher`` (a keep pattern's weight map etc. derive from its U-Net config)."""
    if not isinstance(arch, DictConfig):
        return dict(arch)
    root = OmegaConf.create(
        {"teacher": OmegaConf.to_container(teacher, resolve=True), "arch": OmegaConf.to_container(arch, resolve=False)}
    )
    return OmegaConf.to_container(root.arch, resolve=True)


def report(cfg, archs) -> str:
    """The text ``python -m bksdm_lab.arch`` prints: a table, or JSON keyed by variant."""
    if cfg.format not in ("table", "json"):
        raise ReportError(f"format={cfg.format!r} is not one of: table, json")
    try:
        result = describe(cfg.teacher, {n: resolve_arch(a, cfg.teacher) for n, a in archs.items()})
    except KeepPatternError as err:
        raise ReportError(str(err)) from None
    return json.dumps(result["models"], indent=2) if cfg.format == "json" else format_table(result)
