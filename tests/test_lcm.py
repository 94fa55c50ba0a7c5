"""Latent consistency distillation (experiment=lcm, lcm_lora) of the demo's exported student."""

import csv
import json
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import PYTHON, run_app, subprocess_env, train_in_process
from diffusers import LCMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from test_evaluate import TINY, ref_stats  # noqa: F401  (the fixture: the demo images' reference statistics)

from bksdm_lab import evaluate as evaluate_app
from bksdm_lab import train as train_app
from bksdm_lab.common.checkpoint import read_checkpoint
from bksdm_lab.distill.lcm import guidance_embedding, with_guidance_input


def lcm_args(export, run, *more) -> list[str]:
    """experiment=lcm of the demo export at its 64 px, on CPU: 6 steps of 8 images, a checkpoint every 2 steps."""
    return [
        "experiment=lcm",
        f"teacher.pretrained={export}",
        "teacher.resolution=64",
        "data=demo",
        "data.max_samples=32",
        "offline=true",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "trainer.max_steps=6",
        "trainer.log_every_n_steps=1",
        "module.step.gradient_checkpointing=false",
        "optimizer.lr=1e-3",
        "callbacks.samples.prompts=[]",
        "callbacks.checkpoint.every_n_train_steps=2",
        f"hydra.run.dir={run}",
        *more,
    ]


@pytest.fixture(scope="module")
def lcm_run(cache_dir, demo_export_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("lcm") / "run"
    train_in_process(cache_dir, run, *lcm_args(demo_export_dir, run)[:-1])
    return run


def generate(pipe, steps: int = 4, guidance: float = 8.0):
    generator = torch.Generator().manual_seed(0)
    kw = dict(num_inference_steps=steps, guidance_scale=guidance, height=64, width=64, output_type="np")
    return pipe("a red circle on a blue background", generator=generator, **kw).images


def test_the_export_generates_with_lcm_scheduler_in_4_steps_from_plain_diffusers(lcm_run, demo_export_dir):
    pipe = StableDiffusionPipeline.from_pretrained(lcm_run / "pipeline")
    assert isinstance(pipe.scheduler, LCMScheduler)
    assert pipe.scheduler.config.original_inference_steps == 50  # the solver it was distilled with
    assert pipe.unet.config.time_cond_proj_dim == 256  # the guidance input
    pipe.scheduler.set_timesteps(4)
    assert len(pipe.scheduler.timesteps) == 4
    image = generate(pipe)
    assert image.shape == (1, 64, 64, 3) and 0 < image.mean() < 1
    base = StableDiffusionPipeline.from_pretrained(demo_export_dir)
    base.scheduler = LCMScheduler.from_config(base.scheduler.config)
    assert not torch.equal(pipe.unet.conv_in.weight, base.unet.conv_in.weight)  # it trained
    card = (lcm_run / "pipeline" / "README.md").read_text()
    assert "latent consistency" in card and "LCMScheduler" in card
    assert "num_inference_steps=4, guidance_scale=8" in card


def test_its_loss_terms_are_logged(lcm_run):
    rows = list(csv.DictReader((lcm_run / "csv" / "metrics.csv").open()))
    logged = [row for row in rows if row.get("train/loss_consistency")]
    assert len(logged) == 6
    for row in logged:
        assert float(row["train/loss_consistency"]) == pytest.approx(float(row["train/loss"]))
        assert float(row["train/loss"]) > 0


def test_the_guidance_input_starts_as_the_unet_it_extends(demo_export_dir):
    unet = UNet2DConditionModel.from_pretrained(demo_export_dir, subfolder="unet").eval()
    conditioned = with_guidance_input(unet, 256).eval()
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([999, 19])
    cond = torch.randn(2, 8, unet.config.cross_attention_dim)
    w = guidance_embedding(torch.tensor([4.0, 11.0]), 256)
    with torch.no_grad():
        assert torch.equal(conditioned(x, t, cond, timestep_cond=w).sample, unet(x, t, cond).sample)
    reference = StableDiffusionPipeline.get_guidance_scale_embedding(None, torch.tensor([4.0, 11.0]), 256)
    assert torch.equal(w, reference)


@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("module.lcm.guidance=[9,2]", "module.lcm.guidance=[9, 2] must be [min, max] with 0 <= min <= max"),
        ("module.lcm.guidance_embedding=7", "module.lcm.guidance_embedding=7 must be null or an even integer >= 2"),
        ("module.lcm.ode_solver_steps=0", "module.lcm.ode_solver_steps=0 must be an integer in [1, 1000]"),
        ("loss.kind=l1", "loss.kind='l1' is not one of l2, huber"),
        ("module.lcm.init_from=/nonexistent/student", "module.lcm.init_from='/nonexistent/student': no U-Net config"),
    ],
)
def test_a_wrong_value_is_one_line_before_anything_loads(
    override, says, demo_export_dir, tmp_path, capsys, monkeypatch, no_hydra_state_left
):
    code, _, err = run_app(train_app.main, lcm_args(demo_export_dir, tmp_path / "run", override), capsys, monkeypatch)
    assert code == 2
    assert says in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_lcm_lora_rank_0_is_one_line(demo_export_dir, tmp_path, capsys, monkeypatch, no_hydra_state_left):
    args = lcm_args(demo_export_dir, tmp_path / "run", "module.lcm.lora.rank=0")
    code, _, err = run_app(train_app.main, ["experiment=lcm_lora", *args[1:]], capsys, monkeypatch)
    assert code == 2 and "module.lcm.lora.rank=0 must be a number > 0" in err and err.count("\n") == 1, err


@pytest.mark.slow
def test_a_killed_lcm_run_resumes_exactly(cache_dir, demo_export_dir, lcm_run, tmp_path):
    """kill -9 after the step-2 checkpoint, resume with ckpt_path=last: the weights of the uninterrupted run."""
    crashed = tmp_path / "crashed"
    args = lcm_args(demo_export_dir, crashed)
    proc = subprocess.Popen(
        [PYTHON, "-m", "bksdm_lab.train", *args],
        env=subprocess_env(cache_dir),
        cwd=tmp_path,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not all((crashed / "checkpoints" / name).exists() for name in ("step_000002.ckpt", "last.ckpt")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its step-2 checkpoint"
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it was killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    train_in_process(cache_dir, crashed, *args[:-1], "ckpt_path=last")
    a, b = (read_checkpoint(r / "checkpoints" / "last.ckpt") for r in (lcm_run, crashed))
    assert a["global_step"] == b["global_step"] == 6
    assert a["state_dict"].keys() == b["state_dict"].keys() and any(
        k.startswith("ema_student.") for k in a["state_dict"]
    )
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key


def test_lcm_lora_writes_adapters_that_load_onto_the_plain_student(cache_dir, demo_export_dir, tmp_path):
    run = tmp_path / "run"
    args = lcm_args(demo_export_dir, run, "trainer.max_steps=2")
    train_in_process(cache_dir, run, "experiment=lcm_lora", *args[1:-1])
    merged = StableDiffusionPipeline.from_pretrained(run / "pipeline")  # the adapters merged in
    assert isinstance(merged.scheduler, LCMScheduler) and merged.unet.config.time_cond_proj_dim is None
    base = StableDiffusionPipeline.from_pretrained(demo_export_dir)
    base.scheduler = LCMScheduler.from_config(base.scheduler.config)
    before = generate(base, guidance=1.0)
    base.load_lora_weights(run / "lora")
    after = generate(base, guidance=1.0)
    assert abs(after - before).max() > 1e-4  # the adapters change the student
    assert abs(after - generate(merged, guidance=1.0)).max() < 1e-4  # and are what the merged pipeline holds
    card = (run / "lora" / "README.md").read_text()
    assert 'pipe.load_lora_weights("path/to/this/folder")' in card and "LCMScheduler.from_config" in card


def test_evaluate_scores_the_lcm_student_with_sampling_lcm_at_4_steps(
    lcm_run, demo_data_dir, request, tmp_path, capsys, monkeypatch, no_hydra_state_left
):
    stats = request.getfixturevalue("ref_stats")
    out = tmp_path / "eval"
    args = [f"pipeline={lcm_run / 'pipeline'}", f"metadata={demo_data_dir / 'metadata.csv'}", "num_prompts=2"]
    args += ["sampling=lcm", "sampling.resolution=64", f"ref_stats={stats}", f"out={out}", *TINY]
    code, stdout, err = run_app(evaluate_app.main, args, capsys, monkeypatch)
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["generation"]["scheduler"] == "LCMScheduler" and results["generation"]["steps"] == 4
    assert results["generation"]["guidance"] == 8.0 and results["fid"] >= 0
