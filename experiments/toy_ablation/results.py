"""Read the toy ablation's folder back (for notebooks/toy_ablation.ipynb): its settings and runs, each run's
metrics.csv, the curves over seeds, and the images of the same prompts from the teacher, each variant and the
world's real renders.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import SETTINGS, read_runs  # noqa: E402


def load(out: str | Path) -> dict:
    """``{"out", "settings", "runs": {(variant, seed): row of runs.csv}, "metrics": {(variant, seed): read_metrics}}``
    (``metrics`` holds the runs that wrote a metrics.csv)."""
    out = Path(out)
    settings = json.loads((out / SETTINGS).read_text(encoding="utf-8"))
    runs = read_runs(out)
    metrics = {}
    for key, run in sorted(runs.items()):
        path = Path(run["run_dir"]) / "csv" / "metrics.csv"
        if path.is_file():
            metrics[key] = read_metrics(path)
    return {"out": out, "settings": settings, "runs": runs, "metrics": metrics}


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """A Lightning CSVLogger metrics.csv as ``{column: [(step, value), ...]}`` (empty cells skipped)."""
    columns: dict[str, list[tuple[int, float]]] = {}
    with Path(path).open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            step = row.pop("step", "")
            if step in (None, ""):
                continue
            for name, value in row.items():
                if value not in (None, ""):
                    columns.setdefault(name, []).append((int(float(step)), float(value)))
    return columns


def curve(ablation: dict, variant: str, column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None:
    """(steps, mean, min, max) of ``column`` over the variant's seeds, on the steps every seed logged; None if none."""
    series = [dict(m[column]) for (v, _), m in ablation["metrics"].items() if v == variant and column in m]
    steps = sorted(set.intersection(*(set(s) for s in series))) if series else []
    if not steps:
        return None
    values = np.array([[s[t] for t in steps] for s in series])
    return np.array(steps), values.mean(0), values.min(0), values.max(0)


def layer_columns(ablation: dict, variant: str, term: str = "feat_kd") -> list[str]:
    """The per-layer columns ``train/<term>/<layer>`` the variant's runs logged."""
    found = {c for (v, _), m in ablation["metrics"].items() if v == variant for c in m}
    return sorted(c for c in found if c.startswith(f"train/{term}/"))


def samples(ablation: dict, num: int = 6, seed: int | None = None) -> tuple[list[str], dict[str, list[np.ndarray]]]:
    """The first ``num`` evaluation prompts and, per column, their images as HxWx3 uint8 arrays: the real render of
    each prompt's scene, the teacher's, then each variant's (its first seed, or ``seed``) that collect.py generated."""
    from collect import EVAL_DIR

    from bksdm_lab.world import judge as J
    from bksdm_lab.world import scenes

    images, prompts = J.read_folder(ablation["out"] / "teacher_eval")
    prompts, columns = prompts[:num], {"teacher": images[:num]}
    for variant in ablation["settings"]["variants"]:
        seeds = sorted(s for v, s in ablation["runs"] if v == variant)
        if not seeds:
            continue
        pick = seed if seed in seeds else seeds[0]
        folder = Path(ablation["runs"][(variant, pick)]["run_dir"]) / EVAL_DIR
        if (folder / "prompts.csv").is_file():
            columns[f"{variant} s{pick}"] = J.read_folder(folder)[0][:num]
    side = columns["teacher"][0].width
    real = J.render_scenes([scenes.parse_caption(p) for p in prompts], side, seed=7)  # as judge.score_real renders
    arrays = {"real render": list(real.permute(0, 2, 3, 1).numpy())}
    arrays.update({name: [np.asarray(im) for im in ims] for name, ims in columns.items()})
    return prompts, arrays
