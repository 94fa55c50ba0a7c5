"""Export a student as a plain diffusers ``StableDiffusionPipeline`` folder."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from bksdm_lab.teachers import Teacher


def build_pipeline(teacher: Teacher, unet: UNet2DConditionModel) -> StableDiffusionPipeline:
    """The teacher's VAE, text encoder, tokenizer and scheduler around a (student) U-Net."""
    return StableDiffusionPipeline(
        vae=teacher.vae,
        text_encoder=teacher.text_encoder,
        tokenizer=teacher.tokenizer,
        unet=unet,
        scheduler=teacher.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def export_pipeline(teacher: Teacher, unet: UNet2DConditionModel, out_dir: str | Path) -> Path:
    """Save the pipeline in fp32 with safetensors; ``StableDiffusionPipeline.from_pretrained`` loads it."""
    out_dir = Path(out_dir)
    pipe = build_pipeline(teacher, unet)
    dtypes = {name: getattr(pipe, name).dtype for name in ("vae", "text_encoder", "unet")}
    for name, dtype in dtypes.items():
        if dtype != torch.float32:
            getattr(pipe, name).to(torch.float32)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    for name, dtype in dtypes.items():  # leave the caller's modules as they were
        if dtype != torch.float32:
            getattr(pipe, name).to(dtype)
    return out_dir
