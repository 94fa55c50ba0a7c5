"""The Hydra configuration: every option composes and resolves; the defaults are the paper's recipe."""

import re

import pytest
from conftest import CONF, REPO
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

import bksdm_lab  # noqa: F401  (registers the resolvers conf/train.yaml uses)
from bksdm_lab.distill.checks import accumulation

GROUPS = [
    "arch",
    "teacher",
    "data",
    "loss",
    "module",
    "optimizer",
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "experiment",
]
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((CONF / group).glob("*.yaml"))]

# Only the generic data options leave a value to fill in: where the data is.
EXPECTED_MISSING = {
    ("data", "folder"): ["data.root"],
    ("data", "latents"): ["data.root"],
    ("data", "webdataset"): ["data.shards"],
    ("data", "hf"): ["data.path"],
    ("teacher", "pipeline"): ["teacher.pretrained"],  # and the experiments built on it
    ("experiment", "lcm"): ["teacher.pretrained"],
    ("experiment", "lcm_lora"): ["teacher.pretrained"],
    ("experiment", "world_lcm"): ["teacher.pretrained"],
}


@pytest.fixture()
def hydra_conf():
    """Compose like `python -m bksdm_lab.train`, with the hydra node registered so ${hydra:...} resolves."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):

        def make(overrides, output_dir="/tmp/bksdm_run"):
            cfg = compose(config_name="train", overrides=overrides, return_hydra_config=True)
            with open_dict(cfg):  # set by Hydra at run time; compose leaves it ???
                cfg.hydra.runtime.output_dir = output_dir
            HydraConfig.instance().set_config(cfg)
            return cfg

        yield make
    HydraConfig.instance().cfg = None


def _missing(cfg) -> list[str]:
    user = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return sorted(OmegaConf.missing_keys(user))


def test_every_group_has_options():
    groups = {g for g, _ in OPTIONS}
    assert groups == set(GROUPS)
    assert {o for g, o in OPTIONS if g == "arch"} == {"base", "keep", "same", "small", "tiny"}
    assert {o for g, o in OPTIONS if g == "experiment"} == {
        "ablation",
        "demo",
        "paper",
        "paper_2m",
        "paper_v2",
        "world",
        "lcm",
        "lcm_lora",
        "world_lcm",
    }
    assert {o for g, o in OPTIONS if g == "teacher"} == {
        "demo",
        "sd14",
        "sd15",
        "sd21",
        "sd21base",
        "world",
        "pipeline",
    }


def test_readme_configuration_table_names_every_option():
    """The README's table of groups lists exactly the options in conf/: none missing, none removed since."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("| group | options | what |")
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        group, options = (cell.strip() for cell in line.strip("|").split("|")[:2])
        rows[group.strip("`")] = set(re.findall(r"`(\w+)`", options))
    assert set(GROUPS) - {"paths"} <= set(rows)
    for group, options in rows.items():
        if group != "local":  # the user's own git-ignored file
            assert options == {p.stem for p in (CONF / group).glob("*.yaml")}, f"README table, group {group}"


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_and_resolves(hydra_conf, group, option):
    cfg = hydra_conf([f"{group}={option}"], output_dir="/tmp/bksdm_run")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["paths"]["output_dir"] == "/tmp/bksdm_run"
    assert resolved["hydra"]["runtime"]["output_dir"] == "/tmp/bksdm_run"
    assert resolved["hydra"]["run"]["dir"].startswith(resolved["paths"]["log_dir"] + "/")
    assert resolved["data"]["resolution"] == resolved["teacher"]["resolution"]
    if "terms" in resolved["loss"]:  # a KD loss (loss=lcm has no feature terms)
        assert resolved["loss"]["terms"]["feat_kd"]["pairs"] == resolved["arch"]["feature_pairs"]
    assert resolved["trainer"]["default_root_dir"] == "/tmp/bksdm_run"
    assert resolved["callbacks"]["checkpoint"]["dirpath"] == "/tmp/bksdm_run/checkpoints"
    if group == "experiment":  # a _global_ package: it sets top-level keys, has no node of its own
        assert resolved["experiment_name"] == option
    elif (group, option) != ("logger", "none"):
        assert resolved[group], f"{group}={option} composed to an empty node"
    if group in ("arch", "teacher"):
        assert resolved[group]["name"] == option
    assert _missing(cfg) == EXPECTED_MISSING.get((group, option), [])


def test_logger_none_has_no_loggers(hydra_conf):
    cfg = hydra_conf(["logger=none"])
    assert not cfg.logger
    cfg = hydra_conf(["logger=wandb_csv"])
    assert set(cfg.logger) == {"wandb", "csv"}


def test_paper_recipe_defaults(hydra_conf):
    cfg = hydra_conf([])
    opt = cfg.optimizer
    assert opt._target_ == "torch.optim.AdamW" and opt._partial_ is True
    assert opt.lr == 5e-5
    assert list(opt.betas) == [0.9, 0.999]
    assert opt.weight_decay == 0.01
    assert opt.eps == 1e-8
    assert cfg.data.batch_size == 64
    assert cfg.data.random_flip is True
    assert cfg.data.resolution == 512
    assert str(cfg.data.root).endswith("preprocessed_212k")
    assert cfg.data.global_batch_size == 256 and cfg.trainer.accumulate_grad_batches is None  # 64 x 4 on one GPU
    assert accumulation(cfg.data.global_batch_size, cfg.data.batch_size, 1, cfg.trainer.accumulate_grad_batches) == 4
    assert cfg.trainer.gradient_clip_val == 1.0
    assert cfg.trainer.gradient_clip_algorithm == "norm"
    assert cfg.trainer.max_steps == 50000
    assert cfg.trainer.precision == "16-mixed"
    assert dict(cfg.loss.weights) == {"task": 1.0, "out_kd": 1.0, "feat_kd": 1.0}
    assert cfg.teacher.pretrained == "CompVis/stable-diffusion-v1-4"
    assert cfg.teacher.name == "sd14"
    assert cfg.arch.name == "tiny"
    assert cfg.module.step.gradient_checkpointing is True  # as the paper
    assert cfg.lr_scheduler is None  # constant LR


def test_paper_experiments_pin_the_recipe(hydra_conf):
    paper = hydra_conf(["experiment=paper", "arch=base"])
    assert paper.arch.name == "base" and paper.teacher.name == "sd14"
    assert paper.optimizer.lr == 5e-5 and paper.data.batch_size == 64 and paper.trainer.max_steps == 50000
    v2 = hydra_conf(["experiment=paper_v2"])
    assert v2.teacher.name == "sd21base"
    assert v2.teacher.pretrained == "stabilityai/stable-diffusion-2-1-base"
    assert v2.data.batch_size == 32 and accumulation(v2.data.global_batch_size, 32, 1) == 4


def test_demo_experiment_is_small_and_offline(hydra_conf):
    cfg = hydra_conf(["experiment=demo"])
    assert cfg.teacher.name == "demo" and cfg.teacher.resolution == 64
    assert cfg.trainer.accelerator == "cpu" and cfg.trainer.precision == "32-true"
    assert cfg.logger.wandb.offline is True
    assert cfg.module.step.gradient_checkpointing is False
    assert cfg.data.batch_size == 8 and cfg.data.num_workers == 0


def test_unknown_arch_lists_the_options():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as info:
            compose(config_name="train", overrides=["arch=nonexistent"])
    msg = str(info.value)
    assert "Could not find 'arch/nonexistent'" in msg
    assert "Available options in 'arch'" in msg
    for option in ("base", "small", "tiny"):
        assert f"\t{option}\n" in msg


def test_a_group_option_that_does_not_exist_is_one_line_before_composing(capsys):
    from bksdm_lab.common.cli import check_group_choices

    check_group_choices("train", ["arch=tiny", "hydra/launcher=submitit_local", "experiment=null", "arch.init=random"])
    with pytest.raises(SystemExit) as stop:
        check_group_choices("train", ["-m", "arch=tiny,smal", "loss=bksdm"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err == "bksdm_lab.train: error: arch='smal' is not one of: base, keep, same, small, tiny\n"
