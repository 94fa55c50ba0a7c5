"""`bksdm_lab.importance`: every removable layer of the demo teacher (the SD-v1 topology) scored by the world's short
judge and ranked, the files, the budget proposals `train` accepts, one-line errors, a W&B offline run."""

import contextlib
import csv
import io
import json
import math
import os
import shlex
import sys
from unittest import mock

import numpy as np
import pytest
import wandb_offline
from PIL import Image
from test_generate import compose

from bksdm_lab import importance as imp
from bksdm_lab.models.keep import derive, same_student
from bksdm_lab.models.teachers import shipped_configs

TINY = ["teacher=demo", "num_prompts=4", "sampling.steps=2", "sampling.guidance=1", "sampling.batch_size=4"]
# the SD-v1 topology: each down layer, each up layer, the mid block, the deepest stage; a down layer's removal that
# gives the student of an up layer's removal (diffusers: up stage = mirrored down stage + 1) is one candidate
REMOVABLE = {  # layer -> the layers that give the same student, on the demo teacher (channels 32, 64, 64, 64)
    "down_blocks.0.layer0": [],
    "down_blocks.0.layer1": ["up_blocks.3.layer1"],
    "down_blocks.1.layer1": ["up_blocks.2.layer1"],
    "down_blocks.2.layer0": [],
    "down_blocks.2.layer1": ["up_blocks.1.layer1"],
    "down_blocks.3.layer0": [],
    "down_blocks.3.layer1": ["up_blocks.0.layer1"],
    "up_blocks.0.layer0": [],
    "up_blocks.0.layer2": [],
    "up_blocks.1.layer0": [],
    "up_blocks.1.layer2": [],
    "up_blocks.2.layer0": [],
    "up_blocks.3.layer2": [],
    "mid_block": [],
    "down_blocks.3+up_blocks.0": [],
}
# the first layer of a stage takes the stage above's channels, an up stage's last one the skip: where those differ
# from the stage's own, the teacher cannot initialise the student
NOT_REMOVABLE = {
    "down_blocks.1.layer0": "arch.keep.down.1=[1]: the student's first layer of down_blocks.1 takes the 32 channels",
    "up_blocks.2.layer2": "arch.keep.up.2=[0, 1]: student up_blocks.2.resnets.1 cannot copy teacher",
    "up_blocks.3.layer0": "arch.keep.up.3=[1, 2]: student up_blocks.3.resnets.0 cannot copy teacher",
}


@pytest.fixture(scope="module")
def judge_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("importance_judge")


@pytest.fixture(scope="module")
def analysis(demo_teacher_dir, cache_dir, judge_cache, tmp_path_factory):
    """One run on the demo teacher: 4 prompts, 2 steps, the short judge, a params budget, W&B offline."""
    out = tmp_path_factory.mktemp("importance") / "run"
    overrides = [*TINY, "world.judge=short", "world.reference=32", f"world.cache_dir={judge_cache}", f"out={out}"]
    overrides += ["rank_by=fid", "budget.params=[0.75]", "budget.macs=null", "score_proposals=false", "wandb=true"]
    printed = io.StringIO()
    with mock.patch.dict(os.environ, {"BKSDM_CACHE_DIR": str(cache_dir)}), contextlib.redirect_stdout(printed):
        record = imp.run(compose("importance", overrides))
    return record, out, printed.getvalue()


def test_every_removable_layer_is_scored_and_ranked(analysis):
    record, out, printed = analysis
    base, *layers = record["layers"]
    removable = [r for r in layers if r["removable"]]
    assert {r["layer"]: r["same_student_as"].split() for r in removable} == REMOVABLE
    assert {r["layer"]: r["reason"][: len(NOT_REMOVABLE[r["layer"]])] for r in layers if not r["removable"]} == (
        NOT_REMOVABLE
    )
    assert base["layer"] == "baseline" and base["params"] == 3_222_692 and base["params_removed"] == 0
    # ranked by fid (lower is better): drop = score - baseline, rank 1 the largest drop
    assert [r["rank"] for r in removable] == list(range(1, 16))
    drops = [r["drop"] for r in removable]
    assert drops == sorted(drops, reverse=True) and all(math.isfinite(d) for d in drops)
    for r in removable:
        assert r["drop"] == pytest.approx(r["fid"] - base["fid"])
        assert 0 <= r["agree/all"] <= 1 and r["params"] + r["params_removed"] == base["params"]
        assert r["macs_removed"] > 0
    by_layer = {r["layer"]: r for r in layers}
    assert by_layer["mid_block"]["params_removed"] == 252_096 and by_layer["mid_block"]["removes"] == "mid_block (all)"
    deepest = by_layer["down_blocks.3+up_blocks.0"]
    assert deepest["params_removed"] == 621_440
    assert deepest["removes"] == "down_blocks.2 downsamplers.0; down_blocks.3 (all); up_blocks.0 (all)"
    assert by_layer["down_blocks.1.layer1"]["removes"] == (
        "down_blocks.1 resnets.1 attentions.1; up_blocks.2 resnets.1 attentions.1"
    )
    assert "15 removable layers to score, 3 not removable" in printed and "| rank | layer | removes |" in printed


def test_sd_v1_has_the_same_candidates_and_refuses_three_more():
    """SD-v1.4's channels (320, 640, 1280, 1280) change at one more stage boundary than the demo's (32, 64, 64, 64):
    down_blocks.2's first layer, up_blocks.2's first and up_blocks.1's last cannot go either."""
    unet = shipped_configs("sd14")["unet"]
    start = derive(None, unet).pattern
    teacher = compose("importance", ["teacher=sd14"]).teacher
    found = {c.id: c for c in imp.candidates(start, unet, "sd14", teacher)}
    assert set(found) == set(REMOVABLE) | set(NOT_REMOVABLE)
    more = {"down_blocks.2.layer0", "up_blocks.2.layer0", "up_blocks.1.layer2"}
    assert {i for i, c in found.items() if c.error} == {*NOT_REMOVABLE, *more}
    assert found["down_blocks.1.layer1"].same_as == ["up_blocks.2.layer1"]
    assert same_student(found["up_blocks.0.layer0"].keep, {"up": [[1, 2], None, None, None]}, teacher) is False


def test_files_table_csv_chart_and_samples(analysis):
    record, out, printed = analysis
    with (out / "importance.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["layer"] for r in rows] == [r["layer"] for r in record["layers"]]
    assert {"removes", "params_removed", "macs_removed", "fid", "agree/all", "drop", "rank"} <= set(rows[0])
    md = (out / "importance.md").read_text()
    assert md.count("\n| ") == 16 and "Not removable" in md and "ranked by fid (lower is better)" in md
    assert json.loads((out / "importance.json").read_text())["settings"]["rank_by"] == "fid"
    try:
        import matplotlib  # noqa: F401  (the experiments extra)
    except ImportError:
        assert 'matplotlib is not installed: pip install -e ".[experiments]"' in printed
    else:
        with Image.open(out / "importance.png") as png:
            assert png.format == "PNG" and png.size[1] > 300
    # every candidate generated the same prompts with the same seeds
    folders = sorted((out / "samples").iterdir())
    assert len(folders) == 16  # the baseline and the 15 removable layers
    prompts = {(f / "prompts.csv").read_text() for f in folders}
    seeds = {json.loads((f / "generation.json").read_text())["settings"]["seed"] for f in folders}
    assert len(prompts) == 1 and seeds == {1234}
    assert all(len(list((f / "images").glob("*.png"))) == 4 for f in folders)


def test_a_missing_matplotlib_is_one_line(analysis, tmp_path, capsys, monkeypatch):
    record, _, _ = analysis
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert imp.chart(record["layers"], "fid", tmp_path / "x.png", "t") is None
    assert capsys.readouterr().out.strip().splitlines() == [
        'bksdm_lab.importance: importance.png not drawn: matplotlib is not installed: pip install -e ".[experiments]"'
    ]


def test_proposals_are_keep_patterns_train_accepts_under_the_budget(analysis, compose_train, teacher):
    from bksdm_lab import train as train_app
    from bksdm_lab.models.report import pattern_archs
    from bksdm_lab.models.students import count_params, init_student_from_teacher

    record, out, printed = analysis
    proposals = json.loads((out / "proposals.json").read_text())
    (p,) = proposals
    assert (p["budget"], p["given"], p["met"], p["limit"]) == ("params", 0.75, True, round(0.75 * 3_222_692))
    assert f"python -m bksdm_lab.train teacher=demo {p['overrides']}" in printed
    cfg = compose_train("experiment=demo", *shlex.split(p["overrides"]))
    train_app.check_inputs(cfg, None, probe_teacher_models=False)
    student = init_student_from_teacher(teacher.unet, cfg.arch)  # as train builds it: every tensor from the teacher
    assert count_params(student) == p["params"] <= p["limit"]
    assert p["removes"] and set(p["removes"]) <= set(REMOVABLE)
    # the same pattern in the architecture report
    (pattern,) = shlex.split(p["arch_patterns"])
    report = compose("arch", ["teacher=demo", "variants=[]", pattern])
    (arch_cfg,) = pattern_archs(report.patterns, teacher=report.teacher).values()
    assert same_student(arch_cfg.keep, cfg.arch.keep, cfg.teacher)


def test_wandb_offline_run_holds_the_table_and_the_chart(analysis):
    _, out, _ = analysis
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    (run_file,) = run_dir.glob("run-*.wandb")
    (row,) = wandb_offline.history(run_file)
    assert row["importance/table/_type"] == "table-file" and row["importance/table/nrows"] == 19
    (table,) = (run_dir / "files" / "media" / "table" / "importance").glob("table_*.table.json")
    logged = json.loads(table.read_text())
    assert logged["columns"][:2] == ["layer", "same_student_as"] and logged["data"][0][0] == "baseline"
    if (out / "importance.png").is_file():
        assert row["importance/chart/_type"] == "image-file"
        assert len(list((run_dir / "files" / "media" / "images" / "importance").glob("chart_*.png"))) == 1
    config = {i.key: json.loads(i.value_json) for r in wandb_offline.records(run_file) for i in r.run.config.update}
    assert config["rank_by"] == "fid" and config["teacher"] == "demo"


def test_bad_values_fail_in_one_line_each_before_loading(analysis, tmp_path, capsys, monkeypatch):
    from bksdm_lab.models import teachers

    _, out, _ = analysis
    monkeypatch.setattr(teachers, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    monkeypatch.setattr(teachers, "probe_teacher", lambda *a, **k: pytest.fail("the teacher was probed"))
    cases = {
        "rank_by=clip_score": "rank_by='clip_score' is not a key of metric=world: one of agree/all, fid, agree/colour",
        "budget.params=0": "budget.params=0 is not a fraction of the teacher's U-Net params (0 < f <= 1) or a number "
        "of params up to the teacher's (3,222,692)",
        "budget.macs=[0.5,1e12]": "budget.macs=1000000000000.0 is not a fraction",
        "sampling.steps=0": "sampling.steps=0 is not a whole number >= 1",
        "world.judge=tiny": "world.judge='tiny' is not one of: full, short",
        f"out={out}": f"out='{out}' already holds results (importance.csv, importance.md",
    }
    with pytest.raises(SystemExit) as stop:
        imp.main(compose("importance", [*TINY, *cases]))
    assert stop.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == len(cases) and "Traceback" not in "\n".join(err)
    for line in cases.values():
        assert any(line in e for e in err), line
    with pytest.raises(imp.ImportanceError, match=r"^metric='nope' is not one of: world, clip_fid$"):
        imp.check(compose("importance", [*TINY, "metric=nope", f"out={tmp_path}"]))
    with pytest.raises(
        imp.ImportanceError, match=r"^rank_by='fid' is not a key of metric=clip_fid: one of clip_score, is$"
    ):
        imp.check(compose("importance", [*TINY, "metric=clip_fid", "rank_by=fid", f"out={tmp_path}"]))


def test_clip_fid_from_a_smaller_start(demo_teacher_dir, cache_dir, tmp_path, monkeypatch, capsys):
    """metric=clip_fid with the demo's CLIP and feature extractor, from BK-SDM-Tiny: its only removable layer is its
    deepest stage; FID against statistics of the extractor's width."""
    from bksdm_lab.evaluation.metrics import FeatureStats

    monkeypatch.setenv("BKSDM_CACHE_DIR", str(cache_dir))
    stats = FeatureStats.from_features(np.random.default_rng(0).normal(size=(40, 32))).save(tmp_path / "ref.npz")
    overrides = [*TINY, "arch=tiny", "metric=clip_fid", "clip_fid.feature_extractor=demo", "clip_fid.clip=demo"]
    overrides += [
        "clip_fid.prompt=[a red circle,a blue square,a green star,a black cat]",
        f"clip_fid.ref_stats={stats}",
    ]
    overrides += [
        "clip_fid.eval_resolution=64",
        "budget.params=0.1",
        "budget.macs=[0.7,0.55]",
        f"out={tmp_path / 'run'}",
    ]
    record = imp.run(compose("importance", overrides))
    base, *layers = record["layers"]
    assert [r["layer"] for r in layers if r["removable"]] == ["down_blocks.2+up_blocks.1"]
    assert len(layers) == 10 and -1 <= base["clip_score"] <= 1 and base["fid"] >= 0 and base["is"] >= 1
    unreachable, within, removed = record["proposals"]
    assert unreachable["met"] is False and unreachable["removes"] == ["down_blocks.2+up_blocks.1"]
    assert within["met"] is True and within["removes"] == [] and within["keep"] == record["settings"]["start"]
    assert removed["met"] is True and removed["macs"] <= removed["limit"] == round(0.55 * 41_809_472)
    text = (tmp_path / "run" / "proposals.md").read_text()
    assert "Not reachable by removing the ranked layers" in text and "the starting pattern is within the budget" in text
