"""python -m bksdm_lab.bench: the real training path against a plain PyTorch loop doing the same work (a Hydra app).

python -m bksdm_lab.bench 'train=["experiment=demo"]' threads=1 steps=20 warmup=2 gen_batch=[1]   # the demo, CPU
python -m bksdm_lab.bench 'train=["arch=base"]' batch=[32,64] gen_batch=[1,8]   # SD-v1.4 -> Base, random weights
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import time
from contextlib import nullcontext
from itertools import count, pairwise, product
from math import nan
from pathlib import Path

import hydra
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from bksdm_lab import CONF_DIR
from bksdm_lab.common.cli import check_group_choices, guarded
from bksdm_lab.distill.checks import accumulation

PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}  # dense 16-bit peaks by device name; peak_tflops= overrides
HALF = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
PRECISIONS = ("32-true", "32", *HALF)


def now() -> tuple[float, float]:
    """(wall, process CPU time): on a shared machine the CPU time is the work, whatever the load."""
    return time.perf_counter(), time.process_time()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def slope(times: list[tuple[float, float]], warmup: int) -> tuple[float, float]:
    """Seconds per optimizer step (wall, CPU): the least-squares slope of the step-end times after ``warmup``."""
    x = range(warmup, len(times))
    return tuple(statistics.linear_regression(x, [t[i] for t in times[warmup:]]).slope for i in (0, 1))


class Clock(pl.Callback):
    """Added to the training run by config: start-up marks, step ends (wall, CPU), first loss, peak CUDA memory."""

    def __init__(self):
        self.marks = {"callbacks made": now()}
        self.steps: list[tuple[float, float]] = []
        self.first_loss = self.peak_gb = None  # floats once known

    def setup(self, trainer, module, stage: str) -> None:
        self.marks["fit setup"] = now()

    def on_fit_start(self, trainer, module) -> None:
        self.marks["fit start"] = now()
        if module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(module.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.marks.setdefault("first batch", now())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.first_loss is None and outputs is not None:  # Lightning hands over loss / accumulation
            self.first_loss = float(outputs["loss"]) * trainer.accumulate_grad_batches
        if trainer.global_step > len(self.steps):
            sync(module.device)
            self.steps.append(now())

    def on_train_end(self, trainer, module) -> None:
        if module.device.type == "cuda":
            self.peak_gb = torch.cuda.max_memory_allocated(module.device) / 2**30


def compose_train(overrides: list[str]) -> DictConfig:
    """conf/train.yaml with ``overrides``, as ``python -m bksdm_lab.train <overrides>`` composes it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside the bench's own hydra.main: the same conf/ folder
        return compose(config_name="train", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def framework(overrides: list[str], run_dir: Path, steps: int, profile: int = 0, accum: int = 1) -> tuple:
    """Compose and train (the real path, ``steps`` optimizer steps); ``profile`` > 0: under Lightning's
    PyTorchProfiler, recording ``profile`` optimizer steps after the first ``steps - profile - 1``."""
    from bksdm_lab.train import start_process, train

    start = now()
    extra = [f"trainer.max_steps={steps}", f"paths.output_dir={run_dir}", f"run_name=bench-{run_dir.name}"]
    extra.append(f"+callbacks.bench_clock._target_={Clock.__module__}.Clock")  # __main__ under python -m
    if profile:  # Lightning's PyTorchProfiler, recording `profile` steps after all the others but the last
        p, wait = "+trainer.profiler", (steps - profile - 1) * accum - 1
        extra += [f"{p}._target_=pytorch_lightning.profilers.PyTorchProfiler", f"{p}.filename=profile"]
        extra += [f"{p}.export_to_chrome=false", f"{p}.schedule._target_=torch.profiler.schedule"]
        extra += [f"{p}.schedule.wait={wait}", f"{p}.schedule.warmup=1", f"{p}.schedule.active={profile * accum}"]
    cfg = compose_train([*overrides, *extra])
    start_process(offline=cfg.offline)  # as python -m bksdm_lab.train does
    _, trainer = train(cfg)
    clock = next(c for c in trainer.callbacks if isinstance(c, Clock))
    return start, clock, trainer


def plain_loop(cfg: DictConfig, device: torch.device, accum: int, checkpointing: bool):
    """The loop a user would write for the same work (the config's teacher, student, data, paper loss with its feature
    taps, AdamW, accumulation, clipping; one generator for the noise and timesteps): returns ``step()``, which runs
    one optimizer step and gives the first micro-batch's loss, and the models by name (for the profiler's labels)."""
    from bksdm_lab.data.common import build_datamodule
    from bksdm_lab.distill.checks import uses_cached_latents
    from bksdm_lab.models.students import init_student_from_teacher
    from bksdm_lab.models.teachers import load_teacher

    teacher = load_teacher(cfg.teacher, load_vae=not uses_cached_latents(cfg.data))
    student = init_student_from_teacher(teacher.unet, cfg.arch).to(device).train()
    if checkpointing:
        student.enable_gradient_checkpointing()
    half = HALF.get(str(cfg.trainer.precision))
    frozen = {"teacher_unet": teacher.unet, "vae": teacher.vae, "text_encoder": teacher.text_encoder}
    frozen = {k: m.to(device, half or torch.float32).requires_grad_(False).eval() for k, m in frozen.items() if m}
    w = cfg.loss.weights
    pairs = [tuple(p) for p in cfg.loss.terms.feat_kd.pairs] if w.feat_kd else []
    features: dict[str, dict] = {"s": {}, "t": {}}

    def keep(store: dict, name: str):  # as the BK-SDM script taps features: a forward hook on each paired block
        return lambda module, args, out: store.__setitem__(name, out[0] if isinstance(out, tuple) else out)

    for t_name, s_name in pairs:
        teacher.unet.get_submodule(t_name).register_forward_hook(keep(features["t"], t_name))
        student.get_submodule(s_name).register_forward_hook(keep(features["s"], s_name))
    loader = build_datamodule(cfg.data, teacher.tokenizer).train_dataloader()
    batches = (batch for _ in count() for batch in loader)  # epoch after epoch
    optimizer = instantiate(cfg.optimizer)(params=student.parameters())
    scaler = torch.amp.GradScaler(device.type, enabled=half is torch.float16)
    clip, sched = cfg.trainer.gradient_clip_val, teacher.noise_scheduler
    gen = torch.Generator(device).manual_seed(cfg.seed)  # one generator for the batch's draws, as the BK-SDM script
    autocast = torch.autocast(device.type, dtype=half) if half else nullcontext()

    def micro_step() -> torch.Tensor:
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(batches).items()}
        with autocast:
            with torch.no_grad():
                if "latent_mean" in batch:  # cached VAE posteriors
                    mean, std = batch["latent_mean"].float(), batch["latent_std"].float()
                    eps = torch.randn(mean.shape, generator=gen, device=device)
                    latents = (mean + std * eps) * batch["scaling_factor"][0]
                else:
                    posterior = teacher.vae.encode(batch["pixel_values"].to(half or torch.float32)).latent_dist
                    latents = posterior.sample(generator=gen).float() * teacher.vae.config.scaling_factor
                cond = teacher.text_encoder(batch["input_ids"])[0]
            noise = torch.randn(latents.shape, generator=gen, device=device)
            t = torch.randint(0, sched.config.num_train_timesteps, (len(latents),), generator=gen, device=device)
            noisy = sched.add_noise(latents, noise, t)
            target = sched.get_velocity(latents, noise, t) if sched.config.prediction_type == "v_prediction" else noise
            out = student(noisy, t, cond).sample
            loss = w.task * F.mse_loss(out.float(), target.float())
            if w.out_kd or pairs:
                with torch.no_grad():
                    teacher_out = teacher.unet(noisy.to(half or torch.float32), t, cond).sample
                feat = sum(F.mse_loss(features["s"][s].float(), features["t"][t_].float()) for t_, s in pairs)
                loss = loss + w.out_kd * F.mse_loss(out.float(), teacher_out.float()) + w.feat_kd * feat
        with torch.profiler.record_function("backward"):
            scaler.scale(loss / accum).backward()
        return loss.detach()

    def step() -> float:
        first = float(micro_step())
        for _ in range(accum - 1):
            micro_step()
        scaler.unscale_(optimizer)
        if clip:
            torch.nn.utils.clip_grad_norm_(student.parameters(), clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return first

    return step, torch.nn.ModuleDict({"student": student, **frozen})


def run_plain(cfg: DictConfig, device, accum: int, checkpointing: bool, bcfg) -> tuple[dict, object, object]:
    start = now()
    step, models = plain_loop(cfg, device, accum, checkpointing)
    times, first_loss = [], None
    torch.cuda.reset_peak_memory_stats(device) if device.type == "cuda" else None
    for _ in range(bcfg.warmup + bcfg.steps):
        loss = step()
        first_loss = loss if first_loss is None else first_loss
        sync(device)
        times.append(now())
    wall, cpu = slope(times, bcfg.warmup)
    result = {"step_s": wall, "step_cpu_s": cpu, "first_loss": first_loss, "steps_trained": len(times)}
    result["startup_s"], result["startup_cpu_s"] = (times[0][i] - start[i] for i in (0, 1))
    result["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return result, step, models


FORWARD = dict(student="student forward", teacher_unet="teacher forward", vae="VAE encode", text_encoder="text encode")


def part_of(name: str) -> str | None:
    """The breakdown's part of a profiler event, the same names in both loops (None: inside the part around it)."""
    if name.startswith("[pl][module]"):  # RegisterRecordFunction's labels: "[pl][module]<class>: <module name>"
        return FORWARD.get(name.split(": ", 1)[-1].split(".")[0])
    if name.startswith("enumerate(DataLoader)"):
        return "data loading"
    if name.startswith("Optimizer.step"):
        return "optimizer step"
    if name == "backward" or name.endswith("Strategy.backward"):
        return "backward"
    if name.startswith("[pl][profile][Callback]"):  # "[Callback]EMA.on_train_batch_end" -> "callback EMA"
        return "callback " + name[23:].split(".")[0].split("{")[0]
    return "Lightning " + name[13:] if name.startswith("[pl][profile]") else None


def breakdown(events, steps: float, key: str = "cpu_time_total") -> dict[str, float]:
    """Seconds per optimizer step of each part, exclusive of the parts inside it (``other``: the rest of the window),
    in the profiler's host (CPU) or device time (``key``). Nested by time ranges: ``ProfilerStep`` cuts across
    Lightning's ranges, so the profiler's own tree is not used."""
    window = sum(getattr(e, key) for e in events if e.name.startswith("ProfilerStep"))
    chosen = [e for e in events if part_of(e.name)]
    chosen.sort(key=lambda e: (e.thread, e.time_range.start, -e.time_range.end))
    parts, stack = {}, []
    for e in chosen:
        while stack and (stack[-1].thread != e.thread or stack[-1].time_range.end <= e.time_range.start):
            stack.pop()
        name, outer = part_of(e.name), part_of(stack[-1].name) if stack else None
        stack.append(e)
        if outer != name:  # not a submodule of the same model, nor Lightning's wrapper of the same call
            parts[name] = parts.get(name, 0.0) + getattr(e, key)
            if outer is not None:
                parts[outer] -= getattr(e, key)
    parts["other"] = window - sum(parts.values())
    return {k: v / 1e6 / steps for k, v in sorted(parts.items(), key=lambda kv: -kv[1]) if v > 0}


def profile_plain(step, models, steps: int, device) -> dict:
    """The plain loop's breakdown: ``steps`` optimizer steps under torch.profiler, modules labelled as in Lightning's."""
    from pytorch_lightning.profilers.pytorch import RegisterRecordFunction

    with RegisterRecordFunction(models), torch.profiler.profile() as prof:  # CPU, and CUDA where there is one
        for _ in range(steps):
            step()
            sync(device)
            prof.step()
    return parts_by_clock(prof.events(), steps, device, "plain")


def parts_by_clock(events, steps: float, device, who: str) -> dict:
    clocks = {"host": "cpu_time_total"} | ({"device": "device_time_total"} if device.type == "cuda" else {})
    return {f"{who}, {clock} time": breakdown(events, steps, key) for clock, key in clocks.items()}


def count_flops(step, images: int, device) -> float:
    """FLOPs per image of one plain optimizer step (torch.utils.flop_counter: matmuls, convolutions, attention; on CPU
    attention runs PyTorch's math SDPA, whose matmuls the counter sees)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with sdpa_kernel([SDPBackend.MATH]) if device.type != "cuda" else nullcontext():
        with FlopCounterMode(display=False) as counter:
            step()
    return counter.get_total_flops() / images


@torch.no_grad()
def generation(module, unet, batch: int, resolution: int, sampling: dict, repeats: int = 2) -> float:
    """Images per second of a Stable Diffusion pipeline around ``unet`` (the teacher's other parts), after a warm-up."""
    from bksdm_lab.evaluation.sampling import set_scheduler
    from bksdm_lab.models.export import build_pipeline

    pipe = build_pipeline(module.teacher, unet)
    if unet.device.type == "cuda":
        pipe.to(dtype=torch.float16)
    set_scheduler(pipe, sampling["scheduler"])
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a photo of an astronaut riding a horse on mars"] * batch
    kw = dict(num_inference_steps=sampling["steps"], guidance_scale=sampling["guidance"], output_type="np")
    kw |= dict(height=resolution, width=resolution)
    pipe(prompts, **kw)
    sync(unet.device)
    start = time.perf_counter()
    for _ in range(repeats):
        pipe(prompts, **kw)
    sync(unet.device)
    return batch * repeats / (time.perf_counter() - start)


def synthetic_latents(out: Path, teacher: str, resolution: int, num: int) -> Path:
    """A complete latent cache (the layout ``python -m bksdm_lab.prepare`` writes) of random posteriors and token ids,
    so ``data=latents`` trains without images or a VAE. Written once per folder."""
    if not (out / "meta.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        g, shape = torch.Generator().manual_seed(0), (num, 4, resolution // 8, resolution // 8)
        shard = {"index": torch.arange(num), "input_ids": torch.randint(0, 514, (num, 77), generator=g)}
        shard |= {k: torch.randn(shape, generator=g).half() for k in ("mean", "mean_flip")}
        shard |= {k: (torch.rand(shape, generator=g) * 0.1).half() for k in ("std", "std_flip")}
        torch.save(shard, out / "shard-00000.pt")
        shards = [{"file": "shard-00000.pt", "rows": [0, num], "count": num, "batches": 1}]
        meta = dict(teacher=teacher, teacher_source=None, resolution=resolution, scaling_factor=0.18215, shards=shards)
        (out / "meta.json").write_text(json.dumps(meta | dict(num_rows=num, done=num, complete=True), indent=2))
    return out


def point_overrides(bcfg, point: list[str], out: Path, weights: str, source: str) -> list[str]:
    """The train overrides of one sweep point: the bench's ``train`` list, the point, the teacher's weights, the data."""
    overrides = [*map(str, bcfg.train), *point] + (["++teacher.weights=random"] if weights == "random" else [])
    if source == "latents":
        probe = compose_train([*overrides, "data=latents", "data.root=/synthetic", "paths.output_dir=/probe"])
        # a whole number of optimizer steps per epoch (Lightning also steps at an epoch's end)
        micro, asked = probe.data.batch_size, probe.trainer.accumulate_grad_batches
        per_step = micro * accumulation(probe.data.global_batch_size, micro, 1, asked)
        num, res = -(-int(bcfg.source_samples) // per_step) * per_step, int(probe.teacher.resolution)
        root = synthetic_latents(out / f"data/latents_{probe.teacher.name}_{res}px_{num}", probe.teacher.name, res, num)
        overrides += ["data=latents", f"data.root={root}"]
    return overrides


def bench_point(bcfg, overrides: list[str], run_dir: Path, sampling: dict) -> dict:
    """The framework, its breakdown, the plain loop, the FLOPs and generation at one sweep point."""
    start, clock, trainer = framework(overrides, run_dir / "framework", bcfg.warmup + bcfg.steps)
    module, accum, device = trainer.lightning_module, trainer.accumulate_grad_batches, trainer.strategy.root_device
    wall, cpu = slope(clock.steps, bcfg.warmup)
    marks = [("start", start), *clock.marks.items(), ("first optimizer step", clock.steps[0])]
    fw = {"step_s": wall, "step_cpu_s": cpu, "first_loss": clock.first_loss, "steps_trained": trainer.global_step}
    fw["startup_s"], fw["startup_cpu_s"] = (clock.steps[0][i] - start[i] for i in (0, 1))
    fw["startup_phases_s"] = {f"{a} -> {b}": [tb[0] - ta[0], tb[1] - ta[1]] for (a, ta), (b, tb) in pairwise(marks)}
    fw["peak_mem_gb"], fw["fast_path"] = clock.peak_gb, dict(map(str, kv) for kv in module.fast_path.items())
    fw["callbacks_loggers"] = [type(c).__name__ for c in [*trainer.callbacks, *trainer.loggers] if c is not clock]
    micro = int(trainer.datamodule.batch_size) if trainer.datamodule is not None else None
    res = int(module.run_config["teacher"]["resolution"])
    result = {"arch": module.run_config["arch"]["name"], "resolution": res, "micro_batch": micro, "accumulation": accum}
    result |= {"images_per_step": micro * accum, "images_per_s": micro * accum / wall, "framework": fw}
    if bcfg.gen_batch:
        result["generate"] = {
            who: {str(b): generation(module, unet, int(b), res, sampling) for b in bcfg.gen_batch}
            for who, unet in (("teacher", module.teacher_unet), ("student", module.student))
        }
    checkpointing = module.fast_path.get("gradient_checkpointing") is True
    del module, trainer, clock
    if bcfg.breakdown:
        steps = bcfg.warmup + bcfg.breakdown + 1
        _, _, profiled = framework(overrides, run_dir / "breakdown", steps, bcfg.breakdown, accum)
        events = profiled.profiler.function_events
        recorded = sum(e.name.startswith("ProfilerStep") for e in events) / accum
        result["breakdown"] = parts_by_clock(events, recorded, device, "framework")
        del profiled, events
    if bcfg.plain:
        train_cfg = compose_train([*overrides, f"paths.output_dir={run_dir / 'plain'}"])
        plain, step, models = run_plain(train_cfg, device, accum, checkpointing, bcfg)
        result |= {"plain": plain, "ratio": wall / plain["step_s"], "ratio_cpu_time": cpu / plain["step_cpu_s"]}
        result["first_loss_rel_diff"] = abs(fw["first_loss"] - plain["first_loss"]) / abs(plain["first_loss"])
        if bcfg.breakdown:
            result["breakdown"] |= profile_plain(step, models, bcfg.breakdown, device)
        if bcfg.flops:
            flops = {"per_image_gflop": count_flops(step, micro * accum, device) / 1e9}
            flops["achieved_tflops"] = flops["per_image_gflop"] * result["images_per_s"] / 1e3
            name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
            peak = bcfg.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
            if peak:
                flops |= {"peak_tflops": float(peak), "mfu": flops["achieved_tflops"] / float(peak)}
            result["flops"] = flops
    return result


def check(cfg, train_cfg: DictConfig) -> None:
    """One line per bad value, before anything is built."""
    problems = [f"{k}={cfg[k]!r} is not one of {list(v)}" for k, v in CHOICES.items() if cfg[k] not in v]
    problems += [f"{k}={cfg[k]!r} must be an integer >= {n}" for k, n in LOWEST.items() if not _at_least(cfg[k], n)]
    problems += [f"{k}={cfg[k]!r} must be a list, e.g. {k}=[...]" for k in LISTS if not OmegaConf.is_list(cfg[k])]
    if cfg.threads is not None and not _at_least(cfg.threads, 1):
        problems.append(f"threads={cfg.threads!r} must be null (torch's default) or an integer >= 1")
    if OmegaConf.is_list(cfg.gen_batch) and not all(_at_least(b, 1) for b in cfg.gen_batch):
        problems.append(f"gen_batch={list(cfg.gen_batch)!r} must hold integers >= 1 (or be [], no generation)")
    if cfg.gen_batch:
        from bksdm_lab.evaluation.sampling import sampling_problems

        problems += sampling_problems(cfg.sampling)
    precision, terms = str(train_cfg.trainer.precision), train_cfg.loss.terms
    options = [(terms.get(t) or {}).get(k, d) for t, k, d in PAPER_OPTIONS]
    if cfg.plain and precision not in PRECISIONS:
        problems.append(f"trainer.precision={precision!r}: the plain loop runs {', '.join(PRECISIONS)}")
    if cfg.plain and (set(terms) != {"task", "out_kd", "feat_kd"} or options != [d for *_, d in PAPER_OPTIONS]):
        problems.append("loss: the plain loop writes the paper's loss (loss=bksdm with its default options)")
    if problems:
        raise ValueError("; ".join(problems))


CHOICES = {"weights": ("auto", "random", "pretrained"), "source": ("auto", "config", "latents")}
LOWEST = {"steps": 2, "warmup": 1, "breakdown": 0, "source_samples": 1}
LISTS = ("train", "variants", "batch", "resolution", "gen_batch")
PAPER_OPTIONS = [("out_kd", "space", "output"), ("feat_kd", "at", "blocks"), ("feat_kd", "normalize", "none")]
PAPER_OPTIONS += [("feat_kd", "layer_weights", None)]


def _at_least(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def run(cfg, out: Path) -> dict:
    """The benchmark of ``cfg`` (conf/bench.yaml), its runs under ``out``: the numbers, also printed."""
    from bksdm_lab.evaluation.sampling import sampling_dict

    base = compose_train([*map(str, cfg.train), "paths.output_dir=/probe"])
    check(cfg, base)
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    demo = bool(base.teacher.get("build_if_missing"))
    weights = cfg.weights if cfg.weights != "auto" else ("pretrained" if demo else "random")
    named_data = any(str(o).startswith(("data=", "data.root=")) for o in cfg.train)
    source = cfg.source if cfg.source != "auto" else ("config" if demo or named_data else "latents")
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "load_average": list(os.getloadavg())}
    result |= {"train": list(map(str, cfg.train)), "weights": weights, "source": source, "points": []}
    result |= {k: cfg[k] for k in ("warmup", "steps", "breakdown")}
    sampling = sampling_dict(cfg.sampling)
    for arch, batch, res in product(cfg.variants, cfg.batch, cfg.resolution):
        point = [f"arch={arch}"] * (arch is not None) + [f"data.batch_size={batch}"] * (batch is not None)
        point += [f"teacher.resolution={res}"] * (res is not None)
        label = f"{arch or 'arch'}_b{batch or 'cfg'}_r{res or 'cfg'}"
        overrides = point_overrides(cfg, point, out, weights, source)
        result["points"].append({"overrides": overrides, **bench_point(cfg, overrides, out / label, sampling)})
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    result["load_average_end"] = list(os.getloadavg())
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    report(result)
    return result


COLUMNS = (  # the table: header,where in a point's results,format
    "arch,arch,<7 res,resolution,>5 micro,micro_batch,>6 accum,accumulation,>6 img/s,images_per_s,>8.1f "
    "step_s,framework.step_s,>8.3f plain_s,plain.step_s,>8.3f ratio,ratio,>7.3f CPU_ratio,ratio_cpu_time,>10.3f "
    "GFLOP/img,flops.per_image_gflop,>10.3f TFLOP/s,flops.achieved_tflops,>9.4f MFU,flops.mfu,>7.1% "
    "peak_GB,framework.peak_mem_gb,>8.1f"
)
COLUMNS = [c.split(",") for c in COLUMNS.split()]


def _cell(point: dict, where: str, spec: str) -> str:
    value = point
    for key in where.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return format(value, spec) if value is not None else format("-", spec.split(".")[0].rstrip("f"))


def report(r: dict) -> None:
    """The printed summary: a table over the sweep points, then per point the ratio, start-up, breakdown, generation."""
    print(
        f"\n{r['device']}, torch {r['torch']}, {r['threads']} thread(s), load average {r['load_average'][0]:.2f}; "
        f"weights {r['weights']}, data {r['source']}; {r['warmup']} warm-up + {r['steps']} timed optimizer steps"
    )
    print("".join(format(h, spec.split(".")[0].rstrip("f")) for h, _, spec in COLUMNS))
    for p in r["points"]:
        print("".join(_cell(p, where, spec) for _, where, spec in COLUMNS))
    for p in r["points"]:
        fw, plain = p["framework"], p.get("plain") or {}
        print(f"\n[{' '.join(p['overrides'])}]")
        if plain:
            ms = {k: f"{fw[k] * 1e3:.1f} vs {plain[k] * 1e3:.1f} ms" for k in ("step_s", "step_cpu_s")}
            print(
                f"framework/plain step: {p['ratio']:.3f} wall ({ms['step_s']}), {p['ratio_cpu_time']:.3f} CPU time "
                f"({ms['step_cpu_s']}); first loss {fw['first_loss']:.6g} vs {plain['first_loss']:.6g} (own draws)"
            )
        print(
            f"start-up to the end of the first step, wall (CPU): framework {fw['startup_s']:.2f} s ({fw['startup_cpu_s']:.2f}),"
            f" plain {plain.get('startup_s', nan):.2f} s ({plain.get('startup_cpu_s', nan):.2f}); framework: "
            + "; ".join(f"{k} {w:.2f} s ({c:.2f})" for k, (w, c) in fw["startup_phases_s"].items())
        )
        for who, parts in (p.get("breakdown") or {}).items():
            total = sum(parts.values())
            shown = "; ".join(f"{k} {v * 1e3:.1f} ({v / total:.0%})" for k, v in parts.items() if v >= 0.005 * total)
            print(f"breakdown, {who} (profiled), ms per optimizer step of {total * 1e3:.0f}: {shown}")
        for who, by_batch in (p.get("generate") or {}).items():
            print(f"generate {who}: " + ", ".join(f"batch {b}: {v:.2f} img/s" for b, v in by_batch.items()))


def bench(cfg: DictConfig) -> dict:
    out = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(cfg.out)
    result = run(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"bksdm_lab.bench: wrote {out / 'results.json'}")
    return result


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench")
def main(cfg: DictConfig) -> dict:
    from bksdm_lab.train import USER_ERRORS, start_process

    start_process()
    return guarded("bench", bench, cfg, (ValueError, *USER_ERRORS))  # a bad option value, a teacher or data


if __name__ == "__main__":
    check_group_choices("bench")
    main()
