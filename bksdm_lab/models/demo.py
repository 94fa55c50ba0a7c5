"""The offline demo's teacher: a tiny Stable Diffusion with the real SD-v1 block topology and random weights, built
from shipped configs, and the byte-level CLIP tokenizer it (and every other offline model here) uses."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from bksdm_lab.common.publish import publish


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for the bytes 0..255."""
    printable = (
        set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_level_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer over single bytes (no merges): deterministic, offline, 514 tokens."""
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def build_demo_teacher(out: str | Path, configs: dict[str, dict], seed: int = 0) -> Path:
    """Save a randomly initialised SD pipeline of the shipped ``configs`` (``teachers.shipped_configs``) as a diffusers
    folder at ``out``, once (a folder already there is kept)."""

    def build(tmp: Path) -> None:
        torch.manual_seed(seed)
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL.from_config(configs["vae"]),
            text_encoder=CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
            tokenizer=byte_level_tokenizer(),
            unet=UNet2DConditionModel.from_config(configs["unet"]),
            scheduler=PNDMScheduler.from_config(configs["scheduler"]),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(tmp)

    return publish(build, Path(out).expanduser())
