"""Text-to-image generation from a (student) Stable Diffusion: reproducible, resumable, with the paper's seeding.

The logic behind ``python -m bksdm_lab.generate`` and ``evaluate`` (see :mod:`bksdm_lab.generate`); the
sampling settings come from the ``sampling`` config group (``conf/sampling/paper.yaml`` by default, whose values
are also the defaults of :func:`generate_images`).

Writes ``OUT/images/<prompt index:05d>.png``, ``OUT/grid.png`` (the first ``grid`` images), ``OUT/prompts.csv``
(``index,file_name,text``) and ``OUT/generation.json`` (the settings). No safety checker.

Seeding (``sampling.seed_mode``):

- ``paper`` (default): ONE generator seeded ``sampling.seed`` (1234), consumed in prompt order across batches, as
  the BK-SDM evaluation did (batch 1). Images depend on the batch size.
- ``per-prompt``: prompt ``i`` gets its own generator seeded ``seed + i``: images do not depend on the batch size
  (up to float round-off of batched kernels) nor on which prompts are generated.

Resuming: images already on disk are not generated again. In paper mode the random numbers the skipped prompts
would have drawn are drawn and discarded (the pipeline's own ``prepare_latents``, plus the scheduler's steps
where they take a generator, e.g. Euler), so a resumed run writes the same images as an uninterrupted one; the
first generated batch of every run checks that this replay consumes exactly what the pipeline did.
"""

from __future__ import annotations

import copy
import csv
import inspect
import json
import math
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from bksdm_lab.evaluation.paper import PAPER_SAMPLING
from bksdm_lab.models.teachers import TeacherLoadError

# conf/sampling `scheduler` names -> the diffusers class each gives
SCHEDULERS = {"pndm": "PNDMScheduler", "dpm++": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler"}
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
            raise GenerationError(f"num_prompts must be at least 1, got {num_prompts}")
        out = out[:num_prompts]
    if not out:
        raise GenerationError("no prompts: give prompt=, prompts_file= or metadata=")
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


def _looks_local(source: str) -> bool:
    """A path, not a hub id: it starts with ``.``, ``/`` or ``~``, or has not exactly one ``/`` (hub ids are
    ``owner/name``)."""
    return source.startswith((".", "/", "~")) or "\\" in source or source.count("/") != 1


def check_source(key: str, source: str, pipeline_folder: bool = False) -> None:
    """A one-line GenerationError if ``source`` (the value of ``key=``) is meant as a local folder and is not one
    (or, with ``pipeline_folder``, is a folder without a diffusers ``model_index.json``); hub ids pass."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise GenerationError(f"{key}={source!r} is a file, not a folder ({path.resolve()})")
        if pipeline_folder and not (path / "model_index.json").is_file():
            raise GenerationError(
                f"{key}={source!r} is not a diffusers pipeline folder (no model_index.json in {path.resolve()}); "
                "give an exported pipeline folder (python -m bksdm_lab.export) or a hub id"
            )
    elif _looks_local(source):
        raise GenerationError(
            f"{key}={source!r}: the folder {path.absolute()} does not exist (a local folder, or a hub id "
            "like nota-ai/bk-sdm-tiny)"
        )


def _not_local(sources: dict[str, str | None]) -> str:
    """``key='x' is no local folder (no /abs/x) and`` for the first hub-id-shaped source that is no folder here."""
    for key, source in sources.items():
        if source is not None and not _is_local(source):
            return f"{key}={source!r} is no local folder (no {Path(source).absolute()}) and "
    return ""


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
        raise GenerationError("give one pipeline source: pipeline=, teacher= with unet=, or checkpoint=")
    for key, source in (("pipeline", pipeline), ("unet", unet), ("teacher.pretrained", teacher)):
        if source is not None:  # a missing local folder is named as such, not tried as a hub id
            check_source(key, str(source), pipeline_folder=key == "pipeline")
    if checkpoint is not None and not Path(checkpoint).expanduser().is_file():
        raise GenerationError(f"checkpoint={checkpoint!r}: the file {Path(checkpoint).absolute()} does not exist")
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
        where = _not_local({"pipeline": pipeline, "unet": unet, "teacher.pretrained": teacher})
        what = f"{where}does not load from the hub" if where else "cannot load the pipeline"
        raise GenerationError(f"{what}: {type(err).__name__}: {first}{offline}") from err
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
        raise GenerationError(f"sampling.scheduler={name!r} is not one of {list(SCHEDULERS)}")
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
                f"use another out=, or delete {out_dir / IMAGE_DIR} to start over"
            )
    table = out_dir / "prompts.csv"
    if table.is_file():
        with table.open(newline="", encoding="utf-8") as f:
            old_prompts = {int(row["index"]): row["text"] for row in csv.DictReader(f)}
        for i, prompt in enumerate(prompts):
            if i in old_prompts and old_prompts[i] != prompt and _done(paths[i]):
                raise GenerationError(
                    f"{paths[i]} was generated for prompt {old_prompts[i]!r}, not {prompt!r}; "
                    f"use another out=, or delete {out_dir / IMAGE_DIR} to start over"
                )


def generate_images(
    pipe,
    prompts: Sequence[str],
    out_dir: str | Path,
    *,
    steps: int = PAPER_SAMPLING["steps"],
    guidance: float = PAPER_SAMPLING["guidance"],
    resolution: int | None = PAPER_SAMPLING["resolution"],
    batch_size: int = PAPER_SAMPLING["batch_size"],
    seed: int = PAPER_SAMPLING["seed"],
    seed_mode: str = PAPER_SAMPLING["seed_mode"],
    generator_device: str = PAPER_SAMPLING["generator_device"],
    grid: int = 16,
    progress: bool = True,
    model: str | None = None,
) -> GenerationResult:
    """Generate ``OUT/images/<i:05d>.png`` for every prompt ``i`` not already on disk; see the module doc.

    ``generator_device``: "device" (the pipeline's; the paper's, on CUDA) or "cpu" (the same noise on any device).
    """
    from tqdm.auto import tqdm

    if seed_mode not in SEED_MODES:
        raise GenerationError(f"sampling.seed_mode={seed_mode!r} is not one of {SEED_MODES}")
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
                    "not give the same images; use sampling.seed_mode=per-prompt"
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


# ---- from a config (conf/generate.yaml, conf/evaluate.yaml and the `sampling` group) ---------------------
SAMPLING_KEYS = ("steps", "guidance", "resolution", "batch_size", "seed", "seed_mode", "generator_device")


def sampling_dict(sampling: Mapping | None) -> dict:
    """A ``sampling`` config (a DictConfig or a dict, possibly partial) as a plain dict over the paper's."""
    if sampling is not None and not isinstance(sampling, dict):
        from omegaconf import OmegaConf

        sampling = OmegaConf.to_container(sampling, resolve=True)
    return {**PAPER_SAMPLING, **(sampling or {})}


def sampling_kwargs(sampling: Mapping | None) -> dict:
    """:func:`generate_images` keyword arguments from a ``sampling`` config (``conf/sampling/*.yaml``)."""
    return {k: sampling[k] for k in SAMPLING_KEYS if sampling is not None and k in sampling}


def prompt_list(cfg) -> list[str]:
    """``prompt=``: a string or a list, as a list of strings."""
    prompt = cfg.get("prompt")
    return [str(p) for p in ([prompt] if isinstance(prompt, str) else list(prompt or []))]


def prompts_from_config(cfg) -> list[str]:
    """``prompt`` (a string or a list), ``prompts_file`` and ``metadata``, then the first ``num_prompts``."""
    return read_prompts(prompt_list(cfg), cfg.get("prompts_file"), cfg.get("metadata"), cfg.get("num_prompts"))


def pipeline_from_config(cfg):
    """``(pipeline, model description)`` from ``pipeline=``, ``teacher=`` + ``unet=`` or ``checkpoint=`` (+
    ``teacher=`` to load the run's teacher from elsewhere), in ``sampling.precision`` on ``device``."""
    teacher_cfg = cfg.get("teacher")
    teacher = str(teacher_cfg.pretrained) if teacher_cfg else None
    if cfg.get("unet") and not teacher:
        raise GenerationError(
            "unet= needs teacher= (the pipeline whose VAE, text encoder and scheduler to use), e.g. teacher=sd14 "
            "or teacher=sd14 teacher.pretrained=/local/folder"
        )
    if teacher and not (cfg.get("unet") or cfg.get("checkpoint")):
        raise GenerationError("teacher= goes with unet= (a student U-Net) or checkpoint=")
    if teacher_cfg and teacher_cfg.get("build_if_missing"):  # teacher=demo: the tiny offline teacher
        from bksdm_lab.tools.demo import build_demo_teacher

        build_demo_teacher(teacher, configs=teacher_cfg.configs)
    return load_pipeline(
        pipeline=cfg.get("pipeline"),
        teacher=teacher,
        unet=cfg.get("unet"),
        checkpoint=cfg.get("checkpoint"),
        weights=cfg.get("weights"),
        device=cfg.get("device"),
        precision=cfg.sampling.get("precision"),
    )


def generate_from_config(cfg, pipe, model: str, prompts: Sequence[str], out_dir) -> GenerationResult:
    set_scheduler(pipe, cfg.sampling.scheduler)
    return generate_images(
        pipe,
        prompts,
        out_dir,
        **sampling_kwargs(cfg.sampling),
        grid=cfg.get("grid", 16),
        progress=cfg.get("progress", True),
        model=model,
    )


def result_record(result: GenerationResult) -> dict:
    """What ``results.json`` keeps of a generation: its settings and its speed."""
    return {
        **result.settings,
        "generated": result.generated,
        "skipped": result.skipped,
        "seconds": result.seconds,
        "wall_seconds": result.wall_seconds,
        "images_per_s": result.images_per_s,
    }


def summary(result: GenerationResult) -> str:
    rate = f", {result.images_per_s:.3g} images/s" if result.images_per_s else ""
    if result.generated and result.wall_seconds > result.seconds:
        rate += f" ({result.generated / result.wall_seconds:.3g} with writing)"
    return (
        f"{result.generated} images generated in {result.seconds:.1f} s{rate}; {result.skipped} already on disk; "
        f"in {result.out_dir / IMAGE_DIR}"
    )
