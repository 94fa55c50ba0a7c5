"""python -m bksdm_lab.bench: time the real training path against a plain PyTorch loop, and generation (a Hydra app).

    python -m bksdm_lab.bench train=[experiment=demo] threads=1 gen_batch=[]   # the demo's work on CPU
    python -m bksdm_lab.bench train=[arch=base] gen_batch=[1,8]                 # SD-v1.4 -> Base on a GPU

Config: conf/bench.yaml (its ``train`` list overrides conf/train.yaml, which the bench composes and builds as
``python -m bksdm_lab.train`` does); writes ``results.json`` in the run folder. The logic is
:mod:`bksdm_lab.tools.bench`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from bksdm_lab import CONF_DIR
from bksdm_lab.tools.bench import run


def bench(cfg: DictConfig) -> dict:
    out = Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else Path(cfg.out)
    result = run(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"bksdm_lab.bench: wrote {out / 'results.json'}")
    return result


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench")
def main(cfg: DictConfig) -> dict:
    from bksdm_lab.train import USER_ERRORS

    torch.set_float32_matmul_precision("high")  # as train does
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return bench(cfg)
    except (ValueError, *USER_ERRORS) as err:  # a bad option value, a teacher or data that cannot be used
        print(f"bksdm_lab.bench: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
