"""Load a frozen teacher Stable Diffusion (U-Net, VAE, text encoder, tokenizer, schedulers).

Real teachers (a hub id or a local diffusers folder) and the offline demo teacher go through the same
``from_pretrained`` calls. Each part is loaded on its own; the safety checker only for an export.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import diffusers
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from huggingface_hub import constants as hf_constants
from huggingface_hub import try_to_load_from_cache
from transformers import CLIPImageProcessor, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from bksdm_lab.models.demo import build_demo_teacher, byte_level_tokenizer

MODEL_CONFIGS = Path(__file__).parent / "configs"
PREDICTION_TYPES = ("epsilon", "v_prediction")  # what the training target supports (DistillModule.compute_loss)
SAFETY_PARTS = ("safety_checker", "feature_extractor")


class TeacherLoadError(RuntimeError):
    """The teacher could not be loaded; the message says which, why, and what to do."""


@dataclass
class Teacher:
    name: str
    source: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL | None  # None when training from cached latents: loaded on demand by ensure_vae()
    text_encoder: CLIPTextModel
    tokenizer: CLIPTokenizer
    scheduler: Any  # the pipeline's inference scheduler, exported with the student
    noise_scheduler: DDPMScheduler  # the training noise scheduler (same betas and prediction type)

    revision: str | None = None
    variant: str | None = None

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    def ensure_vae(self, device=None, dtype=None) -> AutoencoderKL:
        """The VAE, loaded now if the teacher was loaded without it (cached-latent training)."""
        if self.vae is None:
            vae = AutoencoderKL.from_pretrained(
                self.source, subfolder="vae", revision=self.revision, variant=self.variant
            )
            self.vae = vae.requires_grad_(False).eval()
        moves = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        if moves:  # only what is set: diffusers warns about fp32-only modules whenever dtype is passed, even None
            self.vae.to(**moves)
        return self.vae

    def safety_parts(self) -> tuple[StableDiffusionSafetyChecker | None, CLIPImageProcessor | None]:
        """The teacher pipeline's safety checker and its feature extractor, loaded from its source when its
        ``model_index.json`` names both (SD-v1.4 does), else ``(None, None)``."""
        kw = {"revision": self.revision}
        local = Path(self.source)
        if local.is_dir() and not (local / "model_index.json").is_file():
            return None, None  # a folder of parts without a pipeline index: nothing says it has a checker
        try:
            index = DiffusionPipeline.load_config(self.source, **kw)
            if not all((index.get(part) or [None])[0] for part in SAFETY_PARTS):
                return None, None
            checker = StableDiffusionSafetyChecker.from_pretrained(self.source, subfolder="safety_checker", **kw)
            extractor = CLIPImageProcessor.from_pretrained(self.source, subfolder="feature_extractor", **kw)
        except Exception as err:  # hub, file-system and format errors all end here, with the cause attached
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise TeacherLoadError(
                f"Teacher {self.name!r}: the safety checker of {self.source!r} could not be loaded: {reason}"
            ) from err
        return checker.eval(), extractor


def _looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).expanduser().exists() or source.count("/") != 1


def _hint() -> str:
    return (
        "Point at a local copy with `teacher.pretrained=/path/to/diffusers/folder` (a folder with unet/, vae/, "
        "text_encoder/, tokenizer/, scheduler/), or run the offline demo: `python -m bksdm_lab.train experiment=demo`."
    )


def teacher_source(cfg) -> str:
    """The hub id or local folder of a teacher config, checked if it is local. A missing folder that is the config's
    ``build_if_missing`` place (``teacher=demo``) is built there first, from the shipped ``configs`` with random
    weights; any other missing folder (a mistyped ``teacher.pretrained=``) is never written."""
    name, source = cfg.name, str(cfg.pretrained)
    if _looks_local(source):
        path = Path(source).expanduser()
        home = cfg.get("build_if_missing")
        if home and not path.exists() and path.resolve() == Path(str(home)).expanduser().resolve():
            build_demo_teacher(path, shipped_configs(cfg.configs))
        if not path.is_dir():
            raise TeacherLoadError(
                f"Teacher {name!r}: local folder {path} does not exist. {cfg.get('if_missing') or _hint()}"
            )
        missing = [
            sub for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (path / sub).is_dir()
        ]
        if missing:
            raise TeacherLoadError(
                f"Teacher {name!r}: {path} is not a diffusers pipeline folder (no {', '.join(missing)}/). {_hint()}"
            )
        source = str(path)
    return source


def _load_error(cfg, source: str, err: Exception) -> TeacherLoadError:
    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return TeacherLoadError(
        f"Teacher {cfg.name!r} could not be loaded from {source!r}: {type(err).__name__}: {reason}\n"
        f"(Without network access the Hugging Face Hub cannot be reached; HF_HUB_OFFLINE=1 only finds "
        f"models already in the local cache.) {_hint()}"
    )


def _hub_unreachable(repo_id: str) -> str | None:
    """Why the hub cannot serve ``repo_id`` right now (None if it may): checked in well under a second.

    Without this, a hub look-up with no network fails only after ~30 s of retries.
    """
    if hf_constants.HF_HUB_OFFLINE or os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return None  # offline mode fails fast by itself; behind a proxy a direct probe proves nothing
    if isinstance(try_to_load_from_cache(repo_id, "unet/config.json"), str):
        return None
    host = urlparse(hf_constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as err:
        return f"the Hugging Face Hub ({host}) is unreachable: {err}"
    return None


def probe_teacher(cfg) -> None:
    """Cheaply check that the teacher can be found (its U-Net config) and trained (its scheduler's prediction type),
    raising TeacherLoadError if not."""
    if random_weights(cfg):  # nothing to find: only its shipped configs
        _random_configs(cfg)
        return
    source = teacher_source(cfg)
    if not Path(source).is_dir() and (why := _hub_unreachable(source)):
        raise TeacherLoadError(f"Teacher {cfg.name!r} could not be loaded from {source!r}: {why}. {_hint()}")
    try:
        UNet2DConditionModel.load_config(source, subfolder="unet", revision=cfg.get("revision"))
    except Exception as err:  # hub, file-system and format errors all end here, with the cause attached
        raise _load_error(cfg, source, err) from err
    scheduler_config(cfg, source)


def scheduler_config(cfg, source: str) -> dict:
    """The teacher's scheduler config, refused (one line) when its ``prediction_type`` cannot be trained."""
    try:
        config = DDPMScheduler.load_config(source, subfolder="scheduler", revision=cfg.get("revision"))
    except Exception as err:  # hub, file-system and format errors all end here, with the cause attached
        raise _load_error(cfg, source, err) from err
    return check_prediction_type(config, cfg.name, f"{source}/scheduler")


def check_prediction_type(config: dict, name: str, where: str) -> dict:
    kind = config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise TeacherLoadError(
            f"Teacher {name!r}: prediction_type={kind!r} ({where}) is not supported: bksdm_lab trains teachers "
            f"that predict {' or '.join(PREDICTION_TYPES)}"
        )
    return config


def load_teacher(cfg, load_vae: bool = True) -> Teacher:
    """Load every part of the teacher named by a ``conf/teacher/*.yaml`` config (the VAE only if asked)."""
    if random_weights(cfg):
        return random_teacher(cfg, load_vae)
    source = teacher_source(cfg)
    kw = {"revision": cfg.get("revision")}
    sched_config = scheduler_config(cfg, source)
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", variant=cfg.get("variant"), **kw)
        vae = (
            AutoencoderKL.from_pretrained(source, subfolder="vae", variant=cfg.get("variant"), **kw)
            if load_vae
            else None
        )
        text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
    except Exception as err:  # hub, file-system and format errors all end here, with the cause attached
        raise _load_error(cfg, source, err) from err
    return Teacher(
        name=cfg.name,
        source=source,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        **schedulers(sched_config),
        revision=cfg.get("revision"),
        variant=cfg.get("variant"),
    )


def schedulers(config: dict) -> dict:
    """A teacher's inference scheduler (its own class, PNDM if unknown) and its DDPM training noise schedule."""
    inference = getattr(diffusers, config.get("_class_name", "PNDMScheduler"), diffusers.PNDMScheduler)
    return {"scheduler": inference.from_config(config), "noise_scheduler": DDPMScheduler.from_config(config)}


def shipped_configs(configs: str) -> dict[str, dict]:
    """The shipped config.json data (no weights) of a teacher: unet, text_encoder, vae, scheduler."""
    root = MODEL_CONFIGS / configs
    if not root.is_dir():
        known = sorted(p.name for p in MODEL_CONFIGS.iterdir() if p.is_dir())
        raise ValueError(f"teacher.configs={configs!r} is not shipped; known: {known}")
    out = {}
    for sub in ("unet", "text_encoder", "vae"):
        out[sub] = json.loads((root / sub / "config.json").read_text())
    out["scheduler"] = json.loads((root / "scheduler" / "scheduler_config.json").read_text())
    return out


# ---- teacher.weights=random: the real shapes with random weights, for benchmarks without a download ----
WEIGHTS = ("pretrained", "random")


def random_weights(cfg) -> bool:
    """Whether ``teacher.weights`` (default ``pretrained``) is ``random``."""
    weights = cfg.get("weights") or "pretrained"
    if weights not in WEIGHTS:
        raise TeacherLoadError(f"teacher.weights={weights!r} is not one of {', '.join(WEIGHTS)}")
    return weights == "random"


def _random_configs(cfg) -> dict[str, dict]:
    try:
        parts = shipped_configs(cfg.configs)
    except ValueError as err:
        raise TeacherLoadError(f"teacher.weights=random needs shipped configs: {err}") from None
    check_prediction_type(parts["scheduler"], cfg.name, f"the shipped configs {cfg.configs}/scheduler")
    return parts


@dataclass
class RandomTeacher(Teacher):
    """A teacher of the shapes of the shipped ``configs``, with random weights (the byte-level demo tokenizer)."""

    configs: str = ""

    def safety_parts(self) -> tuple[None, None]:
        return None, None  # random weights ship no safety checker

    def ensure_vae(self, device=None, dtype=None) -> AutoencoderKL:
        if self.vae is None:
            self.vae = AutoencoderKL.from_config(shipped_configs(self.configs)["vae"]).requires_grad_(False).eval()
        return super().ensure_vae(device, dtype)


def random_teacher(cfg, load_vae: bool = True, seed: int = 0) -> RandomTeacher:
    """``teacher.weights=random``: every part from the shipped ``teacher.configs``, random weights drawn from ``seed``
    (the same weights on every call; the global random state is left as it was)."""
    parts = _random_configs(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(parts["unet"])
        vae = AutoencoderKL.from_config(parts["vae"]) if load_vae else None
        text_encoder = CLIPTextModel(CLIPTextConfig(**parts["text_encoder"]))
    return RandomTeacher(
        name=cfg.name,
        source=f"random weights ({cfg.configs} shapes)",
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=byte_level_tokenizer(),
        **schedulers(parts["scheduler"]),
        configs=str(cfg.configs),
    )
