"""What each architecture variant keeps and removes, with exact sizes and costs. Offline, on the meta device.

    python -m bksdm_lab.arch                       # SD-v1.4 and BK-SDM-Base/Small/Tiny
    python -m bksdm_lab.arch teacher=sd21base      # the v2 students
    python -m bksdm_lab.arch format=json           # one JSON object keyed by variant

Parameters and MACs come from the shipped config.json files of the teacher (no weights are loaded).
"Whole model" is the paper's definition: U-Net + text encoder + VAE decoder. MACs are per U-Net
forward at the teacher's resolution, counted the paper's way (conv + linear + norm layers, as thop
does; attention matmuls not counted) and also with every matmul (torch's FLOP counter / 2).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel

from bksdm_lab import CONF_DIR
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

        def entry(title: str, unet, weight_map) -> dict:
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
            }

        report = {"teacher": entry(teacher_cfg.title, teacher, None)}
        for name, arch in arch_cfgs.items():
            student = build_student(cfgs["unet"], arch)
            title = str(arch.get("title", name)).replace("BK-SDM", teacher_cfg.get("family") or "BK-SDM", 1)
            report[name] = entry(title, student, arch.get("weight_map") or {})
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


def format_table(report: dict) -> str:
    meta, models = report["meta"], report["models"]
    lines = [
        f"Teacher {models['teacher']['title']} ({meta['teacher_source']}), {meta['resolution_px']} px "
        f"({meta['latent_size']}x{meta['latent_size']} latent)",
        "",
        f"{'model':<25}{'U-Net params':>15}{'% teacher':>11}{'whole params':>16}{'MACs (paper)':>14}{'MACs (+attn)':>14}",
    ]
    for name, m in models.items():
        label = m["title"] if name == "teacher" else f"{m['title']} [{name}]"
        lines.append(
            f"{label:<25}{m['unet_params']:>15,}{100 * m['unet_fraction_of_teacher']:>10.1f}%{m['whole_params']:>16,}"
            f"{m['macs'] / 1e9:>13.1f}G{m['macs_with_attention'] / 1e9:>13.1f}G"
        )
    lines += [
        "",
        f"whole = U-Net + text encoder ({meta['text_encoder_params']:,}) + VAE decoder ({meta['vae_decoder_params']:,}).",
        "MACs per U-Net forward, batch 1: (paper) conv+linear+norm as thop counts; (+attn) every matmul.",
        "",
        "Removed teacher blocks, stage by stage:",
    ]
    res = meta["stage_resolutions"]
    for name, m in models.items():
        if name == "teacher":
            continue
        lines.append(f"  {m['title']} [{name}]")
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


def variant_names(variants=None) -> list[str]:
    return [str(v) for v in variants] if variants else sorted(p.stem for p in (CONF_DIR / "arch").glob("*.yaml"))


def load_archs(names) -> dict:
    """``{variant: conf/arch/<variant>.yaml}`` composed by Hydra (``defaults:`` inheritance applies)."""
    return _composing(lambda: {n: compose(config_name="arch", overrides=[f"+arch={n}"]).arch for n in names})


def load_config(overrides: list[str]):
    """``(cfg, {variant: arch config})`` of conf/arch.yaml with ``overrides``."""
    cfg = _composing(lambda: compose(config_name="arch", overrides=overrides))
    return cfg, load_archs(variant_names(cfg.variants))


class ReportError(ValueError):
    """The report cannot be made as asked."""


def report(cfg, archs) -> str:
    """The text ``python -m bksdm_lab.arch`` prints: a table, or JSON keyed by variant."""
    if cfg.format not in ("table", "json"):
        raise ReportError(f"format={cfg.format!r} is not one of: table, json")
    result = describe(cfg.teacher, {n: OmegaConf.to_container(a, resolve=True) for n, a in archs.items()})
    return json.dumps(result["models"], indent=2) if cfg.format == "json" else format_table(result)
