"""Text-to-image generation from a (student) Stable Diffusion: reproducible, resumable, with the paper's seeding.

    python -m bksdm_lab.generate --pipeline nota-ai/bk-sdm-tiny --prompt "a golden retriever" --out samples
    python -m bksdm_lab.generate --pipeline EXPORT_DIR --metadata coco/metadata.csv --num-prompts 1000 --out gen
    python -m bksdm_lab.generate --teacher CompVis/stable-diffusion-v1-4 --unet EXPORT_DIR --prompts-file p.txt --out g
    python -m bksdm_lab.generate --checkpoint outputs/<run>/checkpoints/last.ckpt --prompt "a red circle" --out gen

Writes ``OUT/images/<prompt index:05d>.png``, ``OUT/grid.png`` (the first ``--grid`` images), ``OUT/prompts.csv``
(``index,file_name,text``) and ``OUT/generation.json`` (the settings). No safety checker.

Seeding (``--seed-mode``):

- ``paper`` (default): ONE generator seeded ``--seed`` (1234), consumed in prompt order across batches, as the
  BK-SDM evaluation did (batch 1). Images depend on the batch size.
- ``per-prompt``: prompt ``i`` gets its own generator seeded ``seed + i``: images do not depend on the batch size
  (up to float round-off of batched kernels) nor on which prompts are generated.

Resuming: images already on disk are not generated again. In paper mode the random numbers the skipped prompts
would have drawn are drawn and discarded (the pipeline's own ``prepare_latents``, plus the scheduler's steps
where they take a generator, e.g. Euler), so a resumed run writes the same images as an uninterrupted one; the
first generated batch of every run checks that this replay consumes exactly what the pipeline did.
"""

from __future__ import annotations

import argparse
import copy
import csv
import inspect
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from bksdm_lab.models.teachers import TeacherLoadError

SCHEDULERS = ("pndm", "dpm++", "euler")
SEED_MODES = ("paper", "per-prompt")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE_DIR = "images"
MANIFEST = "generation.json"


class GenerationError(RuntimeError):
    """Generation cannot go on as asked; the message says why and what to do."""


def image_name(index: int) -> str:
    return f"{index:05d}.png"


# ---- prompts -----------------------------------------------------------------------------------------
def read_prompts(
    prompts: Sequence[str] | None = None,
    prompts_file: str | Path | None = None,
    metadata: str | Path | None = None,
    num_prompts: int | None = None,
    column: str = "text",
) -> list[str]:
    """Prompts from strings, a text file (one per line, blank lines skipped) and/or a ``metadata.csv``
    (the ``text`` column, e.g. MS-COCO val2014 captions), in that order; the first ``num_prompts`` of them."""
    out = list(prompts or [])
    if prompts_file:
        path = Path(prompts_file)
        if not path.is_file():
            raise GenerationError(f"prompts file {str(path)!r} does not exist")
        out += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if metadata:
        path = Path(metadata)
        if not path.is_file():
            raise GenerationError(
                f"metadata {str(path)!r} does not exist (a csv with a {column!r} column, e.g. the MS-COCO val2014 "
                "captions as file_name,text)"
            )
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if column not in (reader.fieldnames or []):
                raise GenerationError(f"{path} has no {column!r} column (columns: {reader.fieldnames})")
            out += [row[column] for row in reader]
    if num_prompts is not None:
        if num_prompts < 1:
            raise GenerationError(f"--num-prompts must be at least 1, got {num_prompts}")
        out = out[:num_prompts]
    if not out:
        raise GenerationError("no prompts: give --prompt, --prompts-file or --metadata")
    return out


# ---- pipelines ---------------------------------------------------------------------------------------
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_precision(device: torch.device | str) -> str:
    return "fp16" if torch.device(device).type == "cuda" else "fp32"


def hf_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists()


def _source_name(source: str) -> str:
    return str(Path(source).expanduser().resolve()) if _is_local(source) else source


def _load_unet(source: str, dtype: torch.dtype):
    from diffusers import UNet2DConditionModel

    path = Path(source).expanduser()
    if path.is_dir():
        sub = "unet" if (path / "unet" / "config.json").is_file() else None
        return UNet2DConditionModel.from_pretrained(path, subfolder=sub, torch_dtype=dtype)
    try:  # a hub pipeline repo (unet/ subfolder) or a bare U-Net repo
        return UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype)
    except (OSError, ValueError):
        return UNet2DConditionModel.from_pretrained(source, torch_dtype=dtype)


def load_pipeline(
    pipeline: str | None = None,
    teacher: str | None = None,
    unet: str | None = None,
    checkpoint: str | None = None,
    weights: str | None = None,
    device: torch.device | str | None = None,
    precision: str | None = None,
):
    """``(StableDiffusionPipeline, model description)`` from exactly one source, on ``device`` in ``precision``.

    - ``pipeline``: an exported folder or a hub id;
    - ``teacher`` + ``unet``: the teacher's VAE, text encoder, tokenizer and scheduler around a student U-Net
      (a U-Net folder, or a pipeline folder / hub repo with ``unet/``);
    - ``checkpoint`` (+ ``weights``, + ``teacher`` to load the teacher from elsewhere): a training checkpoint,
      through :func:`bksdm_lab.models.export.load_checkpoint_student`.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    device = torch.device(device) if device is not None else default_device()
    precision = precision or default_precision(device)
    if precision not in PRECISIONS:
        raise GenerationError(f"precision {precision!r} is not one of {sorted(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if sum(x is not None for x in (pipeline, checkpoint, unet)) != 1 or (unet is not None and teacher is None):
        raise GenerationError("give one pipeline source: --pipeline, --teacher with --unet, or --checkpoint")
    passthrough: tuple[type[Exception], ...] = (GenerationError, TeacherLoadError, FileNotFoundError)
    if checkpoint is not None:  # training-side imports (omegaconf, yaml) only for checkpoints
        from bksdm_lab.models.export import ExportError, build_pipeline, load_checkpoint_student

        passthrough += (ExportError,)
    none = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "you have disabled the safety checker" is the point here
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)  # `dtype` in 0.36+
            if pipeline is not None:
                pipe = StableDiffusionPipeline.from_pretrained(pipeline, torch_dtype=dtype, **none)
                name = _source_name(pipeline)
            elif unet is not None:
                student = _load_unet(unet, dtype)
                pipe = StableDiffusionPipeline.from_pretrained(teacher, unet=student, torch_dtype=dtype, **none)
                name = f"{_source_name(teacher)} + unet {_source_name(unet)}"
            else:
                teach, student, info = load_checkpoint_student(checkpoint, weights=weights, teacher_pretrained=teacher)
                teach.unet = None  # the teacher's U-Net is not part of the student's pipeline
                pipe = build_pipeline(teach, student).to(dtype=dtype)
                name = f"{_source_name(checkpoint)} ({info['weights']} weights, {info['arch_title']})"
    except passthrough:
        raise
    except Exception as err:  # hub, file-system and format errors, with the cause named
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        offline = " (HF_HUB_OFFLINE=1: only models already in the local cache load)" if hf_offline() else ""
        raise GenerationError(f"cannot load the pipeline: {type(err).__name__}: {first}{offline}") from err
    finally:
        diffusers_logging.set_verbosity(verbosity)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe, name


def set_scheduler(pipe, name: str = "pndm"):
    """PNDM (the paper's), DPM-Solver++ (multistep, 2nd order) or Euler, from the pipeline's scheduler config."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, PNDMScheduler

    config = pipe.scheduler.config
    if name == "pndm":
        if not isinstance(pipe.scheduler, PNDMScheduler):
            pipe.scheduler = PNDMScheduler.from_config(config, skip_prk_steps=True)
    elif name == "dpm++":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    elif name == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(config)
    else:
        raise GenerationError(f"scheduler {name!r} is not one of {SCHEDULERS}")
    return pipe


def default_resolution(pipe) -> int:
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


# ---- the random numbers a pipeline call draws --------------------------------------------------------
def _latent_dtype(pipe) -> torch.dtype:
    return pipe.text_encoder.dtype if pipe.text_encoder is not None else pipe.unet.dtype


def replay_draws(pipe, generator: torch.Generator, batch: int, height: int, width: int, steps: int) -> None:
    """Draw (and discard) what ``pipe(<batch> prompts, generator=generator)`` draws: the initial latents, and the
    scheduler's noise where its ``step`` takes a generator (run on zero model outputs: no U-Net, no VAE)."""
    device = pipe._execution_device
    latents = pipe.prepare_latents(
        batch, pipe.unet.config.in_channels, height, width, _latent_dtype(pipe), device, generator
    )
    if "generator" not in inspect.signature(pipe.scheduler.step).parameters:
        return  # PNDM, DDIM with eta=0 (no generator passed), DPM-Solver++: nothing drawn after the latents
    scheduler = copy.deepcopy(pipe.scheduler)
    scheduler.set_timesteps(steps, device=device)
    kwargs = {"generator": generator}
    if "eta" in inspect.signature(scheduler.step).parameters:
        kwargs["eta"] = 0.0
    for t in scheduler.timesteps:
        sample = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(torch.zeros_like(sample), t, latents, return_dict=False, **kwargs)[0]


def _clone_generator(generator: torch.Generator) -> torch.Generator:
    clone = torch.Generator(device=generator.device)
    clone.set_state(generator.get_state())
    return clone


# ---- generation --------------------------------------------------------------------------------------
@dataclass
class GenerationResult:
    out_dir: Path
    paths: list[Path]
    generated: int
    skipped: int
    seconds: float  # in pipeline calls (the rate below); PNG writing and resume bookkeeping not counted
    settings: dict = field(default_factory=dict)
    wall_seconds: float = 0.0  # the whole loop

    @property
    def images_per_s(self) -> float | None:
        return self.generated / self.seconds if self.generated and self.seconds > 0 else None


def _save_atomic(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    image.save(tmp)
    os.replace(tmp, path)


def _done(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def make_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB").resize((w, h)), ((i % cols) * w, (i // cols) * h))
    return grid


def _check_resume(out_dir: Path, settings: dict, prompts: Sequence[str], paths: Sequence[Path]) -> None:
    """Refuse to mix images of other settings or other prompts into one folder."""
    manifest = out_dir / MANIFEST
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        old_settings = old.get("settings", {})
        diff = {k: (old_settings.get(k), v) for k, v in settings.items() if old_settings.get(k) != v}
        if diff and any(_done(p) for p in paths):
            what = ", ".join(f"{k}: {a!r} on disk vs {b!r} now" for k, (a, b) in diff.items())
            raise GenerationError(
                f"{out_dir} holds images generated with other settings ({what}); "
                f"use another --out, or delete {out_dir / IMAGE_DIR} to start over"
            )
    table = out_dir / "prompts.csv"
    if table.is_file():
        with table.open(newline="", encoding="utf-8") as f:
            old_prompts = {int(row["index"]): row["text"] for row in csv.DictReader(f)}
        for i, prompt in enumerate(prompts):
            if i in old_prompts and old_prompts[i] != prompt and _done(paths[i]):
                raise GenerationError(
                    f"{paths[i]} was generated for prompt {old_prompts[i]!r}, not {prompt!r}; "
                    f"use another --out, or delete {out_dir / IMAGE_DIR} to start over"
                )


def generate_images(
    pipe,
    prompts: Sequence[str],
    out_dir: str | Path,
    *,
    steps: int = 25,
    guidance: float = 7.5,
    resolution: int | None = None,
    batch_size: int = 1,
    seed: int = 1234,
    seed_mode: str = "paper",
    generator_device: str = "device",
    grid: int = 16,
    progress: bool = True,
    model: str | None = None,
) -> GenerationResult:
    """Generate ``OUT/images/<i:05d>.png`` for every prompt ``i`` not already on disk; see the module doc.

    ``generator_device``: "device" (the pipeline's; the paper's, on CUDA) or "cpu" (the same noise on any device).
    """
    from tqdm.auto import tqdm

    if seed_mode not in SEED_MODES:
        raise GenerationError(f"seed mode {seed_mode!r} is not one of {SEED_MODES}")
    if batch_size < 1:
        raise GenerationError(f"batch size must be at least 1, got {batch_size}")
    out_dir = Path(out_dir)
    image_dir = out_dir / IMAGE_DIR
    image_dir.mkdir(parents=True, exist_ok=True)
    resolution = resolution or default_resolution(pipe)
    device = pipe._execution_device
    gen_device = torch.device("cpu") if generator_device == "cpu" else torch.device(device)
    settings = {
        "model": model,
        "scheduler": type(pipe.scheduler).__name__,
        "steps": steps,
        "guidance": guidance,
        "resolution": resolution,
        "seed": seed,
        "seed_mode": seed_mode,
        "batch_size": batch_size if seed_mode == "paper" else None,  # per-prompt images do not depend on it
        "dtype": str(_latent_dtype(pipe)).removeprefix("torch."),
        "generator_device": gen_device.type,
    }
    paths = [image_dir / image_name(i) for i in range(len(prompts))]
    _check_resume(out_dir, settings, prompts, paths)
    (out_dir / MANIFEST).write_text(json.dumps({"settings": settings, "num_prompts": len(prompts)}, indent=2) + "\n")
    with (out_dir / "prompts.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "file_name", "text"])
        writer.writerows([i, image_name(i), p] for i, p in enumerate(prompts))

    batches = [list(range(lo, min(lo + batch_size, len(prompts)))) for lo in range(0, len(prompts), batch_size)]
    todo = [b for b in batches if not all(_done(paths[i]) for i in b)]
    last_todo = todo[-1][0] if todo else -1
    skipped = len(prompts) - sum(len(b) for b in todo)
    generator = torch.Generator(device=gen_device).manual_seed(seed) if seed_mode == "paper" else None
    checked = False
    generated, seconds, wall_start = 0, 0.0, time.perf_counter()
    bar = tqdm(total=len(prompts), initial=skipped, unit="img", desc="generate", disable=not progress, smoothing=0.1)
    for batch in batches:
        if batch[0] > last_todo:
            break  # nothing left to generate
        if all(_done(paths[i]) for i in batch):
            if generator is not None:
                replay_draws(pipe, generator, len(batch), resolution, resolution, steps)
            continue
        if generator is not None:
            gens, before = generator, (None if checked else _clone_generator(generator))
        else:
            gens, before = [torch.Generator(device=gen_device).manual_seed(seed + i) for i in batch], None
        start = time.perf_counter()
        with torch.inference_mode():
            images = pipe(
                [prompts[i] for i in batch],
                num_inference_steps=steps,
                guidance_scale=guidance,
                height=resolution,
                width=resolution,
                generator=gens,
                output_type="pil",
            ).images
        seconds += time.perf_counter() - start
        if before is not None:
            replay_draws(pipe, before, len(batch), resolution, resolution, steps)
            if not torch.equal(before.get_state(), generator.get_state()):
                raise GenerationError(
                    f"the pipeline ({type(pipe).__name__}, {type(pipe.scheduler).__name__}) draws random numbers "
                    "that bksdm_lab.evaluation.sampling.replay_draws does not reproduce, so a resumed paper-mode run would "
                    "not give the same images; use --seed-mode per-prompt"
                )
            checked = True
        for i, image in zip(batch, images):
            if not _done(paths[i]):
                _save_atomic(image, paths[i])
        generated += len(batch)
        bar.update(len(batch))
    bar.close()
    if grid:
        shown = [p for p in paths[:grid] if _done(p)]
        if shown:
            make_grid([Image.open(p) for p in shown]).save(out_dir / "grid.png")
    wall = time.perf_counter() - wall_start
    return GenerationResult(out_dir, paths, generated, skipped, seconds, settings, wall)


# ---- CLI ---------------------------------------------------------------------------------------------
def add_pipeline_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    group = parser.add_argument_group("pipeline (one of)")
    group.add_argument("--pipeline", metavar="DIR_OR_ID", help="an exported pipeline folder or a hub id")
    group.add_argument(
        "--teacher",
        metavar="DIR_OR_ID",
        help="the teacher pipeline whose VAE/text encoder/scheduler surround --unet (with --checkpoint: load the "
        "run's teacher from here)",
    )
    group.add_argument("--unet", metavar="DIR_OR_ID", help="a student U-Net folder, or a pipeline with unet/")
    group.add_argument("--checkpoint", metavar="CKPT", help="a `python -m bksdm_lab.train` checkpoint")
    group.add_argument("--weights", choices=("ema", "student"), help="with --checkpoint (default: ema if kept)")


def add_prompt_args(parser: argparse.ArgumentParser, metadata_default: str | None = None) -> None:
    group = parser.add_argument_group("prompts")
    group.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for more)")
    group.add_argument("--prompts-file", metavar="TXT", help="one prompt per line")
    group.add_argument(
        "--metadata",
        metavar="CSV",
        default=metadata_default,
        help="a metadata.csv with a `text` column, e.g. MS-COCO val2014 captions"
        + (f" (default: {metadata_default})" if metadata_default else ""),
    )
    group.add_argument("--num-prompts", type=int, metavar="N", help="only the first N prompts")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling (defaults: the paper's)")
    group.add_argument("--scheduler", choices=SCHEDULERS, default="pndm", help="default: pndm")
    group.add_argument("--steps", type=int, default=25, help="denoising steps (default: 25)")
    group.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default: 7.5)")
    group.add_argument("--resolution", type=int, help="image side in px (default: U-Net sample_size x 8, e.g. 512)")
    group.add_argument("--batch-size", type=int, default=1, help="prompts per pipeline call (default: 1)")
    group.add_argument("--seed", type=int, default=1234, help="default: 1234")
    group.add_argument("--seed-mode", choices=SEED_MODES, default="paper", help="see the module doc (default: paper)")
    group.add_argument(
        "--generator-device",
        choices=("device", "cpu"),
        default="device",
        help="where the noise is drawn: the pipeline's device (the paper's) or the CPU (default: device)",
    )
    group.add_argument("--precision", choices=sorted(PRECISIONS), help="default: fp16 on CUDA, fp32 on CPU")
    group.add_argument("--device", help="default: cuda if available, else cpu")
    group.add_argument("--grid", type=int, default=16, metavar="N", help="images in grid.png (0: none; default 16)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def pipeline_from_args(args: argparse.Namespace):
    if args.unet and not args.teacher:
        raise GenerationError("--unet needs --teacher (the pipeline whose VAE, text encoder and scheduler to use)")
    if args.teacher and not (args.unet or args.checkpoint):
        raise GenerationError("--teacher needs --unet (a student U-Net) or --checkpoint")
    return load_pipeline(
        pipeline=args.pipeline,
        teacher=args.teacher,
        unet=args.unet,
        checkpoint=args.checkpoint,
        weights=args.weights,
        device=args.device,
        precision=args.precision,
    )


def generate_from_args(args: argparse.Namespace, pipe, model: str, prompts: Sequence[str], out_dir) -> GenerationResult:
    set_scheduler(pipe, args.scheduler)
    return generate_images(
        pipe,
        prompts,
        out_dir,
        steps=args.steps,
        guidance=args.guidance,
        resolution=args.resolution,
        batch_size=args.batch_size,
        seed=args.seed,
        seed_mode=args.seed_mode,
        generator_device=args.generator_device,
        grid=args.grid,
        progress=not args.no_progress,
        model=model,
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bksdm_lab.generate",
        description="Generate images from a Stable Diffusion pipeline (exported student, hub model, teacher + "
        "student U-Net, or training checkpoint); resumable; the paper's sampling settings by default.",
    )
    add_pipeline_args(parser)
    add_prompt_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--out", required=True, help="output folder (images/, grid.png, prompts.csv)")
    return parser.parse_args(argv)


def summary(result: GenerationResult) -> str:
    rate = f", {result.images_per_s:.3g} images/s" if result.images_per_s else ""
    if result.generated and result.wall_seconds > result.seconds:
        rate += f" ({result.generated / result.wall_seconds:.3g} with writing)"
    return (
        f"{result.generated} images generated in {result.seconds:.1f} s{rate}; {result.skipped} already on disk; "
        f"in {result.out_dir / IMAGE_DIR}"
    )


def main(argv: Sequence[str] | None = None) -> GenerationResult:
    args = parse_args(argv)
    from bksdm_lab.models.export import ExportError

    try:
        prompts = read_prompts(args.prompt, args.prompts_file, args.metadata, args.num_prompts)
        pipe, model = pipeline_from_args(args)
        result = generate_from_args(args, pipe, model, prompts, args.out)
    except (GenerationError, TeacherLoadError, ExportError, FileNotFoundError) as err:
        print(f"bksdm_lab.generate: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"bksdm_lab.generate: {summary(result)}")
    return result
