"""Benchmark the real training path, a plain PyTorch loop doing the same work, the frozen parts and generation.

    python -m bksdm_lab.bench train=[experiment=demo] threads=1 gen_batch=[]     # the demo's work on CPU
    python -m bksdm_lab.bench train=[arch=base]                                   # SD-v1.4 -> Base, random weights

For each sweep point (``variants`` x ``batch`` x ``resolution``) :func:`run`

1. composes ``conf/train.yaml`` with the bench's ``train`` overrides (plus the point's arch, micro-batch and
   resolution, ``trainer.max_steps`` = warm-up + timed steps), builds it with :func:`bksdm_lab.train.build` (the same
   Trainer, module, data module, loggers and callbacks as ``python -m bksdm_lab.train``; ``weights=random`` builds
   the teacher from the shipped configs with random weights of the real shapes instead of loading it), and times
   ``trainer.fit`` over ``steps`` optimizer steps after ``warmup`` (the *throughput* run: no hooks; on CUDA it
   synchronises only at the two ends of the timed window);
2. fits it again with timing hooks (:class:`PartTimer`) for the step-time breakdown: data wait, batch to device,
   VAE encode, text encode, teacher forward, student forward, backward, the rest of ``training_step`` (noise, loss),
   ``self.log``, the optimizer (clipping, the module's hook, the step), each callback, the loggers, and what is
   left (Lightning's loop). On CUDA every mark synchronises (that run's step time is longer: it is for the split);
3. times :func:`plain_loop`, a minimal PyTorch loop doing the same work on the same models and data (the same data
   module's batches, per-sample draws, feature taps, loss, accumulation, clipping and optimizer; no EMA, no logging),
   in the same process, and checks its first loss against the framework's;
4. counts the FLOPs of one micro-step of that work (``torch.utils.flop_counter``, attention included) and, on a GPU
   in :data:`PEAK_TFLOPS` (or ``peak_tflops=``), reports the achieved TFLOP/s and MFU.

It prints a table and returns the numbers (``results.json`` in the run folder, ``json=`` for another copy).
"""

from __future__ import annotations

import cProfile
import gc
import io
import json
import pstats
import resource
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytorch_lightning as pl
import torch
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from diffusers.utils.torch_utils import randn_tensor
from omegaconf import DictConfig, OmegaConf, open_dict
from transformers import CLIPTextConfig, CLIPTextModel

from bksdm_lab import CONF_DIR
from bksdm_lab.distill.checks import uses_cached_latents
from bksdm_lab.distill.losses import KDInputs
from bksdm_lab.distill.module import random_timesteps, sample_seed
from bksdm_lab.evaluation.sampling import sampling_dict, set_scheduler
from bksdm_lab.models.students import count_params, init_student_from_teacher
from bksdm_lab.models.taps import FeatureTaps
from bksdm_lab.models.teachers import Teacher, load_teacher, shipped_configs
from bksdm_lab.tools.demo import byte_level_tokenizer

# Dense 16-bit (bf16/fp16) tensor-core peak of known GPUs, TFLOP/s, matched by name; `peak_tflops=` overrides.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}
WEIGHTS = ("auto", "random", "pretrained")
SOURCES = ("auto", "config", "latents", "images")
HALF = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
FULL = ("32-true", "32")


# ---- models and data ------------------------------------------------------------------------------------------
def random_teacher(configs: str, device: torch.device, load_vae: bool = True, seed: int | None = None) -> Teacher:
    """A teacher of the real shapes with random weights, built from the shipped configs directly on ``device``."""
    cfg = shipped_configs(configs)
    if seed is not None:
        torch.manual_seed(seed)
    with device:
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"]) if load_vae else None
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    teacher = Teacher(
        name=configs,
        source="random",
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=byte_level_tokenizer(),
        scheduler=PNDMScheduler.from_config(cfg["scheduler"]),
        noise_scheduler=DDPMScheduler.from_config(cfg["scheduler"]),
    )

    def ensure_vae(device=None, dtype=None):  # cached latents: a random VAE when one is needed (the export)
        if teacher.vae is None:
            teacher.vae = AutoencoderKL.from_config(cfg["vae"]).requires_grad_(False).eval()
        if device is not None or dtype is not None:
            teacher.vae.to(device=device, dtype=dtype)
        return teacher.vae

    teacher.ensure_vae = ensure_vae
    return teacher


def synthetic_latents(out: Path, teacher: str, resolution: int, num: int, seed: int = 0) -> Path:
    """A complete latent cache (the layout ``python -m bksdm_lab.prepare`` writes) of ``num`` random posteriors and
    token ids, so ``data=latents`` trains on it without images or a VAE. Written once per folder."""
    if (out / "meta.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    side = resolution // 8
    shard = {
        "index": torch.arange(num),
        "input_ids": torch.randint(0, 514, (num, 77), generator=g, dtype=torch.int32),
        **{k: torch.randn(num, 4, side, side, generator=g).half() for k in ("mean", "mean_flip")},
        **{k: (torch.rand(num, 4, side, side, generator=g) * 0.1).half() for k in ("std", "std_flip")},
    }
    torch.save(shard, out / "shard-00000.pt")
    meta = {
        "teacher": teacher,
        "teacher_source": None,
        "data_root": "synthetic (bksdm_lab.bench)",
        "resolution": resolution,
        "shard_size": num,
        "num_rows": num,
        "scaling_factor": 0.18215,
        "dtype": "float16",
        "shards": [{"file": "shard-00000.pt", "rows": [0, num], "count": num, "batches": 1}],
        "skipped": {},
        "done": num,
        "complete": True,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2))
    return out


# ---- composing conf/train.yaml ----------------------------------------------------------------------------------
def compose_train(overrides: list[str], run_dir: Path) -> DictConfig:
    """conf/train.yaml as ``python -m bksdm_lab.train hydra.run.dir=<run_dir> <overrides>`` composes it (with its
    ``hydra`` node, for :func:`hydra_config`)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    args = [f"hydra.run.dir={run_dir}", *overrides]
    if GlobalHydra.instance().is_initialized():  # inside the bench's own hydra.main: the same conf/ folder
        cfg = compose(config_name="train", overrides=args, return_hydra_config=True)
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=args, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
    return cfg


@contextmanager
def hydra_config(cfg: DictConfig):
    """Make ``cfg``'s hydra node the current Hydra config (``${hydra:...}`` resolves to the training run's folder) and
    hand over ``cfg`` without it, as ``hydra.main`` hands it to ``train``; the caller's Hydra config is put back."""
    from hydra.core.hydra_config import HydraConfig

    instance = HydraConfig.instance()
    saved = instance.cfg
    instance.set_config(cfg)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    try:
        yield job
    finally:
        instance.cfg = saved


# ---- timing -----------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(pl.Callback):
    """The throughput run's clock: the window runs from the end of optimizer step ``warmup`` to the end of step
    ``warmup + steps`` (both marks at the first ``on_train_batch_end`` that sees the new step, this callback placed
    first, so the window holds exactly ``steps`` steps of everything). Also records the end of the first optimizer
    step (start-up) and the first micro-batch's loss. On CUDA it synchronises at the two marks only."""

    def __init__(self, warmup: int, steps: int, partner=None):
        self.warmup, self.steps = warmup, steps
        self.partner = partner  # called at the end of every optimizer step; its time is taken out of the window
        self.excluded = self.excluded_cpu = 0.0
        self._seen = 0
        self.first_step_end: float | None = None
        self.marks: dict[str, float] = {}  # start-up: wall time of the first of each hook
        self.start: float | None = None
        self.end: float | None = None
        self.first_loss: float | None = None
        self.peak_mem_gb: float | None = None
        self.on_window_start = self.on_window_end = None  # hooks for the breakdown run

    def mark(self, name: str) -> None:
        self.marks.setdefault(name, time.perf_counter())

    def on_fit_start(self, trainer, module) -> None:
        self.mark("fit_start")

    def on_train_start(self, trainer, module) -> None:
        self.mark("train_start")

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.mark("first_batch")

    def wrap_training_step(self, module) -> None:
        step = module.training_step

        def training_step(*args, **kwargs):
            out = step(*args, **kwargs)
            if self.first_loss is None and out is not None:
                loss = out["loss"] if isinstance(out, dict) else out
                self.first_loss = float(loss.detach().float())
            return out

        module.training_step = training_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        new, self._seen = step != self._seen, step
        if self.first_step_end is None and step >= 1:
            _sync(module.device)
            self.first_step_end, self.first_step_end_cpu = time.perf_counter(), time.process_time()
        if self.start is not None and self.end is None and step == self.warmup + self.steps:
            _sync(module.device)
            self.end, self.end_cpu = time.perf_counter(), time.process_time()
            if module.device.type == "cuda":
                self.peak_mem_gb = torch.cuda.max_memory_allocated(module.device) / 2**30
            if self.on_window_end:
                self.on_window_end()
        if new and step >= 1 and self.partner is not None:
            wall, cpu = self.partner(step, module)
            if self.start is not None and self.end is None:
                self.excluded, self.excluded_cpu = self.excluded + wall, self.excluded_cpu + cpu
        if self.start is None and step == self.warmup:
            _sync(module.device)
            if module.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(module.device)
            self.start, self.start_cpu = time.perf_counter(), time.process_time()
            if self.on_window_start:
                self.on_window_start()

    @property
    def step_s(self) -> float:
        if self.start is None or self.end is None:
            raise RuntimeError(f"the fit ended before {self.warmup} + {self.steps} optimizer steps")
        return (self.end - self.start - self.excluded) / self.steps

    @property
    def step_cpu_s(self) -> float:
        """The process's CPU time per step (all its threads): on a shared machine, the work done, whatever the load."""
        self.step_s  # noqa: B018 (the same check)
        return (self.end_cpu - self.start_cpu - self.excluded_cpu) / self.steps


CALLBACK_HOOKS = (
    "on_train_batch_start",
    "on_train_batch_end",
    "on_before_backward",
    "on_after_backward",
    "on_before_optimizer_step",
    "on_before_zero_grad",
)


class PartTimer(StepTimer):
    """The breakdown run: exclusive times of named regions inside the timed window (a region's time excludes the
    regions opened inside it), per optimizer step. Forward hooks time the text encoder, the teacher U-Net and the
    student (not their re-runs under gradient checkpointing, which belong to the backward); ``vae.encode`` is
    wrapped; callback hooks mark the backward (``on_before_backward`` -> ``on_after_backward``) and the optimizer
    (``on_before_optimizer_step`` -> the optimizer's step post-hook); the data loader's iterator, the batch transfer,
    ``training_step``, ``self.log``, the module's ``on_before_optimizer_step``, every other callback's per-step hooks
    and the loggers' ``log_metrics`` are wrapped. ``other`` is the window minus all of these: Lightning's loop. On
    CUDA every mark synchronises."""

    def __init__(self, warmup: int, steps: int, profile: bool = False):
        super().__init__(warmup, steps)
        self.totals: dict[str, float] = {}
        self.active = False
        self._stack: list[list] = []  # [name, start, time spent in children]
        self._in_backward = False
        self.device = torch.device("cpu")
        self.profiler = cProfile.Profile() if profile else None
        self.on_window_start, self.on_window_end = self._start_window, self._end_window

    def _start_window(self) -> None:
        self.active = True
        if self.profiler is not None:
            self.profiler.enable()

    def _end_window(self) -> None:
        self.active = False
        if self.profiler is not None:
            self.profiler.disable()

    def now(self) -> float:
        """CUDA: synchronise, wall clock. CPU: the process's CPU time (on a shared machine the work, not the wait)."""
        if self.device.type == "cuda":
            _sync(self.device)
            return time.perf_counter()
        return time.process_time()

    def enter(self, name: str) -> None:
        if self.active:
            self._stack.append([name, self.now(), 0.0])

    def exit(self, name: str) -> None:
        if not self._stack or self._stack[-1][0] != name:
            return  # opened before the window (or never): not counted
        _, start, children = self._stack.pop()
        spent = self.now() - start
        self.totals[name] = self.totals.get(name, 0.0) + spent - children
        if self._stack:
            self._stack[-1][2] += spent

    def region(self, name: str, fn):
        def timed(*args, **kwargs):
            self.enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.exit(name)

        return timed

    def install(self, trainer: pl.Trainer, module) -> None:
        """Put the marks on the built trainer, module and data module (before the fit)."""
        self.wrap_training_step(module)
        module.training_step = self.region("training_step (noise, loss, rest)", module.training_step)
        module.log = self.region("logging (self.log)", module.log)
        module.on_before_optimizer_step = self.region(
            "module on_before_optimizer_step (grad-norm log)", module.on_before_optimizer_step
        )
        if getattr(module, "vae", None) is not None:
            module.vae.encode = self.region("VAE encode", module.vae.encode)
        trainer.strategy.batch_to_device = self.region("batch to device", trainer.strategy.batch_to_device)
        for callback in trainer.callbacks:
            if callback is self:
                continue
            label = f"callback {type(callback).__name__}"
            for hook in CALLBACK_HOOKS:
                if getattr(type(callback), hook, None) is not getattr(pl.Callback, hook):
                    setattr(callback, hook, self.region(label, getattr(callback, hook)))
        for logger in trainer.loggers:
            logger.log_metrics = self.region(f"logger {type(logger).__name__}.log_metrics", logger.log_metrics)

    def wrap_loader(self, datamodule) -> None:
        make = datamodule.train_dataloader
        timer = self

        def train_dataloader():
            loader = make()
            cls = type(loader)

            class TimedLoader(cls):
                def __iter__(self):
                    return _TimedIterator(cls.__iter__(self), timer)

            loader.__class__ = TimedLoader
            return loader

        datamodule.train_dataloader = train_dataloader

    def _forward_pre(self, name, module, args):
        if not self._in_backward:
            self.enter(name)

    def _forward_post(self, name, module, args, output):
        if not self._in_backward:
            self.exit(name)

    def on_fit_start(self, trainer, module) -> None:
        super().on_fit_start(trainer, module)
        self.device = module.device

    def on_train_start(self, trainer, module) -> None:
        super().on_train_start(trainer, module)
        # model hooks from here to on_train_end only: the EMA's and the export's copies of the student must not
        # carry them (a deep copy of a module copies its hooks)
        self._handles = []
        for name, part in (
            ("text encode", "text_encoder"),
            ("teacher forward", "teacher_unet"),
            ("student forward", "student"),
        ):
            model = getattr(module, part, None)
            if model is not None:
                self._handles.append(model.register_forward_pre_hook(partial(self._forward_pre, name)))
                self._handles.append(model.register_forward_hook(partial(self._forward_post, name)))
        for optimizer in trainer.optimizers:
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.exit("optimizer (clip, step)")))

    def on_train_end(self, trainer, module) -> None:
        for handle in self._handles:
            handle.remove()

    def on_before_backward(self, trainer, module, loss) -> None:
        self.enter("backward")
        self._in_backward = True

    def on_after_backward(self, trainer, module) -> None:
        self._in_backward = False
        self.exit("backward")

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.enter("optimizer (clip, step)")

    @property
    def step_clock_s(self) -> float:
        """The step time in the clock of :meth:`now`."""
        return self.step_s if self.device.type == "cuda" else self.step_cpu_s

    def per_step(self) -> dict[str, float]:
        parts = {name: seconds / self.steps for name, seconds in self.totals.items()}
        parts["other (Lightning loop)"] = max(0.0, self.step_clock_s - sum(parts.values()))
        return dict(sorted(parts.items(), key=lambda kv: -kv[1]))

    def profile_text(self, top: int = 40) -> str:
        if self.profiler is None:
            return ""
        out = io.StringIO()
        pstats.Stats(self.profiler, stream=out).sort_stats("tottime").print_stats(top)
        return out.getvalue()


class _TimedIterator:
    def __init__(self, iterator, timer: PartTimer):
        self.iterator, self.timer = iterator, timer

    def __iter__(self):
        return self

    def __next__(self):
        self.timer.enter("data wait")
        try:
            return next(self.iterator)
        finally:
            self.timer.exit("data wait")

    def __getattr__(self, name):
        return getattr(self.iterator, name)


# ---- the framework ----------------------------------------------------------------------------------------------
def framework_run(
    overrides: list[str], run_dir: Path, bcfg, device: torch.device, breakdown: bool, weights: str, interleave=False
) -> dict:
    """Compose, build and fit the real training path; the timer's numbers (and the breakdown when asked)."""
    from bksdm_lab import train as train_app

    start, start_cpu = time.perf_counter(), time.process_time()
    with hydra_config(compose_train(overrides, run_dir)) as cfg:
        teacher = None
        if weights == "random":
            cached = uses_cached_latents(cfg.data)
            teacher = random_teacher(cfg.teacher.configs, device, load_vae=not cached, seed=cfg.seed)
        resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))  # for the plain loop, after the fit
        built = train_app.build(cfg, teacher=teacher)
        built_at = time.perf_counter()
        timer = PartTimer(bcfg.warmup, bcfg.steps, profile=bool(bcfg.profile)) if breakdown else None
        partner = Interleaved(resolved, bcfg, device, weights) if interleave and not breakdown else None
        timer = timer or StepTimer(bcfg.warmup, bcfg.steps, partner=partner)
        built.trainer.callbacks.insert(0, timer)
        if breakdown:
            timer.install(built.trainer, built.module)
            timer.wrap_loader(built.datamodule)
        else:
            timer.wrap_training_step(built.module)
        train_app.fit(built)
    out = {
        "step_s": timer.step_s,
        "step_cpu_s": timer.step_cpu_s,
        "startup_s": timer.first_step_end - start,
        "startup_cpu_s": timer.first_step_end_cpu - start_cpu,
        "startup_phases_s": startup_phases(start, built_at, timer),
        "first_loss": timer.first_loss,
        "peak_mem_gb": timer.peak_mem_gb,
        "accumulation": built.trainer.accumulate_grad_batches,
        "micro_batch": built.datamodule.batch_size,
        "precision": str(built.trainer.precision),
        "callbacks": [type(c).__name__ for c in built.trainer.callbacks if c is not timer],
        "loggers": [type(lg).__name__ for lg in built.trainer.loggers],
        "student_params": count_params(built.student),
        "steps_trained": built.trainer.global_step,
        # what the run resolved (the plain loop does the same): gradient checkpointing, the frozen parts' dtype
        "gradient_checkpointing": bool(getattr(built.student, "is_gradient_checkpointing", False)),
        "frozen_dtype": str(next(built.module.teacher_unet.parameters()).dtype),
        "fast_path": {k: str(v) for k, v in (getattr(built.module, "fast_path", None) or {}).items()},
        "train_cfg": resolved,
    }
    if partner is not None:
        out["plain"], out["plain_state"] = partner.result(), partner.plain
    if breakdown:
        out["parts"], out["clock_s"] = timer.per_step(), timer.step_clock_s
        if timer.profiler is not None:
            (run_dir / "profile.txt").write_text(timer.profile_text())
            timer.profiler.dump_stats(run_dir / "profile.prof")  # python -m pstats <file>: callers, callees
            out["profile"] = str(run_dir / "profile.txt")
    del built, timer, teacher, partner
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def startup_phases(start: float, built_at: float, timer: StepTimer) -> dict[str, float]:
    """Where the framework's start-up goes (wall seconds)."""
    m = timer.marks
    return {
        "compose + build (checks, models, data, loggers, callbacks, Trainer)": built_at - start,
        "fit -> on_fit_start (hyperparameters/W&B run, Lightning and callback setup)": m["fit_start"] - built_at,
        "-> on_train_start (model summary, optimizer, data loader)": m["train_start"] - m["fit_start"],
        "-> first batch (on_train_start callbacks: the teacher's sample images)": m["first_batch"] - m["train_start"],
        "-> end of the first optimizer step": timer.first_step_end - m["first_batch"],
    }


# ---- the plain loop ---------------------------------------------------------------------------------------------
@dataclass
class Plain:
    """The plain loop's models and state: what a minimal PyTorch script builds."""

    teacher: Teacher
    student: torch.nn.Module
    loss: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loader: object
    accumulation: int
    clip: float | None
    device: torch.device
    half: torch.dtype | None
    scaler: object | None
    seed: int
    frozen_dtype: torch.dtype = torch.float32  # known once (diffusers' ``model.dtype`` walks every module per call)
    taps: tuple = ()
    epoch: int = 0
    iterator: object = None
    step: int = 0
    served: int = 0  # micro-batches of this epoch so far
    data_wait: float = 0.0  # seconds in next_batch (CPU time on CPU, wall on CUDA: the breakdown's clock)
    losses: list = field(default_factory=list)

    def next_batch(self) -> dict:
        clock = time.perf_counter if self.device.type == "cuda" else time.process_time
        start = clock()
        try:
            return self._next_batch()
        finally:
            self.data_wait += clock() - start

    def _next_batch(self) -> dict:
        while True:
            if self.iterator is None:
                self.loader.sampler.set_epoch(self.epoch)
                self.iterator, self.served = iter(self.loader), 0
            try:
                batch = next(self.iterator)
                self.served += 1
                return batch
            except StopIteration:
                self.iterator, self.epoch = None, self.epoch + 1

    def epoch_done(self) -> bool:
        return self.served >= len(self.loader)

    def micro_step(self, batch: dict, section=lambda name: nullcontext()) -> torch.Tensor:
        """One micro-batch: the draws of (seed, step, sample index), encode, noise, both U-Nets, loss, backward."""
        dev = self.device
        # the sample indices stay on the host (they seed the generators; on the device, reading them would sync)
        batch = {
            k: v.to(dev, non_blocking=True) if torch.is_tensor(v) and k != "index" else v for k, v in batch.items()
        }
        gens = [
            torch.Generator(device=dev).manual_seed(sample_seed(self.seed, self.step, int(i)))
            for i in batch["index"].tolist()
        ]
        sched = self.teacher.noise_scheduler
        autocast = torch.autocast(dev.type, dtype=self.half) if self.half is not None else nullcontext()
        with autocast:
            with torch.no_grad():
                if "latent_mean" in batch:
                    mean, std = batch["latent_mean"].float(), batch["latent_std"].float()
                    eps = randn_tensor(mean.shape, generator=gens, device=dev, dtype=mean.dtype)
                    latents = (mean + std * eps) * batch["scaling_factor"][0]
                else:
                    vae = self.teacher.vae
                    with section("VAE encode"):
                        posterior = vae.encode(batch["pixel_values"].to(self.frozen_dtype)).latent_dist
                    latents = posterior.sample(generator=gens) * vae.config.scaling_factor
                with section("text encode"):
                    cond = self.teacher.text_encoder(batch["input_ids"])[0]
                latents = latents.float()
            noise = randn_tensor(latents.shape, generator=gens, device=dev, dtype=latents.dtype)
            t = random_timesteps(sched.config.num_train_timesteps, latents.shape[0], gens, dev)
            noisy = sched.add_noise(latents, noise, t)
            prediction = sched.config.prediction_type
            target = sched.get_velocity(latents, noise, t) if prediction == "v_prediction" else noise
            with section("student forward"):
                student_out = self.student(noisy, t, cond).sample
            teacher_out = None
            if self.loss.needs_teacher:
                unet = self.teacher.unet
                with section("teacher forward"), torch.no_grad():
                    teacher_out = unet(noisy.to(self.frozen_dtype), t, cond.to(self.frozen_dtype)).sample
            student_taps, teacher_taps = self.taps or (None, None)
            inputs = KDInputs(
                student_out=student_out,
                target=target,
                teacher_out=teacher_out,
                student_features=student_taps.pop() if student_taps else {},
                teacher_features=teacher_taps.pop() if teacher_taps else {},
                noisy=noisy,
                timesteps=t,
                alphas_cumprod=sched.alphas_cumprod,
                prediction_type=prediction,
            )
            total, _ = self.loss(inputs)
        scaled = total / self.accumulation
        with section("student backward"):
            (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return total

    def optimizer_step(self) -> None:
        params = [p for p in self.student.parameters() if p.requires_grad]
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.clip:
            torch.nn.utils.clip_grad_norm_(params, self.clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

    def train_step(self, section=lambda name: nullcontext()) -> None:
        """Micro-batches until the accumulation is full, or the epoch ends (Lightning steps there too, and counts the
        accumulation from the epoch's start), then the optimizer step. The loss is divided by the accumulation."""
        while True:
            total = self.micro_step(self.next_batch(), section)
            if not self.losses:
                self.losses.append(float(total.detach().float()))
            if self.served % self.accumulation == 0 or self.epoch_done():
                break
        with section("optimizer (clip, step)"):
            self.optimizer_step()


PLAIN_NAMES = {"student backward": "backward"}  # the plain loop's section names -> the framework breakdown's


def plain_breakdown(plain: Plain, steps: int) -> dict[str, float]:
    """The plain loop's parts per optimizer step, in the framework breakdown's clock and names (CUDA: synchronised
    wall; CPU: process CPU time); ``rest`` is the noise draws, the loss and the loop."""
    device = plain.device
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    totals: dict[str, float] = {}

    @contextmanager
    def section(name: str):
        _sync(device)
        start = clock()
        yield
        _sync(device)
        name = PLAIN_NAMES.get(name, name)
        totals[name] = totals.get(name, 0.0) + clock() - start

    plain.data_wait = 0.0
    _sync(device)
    start = clock()
    for _ in range(steps):
        plain.train_step(section)
    _sync(device)
    step = (clock() - start) / steps
    parts = {name: seconds / steps for name, seconds in totals.items()}
    parts["data wait"] = plain.data_wait / steps
    parts["rest (noise, loss, loop)"] = max(0.0, step - sum(parts.values()))
    return {"step_s": step, "parts": parts}


def build_plain(
    cfg: DictConfig,
    device: torch.device,
    weights: str,
    accumulation: int,
    checkpointing: bool | None = None,
    frozen_dtype: torch.dtype | None = None,
) -> Plain:
    """Teacher, student, loss, data and optimizer from the same config, with no Lightning object in the loop (the
    data module only makes the DataLoader, as it does for the Trainer)."""
    from hydra.utils import instantiate

    cached = uses_cached_latents(cfg.data)
    if weights == "random":
        teacher = random_teacher(cfg.teacher.configs, device, load_vae=not cached, seed=cfg.seed)
    else:
        teacher = load_teacher(cfg.teacher, load_vae=not cached)
    student = init_student_from_teacher(teacher.unet, cfg.arch).to(device)
    precision = str(cfg.trainer.precision)
    if precision not in (*HALF, *FULL):
        raise ValueError(f"trainer.precision={precision!r}: the plain loop runs {sorted((*HALF, *FULL))}")
    half = HALF.get(precision)
    frozen_dtype = frozen_dtype or half or torch.float32  # what the framework's frozen parts ran in
    for part in (teacher.unet, teacher.vae, teacher.text_encoder):
        if part is not None:
            part.to(device, frozen_dtype).requires_grad_(False).eval()
    student.train()
    if cfg.gradient_checkpointing is True if checkpointing is None else checkpointing:  # as the framework decided
        student.enable_gradient_checkpointing()
    loss = instantiate(cfg.loss).to(device)
    pairs = loss.feature_pairs
    taps = (
        (FeatureTaps(student, [s for _, s in pairs]), FeatureTaps(teacher.unet, [t for t, _ in pairs])) if pairs else ()
    )
    datamodule = instantiate(cfg.data, tokenizer=teacher.tokenizer)
    factory = instantiate(cfg.optimizer)
    fused = (
        {"fused": True} if device.type == "cuda" and "fused" in cfg.optimizer and cfg.optimizer.fused is None else {}
    )
    optimizer = factory(params=[p for p in student.parameters() if p.requires_grad], **fused)  # as the module does
    clip = cfg.trainer.get("gradient_clip_val")
    algorithm = cfg.trainer.get("gradient_clip_algorithm") or "norm"
    if clip and algorithm != "norm":
        raise ValueError(f"trainer.gradient_clip_algorithm={algorithm!r}: the plain loop clips by norm only")
    return Plain(
        teacher=teacher,
        student=student,
        loss=loss,
        optimizer=optimizer,
        loader=datamodule.train_dataloader(),
        accumulation=accumulation,
        clip=float(clip) if clip else None,
        device=device,
        half=half,
        scaler=torch.amp.GradScaler(device.type) if precision == "16-mixed" else None,
        seed=int(cfg.seed),
        frozen_dtype=frozen_dtype,
        taps=taps,
    )


class Interleaved:
    """The plain loop stepped between the framework's optimizer steps (``interleave``): built right after the
    framework's first step (so the framework's start-up is measured first, cold), then one plain step after each
    framework step; the plain steps after framework steps ``warmup + 1 .. warmup + steps`` are timed. Both loops then
    see the same machine load, step by step (on a shared machine the sequential runs can see different loads)."""

    def __init__(self, cfg: DictConfig, bcfg, device: torch.device, weights: str):
        self.cfg, self.bcfg, self.device, self.weights = cfg, bcfg, device, weights
        self.plain: Plain | None = None
        self.startup = self.startup_cpu = 0.0
        self.times: list[tuple[float, float]] = []

    def __call__(self, step: int, module) -> tuple[float, float]:
        _sync(self.device)
        wall, cpu = time.perf_counter(), time.process_time()
        if self.plain is None:
            checkpointing = bool(getattr(module.student, "is_gradient_checkpointing", False))
            frozen = next(module.teacher_unet.parameters()).dtype
            accumulation = module.trainer.accumulate_grad_batches
            self.plain = build_plain(self.cfg, self.device, self.weights, accumulation, checkpointing, frozen)
        elif step == self.bcfg.warmup + 1:
            self.plain.data_wait = 0.0
        self.plain.train_step()
        _sync(self.device)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if self.plain.step == 1:
            self.startup, self.startup_cpu = wall, cpu
        elif self.bcfg.warmup < step <= self.bcfg.warmup + self.bcfg.steps:
            self.times.append((wall, cpu))
        return wall, cpu

    def result(self) -> dict:
        n = len(self.times)
        if n != self.bcfg.steps:
            raise RuntimeError(f"the interleaved plain loop timed {n} steps, not {self.bcfg.steps}")
        return {
            "step_s": sum(w for w, _ in self.times) / n,
            "step_cpu_s": sum(c for _, c in self.times) / n,
            "data_wait_s": self.plain.data_wait / n,
            "startup_s": self.startup,
            "startup_cpu_s": self.startup_cpu,
            "first_loss": self.plain.losses[0],
            "steps_trained": self.plain.step,
            "peak_mem_gb": None,
            "interleaved": True,
        }


def plain_run(cfg: DictConfig, bcfg, device: torch.device, weights: str, framework: dict) -> tuple[dict, Plain]:
    start, start_cpu = time.perf_counter(), time.process_time()
    frozen = getattr(torch, framework["frozen_dtype"].removeprefix("torch."))
    plain = build_plain(
        cfg, device, weights, framework["accumulation"], framework["gradient_checkpointing"], frozen_dtype=frozen
    )
    plain.train_step()
    _sync(device)
    startup, startup_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    for _ in range(bcfg.warmup - 1):
        plain.train_step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, c0 = time.perf_counter(), time.process_time()
    plain.data_wait = 0.0
    for _ in range(bcfg.steps):
        plain.train_step()
    _sync(device)
    seconds, cpu = (time.perf_counter() - t0) / bcfg.steps, (time.process_time() - c0) / bcfg.steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    out = {
        "step_s": seconds,
        "step_cpu_s": cpu,
        "data_wait_s": plain.data_wait / bcfg.steps,
        "startup_s": startup,
        "startup_cpu_s": startup_cpu,
        "first_loss": plain.losses[0],
        "steps_trained": plain.step,
        "peak_mem_gb": peak,
    }
    return out, plain


def count_flops(plain: Plain) -> dict[str, float]:
    """FLOPs of one micro-step of the plain loop's work, by part (``torch.utils.flop_counter``: matmuls,
    convolutions and attention; elementwise work is not counted). On CPU attention is counted through PyTorch's math
    SDPA, whose matmuls the counter sees (its fused CPU kernel is not in the counter's table)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counts: dict[str, float] = {}

    @contextmanager
    def section(name: str):
        with FlopCounterMode(display=False) as counter:
            yield
        counts[name] = counts.get(name, 0.0) + counter.get_total_flops()

    attention = sdpa_kernel([SDPBackend.MATH]) if plain.device.type != "cuda" else nullcontext()
    with attention:
        plain.micro_step(plain.next_batch(), section)
    plain.optimizer.zero_grad(set_to_none=True)
    return counts


# ---- the old numbers: the frozen parts alone, generation, the data loader ------------------------------------
def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Mean seconds per call after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / steps


@torch.no_grad()
def bench_frozen_parts(teacher: Teacher, batch: int, steps: int, warmup: int, device, resolution: int) -> dict:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pixels = torch.randn(batch, 3, resolution, resolution, device=device, dtype=dtype)
    latent = resolution // 8
    noisy = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype)
    ids = torch.randint(0, 514, (batch, 77), device=device)
    t = torch.randint(0, 1000, (batch,), device=device)
    text_encoder, vae, unet = (m.to(device, dtype) for m in (teacher.text_encoder, teacher.vae, teacher.unet))
    cond = text_encoder(ids)[0]
    return {
        "vae_encode_s": timed(lambda: vae.encode(pixels).latent_dist.sample(), steps, warmup, device),
        "text_encode_s": timed(lambda: text_encoder(ids)[0], steps, warmup, device),
        "teacher_unet_forward_s": timed(lambda: unet(noisy, t, cond).sample, steps, warmup, device),
    }


@torch.no_grad()
def bench_generation(teacher: Teacher, unet, steps: int, device, resolution: int, batch: int, sampling: dict) -> dict:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline(
        vae=teacher.vae.to(device, dtype),
        text_encoder=teacher.text_encoder.to(device, dtype),
        tokenizer=teacher.tokenizer,
        unet=unet.to(device, dtype),
        scheduler=teacher.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    set_scheduler(pipe, sampling["scheduler"])
    pipe.set_progress_bar_config(disable=True)

    def generate():
        pipe(
            ["a photo of an astronaut riding a horse on mars"] * batch,
            num_inference_steps=sampling["steps"],
            guidance_scale=sampling["guidance"],
            height=resolution,
            width=resolution,
            output_type="np",
        )

    seconds = timed(generate, max(1, steps // 3), 1, device)
    return {"batch": batch, "s_per_batch": seconds, "images_per_s": batch / seconds}


def bench_dataloader(workers: int, tokenizer, num_images: int = 96, batch: int = 8) -> dict:
    """Images/s through the training data path (decode, resize, crop, flip, tokenise) for 512 px JPEGs."""
    import csv
    import tempfile

    import numpy as np
    from PIL import Image
    from torch.utils.data import DataLoader

    from bksdm_lab.data.common import ResumableSampler, collate
    from bksdm_lab.data.folder import ImageCaptionFolder

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        rows = []
        for i in range(num_images):  # photo-like: smooth gradients plus noise, 640 x 512 as LAION images often are
            y, x = np.mgrid[0:512, 0:640]
            base = np.stack([(x * (i + 1)) % 256, (y * 2) % 256, (x + y) % 256], axis=-1).astype(np.float32)
            pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(f"{tmp}/{i:04d}.jpg", quality=90)
            rows.append({"file_name": f"{i:04d}.jpg", "text": f"a photo number {i}"})
        with open(f"{tmp}/metadata.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
            writer.writeheader()
            writer.writerows(rows)
        dataset = ImageCaptionFolder(tmp, tokenizer, resolution=512)
        loader = DataLoader(
            dataset, batch_size=batch, sampler=ResumableSampler(len(dataset)), num_workers=workers, collate_fn=collate
        )
        next(iter(loader))  # start the workers before timing
        start = time.perf_counter()
        count = sum(len(b["index"]) for b in loader)
        seconds = time.perf_counter() - start
    return {"images_per_s": count / seconds, "images_per_s_per_worker": count / seconds / max(1, workers)}


# ---- the command ------------------------------------------------------------------------------------------------
def check(cfg) -> None:
    """One line per bad value, before anything is built."""
    problems = []
    for key, allowed in (("weights", WEIGHTS), ("source", SOURCES), ("interleave", ("auto", True, False))):
        if cfg[key] not in allowed:
            problems.append(f"{key}={cfg[key]!r} is not one of {list(allowed)}")
    for key, low in (("steps", 1), ("warmup", 1)):
        if not isinstance(cfg[key], int) or cfg[key] < low:
            problems.append(f"{key}={cfg[key]!r} must be an integer >= {low}")
    for key in ("variants", "batch", "resolution", "train", "gen_batch", "dataloader"):
        if not OmegaConf.is_list(cfg[key]):
            problems.append(f"{key}={cfg[key]!r} must be a list, e.g. {key}=[...]")
    if cfg.device not in (None, "cpu", "cuda") and not str(cfg.device).startswith("cuda:"):
        problems.append(f"device={cfg.device!r} is not one of [null, cpu, cuda, cuda:<n>]")
    if problems:
        raise ValueError("; ".join(problems))


def peak_for(device_name: str, override) -> float | None:
    if override is not None:
        return float(override)
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def _point_overrides(arch, batch, resolution) -> list[str]:
    out = []
    if arch is not None:
        out.append(f"arch={arch}")
    if batch is not None:
        out.append(f"data.batch_size={batch}")
    if resolution is not None:
        out.append(f"teacher.resolution={resolution}")
    return out


def bench_point(bcfg, base: list[str], point: list[str], run_dir: Path, device, weights: str, data: str) -> dict:
    """The framework (throughput, then breakdown), the plain loop and the FLOP count at one sweep point."""
    overrides = [*base, *point]
    group = {"latents": "latents", "images": "folder"}.get(data)
    source = [f"data={group}", "data.root=/synthetic"] if group else []
    probe = compose_train([*overrides, *source], run_dir / "probe")
    resolution, teacher_name = int(probe.teacher.resolution), str(probe.teacher.name)
    # a whole number of optimizer steps per epoch (Lightning also steps at an epoch's end, whatever the accumulation)
    per_step = probe.data.get("global_batch_size") or probe.data.batch_size * probe.trainer.accumulate_grad_batches
    samples = -(-int(bcfg.source_samples) // per_step) * per_step
    if data == "latents":
        root = synthetic_latents(
            run_dir.parent / f"data/latents_{resolution}px_{samples}", teacher_name, resolution, samples
        )
        overrides += ["data=latents", f"data.root={root}"]
    elif data == "images":
        from bksdm_lab.tools.demo import make_synthetic_dataset

        root = make_synthetic_dataset(run_dir.parent / f"data/images_{resolution}px_{samples}", samples, resolution)
        overrides += ["data=folder", f"data.root={root}"]
    overrides += [
        f"trainer.max_steps={bcfg.warmup + bcfg.steps}",
        "trainer.accelerator=" + ("gpu" if device.type == "cuda" else "cpu"),
    ]

    interleave = bcfg.plain and (bcfg.interleave if bcfg.interleave != "auto" else device.type == "cpu")
    framework = framework_run(overrides, run_dir / "framework", bcfg, device, False, weights, interleave)
    interleaved = (framework.pop("plain", None), framework.pop("plain_state", None))
    cfg = framework.pop("train_cfg")
    result = {"overrides": overrides, "framework": framework}
    if bcfg.breakdown:
        split = framework_run(overrides, run_dir / "breakdown", bcfg, device, breakdown=True, weights=weights)
        split.pop("train_cfg")
        result["breakdown"] = {
            "step_s": split["clock_s"],
            "clock": "wall, synchronised" if device.type == "cuda" else "process CPU time",
            "parts": split["parts"],
        }
        if "profile" in split:
            result["breakdown"]["profile"] = split["profile"]
    if bcfg.plain:
        plain, state = interleaved if interleaved[0] else plain_run(cfg, bcfg, device, weights, framework)
        result["plain"] = plain
        result["ratio"] = framework["step_s"] / plain["step_s"]
        result["ratio_cpu_time"] = framework["step_cpu_s"] / plain["step_cpu_s"]
        result["first_loss_rel_diff"] = abs(framework["first_loss"] - plain["first_loss"]) / max(
            abs(plain["first_loss"]), 1e-12
        )
        if bcfg.breakdown:
            result["plain_breakdown"] = plain_breakdown(state, bcfg.steps)
        if bcfg.flops:
            parts = count_flops(state)
            micro = framework["micro_batch"]
            images = micro * framework["accumulation"]
            per_image = sum(parts.values()) / micro
            flops = {
                "per_image_gflop": per_image / 1e9,
                "per_image_gflop_by_part": {k: v / micro / 1e9 for k, v in parts.items()},
                "achieved_tflops": per_image * images / framework["step_s"] / 1e12,
                "achieved_tflops_plain": per_image * images / plain["step_s"] / 1e12,
            }
            peak = peak_for(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", bcfg.peak_tflops)
            if peak:
                flops["peak_tflops"] = peak
                flops["mfu"] = flops["achieved_tflops"] / peak
            result["flops"] = flops
        del state
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ema = (result.get("breakdown") or {}).get("parts", {}).get("callback EMA")
    if ema is not None:  # in the breakdown's clock: wall (CUDA) or CPU time (CPU)
        result["ema_s"] = ema
        if "plain" in result:
            key = "step_s" if device.type == "cuda" else "step_cpu_s"
            result["ratio_without_ema"] = (framework[key] - ema) / result["plain"][key]
    images = framework["micro_batch"] * framework["accumulation"]
    result.update(
        arch=str(cfg.arch.name),
        micro_batch=framework["micro_batch"],
        accumulation=framework["accumulation"],
        images_per_step=images,
        resolution=resolution,
        images_per_s=images / framework["step_s"],
    )
    return result


def run(cfg, out_dir: str | Path | None = None) -> dict:
    """The benchmark of ``cfg`` (conf/bench.yaml): the numbers, also printed. Training runs go under ``out_dir``
    (default ``cfg.out``)."""
    check(cfg)
    diffusers_logging.set_verbosity_error()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out_dir or cfg.out)
    base = [str(o) for o in cfg.train]
    probe = compose_train(base, out / "probe")
    demo_teacher = bool(probe.teacher.get("build_if_missing"))
    weights = cfg.weights if cfg.weights != "auto" else ("pretrained" if demo_teacher else "random")
    named_data = any(str(o).startswith(("data=", "data.root=")) for o in base)
    data = cfg.source if cfg.source != "auto" else ("config" if demo_teacher or named_data else "latents")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {
        "device": name,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "train": base,
        "weights": weights,
        "source": data,
        "warmup": cfg.warmup,
        "steps": cfg.steps,
        "points": [],
    }
    points = [(a, b, r) for a in cfg.variants for b in cfg.batch for r in cfg.resolution]
    for arch, batch, resolution in points:
        point = _point_overrides(arch, batch, resolution)
        label = f"{arch or 'arch'}_b{batch or 'cfg'}_r{resolution or 'cfg'}"
        r = bench_point(cfg, base, point, out / label, device, weights, data)
        result["points"].append(r)
        print("bench point", json.dumps({k: v for k, v in r.items() if k != "overrides"}), flush=True)

    teacher_cfg = probe.teacher
    resolution = int(teacher_cfg.resolution)
    sampling = sampling_dict(cfg.sampling)
    gen_batches = [int(b) for b in cfg.gen_batch]
    if cfg.frozen_parts or gen_batches or cfg.dataloader:
        teacher = random_teacher(teacher_cfg.configs, device, seed=0)
        micro = result["points"][0]["micro_batch"] if result["points"] else 8
        for workers in [int(w) for w in cfg.dataloader]:
            result.setdefault("dataloader", {})[workers] = bench_dataloader(workers, teacher.tokenizer)
        if cfg.frozen_parts:
            result["frozen_parts"] = bench_frozen_parts(teacher, micro, cfg.steps, cfg.warmup, device, resolution)
        if gen_batches:
            result["sampling"] = {k: sampling[k] for k in ("scheduler", "steps", "guidance")}
            result["generate"] = {}
            archs = {str(p["arch"]): p for p in result["points"]}
            for who in ["teacher", *archs]:
                if who == "teacher":
                    unet = teacher.unet
                else:
                    arch_cfg = compose_train([*base, f"arch={who}"], out / "probe").arch
                    unet = init_student_from_teacher(teacher.unet, OmegaConf.to_container(arch_cfg, resolve=True))
                result["generate"][who] = [
                    bench_generation(teacher, unet, cfg.steps, device, resolution, b, sampling) for b in gen_batches
                ]
    report(result)
    if cfg.json:
        Path(cfg.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def report(result: dict) -> None:
    """The printed summary: a table over the sweep points, then per point the ratio, EMA, start-up, FLOPs and the
    step-time breakdown."""
    print(
        f"\n{result['device']}, torch {result['torch']}, {result['threads']} thread(s); train overrides: "
        f"{' '.join(result['train']) or '(none)'}; weights {result['weights']}, data source {result['source']}; "
        f"{result['warmup']} warm-up + {result['steps']} timed optimizer steps"
    )
    head = f"{'arch':<7}{'res':>5}{'micro':>6}{'accum':>6}{'img/s':>9}{'step s':>9}{'plain s':>9}{'ratio':>7}{'GFLOP/img':>11}{'TFLOP/s':>9}{'MFU':>7}{'peak GB':>9}"
    print(head)
    for p in result["points"]:
        plain = p.get("plain", {})
        flops = p.get("flops", {})
        mem = p["framework"]["peak_mem_gb"]
        print(
            f"{p['arch']:<7}{p['resolution']:>5}{p['micro_batch']:>6}{p['accumulation']:>6}{p['images_per_s']:>9.1f}"
            f"{p['framework']['step_s']:>9.3f}{plain.get('step_s', float('nan')):>9.3f}{p.get('ratio', float('nan')):>7.3f}"
            f"{flops.get('per_image_gflop', float('nan')):>11.3f}{flops.get('achieved_tflops', float('nan')):>9.3f}"
            + (f"{flops['mfu'] * 100:>6.1f}%" if "mfu" in flops else f"{'-':>7}")
            + (f"{mem:>9.1f}" if mem is not None else f"{'-':>9}")
        )
    for p in result["points"]:
        fw = p["framework"]
        print(f"\n[{p['arch']}, {p['resolution']} px, micro-batch {p['micro_batch']} x {p['accumulation']}]")
        if "plain" in p:
            pl_ = p["plain"]
            print(
                f"framework/plain step time: {p['ratio']:.3f} wall ({_ms(fw['step_s'])} vs {_ms(pl_['step_s'])}), "
                f"{p['ratio_cpu_time']:.3f} process CPU time ({_ms(fw['step_cpu_s'])} vs {_ms(pl_['step_cpu_s'])}) per "
                f"optimizer step"
            )
            print(f"first loss: framework {fw['first_loss']:.7g}, plain {pl_['first_loss']:.7g}")
        if "ema_s" in p:
            clock = "CPU time" if p["breakdown"]["clock"] == "process CPU time" else "wall"
            extra = (
                f"; framework without it / plain: {p['ratio_without_ema']:.3f} ({clock})"
                if "ratio_without_ema" in p
                else ""
            )
            print(f"EMA update: {_ms(p['ema_s'])} per optimizer step{extra}")
        if "plain" in p:
            print(
                f"start-up to the end of the first optimizer step: framework {fw['startup_s']:.2f} s wall, "
                f"{fw['startup_cpu_s']:.2f} s CPU (config compose -> build -> fit); plain {p['plain']['startup_s']:.2f} s "
                f"wall, {p['plain']['startup_cpu_s']:.2f} s CPU (build -> step)"
            )
            print(
                "  framework start-up, wall: " + "; ".join(f"{k} {v:.2f} s" for k, v in fw["startup_phases_s"].items())
            )
        if "flops" in p:
            f = p["flops"]
            parts = ", ".join(f"{k} {v:.3f}" for k, v in f["per_image_gflop_by_part"].items())
            print(f"counted GFLOP per image: {f['per_image_gflop']:.3f} ({parts})")
        if "breakdown" in p:
            b = p["breakdown"]
            clock = "wall, each mark synchronises CUDA" if b["clock"] != "process CPU time" else "process CPU time"
            print(f"step-time breakdown per optimizer step ({_ms(b['step_s'])} in the breakdown run; {clock}):")
            plain = p.get("plain_breakdown", {"parts": {}})
            print(f"  {'':<52}{'framework':>11}{'':>7}{'plain':>11}  ({_ms(plain.get('step_s', float('nan')))} a step)")
            for name, seconds in b["parts"].items():
                other = plain["parts"].get(name)
                other = _ms(other) if other is not None else "-"
                print(f"  {name:<52}{_ms(seconds):>11}{seconds / b['step_s'] * 100:>6.1f}%{other:>11}")
            if "rest (noise, loss, loop)" in plain["parts"]:
                print(
                    f"  {'plain: rest (noise, loss, loop)':<52}{'':>18}{_ms(plain['parts']['rest (noise, loss, loop)']):>11}"
                )
    if "frozen_parts" in result:
        fp = result["frozen_parts"]
        print(
            f"\nfrozen parts per micro-batch: VAE encode {fp['vae_encode_s']:.3f} s, text encode "
            f"{fp['text_encode_s']:.3f} s, teacher U-Net forward {fp['teacher_unet_forward_s']:.3f} s"
        )
    for workers, r in result.get("dataloader", {}).items():
        print(
            f"dataloader, {workers} workers: {r['images_per_s']:.1f} img/s of 512 px JPEGs ({r['images_per_s_per_worker']:.1f} per worker)"
        )
    for who, runs in (result.get("generate") or {}).items():
        s = result["sampling"]
        text = ", ".join(f"batch {r['batch']}: {r['images_per_s']:.2f} img/s" for r in runs)
        print(f"generate {who:<8} ({s['steps']} {s['scheduler']} steps, guidance {s['guidance']}): {text}")
    if sys.platform.startswith("linux") and result["device"] == "cpu":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"process peak resident memory: {rss:.2f} GB")
