"""The benchmark runs end to end (numbers only, no timing assertions): demo-sized models on CPU."""

import json
import subprocess

from conftest import PYTHON, subprocess_env
from test_generate import compose

from bksdm_lab.tools.bench import run

SMOKE = ["teacher=demo", "variants=[tiny]", "batch=2", "steps=1", "warmup=0", "gen_batch=[1]", "device=cpu"]


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = run(compose("bench", [*SMOKE, "sampling.steps=2", f"json={out}"]))
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    tiny = result["train"]["tiny"]
    assert tiny["student_params"] == 1_476_484  # the demo teacher's Tiny student
    assert tiny["step_s"] > 0 and tiny["images_per_s"] > 0
    assert set(result["frozen_parts"]) == {"vae_encode_s", "text_encode_s", "teacher_unet_forward_s"}
    assert [r["batch"] for r in result["generate"]["tiny"]] == [1]
    assert result["sampling"] == {"scheduler": "pndm", "steps": 2, "guidance": 7.5}  # the sampling group's


def test_bench_command_writes_results_in_its_run_folder(cache_dir, tmp_path):
    out = tmp_path / "run"
    args = [*SMOKE, "gen_batch=[]", "cached=false", f"out={out}"]
    proc = subprocess.run(
        [PYTHON, "-m", "bksdm_lab.bench", *args],
        capture_output=True,
        text=True,
        env=subprocess_env(cache_dir),
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "frozen parts per micro-batch" in proc.stdout
    result = json.loads((out / "results.json").read_text())
    assert result["train"]["tiny"]["student_params"] == 1_476_484 and result["generate"] == {}
    assert (out / ".hydra" / "config.yaml").is_file()
