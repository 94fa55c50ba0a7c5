"""The BK-SDM paper's evaluation settings and its result table (arXiv 2305.15798, MS-COCO 30K at 256 px).

The sampling settings themselves live in ``conf/sampling/paper.yaml`` (the default of the ``sampling`` config
group of every command); they are read from there, not repeated here.
"""

from __future__ import annotations

import re

from omegaconf import OmegaConf

from bksdm_lab.common.conf import CONF_DIR

PAPER_SAMPLING_FILE = CONF_DIR / "sampling" / "paper.yaml"
# scheduler, steps, guidance, resolution (null: the model's), seed, seed_mode, batch_size, precision, ...
PAPER_SAMPLING: dict = OmegaConf.to_container(OmegaConf.load(PAPER_SAMPLING_FILE), resolve=True)
PAPER_RESOLUTION = 512  # the SD-v1.4 / v2.1-base students of the paper: the model's own size

PAPER_IMAGES = 30_000
# BK-SDM paper (arXiv 2305.15798), MS-COCO 30K, 256 px: (FID, IS, CLIP score)
PAPER_RESULTS: dict[str, tuple[float, float, float]] = {
    "SD-v1.4": (13.05, 36.76, 0.2958),
    "BK-SDM-Base": (15.76, 33.79, 0.2878),
    "BK-SDM-Small": (16.98, 31.68, 0.2677),
    "BK-SDM-Tiny": (17.12, 30.09, 0.2653),
    "BK-SDM-Base-2M": (14.81, 34.17, 0.2883),
    "BK-SDM-Small-2M": (17.05, 33.10, 0.2734),
    "BK-SDM-Tiny-2M": (17.53, 31.32, 0.2690),
    "SD-v2.1-base": (13.93, 35.93, 0.3075),
    "BK-SDM-v2-Base": (15.85, 31.70, 0.2868),
    "BK-SDM-v2-Small": (16.61, 31.73, 0.2901),
    "BK-SDM-v2-Tiny": (15.68, 31.64, 0.2897),
}
# What a generation run must match to be compared with the table (`scheduler` as the short name of conf/sampling).
PAPER_SETTINGS = {
    **{k: PAPER_SAMPLING[k] for k in ("scheduler", "steps", "guidance", "seed", "seed_mode", "batch_size")},
    "resolution": PAPER_RESOLUTION,
}


def paper_model(name: str | None) -> str | None:
    """The paper's model a name refers to ("nota-ai/bk-sdm-tiny", "BK-SDM-Tiny", "sd14", ...), or None."""
    if not name:
        return None
    text = name.lower().replace("_", "-")
    match = re.search(r"bk-sdm-(v2-)?(base|small|tiny)(-2m)?", text)
    if match:
        v2, size, two_m = match.groups()
        if v2 and two_m:
            return None
        return f"BK-SDM-{'v2-' if v2 else ''}{size.capitalize()}{'-2M' if two_m else ''}"
    if re.search(r"stable-diffusion-2-1-base|sd-v2\.1-base|\bsd21base\b", text):
        return "SD-v2.1-base"
    if re.search(r"stable-diffusion-v1-4|sd-v1\.4|\bsd14\b", text):
        return "SD-v1.4"
    return None
