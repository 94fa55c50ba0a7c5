"""notebooks/quickstart.ipynb, executed top to bottom on a pipeline exported by a real (short) demo run."""

import subprocess

import nbformat
import pytest
from conftest import PYTHON, REPO, subprocess_env

NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def test_notebook_is_committed_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


@pytest.fixture(scope="module")
def demo_pipeline(cache_dir, tmp_path_factory):
    """The real demo command, cut to 4 steps with no periodic samples; returns its exported pipeline."""
    run_dir = tmp_path_factory.mktemp("nb_demo") / "run"
    args = ["experiment=demo", "trainer.max_steps=4", "callbacks.samples.every_n_steps=0", f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(
        [PYTHON, "-m", "bksdm_lab.train", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path_factory.mktemp("cwd"),
        env=subprocess_env(cache_dir),
        timeout=900,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    pipeline = run_dir / "pipeline"
    assert (pipeline / "model_index.json").is_file()
    return pipeline


def output_text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.data.get("text/plain", ""))
    return "".join(parts)


@pytest.mark.slow
def test_quickstart_notebook_runs(demo_pipeline, cache_dir, monkeypatch):
    from nbclient import NotebookClient

    # The kernel inherits os.environ.
    monkeypatch.setenv("BKSDM_DEMO_PIPELINE", str(demo_pipeline))
    monkeypatch.setenv("BKSDM_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # Run from notebooks/, so the notebook has to walk up to find the repository.
    NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    ).execute()

    texts = [output_text(c) for c in nb.cells if c.cell_type == "code"]
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error", out
    everything = "\n".join(texts)
    assert f"repository: {REPO}" in everything
    # (a) the composed recipe
    assert "experiment_name                  demo" in everything
    assert "arch.name                        tiny" in everything
    assert "optimizer.lr                     0.001" in everything
    assert "'feat_kd': 1.0" in everything
    # (b) the architecture report: BK-SDM-Tiny's U-Net parameters from SD-v1.4
    assert any("323,384,964" in t and "BK-SDM-Tiny [tiny]" in t for t in texts), everything[-3000:]
    # (c) the exported student, loaded with plain diffusers
    assert f"pipeline: {demo_pipeline}" in everything
    assert "student U-Net parameters: " in everything
    assert "layers_per_block     1" in everything
    assert "mid_block_type       None" in everything
    assert "image.size: (64, 64)" in everything
