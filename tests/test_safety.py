"""No run lies and nothing is lost: every bad input is refused before the teacher loads, in one line
naming the key; a run that trained nothing does not export or exit 0; a run folder holding a run is never
overwritten unless asked; resumes are exact in samples; Ctrl-C saves a checkpoint; W&B records failures.

Fast tests run the entry in-process: ``train_app.main(cfg)`` on a composed config, or the whole Hydra app
(``.hydra/`` records and the run-folder guard included) with ``sys.argv`` set. The real command's Ctrl-C and W&B
records are the slow tier.
"""

import csv
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import wandb_offline
from conftest import PYTHON, compose_train_cfg, subprocess_env
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig

from bksdm_lab import train as train_app
from bksdm_lab.common.checkpoint import read_checkpoint
from bksdm_lab.data.common import ResumableSampler
from bksdm_lab.data.synthetic import make_synthetic_dataset

# a few optimizer steps of the demo on 32 images: micro-batch 8, no accumulation (4 steps an epoch), CSV only
FAST = [
    "experiment=demo",
    "~data.synthetic",
    "logger=csv",
    "~callbacks.export",
    "callbacks.samples.prompts=[]",
    "trainer.accumulate_grad_batches=1",
    "trainer.log_every_n_steps=1",
    "callbacks.checkpoint.every_n_train_steps=100",
]


def base(overrides) -> list[str]:
    """FAST, less what another data format has no key for."""
    other_data = any(o.startswith("data=") for o in overrides)
    return [o for o in FAST if not (other_data and o == "~data.synthetic")]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """This module's own 32 captioned images."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("safety_data") / "shapes", num_images=32, size=80)


@pytest.fixture()
def compose_run(monkeypatch, cache_dir, demo_teacher_dir, shapes):
    """Compose conf/train.yaml as `python -m bksdm_lab.train` would, into a run folder of the test's choosing."""
    monkeypatch.setenv("BKSDM_CACHE_DIR", str(cache_dir))

    def make(run_dir: Path, *overrides: str):
        return compose_train_cfg(run_dir, *base(overrides), f"data.root={shapes}", *overrides)

    yield make
    HydraConfig.instance().cfg = None


@pytest.fixture()
def run(compose_run):
    """Train in-process; returns the exit code (0 when main() returns)."""

    def go(run_dir: Path, *overrides: str) -> int:
        try:
            train_app.main(compose_run(run_dir, *overrides))
        except SystemExit as stop:
            return stop.code
        return 0

    return go


@pytest.fixture()
def no_teacher(monkeypatch):
    """Loading the teacher fails the test: a refusal must come before it."""

    def boom(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the input was refused")

    monkeypatch.setattr(train_app, "load_teacher", boom)


def refused(run, tmp_path, capsys, *overrides) -> list[str]:
    """The run exits 2 (before the teacher loads, with `no_teacher`); returns its error lines."""
    started = time.perf_counter()
    code = run(tmp_path / "run", *overrides)
    err = capsys.readouterr().err
    print(f"refused in {time.perf_counter() - started:.2f} s: {overrides}")  # fast, but no timing is asserted
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("bksdm_lab.train: error: "), err
    assert "Traceback" not in err and "weights_only" not in err
    return lines


# ---- 3, 11: config values, before any loading, one line naming the key -----------------------------------------
@pytest.mark.parametrize(
    ("override", "says"),
    [
        ("loss.weights.out_kd=-1", "loss.weights.out_kd=-1 must be a number >= 0"),
        ("loss.weights.feat_kd=-0.5", "loss.weights.feat_kd=-0.5 must be a number >= 0"),
        ("optimizer.lr=-0.001", "optimizer.lr=-0.001 must be a number > 0"),
        ("optimizer.lr=0", "optimizer.lr=0 must be a number > 0"),
        ("data.batch_size=0", "data.batch_size=0 must be an integer >= 1"),
        ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0 must be an integer >= 1"),
        ("trainer.max_steps=0", "trainer.max_steps=0 must be an integer >= 1"),
        ("callbacks.ema.decay=1.5", "callbacks.ema.decay=1.5 must be a number in [0, 1]"),
    ],
)
def test_bad_values_are_refused_before_loading_naming_the_key(run, tmp_path, capsys, no_teacher, override, says):
    (line,) = refused(run, tmp_path, capsys, override)
    assert line.startswith(f"bksdm_lab.train: error: {says}")
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_every_bad_value_is_listed_at_once(run, tmp_path, capsys, no_teacher):
    lines = refused(run, tmp_path, capsys, "loss.weights.task=-1", "optimizer.lr=-1", "data.batch_size=0")
    assert [line.split("=")[0].split()[-1] for line in lines] == [
        "loss.weights.task",
        "optimizer.lr",
        "data.batch_size",
    ]


def test_an_optimizer_typo_names_the_key_and_the_accepted_arguments(run, tmp_path, capsys, no_teacher):
    (line,) = refused(run, tmp_path, capsys, "+optimizer.betaz=[0.9,0.99]")
    assert "optimizer.betaz: torch.optim.AdamW takes no argument 'betaz'; it accepts: lr, betas, eps" in line
    assert "params" not in line.split("accepts:")[1]  # the module passes the parameters itself


# ---- 1: a data set smaller than one micro-batch, a fit that trains nothing, a summary of what exists ------------
def test_a_data_set_smaller_than_one_micro_batch_is_refused(run, tmp_path, capsys, no_teacher):
    small = make_synthetic_dataset(tmp_path / "five", num_images=5, size=80)
    (line,) = refused(run, tmp_path, capsys, f"data.root={small}", "data.batch_size=64")
    assert f"data.root='{small}' has 5 samples, fewer than one micro-batch (data.batch_size=64)" in line
    (line,) = refused(run, tmp_path, capsys, "data.max_samples=4")  # 4 of the 32, batch 8
    assert "has 4 samples, fewer than one micro-batch (data.batch_size=8)" in line


def test_a_fit_that_trains_no_step_exports_nothing_and_fails(run, tmp_path, capsys):
    export = "+callbacks.export={_target_: bksdm_lab.distill.callbacks.ExportPipeline, out_dir: %s}"
    assert run(tmp_path / "run", "+trainer.limit_train_batches=0", export % (tmp_path / "run" / "pipeline")) == 2
    assert "the run trained 0 optimizer steps" in capsys.readouterr().err
    assert not (tmp_path / "run" / "pipeline").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_the_summary_names_only_files_that_exist(run, tmp_path, capsys):
    assert run(tmp_path / "run", "trainer.max_steps=1", "~callbacks.checkpoint") == 0
    out = capsys.readouterr().out.split("bksdm_lab: run finished")[1]
    named = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.strip()}
    assert "checkpoint" not in named and named["steps"] == "1"
    assert Path(named["csv"]).is_file()


def test_export_is_skipped_by_a_fit_without_steps(tmp_path):
    from bksdm_lab.distill.callbacks import ExportPipeline

    export = ExportPipeline(str(tmp_path / "pipeline"))
    trainer = type("T", (), {"global_step": 7, "is_global_zero": True})()
    export.on_train_start(trainer, None)
    export.on_train_end(trainer, None)  # would need a module to export: it returns first
    assert export.exported == {} and not (tmp_path / "pipeline").exists()


# ---- 4, 5: a latent cache of another teacher; a mistyped demo teacher path -------------------------------------
def test_a_latent_cache_of_another_teacher_is_refused(run, tmp_path, capsys, no_teacher):
    import json

    cache = tmp_path / "latents"
    cache.mkdir()
    meta = {"teacher": "sd14", "teacher_source": "CompVis/stable-diffusion-v1-4", "resolution": 64, "complete": True}
    (cache / "meta.json").write_text(json.dumps({**meta, "shards": [{"file": "shard-00000.pt", "count": 32}]}))
    overrides = ("data=latents", f"data.root={cache}", "data.batch_size=8", "data.global_batch_size=null")
    line = "\n".join(refused(run, tmp_path, capsys, *overrides))  # its shard is missing too
    assert f"data.root='{cache}' is a latent cache made with teacher 'sd14' (CompVis/stable-diffusion-v1-4)" in line
    assert "this run's teacher is 'demo'" in line


def test_a_mistyped_demo_teacher_path_is_not_built(run, tmp_path, capsys, no_teacher):
    typo = tmp_path / "cache" / "demo" / "teachr"
    (line, *_) = refused(run, tmp_path, capsys, f"teacher.pretrained={typo}")
    assert f"local folder {typo} does not exist" in line
    assert not typo.exists() and not typo.parent.exists()


def test_the_demo_teacher_is_built_where_it_is_loaded_and_only_at_its_place(tmp_path):
    """teacher=demo: every command that loads it (train, prepare, evaluate, generate, bench) builds it the same way."""
    from omegaconf import OmegaConf

    from bksdm_lab.models.teachers import TeacherLoadError, load_teacher, probe_teacher

    home = tmp_path / "cache" / "demo" / "teacher"
    cfg = OmegaConf.create({"name": "demo", "configs": "demo", "pretrained": "${build_if_missing}"})
    cfg.build_if_missing = str(home)
    with pytest.raises(TeacherLoadError, match="does not exist"):
        probe_teacher(OmegaConf.merge(cfg, {"pretrained": str(tmp_path / "elsewhere")}))
    assert not (tmp_path / "elsewhere").exists() and not home.exists()
    teacher = load_teacher(cfg, load_vae=False)
    assert (home / "model_index.json").is_file() and teacher.source == str(home)
    assert list(teacher.unet.config.block_out_channels) == [32, 64, 64, 64]  # the shipped demo config's


# ---- 9: checkpoints that cannot be resumed, non-UTF-8 metadata, a full disk -------------------------------------
def test_a_checkpoint_of_another_arch_says_which(run, tmp_path, capsys, no_teacher):
    ckpt = tmp_path / "base.ckpt"
    torch.save({"state_dict": {}, "global_step": 3, "bksdm": {"config": {"arch": {"name": "base"}}}}, ckpt)
    (line,) = refused(run, tmp_path, capsys, f"ckpt_path={ckpt}")
    assert f"ckpt_path='{ckpt}' holds a student of arch=base, but this run asks for arch=tiny" in line


def test_a_checkpoint_of_another_keep_pattern_says_which(run, tmp_path, capsys, no_teacher):
    """arch=keep names every pattern alike: the pattern itself must match (the student's tensors differ)."""
    ckpt = tmp_path / "keep.ckpt"
    saved = {"down": None, "up": [[0, 2], [0, 2], [0, 1, 2], [0, 2]], "mid": True}
    meta = {"config": {"arch": {"name": "keep", "keep": saved}}}
    torch.save({"state_dict": {}, "global_step": 3, "bksdm": meta}, ckpt)
    (line,) = refused(run, tmp_path, capsys, "arch=keep", "arch.keep.up=[[0,2],[0,2],[0,2],[0,2]]", f"ckpt_path={ckpt}")
    assert f"ckpt_path='{ckpt}' holds a student of the keep pattern arch.keep={saved}" in line
    assert "resume with the pattern it was trained with" in line


def test_truncated_and_foreign_checkpoints_are_one_line_without_an_unsafe_hint(run, tmp_path, capsys, no_teacher):
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"student.w": torch.ones(1000)}, "bksdm": {}}, whole)
    truncated, text, pickled = tmp_path / "truncated.ckpt", tmp_path / "notes.ckpt", tmp_path / "pickled.ckpt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    text.write_text("not a checkpoint\n")
    torch.save({"state_dict": {}, "model": pl.Callback()}, pickled)  # arbitrary objects: never unpickled
    for path, why in (
        (truncated, "not a complete PyTorch checkpoint archive"),
        (text, "not a complete PyTorch checkpoint archive"),
        (pickled, "it holds objects other than tensors and plain data (pytorch_lightning.callbacks.callback.Callback)"),
    ):
        (line,) = refused(run, tmp_path, capsys, f"ckpt_path={path}")
        assert f"ckpt_path='{path}' is not a readable PyTorch checkpoint" in line and line.endswith(why)


class Touch:
    """Unpickled, creates the file ``marker``: code a checkpoint could run if it were read unsafely."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


@pytest.fixture()
def code_ckpt(tmp_path) -> tuple[Path, Path]:
    """A checkpoint in the layout of `python -m bksdm_lab.train` whose pickle would create `marker`: (it, marker)."""
    path, marker = tmp_path / "code.ckpt", tmp_path / "marker"
    meta = {"config": {"arch": {"name": "tiny"}, "teacher": {"name": "demo"}}, "payload": Touch(marker)}
    torch.save({"state_dict": {"student.w": torch.ones(1)}, "global_step": 1, "bksdm": meta}, path)
    return path, marker


def test_lightning_resumes_only_through_the_safe_reader(code_ckpt):
    from bksdm_lab.common.checkpoint import AtomicCheckpointIO, CheckpointError

    path, marker = code_ckpt
    with pytest.raises(CheckpointError, match="it holds objects other than tensors and plain data"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)  # what any caller asks: never unsafe
    assert not marker.exists()


@pytest.mark.slow
def test_no_command_runs_the_code_a_checkpoint_holds(code_ckpt, cache_dir, demo_teacher_dir, shapes, tmp_path):
    path, marker = code_ckpt
    commands = {
        "train": [*FAST, f"data.root={shapes}", f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'run'}"],
        "export": [str(path)],
        "generate": [f"checkpoint={path}", "prompt=a red circle", f"out={tmp_path / 'generate'}"],
        "evaluate": [f"checkpoint={path}", "prompt=a red circle", "feature_extractor=demo", "clip=demo",
                     f"out={tmp_path / 'evaluate'}"],
    }  # fmt: skip
    procs = {
        name: subprocess.Popen(
            [PYTHON, "-m", f"bksdm_lab.{name}", *args],
            env=subprocess_env(cache_dir),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, args in commands.items()
    }
    stderr = {name: proc.communicate(timeout=300)[1] for name, proc in procs.items()}
    assert not marker.exists(), "reading the checkpoint ran its code"
    for name, err in stderr.items():
        errors = [line for line in err.splitlines() if "error" in line.lower() or "Traceback" in line]
        assert procs[name].returncode == 2 and len(errors) == 1, (name, err[-3000:])
        assert errors[0].startswith(f"bksdm_lab.{name}: error: ") and str(path) in errors[0], errors[0]
        assert errors[0].endswith("tensors and plain data (builtins.getattr, pathlib.Path, pathlib.PosixPath)")


def test_a_finished_checkpoint_with_nothing_left_to_train_is_refused(run, tmp_path, capsys, no_teacher):
    ckpt = tmp_path / "done.ckpt"
    torch.save({"state_dict": {}, "global_step": 200, "bksdm": {"config": {"arch": {"name": "tiny"}}}}, ckpt)
    (line,) = refused(run, tmp_path, capsys, f"ckpt_path={ckpt}", "trainer.max_steps=200")
    assert "is at step 200, and trainer.max_steps=200: nothing left to train" in line


def test_non_utf8_metadata_names_the_file(run, tmp_path, capsys, no_teacher):
    folder = make_synthetic_dataset(tmp_path / "latin1", num_images=8, size=80)
    (folder / "metadata.csv").write_bytes(b"file_name,text\n00000.jpg,un caf\xe9 rouge\n")
    (line,) = refused(run, tmp_path, capsys, f"data.root={folder}", "data.batch_size=1")
    assert f"{folder / 'metadata.csv'} is not UTF-8 text: byte 0xe9 on line 2" in line


# ---- the end of a run: the final checkpoint first; what is exported is what a written checkpoint holds ----------
EXPORT = "+callbacks.export={_target_: bksdm_lab.distill.callbacks.ExportPipeline, out_dir: %s}"


def test_a_full_disk_at_the_end_says_so_keeps_the_last_checkpoint_and_exports_nothing_new(
    run, tmp_path, capsys, mount_tmpfs
):
    run_dir, ckpt_dir = tmp_path / "run", tmp_path / "run" / "checkpoints"
    export = EXPORT % (run_dir / "pipeline")
    assert run(run_dir, "trainer.max_steps=2", export) == 0
    last, pipeline = (ckpt_dir / "last.ckpt").read_bytes(), snapshot(run_dir / "pipeline")
    shutil.rmtree(ckpt_dir)
    mount_tmpfs(ckpt_dir, f"size={len(last) * 3 // 2}")  # a real disk with room for one checkpoint, not two
    (ckpt_dir / "last.ckpt").write_bytes(last)
    capsys.readouterr()
    assert run(run_dir, "trainer.max_steps=4", "ckpt_path=last", export) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line == (
        f"bksdm_lab.train: error: no space left on device while writing the checkpoint {ckpt_dir / 'last.ckpt'}; the "
        f"previous last.ckpt is intact: free space in {ckpt_dir} (or point callbacks.checkpoint.dirpath elsewhere) "
        "and resume with ckpt_path=last"
    )
    assert [p.name for p in ckpt_dir.iterdir()] == ["last.ckpt"]  # no half-written file left behind
    assert read_checkpoint(ckpt_dir / "last.ckpt")["global_step"] == 2
    assert snapshot(run_dir / "pipeline") == pipeline  # still the pipeline of the step the checkpoint holds


def test_a_logger_failing_at_the_end_is_a_warning_and_the_trained_weights_are_kept(
    run, tmp_path, caplog, mount_tmpfs, monkeypatch
):
    monkeypatch.setenv("HOME", str(mount_tmpfs(tmp_path / "home", "ro", "size=64k")))  # as on many compute nodes
    monkeypatch.delenv("WANDB_DATA_DIR", raising=False)
    run_dir = tmp_path / "run"
    samples = ["callbacks.samples.prompts=[a red circle]", "callbacks.samples.every_n_steps=1"]  # mid-run, at the end
    fails = "+callbacks.fails={_target_: test_safety.FailsAtEnd}"  # a user's own callback failing at the end
    assert run(run_dir, "trainer.max_steps=2", "logger=wandb_csv", *samples, fails) == 0
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 2
    for step in (1, 2):  # W&B could not stage the images: a warning, and the PNGs are on disk
        assert f"the sample images of step {step} were not logged (Unable to write" in caplog.text
        assert (run_dir / "samples" / f"student_step{step:06d}" / "00.png").is_file()
    assert "FailsAtEnd failed at the end of training (the checkpoint is saved): no space for the report" in caplog.text


class FailsAtEnd(pl.Callback):
    def on_train_end(self, trainer, module) -> None:
        raise OSError("no space for the report")


def test_export_refuses_an_existing_folder_unless_asked_and_then_replaces_it_whole(run, tmp_path, capsys, mount_tmpfs):
    from bksdm_lab.models.export import main as export_main

    assert run(tmp_path / "run", "trainer.max_steps=1") == 0
    capsys.readouterr()  # the training run's own output
    ckpt, out = str(tmp_path / "run" / "checkpoints" / "last.ckpt"), tmp_path / "pipeline"
    out.mkdir()
    (out / "unet").mkdir()
    (out / "unet" / "stale.bin").write_text("an earlier export")
    with pytest.raises(SystemExit) as stop:
        export_main([ckpt, "--out", str(out)])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and line == (
        f"bksdm_lab.export: error: {out} already holds files: nothing there is replaced unless asked (--overwrite "
        "replaces the whole folder), or choose another --out"
    )
    assert (out / "unet" / "stale.bin").is_file()
    export_main([ckpt, "--out", str(out), "--overwrite"])
    assert (out / "model_index.json").is_file() and not (out / "unet" / "stale.bin").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipeline", "run"]  # no temporary folder left beside it

    small = mount_tmpfs(tmp_path / "small", "size=256k")  # an export that fails half-way leaves the folder as it was
    (small / "pipeline").mkdir()
    (small / "pipeline" / "model_index.json").write_text("{}")
    with pytest.raises(Exception, match="No space left on device"):
        export_main([ckpt, "--out", str(small / "pipeline"), "--overwrite"])
    assert [p.name for p in small.iterdir()] == ["pipeline"]
    assert [p.name for p in (small / "pipeline").iterdir()] == ["model_index.json"]


# ---- 6: resume is exact in samples ---------------------------------------------------------------------------
class RecordIndices(pl.Callback):
    """Appends the sample indices of every micro-batch to a file."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        with open(self.path, "a") as f:
            f.write(" ".join(str(i) for i in batch["index"].tolist()) + "\n")


def indices(path: Path) -> list[int]:
    return [int(i) for i in path.read_text().split()]


def student_weights(run_dir: Path) -> dict:
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    return ckpt["global_step"], ckpt["state_dict"]


def test_an_extended_finished_run_equals_an_uninterrupted_longer_run(run, tmp_path):
    """A run stopped by max_steps mid-epoch (Lightning counts the epoch as finished) and extended continues the epoch."""
    record = "+callbacks.record={_target_: test_safety.RecordIndices, path: %s}"
    assert run(tmp_path / "straight", "trainer.max_steps=6", record % (tmp_path / "straight.txt")) == 0
    assert run(tmp_path / "extended", "trainer.max_steps=2", record % (tmp_path / "extended.txt")) == 0
    code = run(tmp_path / "extended", "trainer.max_steps=6", "ckpt_path=last", record % (tmp_path / "extended.txt"))
    assert code == 0
    assert indices(tmp_path / "extended.txt") == indices(tmp_path / "straight.txt")
    (step_a, a), (step_b, b) = student_weights(tmp_path / "straight"), student_weights(tmp_path / "extended")
    assert step_a == step_b == 6 and a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def test_a_resume_with_another_batch_size_continues_with_exactly_the_next_samples(run, tmp_path):
    record = "+callbacks.record={_target_: test_safety.RecordIndices, path: %s}" % (tmp_path / "seen.txt")
    assert run(tmp_path / "run", "trainer.max_steps=3", "data.batch_size=4", record) == 0  # 12 samples
    assert run(tmp_path / "run", "trainer.max_steps=4", "data.batch_size=8", "ckpt_path=last", record) == 0  # 20
    assert run(tmp_path / "run", "trainer.max_steps=7", "data.batch_size=4", "ckpt_path=last", record) == 0  # 32
    assert run(tmp_path / "run", "trainer.max_steps=8", "data.batch_size=8", "ckpt_path=last", record) == 0  # +8
    sampler = ResumableSampler(32, seed=0)
    sampler.set_epoch(0)
    epoch0 = [i for i, _ in sampler]
    sampler.set_epoch(1)
    epoch1 = [i for i, _ in sampler]
    assert indices(tmp_path / "seen.txt") == epoch0 + epoch1[:8]


# ---- 2: a run folder that holds a run --------------------------------------------------------------------------
def snapshot(run_dir: Path) -> dict[str, str]:
    return {
        str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def cli(monkeypatch, cache_dir, demo_teacher_dir, shapes):
    """The whole Hydra app in-process (`python -m bksdm_lab.train ARGS`): writes .hydra/, runs its callbacks."""
    monkeypatch.setenv("BKSDM_CACHE_DIR", str(cache_dir))

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def go(*args: str) -> int:
        GlobalHydra.instance().clear()
        flags = [a for a in args if a == "-m"]  # before the overrides, as on a command line
        argv = [*flags, *FAST, f"data.root={shapes}", *(a for a in args if a != "-m")]
        monkeypatch.setattr(sys, "argv", ["bksdm_lab.train", *argv])
        try:
            train_app.main()
        except SystemExit as stop:
            return stop.code
        finally:
            GlobalHydra.instance().clear()
            HydraConfig.instance().cfg = None
        return 0

    yield go
    for handler in root.handlers:  # Hydra's job logging (train.log, the console of this test's capture)
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_a_run_folder_holding_a_run_is_never_overwritten_unless_asked(cli, tmp_path, capsys):
    run_dir = tmp_path / "run"
    at = f"hydra.run.dir={run_dir}"
    assert cli(at, "trainer.max_steps=0") == 2  # a start refused by its checks leaves only Hydra's record ...
    assert sorted(p.name for p in run_dir.iterdir()) == [".hydra", ".lock", "train.log"]
    assert cli(at, "trainer.max_steps=2", "callbacks.checkpoint.every_n_train_steps=1") == 0  # ... so the fix may rerun
    first = snapshot(run_dir)
    assert {".hydra/config.yaml", "checkpoints/last.ckpt", "csv/metrics.csv"} <= set(first)
    capsys.readouterr()

    # a new run into it (with or without changes) is refused before anything is written
    for args in ([], ["trainer.max_steps=0"], ["trainer.max_steps=4"]):
        assert cli(at, *args) == 2
        err = capsys.readouterr().err
        assert f"hydra.run.dir='{run_dir}' already holds a run (.hydra, checkpoints, csv)" in err
        assert "overwrite=true" in err and "ckpt_path=last" in err
        assert snapshot(run_dir) == first

    # a resume that fails its checks leaves every old file as it was (its own record goes to .resumes/)
    assert cli(at, "ckpt_path=last", "arch=base", "trainer.max_steps=4") == 2
    assert "holds a student of arch=tiny, but this run asks for arch=base" in capsys.readouterr().err
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if not k.startswith(".resumes/")} == first

    # a resume continues metrics.csv and last.ckpt, and keeps the first run's .hydra/
    assert cli(at, "ckpt_path=last", "trainer.max_steps=4") == 0
    after = snapshot(run_dir)
    assert {k: v for k, v in after.items() if k.startswith(".hydra/")} == {
        k: v for k, v in first.items() if k.startswith(".hydra/")
    }
    assert not (run_dir / "checkpoints" / "last-v1.ckpt").exists()
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    steps = sorted({int(r["step"]) for r in rows if r.get("train/loss")})
    assert steps == [0, 1, 2, 3]  # the first run's rows kept, the resumed run's appended
    records = sorted((run_dir / ".resumes").glob("*/.hydra/overrides.yaml"))
    assert len(records) == 2 and "ckpt_path=last" in records[-1].read_text()
    assert read_checkpoint(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 4

    # overwrite=true whose inputs fail their checks replaces nothing (Hydra's record of it included)
    before = snapshot(run_dir)
    assert cli(at, "overwrite=true", "trainer.max_steps=0") == 2
    assert snapshot(run_dir) == before
    # overwrite=true replaces the run: nothing of the old one is left to be mistaken for the new one's
    assert cli(at, "overwrite=true", "trainer.max_steps=1") == 0
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    assert not (run_dir / ".resumes").exists() and not (run_dir / ".overwrite").exists()
    assert "overwrite=true" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    assert "overwrite=true: removed the earlier run's" in (run_dir / "train.log").read_text()
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    assert sorted({int(r["step"]) for r in rows if r.get("train/loss")}) == [0]


def test_the_guard_refuses_a_checkpoint_of_another_run_into_a_run_folder(tmp_path, capsys):
    from omegaconf import OmegaConf

    from bksdm_lab.common.rundir import GuardRunDir

    run_dir, other = tmp_path / "run", tmp_path / "other" / "checkpoints" / "last.ckpt"
    (run_dir / "pipeline").mkdir(parents=True)
    other.parent.mkdir(parents=True)
    torch.save({"state_dict": {}, "global_step": 2}, other)  # another run's real checkpoint
    config = OmegaConf.create(
        {"ckpt_path": str(other), "overwrite": False,
         "hydra": {"run": {"dir": str(run_dir)}, "output_subdir": ".hydra", "job": {"name": "train"}}}
    )  # fmt: skip
    with pytest.raises(SystemExit) as stop:
        GuardRunDir().on_run_start(config)
    assert stop.value.code == 2 and "already holds a run (pipeline)" in capsys.readouterr().err
    assert config.hydra.output_subdir == ".hydra"  # nothing redirected: the start is refused
    GuardRunDir().on_run_start(OmegaConf.merge(config, {"hydra": {"run": {"dir": str(tmp_path / "empty")}}}))
    assert (tmp_path / "empty" / ".lock").is_file()
    with pytest.MonkeyPatch.context() as env:  # a DDP rank > 0 joins the run rank 0 holds: no lock, no check
        env.setenv("RANK", "1")
        GuardRunDir().on_run_start(OmegaConf.merge(config, {"hydra": {"run": {"dir": str(tmp_path / "rank1")}}}))
    assert not (tmp_path / "rank1").exists()

    # a sweep folder holding jobs: refused; resumed, every job's record goes beside its run's
    (tmp_path / "sweep" / "0_lr=1" / "checkpoints").mkdir(parents=True)
    sweep = OmegaConf.create({"ckpt_path": None, "hydra": {"sweep": {"dir": str(tmp_path / "sweep")}}})
    with pytest.raises(SystemExit) as stop:
        GuardRunDir().on_multirun_start(sweep)
    assert stop.value.code == 2 and "hydra.sweep.dir=" in capsys.readouterr().err
    resumed = OmegaConf.merge(sweep, {"ckpt_path": "last", "hydra": {"overrides": {"hydra": []}}})
    GuardRunDir().on_multirun_start(resumed)
    (override,) = resumed.hydra.overrides.hydra
    assert override.startswith("hydra.output_subdir=.resumes/") and override.endswith("/.hydra")


def test_no_secret_reaches_the_stored_config_the_console_or_the_log(cli, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET_FROM_ENV")
    secrets, sweep, failed = ("hf_SECRET_FROM_ENV", "hf_SECRET_FROM_CLI"), tmp_path / "sweep", tmp_path / "failed"
    assert cli("-m", f"hydra.sweep.dir={sweep}", "hub.token=hf_SECRET_FROM_CLI", "trainer.max_steps=1") == 0
    (job,) = [p.parent.parent for p in sweep.rglob(".hydra/config.yaml")]
    # a job failing past its checks: Hydra prints its overrides
    assert cli(f"hydra.run.dir={failed}", "hub.token=hf_SECRET_FROM_CLI", "+trainer.no_such_argument=1") == 1
    out, err = capsys.readouterr()
    assert "hub.token=<redacted>" in out and "Error executing job with overrides: [" in err
    files = [p for p in [*sweep.rglob("*"), *failed.rglob("*")] if p.is_file()]
    stored = {".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "csv/hparams.yaml", "train.log"}
    assert stored | {"checkpoints/last.ckpt"} <= {str(p.relative_to(job)) for p in files if job in p.parents}
    for name, text in [("stdout", out), ("stderr", err), *((p, p.read_bytes().decode("latin-1")) for p in files)]:
        assert not any(secret in text for secret in secrets), name
    assert read_checkpoint(job / "checkpoints" / "last.ckpt")["bksdm"]["config"]["hub"]["token"] == "<redacted>"


def hold_elsewhere(folder: Path) -> int:
    """Another process (forked) holds ``folder`` as a run does; returns its pid (kill it to end that run)."""
    from bksdm_lab.common import rundir

    ready, done = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: hold the folder, say so, wait to be killed
        try:
            rundir._HELD.clear()
            rundir.hold(folder, "hydra.run.dir")
            os.write(done, b"held")
            time.sleep(300)
        finally:
            os._exit(0)
    os.close(done)
    assert os.read(ready, 4) == b"held"
    os.close(ready)
    return pid


def test_a_run_folder_is_held_by_its_run_until_the_process_ends(cli, tmp_path, capsys):
    run_dir = tmp_path / "run"
    at = f"hydra.run.dir={run_dir}"
    holder = hold_elsewhere(run_dir)
    try:
        for args in (["trainer.max_steps=1"], ["overwrite=true", "trainer.max_steps=1"]):
            assert cli(at, *args) == 2  # another run still writes there: refused, nothing written
            (line,) = capsys.readouterr().err.strip().splitlines()
            assert line.startswith(f"bksdm_lab.train: error: hydra.run.dir='{run_dir}' is in use by a run"), line
            assert f"(pid {holder} on {os.uname().nodename}, started " in line, line
            assert [p.name for p in run_dir.iterdir()] == [".lock"]
    finally:
        os.kill(holder, signal.SIGKILL)  # the kernel drops the lock with the process
        os.waitpid(holder, 0)
    assert cli(at, "trainer.max_steps=0") == 2  # past the lock, to the checks
    assert "trainer.max_steps=0" in capsys.readouterr().err and (run_dir / ".hydra").is_dir()


@pytest.fixture()
def mount_tmpfs():
    """Mount a small tmpfs (a real full disk, a read-only folder) at a folder; skipped where mounting is not allowed."""
    mounted, umount = [], shutil.which("umount") or "umount"

    def mount(at: Path, *options: str) -> Path:
        at.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs", str(at)], capture_output=True)
        if proc.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
        mounted.append(at)
        return at

    yield mount
    for at in reversed(mounted):
        subprocess.run([umount, "-l", str(at)], check=False)


def test_a_read_only_run_folder_or_a_machine_without_slurm_is_one_line(cli, tmp_path, capsys, mount_tmpfs, monkeypatch):
    read_only = mount_tmpfs(tmp_path / "ro", "ro", "size=64k")
    for run_dir in (read_only, read_only / "run"):
        assert cli(f"hydra.run.dir={run_dir}") == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line == (
            f"bksdm_lab.train: error: hydra.run.dir='{run_dir}' is not writable (Read-only file system): choose a "
            "folder you can write to"
        )
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))  # no SLURM here
    assert cli("-m", "hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path / 'sweep'}") == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("bksdm_lab.train: error: hydra/launcher=slurm submits the jobs with SLURM, but srun and ")
    assert not (tmp_path / "sweep").exists()


# ---- 7: Ctrl-C saves a checkpoint at a step boundary and stops non-zero ----------------------------------------
class SigintAt(pl.Callback):
    """Sends this process SIGINT at the start of one micro-batch (a user pressing Ctrl-C)."""

    def __init__(self, batch: int):
        self.batch, self.seen = batch, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.seen == self.batch:
            os.kill(os.getpid(), signal.SIGINT)
        self.seen += 1


def test_ctrl_c_saves_a_checkpoint_says_where_and_the_resume_is_exact(run, tmp_path, capsys):
    accumulate, handler = "trainer.accumulate_grad_batches=2", signal.getsignal(signal.SIGINT)
    assert run(tmp_path / "straight", accumulate, "trainer.max_steps=4") == 0
    sigint = "+callbacks.sigint={_target_: test_safety.SigintAt, batch: 2}"  # mid-step 2 (micro-batches 2 and 3)
    assert run(tmp_path / "stopped", accumulate, "trainer.max_steps=4", sigint) == 130
    err = capsys.readouterr().err
    saved = tmp_path / "stopped" / "checkpoints" / "last.ckpt"
    assert f"interrupted (Ctrl-C) at step 2; checkpoint saved to {saved}" in err
    assert signal.getsignal(signal.SIGINT) is handler  # handed back
    assert student_weights(tmp_path / "stopped")[0] == 2  # at the step boundary, not mid-accumulation
    assert run(tmp_path / "stopped", accumulate, "trainer.max_steps=4", "ckpt_path=last") == 0
    (step_a, a), (step_b, b) = student_weights(tmp_path / "straight"), student_weights(tmp_path / "stopped")
    assert step_a == step_b == 4
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def exit_code_of(run_dir: Path) -> int:
    (run_file,) = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    (code,) = [r.exit.exit_code for r in wandb_offline.records(run_file) if r.HasField("exit")]
    return code


@pytest.mark.slow
def test_ctrl_c_on_the_real_command_saves_a_checkpoint_and_w_and_b_records_a_failure(cache_dir, shapes, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [PYTHON, "-m", "bksdm_lab.train", *FAST, f"data.root={shapes}", "logger=wandb_csv", "trainer.max_steps=10000",
         "callbacks.checkpoint.every_n_train_steps=2", f"hydra.run.dir={run_dir}"],
        env=subprocess_env(cache_dir), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while not (run_dir / "checkpoints" / "step_000002.ckpt").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-3000:]
    saved = run_dir / "checkpoints" / "last.ckpt"
    assert f"checkpoint saved to {saved}" in err and "resume with the same hydra.run.dir and ckpt_path=last" in err
    step = read_checkpoint(saved)["global_step"]
    assert step >= 2 and not (run_dir / "pipeline").exists()
    assert exit_code_of(run_dir) == 130  # W&B: failed, not finished
