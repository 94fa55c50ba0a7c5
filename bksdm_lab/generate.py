"""python -m bksdm_lab.generate: images from a pipeline, a checkpoint or a teacher + student U-Net (a Hydra app).

python -m bksdm_lab.generate pipeline=nota-ai/bk-sdm-tiny prompt="a golden retriever" out=samples
torchrun --nproc_per_node 8 -m bksdm_lab.generate pipeline=DIR metadata=captions.csv out=DIR   # prompts split
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from bksdm_lab import CONF_DIR
from bksdm_lab.common.cli import check_group_choices, guarded
from bksdm_lab.common.quiet import quiet_libraries
from bksdm_lab.evaluation import sampling as gen
from bksdm_lab.evaluation.app import BOOL, DEVICE, LaunchError, Processes, rule_problems, run_dir, whole

# conf/generate.yaml keys -> the allowed values (the sampling group: sampling_problems)
RULES = {"num_prompts": whole(1, null=True), "grid": whole(0), "progress": BOOL, "device": DEVICE}


def generate(cfg: DictConfig) -> dict[str, Any] | None:
    """Generate into the run folder; write and return its ``results.json`` record (rank 0; other ranks: None)."""
    problems = gen.sampling_problems(cfg.sampling) + rule_problems(cfg, RULES)
    if problems:
        raise gen.GenerationError("\n".join(problems))
    procs = Processes()
    try:
        out = Path(procs.broadcast(str(run_dir(cfg))))  # rank 0's folder (a default out= has the time in it)
        prompts = gen.prompts_from_config(cfg)
        pipe, model = gen.pipeline_from_config(cfg, device=gen.config_device(cfg, procs.local_rank))
        result = gen.generate_from_config(cfg, pipe, model, prompts, out, procs.rank, procs.world_size)
        records = procs.gather(gen.result_record(result))  # also waits for every process's images
        if not procs.main:
            return None
        if procs.world_size > 1:
            gen.write_grid(out, len(prompts), cfg.get("grid", 16))
        generation = gen.combine_records(records)
        record = {"model": model, "num_prompts": len(prompts), "out_dir": str(out), "generation": generation}
        (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
        print(f"bksdm_lab.generate: {gen.summary(generation, out)}")
        return record
    finally:
        procs.close()


def errors() -> tuple[type[BaseException], ...]:
    from bksdm_lab.models.export import ExportError

    return (gen.GenerationError, gen.TeacherLoadError, ExportError, FileNotFoundError, LaunchError)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
def main(cfg: DictConfig) -> dict[str, Any] | None:
    quiet_libraries()
    return guarded("generate", generate, cfg, errors())


if __name__ == "__main__":
    check_group_choices("generate")
    main()
