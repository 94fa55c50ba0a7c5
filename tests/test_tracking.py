"""Checkpoints that survive crashes, the NaN policy, secrets, loggers: the real command in subprocesses."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import wandb_offline
from conftest import PYTHON, arch_cfg, subprocess_env
from test_module import make_batch

from bksdm_lab.common.checkpoint import AtomicCheckpointIO, read_checkpoint
from bksdm_lab.distill.losses import KDLoss, LossTerm, OutputKD
from bksdm_lab.distill.module import DistillModule, NonFiniteLossError
from bksdm_lab.models.students import init_student_from_teacher

RESUME_ARGS = [
    "experiment=demo",
    "trainer.max_steps=24",
    "callbacks.checkpoint.every_n_train_steps=4",
    "callbacks.samples.prompts=[]",
    "logger=csv",
    "~callbacks.export",
    "data.max_samples=64",
    "callbacks.ema.decay=0.9",
]


def train_cmd(*args):
    return [PYTHON, "-m", "bksdm_lab.train", *args]


def final_state(run_dir: Path) -> dict:
    return read_checkpoint(run_dir / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_sigkill_then_resume_ends_with_the_same_weights(cache_dir, tmp_path):
    """A run killed with SIGKILL and resumed with ckpt_path=last equals an uninterrupted run, bit for bit.

    64 samples, micro-batch 8 x 2 accumulation: 4 optimizer steps per epoch, so the 24 steps cross
    epochs and the kill lands mid-epoch as often as not.
    """
    env = subprocess_env(cache_dir)
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    subprocess.run(
        train_cmd(*RESUME_ARGS, f"hydra.run.dir={straight}"), env=env, cwd=tmp_path, check=True, capture_output=True
    )

    proc = subprocess.Popen(
        train_cmd(*RESUME_ARGS, f"hydra.run.dir={crashed}"),
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not (crashed / "checkpoints" / "step_000012.ckpt").exists() and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = final_state(crashed)["global_step"]
    assert 8 <= killed_at < 24  # last.ckpt is written right after step_000012.ckpt: it may still hold step 8
    # a kill mid-write leaves at most a hidden temporary file, never a corrupt last.ckpt (it loaded above)

    resumed = subprocess.run(
        train_cmd(*RESUME_ARGS, f"hydra.run.dir={crashed}", "ckpt_path=last"),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    assert not list((crashed / "checkpoints").glob(".*tmp*"))  # stale temporaries are cleaned up on resume
    a, b = final_state(straight), final_state(crashed)
    assert a["global_step"] == b["global_step"] == 24
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("ema_student.") for k in a["state_dict"])
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        assert torch.equal(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"])
    assert (
        a["loops"]["fit_loop"]["state_dict"]["combined_loader"]
        == b["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    )


class NaNOnCall(LossTerm):
    """A task loss that turns NaN on its n-th call: the bad part the error must name."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.calls = n, 0

    def forward(self, x):
        self.calls += 1
        value = torch.nn.functional.mse_loss(x.student_out, x.target)
        return value * float("nan") if self.calls == self.n else value


def nan_module(teacher, policy: str, n: int = 3) -> DistillModule:
    arch = arch_cfg("tiny")
    loss = KDLoss({"task": NaNOnCall(n), "out_kd": OutputKD()}, {"task": 1.0, "out_kd": 1.0})
    return DistillModule(
        teacher, init_student_from_teacher(teacher.unet, arch), loss, optimizer=torch.optim.AdamW, nonfinite=policy
    )


def fit(module, tmp_path, steps=5):
    batches = [make_batch(module.teacher.tokenizer) for _ in range(steps)]
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
        callbacks=[pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=False)],
    )
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    return trainer


def test_nonfinite_loss_stops_naming_the_part_and_saves_the_last_good_state(teacher, tmp_path):
    module = nan_module(teacher, "stop")
    with pytest.raises(NonFiniteLossError, match=r"step 2 .*task=nan.*\(nonfinite=stop\)"):
        fit(module, tmp_path)
    (saved,) = list((tmp_path / "ckpt").glob("nonfinite_step000002.ckpt"))
    ckpt = read_checkpoint(saved)
    assert ckpt["global_step"] == 2
    for key, value in module.student.state_dict().items():  # the NaN step never updated the weights
        assert torch.equal(ckpt["state_dict"][f"student.{key}"], value)
        assert torch.isfinite(value).all()


def test_nonfinite_loss_skip_policy_skips_the_batch(teacher, tmp_path, capsys):
    module = nan_module(teacher, "skip")
    trainer = fit(module, tmp_path)
    assert "non-finite loss" in capsys.readouterr().out
    assert trainer.global_step == 5  # Lightning counts the step; the optimizer saw no gradient for it
    assert module.loss.terms["task"].calls == 5
    assert all(torch.isfinite(p).all() for p in module.student.parameters())


def test_bad_nonfinite_policy_is_named(teacher):
    with pytest.raises(ValueError, match="nonfinite='ignore' is not one of"):
        nan_module(teacher, "ignore")


def test_atomic_checkpoint_write_survives_a_crash(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1, "w": torch.ones(3)}, path)

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert read_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.slow
def test_secrets_never_reach_files(cache_dir, tmp_path):
    env = subprocess_env(cache_dir)
    env["HF_TOKEN"] = "hf_SECRET_FROM_ENV"
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        train_cmd(
            "experiment=demo",
            "trainer.max_steps=2",
            "logger=all",
            "callbacks.samples.prompts=[]",
            "+wandb_api_key=wb_SECRET_FROM_CLI",
            f"hydra.run.dir={run_dir}",
        ),
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".wandb") for p in files) and any(p.name == "config.yaml" for p in files)
    for path in files:
        data = path.read_bytes()
        assert b"hf_SECRET_FROM_ENV" not in data, path
        assert b"wb_SECRET_FROM_CLI" not in data, path
    assert "<redacted>" in (run_dir / ".hydra" / "overrides.yaml").read_text()
    ckpt = final_state(run_dir)
    assert ckpt["bksdm"]["config"]["hub"]["token"] == "<redacted>"
    assert "wb_SECRET_FROM_CLI" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_logger_choices(cache_dir, tmp_path):
    sweep = tmp_path / "sweep"
    subprocess.run(
        train_cmd(
            "-m",
            "experiment=demo",
            "trainer.max_steps=2",
            "callbacks.samples.prompts=[]",
            "~callbacks.export",
            "trainer.log_every_n_steps=1",
            "logger=none,tensorboard,csv",
            f"hydra.sweep.dir={sweep}",
        ),
        env=subprocess_env(cache_dir),
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    jobs = {p.name.split("logger=")[1].split(",")[0]: p for p in sweep.iterdir() if p.is_dir() and "logger=" in p.name}
    assert sorted(jobs) == ["csv", "none", "tensorboard"]
    assert list((jobs["tensorboard"] / "tensorboard").glob("events.out.tfevents.*"))
    assert (jobs["csv"] / "csv" / "metrics.csv").is_file()
    for job in jobs.values():
        assert not (job / "wandb").exists()
        assert (job / "checkpoints" / "last.ckpt").is_file()
    assert not (jobs["none"] / "csv").exists() and not (jobs["none"] / "tensorboard").exists()


@pytest.mark.slow
def test_a_failed_sweep_job_does_not_stop_the_next(cache_dir, tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.run(
        train_cmd(
            "-m",
            "experiment=demo",
            "trainer.max_steps=2",
            "callbacks.samples.prompts=[]",
            "loss.weights.task=1e40,1",  # the first job's loss overflows at its first step (a failure mid-run)
            f"hydra.sweep.dir={sweep}",
        ),
        env=subprocess_env(cache_dir),
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "1 multirun job(s) failed" in proc.stderr and "non-finite loss at step 0" in proc.stderr
    failed, ok = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert "NonFiniteLossError: non-finite loss" in (failed / "FAILED").read_text()
    assert not (ok / "FAILED").exists() and (ok / "checkpoints" / "last.ckpt").is_file()
    runs = []
    for job in (failed, ok):
        (run_file,) = list((job / "wandb").glob("offline-run-*/run-*.wandb"))
        records = wandb_offline.records(run_file)
        (exit_code,) = [r.exit.exit_code for r in records if r.HasField("exit")]  # wandb.finish() ran, in a finally
        assert exit_code == (1 if job == failed else 0), job  # W&B shows the failed job as failed, not finished
        runs.append(next(r.run.run_id for r in records if r.HasField("run")))
    assert runs[0] != runs[1]
