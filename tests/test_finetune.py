"""python -m bksdm_lab.finetune: DreamBooth (LoRA and full) on the demo student, at 64 px, a few steps.

The LoRA weights load in plain diffusers and change the subject's image; the full run's pipeline loads and differs;
class images are generated once and reused; the before/after images, the W&B table and the loss terms are written;
a bad value is one line before anything loads; a stopped and resumed run ends where an uninterrupted one does.
"""

import contextlib
import csv
import io
import json
import math
import subprocess

import numpy as np
import pytest
import torch
from conftest import CONF, PYTHON, REPO, run_app, subprocess_env
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from PIL import Image
from safetensors.torch import load_file

from bksdm_lab import finetune
from bksdm_lab.evaluation import sampling as gen

PROMPTS = ["a photo of sks dog", "a photo of sks dog on the beach"]
SMALL = [
    "resolution=64",
    "prior.num_images=4",
    "prior.sampling.steps=2",
    "validation.steps=2",
    f"validation.prompts=[{','.join(PROMPTS)}]",
    "trainer.max_steps=4",
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "trainer.log_every_n_steps=1",
    "num_workers=0",
    "finetune.gradient_checkpointing=false",
    "offline=true",
]


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """Three photos of the "subject" (an orange disc on blue) and one corrupt file."""
    folder = tmp_path_factory.mktemp("subject")
    for i in range(3):
        image = Image.new("RGB", (80, 72), (30 * i, 90, 200))
        image.paste((230, 120, 30), (12 + 4 * i, 10, 60, 62))
        image.save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


@pytest.fixture(scope="module")
def class_cache(tmp_path_factory):
    """paths.cache_dir of these runs (the class images go there; the demo's own cache holds only the demo's)."""
    return tmp_path_factory.mktemp("finetune_cache")


def compose_cfg(run_dir, *overrides):
    """conf/finetune.yaml as `python -m bksdm_lab.finetune hydra.run.dir=<run_dir> <overrides>` composes it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="finetune", overrides=[f"hydra.run.dir={run_dir}", *overrides], return_hydra_config=True
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = cfg.hydra.run.dir
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def run(run_dir, *overrides) -> str:
    """The app in-process; returns what it printed."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            finetune.main(compose_cfg(run_dir, *overrides))
    finally:
        HydraConfig.instance().cfg = None
    return out.getvalue()


def common(demo_export_dir, subject, class_cache) -> list[str]:
    return [f"pipeline={demo_export_dir}", f"instance.dir={subject}", f"paths.cache_dir={class_cache}", *SMALL]


def class_images(class_cache) -> list:
    (folder,) = (class_cache / "class_images").iterdir()
    return sorted((folder / "images").glob("*.png"))


@pytest.fixture(scope="module")
def runs_cache(tmp_path_factory):
    """The cache of lora_run and full_run alone: the first of them generates the class images, the second reuses them."""
    return tmp_path_factory.mktemp("runs_cache")


@pytest.fixture(scope="module")
def lora_run(demo_export_dir, subject, runs_cache, tmp_path_factory):
    class_cache = runs_cache
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    out = run(run_dir, *common(demo_export_dir, subject, class_cache), "finetune.lr=1e-3", "logger=wandb_csv")
    mtimes = {p.name: p.stat().st_mtime_ns for p in class_images(class_cache)}
    return run_dir, out, mtimes


@pytest.fixture(scope="module")
def full_run(demo_export_dir, subject, runs_cache, lora_run, tmp_path_factory):
    class_cache = runs_cache
    run_dir = tmp_path_factory.mktemp("full") / "run"
    out = run(
        run_dir, *common(demo_export_dir, subject, class_cache), "finetune=full", "finetune.lr=1e-4", "logger=csv"
    )
    return run_dir, out


def generate(pipe, prompt: str, seed: int = 0) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    image = pipe(prompt, num_inference_steps=2, height=64, width=64, generator=generator).images[0]
    return np.asarray(image)


def plain_pipeline(folder):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)


def test_lora_weights_load_on_the_student_and_change_the_subject(lora_run, demo_export_dir):
    run_dir, out, _ = lora_run
    lora = run_dir / "lora"
    tensors = load_file(lora / "pytorch_lora_weights.safetensors")
    assert tensors and all(".lora" in k and k.startswith(("unet.", "text_encoder.")) for k in tensors)
    assert any(k.startswith("text_encoder.") for k in tensors)  # the text encoder's adapters (finetune=lora default)
    pipe = plain_pipeline(demo_export_dir)
    base = generate(pipe, PROMPTS[0])
    pipe.load_lora_weights(lora)
    tuned = generate(pipe, PROMPTS[0])
    assert not np.array_equal(base, tuned)
    # the loaded adapters (rank, alpha) are the trained ones: the image the run made after training, pixel for pixel
    assert np.array_equal(tuned, np.asarray(Image.open(run_dir / "validation" / "after" / "0.png")))
    card = (lora / "README.md").read_text()
    assert "load_lora_weights" in card and "instance_prompt: a photo of sks dog" in card and "rank 16, alpha 27" in card
    assert f"lora       {lora}" in out


def test_validation_images_before_and_after_and_the_wandb_table(lora_run):
    run_dir, _, _ = lora_run
    for i in range(len(PROMPTS)):
        before, after = (np.asarray(Image.open(run_dir / "validation" / w / f"{i}.png")) for w in ("before", "after"))
        assert before.shape == after.shape == (64, 64, 3) and not np.array_equal(before, after)
    (wandb_run,) = (run_dir / "wandb").glob("offline-run-*")
    (table,) = (wandb_run / "files" / "media" / "table" / "validation").glob("table_*.table.json")
    logged = json.loads(table.read_text())
    assert logged["columns"] == ["prompt", "before", "after"]
    assert [row[0] for row in logged["data"]] == PROMPTS and all(row[1] and row[2] for row in logged["data"])


def test_the_csv_has_the_loss_terms(lora_run):
    run_dir, _, _ = lora_run
    with (run_dir / "csv" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert len(rows) == 4
    for row in rows:
        loss, instance, prior = (float(row[k]) for k in ("train/loss", "train/loss_instance", "train/loss_prior"))
        assert math.isclose(loss, instance + 1.0 * prior, rel_tol=1e-5)  # prior.loss_weight=1


def test_a_corrupt_subject_image_is_skipped_and_counted(lora_run):
    _, out, _ = lora_run
    assert "subject images: 3 (1 corrupt skipped)" in out


def test_class_images_are_generated_once_then_reused(lora_run, full_run, runs_cache):
    _, lora_out, mtimes = lora_run
    _, full_out = full_run
    assert "class images: 4 generated, 0 reused" in lora_out
    assert "class images: 0 generated, 4 reused" in full_out
    assert {p.name: p.stat().st_mtime_ns for p in class_images(runs_cache)} == mtimes and len(mtimes) == 4


def test_a_full_run_exports_a_pipeline_that_loads_and_differs(full_run, demo_export_dir):
    run_dir, out = full_run
    tuned_pipe, base_pipe = plain_pipeline(run_dir / "pipeline"), plain_pipeline(demo_export_dir)
    assert not np.array_equal(generate(tuned_pipe, PROMPTS[0]), generate(base_pipe, PROMPTS[0]))
    for part in ("unet", "text_encoder"):  # both trained
        tuned, base = (getattr(p, part).state_dict() for p in (tuned_pipe, base_pipe))
        assert tuned.keys() == base.keys() and any(not torch.equal(tuned[k], base[k]) for k in base)
    card = (run_dir / "pipeline" / "README.md").read_text()
    assert "finetune=full" in card and "load_lora_weights" not in card
    assert not (run_dir / "lora").exists() and "pipeline" in out


# ---- one line before anything loads -------------------------------------------------------------------------------
@pytest.fixture()
def nothing_loads(monkeypatch):
    monkeypatch.setattr(gen, "load_pipeline", lambda *a, **k: pytest.fail("a pipeline was loaded"))


@pytest.mark.usefixtures("nothing_loads", "no_hydra_state_left")
@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("instance.dir={tmp}/nowhere", "instance.dir='{tmp}/nowhere' does not exist"),
        ("instance.dir={tmp}/empty", "instance.dir='{tmp}/empty' holds no images"),
        ("instance.prompt='a photo of a dog'", "instance.identifier='sks' is not a word of instance.prompt"),
        ("finetune.rank=0", "finetune.rank=0 is not a whole number >= 1"),
        ("finetune.text_encoder.rank=-2", "finetune.text_encoder.rank=-2 is not a whole number >= 1"),
        ("pipeline={tmp}/no_student", "pipeline='{tmp}/no_student': the folder"),
    ],
)
def test_a_bad_value_is_one_line_before_anything_loads(
    override, says, demo_export_dir, subject, class_cache, tmp_path, capsys, monkeypatch
):
    (tmp_path / "empty").mkdir()
    argv = [f"hydra.run.dir={tmp_path}/run", *common(demo_export_dir, subject, class_cache)]
    code, _, err = run_app(finetune.main, [*argv, override.format(tmp=tmp_path)], capsys, monkeypatch)
    assert code == 2
    assert err.strip().splitlines() == [f"bksdm_lab.finetune: error: {err.strip().partition('error: ')[2]}"]
    assert says.format(tmp=tmp_path) in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_unknown_mode_is_one_line(capsys):
    with pytest.raises(SystemExit) as stop:
        finetune.check_group_choices("finetune", ["finetune=foo"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == "bksdm_lab.finetune: error: finetune='foo' is not one of: full, lora\n"


def test_every_bad_value_is_named_at_once(tmp_path, subject):
    cfg = compose_cfg(
        tmp_path / "run",
        f"pipeline={tmp_path}/none",
        f"instance.dir={subject}",
        "instance.identifier=zwx",
        "finetune.alpha=0",
        "prior.num_images=0",
        "prior.sampling.steps=0",
        "resolution=60",
    )
    HydraConfig.instance().cfg = None
    problems = finetune.check_config(cfg)
    keys = ["pipeline=", "instance.identifier=", "finetune.alpha=", "prior.num_images=", "prior.sampling.steps=",
            "resolution="]  # fmt: skip
    assert len(problems) == len(keys) and all(any(p.startswith(k) for p in problems) for k in keys), problems


# ---- resume, the command line -------------------------------------------------------------------------------------
def test_a_stopped_run_resumed_ends_with_the_uninterrupted_weights(demo_export_dir, subject, class_cache, tmp_path):
    args = [*common(demo_export_dir, subject, class_cache), "finetune.lr=1e-3", "logger=csv", "validation.prompts=[]"]
    run(tmp_path / "straight", *args)
    run(tmp_path / "stopped", *args, "trainer.max_steps=2")
    first = load_file(tmp_path / "stopped" / "lora" / "pytorch_lora_weights.safetensors")
    out = run(tmp_path / "stopped", *args, "ckpt_path=last")
    assert "steps      4" in out
    straight, resumed = (
        load_file(tmp_path / r / "lora" / "pytorch_lora_weights.safetensors") for r in ("straight", "stopped")
    )
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert any(not torch.equal(first[k], resumed[k]) for k in first)  # the resumed run trained on
    with (tmp_path / "stopped" / "csv" / "metrics.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [0, 1, 2, 3]  # one metrics.csv, continued


@pytest.mark.slow
def test_the_command_line(demo_export_dir, subject, class_cache, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    args = [f"hydra.run.dir={run_dir}", *common(demo_export_dir, subject, class_cache), "logger=csv"]
    command = [PYTHON, "-m", "bksdm_lab.finetune"]
    env = subprocess_env(cache_dir)
    done = subprocess.run([*command, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file() and "fine-tuning finished" in done.stdout
    again = subprocess.run([*command, *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert again.returncode == 2 and "already holds a run" in again.stderr  # the run folder is guarded
    bad = subprocess.run([*command, "finetune=ful"], capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert (bad.returncode, bad.stderr) == (2, "bksdm_lab.finetune: error: finetune='ful' is not one of: full, lora\n")
