"""Benchmark distillation steps and generation with randomly initialised models of the real shapes.

    python -m bksdm_lab.bench                                       # SD-v1.4 -> base/small/tiny, on CUDA if present
    python -m bksdm_lab.bench teacher=demo variants=[tiny] batch=4 steps=3  # the demo's tiny models (CPU smoke run)

Weights are random (speed does not depend on them), built from the shipped configs directly on the
device. For each variant it times one full distillation micro-step (VAE encode, text encode, teacher
forward, student forward + backward, AdamW step) under the recipe's precision, reports images/s and peak
memory, the cost of each frozen part alone, and text-to-image generation speed (the ``sampling`` group's
scheduler, steps and guidance: PNDM, 25, 7.5). :func:`run` takes the command's config (conf/bench.yaml), prints a
table and returns the numbers.
"""

from __future__ import annotations

import gc
import json
import time
from contextlib import nullcontext

import torch
from diffusers import AutoencoderKL, DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from omegaconf import OmegaConf
from transformers import CLIPTextConfig, CLIPTextModel

from bksdm_lab.distill.losses import FeatureKD, KDLoss, OutputKD, TaskLoss
from bksdm_lab.distill.module import DistillModule
from bksdm_lab.evaluation.sampling import sampling_dict, set_scheduler
from bksdm_lab.models.report import load_config
from bksdm_lab.models.students import count_params, init_student_from_teacher
from bksdm_lab.models.teachers import Teacher, shipped_configs
from bksdm_lab.tools.demo import byte_level_tokenizer


def random_teacher(configs: str, device: torch.device) -> Teacher:
    cfg = shipped_configs(configs)
    with device:
        unet = UNet2DConditionModel.from_config(cfg["unet"])
        vae = AutoencoderKL.from_config(cfg["vae"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    return Teacher(
        name=configs,
        source="random",
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=byte_level_tokenizer(),
        scheduler=PNDMScheduler.from_config(cfg["scheduler"]),
        noise_scheduler=DDPMScheduler.from_config(cfg["scheduler"]),
    )


def timed(fn, steps: int, warmup: int, device: torch.device) -> float:
    """Mean seconds per call after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync()
    return (time.perf_counter() - start) / steps


def bench_training(teacher: Teacher, arch: dict, cfg, device: torch.device, resolution: int) -> dict:
    student = init_student_from_teacher(teacher.unet, arch).to(device, torch.float32)
    loss = KDLoss(
        {"task": TaskLoss(), "out_kd": OutputKD(), "feat_kd": FeatureKD(arch["feature_pairs"])},
        {"task": 1.0, "out_kd": 1.0, "feat_kd": 1.0},
    )
    module = DistillModule(
        teacher, student, loss, optimizer=torch.optim.AdamW, gradient_checkpointing=cfg.gradient_checkpointing
    ).to(device)
    half = torch.float16 if device.type == "cuda" else None
    if half is not None:
        for part in (module.teacher_unet, module.vae, module.text_encoder):
            part.to(half)
    module.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=5e-5, weight_decay=0.01)
    scaler = torch.amp.GradScaler(device.type, enabled=half is not None)
    batch = {
        "pixel_values": torch.randn(cfg.batch, 3, resolution, resolution, device=device).clamp(-1, 1),
        "input_ids": torch.randint(0, 514, (cfg.batch, 77), device=device),
    }
    autocast = torch.autocast(device.type, dtype=half) if half is not None else nullcontext()

    latent = resolution // 8
    cached = {  # what data=latents yields: the posterior, not the pixels (the VAE is never run)
        "latent_mean": torch.randn(cfg.batch, 4, latent, latent, device=device),
        "latent_std": torch.rand(cfg.batch, 4, latent, latent, device=device) * 0.1,
        "input_ids": batch["input_ids"],
        "scaling_factor": torch.full((cfg.batch,), 0.18215, device=device),
    }
    current = batch

    def step():
        with autocast:
            total, _ = module.compute_loss(current)
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = timed(step, cfg.steps, cfg.warmup, device)
    out = {
        "student_params": count_params(student),
        "step_s": seconds,
        "images_per_s": cfg.batch / seconds,
        "peak_mem_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    }
    if cfg.cached:
        current = cached
        out["step_s_cached_latents"] = timed(step, cfg.steps, cfg.warmup, device)
        out["images_per_s_cached_latents"] = cfg.batch / out["step_s_cached_latents"]
    return out


@torch.no_grad()
def bench_frozen_parts(teacher: Teacher, cfg, device: torch.device, resolution: int) -> dict:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pixels = torch.randn(cfg.batch, 3, resolution, resolution, device=device, dtype=dtype)
    latent = resolution // 8
    noisy = torch.randn(cfg.batch, 4, latent, latent, device=device, dtype=dtype)
    ids = torch.randint(0, 514, (cfg.batch, 77), device=device)
    t = torch.randint(0, 1000, (cfg.batch,), device=device)
    cond = teacher.text_encoder.to(dtype)(ids)[0]
    vae, unet = teacher.vae.to(dtype), teacher.unet.to(dtype)
    return {
        "vae_encode_s": timed(lambda: vae.encode(pixels).latent_dist.sample(), cfg.steps, cfg.warmup, device),
        "text_encode_s": timed(lambda: teacher.text_encoder(ids)[0], cfg.steps, cfg.warmup, device),
        "teacher_unet_forward_s": timed(lambda: unet(noisy, t, cond).sample, cfg.steps, cfg.warmup, device),
    }


@torch.no_grad()
def bench_generation(
    teacher: Teacher, unet, cfg, device: torch.device, resolution: int, batch: int, sampling: dict
) -> dict:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    pipe = StableDiffusionPipeline(
        vae=teacher.vae.to(dtype),
        text_encoder=teacher.text_encoder.to(dtype),
        tokenizer=teacher.tokenizer,
        unet=unet.to(dtype),
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

    seconds = timed(generate, max(1, cfg.steps // 3), 1, device)
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


def run(cfg) -> dict:
    """The benchmark of ``cfg`` (conf/bench.yaml): the numbers, also printed as a table."""
    diffusers_logging.set_verbosity_error()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    names = [str(a) for a in cfg.variants]
    sampling = sampling_dict(cfg.sampling)
    _, archs = load_config([f"teacher={cfg.teacher.name}", f"variants=[{','.join(names)}]"])
    archs = {n: OmegaConf.to_container(a, resolve=True) for n, a in archs.items()}
    resolution = int(cfg.teacher.resolution)
    teacher = random_teacher(cfg.teacher.configs, device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {
        "device": gpu,
        "teacher": cfg.teacher.name,
        "resolution": resolution,
        "batch": cfg.batch,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "sampling": {k: sampling[k] for k in ("scheduler", "steps", "guidance")},
        "torch": torch.__version__,
        "train": {},
        "generate": {},
    }
    for workers in [int(w) for w in cfg.dataloader]:
        result.setdefault("dataloader", {})[workers] = bench_dataloader(workers, teacher.tokenizer)
        print("dataloader", workers, json.dumps(result["dataloader"][workers]), flush=True)
    result["frozen_parts"] = bench_frozen_parts(teacher, cfg, device, resolution)
    for name, arch in archs.items():
        result["train"][name] = bench_training(teacher, arch, cfg, device, resolution)
        gc.collect()  # free the last student and its optimizer state before the next
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(name, json.dumps(result["train"][name]), flush=True)
    gen_batches = [int(b) for b in cfg.gen_batch]
    for name in ["teacher", *names] if gen_batches else []:
        unet = teacher.unet if name == "teacher" else init_student_from_teacher(teacher.unet, archs[name])
        result["generate"][name] = [
            bench_generation(teacher, unet, cfg, device, resolution, b, sampling) for b in gen_batches
        ]
        print(name, json.dumps(result["generate"][name]), flush=True)

    print(
        f"\n{gpu}, teacher {cfg.teacher.name} ({resolution} px), micro-batch {cfg.batch}, "
        f"gradient checkpointing {'on' if cfg.gradient_checkpointing else 'off'}, torch {torch.__version__}"
    )
    fp = result["frozen_parts"]
    print(
        f"frozen parts per micro-batch: VAE encode {fp['vae_encode_s']:.3f} s, text encode "
        f"{fp['text_encode_s']:.3f} s, teacher U-Net forward {fp['teacher_unet_forward_s']:.3f} s"
    )
    for workers, r in result.get("dataloader", {}).items():
        print(
            f"dataloader, {workers} workers: {r['images_per_s']:.1f} img/s of 512 px JPEGs "
            f"({r['images_per_s_per_worker']:.1f} per worker)"
        )
    print(f"{'variant':<8}{'U-Net params':>15}{'step s':>9}{'img/s':>8}{'peak GB':>9}{'cached step s':>15}{'img/s':>8}")
    for name, r in result["train"].items():
        mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "-"
        cached = (
            f"{r['step_s_cached_latents']:>15.3f}{r['images_per_s_cached_latents']:>8.1f}"
            if "step_s_cached_latents" in r
            else ""
        )
        print(f"{name:<8}{r['student_params']:>15,}{r['step_s']:>9.3f}{r['images_per_s']:>8.1f}{mem:>9}{cached}")
    for name, runs in result["generate"].items():
        text = ", ".join(f"batch {r['batch']}: {r['images_per_s']:.2f} img/s" for r in runs)
        what = f"{sampling['steps']} {sampling['scheduler']} steps, guidance {sampling['guidance']}"
        print(f"generate {name:<8} ({what}): {text}")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(result, f, indent=2)
    return result
