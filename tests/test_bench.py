"""The benchmark runs the real training path on CPU with the demo's tiny models and a few steps (numbers are not
asserted, only their structure, their positivity, the step counts, and that the plain loop did the same work: the
same loss on the first micro-batch)."""

import json
import subprocess

import pytest
from conftest import CONF, PYTHON, subprocess_env

from bksdm_lab.bench import bench

# the demo's work (demo teacher, 64 px, tiny arch, micro-batch x 2 accumulation), smaller: micro-batch 2 on the
# 32-image test set, CSV logging, no sample images or export at the end (they are outside the timed window anyway)
TRAIN = ["experiment=demo", "data.batch_size=2", "logger=csv", "~callbacks.samples", "~callbacks.export"]


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="bench", overrides=overrides)


def train_list(demo_data_dir) -> str:
    items = [*TRAIN, f"data.root={demo_data_dir}", "data.synthetic.num_images=32"]
    return "train=[" + ",".join(f'"{o}"' for o in items) + "]"


def test_bench_times_framework_and_plain_loop_with_a_breakdown(
    demo_teacher_dir, demo_data_dir, cache_dir, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("BKSDM_CACHE_DIR", str(cache_dir))
    extra = tmp_path / "copy.json"
    cfg = compose(
        [
            train_list(demo_data_dir),
            "steps=2",
            "warmup=1",
            "gen_batch=[1]",
            "sampling.steps=2",
            f"out={tmp_path / 'run'}",
            f"json={extra}",
        ]
    )
    result = bench(cfg)
    out = capsys.readouterr().out

    assert json.loads((tmp_path / "run" / "results.json").read_text()) == json.loads(json.dumps(result))
    assert json.loads(extra.read_text()) == json.loads(json.dumps(result))
    assert (
        result["weights"] == "pretrained" and result["source"] == "config"
    )  # the demo teacher: loaded as train loads it
    [point] = result["points"]
    fw, plain = point["framework"], point["plain"]
    assert (point["arch"], point["resolution"], point["micro_batch"], point["accumulation"]) == ("tiny", 64, 2, 2)
    assert fw["steps_trained"] == plain["steps_trained"] == 3  # warm-up 1 + 2 timed optimizer steps
    assert fw["student_params"] == 1_476_484  # the demo teacher's Tiny student
    assert plain["interleaved"]  # on CPU the plain loop steps between the framework's steps (same load)
    assert {"EMA", "Throughput", "DataQuality", "ModelCheckpoint"} <= set(fw["callbacks"])
    for run in (fw, plain):
        assert run["step_s"] > 0 and run["step_cpu_s"] > 0 and run["startup_s"] > 0
    phases = fw["startup_phases_s"]  # where the framework's start-up goes: five phases that add up to it
    assert len(phases) == 5 and min(phases.values()) >= 0
    assert sum(phases.values()) == pytest.approx(fw["startup_s"])
    assert point["ratio"] > 0 and point["ratio_cpu_time"] > 0 and point["images_per_s"] > 0
    # the plain loop does the framework's work: same batch, draws, weights and loss on the first micro-batch
    assert point["first_loss_rel_diff"] < 1e-5, (fw["first_loss"], plain["first_loss"])

    parts = point["breakdown"]["parts"]
    for name in (
        "data wait",
        "VAE encode",
        "text encode",
        "teacher forward",
        "student forward",
        "backward",
        "optimizer (clip, step)",
        "callback EMA",
    ):
        assert parts[name] > 0, name
    assert point["ema_s"] == parts["callback EMA"]
    plain_parts = point["plain_breakdown"]["parts"]  # the plain loop's parts under the same names, for comparison
    assert {
        "VAE encode",
        "text encode",
        "teacher forward",
        "student forward",
        "backward",
        "optimizer (clip, step)",
        "data wait",
    } <= set(plain_parts) and min(plain_parts.values()) >= 0
    assert sum(parts.values()) == pytest.approx(point["breakdown"]["step_s"], rel=1e-6)  # 'other' closes the sum

    flops = point["flops"]["per_image_gflop_by_part"]
    assert set(flops) == {"VAE encode", "text encode", "student forward", "teacher forward", "student backward"}
    assert flops["teacher forward"] > flops["student forward"] > 0  # the student is the teacher minus blocks
    assert 1.5 < flops["student backward"] / flops["student forward"] < 2.2  # input and weight gradients
    assert point["flops"]["per_image_gflop"] == pytest.approx(sum(flops.values()))

    assert set(result["frozen_parts"]) == {"vae_encode_s", "text_encode_s", "teacher_unet_forward_s"}
    assert [r["batch"] for r in result["generate"]["tiny"]] == [1]
    assert result["sampling"] == {"scheduler": "pndm", "steps": 2, "guidance": 7.5}  # the bench's sampling group
    for line in ("framework/plain step time: ", "EMA update: ", "step-time breakdown", "counted GFLOP per image: "):
        assert line in out, line


def test_bench_bad_value_is_one_line_before_any_work(tmp_path):
    with pytest.raises(ValueError, match=r"^weights='bogus' is not one of \['auto', 'random', 'pretrained'\]$"):
        bench(compose(["weights=bogus", f"out={tmp_path / 'run'}"]))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_bench_command_prints_the_ratio_and_writes_results(demo_teacher_dir, demo_data_dir, cache_dir, tmp_path):
    out = tmp_path / "run"
    args = [
        train_list(demo_data_dir),
        "steps=1",
        "warmup=1",
        "breakdown=false",
        "flops=false",
        "frozen_parts=false",
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
    assert "framework/plain step time: " in proc.stdout
    result = json.loads((out / "results.json").read_text())
    assert result["points"][0]["framework"]["steps_trained"] == 2 and "generate" not in result
    assert (out / ".hydra" / "config.yaml").is_file()
