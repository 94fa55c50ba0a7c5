"""W&B dashboards for BK-SDM runs, built with ``wandb-workspaces``: a project workspace and an experiment-group report.

:func:`workspace_sections` holds the exact W&B keys a run logs (the single source of truth); :func:`build_workspace`,
:func:`build_report`, :func:`dry_run_spec` (offline JSON) and :func:`save` (needs a logged-in W&B) build on it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from bksdm_lab.evaluation.paper import PAPER_IMAGES, PAPER_RESULTS

DEFAULT_PROJECT = "bksdm_lab"  # conf/logger/wandb.yaml: project
DEFAULT_ARCH = "tiny"  # conf/train.yaml: the default arch
LOSS_TERMS = ("task", "out_kd", "feat_kd")  # conf/loss/bksdm.yaml: terms
FEAT_KD_PREFIX = "train/feat_kd/"
ATTN_KD_PREFIX = "train/attn_kd/"  # conf/loss/bksdm_attn.yaml: the attn_kd term
SAMPLE_MODELS = ("teacher", "student", "ema")
SAMPLES_TABLE = "samples/table"
EVAL_METRICS = ("fid", "is", "clip_score")
EVAL_TITLES = {"fid": "FID (lower is better)", "is": "IS (higher is better)", "clip_score": "CLIP score (higher)"}


class DashboardError(RuntimeError):
    """A problem the user can fix (unknown arch, no W&B login, ...); the CLI prints it as one line."""


@dataclass(frozen=True)
class Panel:
    """One panel: ``line`` (history of ``keys``, or of every key matching ``regex``), ``media`` (image panels
    ``keys``) or ``table`` (the W&B table ``keys[0]``)."""

    kind: Literal["line", "media", "table"]
    title: str
    keys: tuple[str, ...] = ()
    regex: str | None = None


@dataclass(frozen=True)
class Section:
    name: str
    panels: tuple[Panel, ...]
    is_open: bool = True
    note: str = ""  # when the keys appear (for the reader of the spec)


@dataclass
class DashboardSpec:
    """What the CLI builds: the sections (data), the workspace and optionally the report (wandb-workspaces)."""

    entity: str
    project: str
    arch: str | None
    sections: list[Section]
    workspace: Any
    group: str | None = None
    report: Any = None
    extra: dict = field(default_factory=dict)


# ---- the keys ---------------------------------------------------------------------------------------------
def loss_keys() -> list[str]:
    return ["train/loss", *(f"train/loss_{term}" for term in LOSS_TERMS)]


def data_keys() -> tuple[list[str], list[str]]:
    """``data/skipped_<reason>`` and ``data/converted_<reason>`` for every reason the data pipeline counts."""
    from bksdm_lab.data.common import CONVERT_REASONS, SKIP_REASONS

    return [f"data/skipped_{r}" for r in SKIP_REASONS], [f"data/converted_{r}" for r in CONVERT_REASONS]


def arch_feature_layers(arch: str) -> list[str]:
    """The student modules of ``conf/arch/<arch>.yaml`` ``feature_pairs`` (composed by Hydra, so ``defaults:``
    inheritance applies): the ``<layer>`` of the ``train/feat_kd/<layer>`` keys a run of that arch logs."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from bksdm_lab.common.conf import CONF_DIR

    available = sorted(p.stem for p in (CONF_DIR / "arch").glob("*.yaml"))
    if arch not in available:
        raise DashboardError(f"unknown arch {arch!r}: choose one of {', '.join(available)} (conf/arch/*.yaml)")
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="arch", overrides=[f"+arch={arch}"])
    except HydraException as e:
        raise DashboardError(f"conf/arch/{arch}.yaml could not be composed: {e}") from e
    pairs = OmegaConf.to_container(cfg.arch, resolve=True).get("feature_pairs") or []
    return list(dict.fromkeys(str(student) for _teacher, student in pairs))


def feat_kd_key(layer: str) -> str:
    return f"{FEAT_KD_PREFIX}{layer}"


# ---- the sections: the single source of truth -------------------------------------------------------------
def workspace_sections(feature_layers: Sequence[str] = ()) -> list[Section]:
    """The workspace, section by section. ``feature_layers``: one per-layer feature-KD panel each (besides the
    regex panel that plots every ``train/feat_kd/*`` key whatever the arch). The keys are logged by
    ``bksdm_lab.distill.module`` (``train/*``), ``Throughput`` (``perf/*``), ``SampleImages`` (``samples/*``), the
    collate function's counts (``data/*``, every reason from the first batch) and ``EvalCallback`` (``eval/*``)."""
    skipped, converted = data_keys()
    line = lambda key, title=None: Panel("line", title or key, (key,))  # noqa: E731
    feat = [Panel("line", "feature KD, every layer", regex=f"^{FEAT_KD_PREFIX}.*")]
    # loss=bksdm_attn: the self-attention term's per-layer keys (absent from runs without it)
    feat.append(Panel("line", "self-attention KD, every layer", regex=f"^{ATTN_KD_PREFIX}.*"))
    feat += [line(feat_kd_key(layer), f"feature KD: {layer}") for layer in feature_layers]
    return [
        Section(
            "Loss",
            (
                Panel("line", "loss terms", tuple(loss_keys())),
                *(line(k) for k in loss_keys()),
                Panel("line", "every loss term (incl. attn_kd)", regex="^train/loss_.*"),
            ),
            note="every optimizer step; a term weighted 0 (loss.weights.<term>=0) is not logged",
        ),
        Section("Feature KD per layer", tuple(feat), note="one key per arch.feature_pairs student module"),
        Section(
            "Optimisation", (line("train/lr", "learning rate"), line("train/grad_norm", "grad norm (before clip)"))
        ),
        Section(
            "Throughput and memory",
            (
                line("perf/images_per_s", "images/s"),
                line("perf/step_time_s", "optimizer step time (s)"),
                line("perf/peak_mem_gb", "peak memory (GB)"),
                line("perf/first_step_s", "first optimizer step (s; torch.compile's compilation included)"),
            ),
        ),
        Section(
            "Data",
            (
                Panel("line", "skipped samples (cumulative)", tuple(skipped)),
                Panel("line", "converted samples (cumulative)", tuple(converted)),
            ),
            is_open=False,
            note="cumulative counts per reason, 0 until a bad sample is read; kept across resumes",
        ),
        Section(
            "Samples: teacher vs student",
            (
                Panel("table", "teacher | student | EMA, same prompts and seeds", (SAMPLES_TABLE,)),
                *(Panel("media", f"samples: {who}", (f"samples/{who}",)) for who in SAMPLE_MODELS),
            ),
            note="fixed prompts and seeds (callbacks.samples); the teacher's once at the start",
        ),
        Section(
            "Eval (in training)",
            (
                *(line(f"eval/{m}", EVAL_TITLES[m]) for m in EVAL_METRICS),
                line("eval/images_per_s", "eval generation images/s"),
            ),
            note="only runs with callbacks=with_eval (eval/fid needs callbacks.eval.ref_stats)",
        ),
    ]


def plotted_keys(sections: Iterable[Section]) -> list[str]:
    """Every exact key the sections plot (regex panels not included: see :func:`plotted_regexes`)."""
    return list(dict.fromkeys(k for s in sections for p in s.panels for k in p.keys))


def plotted_regexes(sections: Iterable[Section]) -> list[str]:
    return [p.regex for s in sections for p in s.panels if p.regex]


# ---- wandb-workspaces objects -----------------------------------------------------------------------------
def _panel(panel: Panel):
    import wandb_workspaces.reports.v2 as wr

    if panel.kind == "line":
        if panel.regex:
            return wr.LinePlot(title=panel.title, metric_regex=panel.regex)
        return wr.LinePlot(title=panel.title, y=list(panel.keys))
    if panel.kind == "media":
        return wr.MediaBrowser(title=panel.title, media_keys=list(panel.keys), gallery_axis="step")
    if panel.kind == "table":
        # default layout: wandb-workspaces 0.4.13 does not read a summary-table panel's layout back on load
        return wr.WeavePanelSummaryTable(table_name=panel.keys[0])
    raise ValueError(f"unknown panel kind {panel.kind!r}")


def build_workspace(sections: Sequence[Section], entity: str, project: str, name: str = "BK-SDM distillation"):
    import wandb_workspaces.workspaces as ws

    return ws.Workspace(
        entity=entity,
        project=project,
        name=name,
        sections=[ws.Section(name=s.name, panels=[_panel(p) for p in s.panels], is_open=s.is_open) for s in sections],
        settings=ws.WorkspaceSettings(x_axis="Step"),
        runset_settings=ws.RunsetSettings(groupby=[ws.Metric("Group")]),
    )


def paper_table_markdown() -> str:
    """The paper's MS-COCO 30K table (``PAPER_RESULTS``) as a markdown table."""
    lines = [
        f"BK-SDM paper (arXiv 2305.15798), MS-COCO {PAPER_IMAGES // 1000}K prompts, 256 px:",
        "",
        "| model | FID | IS | CLIP score |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {model} | {fid:.2f} | {is_:.2f} | {clip:.4f} |" for model, (fid, is_, clip) in PAPER_RESULTS.items()]
    return "\n".join(lines)


def group_filter(group: str) -> str:
    return f"Metric('Group') == {json.dumps(group)}"


def build_report(group: str, entity: str, project: str, resolve_runset: bool = True):
    """The experiment-group report: the paper's table beside the group's runs and their ``eval/*`` metrics.

    ``resolve_runset=False`` leaves the runset's entity/project out: wandb-workspaces looks a runset's project up
    on the W&B server when it serialises it, which a dry run cannot do (the spec records them separately)."""
    import wandb_workspaces.reports.v2 as wr

    keys = [f"eval/{m}" for m in EVAL_METRICS]
    runset = wr.Runset(
        entity=entity if resolve_runset else "",
        project=project if resolve_runset else "",
        name=f"group {group}",
        filters=group_filter(group),
        pinned_columns=["run:displayName", *(f"summary:{k}" for k in keys), "config:arch.value"],
    )
    panels = [wr.BarPlot(title=f"{EVAL_TITLES[m]}, latest", metrics=[f"eval/{m}"]) for m in EVAL_METRICS]
    panels += [wr.LinePlot(title=f"{EVAL_TITLES[m]} over training", y=[f"eval/{m}"]) for m in EVAL_METRICS]
    intro = (
        f"Runs of the W&B group `{group}` (the config's `experiment_name`) in `{entity}/{project}`: each run's "
        "latest `eval/fid`, `eval/is` and `eval/clip_score` beside the paper's numbers. In-training evaluation "
        "(`callbacks=with_eval`) uses a few hundred prompts, so its FID is biased upwards; for numbers comparable "
        "with the paper run `python -m bksdm_lab.evaluate` (30K prompts, the paper's protocol) with `--wandb`."
    )
    return wr.Report(
        entity=entity,
        project=project,
        title=f"BK-SDM {group}: FID / IS / CLIP vs the paper"[:128],
        description=f"W&B group {group} against the BK-SDM paper's MS-COCO table",
        blocks=[
            wr.H1(text=f"{group} vs the BK-SDM paper"),
            wr.MarkdownBlock(text=intro),
            wr.H2(text="The paper"),
            wr.MarkdownBlock(text=paper_table_markdown()),
            wr.H2(text="This group"),
            wr.PanelGrid(runsets=[runset], panels=panels),
        ],  # width: the default; wandb-workspaces 0.4.13 does not read a report's width back on load
    )


# ---- build, serialise, save --------------------------------------------------------------------------------
def build(
    entity: str,
    project: str = DEFAULT_PROJECT,
    arch: str | None = DEFAULT_ARCH,
    group: str | None = None,
    resolve_runset: bool = True,
) -> DashboardSpec:
    layers = arch_feature_layers(arch) if arch else []
    sections = workspace_sections(layers)
    report = build_report(group, entity, project, resolve_runset) if group else None
    return DashboardSpec(
        entity=entity,
        project=project,
        arch=arch,
        sections=sections,
        workspace=build_workspace(sections, entity, project),
        group=group,
        report=report,
        extra={"feature_layers": layers},
    )


def model_json(obj) -> dict:
    """A wandb-workspaces Workspace / Report as the JSON its ``save`` sends (``_to_model``: the library's own
    pydantic model of the view; ``internal.View`` / ``internal.ReportViewspec`` validate it back)."""
    return obj._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")


def dry_run_spec(spec: DashboardSpec) -> dict:
    from importlib.metadata import version

    return {
        "tool": "python -m bksdm_lab.dashboard",
        "wandb_workspaces": version("wandb-workspaces"),
        "entity": spec.entity,
        "project": spec.project,
        "arch": spec.arch,
        "feature_layers": spec.extra.get("feature_layers", []),
        "sections": [asdict(s) for s in spec.sections],
        "keys": plotted_keys(spec.sections),
        "regexes": plotted_regexes(spec.sections),
        "workspace": model_json(spec.workspace),
        "report": None
        if spec.report is None
        else {
            "group": spec.group,
            "runset": {"entity": spec.entity, "project": spec.project, "filters": group_filter(spec.group)},
            "paper_results": {k: dict(zip(("fid", "is", "clip_score"), v)) for k, v in PAPER_RESULTS.items()},
            "view": model_json(spec.report),
        },
    }


def wandb_api():
    """A ``wandb.Api`` for a logged-in W&B, or DashboardError. No network: only the API key is checked here."""
    import wandb

    try:
        return wandb.Api()
    except wandb.errors.UsageError as e:
        raise DashboardError(
            "not logged in to W&B (no API key): run `wandb login` or set WANDB_API_KEY, "
            "or use --dry-run to write the specification offline"
        ) from e


def default_entity(api) -> str:
    entity = os.environ.get("WANDB_ENTITY") or api.default_entity
    if not entity:
        raise DashboardError("no W&B entity: pass --entity (or set WANDB_ENTITY)")
    return entity


def save(spec: DashboardSpec) -> list[str]:
    """Save the workspace (and the report) to W&B; the URLs."""
    urls = []
    try:
        urls.append(spec.workspace.save().url)
        if spec.report is not None:
            urls.append(spec.report.save().url)
    except DashboardError:
        raise
    except Exception as e:  # network, permissions, unknown project: one line, not a traceback
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DashboardError(f"W&B refused or could not be reached ({type(e).__name__}: {first})") from e
    return urls
