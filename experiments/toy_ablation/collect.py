"""Score the toy ablation's runs with the world's judge and write its table (step 2 of experiments/toy_ablation).

    python experiments/toy_ablation/collect.py --out DIR [--prompts 200] [--threads 2] [--judge full|short] [--short]

For every run of ``DIR/runs.csv`` (written by ablation.py) it generates one image per world prompt (a fixed set:
``judge.world_prompts(N)``, seed 1234) from the run's exported pipeline (``bksdm_lab.evaluation.sampling``: PNDM,
25 steps, the world's guidance, per-prompt seeds; into ``<run>/world_eval/``, resumable), and scores them with the
judge (``bksdm_lab.world.judge``): FID in this world against renders of fresh real scenes, and caption agreement.
The teacher (its upper bound) and real renders of the same prompts (the judge's ceiling) are scored the same way.

Writes ``DIR/scores.csv`` (one row per run, plus teacher and real), ``DIR/table.csv`` and ``DIR/table.md`` (mean, std
and min-max over seeds per variant, and wall time) and prints the table with the three claims of the paper's
ablation checked against it.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ablation import RUNS_CSV, SETTINGS, read_runs  # noqa: E402

from bksdm_lab.world import judge as J  # noqa: E402
from bksdm_lab.world import scenes  # noqa: E402

METRICS = ["fid", "agree/all", *(f"agree/{a}" for a in scenes.ATTRIBUTES)]
RUN_METRICS = ["task_loss_end"]  # the mean train/loss_task of the run's last 5 logged steps (metrics.csv)
# (better, worse, the claim): checked on the mean over seeds, with whether the seeds' ranges overlap
CLAIMS = [
    ("bksdm", "random_init", "teacher init beats random init"),
    ("task_out_kd", "task_only", "output KD beats the task loss alone"),
    ("bksdm", "task_out_kd", "feature KD adds to output KD"),
    ("feat_kd_norm", "task_out_kd", "feature KD adds to output KD, each layer's term normalised"),
]
EVAL_DIR = "world_eval"


def generate(pipeline: str, prompts: list[str], out: Path, settings: dict) -> None:
    from bksdm_lab.evaluation.sampling import generate_images, load_pipeline

    if (out / "images").is_dir() and len(list((out / "images").glob("*.png"))) == len(prompts):
        return
    pipe, name = load_pipeline(pipeline=pipeline, device="cpu", precision="fp32")
    generate_images(pipe, prompts, out, grid=16, progress=False, model=name, **settings)


def task_loss_end(run_dir: Path, last: int = 5) -> float:
    """The mean ``train/loss_task`` over the run's last ``last`` logged values (nan without metrics.csv)."""
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        return math.nan
    with path.open(newline="", encoding="utf-8") as f:
        values = [float(r["train/loss_task"]) for r in csv.DictReader(f) if r.get("train/loss_task") not in (None, "")]
    return statistics.fmean(values[-last:]) if values else math.nan


def summarise(values: list[float]) -> dict:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan}
    return {
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else math.nan,
        "min": min(vals),
        "max": max(vals),
    }


def fmt(stats: dict, digits: int) -> str:
    if math.isnan(stats["mean"]):
        return "-"
    if math.isnan(stats["std"]):
        return f"{stats['mean']:.{digits}f}"
    return (
        f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f} [{stats['min']:.{digits}f}, {stats['max']:.{digits}f}]"
    )


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="experiments/toy_ablation/collect.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder ablation.py wrote")
    parser.add_argument("--prompts", type=int, default=None, help="world prompts per run (default 200; --short 16)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (it runs after the trainings)")
    parser.add_argument("--reference", type=int, default=None, help="real renders for FID (default 1000; --short 64)")
    parser.add_argument("--judge", choices=sorted(J.JUDGES), default=None, help="default full (--short: short)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 25; --short 4)")
    parser.add_argument("--cache-dir", default=None, help="the judge's cache (default $BKSDM_CACHE_DIR)")
    parser.add_argument("--short", action="store_true")
    args = parser.parse_args(argv)
    args.out = args.out.expanduser().absolute()
    if not (args.out / SETTINGS).is_file() or not (args.out / RUNS_CSV).is_file():
        parser.error(f"{args.out} holds no {SETTINGS} and {RUNS_CSV}: run experiments/toy_ablation/ablation.py first")
    return args


def score_runs(out: Path, settings: dict, runs: dict, sampling: dict, judge, prompts, reference) -> tuple[list, list]:
    """One row of scores per finished run of the ablation's variants, then the teacher's and the real renders';
    and the runs without an exported pipeline."""
    rows, missing = [], []
    for (variant, seed), run in sorted(runs.items()):
        if variant not in settings["variants"]:
            continue
        pipeline = Path(run["run_dir"]) / "pipeline"
        if int(run["returncode"]) != 0 or not (pipeline / "model_index.json").is_file():
            missing.append(f"{variant} seed {seed}")
            continue
        generate(str(pipeline), prompts, Path(run["run_dir"]) / EVAL_DIR, sampling)
        scores = J.score_folder(judge, Path(run["run_dir"]) / EVAL_DIR, reference)
        scores["task_loss_end"] = task_loss_end(Path(run["run_dir"]))
        rows.append({"model": variant, "seed": seed, "wall_s": float(run["wall_s"]), **scores})
        print(f"{variant} seed {seed}: fid {scores['fid']:.3f} agree/all {scores['agree/all']:.3f}", flush=True)
    generate(settings["teacher"]["pretrained"], prompts, out / "teacher_eval", sampling)
    rows.append(
        {"model": "teacher", "seed": "", "wall_s": "", **J.score_folder(judge, out / "teacher_eval", reference)}
    )
    rows.append({"model": "real renders", "seed": "", "wall_s": "", **J.score_real(judge, prompts, reference)})
    return rows, missing


def variant_table(settings: dict, rows: list[dict]) -> list[dict]:
    """Per variant the mean, std, min and max over seeds of every metric; then the teacher's and real renders' rows."""
    table = []
    for variant in settings["variants"]:
        mine = [r for r in rows if r["model"] == variant]
        if not mine:
            continue
        entry = {"variant": variant, "description": settings["descriptions"].get(variant, ""), "seeds": len(mine)}
        for key in [*METRICS, *RUN_METRICS, "wall_s"]:
            for stat, value in summarise([r[key] for r in mine]).items():
                entry[f"{key}_{stat}"] = value
        table.append(entry)
    for r in rows[-2:]:
        entry = {"variant": r["model"], "description": "upper bound" if r["model"] == "teacher" else "judge's ceiling"}
        entry["seeds"] = ""
        for key in METRICS:
            entry.update({f"{key}_mean": r[key], f"{key}_std": "", f"{key}_min": "", f"{key}_max": ""})
        table.append(entry)
    return table


def stat(entry: dict, key: str) -> dict:
    """A table entry's mean, std, min and max of ``key`` (nan where it has none)."""
    get = entry.get
    return {
        s: (get(f"{key}_{s}") if get(f"{key}_{s}") not in ("", None) else math.nan)
        for s in ("mean", "std", "min", "max")
    }


def markdown_rows(table: list[dict]) -> list[str]:
    """The markdown table, one row per entry."""
    lines = [
        "| variant | seeds | FID (world) ↓ | agreement, all ↑ | colour | shape | size | position | count | background "
        "| task loss, last 5 logs ↓ | wall s / run |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in table:
        cells = [
            f"{e['variant']} ({e['description']})",
            str(e["seeds"]),
            fmt(stat(e, "fid"), 2),
            fmt(stat(e, "agree/all"), 3),
        ]
        cells += [fmt({**stat(e, f"agree/{a}"), "std": math.nan}, 3) for a in scenes.ATTRIBUTES]
        cells.append(fmt(stat(e, "task_loss_end"), 3) if e["seeds"] != "" else "")
        cells.append(fmt({**stat(e, "wall_s"), "std": math.nan}, 0) if e["seeds"] != "" else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def claim_lines(table: list[dict]) -> list[str]:
    """Each of :data:`CLAIMS` whose two variants ran, checked on FID, agreement and task loss."""
    lines = []
    by = {e["variant"]: e for e in table}
    for better, worse, claim in CLAIMS:
        if better not in by or worse not in by:
            continue
        parts = []
        for key, name, lower, digits in (
            ("fid", "FID", True, 2),
            ("agree/all", "agreement", False, 3),
            ("task_loss_end", "task loss", True, 4),
        ):
            b, w = stat(by[better], key), stat(by[worse], key)
            if math.isnan(b["mean"]) or math.isnan(w["mean"]):
                continue
            if b["mean"] == w["mean"]:
                verdict = "tie"
            else:
                wins = (b["mean"] < w["mean"]) == lower
                apart = (b["max"] < w["min"] or b["min"] > w["max"]) if not math.isnan(b["std"]) else False
                verdict = ("yes" if wins else "no") + (", seed ranges apart" if apart else ", seed ranges overlap")
            parts.append(f"{name} {b['mean']:.{digits}f} vs {w['mean']:.{digits}f} ({verdict})")
        lines.append(f"- {claim}? {better} vs {worse}: " + "; ".join(parts))
    return lines


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out
    n_prompts = args.prompts or (16 if args.short else 200)
    n_reference = args.reference or (64 if args.short else 1000)
    judge_cfg = J.JUDGES[args.judge or ("short" if args.short else "full")]
    settings = json.loads((out / SETTINGS).read_text(encoding="utf-8"))
    runs = read_runs(out)
    teacher = settings["teacher"]
    sampling = {
        "steps": args.steps or (4 if args.short else 25),
        "guidance": teacher["guidance"],
        "resolution": teacher["resolution"],
        "batch_size": 50,
        "seed": 1234,
        "seed_mode": "per-prompt",
        "generator_device": "cpu",
    }
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    judge, report = J.load_judge(judge_cfg, args.cache_dir, log=print)
    print(f"judge {report['path']}: held-out accuracy " + json.dumps(report["held_out_accuracy"]))
    prompts = J.world_prompts(n_prompts)
    reference = J.reference_images(n_reference, judge_cfg.size)
    rows, missing = score_runs(out, settings, runs, sampling, judge, prompts, reference)
    write_csv(out / "scores.csv", rows, ["model", "seed", "wall_s", "n", *METRICS, *RUN_METRICS])
    table = variant_table(settings, rows)
    write_csv(out / "table.csv", table, list(dict.fromkeys(k for e in table for k in e)))
    lines = [
        f"Toy ablation: {settings['base'] + settings['overrides']}, teacher {teacher['pretrained']}, "
        f"{teacher['max_steps']} steps; {n_prompts} world prompts, {sampling['steps']} PNDM steps, guidance "
        f"{sampling['guidance']}; judge {Path(report['path']).name}; FID against {n_reference} real renders. "
        "Mean ± std [min, max] over seeds.",
        "",
        *markdown_rows(table),
        "",
        *claim_lines(table),
        "",
        f"collect: {time.perf_counter() - start:.0f} s wall",
    ]
    (out / "table.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    print(f"wrote {out / 'scores.csv'}, {out / 'table.csv'}, {out / 'table.md'}")
    if missing:
        print("error: runs without an exported pipeline (not scored): " + ", ".join(missing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
