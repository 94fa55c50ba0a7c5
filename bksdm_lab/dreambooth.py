"""DreamBooth on a student pipeline (``python -m bksdm_lab.finetune``): the subject's photos and class images the
student generates itself (cached), the training module (``full``: U-Net and text encoder; ``lora``: peft adapters),
the before/after images of the subject, and the result (a pipeline folder, or diffusers LoRA weights) with its card.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import yaml
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torch.utils.data import Dataset, default_collate

from bksdm_lab.common.checkpoint import CheckpointError
from bksdm_lab.common.secrets import LOCAL, public_source
from bksdm_lab.data.common import BadSample, CaptionDataModule, DataError, load_image, resumable_loader
from bksdm_lab.distill.module import NonFiniteLossError, first_dtype, random_timesteps, sample_seed
from bksdm_lab.evaluation import sampling as gen
from bksdm_lab.models.export import CARD_TAGS, LICENSE_URL, PAPER, build_pipeline, export_pipeline, push_to_hub
from bksdm_lab.models.lora import TEXT_TARGETS, UNET_TARGETS, add_lora, save_lora
from bksdm_lab.models.teachers import Teacher, check_prediction_type, schedulers

log = logging.getLogger("bksdm_lab")

MODES = ("full", "lora")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_PIXELS = 16384 * 16384  # larger images are refused as decompression bombs (as data.max_pixels)
CLASS_MANIFEST = "class_images.json"
# the class images' sampling settings they depend on (not the batch size)
IMAGE_SETTINGS = ("scheduler", "steps", "guidance", "resolution", "seed", "seed_mode", "precision", "generator_device")


def say(message: str) -> None:
    """A line for the user, in the log too."""
    log.info(message)
    print(f"bksdm_lab.finetune: {message}", flush=True)


# ---- the student's parts ------------------------------------------------------------------------------------------
def load_parts(source: str) -> Teacher:
    """The student pipeline's U-Net, VAE, text encoder, tokenizer and schedulers (fp32, CPU), with its DDPM training
    noise schedule (its scheduler's betas and prediction type)."""
    pipe, _ = gen.load_pipeline(pipeline=source, device="cpu", precision="fp32")
    config = check_prediction_type(dict(pipe.scheduler.config), "pipeline", f"{source}/scheduler")
    local = Path(source).expanduser()
    return Teacher(
        name="student",
        source=str(local) if local.exists() else source,
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        **schedulers(config),
    )


# ---- class images: generated once by the student, cached ----------------------------------------------------------
def source_id(source: str) -> dict:
    """What names a pipeline's weights for the cache: a hub id, or a local folder with the size and time of each of
    its weight files (a re-exported folder gets new class images)."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return {"hub_id": source}
    files = sorted(p for sub in ("unet", "text_encoder", "vae") for p in (path / sub).glob("*") if p.is_file())
    return {
        "folder": str(path.resolve()),
        "files": [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files],
    }


def class_settings(
    source: str, class_prompt: str, num_images: int, resolution: int, sampling: Mapping, device: torch.device
) -> tuple[dict, dict]:
    """``(what the class images depend on, the sampling settings to generate them with)``: the defaults that depend
    on the device (precision, where the noise is drawn) resolved, prompt ``i`` seeded ``seed + i``."""
    s = {**gen.sampling_dict(sampling), "resolution": int(resolution), "seed_mode": "per-prompt"}
    s["precision"] = s["precision"] or gen.default_precision(device)
    if s["generator_device"] == "device":
        s["generator_device"] = torch.device(device).type
    settings = {
        "pipeline": source_id(source),
        "class_prompt": str(class_prompt),
        "num_images": int(num_images),
        "sampling": {k: s[k] for k in IMAGE_SETTINGS},
    }
    return settings, s


def class_dir(cache_dir: str | Path, settings: Mapping) -> Path:
    """``<cache_dir>/class_images/<hash of the settings>``."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / "class_images" / digest


@dataclass
class ClassImages:
    folder: Path
    paths: list[Path]
    generated: int
    reused: int


def _on_disk(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def ensure_class_images(
    source: str, folder: str | Path, settings: Mapping, sampling: Mapping, device: torch.device | str | None = None
) -> ClassImages:
    """The class images of ``settings`` in ``folder/images/<i:05d>.png``: those missing are generated by the pipeline
    ``source`` (loaded only then), the others reused; ``folder/class_images.json`` records the settings."""
    folder = Path(folder).expanduser()
    manifest = folder / CLASS_MANIFEST
    if manifest.is_file():
        recorded = json.loads(manifest.read_text()).get("settings")
        if recorded != dict(settings):
            diff = [k for k in settings if recorded is None or recorded.get(k) != settings[k]]
            raise gen.GenerationError(
                f"prior.dir={str(folder)!r} holds class images of other settings ({', '.join(diff)} differ): "
                f"use another prior.dir (null: a cache folder of these settings), or delete it to generate them again"
            )
    num = int(settings["num_images"])
    paths = [folder / gen.IMAGE_DIR / gen.image_name(i) for i in range(num)]
    todo = sum(not _on_disk(p) for p in paths)
    generated = 0
    if todo:
        device = torch.device(device) if device is not None else gen.default_device()
        say(f"generating {todo} class images ({settings['class_prompt']!r}) with the student into {folder}")
        pipe, model = gen.load_pipeline(pipeline=source, device=device, precision=sampling["precision"])
        try:
            gen.set_scheduler(pipe, sampling["scheduler"])
            result = gen.generate_images(
                pipe,
                [settings["class_prompt"]] * num,
                folder,
                **gen.sampling_kwargs(sampling),
                grid=0,
                progress=True,
                model=model,
            )
            generated = result.generated
        finally:
            del pipe
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    manifest.write_text(json.dumps({"settings": dict(settings), "num_images": num}, indent=2) + "\n")
    return ClassImages(folder, paths, generated, num - generated)


# ---- data ---------------------------------------------------------------------------------------------------------
def subject_images(folder: str | Path) -> list[Path]:
    """The image files (png, jpg, jpeg, webp) of a folder, by name."""
    folder = Path(str(folder)).expanduser()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _ids(tokenizer, prompt: str) -> torch.Tensor:
    return tokenizer(
        prompt, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids[0]


class DreamBoothData(Dataset):
    """Sample ``i``: subject image ``i mod n`` with the instance prompt and, with prior preservation, class image
    ``i mod m`` with the class prompt (``class_pixel_values``, ``class_input_ids``); ``max(n, m)`` samples."""

    def __init__(self, instance: list[torch.Tensor], instance_ids, class_paths: Sequence[Path], class_ids, resolution):
        self.instance, self.instance_ids = instance, instance_ids
        self.class_paths, self.class_ids, self.resolution = list(class_paths), class_ids, resolution

    def __len__(self) -> int:
        return max(len(self.instance), len(self.class_paths))

    def __getitem__(self, item: int | tuple[int, bool]) -> dict:
        index = item[0] if isinstance(item, tuple) else item  # (index, flip) from ResumableSampler: never flipped
        sample = {"pixel_values": self.instance[index % len(self.instance)], "input_ids": self.instance_ids}
        sample["index"] = index
        if self.class_paths:
            path = self.class_paths[index % len(self.class_paths)]
            try:
                sample["class_pixel_values"] = load_image(path, self.resolution, False, "upscale", MAX_PIXELS)[0]
            except BadSample as bad:
                raise DataError(
                    f"class image {path} cannot be read ({bad}): delete {path.parent.parent} to generate the class "
                    "images again"
                ) from None
            sample["class_input_ids"] = self.class_ids
        return sample


class DreamBoothDataModule(CaptionDataModule):
    """The subject's photos (read once: a corrupt or unreadable one is skipped and counted in ``skipped``), resized
    and centre-cropped to ``resolution``, never flipped, with the class images beside them; a resumable loader."""

    def __init__(
        self,
        instance_dir: str | Path,
        instance_prompt: str,
        tokenizer,
        resolution: int,
        batch_size: int = 1,
        class_paths: Sequence[Path] = (),
        class_prompt: str | None = None,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__(tokenizer, resolution, batch_size, num_workers=num_workers, random_flip=False, seed=seed)
        self.skipped: dict[str, int] = {}
        files = subject_images(instance_dir)
        pixels = []
        for path in files:
            try:
                pixels.append(load_image(path, resolution, False, "upscale", MAX_PIXELS)[0])
            except BadSample as bad:
                log.warning("skipping subject image %s (%s): %s", path.name, bad.reason, bad)
                self.skipped[bad.reason] = self.skipped.get(bad.reason, 0) + 1
        if not pixels:
            raise DataError(
                f"instance.dir={str(instance_dir)!r}: none of its {len(files)} images can be read ({self.skipped})"
            )
        self.num_instance = len(pixels)
        class_ids = _ids(tokenizer, class_prompt) if class_paths else None
        self.dataset = DreamBoothData(pixels, _ids(tokenizer, instance_prompt), class_paths, class_ids, resolution)
        if len(self.dataset) < batch_size:
            raise DataError(
                f"batch_size={batch_size} is more than the {len(self.dataset)} samples (subject images, class images)"
            )

    def train_dataloader(self):
        return resumable_loader(self, self.dataset, default_collate, random_flip=False)


def _checkpoint_activations(text_encoder) -> None:
    """Gradient checkpointing of a transformers text encoder (its 5.x name, or the earlier one)."""
    kwargs = {"use_reentrant": False}  # the reentrant variant needs inputs that require grad (not token ids)
    if hasattr(text_encoder, "activation_checkpointing_enable"):
        text_encoder.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# ---- the module ---------------------------------------------------------------------------------------------------
class DreamBoothModule(pl.LightningModule):
    """DreamBooth with prior preservation: ``loss = MSE(subject) + prior_loss_weight * MSE(class)`` on the DDPM
    target (the noise, or the velocity for a v-prediction student). The noise, timestep and VAE posterior sample of
    a sample are drawn from a generator seeded by (``seed``, optimizer step, sample), so a resumed run draws what an
    uninterrupted one draws. ``mode``: ``full`` trains the U-Net (and the text encoder), ``lora`` LoRA adapters
    (``lora``: ``rank``, ``alpha``, ``text_encoder: {rank, alpha}``). Checkpoints hold the trained tensors only."""

    def __init__(
        self,
        parts: Teacher,
        mode: str,
        optimizer: Callable[..., torch.optim.Optimizer],
        prior_loss_weight: float = 1.0,
        train_text_encoder: bool = True,
        gradient_checkpointing: bool = False,
        lora: Mapping[str, Any] | None = None,
        seed: int = 0,
        run_config: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"finetune={mode!r} is not one of {', '.join(MODES)}")
        self.parts, self.mode, self.train_text_encoder = parts, mode, bool(train_text_encoder)
        self.unet, self.text_encoder, self.vae = parts.unet, parts.text_encoder, parts.vae
        self.noise_scheduler = parts.noise_scheduler
        self.vae.requires_grad_(False).eval()
        if mode == "lora":
            lora = dict(lora or {})
            add_lora(self.unet, int(lora["rank"]), float(lora["alpha"]), UNET_TARGETS)
            if self.train_text_encoder:
                te = lora["text_encoder"]
                add_lora(self.text_encoder, int(te["rank"]), float(te["alpha"]), TEXT_TARGETS)
        else:
            self.unet.requires_grad_(True)
        if mode == "full" or not self.train_text_encoder:
            self.text_encoder.requires_grad_(self.train_text_encoder)
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.train_text_encoder:
                _checkpoint_activations(self.text_encoder)
        self.optimizer_factory, self.prior_loss_weight = optimizer, float(prior_loss_weight)
        self.seed, self.run_config = int(seed), dict(run_config or {})
        self.strict_loading = False  # checkpoints hold the trained tensors only
        self.train()  # from_pretrained leaves every part in eval mode: the trained ones train

    @property
    def frozen(self) -> list[torch.nn.Module]:
        return [self.vae] if self.train_text_encoder else [self.vae, self.text_encoder]

    def setup(self, stage: str) -> None:
        # Lightning warns of every submodule in eval mode at the start of a fit: the frozen parts', exactly, are meant
        count = sum(1 for part in self.frozen for _ in part.modules())
        warnings.filterwarnings("ignore", rf"Found {count} module\(s\) in eval mode", PossibleUserWarning)

    def train(self, mode: bool = True):
        super().train(mode)
        for part in self.frozen:
            part.eval()
        return self

    def trained(self) -> dict[str, torch.Size]:
        """The trained tensors by name (as in the state dict) and shape."""
        return {name: p.shape for name, p in self.named_parameters() if p.requires_grad}

    # ---- the loss ---------------------------------------------------------------------------------------------
    def compute_loss(self, batch: dict, step: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        step = self.global_step if step is None else step
        indices = [int(i) for i in batch["index"]]
        keys, pixels, ids = list(indices), batch["pixel_values"], batch["input_ids"]
        prior = "class_pixel_values" in batch
        if prior:  # one forward pass over subject and class samples; a class sample's draws have keys of their own
            keys += [-(i + 1) for i in indices]
            pixels = torch.cat([pixels, batch["class_pixel_values"]])
            ids = torch.cat([ids, batch["class_input_ids"]])
        generators = [torch.Generator(device=self.device).manual_seed(sample_seed(self.seed, step, k)) for k in keys]
        with torch.no_grad():
            posterior = self.vae.encode(pixels.to(first_dtype(self.vae))).latent_dist
            latents = (posterior.sample(generator=generators) * self.vae.config.scaling_factor).float()
        noise = randn_tensor(latents.shape, generator=generators, device=latents.device, dtype=latents.dtype)
        t = random_timesteps(self.noise_scheduler.config.num_train_timesteps, len(keys), generators, latents.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            target = noise
        cond = self.text_encoder(ids)[0]
        pred = self.unet(noisy, t, cond).sample.float()
        n = len(indices)
        parts = {"instance": F.mse_loss(pred[:n], target[:n].float())}
        total = parts["instance"]
        if prior:
            parts["prior"] = F.mse_loss(pred[n:], target[n:].float())
            total = total + self.prior_loss_weight * parts["prior"]
        return total, parts

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        total, parts = self.compute_loss(batch)
        if not torch.isfinite(total):
            values = ", ".join(f"{k}={v.item()}" for k, v in parts.items())
            raise NonFiniteLossError(f"non-finite loss at step {self.global_step} ({values}): lower finetune.lr")
        bs = batch["pixel_values"].shape[0]
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=bs)
        for name, value in parts.items():
            self.log(f"train/loss_{name}", value.detach(), batch_size=bs)
        return total

    def configure_optimizers(self):
        return self.optimizer_factory(params=[p for p in self.parameters() if p.requires_grad])

    # ---- checkpoints: the trained tensors ---------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trained = self.trained()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trained}
        checkpoint["finetune"] = {"mode": self.mode, "config": self.run_config}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("state_dict") or {}
        expected = self.trained()
        missing = sorted(set(expected) - set(state))
        wrong = sorted(k for k, shape in expected.items() if k in state and tuple(state[k].shape) != tuple(shape))
        if missing or wrong:
            mode = (checkpoint.get("finetune") or {}).get("mode", "unknown")
            raise CheckpointError(
                f"the checkpoint (finetune={mode}) does not fit this run: {len(missing)} trained tensors missing, "
                f"{len(wrong)} of another shape (e.g. {(missing + wrong)[:3]}); resume with the finetune= options "
                "(LoRA ranks, train_text_encoder) it was trained with"
            )


# ---- the subject before and after ---------------------------------------------------------------------------------
class SubjectImages(pl.Callback):
    """Images of ``prompts`` (prompt ``i`` from a CPU generator seeded ``seed + i``) before training (a run that
    starts at step 0) and after it: ``out_dir/before/<i>.png``, ``out_dir/after/<i>.png``, and a W&B table
    ``validation/table`` (prompt, before, after) when the W&B logger is on."""

    def __init__(self, prompts: Sequence[str], out_dir: str | Path, seed=0, steps=25, guidance=7.5, resolution=None):
        self.prompts, self.out_dir = [str(p) for p in prompts], Path(out_dir)
        self.seed, self.steps, self.guidance, self.resolution = int(seed), int(steps), float(guidance), resolution

    @torch.no_grad()
    def generate(self, module: DreamBoothModule) -> list[Image.Image]:
        pipe = build_pipeline(module.parts, module.unet, safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        was_training = module.training
        module.eval()
        images = []
        for i, prompt in enumerate(self.prompts):
            generator = torch.Generator(device="cpu").manual_seed(self.seed + i)
            with torch.autocast(module.device.type, enabled=module.device.type == "cuda"):
                out = pipe(
                    prompt,
                    num_inference_steps=self.steps,
                    guidance_scale=self.guidance,
                    height=self.resolution,
                    width=self.resolution,
                    generator=generator,
                )
            images.append(out.images[0])
        module.train(was_training)
        return images

    def _write(self, which: str, images: list[Image.Image]) -> None:
        folder = self.out_dir / which
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
            image.save(folder / f"{i}.png")

    def on_train_start(self, trainer, module) -> None:
        if self.prompts and trainer.is_global_zero and trainer.global_step == 0:
            self._write("before", self.generate(module))

    def on_train_end(self, trainer, module) -> None:
        if not (self.prompts and trainer.is_global_zero):
            return
        after = self.generate(module)
        self._write("after", after)
        loggers = [lg for lg in trainer.loggers if hasattr(lg, "log_table")]
        if not loggers:
            return
        import wandb

        rows = []
        for i, (prompt, image) in enumerate(zip(self.prompts, after)):
            before = self.out_dir / "before" / f"{i}.png"
            rows.append([prompt, wandb.Image(str(before)) if before.is_file() else None, wandb.Image(image)])
        try:
            for logger in loggers:
                logger.log_table(key="validation/table", columns=["prompt", "before", "after"], data=rows)
        except OSError as err:  # W&B stages media under $HOME (or WANDB_DATA_DIR): the PNGs are written
            log.warning("the validation images were not logged to W&B (%s); they are in %s", err, self.out_dir)


# ---- the result ---------------------------------------------------------------------------------------------------
class SaveResult(pl.Callback):
    """At the end of a fit that trained a step, rank 0 writes the result with its model card: ``full`` ->
    ``<run>/pipeline`` (a diffusers pipeline folder), ``lora`` -> ``<run>/lora`` (``pytorch_lora_weights.safetensors``);
    and pushes it to the Hub when ``hub.push``. ``card``: what the card says of the run (:func:`model_card`)."""

    def __init__(self, run_dir: str | Path, card: Mapping[str, Any], hub: Mapping[str, Any] | None = None):
        self.run_dir, self.card, self.hub = Path(run_dir), dict(card), dict(hub or {})
        self.exported: dict[str, str] = {}
        self._start_step: int | None = None

    def on_train_start(self, trainer, module) -> None:
        self._start_step = trainer.global_step

    def on_train_end(self, trainer, module: DreamBoothModule) -> None:
        if not trainer.is_global_zero or trainer.global_step == self._start_step:
            return
        card = {**self.card, "global_step": trainer.global_step, "repo_id": self.hub.get("repo_id")}
        if module.mode == "lora":
            folder = self.run_dir / "lora"
            folder.mkdir(parents=True, exist_ok=True)
            save_lora(folder, module.unet, module.text_encoder if module.train_text_encoder else None)
        else:
            folder = export_pipeline(module.parts, module.unet, self.run_dir / "pipeline")
        (folder / "README.md").write_text(model_card(card), encoding="utf-8")
        self.exported[folder.name] = str(folder)
        if self.hub.get("push"):
            self.exported["hub"] = push_to_hub(
                folder,
                self.hub["repo_id"],
                token=self.hub.get("token"),
                private=self.hub.get("private", True),
                commit_message=f"DreamBooth ({card['mode']}) of {card['base']}: {card['instance_prompt']!r}",
            )


def model_card(info: Mapping[str, Any]) -> str:
    """The Hugging Face model card of a fine-tuned student: what it is, how it was trained, how to load it."""
    lora = info["mode"] == "lora"
    base = str(info["base"])
    front: dict[str, Any] = {
        "license": "creativeml-openrail-m",
        "library_name": "diffusers",
        "tags": [*CARD_TAGS, "dreambooth", *(["lora"] if lora else [])],
        "pipeline_tag": "text-to-image",
        "instance_prompt": info["instance_prompt"],
    }
    if not base.startswith(f"{LOCAL}/"):
        front["base_model"] = base
    here = info.get("repo_id") or "path/to/this/folder"
    load_base = base.replace(f"{LOCAL}/", "path/to/")
    what = (
        f"LoRA adapters (rank {info['rank']}, alpha {info['alpha']:g} on the U-Net's attention projections"
        + (
            f"; rank {info['text_encoder_rank']}, alpha {info['text_encoder_alpha']:g} on the text encoder's q/v"
            if info.get("train_text_encoder")
            else ""
        )
        + f") for the student `{base}`, in the diffusers LoRA format"
        if lora
        else f"The student `{base}` with its U-Net{' and text encoder' if info.get('train_text_encoder') else ''} "
        "fine-tuned: a whole diffusers pipeline folder"
    )
    load = (
        [
            f'pipe = StableDiffusionPipeline.from_pretrained("{load_base}", torch_dtype=torch.float16).to("cuda")',
            f'pipe.load_lora_weights("{here}")',
        ]
        if lora
        else [f'pipe = StableDiffusionPipeline.from_pretrained("{here}", torch_dtype=torch.float16).to("cuda")']
    )
    prior = (
        f"{info['num_class_images']} class images of `{info['class_prompt']}` generated by the student itself, "
        f"loss weight {info['prior_loss_weight']:g}"
        if info.get("num_class_images")
        else "none"
    )
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).rstrip(),
        "---",
        "",
        f"# DreamBooth of `{info['identifier']}` on {base}",
        "",
        f"{what}. The subject is named **{info['identifier']}** in the prompt `{info['instance_prompt']}`. "
        f"DreamBooth on a BK-SDM student, as in [BK-SDM]({PAPER}).",
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        "from diffusers import StableDiffusionPipeline",
        "",
        *load,
        f'image = pipe("{info["instance_prompt"]} on the beach", num_inference_steps=25).images[0]',
        'image.save("subject.png")',
        "```",
        "",
        "## Training",
        "",
        f"- Mode: {info['mode']} (`python -m bksdm_lab.finetune finetune={info['mode']}`)",
        f"- Subject images: {info['num_instance_images']}; resolution {info['resolution']} px",
        f"- Prior preservation: {prior}",
        f"- Steps: {info['global_step']:,} optimizer steps of batch {info['batch_size']}; learning rate {info['lr']:g}",
        f"- Seed: {info['seed']}",
        "",
        "## License",
        "",
        f"The weights derive from Stable Diffusion and are released under the CreativeML OpenRAIL-M license: {LICENSE_URL}",
        "",
    ]
    return "\n".join(lines)


def card_info(cfg: Mapping[str, Any], num_instance: int, num_class: int) -> dict[str, Any]:
    """What :func:`model_card` says of a run of config ``cfg`` (the resolved finetune config)."""
    mode = cfg["finetune"]
    info = {
        "mode": mode["name"],
        "base": public_source(cfg["pipeline"]),
        "instance_prompt": cfg["instance"]["prompt"],
        "identifier": cfg["instance"]["identifier"],
        "class_prompt": cfg["prior"]["class_prompt"],
        "num_class_images": num_class,
        "prior_loss_weight": cfg["prior"]["loss_weight"],
        "num_instance_images": num_instance,
        "resolution": cfg["resolution"],
        "batch_size": cfg["batch_size"],
        "lr": cfg["optimizer"]["lr"],
        "seed": cfg["seed"],
        "train_text_encoder": mode.get("train_text_encoder"),
    }
    if mode["name"] == "lora":
        te = mode.get("text_encoder") or {}
        info.update(rank=mode["rank"], alpha=mode["alpha"], text_encoder_rank=te.get("rank"))
        info["text_encoder_alpha"] = te.get("alpha")
    return info
