"""Clusters and sweeps: the held-out loss the Optuna sweeper minimises, SLURM requeue
resuming from last.ckpt, the SLURM launcher preset with a user's conf/local values, and (slow tier) an Optuna
sweep of the demo that resumes its SQLite study and a multirun through submitit's local executor.
"""

import csv
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
import yaml
from conftest import CONF, PYTHON, compose_train_cfg, subprocess_env
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from bksdm_lab import train as train_app
from bksdm_lab.common import rundir
from bksdm_lab.common.checkpoint import read_checkpoint
from bksdm_lab.data.common import DataError
from bksdm_lab.data.folder import FolderDataModule
from bksdm_lab.data.synthetic import make_synthetic_dataset
from bksdm_lab.distill import checks

# a few optimizer steps of the demo on this module's 32 images, 8 of them held out: micro-batch 4 x 2 accumulation
# (3 optimizer steps an epoch, the last one of an epoch on a single micro-batch), CSV only, no samples, no export
FAST = [
    "experiment=demo",
    "~data.synthetic",
    "logger=csv",
    "~callbacks.export",
    "callbacks.samples.prompts=[]",
    "data.batch_size=4",
    "data.val_samples=8",
    "trainer.accumulate_grad_batches=2",
    "trainer.log_every_n_steps=1",
    "callbacks.checkpoint.every_n_train_steps=100",
]


def base(overrides, shapes: Path) -> list[str]:
    """FAST on this module's images, less what another data format has no key for."""
    if any(o.startswith("data=") for o in overrides):
        return [o for o in FAST if o != "~data.synthetic"]
    return [*FAST, f"data.root={shapes}"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """This module's own 32 captioned images."""
    return make_synthetic_dataset(tmp_path_factory.mktemp("cluster_data") / "shapes", num_images=32, size=80)


@pytest.fixture()
def compose_run(monkeypatch, cache_dir, demo_teacher_dir, shapes):
    """conf/train.yaml composed as `python -m bksdm_lab.train` composes it, into a run folder of the test's choosing."""
    monkeypatch.setenv("BKSDM_CACHE_DIR", str(cache_dir))

    def make(run_dir: Path, *overrides: str):
        return compose_train_cfg(run_dir, *base(overrides, shapes), *overrides)

    yield make
    HydraConfig.instance().cfg = None


def metrics(run_dir: Path) -> list[dict]:
    with (run_dir / "csv" / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def val_losses(run_dir: Path) -> dict[int, float]:
    """val/loss by Lightning's `step` column."""
    return {int(r["step"]): float(r["val/loss"]) for r in metrics(run_dir) if r.get("val/loss")}


def student(run_dir: Path) -> tuple[int, dict]:
    ckpt = read_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    return ckpt["global_step"], {k: v for k, v in ckpt["state_dict"].items() if k.startswith("student.")}


# ---- the held-out split ----------------------------------------------------------------------------------------
def _indices(loader) -> list[int]:
    return [int(i) for batch in loader for i in batch["index"]]


def test_the_last_val_samples_are_held_out_unflipped_and_sharded(shapes):
    from bksdm_lab.models.demo import byte_level_tokenizer

    def module(**kw):
        return FolderDataModule(shapes, byte_level_tokenizer(), resolution=64, batch_size=3, seed=0, **kw)

    dm = module(val_samples=8)
    train = set(_indices(dm.train_dataloader()))
    assert train <= set(range(24)) and len(train) == 24 // 3 * 3  # drop_last: 8 batches of 3
    assert _indices(dm.val_dataloader()) == list(range(24, 32))  # in order, the last batch (2) kept
    # no flip on held-out samples: the first one equals the image loaded unflipped
    first = next(iter(dm.val_dataloader()))["pixel_values"][0]
    assert torch.equal(first, dm.dataset[(24, False)]["pixel_values"])
    # two ranks: disjoint halves of the same held-out set, the same number of samples each
    ranks = []
    for rank in (0, 1):
        dm.trainer = SimpleNamespace(global_rank=rank, world_size=2)
        ranks.append(_indices(dm.val_dataloader()))
    assert sorted(ranks[0] + ranks[1]) == list(range(24, 32)) and len(ranks[0]) == len(ranks[1]) == 4
    # nothing held out: no validation loader, the training sampler covers all 32
    plain = module()
    assert plain.val_dataloader() == [] and len(plain.train_dataloader().sampler) == 32
    with pytest.raises(DataError, match=r"data.val_samples=32 holds out all 32 samples"):
        module(val_samples=32)
    with pytest.raises(DataError, match=r"data.val_samples=-1 must be an integer >= 0"):
        module(val_samples=-1)


def test_held_out_problems_are_refused_before_loading(compose_run, tmp_path):
    cfg = compose_run(tmp_path / "run", "data.val_samples=32")
    assert checks.check_data(cfg) == ["data.val_samples=32 holds out all 32 samples: nothing is left to train on"]
    cfg = compose_run(tmp_path / "run", "data.val_samples=0", "optimized_metric=val/loss")
    (problem,) = checks.check_data(cfg)
    assert problem.startswith("optimized_metric=val/loss is the held-out loss, but data.val_samples=0")
    cfg = compose_run(tmp_path / "run", "data.val_samples=28", "data.batch_size=8")  # 4 left < one micro-batch
    (problem,) = checks.check_data(cfg)
    assert "has 4 samples, fewer than one micro-batch (data.batch_size=8)" in problem
    web = compose_run(tmp_path / "run", "data=webdataset", "data.shards=x.tar", "hparams_search=kd_weights")
    missing, held_out = checks.check_data(web)  # held-out samples (8 here, the preset's 16 otherwise): none in a stream
    assert missing == "data.shards: 1 of the 1 shards do not exist, e.g. ['x.tar']"
    assert held_out.startswith("data.val_samples=8: bksdm_lab.data.webdataset.WebDatasetDataModule streams")
    assert checks.check_values(compose_run(tmp_path / "run", "data.val_samples=-2")) == [
        "data.val_samples=-2 must be an integer >= 0 (0: no held-out set)"
    ]


# ---- validation during a fit -------------------------------------------------------------------------------------
def test_validation_leaves_training_unchanged_and_ends_at_the_last_step(compose_run, tmp_path):
    """val/loss every 2 optimizer steps and at the last (5), returned by main(); the same weights as the same run
    (same training samples) without validation."""
    with_val = tmp_path / "with_val"
    value = train_app.main(
        compose_run(
            with_val, "trainer.max_steps=5", "callbacks.validation.every_n_steps=2", "optimized_metric=val/loss"
        )
    )
    losses = val_losses(with_val)
    # after optimizer steps 2, 4 and 5 (an epoch's last step is a single micro-batch here), which Lightning's `step`
    # column labels 1, 3 and 4, as it labels train/loss: the optimizer steps done before the one that logged it
    assert sorted(losses) == [1, 3, 4], losses
    assert value == pytest.approx(losses[4], rel=1e-6)
    row = next(r for r in metrics(with_val) if r.get("val/loss") and int(r["step"]) == 4)
    assert {"val/loss_task", "val/loss_out_kd", "val/loss_feat_kd"} <= {k for k, v in row.items() if v}

    without = tmp_path / "without"
    assert train_app.main(compose_run(without, "trainer.max_steps=5", "~callbacks.validation")) is not None
    assert val_losses(without) == {}
    (step_a, a), (step_b, b) = student(with_val), student(without)
    assert step_a == step_b == 5 and a.keys() == b.keys()
    for key, tensor in a.items():
        assert torch.equal(tensor, b[key]), key  # bit for bit: validation draws nothing the training draws


def test_val_loss_is_identical_on_the_same_weights(teacher, shapes, tmp_path):
    """Fixed samples, noise, timesteps and posterior samples: two evaluations of the same weights agree exactly;
    other weights give another value."""
    from test_module import make_module

    dm = FolderDataModule(shapes, teacher.tokenizer, resolution=64, batch_size=3, seed=0, val_samples=8)
    module = make_module(teacher)

    def validate() -> dict[str, float]:
        trainer = pl.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, default_root_dir=tmp_path,
        )  # fmt: skip
        (out,) = trainer.validate(module, datamodule=dm, verbose=False)
        return out

    first = validate()
    second = validate()
    assert set(first) >= {"val/loss", "val/loss_task", "val/loss_out_kd", "val/loss_feat_kd"}
    assert first == second
    with torch.no_grad():
        module.student.conv_in.weight.mul_(1.1)
    assert validate()["val/loss"] != first["val/loss"]
    module.student_taps.remove()
    module.teacher_taps.remove()


# ---- SLURM requeue -----------------------------------------------------------------------------------------------
def test_a_requeued_slurm_job_resumes_from_last_ckpt(compose_run, tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    cfg = compose_run(run_dir, "trainer.max_steps=2", "data.val_samples=0", "~callbacks.validation")
    assert train_app.main(cfg) is not None and student(run_dir)[0] == 2
    last = run_dir / "checkpoints" / "last.ckpt"

    # not requeued: nothing to resume (and the guard refuses the folder, as before)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert train_app.resolve_ckpt_path(cfg, run_dir) is None
    guard = OmegaConf.create(
        {"ckpt_path": None, "overwrite": False,
         "hydra": {"run": {"dir": str(run_dir)}, "output_subdir": ".hydra", "job": {"name": "train"}}}
    )  # fmt: skip
    with pytest.raises(SystemExit):
        rundir.GuardRunDir().on_run_start(guard.copy())
    capsys.readouterr()

    # requeued by SLURM: the same job (same overrides, same folder) continues from last.ckpt
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert train_app.resolve_ckpt_path(cfg, run_dir) == str(last)
    assert train_app.resolve_ckpt_path(cfg, tmp_path / "elsewhere") is None  # no checkpoint there: a fresh start
    explicit = compose_run(run_dir, "ckpt_path=last")
    assert train_app.resolve_ckpt_path(explicit, run_dir) == str(last)
    # Lightning's own SLURM handler saved a newer hpc_ckpt_<n>.ckpt when the requeue signal came: that one
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    shutil.copy(last, hpc)
    assert train_app.resolve_ckpt_path(cfg, run_dir) == str(hpc) and rundir.resumes_here(str(hpc), run_dir)
    hpc.unlink()
    rundir.GuardRunDir().on_run_start(guard)  # allowed; its record goes beside the run's
    assert guard.hydra.output_subdir.startswith(".resumes/")

    # the whole app: the requeued job, with the same overrides but a longer max_steps, continues from step 2
    requeued = compose_run(run_dir, "trainer.max_steps=4", "data.val_samples=0", "~callbacks.validation")
    capsys.readouterr()
    assert train_app.main(requeued) is not None
    assert f"requeued job: resuming from {last}" in capsys.readouterr().err
    assert student(run_dir)[0] == 4
    steps = [int(r["step"]) for r in metrics(run_dir) if r.get("train/loss")]
    assert min(steps) < 2 < max(steps)  # metrics.csv continued, not restarted


def test_overwrite_clears_lightnings_hpc_checkpoints(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"x")
    assert rundir.clear_run(tmp_path) == ["checkpoints", "hpc_ckpt_1.ckpt"]
    assert not (tmp_path / "hpc_ckpt_1.ckpt").exists()


def test_a_continued_optuna_study_puts_its_trials_in_new_folders(tmp_path):
    """The guard lets a sweeper with a stored study continue into a sweep folder holding its earlier trials, and
    gives the new jobs their own folders; without a stored study it still refuses."""
    (tmp_path / "sweep" / "0_lr=1" / "checkpoints").mkdir(parents=True)
    sweep = {"dir": str(tmp_path / "sweep"), "subdir": "${hydra:job.num}_x"}
    config = OmegaConf.create(
        {
            "ckpt_path": None,
            "hydra": {"sweep": sweep, "sweeper": {"storage": "sqlite:///s.db"}, "overrides": {"hydra": []}},
        }
    )
    rundir.GuardRunDir().on_multirun_start(config)
    (override,) = OmegaConf.to_container(config.hydra.overrides.hydra)  # as Hydra reads it: not resolved here
    assert override.startswith("hydra.sweep.subdir='continued_") and override.endswith("_${hydra:job.num}_x'")
    with open_dict(config):
        config.hydra.sweeper.storage = None
    with pytest.raises(SystemExit):
        rundir.GuardRunDir().on_multirun_start(config)


# ---- the SLURM launcher preset -------------------------------------------------------------------------------------
LOCAL = """\
# @package _global_
cluster:
  partition: gpu-long
  account: proj-42
  qos: high
  nodes: 2
  gpus_per_node: 4
  cpus_per_task: 6
  mem_gb: 240
  timeout_min: 600
  max_requeues: 5
"""


def copy_conf(to: Path) -> None:
    """conf/ copied, less a user's own conf/local/ files (only the example travels)."""

    def ignore(folder, names):
        return [n for n in names if Path(folder).name == "local" and n != "example.yaml"]

    shutil.copytree(CONF, to, ignore=ignore)


def test_the_slurm_preset_takes_the_users_conf_local_values(tmp_path, monkeypatch):
    """hydra/launcher=slurm composes with the values of a conf/local/default.yaml (written into a copy of conf/), and
    Hydra's SlurmLauncher turns them into submitit's sbatch parameters (the submission itself is intercepted: no
    sbatch here)."""
    import submitit
    from hydra.utils import instantiate
    from submitit.slurm.slurm import SlurmExecutor

    conf = tmp_path / "conf"
    copy_conf(conf)
    (conf / "local" / "default.yaml").write_text(LOCAL)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(
            config_name="train",
            overrides=["hydra/launcher=slurm", "trainer=ddp", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    try:
        launcher_cfg = cfg.hydra.launcher
        assert launcher_cfg._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
        expected = {"partition": "gpu-long", "account": "proj-42", "qos": "high", "nodes": 2, "gpus_per_node": 4,
                    "tasks_per_node": 4, "cpus_per_task": 6, "mem_gb": 240, "timeout_min": 600, "max_num_timeout": 5}  # fmt: skip
        assert {k: launcher_cfg[k] for k in expected} == expected
        assert cfg.trainer.num_nodes == 2  # trainer=ddp asks Lightning for the allocation's nodes

        launcher = instantiate(launcher_cfg)
        launcher.setup(hydra_context=None, task_function=None, config=cfg)
        captured = {}

        def intercept(executor, fn, *args):
            captured["executor"], captured["jobs"] = executor, list(zip(*args))
            return []

        monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # "srun is there"
        monkeypatch.setattr(submitit.AutoExecutor, "map_array", intercept)
        assert launcher.launch([["arch=base"], ["arch=tiny"]], initial_job_idx=0) == []
        executor = captured["executor"]._executor
        assert isinstance(executor, SlurmExecutor) and executor.max_num_timeout == 5
        assert [job[0] for job in captured["jobs"]] == [["arch=base"], ["arch=tiny"]]
        sbatch = executor._make_submission_file_text("python -m bksdm_lab.train", "uid")
        for line in ("--partition=gpu-long", "--account=proj-42", "--qos=high", "--nodes=2", "--gpus-per-node=4",
                     "--ntasks-per-node=4", "--cpus-per-task=6", "--mem=240GB", "--time=600", "--signal=USR2@120"):  # fmt: skip
            assert f"#SBATCH {line}\n" in sbatch, (line, sbatch)
    finally:
        HydraConfig.instance().cfg = None


def test_without_conf_local_the_slurm_preset_says_what_is_missing(tmp_path):
    """The shipped defaults leave partition and account to the user (null: sbatch uses the cluster's defaults)."""
    conf = tmp_path / "conf"
    copy_conf(conf)
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    assert cfg.hydra.launcher.partition is None and cfg.hydra.launcher.account is None
    assert cfg.hydra.launcher.max_num_timeout == cfg.cluster.max_requeues == 3
    example = yaml.safe_load((CONF / "local" / "example.yaml").read_text())
    assert set(example["cluster"]) <= set(OmegaConf.to_container(cfg.cluster))


# ---- slow: the real commands ---------------------------------------------------------------------------------------
SHORT = [
    "trainer.max_steps=2",
    "trainer.log_every_n_steps=1",
    "logger=csv",
    "~callbacks.samples",
    "~callbacks.export",
    "callbacks.validation.every_n_steps=2",
    "callbacks.checkpoint.every_n_train_steps=100",
]


def _train(args: list[str], cache_dir: Path, cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PYTHON, "-m", "bksdm_lab.train", *args],
        cwd=cwd, env=subprocess_env(cache_dir), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


@pytest.mark.slow
def test_an_optuna_sweep_returns_a_best_value_and_resumes_its_study(cache_dir, demo_teacher_dir, tmp_path):
    import optuna

    # paths.log_dir stays `outputs` under the working folder (tmp_path): the study is outputs/optuna_kd_weights.db
    logs, sweep = tmp_path / "outputs", tmp_path / "sweep"
    args = ["hparams_search=kd_weights", "experiment=demo", f"hydra.sweep.dir={sweep}", *SHORT]
    first = _train([*args, "hydra.sweeper.n_trials=3"], cache_dir, tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["name"] == "optuna" and isinstance(results["best_value"], float)
    assert set(results["best_params"]) == {"loss.weights.out_kd", "loss.weights.feat_kd", "optimizer.lr"}
    trials = sorted(p for p in sweep.iterdir() if (p / "checkpoints" / "last.ckpt").is_file())
    assert len(trials) == 3
    values = []
    for trial in trials:
        losses = [float(r["val/loss"]) for r in metrics(trial) if r.get("val/loss")]
        assert losses, trial
        values.append(losses[-1])
    assert results["best_value"] == pytest.approx(min(values), rel=1e-6)

    # the same command with n_trials=4: the stored study goes on (4 trials in all, not 3 + 4), into the same sweep
    # folder, the new trial in a folder of its own
    second = _train([*args, "hydra.sweeper.n_trials=4"], cache_dir, tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "holds 3 finished trial(s): running 1 more (hydra.sweeper.n_trials=4 in all)" in second.stderr
    study = optuna.load_study(study_name="kd_weights", storage=f"sqlite:///{logs / 'optuna_kd_weights.db'}")
    assert len(study.trials) == 4
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    after = sorted(p for p in sweep.iterdir() if (p / "checkpoints" / "last.ckpt").is_file())
    assert len(after) == 4 and set(trials) < set(after)
    (new,) = set(after) - set(trials)
    assert new.name.startswith("continued_")
    for trial in trials:  # the earlier trials' folders are as they were
        assert not (trial / ".resumes").exists()


@pytest.mark.slow
def test_a_multirun_through_submitits_local_executor(cache_dir, demo_teacher_dir, tmp_path):
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=submitit_local", "experiment=demo", "arch=tiny,small", f"hydra.sweep.dir={sweep}"]
    done = _train([*args, *SHORT, "data.val_samples=0", "hydra.launcher.timeout_min=20"], cache_dir, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name.split("_", 1)[0] for p in jobs] == ["0", "1"] and "arch=small" in jobs[1].name
    for job in jobs:
        assert (job / "checkpoints" / "last.ckpt").is_file(), job
        assert any(r.get("train/loss") for r in metrics(job)), job
        assert not (job / "FAILED").exists()
    assert list((sweep / ".submitit").glob("*/*_result.pkl"))  # the jobs ran as submitit jobs
