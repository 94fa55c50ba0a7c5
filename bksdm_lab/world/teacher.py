"""The CPU-scale world's teacher: a small Stable Diffusion trained on the world's scenes, once, on CPU.

python -m bksdm_lab.world.teacher                 # conf/world.yaml: about 35 min on one core, then cached
python -m bksdm_lab.world.teacher data.num_images=64 vae.steps=4 unet.steps=4 samples.prompts=2   # seconds
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import random
import sys
import time
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from bksdm_lab.common.conf import CONF_DIR
from bksdm_lab.world import scenes

log = logging.getLogger(__name__)

TRAINER_VERSION = 1  # bump when a change here changes the trained weights: the cache folder name changes with it
TEACHER_PREFIX = "teacher-"
BUILD_COMMAND = "python -m bksdm_lab.world.teacher"


class WorldTeacherError(RuntimeError):
    """A config value or a folder that cannot work; the message names it and what to do."""


# ---- the config, its hash and the cache folder -------------------------------------------------------------------
TEXT_ENCODER_KEYS = tuple(f"text_encoder.{k}" for k in ("max_length", "layers", "heads", "intermediate_size"))
HASHED = ("seed", "data", "text_encoder", "caption_dropout", "vae", "unet")


def training_config(cfg: DictConfig) -> dict:
    """The part of ``conf/world.yaml`` that determines the weights (hashed into the folder name)."""
    c = {k: OmegaConf.to_container(cfg[k], resolve=True) if OmegaConf.is_config(cfg[k]) else cfg[k] for k in HASHED}
    return {
        "trainer_version": TRAINER_VERSION,
        "world_version": scenes.WORLD_VERSION,
        "seed": c["seed"],
        "data": {k: c["data"][k] for k in ("num_images", "seed", "size")},
        "text_encoder": c["text_encoder"],
        "caption_dropout": c["caption_dropout"],
        "vae": c["vae"],
        "unet": c["unet"],
    }


def config_hash(cfg: DictConfig) -> str:
    text = json.dumps(training_config(cfg), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def teacher_dir(cfg: DictConfig) -> Path:
    """Where this config's teacher lives: ``out``, else ``<paths.cache_dir>/world/teacher-<hash>``."""
    if cfg.get("out"):
        return Path(str(cfg.out)).expanduser()
    return Path(str(cfg.paths.cache_dir)).expanduser() / "world" / f"{TEACHER_PREFIX}{config_hash(cfg)}"


def check_config(cfg: DictConfig) -> list[str]:
    """Every bad value at once, each a line naming the key and what is allowed."""
    from bksdm_lab.models.teachers import MODEL_CONFIGS

    problems = []
    shipped = sorted(p.name for p in MODEL_CONFIGS.iterdir() if p.is_dir())
    if cfg.unet.configs not in shipped:
        problems.append(f"unet.configs={cfg.unet.configs!r} is not a shipped config set; allowed: {shipped}")
    for key in ("data.num_images", "vae.steps", "vae.batch_size", "unet.steps", "unet.batch_size", *TEXT_ENCODER_KEYS):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            problems.append(f"{key}={value!r} must be an integer >= 1")
    for key in ("vae.lr", "unet.lr"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, (int, float)) or value <= 0:
            problems.append(f"{key}={value!r} must be a number > 0")
    for key in ("caption_dropout", "unet.ema_decay"):
        value = OmegaConf.select(cfg, key)
        if not isinstance(value, (int, float)) or not 0 <= value < 1:
            problems.append(f"{key}={value!r} must be a number in [0, 1)")
    blocks = cfg.vae.block_out_channels
    if not blocks or any(not isinstance(b, int) or b % int(cfg.vae.norm_num_groups) for b in blocks):
        problems.append(
            f"vae.block_out_channels={list(blocks)} must be a non-empty list of multiples of "
            f"vae.norm_num_groups={cfg.vae.norm_num_groups}"
        )
    elif isinstance(cfg.data.size, int):
        multiple = 2 ** (len(blocks) - 1) * 8  # the VAE's downsampling, then the U-Net's three
        if cfg.data.size < 16 or cfg.data.size % multiple:
            problems.append(
                f"data.size={cfg.data.size} must be a multiple of {multiple} (at least 16): the VAE downsamples "
                f"{2 ** (len(blocks) - 1)}x and the U-Net 8x more"
            )
    else:
        problems.append(f"data.size={cfg.data.size!r} must be an integer (px)")
    if cfg.unet.configs in shipped:
        from bksdm_lab.models.teachers import shipped_configs

        known = shipped_configs(cfg.unet.configs)["unet"]
        unknown = sorted(set(cfg.unet.overrides or {}) - set(known))
        if unknown:
            problems.append(f"unet.overrides has keys that are not U-Net config keys: {unknown}")
    if cfg.samples.prompts is None or int(cfg.samples.prompts) < 0:
        problems.append(f"samples.prompts={cfg.samples.prompts!r} must be an integer >= 0")
    return problems


def read_readme(folder: Path) -> dict | None:
    try:
        found = json.loads((folder / "README.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and found.get("world_teacher") is True else None


# ---- training ----------------------------------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(f"bksdm_lab.world.teacher: {msg}", file=sys.stderr, flush=True)


def load_images(root: Path) -> tuple[torch.Tensor, list[str]]:
    """All images of a world set as one float tensor in [-1, 1] (N, 3, H, W), and their captions."""
    pairs = scenes.read_world(root)
    arrays = [np.asarray(Image.open(root / name).convert("RGB"), dtype=np.uint8) for name, _ in pairs]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return pixels, [scenes.caption(scene) for _, scene in pairs]


def _vae_config(cfg: DictConfig, shipped: dict) -> dict:
    n = len(cfg.vae.block_out_channels)
    vae = dict(shipped["vae"])
    vae.update(
        block_out_channels=list(cfg.vae.block_out_channels),
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        layers_per_block=int(cfg.vae.layers_per_block),
        norm_num_groups=int(cfg.vae.norm_num_groups),
        latent_channels=int(cfg.vae.latent_channels),
        sample_size=int(cfg.data.size),
    )
    return vae


def _unet_config(cfg: DictConfig, shipped: dict) -> dict:
    unet = dict(shipped["unet"])
    if cfg.unet.overrides:
        unet.update(OmegaConf.to_container(cfg.unet.overrides, resolve=True))
    factor = 2 ** (len(cfg.vae.block_out_channels) - 1)
    unet.update(in_channels=int(cfg.vae.latent_channels), out_channels=int(cfg.vae.latent_channels))
    unet["sample_size"] = int(cfg.data.size) // factor
    return unet


def train_vae(vae, pixels: torch.Tensor, cfg: DictConfig, gen: torch.Generator) -> dict:
    opt = torch.optim.AdamW(vae.parameters(), lr=float(cfg.vae.lr), weight_decay=0.0)
    steps, batch, kl_weight = int(cfg.vae.steps), int(cfg.vae.batch_size), float(cfg.vae.kl_weight)
    recent: list[tuple[float, float]] = []
    start = time.perf_counter()
    vae.train()
    for step in range(steps):
        lr = float(cfg.vae.lr) * 0.5 * (1 + math.cos(math.pi * step / steps))  # cosine to 0
        for group in opt.param_groups:
            group["lr"] = lr
        x = pixels[torch.randint(len(pixels), (batch,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        rec = F.mse_loss(recon, x)
        kl = posterior.kl().mean() / x[0].numel()  # per pixel value, as the reconstruction term
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        recent = (recent + [(rec.item(), kl.item())])[-50:]
        if (step + 1) % max(1, steps // 20) == 0 or step + 1 == steps:
            _log(
                f"vae step {step + 1}/{steps}: recon {rec.item():.5f} kl {kl.item():.3f} "
                f"({time.perf_counter() - start:.0f} s)"
            )
    vae.eval()
    return {"recon_mse": float(np.mean([r for r, _ in recent])), "kl": float(np.mean([k for _, k in recent]))}


@torch.no_grad()
def encode_all(vae, pixels: torch.Tensor, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(pixels), batch):
        posterior = vae.encode(pixels[i : i + batch]).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def world_tokenizer(max_length: int = 16):
    """The byte-level CLIP tokenizer plus one token per word of the world's captions (BPE merges that build each
    word), so a caption is about a dozen tokens and each attribute one token; any other text falls back to bytes."""
    from transformers import CLIPTokenizer

    from bksdm_lab.models.demo import byte_level_tokenizer

    base = byte_level_tokenizer().get_vocab()
    base = {t: i for t, i in base.items() if not t.startswith("<|")}
    words = sorted({w for s in scenes.all_scenes() for w in scenes.caption(s).split()}, key=lambda w: (-len(w), w))
    for _ in range(len(words)):  # BPE applies the lowest-ranked merge first: a word split wrongly goes to the front
        vocab, merges = dict(base), []
        for word in words:
            for k in range(2, len(word) + 1):
                pair = (word[: k - 1], word[k - 1] + ("</w>" if k == len(word) else ""))
                if pair not in merges:
                    merges.append(pair)
                vocab.setdefault("".join(pair), len(vocab))
        vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
        tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
        split = [w for w in words if len(tok(w, add_special_tokens=False).input_ids) != 1]
        if not split:
            return tok
        words = split + [w for w in words if w not in split]
    raise AssertionError(f"no merge order makes single tokens of {split}")


def token_ids(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def train_unet(models, ema, latents, ids, caption_index, noise_scheduler, cfg, gen) -> dict:
    """Epsilon prediction on ``latents`` (mean, std: the posterior, sampled each step) by ``models.unet`` reading
    ``models.text_encoder`` (trained with it) on the caption token ``ids`` (row 0: the empty caption, used at
    ``cfg.caption_dropout``); ``ema`` follows ``models``."""
    mean, std = latents
    unet, text_encoder = models.unet, models.text_encoder
    steps, batch, base_lr = int(cfg.unet.steps), int(cfg.unet.batch_size), float(cfg.unet.lr)
    warmup = int(cfg.unet.warmup)
    opt = torch.optim.AdamW(models.parameters(), lr=base_lr, weight_decay=0.01)
    alphas = noise_scheduler.config.num_train_timesteps
    recent: list[float] = []
    start = time.perf_counter()
    models.train()
    ema_params = list(ema.parameters())
    for step in range(steps):
        if step < warmup:
            lr = base_lr * (step + 1) / warmup
        else:
            progress = (step - warmup) / max(1, steps - warmup)
            lr = base_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(mean), (batch,), generator=gen)
        z = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, alphas, (batch,), generator=gen)
        noisy = noise_scheduler.add_noise(z, noise, t)
        drop = torch.rand(batch, generator=gen) < float(cfg.caption_dropout)
        cond = text_encoder(ids[torch.where(drop, 0, caption_index[idx])])[0]
        loss = F.mse_loss(unet(noisy, t, cond).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(models.parameters(), 1.0)
        opt.step()
        decay = min(float(cfg.unet.ema_decay), (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema_params, models.parameters()):
                e.lerp_(p, 1 - decay)
        recent = (recent + [loss.item()])[-50:]
        if (step + 1) % max(1, steps // 20) == 0 or step + 1 == steps:
            _log(f"unet step {step + 1}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    return {"loss": float(np.mean(recent))}


def sample_prompts(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    return [scenes.caption(scenes.sample_scene(rng)) for _ in range(n)]


def samples_grid(pipe, prompts: list[str], size: int, steps: int, guidance: float, seed: int = 0) -> Image.Image:
    """Per caption a column: the scene rendered (top) and the pipeline's sample (bottom), upscaled 4x."""
    gen = torch.Generator().manual_seed(seed)
    out = pipe(
        prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance, generator=gen
    ).images
    grid = Image.new("RGB", (size * len(prompts), size * 2))
    for i, (prompt, image) in enumerate(zip(prompts, out)):
        grid.paste(scenes.render(scenes.parse_caption(prompt), size), (i * size, 0))
        grid.paste(image, (i * size, size))
    return grid.resize((grid.width * 4, grid.height * 4), Image.Resampling.NEAREST)


def build(cfg: DictConfig, tmp: Path) -> None:
    """Train the teacher into ``tmp`` (published by the caller)."""
    from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from bksdm_lab.models.teachers import shipped_configs

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    seed = int(cfg.seed)
    root = scenes.write_world(cfg.data.root, int(cfg.data.num_images), int(cfg.data.seed), int(cfg.data.size))
    pixels, captions = load_images(root)
    times["data_s"] = time.perf_counter() - t0
    _log(f"{len(pixels)} world images from {root}")

    # Stage 1: the VAE.
    t = time.perf_counter()
    shipped = shipped_configs(cfg.unet.configs)
    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(_vae_config(cfg, shipped))
    gen = torch.Generator().manual_seed(seed)
    vae_losses = train_vae(vae, pixels, cfg, gen)
    mean, std = encode_all(vae, pixels)
    scaling = float(1.0 / (mean + std * torch.randn(mean.shape, generator=gen)).std())
    vae.register_to_config(scaling_factor=scaling)
    times["vae_s"] = time.perf_counter() - t

    # Stage 2: the U-Net, in the scaled latent space, and the text encoder it reads, trained together.
    t = time.perf_counter()
    tokenizer = world_tokenizer(int(cfg.text_encoder.max_length))
    special = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=int(cfg.text_encoder.max_length),
        hidden_size=int(shipped["unet"]["cross_attention_dim"]),
        intermediate_size=int(cfg.text_encoder.intermediate_size),
        num_attention_heads=int(cfg.text_encoder.heads),
        num_hidden_layers=int(cfg.text_encoder.layers),
        projection_dim=int(shipped["unet"]["cross_attention_dim"]),
        hidden_act="quick_gelu",
        bos_token_id=special[0],
        eos_token_id=special[1],
        pad_token_id=special[1],
    )
    unique = sorted(set(captions))
    ids = token_ids(tokenizer, ["", *unique])
    lookup = {c: i + 1 for i, c in enumerate(unique)}
    caption_index = torch.tensor([lookup[c] for c in captions])
    torch.manual_seed(seed)
    models = torch.nn.ModuleDict(
        {
            "unet": UNet2DConditionModel.from_config(_unet_config(cfg, shipped)),
            "text_encoder": CLIPTextModel(text_config),
        }
    )
    ema = copy.deepcopy(models).requires_grad_(False).eval()
    noise_scheduler = DDPMScheduler.from_config(shipped["scheduler"])
    unet_losses = train_unet(
        models, ema, (mean * scaling, std * scaling), ids, caption_index, noise_scheduler, cfg, gen
    )
    unet, text_encoder = ema.unet, ema.text_encoder
    times["unet_s"] = time.perf_counter() - t

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=PNDMScheduler.from_config(shipped["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(tmp)
    prompts = sample_prompts(int(cfg.samples.prompts))
    if prompts:
        t = time.perf_counter()
        pipe.set_progress_bar_config(disable=True)
        grid = samples_grid(
            pipe, prompts, int(cfg.data.size), int(cfg.samples.num_inference_steps), float(cfg.samples.guidance)
        )
        grid.save(tmp / "samples.png")
        times["samples_s"] = time.perf_counter() - t
    times["total_s"] = time.perf_counter() - t0
    readme = {
        "world_teacher": True,
        "config_hash": config_hash(cfg),
        "config": training_config(cfg),
        "command": f"{BUILD_COMMAND} {' '.join(sys.argv[1:])}".strip(),
        "data_root": str(root),
        "steps": {"vae": int(cfg.vae.steps), "unet": int(cfg.unet.steps)},
        "final_losses": {"vae_" + k: v for k, v in vae_losses.items()}
        | {"unet_" + k: v for k, v in unet_losses.items()},
        "scaling_factor": scaling,
        "params": {
            "vae": sum(p.numel() for p in vae.parameters()),
            "unet": sum(p.numel() for p in unet.parameters()),
            "text_encoder": sum(p.numel() for p in text_encoder.parameters()),
        },
        "wall_time": {k: round(v, 1) for k, v in times.items()},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "samples": {"prompts": prompts, "file": "samples.png" if prompts else None},
    }
    (tmp / "README.json").write_text(json.dumps(readme, indent=2) + "\n", encoding="utf-8")


def train_teacher(cfg: DictConfig) -> Path:
    """The teacher folder of this config: reused if it is there, else trained and published atomically."""
    problems = check_config(cfg)
    if problems:
        raise WorldTeacherError("\n".join(problems))
    out = teacher_dir(cfg)
    digest = config_hash(cfg)
    if out.exists():
        found = read_readme(out)
        if found is None:
            raise WorldTeacherError(
                f"{out} exists but is not a world teacher written by {BUILD_COMMAND} (no README.json with "
                "'world_teacher': true): point out= elsewhere, or move that folder away"
            )
        if found.get("config_hash") != digest:
            raise WorldTeacherError(
                f"{out} holds the world teacher of another config (hash {found.get('config_hash')}, not {digest}): "
                "point out= elsewhere, or leave out= unset to get this config's own folder"
            )
        _log(f"reusing the world teacher at {out} (config hash {digest})")
        return out
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    _log(f"training the world teacher (config hash {digest}) into {out}")
    from bksdm_lab.common.publish import publish

    publish(lambda tmp: build(cfg, tmp), out)
    return out


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="world")
def main(cfg: DictConfig) -> None:
    from bksdm_lab.common.cli import guarded
    from bksdm_lab.data.common import DataError

    out = guarded("world.teacher", train_teacher, cfg, (WorldTeacherError, DataError))
    readme = read_readme(out) or {}
    print(f"world teacher: {out}")
    if readme:
        print(f"  trained in {readme['wall_time'].get('total_s')} s; final losses {readme['final_losses']}")
    print(f"  distil from it: python -m bksdm_lab.train experiment=world teacher.pretrained={out}")


if __name__ == "__main__":
    main()
