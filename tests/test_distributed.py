"""Several ranks: per-sample noise (fast), and the demo with trainer=ddp on 2 CPU processes (gloo; slow)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import PYTHON, subprocess_env
from test_module import make_module

from bksdm_lab.common.checkpoint import read_checkpoint
from bksdm_lab.distill.checks import accumulation

DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true"]
SHORT = ["experiment=demo", "callbacks.samples.prompts=[]", "~callbacks.export", "logger=csv"]


# ---- fast: what a rank draws ----------------------------------------------------------------------
def draws(module, indices, step):
    batch = {"index": torch.tensor(indices)}
    generators = module.sample_generators(batch, step)
    return torch.stack([torch.randn(4, generator=g) for g in generators])


def test_each_sample_draws_its_own_noise_whatever_the_batch_split(teacher):
    module = make_module(teacher)
    rank0, rank1 = draws(module, [0, 2], step=0), draws(module, [1, 3], step=0)  # two ranks' micro-batches
    assert not torch.equal(rank0, rank1)  # the ranks draw different noise
    one_process = draws(module, [0, 1, 2, 3], step=0)  # the same global batch on one process
    assert torch.equal(one_process, torch.stack([rank0[0], rank1[0], rank0[1], rank1[1]]))
    assert not torch.equal(draws(module, [0, 2], step=1), rank0)  # a sample seen again gets fresh noise
    module.seed += 1
    assert not torch.equal(draws(module, [0, 2], step=0), rank0)  # another seed, other noise


def test_accumulation_is_derived_from_the_global_batch():
    assert accumulation(256, 64, 1) == 4
    assert accumulation(256, 64, 4) == 1
    assert accumulation(256, 16, 8) == 2
    with pytest.raises(ValueError, match=r"data.global_batch_size=256 .* data.batch_size=48 x 2 device\(s\) = 96"):
        accumulation(256, 48, 2)
    assert accumulation(256, 64, 4, asked=1) == 1  # an accumulation set beside the global batch that agrees
    assert accumulation(None, 64, 4, asked=3) == 3 and accumulation(None, 64, 4) == 1  # no global batch: it decides


def compose_train(*overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(__file__).parent.parent / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_an_accumulation_that_disagrees_with_the_global_batch_is_one_line_before_loading():
    from bksdm_lab.distill.checks import check_global_batch

    # the paper's 256 on 4 GPUs derives 1: an accumulation of 4 written beside it would silently be ignored
    both = compose_train("trainer=ddp", "trainer.devices=4", "trainer.accumulate_grad_batches=4")
    assert check_global_batch(both) == [
        "trainer.accumulate_grad_batches=4 disagrees with data.global_batch_size=256 (= data.batch_size=64 x 1 "
        "accumulation x 4 device(s)): set one of them, the other null (trainer.accumulate_grad_batches=null, or "
        "data.global_batch_size=null)"
    ]
    assert check_global_batch(compose_train("trainer=ddp", "trainer.devices=4")) == []  # derived: 1
    assert check_global_batch(compose_train("trainer.accumulate_grad_batches=4")) == []  # agrees on one device
    demo = compose_train("experiment=demo", *DDP)  # its own accumulation (2), no global batch: it decides
    assert demo.data.global_batch_size is None and check_global_batch(demo) == []
    assert len(check_global_batch(compose_train("experiment=demo", *DDP, "data.global_batch_size=16"))) == 1


# ---- slow: the real command on 2 processes -------------------------------------------------------------
def train(args, cache_dir, cwd, **kwargs):
    return subprocess.run(
        [PYTHON, "-m", "bksdm_lab.train", *args],
        env=subprocess_env(cache_dir),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=900,
        **kwargs,
    )


def ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-4000:]
    return proc


def ckpt(run_dir: Path) -> dict:
    return read_checkpoint(run_dir / "checkpoints" / "last.ckpt")


# each of these runs 2 ranks: under pytest-xdist (-n 2) they take turns on one worker rather than 4 ranks on 2 cores
two_ranks = pytest.mark.xdist_group("two_ranks")


# the demo on 2 ranks as the demo has it (W&B + csv, export; no sample prompts), 8 steps of 16 over 48 images, a
# checkpoint every 2 steps: run once uninterrupted (two_rank_run), and once killed and resumed
TWO_RANK_DEMO = [
    "experiment=demo",
    "callbacks.samples.prompts=[]",
    *DDP,
    "trainer.max_steps=8",
    "data.max_samples=48",
    "data.global_batch_size=16",
    "trainer.accumulate_grad_batches=null",  # the demo's 2 (one device): the global batch decides here
    "trainer.log_every_n_steps=1",
    "callbacks.checkpoint.every_n_train_steps=2",
    "callbacks.ema.decay=0.9",
]


@pytest.fixture(scope="module")
def two_rank_run(cache_dir, tmp_path_factory):
    """The uninterrupted 2-rank demo: its files (one run) and its weights (against the killed and resumed run)."""
    cwd = tmp_path_factory.mktemp("two_ranks")
    run = cwd / "straight"
    return run, ok(train([*TWO_RANK_DEMO, f"hydra.run.dir={run}"], cache_dir, cwd))


@pytest.mark.slow
@two_ranks
def test_demo_on_two_ranks_writes_one_run(two_rank_run):
    run, proc = two_rank_run
    assert "global batch 16 = micro-batch 8 x accumulation 1 x 2 device(s)" in proc.stdout + proc.stderr
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1  # one W&B run, not one per rank
    assert (run / "pipeline" / "model_index.json").is_file() and (run / "csv" / "metrics.csv").is_file()
    assert ckpt(run)["global_step"] == 8
    assert proc.stdout.count("bksdm_lab: run finished") == 1  # printed by rank 0 only


@pytest.mark.slow
@two_ranks
def test_two_ranks_equal_one_process_holding_the_same_global_batch(cache_dir, tmp_path):
    """One optimizer step of 8 images: 2 ranks x 4 (DDP averages the gradients) against 1 process x 8."""
    common = [*SHORT, "trainer.max_steps=1", "trainer.accelerator=cpu", "trainer.precision=32-true"]
    common += ["data.global_batch_size=8", "trainer.accumulate_grad_batches=null", "~callbacks.ema"]
    ok(train([*common, *DDP, "data.batch_size=4", f"hydra.run.dir={tmp_path / 'ddp'}"], cache_dir, tmp_path))
    ok(train([*common, "data.batch_size=8", f"hydra.run.dir={tmp_path / 'one'}"], cache_dir, tmp_path))
    ddp, one = ckpt(tmp_path / "ddp"), ckpt(tmp_path / "one")
    # Adam's first moment after one step is (1 - beta1) x the (clipped) gradient: compare the gradients
    g_ddp = [s["exp_avg"] for _, s in sorted(ddp["optimizer_states"][0]["state"].items())]
    g_one = [s["exp_avg"] for _, s in sorted(one["optimizer_states"][0]["state"].items())]
    assert len(g_ddp) == len(g_one) > 0
    flat_ddp, flat_one = torch.cat([g.flatten() for g in g_ddp]), torch.cat([g.flatten() for g in g_one])
    assert torch.linalg.vector_norm(flat_ddp) > 0
    relative = torch.linalg.vector_norm(flat_ddp - flat_one) / torch.linalg.vector_norm(flat_one)
    assert relative < 1e-5, f"gradients differ by {relative:.2e} (relative L2)"


@pytest.mark.slow
@two_ranks
def test_kill_then_resume_on_two_ranks_equals_an_uninterrupted_two_rank_run(two_rank_run, cache_dir, tmp_path):
    (straight, _), crashed = two_rank_run, tmp_path / "crashed"
    env = subprocess_env(cache_dir)
    cmd = [PYTHON, "-m", "bksdm_lab.train", *TWO_RANK_DEMO, f"hydra.run.dir={crashed}"]
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 600
    while not (crashed / "checkpoints" / "step_000004.ckpt").exists():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its step-4 checkpoint"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # both ranks, mid-run
    proc.wait()
    ok(train([*TWO_RANK_DEMO, f"hydra.run.dir={crashed}", "ckpt_path=last"], cache_dir, tmp_path))

    a, b = ckpt(straight), ckpt(crashed)
    assert a["global_step"] == b["global_step"] == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
