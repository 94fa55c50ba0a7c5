"""Shared fixtures: one torch thread, no hub, W&B offline, and a tiny SD-v1-topology teacher built once."""

import json
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


DEMO_SYNTHETIC = {"seed": 0, **OmegaConf.to_container(OmegaConf.load(CONF / "data" / "demo.yaml").synthetic)}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """For pytest-xdist workers (`make test` runs `-n 2`; pyproject sets `--dist loadgroup --no-loadscope-reorder`):
    the tests of a module that share a module-scoped fixture (test_train_e2e's demo run, ...) form one group, run by
    one worker, so the fixture is built once (tests that name an xdist_group themselves keep it: give all the users of
    one module-scoped fixture the same group); and the slow tests are handed out first, so that no long run starts
    last while the other worker sits idle. A plain (serial) run keeps the file order."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs.values() if info is not None else ()
        shared = any(d.scope in ("class", "module", "package") for chain in defs for d in chain)
        if shared and item.get_closest_marker("xdist_group") is None:  # a group of its own already keeps it together
            item.add_marker(pytest.mark.xdist_group(item.path.name))
    items[:] = sorted(items, key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(trylast=True, specname="pytest_collection_modifyitems")  # after pytest-xdist's own hook
def pytest_collection_modifyitems_xdist_group_ids(config, items):
    """pytest-xdist 3.8 tells the scheduler an item's group by appending `@<group>` to `item._nodeid`, which pytest 9.2
    no longer reads (it keeps the node id in `item._id`): `--dist loadgroup` then silently spreads a group over the
    workers (pytest-xdist issue 1386). Append the suffix where the node id is kept, as pytest-xdist meant; nothing to
    do where the suffix is already there (older pytest, or a fixed pytest-xdist)."""
    if not (os.environ.get("PYTEST_XDIST_WORKER") and config.getvalue("loadgroup")):
        return
    for item in items:
        groups = {
            str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")
        }
        node_id = getattr(item, "_id", None)
        suffixed = item.nodeid.rfind("@") > item.nodeid.rfind("]")  # pytest-xdist's own test for a group suffix
        if groups and not suffixed and node_id is not None and hasattr(type(node_id), "parse"):
            item._id = type(node_id).parse(f"{item.nodeid}@{'_'.join(sorted(groups))}")


@pytest.fixture
def no_hydra_state_left():
    """For a command run in-process as ``__main__``: Hydra's --help, and a job ended by SystemExit, leave its global
    state set; cleared here, so later in-process tests compose from a clean start."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    yield
    GlobalHydra.instance().clear()
    HydraConfig.instance().cfg = None


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """The demo's BKSDM_CACHE_DIR, shared by the session, holding only what the demo itself writes there: its
    teacher (built once, by `demo_teacher_dir`, as the demo builds it) and its own 256-image set (written by the
    first demo run). So a test that runs the demo sees what a user's first `experiment=demo` run sees, whatever
    ran before it. Anything else found here at the end of the session is an error."""
    path = tmp_path_factory.mktemp("bksdm_cache")
    yield path
    found = {str(p.relative_to(path)) for p in path.glob("*/*") if not p.name.startswith(".")}
    found |= {p.name for p in path.iterdir() if p.is_file() or p.name != "demo"}
    assert found <= {"demo/teacher", "demo/data"}, f"tests wrote into the demo's cache {path}: {sorted(found)}"
    readme = path / "demo" / "data" / "README.json"
    if readme.exists():
        written = json.loads(readme.read_text())
        assert {k: written.get(k) for k in DEMO_SYNTHETIC} == DEMO_SYNTHETIC, f"{readme}: {written}"


@pytest.fixture(scope="session")
def demo_teacher_dir(cache_dir) -> Path:
    """The demo's tiny teacher, built once where `teacher=demo` looks for it (only the teacher goes there)."""
    from bksdm_lab.models.demo import build_demo_teacher
    from bksdm_lab.models.teachers import shipped_configs

    return build_demo_teacher(cache_dir / "demo" / "teacher", shipped_configs("demo"))


@pytest.fixture(scope="session")
def demo_data_dir(tmp_path_factory) -> Path:
    """32 synthetic captioned images (80 px) in a folder of their own: never the demo's 256-image set."""
    from bksdm_lab.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("shapes32") / "data", num_images=32, size=80)


@pytest.fixture(scope="session")
def demo_export_dir(demo_teacher_dir, tmp_path_factory) -> Path:
    """The demo teacher with a BK-SDM-Tiny student (initialised from it), exported as a plain diffusers folder."""
    from bksdm_lab.models.export import export_pipeline
    from bksdm_lab.models.students import init_student_from_teacher
    from bksdm_lab.models.teachers import load_teacher

    teacher = load_teacher(OmegaConf.create({"name": "demo", "pretrained": str(demo_teacher_dir)}))
    student = init_student_from_teacher(teacher.unet, arch_cfg("tiny"))
    out = tmp_path_factory.mktemp("exported") / "bk-sdm-tiny-demo-export"
    export_pipeline(teacher, student, out)
    return out


@pytest.fixture(scope="session")
def demo_v2_teacher_dir(tmp_path_factory) -> Path:
    """A tiny teacher of SD-v2 topology (linear projections in the transformers, a head count per stage,
    v-prediction), built once like the demo's v1 teacher."""
    from bksdm_lab.models.demo import build_demo_teacher
    from bksdm_lab.models.teachers import shipped_configs

    configs = shipped_configs("demo")
    configs["unet"].update(use_linear_projection=True, attention_head_dim=[2, 4, 4, 4])
    configs["scheduler"].update(prediction_type="v_prediction")
    return build_demo_teacher(tmp_path_factory.mktemp("demo_v2") / "teacher", configs)


@pytest.fixture(scope="session")
def demo_teachers(demo_teacher_dir, demo_v2_teacher_dir) -> dict[str, Path]:
    """The demo teachers by SD version: {"v1": folder, "v2": folder}."""
    return {"v1": demo_teacher_dir, "v2": demo_v2_teacher_dir}


def student_pipeline(teacher_dir: Path, arch: str, pipeline_class=None):
    """The teacher's pipeline (``pipeline_class``, default StableDiffusionPipeline) with its U-Net replaced by the
    ``arch`` student initialised from it: what a user gets from an export of that student."""
    from diffusers import StableDiffusionPipeline

    from bksdm_lab.models.students import init_student_from_teacher

    pipe = (pipeline_class or StableDiffusionPipeline).from_pretrained(teacher_dir, safety_checker=None)
    pipe.unet = init_student_from_teacher(pipe.unet, arch_cfg(arch))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def compose_train_cfg(run_dir: Path, *overrides: str):
    """conf/train.yaml composed as `python -m bksdm_lab.train hydra.run.dir=<run_dir> <overrides>` would compose it,
    registered as the current Hydra config (so ${hydra:...} resolves); `bksdm_lab.train.main(cfg)` then runs the app
    in-process (hydra.main passes a composed config straight through)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"hydra.run.dir={run_dir}", *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = cfg.hydra.run.dir
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture()
def compose_train(tmp_path, monkeypatch, cache_dir):
    """compose_train_cfg into this test's own run dir (`<tmp_path>/run`), with the demo's cache."""
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setenv("BKSDM_CACHE_DIR", str(cache_dir))
    yield lambda *overrides: compose_train_cfg(tmp_path / "run", *overrides)
    HydraConfig.instance().cfg = None


def train_in_process(cache_dir: Path, run_dir: Path, *overrides: str):
    """`python -m bksdm_lab.train hydra.run.dir=<run_dir> <overrides>` in-process, with BKSDM_CACHE_DIR=cache_dir
    (for module-scoped fixtures, which cannot use monkeypatch); returns what main() returns."""
    from unittest import mock

    from hydra.core.hydra_config import HydraConfig

    from bksdm_lab import train as train_app

    with mock.patch.dict(os.environ, {"BKSDM_CACHE_DIR": str(cache_dir)}):
        try:
            return train_app.main(compose_train_cfg(run_dir, *overrides))
        finally:
            HydraConfig.instance().cfg = None


def run_app(main, argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """A Hydra app's `main()` in-process as its command line would run it (`sys.argv`): (exit code, stdout, stderr)."""
    import logging

    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setattr(sys, "argv", [main.__module__, *map(str, argv)])
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        HydraConfig.instance().cfg = None
        # Hydra's job logging points the root logger at this test's captured stdout and a file in the run folder:
        # undo that, or later tests' log records go to closed streams
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
    out, err = capsys.readouterr()
    return code, out, err


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
