"""The paper's KD ablation, in the CPU-scale world: train every variant x seed (step 1 of experiments/toy_ablation).

    python experiments/toy_ablation/ablation.py [--out DIR] [--seeds 0,1,2] [--variants a,b] [--parallel 2]
                                                [--short] [-- hydra overrides for every run]

Each run is ``python -m bksdm_lab.train experiment=world arch=tiny seed=<seed> <variant> <overrides>
hydra.run.dir=<out>/runs/<variant>/seed<seed>``, with one torch thread, at most ``--parallel`` at once; its output
goes to ``<out>/logs/<variant>-seed<seed>.log``. ``<out>/runs.csv`` records each run's wall time and exit code and
``<out>/ablation.json`` the settings (collect.py reads both). A run whose exported pipeline is already there is not
trained again, so the same command with the same ``--out`` finishes an interrupted ablation. Exits 1 if a run failed.

``--short``: seed 0, variants bksdm and task_only, 4 steps, CSV logging only, no periodic samples (for the tests; give
the short teacher with ``-- teacher.pretrained=DIR``).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The paper's ablation (BK-SDM, arXiv 2305.15798): the full recipe and the terms it takes away.
VARIANTS: dict[str, list[str]] = {
    "bksdm": [],  # (a) teacher init + task + output KD + feature KD
    "random_init": ["arch.init=random"],  # (b) the same losses from diffusers' random initialisation
    "task_only": ["loss.weights.out_kd=0", "loss.weights.feat_kd=0"],  # (c) task loss only
    "task_out_kd": ["loss.weights.feat_kd=0"],  # (d) task + output KD
    "feat_kd_norm": ["loss.terms.feat_kd.normalize=teacher"],  # (a) with each layer's feature KD on one scale
    # the feature-KD weight, swept (not in the default set: --variants feat_kd_w0.1,feat_kd_w10)
    **{f"feat_kd_w{w}": [f"loss.weights.feat_kd={w}"] for w in ("0.01", "0.1", "10")},
}
DESCRIPTIONS = {
    "bksdm": "teacher init, task + out_kd + feat_kd (BK-SDM)",
    "random_init": "random init, task + out_kd + feat_kd",
    "task_only": "teacher init, task only",
    "task_out_kd": "teacher init, task + out_kd",
    "feat_kd_norm": "teacher init, task + out_kd + feat_kd normalised by the teacher feature's mean square",
    **{v: f"BK-SDM with feat_kd weighted {v.removeprefix('feat_kd_w')}" for v in VARIANTS if v.startswith("feat_kd_w")},
}
DEFAULT_VARIANTS = ["bksdm", "random_init", "task_only", "task_out_kd", "feat_kd_norm"]
BASE = ["experiment=world", "arch=tiny", "data=world_latents"]
# Overrides that name the world set and teacher: they also go to the latent cache's `prepare` (data=world).
PREPARE_KEYS = ("teacher.", "paths.", "data.synthetic.")
SHORT = [
    "trainer.max_steps=4",
    "trainer.log_every_n_steps=1",
    "callbacks.samples.every_n_steps=0",
    "callbacks.checkpoint.every_n_train_steps=4",
    "logger=csv",  # no W&B run (its service process costs seconds a run); the notebook reads metrics.csv
]
SHORT_VARIANTS = ["bksdm", "task_only"]
RUNS_CSV = "runs.csv"
SETTINGS = "ablation.json"


def run_dir(out: Path, variant: str, seed: int) -> Path:
    return out / "runs" / variant / f"seed{seed}"


def command(variant: str, seed: int, overrides: list[str], folder: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bksdm_lab.train",
        *(b for b in BASE if not (b.startswith("arch=") and any(o.startswith("arch=") for o in VARIANTS[variant]))),
        f"seed={seed}",
        *VARIANTS[variant],
        *(o for o in overrides if not o.startswith("data.synthetic.")),
        f"hydra.run.dir={folder}",
    ]


def cache_complete(root: str) -> bool:
    from bksdm_lab.data.common import DataError
    from bksdm_lab.data.latents import read_meta

    try:
        return bool(read_meta(root))
    except DataError:
        return False


def prepare_command(overrides: list[str], root: str) -> list[str]:
    """The one `prepare` of the world set's latents under the teacher's VAE, which every run then reads."""
    keep = [o for o in overrides if o.startswith(PREPARE_KEYS)]
    return [sys.executable, "-m", "bksdm_lab.prepare", "teacher=world", "data=world", "device=cpu", "num_workers=0",
            *keep, f"out={root}"]  # fmt: skip


def teacher_of(overrides: list[str]) -> dict:
    """The teacher the runs distil from (its folder and resolution), from the composed training config."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*BASE, *(o for o in overrides if "synthetic" not in o)])
    return {
        "latents": str(Path(str(cfg.data.root)).expanduser()),
        "pretrained": str(Path(str(cfg.teacher.pretrained)).expanduser()),
        "resolution": int(cfg.teacher.get("resolution") or 0) or None,
        "guidance": float(cfg.sampling.guidance),
        "max_steps": int(cfg.trainer.max_steps),
    }


def parse_args(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(prog="experiments/toy_ablation/ablation.py", description=__doc__.split("\n\n")[0])
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    parser.add_argument("--out", type=Path, default=Path("outputs") / "toy_ablation" / stamp)
    parser.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2; --short: 0)")
    parser.add_argument(
        "--variants", default=None, help=f"comma-separated, of {list(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)})"
    )
    parser.add_argument(
        "--patterns", type=Path, default=None, help="a JSON file of more variants: {name: {overrides, description}}"
    )
    parser.add_argument("--parallel", type=int, default=2, help="trainings at once (one torch thread each)")
    parser.add_argument("--short", action="store_true", help="1 seed x 2 variants x 4 steps (tests)")
    args = parser.parse_args(argv)
    if args.patterns:  # e.g. keep patterns to distil (prediction.py writes them)
        for name, v in json.loads(args.patterns.read_text(encoding="utf-8")).items():
            VARIANTS[name], DESCRIPTIONS[name] = list(v["overrides"]), v["description"]
    seeds = args.seeds or ("0" if args.short else "0,1,2")
    try:
        args.seeds = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--seeds={seeds!r}: comma-separated integers, e.g. 0,1,2")
    names = args.variants.split(",") if args.variants else (SHORT_VARIANTS if args.short else DEFAULT_VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown}; allowed: {', '.join(VARIANTS)}")
    if not args.seeds or not names:
        parser.error("at least one seed and one variant")
    if args.parallel < 1:
        parser.error(f"--parallel={args.parallel}: at least 1")
    args.variants = names
    args.overrides = (SHORT if args.short else []) + extra
    return args


def read_runs(out: Path) -> dict[tuple[str, int], dict]:
    path = out / RUNS_CSV
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as f:
        return {(r["variant"], int(r["seed"])): r for r in csv.DictReader(f)}


def write_runs(out: Path, rows: dict[tuple[str, int], dict]) -> None:
    tmp = out / f".{RUNS_CSV}.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["variant", "seed", "run_dir", "wall_s", "returncode"])
        writer.writeheader()
        writer.writerows(rows[k] for k in sorted(rows))
    tmp.replace(out / RUNS_CSV)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out.expanduser().absolute()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    settings = {
        "variants": {v: VARIANTS[v] for v in args.variants},
        "descriptions": {v: DESCRIPTIONS[v] for v in args.variants},
        "seeds": args.seeds,
        "base": BASE,
        "overrides": args.overrides,
        "short": args.short,
        "teacher": teacher_of(args.overrides),
        "command": "python experiments/toy_ablation/ablation.py " + shlex.join(sys.argv[1:] if argv is None else argv),
    }
    old = out / SETTINGS
    if old.is_file():
        before = json.loads(old.read_text(encoding="utf-8"))
        keys = ("base", "overrides", "teacher")
        if {k: before.get(k) for k in keys} != {k: settings[k] for k in keys}:
            print(f"error: {out} holds an ablation with other settings ({old}); use another --out", file=sys.stderr)
            return 2
        settings["variants"] = {**before.get("variants", {}), **settings["variants"]}
        settings["descriptions"] = {**before.get("descriptions", {}), **settings["descriptions"]}
        settings["seeds"] = sorted(set(before.get("seeds", [])) | set(args.seeds))
    old.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")

    rows = read_runs(out)
    todo = []
    for variant in args.variants:
        for seed in args.seeds:
            folder = run_dir(out, variant, seed)
            if (folder / "pipeline" / "model_index.json").is_file() and (variant, seed) in rows:
                print(f"{variant} seed {seed}: done before ({folder})")
                continue
            todo.append((variant, seed, folder))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    latents = settings["teacher"]["latents"]
    if todo and not cache_complete(latents):
        cmd = prepare_command(args.overrides, latents)
        print(f"world latents: preparing {latents}", flush=True)
        with (out / "logs" / "prepare.log").open("w", encoding="utf-8") as log:
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode:
                print(
                    f"error: preparing the world latents failed (see {out / 'logs' / 'prepare.log'})", file=sys.stderr
                )
                return 1
    running: list[tuple[str, int, Path, subprocess.Popen, float, object]] = []
    failed = []
    start = time.perf_counter()
    while todo or running:
        while todo and len(running) < args.parallel:
            variant, seed, folder = todo.pop(0)
            cmd = command(variant, seed, args.overrides, folder)
            log = (out / "logs" / f"{variant}-seed{seed}.log").open("w", encoding="utf-8")
            log.write("$ " + shlex.join(cmd) + "\n")
            log.flush()
            print(f"{variant} seed {seed}: training -> {folder}", flush=True)
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
            running.append((variant, seed, folder, proc, time.perf_counter(), log))
        time.sleep(0.2)
        for item in list(running):
            variant, seed, folder, proc, t0, log = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            wall = time.perf_counter() - t0
            rows[(variant, seed)] = {
                "variant": variant,
                "seed": seed,
                "run_dir": str(folder),
                "wall_s": f"{wall:.1f}",
                "returncode": proc.returncode,
            }
            write_runs(out, rows)
            ok = proc.returncode == 0 and (folder / "pipeline" / "model_index.json").is_file()
            print(f"{variant} seed {seed}: {'done' if ok else 'FAILED'} in {wall:.0f} s (exit {proc.returncode})")
            if not ok:
                failed.append(f"{variant} seed {seed} (see {out / 'logs' / f'{variant}-seed{seed}.log'})")
    print(
        f"trainings: {time.perf_counter() - start:.0f} s wall; runs in {out / 'runs'}; next: "
        f"python experiments/toy_ablation/collect.py --out {out}"
    )
    if failed:
        print("error: failed runs: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
