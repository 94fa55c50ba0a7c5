"""Text-to-image generation from a (student) Stable Diffusion: reproducible, resumable, with the paper's seeding.

The logic behind ``python -m bksdm_lab.generate`` and ``evaluate``; the settings are the ``sampling`` config group
(``conf/sampling/paper.yaml``, also the defaults of :class:`GenerateOptions`). Seeding, outputs: docs/evaluation.md.
"""

from __future__ import annotations

import copy
import csv
import gc
import hashlib
import inspect
import io
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from bksdm_lab.evaluation.app import BOOL, Rule, is_whole, rule_problems, whole
from bksdm_lab.evaluation.paper import PAPER_SAMPLING
from bksdm_lab.models.teachers import TeacherLoadError, teacher_source

# conf/sampling `scheduler` names -> the diffusers class each gives
SCHEDULERS = {
    "pndm": "PNDMScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "lcm": "LCMScheduler",  # a latent consistency student's (experiment=lcm), in 2-8 steps
}
SEED_MODES = ("paper", "per-prompt")
PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE_DIR = "images"
MANIFEST = "generation.json"
AUTO_CPU_BATCH = 8  # batch_size=auto on the CPU (no out-of-memory signal to probe with)
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
OOM_ERRORS = (torch.OutOfMemoryError,)  # torch.cuda.OutOfMemoryError is the same class


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
    """PNDM (the paper's), DPM-Solver++ (multistep, 2nd order), Euler or LCM, from the pipeline's scheduler config (an
    LCM student's export keeps its own LCMScheduler settings)."""
    from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler, LCMScheduler, PNDMScheduler

    config = pipe.scheduler.config
    if name == "pndm":
        if not isinstance(pipe.scheduler, PNDMScheduler):
            pipe.scheduler = PNDMScheduler.from_config(config, skip_prk_steps=True)
    elif name == "dpm++":
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    elif name == "euler":
        pipe.scheduler = EulerDiscreteScheduler.from_config(config)
    elif name == "lcm":
        if not isinstance(pipe.scheduler, LCMScheduler):
            pipe.scheduler = LCMScheduler.from_config(config)
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
    seconds: float  # in pipeline calls (the rate below); warm-up, PNG writing and resume bookkeeping not counted
    settings: dict = field(default_factory=dict)
    wall_seconds: float = 0.0  # the whole loop
    batch_size: int | None = None  # the batch size the run ended with (auto: after any halving)
    batch_size_auto: bool = False
    oom_halvings: int = 0  # times batch_size=auto halved the batch on out-of-memory
    warmup_seconds: float = 0.0  # the probe / compile call before the first batch (not in `seconds`)
    rank: int = 0
    world_size: int = 1

    @property
    def images_per_s(self) -> float | None:
        return self.generated / self.seconds if self.generated and self.seconds > 0 else None


def _save_atomic(image: Image.Image, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.png")
    image.save(tmp)
    os.replace(tmp, path)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
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


def write_grid(out_dir: str | Path, num_prompts: int, grid: int = 16) -> Path | None:
    """``OUT/grid.png`` of the first ``grid`` images on disk (after all processes wrote theirs)."""
    out_dir = Path(out_dir)
    shown = [p for p in (out_dir / IMAGE_DIR / image_name(i) for i in range(min(grid, num_prompts))) if _done(p)]
    if not grid or not shown:
        return None
    make_grid([Image.open(p) for p in shown]).save(out_dir / "grid.png")
    return out_dir / "grid.png"


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 of a module's weights as loaded (names, dtypes, shapes and values in state-dict order), whatever the
    source (a folder, a hub id, a checkpoint) and the memory layout."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().reshape(-1).cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()


def _check_resume(out_dir: Path, settings: dict, prompts: Sequence[str], paths: Sequence[Path]) -> None:
    """Refuse to mix images of other settings or other prompts into one folder."""
    manifest = out_dir / MANIFEST
    if manifest.is_file():
        old = json.loads(manifest.read_text())
        old_settings = old.get("settings", {})
        diff = {k: (old_settings.get(k), v) for k, v in settings.items() if old_settings.get(k) != v}
        if old_settings.get("seed_mode") == "paper" and old_settings.get("batch_size") not in (None, 1):
            # before the per-prompt replay, paper-mode images depended on the batch size; batch 1 is today's
            diff["batch_size"] = (old_settings["batch_size"], "any (paper seeding replayed per prompt)")
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


def first_batch_size(batch_size: int | str, device: torch.device, todo: int, max_batch_size: int) -> int:
    """The batch size to start with: a number as given; ``auto``: ``max_batch_size`` on CUDA (halved on
    out-of-memory), :data:`AUTO_CPU_BATCH` elsewhere; never more than the prompts to do."""
    if batch_size == "auto":
        batch_size = max_batch_size if device.type == "cuda" else AUTO_CPU_BATCH
    return max(1, min(int(batch_size), todo))


def _is_compiled(module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _PaperSequence:
    """The paper's one generator, walked prompt by prompt: ``states(i)`` is ``(state before prompt i, state after)``
    in a batch-1 run, found by replaying the draws of the prompts before (of any process)."""

    def __init__(self, pipe, device: torch.device, seed: int, resolution: int, steps: int):
        self.pipe, self.resolution, self.steps = pipe, resolution, steps
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.position = 0

    def _advance(self) -> None:
        replay_draws(self.pipe, self.generator, 1, self.resolution, self.resolution, self.steps)
        self.position += 1

    def states(self, index: int) -> tuple[torch.Generator, torch.Generator]:
        if index < self.position:
            raise ValueError(f"prompt {index} is behind the sequence (at {self.position})")
        while self.position < index:
            self._advance()
        before = _clone_generator(self.generator)
        self._advance()
        return before, _clone_generator(self.generator)


@dataclass(frozen=True)
class GenerateOptions:
    """The keyword arguments of :func:`generate_images`: the sampling settings (:data:`SAMPLING_KEYS`, the paper's
    values by default), what to write and which share of the prompts.

    ``generator_device``: "device" (the pipeline's; the paper's, on CUDA) or "cpu" (the same noise on any device).
    ``grid``: written only by a single process (with several, call :func:`write_grid` once all are done). ``rank``
    of ``world_size`` processes generates the prompts ``i`` with ``i % world_size == rank``.
    """

    steps: int = PAPER_SAMPLING["steps"]
    guidance: float = PAPER_SAMPLING["guidance"]
    resolution: int | None = PAPER_SAMPLING["resolution"]
    batch_size: int | str = PAPER_SAMPLING["batch_size"]
    max_batch_size: int = PAPER_SAMPLING["max_batch_size"]
    seed: int = PAPER_SAMPLING["seed"]
    seed_mode: str = PAPER_SAMPLING["seed_mode"]
    generator_device: str = PAPER_SAMPLING["generator_device"]
    grid: int = 16
    progress: bool = True
    model: str | None = None
    rank: int = 0
    world_size: int = 1
    write_workers: int = 2

    def __post_init__(self):
        problems = sampling_problems({k: getattr(self, k) for k in SAMPLING_KEYS})
        if problems:
            raise GenerationError("\n".join(problems))
        if not 0 <= self.rank < self.world_size:
            raise GenerationError(f"rank {self.rank} is not in 0..{self.world_size - 1}")


def generate_images(
    pipe,
    prompts: Sequence[str],
    out_dir: str | Path,
    *,
    sink: Callable[[list[int], list], None] | None = None,
    **options,
) -> GenerationResult:
    """Generate ``OUT/images/<i:05d>.png`` for every prompt ``i`` of this process not already on disk; seeding
    and resuming: docs/evaluation.md. ``options``: the fields of :class:`GenerateOptions`.

    ``sink(indices, items)``: called for every prompt of this process, in order within each call: ``items`` are the
    generated PIL images, or the ``Path`` of images found on disk.
    """
    from tqdm.auto import tqdm

    o = GenerateOptions(**options)
    out_dir = Path(out_dir)
    (out_dir / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
    resolution = o.resolution or default_resolution(pipe)
    gen_device = torch.device("cpu") if o.generator_device == "cpu" else torch.device(pipe._execution_device)
    settings = {  # what the images depend on (not the batch size, nor the number of processes)
        "model": o.model,
        "scheduler": type(pipe.scheduler).__name__,
        "steps": o.steps,
        "guidance": o.guidance,
        "resolution": resolution,
        "seed": o.seed,
        "seed_mode": o.seed_mode,
        "dtype": str(_latent_dtype(pipe)).removeprefix("torch."),
        "generator_device": gen_device.type,
        "unet_sha256": weights_sha256(pipe.unet),  # the same path may hold a retrained model
    }
    paths = [out_dir / IMAGE_DIR / image_name(i) for i in range(len(prompts))]
    _check_resume(out_dir, settings, prompts, paths)
    if o.rank == 0:
        _write_manifest(out_dir, settings, prompts)
    batches = _Batches(pipe, prompts, paths, o, resolution, gen_device, sink)
    wall_start = time.perf_counter()
    warmup = batches.warm_up()
    skipped = len(batches.mine) - len(batches.todo)
    bar = tqdm(
        total=len(batches.mine), initial=skipped, unit="img", desc="generate", disable=not o.progress, smoothing=0.1
    )
    generated, seconds = batches.run(bar)
    bar.close()
    if o.grid and o.world_size == 1:
        write_grid(out_dir, len(prompts), o.grid)
    wall = time.perf_counter() - wall_start
    return GenerationResult(
        out_dir, paths, generated, skipped, seconds, settings, wall,
        batch_size=batches.size if batches.todo else None, batch_size_auto=batches.auto,
        oom_halvings=batches.oom_halvings, warmup_seconds=warmup, rank=o.rank, world_size=o.world_size,
    )  # fmt: skip


def _write_manifest(out_dir: Path, settings: dict, prompts: Sequence[str]) -> None:
    """``generation.json`` (the settings) and ``prompts.csv`` (``index,file_name,text``)."""
    _write_atomic(out_dir / MANIFEST, json.dumps({"settings": settings, "num_prompts": len(prompts)}, indent=2) + "\n")
    rows = io.StringIO()
    writer = csv.writer(rows)
    writer.writerow(["index", "file_name", "text"])
    writer.writerows([i, image_name(i), p] for i, p in enumerate(prompts))
    _write_atomic(out_dir / "prompts.csv", rows.getvalue())


class _Batches:
    """The generation loop of :func:`generate_images`: this process's prompts not on disk, in batches (halved on
    out-of-memory with ``batch_size=auto``), each prompt with its own generator; PNGs written by a thread pool while
    the next batch generates; the sink handed every prompt of this process in order."""

    def __init__(self, pipe, prompts, paths, o: GenerateOptions, resolution: int, gen_device: torch.device, sink):
        self.pipe, self.prompts, self.paths, self.o, self.sink = pipe, prompts, paths, o, sink
        self.resolution, self.gen_device = resolution, gen_device
        self.device = torch.device(pipe._execution_device)
        self.mine = list(range(o.rank, len(prompts), o.world_size))
        self.todo = [i for i in self.mine if not _done(paths[i])]
        self.auto = o.batch_size == "auto"
        self.size = first_batch_size(o.batch_size, self.device, len(self.todo), o.max_batch_size)
        self.compiled = _is_compiled(pipe.unet)
        paper = o.seed_mode == "paper"
        self.sequence = _PaperSequence(pipe, gen_device, o.seed, resolution, o.steps) if paper else None
        self.states: dict[int, tuple[torch.Generator, torch.Generator]] = {}
        self.oom_halvings = 0
        self.emitted = 0  # mine[:emitted] were handed to the sink (or are in the batch being handed)

    def call(self, indices: list[int], gens: list[torch.Generator], steps: int | None = None) -> list[Image.Image]:
        texts = [self.prompts[i] for i in indices]
        if self.compiled and len(texts) < self.size:  # pad to the compiled shape (no recompile for the last batch)
            pad = self.size - len(texts)
            texts += [""] * pad
            gens = gens + [torch.Generator(device=self.gen_device).manual_seed(0) for _ in range(pad)]
        with torch.inference_mode():
            out = self.pipe(
                texts,
                num_inference_steps=self.o.steps if steps is None else steps,
                guidance_scale=self.o.guidance,
                height=self.resolution,
                width=self.resolution,
                generator=gens,
                output_type="pil",
            ).images
        return out[: len(indices)]

    def shrink(self, err: BaseException) -> None:
        if not self.auto or self.size == 1:
            what = "at batch size 1" if self.size == 1 else f"at sampling.batch_size={self.size}"
            hint = "" if self.size == 1 else ": use sampling.batch_size=auto or a smaller batch"
            raise GenerationError(f"out of GPU memory {what}{hint} ({str(err).splitlines()[0][:200]})") from err
        self.size, self.oom_halvings = max(1, self.size // 2), self.oom_halvings + 1
        print(f"bksdm_lab.generate: out of GPU memory, batch size halved to {self.size}", flush=True)
        _free_memory()

    def warm_up(self) -> float:
        """A probe at the batch size (auto, on CUDA) and of the compile (a compiled U-Net), with throwaway noise;
        returns its seconds."""
        seconds = 0.0
        if not self.todo or not (self.compiled or (self.auto and self.device.type == "cuda")):
            return seconds
        while True:
            start = time.perf_counter()
            try:
                throwaway = [torch.Generator(device=self.gen_device).manual_seed(0) for _ in range(self.size)]
                self.call(self.todo[:1] * self.size, throwaway, steps=min(self.o.steps, 2))
                return seconds + time.perf_counter() - start
            except OOM_ERRORS as err:
                seconds += time.perf_counter() - start
                self.shrink(err)

    def generators(self, batch: list[int]) -> list[torch.Generator]:
        if self.sequence is None:
            return [torch.Generator(device=self.gen_device).manual_seed(self.o.seed + i) for i in batch]
        for i in batch:
            if i not in self.states:
                self.states[i] = self.sequence.states(i)
        return [_clone_generator(self.states[i][0]) for i in batch]

    def check_replayed(self, batch: list[int], gens: list[torch.Generator]) -> None:
        """Paper seeding: each generator ended where the replay said it would."""
        if self.sequence is None:
            return
        for i, g in zip(batch, gens):
            if not torch.equal(self.states.pop(i)[1].get_state(), g.get_state()):
                raise GenerationError(
                    f"the pipeline ({type(self.pipe).__name__}, {type(self.pipe.scheduler).__name__}) draws random "
                    "numbers that bksdm_lab.evaluation.sampling.replay_draws does not reproduce, so the "
                    "paper seeding cannot be replayed per prompt; use sampling.seed_mode=per-prompt"
                )

    def emit_disk_up_to(self, last: int, batch: Sequence[int] = ()) -> None:
        """Hand the sink the images on disk among ``mine`` up to prompt ``last`` (the batch's are coming)."""
        on_disk = []
        while self.emitted < len(self.mine) and self.mine[self.emitted] <= last:
            if self.mine[self.emitted] not in batch:
                on_disk.append(self.mine[self.emitted])
            self.emitted += 1
        if self.sink is not None and on_disk:
            self.sink(on_disk, [self.paths[i] for i in on_disk])

    def run(self, bar) -> tuple[int, float]:
        """Generate every prompt to do; returns (images generated, seconds in pipeline calls)."""
        generated, seconds, position = 0, 0.0, 0
        with ThreadPoolExecutor(max_workers=max(1, self.o.write_workers), thread_name_prefix="png") as writers:
            pending = []
            while position < len(self.todo):
                batch = self.todo[position : position + self.size]
                gens = self.generators(batch)
                start = time.perf_counter()
                try:
                    images = self.call(batch, gens)
                except OOM_ERRORS as err:
                    self.shrink(err)
                    continue
                seconds += time.perf_counter() - start
                self.check_replayed(batch, gens)
                for future in [f for f in pending if f.done()]:
                    future.result()  # a failed write stops the run
                    pending.remove(future)
                for i, image in zip(batch, images):
                    if not _done(self.paths[i]):
                        pending.append(writers.submit(_save_atomic, image, self.paths[i]))
                self.emit_disk_up_to(batch[-1], batch)
                if self.sink is not None:
                    self.sink(batch, images)
                generated += len(batch)
                position += len(batch)
                bar.update(len(batch))
            for future in pending:
                future.result()
        self.emit_disk_up_to(len(self.prompts))
        return generated, seconds


# ---- from a config (conf/generate.yaml, conf/evaluate.yaml and the `sampling` group) ---------------------
SAMPLING_KEYS = (
    "steps", "guidance", "resolution", "batch_size", "max_batch_size", "seed", "seed_mode", "generator_device"
)  # fmt: skip


def sampling_dict(sampling: Mapping | None) -> dict:
    """A ``sampling`` config (a DictConfig or a dict, possibly partial) as a plain dict over the paper's."""
    if sampling is not None and not isinstance(sampling, dict):
        from omegaconf import OmegaConf

        sampling = OmegaConf.to_container(sampling, resolve=True)
    return {**PAPER_SAMPLING, **(sampling or {})}


def sampling_kwargs(sampling: Mapping | None) -> dict:
    """:func:`generate_images` keyword arguments from a ``sampling`` config (``conf/sampling/*.yaml``)."""
    return {k: sampling[k] for k in SAMPLING_KEYS if sampling is not None and k in sampling}


def _named(choices) -> Callable:
    return lambda value: (value is None or isinstance(value, str)) and value in choices


# conf/sampling key -> (its test, the allowed values): the one place the sampling values are checked
SAMPLING_RULES: dict[str, Rule] = {
    "scheduler": (_named(SCHEDULERS), f"one of {list(SCHEDULERS)}"),
    "steps": whole(1),
    # diffusers guides only above 1 (StableDiffusionPipeline.do_classifier_free_guidance): any value below is 1
    "guidance": (
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 1 <= v < math.inf,
        "a number >= 1 (1: no classifier-free guidance)",
    ),
    "resolution": (
        lambda v: v is None or (is_whole(v, 8) and v % 8 == 0),
        "null (the model's) or a whole number >= 8 divisible by 8",
    ),
    "seed": (lambda v: is_whole(v, 0) and v < 2**63, "a whole number from 0 to 2**63 - 1"),
    "seed_mode": (_named(SEED_MODES), f"one of {list(SEED_MODES)}"),
    "precision": (_named((None, *PRECISIONS)), f"one of {[None, *PRECISIONS]}"),
    "generator_device": (_named(("device", "cpu")), "one of ['device', 'cpu']"),
    "batch_size": (lambda v: v == "auto" or is_whole(v, 1), "one of: auto, a whole number >= 1"),
    "max_batch_size": whole(1),
    "channels_last": BOOL,
    "compile": BOOL,
    "compile_mode": (_named(COMPILE_MODES), f"one of {list(COMPILE_MODES)}"),
}


def sampling_problems(sampling: Mapping | None, prefix: str = "sampling.", names: Mapping | None = None) -> list[str]:
    """One line per bad value of a ``sampling`` config (over the paper's; a DictConfig or a dict) naming the key and
    the allowed values, before anything loads. ``names``: check only these sampling keys, as a callback spells them
    (sampling key -> its key, under ``prefix``), where it gives them."""
    if names is not None:
        return rule_problems(dict(sampling or {}), {names[k]: SAMPLING_RULES[k] for k in names}, prefix)
    s = sampling_dict(sampling)
    problems = rule_problems(s, SAMPLING_RULES, prefix)
    if s["compile"] is True:
        import torch._dynamo  # torch.compile's backends are listed by dynamo only (no public torch API)

        backends = torch._dynamo.list_backends(exclude_tags=())
        if s["compile_backend"] not in backends:
            problems.append(f"{prefix}compile_backend={s['compile_backend']!r} is not one of {backends}")
    return problems


def speed_up(pipe, channels_last: bool = False, compile: bool = False, backend: str = "inductor", mode=None):
    """The U-Net in channels_last memory format and/or compiled in place (``nn.Module.compile``; the pipeline keeps
    its ``UNet2DConditionModel``). Returns the pipeline."""
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    if compile and not _is_compiled(pipe.unet):
        pipe.unet.compile(backend=backend, mode=mode)
    return pipe


def prompt_list(cfg) -> list[str]:
    """``prompt=``: a string or a list, as a list of strings."""
    prompt = cfg.get("prompt")
    return [str(p) for p in ([prompt] if isinstance(prompt, str) else list(prompt or []))]


def prompts_from_config(cfg) -> list[str]:
    """``prompt`` (a string or a list), ``prompts_file`` and ``metadata``, then the first ``num_prompts``."""
    return read_prompts(prompt_list(cfg), cfg.get("prompts_file"), cfg.get("metadata"), cfg.get("num_prompts"))


def config_device(cfg, local_rank: int = 0) -> torch.device:
    """``device=``; null: ``cuda:<LOCAL_RANK>`` if CUDA is available (one GPU per process), else the CPU."""
    if cfg.get("device"):
        return torch.device(cfg.device)
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def pipeline_from_config(cfg, device: torch.device | str | None = None):
    """``(pipeline, model description)`` from ``pipeline=``, ``teacher=`` + ``unet=`` or ``checkpoint=`` (+
    ``teacher=`` to load the run's teacher from elsewhere), in ``sampling.precision`` on ``device`` (default
    :func:`config_device`), with ``sampling.channels_last`` / ``sampling.compile`` applied to the U-Net."""
    teacher_cfg = cfg.get("teacher")
    teacher = str(teacher_cfg.pretrained) if teacher_cfg else None
    if cfg.get("unet") and not teacher:
        raise GenerationError(
            "unet= needs teacher= (the pipeline whose VAE, text encoder and scheduler to use), e.g. teacher=sd14 "
            "or teacher=sd14 teacher.pretrained=/local/folder"
        )
    if teacher and not (cfg.get("unet") or cfg.get("checkpoint")):
        raise GenerationError("teacher= goes with unet= (a student U-Net) or checkpoint=")
    if teacher_cfg:  # a local folder checked (teacher=demo: built first, at its place)
        teacher = teacher_source(teacher_cfg)
    pipe, name = load_pipeline(
        pipeline=cfg.get("pipeline"),
        teacher=teacher,
        unet=cfg.get("unet"),
        checkpoint=cfg.get("checkpoint"),
        weights=cfg.get("weights"),
        device=device if device is not None else config_device(cfg),
        precision=cfg.sampling.get("precision"),
    )
    s = sampling_dict(cfg.sampling)
    speed_up(pipe, s["channels_last"], s["compile"], s["compile_backend"], s["compile_mode"])
    return pipe, name


def generate_from_config(
    cfg, pipe, model: str, prompts: Sequence[str], out_dir, rank: int = 0, world_size: int = 1, sink=None
) -> GenerationResult:
    set_scheduler(pipe, cfg.sampling.scheduler)
    return generate_images(
        pipe,
        prompts,
        out_dir,
        **sampling_kwargs(cfg.sampling),
        grid=cfg.get("grid", 16),
        progress=cfg.get("progress", True),
        model=model,
        rank=rank,
        world_size=world_size,
        sink=sink,
    )


def result_record(result: GenerationResult) -> dict:
    """What ``results.json`` keeps of a generation: its settings and its speed (this process's)."""
    return {
        **result.settings,
        "generated": result.generated,
        "skipped": result.skipped,
        "seconds": result.seconds,
        "wall_seconds": result.wall_seconds,
        "warmup_seconds": result.warmup_seconds,
        "images_per_s": result.images_per_s,
        "batch_size": result.batch_size,
        "batch_size_auto": result.batch_size_auto,
        "oom_halvings": result.oom_halvings,
        "world_size": result.world_size,
    }


def combine_records(records: Sequence[dict]) -> dict:
    """One generation record of several processes' (rank order): counts summed; seconds of the slowest process;
    images/s = all generated / those seconds (the processes run side by side); each process's kept in ``ranks``."""
    if len(records) == 1:
        return dict(records[0])
    out = dict(records[0])
    for key in ("generated", "skipped"):
        out[key] = sum(r[key] for r in records)
    for key in ("seconds", "wall_seconds", "warmup_seconds"):
        out[key] = max(r[key] for r in records)
    out["images_per_s"] = out["generated"] / out["seconds"] if out["generated"] and out["seconds"] > 0 else None
    out["batch_size"] = [r["batch_size"] for r in records]
    out["oom_halvings"] = sum(r["oom_halvings"] for r in records)
    out["ranks"] = [{k: r[k] for k in ("generated", "skipped", "seconds", "images_per_s")} for r in records]
    return out


def summary(record: dict, out_dir: str | Path) -> str:
    """One line of a generation record (:func:`result_record` / :func:`combine_records`): images/s of generation
    (pipeline calls only; then with writing and waiting included)."""
    n, seconds, wall = record["generated"], record["seconds"], record["wall_seconds"]
    rate = f", {record['images_per_s']:.3g} images/s" if record.get("images_per_s") else ""
    if n and wall > seconds:
        rate += f" ({n / wall:.3g} with warm-up and writing)"
    batch = record.get("batch_size")
    how = f"batch size {batch}{' (auto)' if record.get('batch_size_auto') else ''}" if batch else ""
    if record.get("world_size", 1) > 1:
        how += f"{', ' if how else ''}{record['world_size']} processes"
    how = f" [{how}]" if how else ""
    return (
        f"{n} images generated in {seconds:.1f} s{rate}{how}; {record['skipped']} already on disk; "
        f"in {Path(out_dir) / IMAGE_DIR}"
    )
