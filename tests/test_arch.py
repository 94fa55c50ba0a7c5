"""The architecture report: exact sizes, MACs and removed blocks, offline on the meta device."""

import json
import runpy
import subprocess
import sys

import pytest
from conftest import PYTHON, REPO, subprocess_env

from bksdm_lab.models.report import describe, format_table, load_config

# (U-Net params, whole params, MACs the paper's way in G, MACs with attention in G), from the BK-SDM paper / diffusers configs
V1 = {
    "teacher": (859_520_964, 1_032_071_623, 338.7, 401.6),
    "base": (579_384_964, 751_935_623, 223.8, 261.5),
    "small": (482_346_884, 654_897_543, 217.7, 255.5),
    "tiny": (323_384_964, 495_935_623, 205.0, 242.8),
}
V2_UNET = {"teacher": 865_910_724, "base": 583_480_964, "small": 485_787_524, "tiny": 326_825_604}


@pytest.fixture(scope="module")
def v1_report():
    cfg, archs = load_config([])
    return describe(cfg.teacher, archs)


@pytest.mark.parametrize("name", list(V1))
def test_v1_numbers(v1_report, name):
    unet, whole, macs, macs_attn = V1[name]
    m = v1_report["models"][name]
    assert m["unet_params"] == unet
    assert m["whole_params"] == whole
    assert m["macs"] / 1e9 == pytest.approx(macs, abs=0.1)
    assert m["macs_with_attention"] / 1e9 == pytest.approx(macs_attn, abs=0.1)


def test_v1_removed_blocks(v1_report):
    models = v1_report["models"]
    assert models["base"]["removed"]["down_blocks.0"] == ["resnets.1", "attentions.1"]
    assert "mid_block" not in models["base"]["removed"]
    assert models["small"]["removed"]["mid_block"] == ["all"]
    tiny = models["tiny"]["removed"]
    assert tiny["up_blocks.0"] == ["resnets.0", "resnets.1", "resnets.2", "upsamplers.0"]
    assert tiny["down_blocks.3"] == ["resnets.0", "resnets.1"]
    assert tiny["down_blocks.2"] == ["resnets.1", "attentions.1", "downsamplers.0"]
    assert models["teacher"]["removed"] == {}
    text = format_table(v1_report)
    assert "323,384,964" in text and "down_blocks.3" in text and "(  8x8  )" in text


def test_v2_unet_params():
    cfg, archs = load_config(["teacher=sd21base"])
    report = describe(cfg.teacher, archs)["models"]
    assert {k: v["unet_params"] for k, v in report.items()} == V2_UNET
    assert report["teacher"]["text_encoder_params"] == 340_387_840


def test_json_keyed_by_variant(capsys):
    from test_generate import compose

    from bksdm_lab import arch

    report = json.loads(arch.run(compose("arch", ["teacher=sd21", "format=json"])))
    assert list(report) == ["teacher", "base", "small", "tiny"]
    assert report["tiny"]["unet_params"] == V2_UNET["tiny"]
    assert report["teacher"]["config"]["block_out_channels"] == [320, 640, 1280, 1280]


@pytest.mark.usefixtures("no_hydra_state_left")
def test_cli_table_and_bad_format(monkeypatch, capsys):
    env = subprocess_env(REPO / ".pytest_cache")
    table = subprocess.run(
        [PYTHON, "-m", "bksdm_lab.arch"], capture_output=True, text=True, check=True, cwd=REPO, env=env
    )
    assert "BK-SDM-Tiny [tiny]" in table.stdout and "859,520,964" in table.stdout
    monkeypatch.setattr(sys, "argv", ["bksdm_lab/arch.py", "format=xml"])  # the same command line, in-process
    with pytest.raises(SystemExit) as stop:
        runpy.run_module("bksdm_lab.arch", run_name="__main__", alter_sys=False)
    assert stop.value.code == 2 and "table, json" in capsys.readouterr().err


def test_app_in_process(capsys):
    """The Hydra app's function on a composed config (the variants are composed inside it)."""
    from test_generate import compose

    from bksdm_lab import arch

    text = arch.run(compose("arch", ["teacher=demo", "variants=[tiny]", "format=json"]))
    assert list(json.loads(text)) == ["teacher", "tiny"] and text in capsys.readouterr().out


# ---- keep patterns: reported side by side, refused clearly, trained end to end ------------------------------------
EXAMPLE_UP = "[[0,2],[0,2],[0,1,2],[0,2]]"


def test_patterns_side_by_side_in_one_report(monkeypatch):
    from test_generate import compose

    from bksdm_lab.models import report as report_mod
    from bksdm_lab.models.report import describe, resolve_arch

    monkeypatch.setattr(report_mod, "unet_macs", lambda unet: (0, 0))  # MACs are pinned above; this is about patterns

    patterns = f"patterns=[{{up: {EXAMPLE_UP}}}, {{name: lean, down: [[1],[0],[0,1],null], mid: false}}]"
    cfg, archs = load_config(["teacher=demo", "variants=[tiny]", patterns])
    result = describe(cfg.teacher, {n: resolve_arch(a, cfg.teacher) for n, a in archs.items()})
    report = result["models"]
    assert list(report) == ["teacher", "tiny", "p1", "lean"]
    assert report["p1"]["unet_params"] == 2_524_740 and report["lean"]["unet_params"] == 1_861_188
    assert report["p1"]["keep"] == {
        "down": [[0], [0, 1], [0], [0]],
        "up": [[0, 2], [0, 2], [0, 1, 2], [0, 2]],
        "mid": True,
    }
    assert report["lean"]["keep"]["up"] == [None, [0, 1, 2], [0, 2], [0, 2]]  # derived: first m + the last
    assert report["lean"]["removed"]["down_blocks.0"] == ["resnets.0", "attentions.0"]
    table = format_table(result)
    assert "keep pattern [lean]" in table and "1,861,188" in table
    assert "  lean    1 | 0 | 0,1 | -" in table and "  tiny    0 | 0 | 0 | -" in table
    assert compose("arch", [patterns]).patterns[1].name == "lean"  # the command line's syntax


def test_bad_pattern_in_the_report_names_its_key():
    from test_generate import compose

    from bksdm_lab.models.report import ReportError, load_archs, pattern_archs

    cfg = compose("arch", ["teacher=demo", "variants=[]", "patterns=[{up: [[0,2],[0,2],[0,2]]}]"])
    with pytest.raises(ReportError, match=r"^patterns\.0\.up has 3 stages but the teacher has 4"):
        pattern_archs(cfg.patterns, teacher=cfg.teacher)
    with pytest.raises(ReportError, match=r"^patterns\.0\.upp is not a pattern key"):
        pattern_archs([{"upp": []}], teacher=cfg.teacher)
    assert list(load_archs(["keep"])) == ["keep"]  # keep itself is reported when named


def test_bad_keep_pattern_stops_train_before_loading(compose_train, capsys, monkeypatch):
    from bksdm_lab import train as train_app

    def never(*_a, **_k):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(train_app, "load_teacher", never)
    monkeypatch.setattr(train_app, "probe_teacher", never)
    cfg = compose_train("experiment=demo", "arch=keep", "arch.keep.up=[[0,2],[0,2],[0,1],[0,2]]")
    with pytest.raises(SystemExit) as info:
        train_app.main(cfg)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("bksdm_lab.train: error: arch.keep.up.2=[0, 1]: student up_blocks.2.resnets.1 cannot copy")


def test_a_resume_compares_the_student_a_keep_pattern_derives_not_its_spelling(compose_train, tmp_path):
    """base's pattern given by its down stages (up derived) resumes a run of it given by its up stages (down derived);
    one layer off is another student."""
    import torch

    from bksdm_lab.distill.checks import check_resume

    ckpt = tmp_path / "keep.ckpt"
    saved = {"down": None, "up": [[0, 2], [0, 2], [0, 2], [0, 2]], "mid": True}
    torch.save(
        {"state_dict": {}, "global_step": 2, "bksdm": {"config": {"arch": {"name": "keep", "keep": saved}}}}, ckpt
    )
    same = compose_train("experiment=demo", "arch=keep", "arch.keep.down=[[0],[0],[0],[0]]")
    assert check_resume(same, ckpt) == []
    other = compose_train("experiment=demo", "arch=keep", "arch.keep.up=[[0,2],[0,2],[0,2],[0,1]]")
    (line,) = check_resume(other, ckpt)
    assert line.startswith(f"ckpt_path='{ckpt}' holds a student of the keep pattern arch.keep={saved}")


@pytest.mark.parametrize(
    ("overrides", "params"),
    [
        ([f"arch.keep.up={EXAMPLE_UP}"], 2_524_740),
        (["arch.keep.down=[[1],[0],[0,1],null]", "arch.keep.mid=false"], 1_861_188),
    ],
    ids=["example-up", "dropped-stage-down-remap"],
)
def test_new_patterns_train_on_the_demo_and_export(compose_train, tmp_path, overrides, params):
    """Two patterns that are none of the paper's: 2 optimizer steps each, finite loss, the student's size, and the
    exported pipeline loads in plain diffusers."""
    import csv
    import math

    from diffusers import StableDiffusionPipeline

    from bksdm_lab import train as train_app
    from bksdm_lab.models.students import count_params

    cfg = compose_train(
        "experiment=demo",
        "arch=keep",
        *overrides,
        "trainer.max_steps=2",
        "trainer.accumulate_grad_batches=1",
        "trainer.log_every_n_steps=1",
        "logger=csv",
        "callbacks.samples.prompts=[]",
        "callbacks.checkpoint.every_n_train_steps=0",
        "~callbacks.ema",
        "data.max_samples=16",
    )
    train_app.main(cfg)
    run = tmp_path / "run"
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    losses = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    feat = [float(r["train/loss_feat_kd"]) for r in rows if r.get("train/loss_feat_kd")]
    assert losses and all(math.isfinite(v) for v in losses) and feat and all(v > 0 for v in feat)
    pipe = StableDiffusionPipeline.from_pretrained(run / "pipeline")
    assert count_params(pipe.unet) == params
    assert pipe.unet.config.layers_per_block == {2_524_740: [1, 2, 1, 1], 1_861_188: [1, 1, 2]}[params]
