"""Evaluation results to Weights & Biases: one ``eval`` run with the numbers, the settings and the grid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

METRICS = ("fid", "is", "is_std", "clip_score")


def log_results(results: dict[str, Any], out_dir: str | Path, project: str, name: str | None, group: str | None = None):
    """Log ``results`` (a ``results.json`` record) as ``eval/<metric>`` plus ``eval/grid``; returns the run's dir.
    ``WANDB_MODE=offline`` writes a local run under ``out_dir/wandb`` that ``wandb sync`` uploads later."""
    import wandb

    out_dir = Path(out_dir)
    run = wandb.init(
        project=project,
        name=name,
        group=group,
        job_type="eval",
        dir=str(out_dir),
        config=results,
        reinit="finish_previous",
    )
    try:
        metrics = {f"eval/{k}": results[k] for k in METRICS if results.get(k) is not None}
        grid = out_dir / "grid.png"
        if grid.is_file():
            metrics["eval/grid"] = wandb.Image(str(grid))
        run.log(metrics)
        run.summary.update({k: v for k, v in metrics.items() if k != "eval/grid"})
        return run.dir
    finally:
        run.finish()
