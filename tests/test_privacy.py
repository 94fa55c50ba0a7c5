"""Files meant to be shared name no absolute local path that reveals the home folder.

Shared: the model card and every config of the exported pipeline, the W&B config (and run name), CSV hparams,
the run config a checkpoint stores (and an export made from it). Local records (``.hydra/``, the console, W&B's
own machine metadata) are not checked here.
"""

import json
import os
import subprocess
from pathlib import Path

import pytest
import wandb_offline
from conftest import PYTHON, REPO

from bksdm_lab.common import secrets
from bksdm_lab.common.checkpoint import read_checkpoint
from bksdm_lab.models import export


@pytest.fixture()
def home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "home" / "alice"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("BKSDM_CACHE_DIR", str(home / ".cache" / "bk"))
    monkeypatch.delenv("BKSDM_DATA_DIR", raising=False)
    return home


def test_shareable_paths(home):
    cache = home / ".cache" / "bk"
    assert secrets.shareable_text(f"{cache}/demo/teacher") == "~/.cache/bk/demo/teacher"
    assert secrets.shareable_text(f"data.root={home}/laion,x={home}work") == f"data.root=~/laion,x={home}work"
    assert secrets.shareable({"a": [str(home / "runs" / "x"), 3], "b": None, "c": "/data/laion"}) == {
        "a": ["~/runs/x", 3],
        "b": None,
        "c": "/data/laion",  # not under the home folder: kept as given
    }
    assert Path(secrets.shareable_text(str(cache))).expanduser() == cache  # the same user's tools find it again
    assert secrets.public_source("CompVis/stable-diffusion-v1-4") == "CompVis/stable-diffusion-v1-4"
    assert secrets.public_source(f"{home}/models/stable-diffusion-v1-4/") == "<local>/stable-diffusion-v1-4"
    assert secrets.redact_dirname(f"data.root={home}/d,hub.token=abc") == "data.root=~/d,hub.token=<redacted>"


def test_model_card_names_no_local_path(home):
    info = {
        "arch_title": "BK-SDM-Tiny",
        "teacher_title": "SD-v1.4",
        "teacher_source": f"{home}/other/stable-diffusion-v1-4",
        "teacher_trained_source": f"{home}/models/sd14",
        "data": export._public_data(f"{home}/data/preprocessed_212k"),
    }
    card = export.model_card(info)
    assert str(home) not in card and "/home/" not in card
    assert (
        "(`<local>/sd14`); VAE, text encoder, tokenizer and scheduler exported from `<local>/stable-diffusion-v1-4`"
        in (card)
    )
    assert "- Data: `<local>/preprocessed_212k`" in card


def shared_files(run_dir: Path) -> dict[str, str]:
    """The text of every shared file of a run: its exported pipeline's text files, the CSV hparams, the W&B
    config, history, summary and run records, and the config stored in its last checkpoint."""
    texts = {}
    for path in sorted((run_dir / "pipeline").rglob("*")):
        if path.is_file() and path.suffix in (".json", ".txt", ".md", ".yaml"):
            texts[str(path.relative_to(run_dir))] = path.read_text(encoding="utf-8")
    texts["csv/hparams.yaml"] = (run_dir / "csv" / "hparams.yaml").read_text()
    (run_file,) = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    kinds = ("run", "config", "history", "summary")
    for i, record in enumerate(wandb_offline.records(run_file)):
        if record.WhichOneof("record_type") in kinds:
            texts[f"wandb record {i} ({record.WhichOneof('record_type')})"] = str(record)
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    texts["last.ckpt config"] = json.dumps(ckpt["bksdm"]["config"])
    return texts


@pytest.mark.slow
def test_a_demo_runs_shared_files_name_no_home_folder(home, tmp_path):
    """A short demo run by a user whose home, cache, data and run folder are all under the home folder."""
    proj = home / "proj"
    proj.mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    run_dir = proj / "runs" / "demo"
    args = ["experiment=demo", "trainer.max_steps=4", "callbacks.checkpoint.every_n_train_steps=2"]
    args += ["callbacks.samples.every_n_steps=4", "callbacks.samples.num_inference_steps=2"]
    args += ["data.synthetic.num_images=16", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(
        [PYTHON, "-m", "bksdm_lab.train", *args], capture_output=True, text=True, cwd=proj, env=env, timeout=900
    )
    assert proc.returncode == 0, f"STDOUT:\n{proc.stdout[-3000:]}\nSTDERR:\n{proc.stderr[-5000:]}"

    texts = shared_files(run_dir)
    assert "pipeline/README.md" in texts and "pipeline/vae/config.json" in texts and "csv/hparams.yaml" in texts
    assert any(k.endswith("(config)") for k in texts)
    leaks = {name: text.count(str(home)) for name, text in texts.items() if str(home) in text}
    assert not leaks, f"the home folder {home} is named in {leaks}"
    # what a reader needs is still there, and the names are the ones the README promises
    card = texts["pipeline/README.md"]
    assert "(`<local>/teacher`)" in card and "- Data: `<local>/data`" in card
    assert json.loads(texts["pipeline/vae/config.json"])["_name_or_path"] == "<local>/teacher"
    stored = json.loads(texts["last.ckpt config"])
    assert stored["teacher"]["pretrained"] == "~/.cache/bk/demo/teacher"
    assert stored["paths"]["output_dir"] == "~/proj/runs/demo"

    # export rebuilds the teacher from the stored config (`~` expanded), and the card of that export is clean too
    out = tmp_path / "export"
    export.main([str(run_dir / "checkpoints" / "last.ckpt"), "--out", str(out)])
    card = (out / "README.md").read_text()
    assert str(home) not in card and "(`<local>/teacher`)" in card and "4 optimizer steps" in card
