"""bksdm_lab: block-removed knowledge distillation of Stable Diffusion (BK-SDM) with Hydra, Lightning and W&B."""

from pathlib import Path

from omegaconf import OmegaConf

from bksdm_lab.common.secrets import redact_dirname

# The Hydra configs of the clone this package is installed from (editable install).
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# conf/train.yaml names multirun job folders through this resolver: registered on import, so composing
# the config from Python (tests, notebooks) resolves it too.
OmegaConf.register_new_resolver("redact_dirname", redact_dirname, replace=True)
