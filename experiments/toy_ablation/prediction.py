"""Does the block-importance ranking predict which students distil best? (step 3 of experiments/toy_ablation)

    python experiments/toy_ablation/prediction.py --out DIR [--seeds 0,1,2] [--parallel 2] [--prompts 200]
                                                  [--short] [-- hydra overrides for every command]

1. ``python -m bksdm_lab.importance`` on the world teacher (into ``DIR/importance/``, once): every removable layer
   scored with the teacher's weights, no training.
2. Among the one-layer-smaller patterns of one size (the largest such group), the two best-ranked (without the
   layers that matter least) and the two worst-ranked (without those that matter most) are distilled, each with every seed (ablation.py, into
   ``DIR/prediction/``), and scored (collect.py).
3. ``DIR/prediction.md``: per pattern its importance rank and its students' scores (mean, [min, max] over seeds), and
   whether the ranking held: both best-ranked patterns' students beat both worst-ranked ones on the ranked metric.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from bksdm_lab.importance import override_list

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
from ablation import teacher_of  # noqa: E402

SHORT = ["num_prompts=4", "sampling.steps=2", "world.judge=short", "world.reference=64", "budget.params=null"]


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(
        prog="experiments/toy_ablation/prediction.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--out", type=Path, required=True, help="the toy ablation's folder")
    parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; --short: 0)")
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=200, help="world prompts per importance candidate")
    parser.add_argument("--short", action="store_true", help="a smoke test: 4 prompts, 2 steps, 4-step students")
    args = parser.parse_args(argv)
    args.out, args.overrides = args.out.expanduser().absolute(), extra
    args.seeds = args.seeds or ("0" if args.short else "0,1,2")
    return args


def run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print("$ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd, cwd=REPO, env=env).returncode:
        sys.exit(f"error: {cmd[1:3]} failed")


def pick(layers: list[dict]) -> tuple[list[dict], list[dict]]:
    """Among the removable layers whose removal leaves the same size, the best-ranked patterns (without the two layers
    that matter least: the smallest drops) and the worst-ranked (without the two that matter most)."""
    by_size = defaultdict(list)
    for row in layers:
        if row.get("rank"):
            by_size[row["params"]].append(row)
    group = sorted(max(by_size.values(), key=len), key=lambda r: float(r["drop"]))
    if len(group) < 4:
        sys.exit(f"error: no four removable layers of one size (largest group: {[r['layer'] for r in group]})")
    return group[:2], group[-2:]


def patterns(best: list[dict], worst: list[dict]) -> dict:
    out = {}
    for tag, rows in (("best", best), ("worst", worst)):
        for row in rows:
            out[f"without_{row['layer']}"] = {
                "overrides": override_list(json.loads(row["keep"])),
                "description": f"{tag}-ranked: without {row['layer']} (importance rank {row['rank']})",
                "tag": tag,
            }
    return out


def verdict(record: dict, names: dict, scores: list[dict]) -> list[str]:
    key = record["settings"]["rank_by"]
    lower = record["settings"]["lower_is_better"]
    per = defaultdict(list)
    for r in scores:
        if r["model"] in names:
            per[r["model"]].append(float(r[key]))
    lines = [
        f"Block importance ({record['settings']['teacher']}, ranked by {key}; {len(record['settings']['prompts'])} "
        "prompts, no training) against the students distilled from the same patterns.",
        "",
        f"| pattern | importance rank | drop in {key} at init | students' {key}, mean [min, max] | seeds |",
        "|---|---|---|---|---|",
    ]
    rows = {r["layer"]: r for r in record["layers"]}
    for name, v in names.items():
        vals, layer = per.get(name, []), name.removeprefix("without_")
        cell = f"{statistics.fmean(vals):.3f} [{min(vals):.3f}, {max(vals):.3f}]" if vals else "-"
        lines.append(
            f"| {v['description']} | {rows[layer]['rank']} | {float(rows[layer]['drop']):.3f} | {cell} | {len(vals)} |"
        )
    best = [n for n, v in names.items() if v["tag"] == "best"]
    worst = [n for n, v in names.items() if v["tag"] == "worst"]
    if not all(per.get(n) for n in names):
        return [*lines, "", "- not every pattern's students were scored: no verdict"]
    mean = {n: statistics.fmean(per[n]) for n in names}
    better = (lambda a, b: a < b) if lower else (lambda a, b: a > b)
    held = all(better(mean[b], mean[w]) for b in best for w in worst)
    apart = all(
        better(max(per[b]) if lower else min(per[b]), min(per[w]) if lower else max(per[w]))
        for b in best
        for w in worst
    )
    return [
        *lines,
        "",
        f"- the ranking held after distillation: {'yes' if held else 'no'} (both best-ranked patterns' "
        f"students {'beat' if held else 'do not both beat'} both worst-ranked ones on the mean {key}"
        f"{'; seed ranges apart' if apart else '; seed ranges overlap' if held else ''})",
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    teacher = [o for o in args.overrides if o.startswith(("teacher.", "paths."))]
    importance = args.out / "importance"
    if not (importance / "importance.json").is_file():
        guidance = teacher_of(args.overrides)["guidance"]  # the world's, as the students are scored (collect.py)
        run([sys.executable, "-m", "bksdm_lab.importance", "teacher=world", f"sampling.guidance={guidance:g}", "score_proposals=false",
             f"num_prompts={args.prompts}", *(SHORT if args.short else []), *teacher, f"out={importance}"])  # fmt: skip
    record = json.loads((importance / "importance.json").read_text(encoding="utf-8"))
    best, worst = pick(record["layers"])
    names = patterns(best, worst)
    folder = args.out / "prediction"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "patterns.json").write_text(json.dumps(names, indent=2) + "\n", encoding="utf-8")
    short = ["--short"] if args.short else []
    run([sys.executable, str(HERE / "ablation.py"), "--out", str(folder), "--patterns", str(folder / "patterns.json"),
         "--variants", ",".join(names), "--seeds", args.seeds, "--parallel", str(args.parallel), *short, "--",
         *args.overrides])  # fmt: skip
    run([sys.executable, str(HERE / "collect.py"), "--out", str(folder), *short])
    with (folder / "scores.csv").open(newline="", encoding="utf-8") as f:
        lines = verdict(record, names, list(csv.DictReader(f)))
    (args.out / "prediction.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
