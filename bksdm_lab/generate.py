"""python -m bksdm_lab.generate: images from a pipeline, a checkpoint or a teacher + student U-Net (a Hydra app).

    python -m bksdm_lab.generate pipeline=nota-ai/bk-sdm-tiny prompt="a golden retriever" out=samples
    python -m bksdm_lab.generate pipeline=EXPORT_DIR metadata=coco/metadata.csv num_prompts=1000 sampling=fast
    python -m bksdm_lab.generate teacher=sd14 unet=EXPORT_DIR prompts_file=p.txt
    python -m bksdm_lab.generate checkpoint=outputs/<run>/checkpoints/last.ckpt prompt="a red circle"

Config: conf/generate.yaml (+ the ``sampling``, ``teacher`` and ``paths`` groups); ``--help`` lists it. The logic
is :mod:`bksdm_lab.evaluation.sampling`.
"""

from __future__ import annotations

import json
from typing import Any

import hydra
from omegaconf import DictConfig

from bksdm_lab import CONF_DIR
from bksdm_lab.evaluation import sampling as gen
from bksdm_lab.evaluation.app import guarded, run_dir


def generate(cfg: DictConfig) -> dict[str, Any]:
    """Generate into the run folder; write and return its ``results.json`` record."""
    out = run_dir(cfg)
    prompts = gen.prompts_from_config(cfg)
    pipe, model = gen.pipeline_from_config(cfg)
    result = gen.generate_from_config(cfg, pipe, model, prompts, out)
    record = {"model": model, "num_prompts": len(prompts), "out_dir": str(out), "generation": gen.result_record(result)}
    (out / "results.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"bksdm_lab.generate: {gen.summary(result)}")
    return record


def errors() -> tuple[type[BaseException], ...]:
    from bksdm_lab.models.export import ExportError

    return (gen.GenerationError, gen.TeacherLoadError, ExportError, FileNotFoundError)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="generate")
def main(cfg: DictConfig) -> dict[str, Any] | None:
    return guarded("generate", generate, cfg, errors())


if __name__ == "__main__":
    main()
