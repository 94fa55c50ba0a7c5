"""python -m bksdm_lab.arch: parameter counts, MACs and the removed blocks of each variant (a Hydra app).

python -m bksdm_lab.arch teacher=sd21base format=json       # the v2 students, as one JSON object keyed by variant
python -m bksdm_lab.arch 'patterns=[{up: [[0,2],[0,2],[0,1,2],[0,2]]}]'   # a keep pattern of yours beside the variants
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from bksdm_lab import CONF_DIR
from bksdm_lab.common.cli import guarded
from bksdm_lab.models.report import ReportError, load_archs, pattern_archs, report, variant_names


def run(cfg: DictConfig) -> str:
    """Print (and return) the report of ``cfg.variants`` (base, small, tiny when null) and ``cfg.patterns`` side by
    side, against ``cfg.teacher``."""
    names = variant_names(cfg.variants)
    text = report(cfg, {**load_archs(names), **pattern_archs(cfg.get("patterns"), (), names, cfg.teacher)})
    print(text)
    return text


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="arch")
def main(cfg: DictConfig) -> str:
    return guarded("arch", run, cfg, (ReportError,))


if __name__ == "__main__":
    main()
