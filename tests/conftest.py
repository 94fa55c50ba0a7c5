"""Shared fixtures: one torch thread, no hub, W&B offline, and a tiny SD-v1-topology teacher built once."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """A BKSDM_CACHE_DIR shared by the whole session (the demo teacher and data are built once)."""
    return tmp_path_factory.mktemp("bksdm_cache")


@pytest.fixture(scope="session")
def demo_teacher_dir(cache_dir) -> Path:
    from bksdm_lab.tools.demo import build_demo_teacher

    return build_demo_teacher(cache_dir / "demo" / "teacher")


@pytest.fixture(scope="session")
def demo_data_dir(cache_dir) -> Path:
    from bksdm_lab.tools.demo import make_synthetic_dataset

    return make_synthetic_dataset(cache_dir / "demo" / "data", num_images=32, size=80)


@pytest.fixture()
def teacher(demo_teacher_dir):
    """A freshly loaded tiny teacher (fp32, CPU), through the same from_pretrained path as real ones."""
    from bksdm_lab.models.teachers import load_teacher

    cfg = OmegaConf.create({"name": "demo", "pretrained": str(demo_teacher_dir), "revision": None, "variant": None})
    return load_teacher(cfg)


def arch_cfg(name: str) -> dict:
    """conf/arch/<name>.yaml composed by Hydra (so `defaults:` inheritance applies)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="arch", overrides=[f"+arch={name}"])
    return OmegaConf.to_container(cfg.arch, resolve=True)


def subprocess_env(cache_dir: Path) -> dict:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        BKSDM_CACHE_DIR=str(cache_dir),
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


PYTHON = sys.executable
