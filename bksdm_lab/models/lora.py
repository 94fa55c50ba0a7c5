"""LoRA adapters (peft) on a diffusers U-Net or a transformers text encoder, saved in the diffusers LoRA format:
``StableDiffusionPipeline.from_pretrained(base).load_lora_weights(folder)`` loads what :func:`save_lora` writes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections of the U-Net's transformer blocks
TEXT_TARGETS = ("q_proj", "v_proj")  # the CLIP text encoder's query and value projections
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what save_lora_weights writes and load_lora_weights looks for


def add_lora(model: torch.nn.Module, rank: int, alpha: float, targets: Sequence[str]) -> torch.nn.Module:
    """``model`` with a LoRA adapter (``rank``, ``alpha``: the update is scaled ``alpha / rank``) on the modules named
    ``targets``; the adapter's tensors are the only trainable ones. Returns ``model`` (changed in place)."""
    from peft import LoraConfig, inject_adapter_in_model

    if int(rank) < 1:
        raise ValueError(f"LoRA rank {rank} must be at least 1")
    config = LoraConfig(r=int(rank), lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    model.requires_grad_(False)
    try:
        model.add_adapter(config)
    except ValueError as err:
        # transformers 5 refuses peft releases before 0.22 in add_adapter, which only injects the adapter (as here)
        if "version of PEFT" not in str(err):
            raise
        inject_adapter_in_model(config, model, "default")
    return model


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a model given an adapter by :func:`add_lora`, named as diffusers saves them."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def save_lora(
    out_dir: str | Path, unet: torch.nn.Module | None = None, text_encoder: torch.nn.Module | None = None
) -> Path:
    """Write ``<out_dir>/pytorch_lora_weights.safetensors`` with the adapters of ``unet`` and/or ``text_encoder`` and
    their rank and alpha (without them a loader would scale the update by 1); returns the file."""
    from diffusers import StableDiffusionPipeline

    parts = {}
    for name, model in (("unet", unet), ("text_encoder", text_encoder)):
        if model is not None:
            parts[f"{name}_lora_layers"] = lora_state(model)
            parts[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    if not parts:
        raise ValueError("save_lora needs a unet or a text_encoder with a LoRA adapter")
    StableDiffusionPipeline.save_lora_weights(str(out_dir), safe_serialization=True, **parts)
    return Path(out_dir) / WEIGHT_NAME


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of a diffusers ``model`` with its LoRA adapters merged into the weights and removed: a plain model."""
    import copy

    plain = copy.deepcopy(model)
    plain.fuse_lora()
    plain.unload_lora()
    return plain
