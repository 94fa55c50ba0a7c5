"""Every `python -m bksdm_lab.train ...` command in experiments/ names config groups and options that exist."""

import re
import shlex

import pytest
from conftest import CONF, REPO

EXPERIMENTS = REPO / "experiments"
README = EXPERIMENTS / "README.md"
SCRIPTS = sorted(EXPERIMENTS.glob("*.sh"))
GROUPS = ("experiment", "arch", "teacher", "trainer", "data", "loss", "optimizer", "logger", "callbacks", "paths")
ENTRY = "python -m bksdm_lab.train"


def commands(path) -> list[str]:
    """The text from `python -m bksdm_lab.train` to the end of its backtick span (README) or line (scripts)."""
    text = path.read_text()
    if path.suffix == ".md":
        spans = re.findall(r"`([^`\n]*)`", text)
        spans += [line for block in re.findall(r"```\w*\n(.*?)```", text, re.S) for line in block.splitlines()]
    else:
        spans = text.splitlines()
    return [s[s.index(ENTRY) :].split("#")[0] for s in spans if ENTRY in s]


def group_choices(command: str) -> list[tuple[str, str]]:
    """(group, option) for every `group=a,b` token; shell variables ($arch) are left to the script tests."""
    out = []
    for token in shlex.split(command)[3:]:
        group, sep, value = token.lstrip("+~").partition("=")
        if sep and group in GROUPS and "$" not in value:
            out += [(group, option) for option in value.split(",")]
    return out


README_COMMANDS = commands(README)
SCRIPT_COMMANDS = [(p.name, c) for p in SCRIPTS for c in commands(p)]


def test_readme_covers_the_recipes():
    assert len(README_COMMANDS) >= 6
    seen = {choice for c in README_COMMANDS for choice in group_choices(c)}
    for choice in [("experiment", "demo"), ("experiment", "paper"), ("experiment", "paper_v2"), ("trainer", "ddp")]:
        assert choice in seen, choice
    for arch in ("base", "small", "tiny"):
        assert ("arch", arch) in seen
    assert any(c.split()[3:4] == ["-m"] for c in README_COMMANDS), "a multirun example"
    assert {"demo.sh", "paper.sh"} <= {p.name for p in SCRIPTS}
    assert {name for name, _ in SCRIPT_COMMANDS} == {p.name for p in SCRIPTS}


@pytest.mark.parametrize("command", README_COMMANDS + [c for _, c in SCRIPT_COMMANDS])
def test_command_uses_existing_config_options(command):
    choices = group_choices(command)
    missing = [f"{g}={o}" for g, o in choices if not (CONF / g / f"{o}.yaml").is_file()]
    assert not missing, f"{command!r}: no conf/<group>/<option>.yaml for {missing}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_script_is_strict_executable_and_passes_args_through(script):
    text = script.read_text()
    assert text.startswith("#!"), script
    assert "set -euo pipefail" in text
    assert script.stat().st_mode & 0o111, f"{script} is not executable"
    assert '"$@"' in text
    for default in re.findall(r"\$\{1:-([\w-]+)\}", text):  # paper.sh's default arch
        assert (CONF / "arch" / f"{default}.yaml").is_file(), default


@pytest.mark.parametrize("command", README_COMMANDS)
def test_readme_command_composes(command):
    """Hydra accepts every override (also the plain keys, e.g. loss.weights.feat_kd); sweeps use each value."""
    from hydra import compose, initialize_config_dir

    tokens = [t for t in shlex.split(command)[3:] if t != "-m"]
    runs = [[]]
    for token in tokens:
        key, _, value = token.partition("=")
        values = value.split(",") if "," in value else [value]
        runs = [[*r, f"{key}={v}"] for r in runs for v in values]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for overrides in runs:
            cfg = compose("train", overrides=overrides)
            for override in overrides:
                group, _, option = override.partition("=")
                if group == "experiment":
                    assert cfg.experiment_name == option
                elif group == "arch":
                    assert cfg.arch.name == option
                elif group == "trainer" and option == "ddp":
                    assert cfg.trainer.strategy == "ddp"
