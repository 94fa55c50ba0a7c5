"""python -m bksdm_lab.bench: time a distillation step, the frozen parts and generation (a Hydra app).

    python -m bksdm_lab.bench                                        # SD-v1.4 -> base/small/tiny
    python -m bksdm_lab.bench teacher=demo variants=[tiny] batch=4 steps=3 device=cpu

Config: conf/bench.yaml (+ the ``teacher``, ``sampling`` and ``paths`` groups); writes ``results.json`` in the run
folder. The logic is :mod:`bksdm_lab.tools.bench`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bksdm_lab import CONF_DIR
from bksdm_lab.tools.bench import run


def bench(cfg: DictConfig) -> dict:
    result = run(cfg)
    out = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None
    if out is not None:
        (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        print(f"bksdm_lab.bench: wrote {out / 'results.json'}")
    return result


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench")
def main(cfg: DictConfig) -> dict:
    try:
        return bench(cfg)
    except ValueError as err:  # a bad option value, a weight map that does not fit the teacher
        print(f"bksdm_lab.bench: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
