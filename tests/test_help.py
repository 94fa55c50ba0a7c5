"""`--help` of every command exits 0: Hydra's for the experiment commands, argparse's for the one-shot utilities."""

import subprocess

import pytest
from conftest import PYTHON, REPO, subprocess_env

HYDRA = ["train", "prepare", "generate", "evaluate", "bench", "arch"]
ARGPARSE = ["export", "data.download"]


@pytest.mark.parametrize("command", HYDRA + ARGPARSE + ["evaluate stats"])
def test_help_exits_0(command, tmp_path):
    module, *sub = command.split()
    proc = subprocess.run(
        [PYTHON, "-m", f"bksdm_lab.{module}", *sub, "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=subprocess_env(REPO / ".pytest_cache"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
    if module in HYDRA:
        assert "== Config ==" in proc.stdout
    if command in ("generate", "evaluate", "bench"):
        assert "sampling:" in proc.stdout and "steps: 25" in proc.stdout
    assert not list(tmp_path.iterdir())  # --help writes nothing
