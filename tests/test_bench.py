"""The benchmark runs the real training path and the plain loop on CPU with the demo's tiny models and a few steps
(numbers are not asserted, only their structure and sanity: step counts, positive times, a breakdown that names the
model parts, FLOPs of the student below the teacher's, first losses of the same size)."""

import json
import subprocess

import pytest
from conftest import CONF, PYTHON, run_app, subprocess_env

from bksdm_lab.bench import bench

# the demo's work (demo teacher, 64 px, tiny arch, micro-batch x 2 accumulation), smaller: micro-batch 2 on the
# 32-image test set, CSV logging, no sample images or export at the end (they are outside the timed steps anyway)
TRAIN = ["experiment=demo", "data.batch_size=2", "logger=csv", "~callbacks.samples", "~callbacks.export"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="bench", overrides=overrides)


def train_list(demo_data_dir) -> str:
    items = [*TRAIN, f"data.root={demo_data_dir}", "data.synthetic.num_images=32"]
    return "train=[" + ",".join(f'"{o}"' for o in items) + "]"


def test_bench_times_framework_and_plain_loop(
    demo_teacher_dir, demo_data_dir, cache_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("BKSDM_CACHE_DIR", str(cache_dir))
    run = [train_list(demo_data_dir), "steps=2", "warmup=1", "breakdown=1", "gen_batch=[1]", "sampling.steps=2"]
    result = bench(compose([*run, f"out={tmp_path / 'run'}"]))
    out = capsys.readouterr().out

    assert json.loads((tmp_path / "run" / "results.json").read_text()) == json.loads(json.dumps(result))
    assert (result["weights"], result["source"]) == ("pretrained", "config")  # the demo teacher, loaded as train does
    [point] = result["points"]
    fw, plain = point["framework"], point["plain"]
    assert (point["arch"], point["resolution"], point["micro_batch"], point["accumulation"]) == ("tiny", 64, 2, 2)
    assert fw["steps_trained"] == plain["steps_trained"] == 3  # warm-up 1 + 2 timed optimizer steps
    assert {"EMA", "Throughput", "DataQuality", "ModelCheckpoint", "CSVLogger"} <= set(fw["callbacks_loggers"])
    for loop in (fw, plain):
        assert loop["step_s"] > 0 and loop["step_cpu_s"] > 0 and loop["startup_s"] > loop["startup_cpu_s"] / 2 > 0
    phases = fw["startup_phases_s"]  # where the framework's start-up goes: phases that add up to it
    assert len(phases) == 5 and sum(w for w, _ in phases.values()) == pytest.approx(fw["startup_s"])
    assert point["ratio"] > 0 and point["ratio_cpu_time"] > 0 and point["images_per_s"] > 0
    # the same loss terms on the same models and data, each loop with its own draws of noise and timesteps
    assert point["first_loss_rel_diff"] < 0.25, (fw["first_loss"], plain["first_loss"])

    models = {"teacher forward", "student forward", "VAE encode", "text encode", "backward"}
    assert models <= set(point["breakdown"]["framework, host time"]) and models <= set(
        point["breakdown"]["plain, host time"]
    )
    assert any(k.startswith("Lightning ") for k in point["breakdown"]["framework, host time"])  # its own hooks
    assert 0.1 < point["flops"]["per_image_gflop"] < 1.0  # the demo's models: about 0.36 GFLOP an image
    assert set(point["generate"]) == {"teacher", "student"} and point["generate"]["student"]["1"] > 0
    for line in (
        "framework/plain step: ",
        "start-up to the end of the first step",
        "breakdown, framework",
        "tiny      64",
    ):
        assert line in out, line


def test_bench_bad_values_are_one_line_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"^weights='bogus' is not one of \['auto', 'random', 'pretrained'\]; steps=1"):
        bench(compose(["weights=bogus", "steps=1", f"out={tmp_path / 'run'}"]))
    with pytest.raises(ValueError, match=r"^loss: the plain loop writes the paper's loss"):
        bench(compose(['train=["loss.terms.feat_kd.normalize=teacher"]', f"out={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()


def test_bench_bad_threads_is_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    from bksdm_lab.bench import main

    code, _, err = run_app(main, ["threads=-1", "gen_batch=[]", f"out={tmp_path / 'run'}"], capsys, monkeypatch)
    assert code == 2 and "Traceback" not in err
    assert err.strip() == "bksdm_lab.bench: error: threads=-1 must be null (torch's default) or an integer >= 1"
    assert not (tmp_path / "run" / "results.json").exists()


def test_random_teacher_has_the_real_shapes_and_needs_no_download():
    from omegaconf import OmegaConf

    from bksdm_lab.models.teachers import TeacherLoadError, load_teacher, probe_teacher

    cfg = OmegaConf.load(CONF / "teacher" / "demo.yaml")
    cfg.pretrained, cfg.weights = "/nowhere", "random"
    probe_teacher(cfg)  # nothing to find
    first, again = load_teacher(cfg, load_vae=False), load_teacher(cfg)
    assert first.vae is None and first.ensure_vae() is not None  # on demand, as for cached latents
    assert first.unet.config.block_out_channels == again.unet.config.block_out_channels
    assert all((a == b).all() for a, b in zip(first.unet.parameters(), again.unet.parameters()))  # the same weights
    cfg.weights = "zero"
    with pytest.raises(TeacherLoadError, match=r"^teacher.weights='zero' is not one of pretrained, random$"):
        probe_teacher(cfg)


@pytest.mark.slow
def test_bench_command_writes_results(demo_teacher_dir, demo_data_dir, cache_dir, tmp_path):
    out = tmp_path / "run"
    args = [
        train_list(demo_data_dir),
        "steps=2",
        "warmup=1",
        "breakdown=0",
        "flops=false",
        "gen_batch=[]",
        f"out={out}",
    ]
    proc = subprocess.run(
        [PYTHON, "-m", "bksdm_lab.bench", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(cache_dir),
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "framework/plain step: " in proc.stdout
    result = json.loads((out / "results.json").read_text())
    assert result["points"][0]["framework"]["steps_trained"] == 3 and "generate" not in result["points"][0]
    assert (out / ".hydra" / "config.yaml").is_file()
