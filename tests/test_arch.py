"""The architecture report: exact sizes, MACs and removed blocks, offline on the meta device."""

import json
import subprocess

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


def test_cli_json_keyed_by_variant():
    out = subprocess.run(
        [PYTHON, "-m", "bksdm_lab.arch", "teacher=sd21", "format=json"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        env=subprocess_env(REPO / ".pytest_cache"),
    ).stdout
    report = json.loads(out)
    assert list(report) == ["teacher", "base", "small", "tiny"]
    assert report["tiny"]["unet_params"] == V2_UNET["tiny"]
    assert report["teacher"]["config"]["block_out_channels"] == [320, 640, 1280, 1280]


def test_cli_table_and_bad_format():
    env = subprocess_env(REPO / ".pytest_cache")
    table = subprocess.run(
        [PYTHON, "-m", "bksdm_lab.arch"], capture_output=True, text=True, check=True, cwd=REPO, env=env
    )
    assert "BK-SDM-Tiny [tiny]" in table.stdout and "859,520,964" in table.stdout
    bad = subprocess.run(
        [PYTHON, "-m", "bksdm_lab.arch", "format=xml"], capture_output=True, text=True, cwd=REPO, env=env
    )
    assert bad.returncode != 0 and "table, json" in bad.stderr


def test_app_in_process(capsys):
    """The Hydra app's function on a composed config (the variants are composed inside it)."""
    from test_generate import compose

    from bksdm_lab import arch

    text = arch.run(compose("arch", ["teacher=demo", "variants=[tiny]", "format=json"]))
    assert list(json.loads(text)) == ["teacher", "tiny"] and text in capsys.readouterr().out
