"""`python -m bksdm_lab.dashboard`: the dry-run spec round-trips through wandb-workspaces, every plotted key is one
a real offline training run logs, and the CLI's help and no-login error."""

import contextlib
import io
import json
import re
import subprocess

import pytest
import wandb_offline
from conftest import PYTHON, subprocess_env

from bksdm_lab import dashboard as dashboard_app
from bksdm_lab.evaluation import dashboard as db
from bksdm_lab.evaluation.paper import PAPER_RESULTS


def run_cli(args, cache_dir, cwd, env=None):
    return subprocess.run(
        [PYTHON, "-m", "bksdm_lab.dashboard", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env or subprocess_env(cache_dir),
        timeout=300,
    )


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    """`python -m bksdm_lab.dashboard --dry-run`, in-process."""
    out = tmp_path_factory.mktemp("dashboard") / "spec.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert dashboard_app.main(["--entity", "me", "--group", "demo", "--dry-run", "--out", str(out)]) == 0
    assert printed.getvalue().startswith(f"wrote {out} (")
    return json.loads(out.read_text())


def metric_name(metric) -> str:
    return getattr(metric, "name", metric)  # loaded back, a plotted key is a wr.Metric


def library_panel_keys(panel) -> tuple[str, tuple[str, ...], str | None]:
    """(kind, keys, regex) of a wandb-workspaces panel, as our Panel spec names them."""
    import wandb_workspaces.reports.v2 as wr

    if isinstance(panel, wr.LinePlot):
        return "line", tuple(metric_name(y) for y in panel.y), panel.metric_regex
    if isinstance(panel, wr.MediaBrowser):
        return "media", tuple(panel.media_keys), None
    if isinstance(panel, wr.WeavePanelSummaryTable):
        return "table", (panel.table_name,), None
    raise AssertionError(f"unexpected panel {panel!r}")


def test_dry_run_round_trips_through_wandb_workspaces(dry_run):
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces.reports.v2 import internal as report_internal
    from wandb_workspaces.workspaces import internal as workspace_internal

    # the workspace: the library's own pydantic model validates the JSON, _from_model rebuilds the object, and
    # serialising that again gives the same JSON
    workspace = ws.Workspace._from_model(workspace_internal.View.model_validate(dry_run["workspace"]))
    assert db.model_json(workspace) == dry_run["workspace"]
    assert (workspace.entity, workspace.project) == ("me", db.DEFAULT_PROJECT)
    assert [s.name for s in workspace.sections] == [s["name"] for s in dry_run["sections"]]
    for section, spec in zip(workspace.sections, dry_run["sections"]):
        assert section.is_open == spec["is_open"]
        assert [library_panel_keys(p) for p in section.panels] == [
            (p["kind"], tuple(p["keys"]), p["regex"]) for p in spec["panels"]
        ]
    # and the data spec is what the module builds
    assert dry_run["sections"] == json.loads(json.dumps([db.asdict(s) for s in db.build("me").sections]))
    assert dry_run["feature_layers"] == db.arch_feature_layers("tiny")

    # the report: the same round trip through ReportViewspec
    view = dry_run["report"]["view"]
    report = wr.Report._from_model(report_internal.ReportViewspec.model_validate(view))
    assert db.model_json(report) == view
    assert "demo" in report.title
    markdown = "\n".join(b.text for b in report.blocks if isinstance(b, wr.MarkdownBlock))
    for model, (fid, is_, clip) in PAPER_RESULTS.items():
        assert f"| {model} | {fid:.2f} | {is_:.2f} | {clip:.4f} |" in markdown
    (grid,) = [b for b in report.blocks if isinstance(b, wr.PanelGrid)]
    (runset,) = grid.runsets
    assert "Group" in runset.filters and "demo" in runset.filters
    assert {metric_name(k) for p in grid.panels for k in getattr(p, "metrics", None) or getattr(p, "y", [])} == {
        "eval/fid",
        "eval/is",
        "eval/clip_score",
    }
    assert dry_run["report"]["runset"] == {"entity": "me", "project": "bksdm_lab", "filters": db.group_filter("demo")}


def test_cli_help_and_no_login_error(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        dashboard_app.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--dry-run" in out and "--group" in out

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for key, value in {"HOME": tmp_path, "NETRC": tmp_path / "netrc", "WANDB_CONFIG_DIR": tmp_path / "wandb"}.items():
        monkeypatch.setenv(key, str(value))
    assert dashboard_app.main(["--entity", "me", "--group", "demo"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "not logged in to W&B" in lines[0] and "--dry-run" in lines[0], err


@pytest.mark.slow
def test_real_cli_no_login_error(cache_dir, tmp_path):
    """The real `python -m bksdm_lab.dashboard` without a W&B login: exit 2, one line, no traceback."""
    env = subprocess_env(cache_dir)
    env.pop("WANDB_API_KEY", None)
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "netrc"), WANDB_CONFIG_DIR=str(tmp_path / "wandb"))
    proc = run_cli(["--entity", "me", "--group", "demo"], cache_dir, tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "not logged in to W&B" in lines[0] and "--dry-run" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_unknown_arch_is_named():
    with pytest.raises(db.DashboardError, match="unknown arch 'huge'.*base, keep, same, small, tiny"):
        db.arch_feature_layers("huge")


# ---- every plotted key is one a real run logs -----------------------------------------------------------------
@pytest.fixture(scope="module")
def logged(cache_dir, tmp_path_factory) -> dict[str, list]:
    """A real 4-step demo run, offline, with what makes the rarer keys appear: one corrupt JPEG in the image
    folder (data/skipped_corrupt), sample images every 2 steps (samples/*), and the in-training eval
    (callbacks=with_eval, its tiny offline metric models, reference stats of the good images) every 2 steps
    (eval/*). Returns every history key of the .wandb file with its values."""
    from bksdm_lab.data.synthetic import make_synthetic_dataset
    from bksdm_lab.evaluation import evaluate as ev
    from bksdm_lab.evaluation import metrics

    root = tmp_path_factory.mktemp("dashboard_run")
    data = make_synthetic_dataset(root / "data", num_images=16, size=80)
    stats, _ = ev.compute_stats(data, metrics.demo_extractor(), resize=256)
    ref = metrics.save_stats(root / "ref.npz", stats.mu, stats.sigma)
    (data / "00003.jpg").write_bytes(b"this is not a JPEG")
    run_dir = root / "run"
    args = [
        "experiment=demo",
        f"data.root={data}",
        "~data.synthetic",  # a plain image folder: not the demo's 256-image set
        "data.max_skipped_fraction=0.5",
        "trainer.max_steps=4",
        "trainer.log_every_n_steps=1",
        "logger=wandb",
        "~callbacks.export",  # no exported pipeline (not needed here)
        "callbacks=with_eval",
        "callbacks.checkpoint.every_n_train_steps=100",
        "callbacks.samples.every_n_steps=2",
        "sampling.steps=2",  # samples and eval
        f"callbacks.eval.metadata={data / 'metadata.csv'}",
        "callbacks.eval.num_prompts=2",
        f"callbacks.eval.ref_stats={ref}",
        "callbacks.eval.every_n_steps=2",
        "callbacks.eval.batch_size=2",
        "callbacks.eval.feature_extractor=demo",
        "callbacks.eval.clip=demo",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(
        [PYTHON, "-m", "bksdm_lab.train", *args],
        capture_output=True,
        text=True,
        cwd=root,
        env=subprocess_env(cache_dir),
        timeout=900,
    )
    assert proc.returncode == 0, f"STDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"
    (run_file,) = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    keys: dict[str, list] = {}
    for row in wandb_offline.history(run_file):
        for key, value in row.items():
            keys.setdefault(key, []).append(value)
    return keys


def is_logged(key: str, keys: dict) -> bool:
    """A scalar is logged under its key; an image panel or table as ``<key>/_type`` (+ path, size, ...)."""
    return key in keys or f"{key}/_type" in keys


@pytest.mark.slow
def test_every_plotted_key_is_logged_by_a_real_run(logged):
    sections = db.build("me", arch="tiny").sections  # the demo trains arch=tiny
    missing = [k for k in db.plotted_keys(sections) if not is_logged(k, logged)]
    assert not missing, f"plotted but never logged: {missing}\nlogged: {sorted(logged)}"

    # the per-layer keys: exactly the tiny arch's feature_pairs, all matched by the regex panel too
    feat = sorted(k for k in logged if k.startswith(db.FEAT_KD_PREFIX))
    assert feat == sorted(db.feat_kd_key(layer) for layer in db.arch_feature_layers("tiny"))
    regexes = db.plotted_regexes(sections)
    assert sorted(regexes) == sorted([f"^{db.FEAT_KD_PREFIX}.*", f"^{db.ATTN_KD_PREFIX}.*", "^train/loss_.*"])
    feat_regex = f"^{db.FEAT_KD_PREFIX}.*"
    assert all(re.match(feat_regex, k) for k in feat)
    assert not [k for k in logged if re.match(feat_regex, k) and not k.startswith(db.FEAT_KD_PREFIX)]
    # every logged loss part is on the loss-terms regex panel
    assert sorted(k for k in logged if re.match("^train/loss_.*", k)) == sorted(db.loss_keys()[1:])

    # the rare keys are real here, not just present: the corrupt JPEG is counted, eval ran, the table is a table
    assert max(logged["data/skipped_corrupt"]) >= 1
    assert all(v >= 0 for k in ("eval/fid", "eval/is", "eval/clip_score") for v in logged[k])
    assert "table-file" in logged["samples/table/_type"]
    assert set(logged["samples/student/_type"]) == {"images/separated"}

    # and the other way round: every metric the run logs is on the dashboard
    plotted = set(db.plotted_keys(sections))
    metric = re.compile(r"^(train|perf|data|eval|samples)/")
    unplotted = {
        k
        for k in logged
        if metric.match(k)
        and k not in plotted
        and not any(re.match(r, k) for r in regexes)
        and k.rsplit("/", 1)[0] not in plotted
    }
    assert not unplotted, f"logged but not on the dashboard: {sorted(unplotted)}"
