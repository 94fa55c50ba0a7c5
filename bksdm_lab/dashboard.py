"""python -m bksdm_lab.dashboard: build the W&B workspace of a project and the report of an experiment group.

python -m bksdm_lab.dashboard --entity me --project bksdm_lab --group paper      # save both (needs wandb login)
python -m bksdm_lab.dashboard --group demo --dry-run --out dashboard.json        # offline: the spec as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from bksdm_lab.evaluation import dashboard as db

PROG = "python -m bksdm_lab.dashboard"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Build (and save) W&B dashboards for BK-SDM runs with wandb-workspaces: a workspace for a "
        "project (loss terms, per-layer feature KD, lr / grad norm, throughput / memory, data skips, teacher vs "
        "student samples, in-training eval) and, with --group, a report putting the group's FID / IS / CLIP score "
        "beside the paper's table. Saving needs a logged-in W&B (`wandb login`); --dry-run needs nothing.",
    )
    parser.add_argument("--entity", default=None, help="W&B entity (user or team); default $WANDB_ENTITY, else yours")
    parser.add_argument(
        "--project", default=db.DEFAULT_PROJECT, help=f"W&B project (default {db.DEFAULT_PROJECT}, as conf/logger)"
    )
    parser.add_argument(
        "--group", default=None, help="also build the report for this W&B group (= the config's experiment_name)"
    )
    parser.add_argument(
        "--arch",
        default=db.DEFAULT_ARCH,
        help=f"conf/arch/<name>.yaml whose feature_pairs get one train/feat_kd/<layer> panel each (default "
        f"{db.DEFAULT_ARCH}; 'none' for the regex panel only, which plots every layer of any arch)",
    )
    parser.add_argument("--name", default="BK-SDM distillation", help="the workspace's name")
    parser.add_argument(
        "--dry-run", action="store_true", help="offline: write the specification as JSON and contact no W&B server"
    )
    parser.add_argument("--out", default="-", help="with --dry-run: the JSON file (default -: stdout)")
    return parser.parse_args(argv)


def fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = parse_args(argv)
    arch = None if str(args.arch).lower() in ("none", "") else args.arch
    try:
        if args.dry_run:
            entity = args.entity or os.environ.get("WANDB_ENTITY") or "<entity>"
            spec = db.build(entity, args.project, arch, args.group, resolve_runset=False)
            spec.workspace.name = args.name
            text = json.dumps(db.dry_run_spec(spec), indent=2) + "\n"
            if args.out == "-":
                sys.stdout.write(text)
            else:
                with open(args.out, "w") as f:
                    f.write(text)
                print(f"wrote {args.out} ({len(spec.sections)} sections, report: {bool(args.group)})")
            return 0
        db.arch_feature_layers(arch) if arch else None  # an unknown arch fails before any W&B call
        api = db.wandb_api()
        entity = args.entity or db.default_entity(api)
        spec = db.build(entity, args.project, arch, args.group)
        spec.workspace.name = args.name
        for url in db.save(spec):
            print(url)
        return 0
    except db.DashboardError as e:
        return fail(str(e))


if __name__ == "__main__":
    sys.exit(main())
