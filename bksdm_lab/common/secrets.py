"""Keep API tokens out of everything a run writes: Hydra's config copy, W&B, CSV, checkpoints, argv."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

SECRET_KEY = re.compile(r"(token|api_?key|secret|password|passwd|credential)", re.IGNORECASE)
REDACTED = "<redacted>"


def is_secret(key: str) -> bool:
    return bool(SECRET_KEY.search(key.rsplit(".", 1)[-1]))


def redact(obj: Any) -> Any:
    """A copy of a config container with every secret-named key's value replaced (None stays None)."""
    if isinstance(obj, dict):
        return {k: (REDACTED if is_secret(str(k)) and v is not None else redact(v)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact(v) for v in obj)
    return obj


def redact_override(arg: str) -> str:
    """``hub.token=abc`` -> ``hub.token=<redacted>``; other arguments unchanged."""
    key, sep, _value = arg.partition("=")
    return f"{key}={REDACTED}" if sep and is_secret(key.lstrip("+~")) else arg


def scrub_hydra_dir(run_dir: str | Path) -> None:
    """Rewrite ``<run dir>/.hydra/{config,overrides,hydra}.yaml`` without secret values."""
    hydra_dir = Path(run_dir) / ".hydra"
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        path = hydra_dir / name
        if not path.is_file():
            continue
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        data = [redact_override(a) for a in data] if isinstance(data, list) else redact(data)
        if isinstance(data, dict) and "hydra" in data:  # hydra.yaml: the overrides are listed there too
            overrides = data["hydra"].get("overrides", {})
            for key in ("task", "hydra"):
                overrides[key] = [redact_override(a) for a in overrides.get(key) or []]
            job = data["hydra"].get("job", {})
            if job.get("override_dirname"):
                job["override_dirname"] = ",".join(redact_override(a) for a in job["override_dirname"].split(","))
        OmegaConf.save(OmegaConf.create(data), path)


def redact_dirname(override_dirname: str) -> str:
    """Hydra's ``job.override_dirname`` (``a=1,hub.token=x``) with secret values redacted."""
    return ",".join(redact_override(a) for a in override_dirname.split(",")) if override_dirname else ""
