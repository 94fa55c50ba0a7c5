"""The benchmark runs end to end (numbers only, no timing assertions): demo-sized models on CPU."""

import json

from bksdm_lab.tools.bench import main


def test_bench_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = main(
        [
            "--teacher",
            "demo",
            "--arch",
            "tiny",
            "--batch",
            "2",
            "--steps",
            "1",
            "--warmup",
            "0",
            "--gen-batch",
            "1",
            "--gen-steps",
            "2",
            "--device",
            "cpu",
            "--json",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    tiny = result["train"]["tiny"]
    assert tiny["student_params"] == 1_476_484  # the demo teacher's Tiny student
    assert tiny["step_s"] > 0 and tiny["images_per_s"] > 0
    assert set(result["frozen_parts"]) == {"vae_encode_s", "text_encode_s", "teacher_unet_forward_s"}
    assert [r["batch"] for r in result["generate"]["tiny"]] == [1]
