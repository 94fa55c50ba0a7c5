"""bksdm_lab: block-removed knowledge distillation of Stable Diffusion (BK-SDM) with Hydra, Lightning and W&B."""

from omegaconf import OmegaConf

from bksdm_lab.common.conf import CONF_DIR  # noqa: F401  (the command files' `from bksdm_lab import CONF_DIR`)
from bksdm_lab.common.secrets import redact_dirname

# conf/train.yaml names multirun job folders through this resolver: registered on import, so composing
# the config from Python (tests, notebooks) resolves it too.
OmegaConf.register_new_resolver("redact_dirname", redact_dirname, replace=True)


def _keep_pattern(what: str, *, _parent_, _root_):
    """``${keep_pattern:weight_map}`` etc. in conf/arch/*.yaml: derived from the arch's keep pattern and the teacher
    (bksdm_lab.models.keep, imported only when an arch config is resolved)."""
    from bksdm_lab.models.keep import resolver

    return resolver(what, _parent_=_parent_, _root_=_root_)


OmegaConf.register_new_resolver("keep_pattern", _keep_pattern, replace=True)
