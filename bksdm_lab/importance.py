"""python -m bksdm_lab.importance: how much each teacher layer a keep pattern can remove matters (a Hydra app).

python -m bksdm_lab.importance teacher=world sampling.guidance=1.75          # the CPU world, its judge's metric
python -m bksdm_lab.importance teacher=sd14 metric=clip_fid clip_fid.ref_stats=val2014_256.npz

Every layer the starting pattern (``arch``, default the whole teacher) keeps is removed in turn: the one-step-smaller
keep pattern, initialised from the teacher by its weight map (no training), generates images for a fixed prompt set
(the same prompts and seeds for every candidate) that the metric scores; the drop from the starting pattern's score
ranks the layers. Greedy removals of the least important layers then give keep patterns under ``budget``. The guide:
docs/importance.md.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from bksdm_lab import CONF_DIR
from bksdm_lab.common.cli import check_group_choices, guarded
from bksdm_lab.common.quiet import quiet_libraries
from bksdm_lab.evaluation import sampling as gen
from bksdm_lab.evaluation.app import BOOL, DEVICE, rule_problems, run_dir, whole
from bksdm_lab.models.keep import KeepPatternError, derive, same_student, teacher_unet_config
from bksdm_lab.models.report import resolve_arch, unet_macs
from bksdm_lab.models.students import (
    count_params,
    init_student_from_teacher,
    removed_blocks,
    removed_by_stage,
    student_config,
)

METRICS = ("world", "clip_fid")
LOWER_IS_BETTER = ("fid",)  # every other metric key: higher is better
RESULTS = ("importance.csv", "importance.md", "importance.json", "importance.png", "proposals.md", "proposals.json")
RESULTS += ("samples", "wandb")
EXPERIMENTS_EXTRA = 'pip install -e ".[experiments]"'
RULES = {"num_prompts": whole(2), "grid": whole(0), "score_proposals": BOOL, "overwrite": BOOL, "wandb": BOOL}
RULES |= {"device": DEVICE}
WORLD_RULES = {"reference": whole(2), "prompt_seed": whole(0)}
CLIP_FID_RULES = {"eval_resolution": whole(0), "eval_batch_size": whole(1)}


class ImportanceError(ValueError):
    """The analysis cannot run as asked; one line per problem."""


def say(message: str) -> None:
    print(f"bksdm_lab.importance: {message}", flush=True)


# ---- the candidates: one-step-smaller keep patterns ------------------------------------------------------------
@dataclass
class Candidate:
    id: str  # the layer: down_blocks.1.layer0, up_blocks.2.layer1, mid_block, down_blocks.3+up_blocks.0
    keep: dict  # the explicit pattern {down, up, mid}, in the teacher's layer indices
    error: str | None = None  # why the keep-pattern code rejects it (not removable)
    same_as: list[str] = field(default_factory=list)  # other layers whose removal gives the same student
    size: dict = field(default_factory=dict)  # params, macs, removed (teacher blocks), on the meta device
    scores: dict = field(default_factory=dict)
    drop: float = math.nan  # in rank_by, from the starting pattern's score (positive: worse without the layer)


def _copy(stages) -> list:
    return [None if s is None else list(s) for s in stages]


def _one_sided(start: dict, side: str, stage: int, layer: int, unet_config: dict, source: str) -> dict:
    """``start`` without teacher layer ``layer`` of ``<side>_blocks.<stage>``; the mirrored stage as the keep pattern
    derives it from this side alone (diffusers' "up = down + 1"), every other stage as in ``start``."""
    other, mirror = ("up" if side == "down" else "down"), len(start["down"]) - 1 - stage
    stages = _copy(start[side])
    stages[stage] = [k for k in stages[stage] if k != layer]
    keep = {side: stages, other: _copy(start[other]), "mid": start["mid"]}
    keep[other][mirror] = derive({side: stages, "mid": start["mid"]}, unet_config, source).pattern[other][mirror]
    return keep


def candidates(start: dict, unet_config: dict, source: str, teacher_cfg) -> list[Candidate]:
    """Every layer ``start`` (an explicit pattern) keeps, removed alone: each down-stage layer, each up-stage layer,
    the mid block, the deepest kept stage; removals that give the same student are merged into the first."""
    n, out = len(start["down"]), []
    wanted: list[tuple[str, Callable[[], dict]]] = []
    for side in ("down", "up"):
        for s, kept in enumerate(start[side]):
            for k in kept or ():
                wanted.append(
                    (f"{side}_blocks.{s}.layer{k}", lambda a=(side, s, k): _one_sided(start, *a, unet_config, source))
                )
    if start["mid"]:
        wanted.append(("mid_block", lambda: {**start, "mid": False}))
    deepest = max(i for i, d in enumerate(start["down"]) if d is not None)
    down, up = _copy(start["down"]), _copy(start["up"])
    down[deepest] = up[n - 1 - deepest] = None
    wanted.append((f"down_blocks.{deepest}+up_blocks.{n - 1 - deepest}", lambda: {**start, "down": down, "up": up}))
    for cid, make in wanted:
        try:
            keep = make()
            derive(keep, unet_config, source)
        except KeepPatternError as err:
            out.append(Candidate(cid, {}, error=str(err)))
            continue
        twin = next((c for c in out if not c.error and same_student(c.keep, keep, teacher_cfg)), None)
        if twin is not None:
            twin.same_as.append(cid)
        else:
            out.append(Candidate(cid, keep))
    return out


def intersect(a: dict, b: dict) -> dict:
    """The pattern that removes what ``a`` or ``b`` removes (per stage: the layers both keep)."""
    down, up = (
        [None if x is None or y is None else sorted(set(x) & set(y)) for x, y in zip(a[k], b[k])]
        for k in ("down", "up")
    )
    return {"down": down, "up": up, "mid": a["mid"] and b["mid"]}


class Sizes:
    """U-Net parameters, MACs (the paper's way, :func:`bksdm_lab.models.report.unet_macs`) and removed teacher blocks
    of keep patterns, from U-Nets built on the meta device (no weights), one per student config (which teacher layers
    a student keeps changes neither)."""

    def __init__(self, arch, teacher_cfg, unet_config: dict):
        self.arch_base, self.teacher_cfg, self.unet_config = arch, teacher_cfg, unet_config
        self._shapes: dict[str, dict] = {}  # student config -> its meta U-Net, params, state-dict keys (and MACs)
        self._known: dict[str, tuple] = {}  # keep pattern -> (its shape, the teacher blocks it removes)
        self.teacher_keys = self._shape(student_config(unet_config, {}))["keys"]

    def teacher(self, kind: str) -> int:
        """The teacher U-Net's params or macs."""
        shape = self._shape(student_config(self.unet_config, {}))
        return self.macs(shape) if kind == "macs" else shape["params"]

    def _shape(self, config: dict) -> dict:
        key = json.dumps(config, sort_keys=True)
        if key not in self._shapes:
            from diffusers import UNet2DConditionModel

            with torch.device("meta"):
                unet = UNet2DConditionModel.from_config(config)
            self._shapes[key] = {"unet": unet, "params": count_params(unet), "keys": list(unet.state_dict())}
        return self._shapes[key]

    @staticmethod
    def macs(shape: dict) -> int:
        """Counted when first asked for (a meta forward takes about half a second)."""
        if "macs" not in shape:
            with torch.device("meta"):
                shape["macs"] = unet_macs(shape["unet"])[0]
        return shape["macs"]

    def arch(self, keep: dict) -> dict:
        """The resolved arch config of ``keep`` (the starting arch's other keys; the weight map derived)."""
        return resolve_arch(OmegaConf.merge(self.arch_base, {"keep": keep}), self.teacher_cfg)

    def __call__(self, keep: dict, kind: str | None = None):
        """``{"params", "macs", "removed"}`` of ``keep``, or only its ``kind`` (params, macs)."""
        key = json.dumps(keep)
        if key not in self._known:
            arch = self.arch(keep)
            shape = self._shape(student_config(self.unet_config, arch))
            removed = removed_blocks(shape["keys"], self.teacher_keys, arch.get("weight_map") or {})
            self._known[key] = (shape, removed)
        shape, removed = self._known[key]
        if kind is not None:
            return self.macs(shape) if kind == "macs" else shape["params"]
        return {"params": shape["params"], "macs": self.macs(shape), "removed": removed}

    def removes(self, keep: dict, start: dict) -> str:
        """The teacher blocks ``keep`` removes beyond ``start``, stage by stage."""
        gone = set(self(keep)["removed"]) - set(self(start)["removed"])
        groups = removed_by_stage(gone, self.teacher_keys)
        return "; ".join(f"{g['stage']} " + ("(all)" if g["whole"] else " ".join(g["removed"])) for g in groups)


# ---- the metric ---------------------------------------------------------------------------------------------------
def metric_keys(cfg) -> tuple[str, ...]:
    """What ``cfg.metric`` scores, the default ``rank_by`` first."""
    if cfg.metric == "world":
        from bksdm_lab.world.scenes import ATTRIBUTES

        return ("agree/all", "fid", *(f"agree/{a}" for a in ATTRIBUTES))
    c = cfg.clip_fid
    return (*(["clip_score"] if c.clip != "none" else []), *(["fid"] if c.ref_stats else []), "is")


def prompts_of(cfg) -> list[str]:
    """The fixed prompt set: world captions (``world.prompt_seed``), or ``clip_fid``'s prompts / metadata."""
    if cfg.metric == "world":
        from bksdm_lab.world.judge import world_prompts

        return world_prompts(cfg.num_prompts, cfg.world.prompt_seed)
    from bksdm_lab.evaluate import prompt_metadata

    c = cfg.clip_fid
    return gen.read_prompts(gen.prompt_list(c), c.get("prompts_file"), prompt_metadata(c), cfg.num_prompts)


def load_metric(cfg, prompts: list[str], device: torch.device) -> Callable[[Path], dict]:
    """``score(folder)`` of a generation folder: the world judge's ``fid`` and ``agree/*``, or CLIP score, FID and IS
    (the evaluation's models, loaded once)."""
    if cfg.metric == "world":
        from bksdm_lab.world import judge as J

        w = cfg.world
        judge, report = J.load_judge(J.JUDGES[w.judge], w.cache_dir, log=say)
        reference = J.reference_images(w.reference, judge.cfg.size)
        say(f"world judge {w.judge!r} ({report['path']}); FID against {w.reference} real renders")
        return lambda folder: {k: v for k, v in J.score_folder(judge, folder, reference).items() if k != "n"}
    from bksdm_lab.evaluate import check_ref_stats
    from bksdm_lab.evaluation.evaluate import evaluate
    from bksdm_lab.evaluation.metrics import clip_from_spec, extractor_from_spec

    c = cfg.clip_fid
    extractor = extractor_from_spec(c.feature_extractor)
    if c.ref_stats:
        check_ref_stats(c, extractor)
    extractor = extractor.to(device)
    clip = None if c.clip == "none" else clip_from_spec(c.clip).to(device)

    def score(folder: Path) -> dict:
        r = evaluate(folder, prompts, feature_extractor=extractor, clip_model=clip, ref_stats=c.ref_stats or None,
                     resize=c.eval_resolution or None, batch_size=c.eval_batch_size)  # fmt: skip
        return {k: r[k] for k in ("clip_score", "fid", "is") if r.get(k) is not None}

    return score


def drop(scores: dict, baseline: dict, key: str) -> float:
    """How much worse ``scores`` is than ``baseline`` in ``key`` (positive: worse)."""
    d = baseline[key] - scores[key]
    return -d if key in LOWER_IS_BETTER else d


# ---- checks, before anything loads --------------------------------------------------------------------------------
@dataclass
class Plan:
    unet_config: dict
    source: str
    start: dict  # the starting pattern, explicit
    rank_by: str
    sizes: Sizes
    budgets: list[tuple[str, float, int]]  # (params | macs, as given, the limit)
    prompts: list[str] = field(default_factory=list)


def _budgets(cfg, sizes: Sizes | None, problems: list[str]) -> list[tuple[str, float, int]]:
    """``budget.params`` / ``budget.macs``: each a number or a list; <= 1 a fraction of the teacher's, else absolute."""
    out = []
    for kind, values in (cfg.get("budget") or {}).items():
        if kind not in ("params", "macs"):
            problems.append(f"budget.{kind} is not a budget; the budgets are: params, macs")
            continue
        values = [] if values is None else list(values) if OmegaConf.is_list(values) else [values]
        for v in values:
            total = sizes.teacher(kind) if sizes else math.inf
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= max(total, 1):
                size = f" ({total:,})" if sizes else ""
                problems.append(
                    f"budget.{kind}={v!r} is not a fraction of the teacher's U-Net {kind} (0 < f <= 1) or a number of "
                    f"{kind} up to the teacher's{size}"
                )
            elif sizes:
                out.append((kind, v, round(v * total) if v <= 1 else int(v)))
    return out


def check(cfg: DictConfig) -> Plan:
    """Every bad value, one line each, then what the run needs (the teacher, the metric's models and prompts):
    an :class:`ImportanceError` before any model loads."""
    problems = gen.sampling_problems(cfg.sampling) + rule_problems(cfg, RULES)
    rank_by = None
    if cfg.metric not in METRICS:
        problems.append(f"metric={cfg.metric!r} is not one of: {', '.join(METRICS)}")
    else:
        if cfg.metric == "world":
            from bksdm_lab.world.judge import JUDGES

            problems += rule_problems(cfg.world, WORLD_RULES, "world.")
            if cfg.world.judge not in JUDGES:
                problems.append(f"world.judge={cfg.world.judge!r} is not one of: {', '.join(JUDGES)}")
        else:
            problems += rule_problems(cfg.clip_fid, CLIP_FID_RULES, "clip_fid.")
        keys = metric_keys(cfg)
        rank_by = cfg.rank_by or keys[0]
        if rank_by not in keys:
            problems.append(f"rank_by={rank_by!r} is not a key of metric={cfg.metric}: one of {', '.join(keys)}")
    start = unet_config = source = sizes = None
    if "keep" not in cfg.arch:
        problems.append(
            f"arch={cfg.arch.get('name')!r} is not a keep pattern (conf/arch/keep.yaml and those built on it)"
        )
    elif (cfg.arch.get("init") or "teacher") != "teacher":
        problems.append(
            f"arch.init={cfg.arch.init!r}: the candidates are initialised from the teacher (arch.init=teacher)"
        )
    else:
        try:
            unet_config, source = teacher_unet_config(cfg.teacher)
            start = derive(cfg.arch.keep, unet_config, source).pattern
            sizes = Sizes(cfg.arch, cfg.teacher, unet_config)
        except KeepPatternError as err:
            problems.append(str(err))
    budgets = _budgets(cfg, sizes, problems)
    out = run_dir(cfg)
    present = [name for name in RESULTS if (out / name).exists()]
    if present and not cfg.overwrite:
        problems.append(
            f"out={str(out)!r} already holds results ({', '.join(present)}): choose another out=, or replace them "
            "with overwrite=true"
        )
    if problems:
        raise ImportanceError("\n".join(problems))

    from bksdm_lab.models.teachers import TeacherLoadError, probe_teacher

    try:
        probe_teacher(cfg.teacher)
    except TeacherLoadError as err:
        problems.append(str(err))
    if cfg.metric == "clip_fid":
        from bksdm_lab.evaluation.metrics import check_available

        try:
            check_available(cfg.clip_fid.feature_extractor, cfg.clip_fid.clip)
        except (ImportError, ValueError) as err:
            problems.append(f"clip_fid: {err}")
        if cfg.clip_fid.ref_stats and not Path(cfg.clip_fid.ref_stats).is_file():
            problems.append(f"clip_fid.ref_stats={cfg.clip_fid.ref_stats!r} does not exist")
    plan = Plan(unet_config, source, start, rank_by, sizes, budgets)
    try:
        plan.prompts = prompts_of(cfg)
        if len(plan.prompts) < 2:
            problems.append(f"the prompt set has {len(plan.prompts)} prompt: FID needs at least 2 images")
    except gen.GenerationError as err:
        problems.append(str(err))
    if problems:
        raise ImportanceError("\n".join(problems))
    return plan


# ---- the run ------------------------------------------------------------------------------------------------------
class Scoring:
    """The teacher's parts on the device once; a keep pattern's student, initialised from the teacher, generates the
    prompt set into ``samples/<name>`` (the same seeds for every student) and the metric scores it."""

    def __init__(self, cfg: DictConfig, plan: Plan, out: Path):
        from bksdm_lab.models.teachers import load_teacher

        self.cfg, self.plan, self.out, self.done = cfg, plan, out, {}
        device = gen.config_device(cfg)
        dtype = gen.PRECISIONS[cfg.sampling.precision or gen.default_precision(device)]
        self.teacher = load_teacher(cfg.teacher)
        for part in (self.teacher.unet, self.teacher.text_encoder, self.teacher.ensure_vae()):
            part.requires_grad_(False).eval().to(device)
            if part.dtype != dtype:  # diffusers warns about its fp32-only modules whenever a dtype is passed
                part.to(dtype=dtype)
        self.metric = load_metric(cfg, plan.prompts, device)

    def __call__(self, keep: dict, name: str) -> dict:
        key = json.dumps(keep)
        if key in self.done:
            return self.done[key]
        from bksdm_lab.models.export import build_pipeline

        start, s = time.perf_counter(), gen.sampling_dict(self.cfg.sampling)
        student = init_student_from_teacher(self.teacher.unet, self.plan.sizes.arch(keep)).eval()
        pipe = build_pipeline(self.teacher, student, safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        gen.set_scheduler(pipe, s["scheduler"])
        gen.speed_up(pipe, s["channels_last"], s["compile"], s["compile_backend"], s["compile_mode"])
        folder = self.out / "samples" / name
        gen.generate_images(pipe, self.plan.prompts, folder, **gen.sampling_kwargs(s), grid=self.cfg.grid,
                            progress=False, model=f"{self.cfg.teacher.name} {name}")  # fmt: skip
        del pipe, student
        self.done[key] = self.metric(folder)
        shown = " ".join(f"{k}={v:.4g}" for k, v in self.done[key].items() if "/" not in k or k == "agree/all")
        say(f"{name}: {shown} ({time.perf_counter() - start:.1f} s)")
        return self.done[key]


def propose(kind: str, limit: int, order: list[Candidate], plan: Plan) -> dict:
    """Greedy: remove the least important layers first (``order``), skipping a removal the keep-pattern code rejects
    together with those taken (tried again after each one taken), until ``kind`` is at most ``limit``."""
    current, taken, skipped, left = plan.start, [], {}, list(order)
    while plan.sizes(current, kind) > limit:
        progress = False
        for c in list(left):
            trial = intersect(current, c.keep)
            try:
                derive(trial, plan.unet_config, plan.source)
            except KeepPatternError as err:
                skipped[c.id] = str(err)
                continue
            left.remove(c)
            skipped.pop(c.id, None)
            if trial != current:
                current, progress = trial, True
                taken.append(c.id)
                if plan.sizes(current, kind) <= limit:
                    break
        if not progress:
            break
    size = plan.sizes(current)
    return {"budget": kind, "limit": limit, "met": size[kind] <= limit, "removes": taken, "keep": current,
            "params": size["params"], "macs": size["macs"], "skipped": skipped}  # fmt: skip


def _json(value) -> str:
    return json.dumps(value, separators=(",", ":"))


def override_list(keep: dict) -> list[str]:
    """``keep`` as the overrides ``python -m bksdm_lab.train`` takes."""
    return ["arch=keep", *(f"arch.keep.{k}={_json(keep[k])}" for k in ("down", "up", "mid"))]


def overrides(keep: dict) -> str:
    """:func:`override_list` as one shell-quoted line."""
    return shlex.join(override_list(keep))


def report_pattern(keep: dict) -> str:
    """``keep`` as the ``patterns=`` of ``python -m bksdm_lab.arch``."""
    return shlex.quote(
        f"patterns=[{{down: {_json(keep['down'])}, up: {_json(keep['up'])}, mid: {_json(keep['mid'])}}}]"
    )


def run(cfg: DictConfig) -> dict[str, Any]:
    """Score every one-step-smaller pattern, rank, propose, write the run folder; returns ``importance.json``'s
    record."""
    plan = check(cfg)
    out = run_dir(cfg)
    for name in RESULTS if cfg.overwrite else ():
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    cands = candidates(plan.start, plan.unet_config, plan.source, cfg.teacher)
    removable = [c for c in cands if not c.error]
    for c in removable:
        c.size = plan.sizes(c.keep)
    say(f"{len(removable)} removable layers to score, {len(cands) - len(removable)} not removable; "
        f"{len(plan.prompts)} prompts, {cfg.metric} metric, ranked by {plan.rank_by}")  # fmt: skip
    score = Scoring(cfg, plan, out)
    baseline = score(plan.start, "baseline")
    for c in removable:
        c.scores = score(c.keep, c.id)
        c.drop = drop(c.scores, baseline, plan.rank_by)
    ranked = sorted(removable, key=lambda c: (math.isnan(c.drop), -c.drop))  # the most important first
    least_first = sorted(removable, key=lambda c: (math.isnan(c.drop), c.drop))
    proposals = [propose(kind, limit, least_first, plan) | {"given": given} for kind, given, limit in plan.budgets]
    for p in proposals:
        if cfg.score_proposals and p["removes"]:
            p["scores"] = score(p["keep"], f"proposal-{p['budget']}-{p['given']}")
            p["drop"] = drop(p["scores"], baseline, plan.rank_by)
    return write(cfg, plan, out, baseline, cands, ranked, proposals)


# ---- the outputs --------------------------------------------------------------------------------------------------
def _count(value: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f}"


def _pct(value: float, total: float) -> str:
    return f"{100 * value / total:.1f}%"


def table_rows(plan: Plan, baseline: dict, cands: list[Candidate], ranked: list[Candidate], keys) -> list[dict]:
    """One row per layer (the baseline first, then by rank, then the layers that are not removable)."""
    start = plan.sizes(plan.start)
    rows = [{"layer": "baseline", "same_student_as": "", "removable": "", "reason": "", "removes": "",
             "params": start["params"], "params_removed": 0, "macs": start["macs"], "macs_removed": 0,
             **{k: baseline.get(k) for k in keys}, "drop": 0.0, "rank": None, "keep": _json(plan.start)}]  # fmt: skip
    for rank, c in enumerate([*ranked, *(c for c in cands if c.error)], 1):
        size = c.size or {"params": None, "macs": None}
        rows.append({
            "layer": c.id, "same_student_as": " ".join(c.same_as), "removable": not c.error, "reason": c.error or "",
            "removes": plan.sizes.removes(c.keep, plan.start) if not c.error else "",
            "params": size["params"], "params_removed": start["params"] - size["params"] if not c.error else None,
            "macs": size["macs"], "macs_removed": start["macs"] - size["macs"] if not c.error else None,
            **{k: c.scores.get(k) for k in keys}, "drop": None if c.error else c.drop,
            "rank": None if c.error else rank, "keep": _json(c.keep) if not c.error else "",
        })  # fmt: skip
    return rows


def importance_md(cfg, plan: Plan, rows: list[dict]) -> str:
    base, key = rows[0], plan.rank_by
    teacher = {k: plan.sizes.teacher(k) for k in ("params", "macs")}
    better = "lower" if key in LOWER_IS_BETTER else "higher"
    lines = [
        f"# Layer importance: {cfg.teacher.title}, from arch={cfg.arch.name}",
        "",
        f"Starting pattern: {_json(plan.start)}: {base['params']:,} U-Net params ({_pct(base['params'], teacher['params'])}"
        f" of the teacher's), {_count(base['macs'])} MACs. Metric {cfg.metric}, {len(plan.prompts)} prompts; ranked by "
        f"{key} ({better} is better); drop = how much worse {key} gets without the layer (rank 1: the most important).",
        "",
        "Baseline: " + " ".join(f"{k}={base[k]:.4g}" for k in metric_keys(cfg) if base.get(k) is not None),
        "",
        f"| rank | layer | removes | params removed | MACs removed | {key} | drop |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows[1:]:
        if r["removable"]:
            name = r["layer"] + (f" (= {r['same_student_as']})" if r["same_student_as"] else "")
            lines.append(
                f"| {r['rank']} | {name} | {r['removes']} | {r['params_removed']:,} ({_pct(r['params_removed'], teacher['params'])})"
                f" | {_count(r['macs_removed'])} ({_pct(r['macs_removed'], teacher['macs'])}) | {r[key]:.4g} | {r['drop']:+.4g} |"
            )
    rejected = [r for r in rows[1:] if not r["removable"]]
    if rejected:
        lines += ["", "Not removable (the keep-pattern code rejects the one-step-smaller pattern):"]
        lines += [f"- {r['layer']}: {r['reason']}" for r in rejected]
    return "\n".join(lines) + "\n"


def proposals_md(cfg, plan: Plan, proposals: list[dict]) -> str:
    teacher, lines = {k: plan.sizes.teacher(k) for k in ("params", "macs")}, ["# Keep patterns under a budget", ""]
    if not proposals:
        lines.append("No budget given (budget.params=, budget.macs=).")
    for p in proposals:
        kind, total = p["budget"], teacher[p["budget"]]
        lines += [f"## {kind} <= {p['limit']:,} ({_pct(p['limit'], total)} of the teacher's {total:,})", ""]
        size = (f"{p['params']:,} params ({_pct(p['params'], teacher['params'])} of the teacher's U-Net), "
                f"{_count(p['macs'])} MACs ({_pct(p['macs'], teacher['macs'])})")  # fmt: skip
        removes = ", ".join(p["removes"]) or "nothing (the starting pattern is within the budget)"
        unmet = "" if p["met"] else "Not reachable by removing the ranked layers; the smallest pattern found: "
        lines.append(f"{unmet}{size}; removes {removes}.")
        if "scores" in p:
            lines.append(f"Scored: {plan.rank_by}={p['scores'][plan.rank_by]:.4g} (drop {p['drop']:+.4g}).")
        if p["skipped"]:
            lines.append(
                f"Skipped, as the keep-pattern code rejects them with those: {', '.join(p['skipped'])} (why: proposals.json)."
            )
        lines += ["", f"    python -m bksdm_lab.train teacher={cfg.teacher.name} {p['overrides']}",
                  f"    python -m bksdm_lab.arch teacher={cfg.teacher.name} variants=[] {p['arch_patterns']}", ""]  # fmt: skip
    return "\n".join(lines)


def chart(rows: list[dict], key: str, path: Path, title: str) -> Path | None:
    """``importance.png``: the drops, sorted, as bars (matplotlib, of the ``experiments`` extra)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        say(f"importance.png not drawn: matplotlib is not installed: {EXPERIMENTS_EXTRA}")
        return None
    ranked = [r for r in rows[1:] if r["removable"]]
    fig = Figure(figsize=(8, 1.5 + 0.28 * len(ranked)), layout="constrained")
    ax = fig.add_subplot()
    drops = [r["drop"] for r in reversed(ranked)]
    ax.barh([r["layer"] for r in reversed(ranked)], drops, color=["tab:red" if d > 0 else "tab:gray" for d in drops])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"drop in {key} without the layer (baseline {rows[0][key]:.4g}; right: more important)")
    ax.set_title(title)
    fig.savefig(path, dpi=120)
    return path


def log_wandb(cfg, out: Path, rows: list[dict], png: Path | None, settings: dict) -> str:
    """One W&B run: the rows as a ``wandb.Table`` and the chart; ``WANDB_MODE=offline`` writes it under ``out/wandb``."""
    import wandb

    run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_name or out.name, job_type="importance", dir=str(out),
                     config=settings, reinit="finish_previous")  # fmt: skip
    try:
        columns = list(rows[0])
        logged = {"importance/table": wandb.Table(columns=columns, data=[[_cell(r[c]) for c in columns] for r in rows])}
        if png is not None:
            logged["importance/chart"] = wandb.Image(str(png))
        run.log(logged)
        return run.dir
    finally:
        run.finish()


def _cell(value):
    return str(value) if isinstance(value, bool) else value


def write(cfg, plan: Plan, out: Path, baseline: dict, cands, ranked, proposals) -> dict[str, Any]:
    keys = metric_keys(cfg)
    rows = table_rows(plan, baseline, cands, ranked, keys)
    with (out / "importance.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: _cell(v) for k, v in r.items()} for r in rows)
    text = importance_md(cfg, plan, rows)
    (out / "importance.md").write_text(text, encoding="utf-8")
    for p in proposals:
        p |= {"overrides": overrides(p["keep"]), "arch_patterns": report_pattern(p["keep"])}
    proposal_text = proposals_md(cfg, plan, proposals)
    (out / "proposals.md").write_text(proposal_text, encoding="utf-8")
    (out / "proposals.json").write_text(json.dumps(proposals, indent=2) + "\n", encoding="utf-8")
    settings = {
        "teacher": cfg.teacher.name, "teacher_config": plan.source, "arch": cfg.arch.name, "start": plan.start,
        "metric": cfg.metric, cfg.metric: OmegaConf.to_container(cfg[cfg.metric], resolve=True),
        "rank_by": plan.rank_by, "lower_is_better": plan.rank_by in LOWER_IS_BETTER, "prompts": plan.prompts,
        "sampling": gen.sampling_dict(cfg.sampling), "teacher_size": {k: plan.sizes.teacher(k) for k in ("params", "macs")},
    }  # fmt: skip
    record = {"settings": settings, "baseline": baseline, "layers": rows, "proposals": proposals}
    (out / "importance.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    png = chart(rows, plan.rank_by, out / "importance.png", f"Layer importance: {cfg.teacher.title}")
    print(text + "\n" + proposal_text, flush=True)
    if cfg.wandb:
        say(f"logged to W&B ({log_wandb(cfg, out, rows, png, settings)})")
    say(f"wrote {out} (importance.csv, importance.md, proposals.md{', importance.png' if png else ''})")
    return record


def errors() -> tuple[type[BaseException], ...]:
    from bksdm_lab.evaluation.evaluate import EvaluationError
    from bksdm_lab.models.teachers import TeacherLoadError

    return (
        ImportanceError,
        KeepPatternError,
        TeacherLoadError,
        gen.GenerationError,
        EvaluationError,
        FileNotFoundError,
    )


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="importance")
def main(cfg: DictConfig) -> dict[str, Any] | None:
    quiet_libraries()
    return guarded("importance", run, cfg, errors())


if __name__ == "__main__":
    check_group_choices("importance")
    main()
