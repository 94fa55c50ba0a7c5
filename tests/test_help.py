"""`--help` of every command exits 0: Hydra's for the experiment commands, argparse's for the one-shot utilities.

In-process (the command module run as ``__main__`` with its argv), so the suite pays the imports once; the real
command lines run as processes in the slow tier (train, export, generate, evaluate, bench, prepare, arch)."""

import runpy
import sys

import pytest

HYDRA = ["train", "prepare", "generate", "evaluate", "bench", "arch", "importance", "finetune", "lora_transfer"]
ARGPARSE = ["export", "data.download"]


@pytest.mark.usefixtures("no_hydra_state_left")
@pytest.mark.parametrize("command", HYDRA + ARGPARSE + ["evaluate stats"])
def test_help_exits_0(command, tmp_path, monkeypatch, capsys):
    module, *sub = command.split()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [f"bksdm_lab/{module}.py", *sub, "--help"])
    with pytest.raises(SystemExit) as stop:
        runpy.run_module(f"bksdm_lab.{module}", run_name="__main__", alter_sys=False)
    out = capsys.readouterr().out
    assert stop.value.code in (0, None) and out.strip()
    if module in HYDRA:
        assert "== Config ==" in out
    if command in ("generate", "evaluate", "bench"):
        assert "sampling:" in out and "steps: 25" in out
    assert not list(tmp_path.iterdir())  # --help writes nothing
