"""`python -m bksdm_lab.train`: the demo, a multirun and one error case as real processes (slow), the other error
cases in-process."""

import csv
import json
import subprocess
from pathlib import Path

import pytest
import wandb_offline
from conftest import PYTHON, run_app, subprocess_env

from bksdm_lab.common.checkpoint import read_checkpoint


def run_train(args, cache_dir, cwd, check=True):
    proc = subprocess.run(
        [PYTHON, "-m", "bksdm_lab.train", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=subprocess_env(cache_dir),
        timeout=900,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}")
    return proc


def losses(metrics_csv: Path, key: str = "train/loss") -> list[float]:
    with metrics_csv.open() as f:
        return [float(r[key]) for r in csv.DictReader(f) if r.get(key)]


@pytest.fixture(scope="module")
def demo_run(cache_dir, tmp_path_factory):
    """The demo exactly as the README gives it (plus where to put the run)."""
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    proc = run_train(["experiment=demo", f"hydra.run.dir={run_dir}"], cache_dir, cwd=tmp_path_factory.mktemp("cwd"))
    return run_dir, proc


@pytest.mark.slow
def test_demo_writes_everything_and_learns(demo_run):
    run_dir, proc = demo_run
    for key in ("run_dir", "checkpoint", "csv", "wandb", "pipeline"):
        assert f"  {key} " in proc.stdout, proc.stdout[-2000:]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "pipeline" / "model_index.json").is_file()
    assert (run_dir / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert sorted(p.name for p in (run_dir / "samples").iterdir()) == [
        "ema_step000100",
        "ema_step000200",
        "student_step000100",
        "student_step000200",
        "teacher_step000000",
    ]
    assert len(list((run_dir / "samples" / "student_step000200").glob("*.png"))) == 2

    metrics = run_dir / "csv" / "metrics.csv"
    total = losses(metrics)
    assert len(total) >= 30
    assert sum(total[-5:]) / 5 < 0.9 * sum(total[:5]) / 5, total
    for part in ("task", "out_kd", "feat_kd"):
        assert len(losses(metrics, f"train/loss_{part}")) == len(total)


@pytest.mark.slow
def test_demo_checkpoint_holds_only_the_student(demo_run):
    run_dir, _ = demo_run
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    keys = list(ckpt["state_dict"])
    student = [k for k in keys if k.startswith("student.")]
    assert student and sorted(keys) == sorted(student + [f"ema_{k}" for k in student])  # student + its EMA only
    assert ckpt["bksdm"]["config"]["teacher"]["name"] == "demo" and ckpt["bksdm"]["ema"] is True
    assert ckpt["global_step"] == 200
    assert "optimizer_states" in ckpt


@pytest.mark.slow
def test_demo_trains_on_its_own_256_images(demo_run, cache_dir):
    """The README's demo, whatever ran before it in this session: its own synthetic set, not a test's."""
    run_dir, _ = demo_run
    readme = json.loads((cache_dir / "demo" / "data" / "README.json").read_text())
    assert (readme["num_images"], readme["size"], readme["seed"]) == (256, 80, 0)
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    config = ckpt["bksdm"]["config"]  # the run's resolved config
    assert config["data"]["root"] == str(cache_dir / "demo" / "data")
    # 200 steps of 8 x 2 images over the 256 (less any held out for validation): 12.5 epochs, not 100 of 32 images
    per_step = config["data"]["batch_size"] * config["trainer"]["accumulate_grad_batches"]
    trained_on = 256 - (config["data"].get("val_samples") or 0)
    assert ckpt["global_step"] == 200 and ckpt["epoch"] == 200 * per_step // trained_on


@pytest.mark.slow
def test_demo_wandb_offline_run(demo_run):
    run_dir, _ = demo_run
    (wandb_run,) = list((run_dir / "wandb").glob("offline-run-*"))
    (run_file,) = list(wandb_run.glob("run-*.wandb"))
    rows = wandb_offline.history(run_file)
    for key in (
        "train/loss",
        "train/loss_task",
        "train/loss_out_kd",
        "train/loss_feat_kd",
        "train/lr",
        "train/grad_norm",
        "perf/images_per_s",
        "perf/step_time_s",
        "perf/peak_mem_gb",
    ):
        values = [r[key] for r in rows if key in r]
        assert len(values) >= 30 and all(isinstance(v, (int, float)) and v >= 0 for v in values), key
    assert max(r.get("trainer/global_step", 0) for r in rows) >= 199
    panels = {k.split("/")[1]: r for r in rows for k in r if k.startswith("samples/") and r[k] == "images/separated"}
    assert set(panels) == {"teacher", "student", "ema"}
    for who, row in panels.items():
        files = row[f"samples/{who}/filenames"]
        assert row[f"samples/{who}/captions"] == [
            "a red circle on a blue background",
            "a yellow square on a black background",
        ]
        assert all((wandb_run / "files" / f).is_file() for f in files)
    tables = [r for r in rows if r.get("samples/table/_type") == "table-file"]
    assert [r["trainer/global_step"] for r in tables] == [100, 200]
    assert all(r["samples/table/ncols"] == 6 and r["samples/table/nrows"] == 2 for r in tables)
    table = json.loads((wandb_run / "files" / tables[-1]["samples/table/path"]).read_text())
    assert table["columns"] == ["step", "prompt", "seed", "teacher", "student", "ema"]
    assert [row[1] for row in table["data"]] == [
        "a red circle on a blue background",
        "a yellow square on a black background",
    ]
    (artifact,) = {
        r.artifact.name: r.artifact for r in wandb_offline.records(run_file) if r.HasField("artifact")
    }.values()
    assert sum(e.path.endswith(".png") for e in artifact.manifest.contents) == 6  # 3 models x 2 prompts
    config = wandb_offline.config(run_file)
    assert config["params/student_unet"] < config["params/teacher_unet"]
    assert "mid_block" in config["removed_blocks"]
    assert config["config"]["optimizer"]["lr"] == 1e-3


PLAIN_DIFFUSERS = """
import sys, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
image = pipe("a red circle on a blue background", num_inference_steps=3,
             generator=torch.Generator().manual_seed(0)).images[0]
assert not any(m.startswith("bksdm_lab") for m in sys.modules)
print(image.size, sum(p.numel() for p in pipe.unet.parameters()), pipe.unet.config.block_out_channels)
"""


@pytest.mark.slow
def test_exported_pipeline_loads_in_plain_diffusers(demo_run, cache_dir):
    run_dir, _ = demo_run
    env = subprocess_env(cache_dir)
    env.pop("PYTHONPATH")
    out = subprocess.run(
        [PYTHON, "-c", PLAIN_DIFFUSERS, str(run_dir / "pipeline")],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        check=True,
    ).stdout
    # tiny student of the demo teacher: three stages, no mid block
    assert out.strip().startswith("(64, 64)"), out
    assert out.strip().endswith("[32, 64, 64]"), out


@pytest.mark.slow
def test_multirun_one_wandb_run_per_job(cache_dir, tmp_path):
    sweep = tmp_path / "sweep"
    run_train(
        [
            "-m",
            "experiment=demo",
            "arch=base,small,tiny",
            "trainer.max_steps=2",
            "callbacks.samples.prompts=[]",
            f"hydra.sweep.dir={sweep}",
        ],
        cache_dir,
        cwd=tmp_path,
    )
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and (p / "wandb").is_dir())
    assert [p.name.split(",")[0] for p in jobs] == ["0_arch=base", "1_arch=small", "2_arch=tiny"]
    names = []
    for job, arch in zip(jobs, ("base", "small", "tiny")):
        (run_file,) = list((job / "wandb").glob("offline-run-*/run-*.wandb"))
        (run,) = [r.run for r in wandb_offline.records(run_file) if r.HasField("run")]
        names.append(run.display_name)
        assert run.run_group == "demo"
        assert f"arch={arch}" in run.display_name
        assert wandb_offline.config(run_file)["arch"] == arch
        assert (job / "pipeline" / "unet" / "config.json").is_file()
    assert len(set(names)) == 3


# ---- bad inputs: one line each, exit 2, before anything heavy loads (in-process: the app on a composed config) ---
def train_error(cfg, capsys) -> str:
    from bksdm_lab import train as train_app

    with pytest.raises(SystemExit) as exc:
        train_app.main(cfg)  # hydra.main passes a composed config straight through
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("bksdm_lab.train: error: ") and "Traceback" not in err, err
    return err


def test_paper_recipe_without_hub_fails_fast_and_clearly(compose_train, demo_data_dir, capsys):
    err = train_error(compose_train("arch=tiny", f"data.root={demo_data_dir}"), capsys)
    assert "Teacher 'sd14'" in err and "CompVis/stable-diffusion-v1-4" in err
    assert "teacher.pretrained=" in err and "experiment=demo" in err


def test_missing_data_folder_is_named(compose_train, demo_teacher_dir, tmp_path, capsys):
    err = train_error(compose_train("teacher=demo", f"data.root={tmp_path}/nope"), capsys)
    assert f"data.root='{tmp_path}/nope' does not exist" in err
    assert "Teacher" not in err  # the demo teacher is fine: only the real problem is reported


def test_missing_local_teacher_and_data_reported_together(compose_train, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # data.root is relative to the working dir
    monkeypatch.delenv("BKSDM_DATA_DIR", raising=False)
    err = train_error(compose_train(f"teacher.pretrained={tmp_path}/no_teacher"), capsys)
    assert f"local folder {tmp_path}/no_teacher does not exist" in err
    assert "data.root='data/preprocessed_212k' does not exist" in err


def test_unknown_arch_lists_the_valid_ones(monkeypatch, capsys):
    """The command line's own path (sys.argv through hydra.main), in-process."""
    from bksdm_lab import train as train_app

    code, _, err = run_app(train_app.main, ["arch=huge"], capsys, monkeypatch)
    assert code == 1
    assert "Could not find 'arch/huge'" in err
    for name in ("base", "small", "tiny"):
        assert f"\t{name}\n" in err


@pytest.mark.slow
def test_cli_error_exit_2_one_line_per_problem(cache_dir, tmp_path):
    """The real `python -m bksdm_lab.train` on two missing inputs: exit 2, each problem on its own line, no traceback,
    nothing written but Hydra's record of the run."""
    proc = run_train(
        [f"teacher.pretrained={tmp_path}/no_teacher", f"hydra.run.dir={tmp_path}/run"], cache_dir, tmp_path, check=False
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("bksdm_lab.train: error: "))
    problems = [lines[first].removeprefix("bksdm_lab.train: error: "), *lines[first + 1 :]]
    assert len(problems) == 2, problems  # in either order, one line each
    assert sum(f"local folder {tmp_path}/no_teacher does not exist" in p for p in problems) == 1, problems
    assert sum(p.startswith("data.root='data/preprocessed_212k' does not exist") for p in problems) == 1, problems
    assert not (tmp_path / "run" / "checkpoints").exists()
