"""python -m bksdm_lab.evaluate: the paper's evaluation (FID, IS, CLIP score) of a model (a Hydra app).

python -m bksdm_lab.evaluate pipeline=nota-ai/bk-sdm-tiny ref_stats=val2014_256.npz out=eval/tiny
python -m bksdm_lab.evaluate stats images=coco/val2014 out=val2014_256.npz     # real-image statistics
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig

from bksdm_lab import CONF_DIR
from bksdm_lab.common.cli import check_group_choices, guarded
from bksdm_lab.common.quiet import quiet_libraries
from bksdm_lab.evaluation import sampling as gen
from bksdm_lab.evaluation.app import BOOL, DEVICE, LaunchError, Processes, rule_problems, run_dir, whole
from bksdm_lab.evaluation.evaluate import (
    BackgroundScorer,
    EvaluationError,
    Scorer,
    comparability_notes,
    compute_stats,
    format_table,
    generated_paths,
    results_of,
    score_images,
)
from bksdm_lab.evaluation.metrics import (
    FeatureStats,
    MissingEvalDependency,
    check_available,
    clip_from_spec,
    extractor_from_spec,
    feature_widths,
)
from bksdm_lab.evaluation.paper import PAPER_IMAGES, PAPER_RESULTS, paper_model


def _device(name: str | None) -> torch.device:
    return torch.device(name) if name else gen.default_device()


def prompt_metadata(cfg: DictConfig) -> str | None:
    """The metadata csv the prompts come from: ``metadata=``, else the MS-COCO captions (``coco_metadata``) unless
    ``prompt=`` or ``prompts_file=`` gives the prompts."""
    if cfg.get("metadata"):
        return str(cfg.metadata)
    if cfg.get("prompt") or cfg.get("prompts_file"):
        return None
    return str(cfg.coco_metadata) if cfg.get("coco_metadata") else None


def check_ref_stats(cfg: DictConfig, extractor: torch.nn.Module) -> None:
    """``ref_stats`` is FID statistics of the feature extractor's width: checked before any image is generated."""
    try:
        stats = FeatureStats.load(cfg.ref_stats)
    except ValueError as err:
        raise EvaluationError(f"ref_stats={cfg.ref_stats!r}: {err}") from None
    width = feature_widths(extractor)[0]
    if stats.dim != width:
        raise EvaluationError(
            f"ref_stats={cfg.ref_stats!r} holds {stats.dim}-d features but feature_extractor={cfg.feature_extractor} "
            f"gives {width}-d ones: compute the statistics with the same extractor (python -m bksdm_lab.evaluate "
            f"stats images=DIR feature_extractor={cfg.feature_extractor} out=FILE.npz)"
        )


# conf/evaluate.yaml and conf/evaluate_stats.yaml keys -> the allowed values (the sampling group: sampling_problems)
RULES = {"num_prompts": whole(1, null=True), "eval_resolution": whole(0), "is_splits": whole(1), "grid": whole(0)}
RULES |= {"eval_batch_size": whole(1), "overlap": BOOL, "wandb": BOOL, "progress": BOOL, "device": DEVICE}
STATS_RULES = {"resize": whole(0), "batch_size": whole(1), "num_images": whole(1, null=True), "progress": BOOL}
STATS_RULES |= {"device": DEVICE}


def run_evaluation(cfg: DictConfig) -> dict[str, Any] | None:
    """Generate (if a model is given) into the run folder, score, report; returns the ``results.json`` record (on
    rank 0; other processes of a torchrun launch generate their share and return None)."""
    problems = gen.sampling_problems(cfg.sampling) + rule_problems(cfg, RULES)
    if problems:
        raise EvaluationError("\n".join(problems))
    procs = Processes()
    try:
        return _run_evaluation(cfg, procs)
    finally:
        procs.close()


def _run_evaluation(cfg: DictConfig, procs: Processes) -> dict[str, Any] | None:
    wall_start = time.perf_counter()
    out_dir = Path(procs.broadcast(str(run_dir(cfg))))  # rank 0's folder (a default out= has the time in it)
    has_source = any(cfg.get(k) for k in ("pipeline", "unet", "checkpoint"))
    metadata = prompt_metadata(cfg)
    device = gen.config_device(cfg, procs.local_rank)
    # one process: score each finished batch beside the generation; several: rank 0 scores once all are written
    overlap = bool(cfg.overlap and has_source and procs.world_size == 1)
    try:
        if cfg.ref_stats and not Path(cfg.ref_stats).is_file():
            raise FileNotFoundError(f"ref_stats={cfg.ref_stats!r} does not exist")
        check_available(cfg.feature_extractor, cfg.clip)
        prompts = gen.read_prompts(gen.prompt_list(cfg), cfg.get("prompts_file"), metadata, cfg.get("num_prompts"))
        extractor = extractor_from_spec(cfg.feature_extractor)  # on the CPU until needed
        if cfg.ref_stats:
            check_ref_stats(cfg, extractor)
        generation: dict[str, Any] = {}
        model, clip, scores = None, None, None
        if has_source:
            if overlap:
                extractor, clip = _metric_models(cfg, extractor, device)
            generated = _generate(cfg, procs, prompts, out_dir, device, (extractor, clip) if overlap else None)
            if generated is None:
                return None
            generation, model, scores = generated
        else:
            if not procs.main:
                return None
            manifest = out_dir / gen.MANIFEST
            if manifest.is_file():
                generation = json.loads(manifest.read_text()).get("settings", {})
                model = generation.get("model")
        if scores is None:
            extractor, clip = _metric_models(cfg, extractor, device)
            scores = score_images(
                generated_paths(out_dir, len(prompts)),
                prompts,
                feature_extractor=extractor,
                clip_model=clip,
                resize=cfg.eval_resolution or None,
                batch_size=cfg.eval_batch_size,
                progress=cfg.progress,
            )
        results = results_of(
            scores,
            ref_stats=cfg.ref_stats,
            is_splits=cfg.is_splits,
            stats_out=out_dir / "generated_stats.npz",
            overlapped=overlap,
        )
    except FileNotFoundError as err:
        hint = "" if has_source else " (no pipeline given: only images already in out= are scored)"
        raise FileNotFoundError(f"{err}{hint}") from None
    print(f"bksdm_lab.evaluate: {scoring_summary(results['scoring'])}", flush=True)
    results["wall_seconds"] = time.perf_counter() - wall_start

    results = {
        "model": model,
        "paper_model": cfg.paper_model or paper_model(model),
        **results,
        "ref_stats": str(cfg.ref_stats) if cfg.ref_stats else None,
        "feature_extractor": getattr(extractor, "name", cfg.feature_extractor),
        "clip_model": getattr(clip, "name", None) if clip is not None else None,
        "eval_resolution": cfg.eval_resolution,
        "metadata": metadata,
        "generation": generation,
    }
    return _report(cfg, out_dir, results)


def _metric_models(cfg: DictConfig, extractor: torch.nn.Module, device: torch.device) -> tuple[Any, Any]:
    """The feature extractor on ``device``, and the CLIP model there (None with ``clip=none``)."""
    return extractor.to(device), None if cfg.clip == "none" else clip_from_spec(cfg.clip).to(device)


def _generate(
    cfg: DictConfig, procs: Processes, prompts: list[str], out_dir: Path, device: torch.device, models: tuple | None
) -> tuple[dict[str, Any], str, Any] | None:
    """Generate this process's share of the prompts into ``out_dir``; with ``models`` (the feature extractor and the
    CLIP model: ``overlap``) score each finished batch beside it. Returns rank 0's ``(generation record, model
    description, scores or None)``, once every process's images are written; None on the other ranks."""
    pipe, model = gen.pipeline_from_config(cfg, device=device)
    scorer = None
    if models is not None:
        scorer = BackgroundScorer(
            Scorer(
                prompts,
                feature_extractor=models[0],
                clip_model=models[1],
                resize=cfg.eval_resolution or None,
                batch_size=cfg.eval_batch_size,
                is_splits=cfg.is_splits,
                progress=cfg.progress,
                total=len(prompts),
            ),
            len(prompts),
            device,
        )
    try:
        result = gen.generate_from_config(cfg, pipe, model, prompts, out_dir, procs.rank, procs.world_size, sink=scorer)
    except BaseException:
        if scorer is not None:
            scorer.abort()
        raise
    records = procs.gather(gen.result_record(result))  # also waits for every process's images
    del pipe
    if not procs.main:
        return None
    generation = gen.combine_records(records)
    if procs.world_size > 1:
        gen.write_grid(out_dir, len(prompts), cfg.get("grid", 16))
    print(f"bksdm_lab.evaluate: {gen.summary(generation, out_dir)}", flush=True)
    scores = scorer.close() if scorer is not None else None
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return generation, model, scores


def _report(cfg: DictConfig, out_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """The paper's numbers for the same model beside ours, ``results.json``, the console table and W&B."""
    if results["paper_model"] and results["paper_model"] not in PAPER_RESULTS:
        print(f"bksdm_lab.evaluate: unknown paper_model {results['paper_model']!r}; known: {', '.join(PAPER_RESULTS)}")
        results["paper_model"] = None
    if results["paper_model"]:
        fid, is_, clip_score = PAPER_RESULTS[results["paper_model"]]
        results["paper"] = {"fid": fid, "is": is_, "clip_score": clip_score, "num_images": PAPER_IMAGES}
    results["notes"] = comparability_notes(results, cfg.feature_extractor, cfg.clip, results["generation"])
    results["comparable_to_paper"] = not results["notes"]
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))
    print(f"bksdm_lab.evaluate: wrote {out_dir / 'results.json'}")
    if cfg.wandb:
        from bksdm_lab.evaluation.wandb_log import log_results

        wandb_dir = log_results(results, out_dir, cfg.wandb_project, cfg.wandb_name or out_dir.name)
        print(f"bksdm_lab.evaluate: logged to W&B ({wandb_dir})")
    return results


def scoring_summary(scoring: dict[str, Any]) -> str:
    rate = f" ({scoring['images_per_s']:.3g} images/s)" if scoring.get("images_per_s") else ""
    where = ", beside the generation" if scoring.get("overlapped") else ""
    return f"scored {scoring['images']} images in {scoring['seconds']:.1f} s{rate}{where}"


def run_stats(cfg: DictConfig) -> Path:
    """``evaluate stats``: the FID statistics of a folder of real images, saved to ``out``; unusable files are
    skipped (as in training), counted and named."""
    problems = rule_problems(cfg, STATS_RULES)
    folder = Path(cfg.out).parent
    with contextlib.suppress(OSError):
        folder.mkdir(parents=True, exist_ok=True)
    if not (folder.is_dir() and os.access(folder, os.W_OK)):
        problems.append(f"out={cfg.out!r}: cannot write in {folder}")
    if problems:
        raise EvaluationError("\n".join(problems))
    check_available(cfg.feature_extractor)
    extractor = extractor_from_spec(cfg.feature_extractor).to(_device(cfg.device))
    stats, skipped = compute_stats(
        cfg.images,
        extractor,
        resize=cfg.resize or None,
        batch_size=cfg.batch_size,
        num_images=cfg.num_images,
        progress=cfg.progress,
    )
    if skipped:  # each one is in the log too
        names = "; ".join(map(str, skipped[:3])) + ("; ..." if len(skipped) > 3 else "")
        print(f"bksdm_lab.evaluate: skipped {len(skipped)} unusable image file(s): {names}", flush=True)
    if stats.n < 2:
        raise EvaluationError(
            f"statistics need at least 2 usable images under images={cfg.images}, found {stats.n} "
            f"({len(skipped)} unusable skipped)"
        )
    out = stats.save(cfg.out)
    print(
        f"bksdm_lab.evaluate: wrote {out} ({stats.n:,} images, {stats.mu.shape[0]}-d features, "
        f"feature extractor {cfg.feature_extractor}; {len(skipped)} unusable skipped)"
    )
    return out


def errors() -> tuple[type[BaseException], ...]:
    from bksdm_lab.data.common import BadSample  # an image in out= (or of real_images) that cannot be read
    from bksdm_lab.models.export import ExportError

    return (
        BadSample,
        gen.GenerationError,
        gen.TeacherLoadError,
        ExportError,
        EvaluationError,
        MissingEvalDependency,
        FileNotFoundError,
        ValueError,
        LaunchError,
    )


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate")
def evaluate_app(cfg: DictConfig) -> dict[str, Any] | None:
    return guarded("evaluate", run_evaluation, cfg, errors())


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="evaluate_stats")
def stats_app(cfg: DictConfig) -> Path | None:
    return guarded("evaluate", run_stats, cfg, errors())


def main() -> None:
    """``python -m bksdm_lab.evaluate [stats] [key=value ...]``: the first word picks the config."""
    quiet_libraries()
    if sys.argv[1:2] == ["stats"]:
        del sys.argv[1]
        stats_app()
    else:
        evaluate_app()


if __name__ == "__main__":
    check_group_choices("evaluate")
    main()
