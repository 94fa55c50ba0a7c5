"""Keep API tokens out of everything a run writes (Hydra's config copy, W&B, CSV, checkpoints, argv), and local
paths that reveal the home folder out of every file meant to be shared (see :func:`shareable`)."""

from __future__ import annotations

import logging
import os
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


_PAIR = re.compile(r"""(?P<key>[+~]*[\w.\-/]+)=(?P<value>'[^']*'|"[^"]*"|[^\s,'"\])]+)""")


def redact_text(text: object) -> str:
    """``text`` with the value of every ``key=value`` whose key is secret-named redacted (overrides in a message)."""
    return _PAIR.sub(lambda m: f"{m['key']}={REDACTED}" if is_secret(m["key"].lstrip("+~")) else m[0], str(text))


class RedactLog(logging.Filter):
    """A logging filter for Hydra's handlers (its launchers log each job's overrides): no secret value in a message."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if (clean := redact_text(text)) != text:
            record.msg, record.args = clean, None
        return True


def scrub_hydra_dir(run_dir: str | Path) -> None:
    """Rewrite ``<run dir>/.hydra/{config,overrides,hydra}.yaml`` without secret values."""
    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        scrub_config_file(Path(run_dir) / ".hydra" / name)


def scrub_config_file(path: str | Path) -> None:
    """Rewrite a config Hydra saved (a run's ``.hydra/*.yaml``, a sweep's ``multirun.yaml``) without secret values."""
    if not Path(path).is_file():
        return
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    data = [redact_override(a) for a in data] if isinstance(data, list) else redact(data)
    if isinstance(data, dict) and "hydra" in data:  # hydra.yaml, multirun.yaml: the overrides are listed there too
        overrides = data["hydra"].get("overrides", {})
        for key in ("task", "hydra"):
            overrides[key] = [redact_override(a) for a in overrides.get(key) or []]
        job = data["hydra"].get("job", {})
        if job.get("override_dirname"):
            job["override_dirname"] = ",".join(redact_override(a) for a in job["override_dirname"].split(","))
    OmegaConf.save(OmegaConf.create(data), path)


def redact_dirname(override_dirname: str) -> str:
    """Hydra's ``job.override_dirname`` (``a=1,hub.token=x``) with secret values redacted and home-folder paths
    written from ``~`` (it names W&B runs and multirun folders)."""
    if not override_dirname:
        return ""
    return shareable_text(",".join(redact_override(a) for a in override_dirname.split(",")))


# ---- local paths in shared files -------------------------------------------------------------------------
# Files meant to be shared (the model card, the W&B config and run name, CSV/TensorBoard hparams, the exported
# pipeline's configs, the run config stored in checkpoints) name no absolute path under the user's home folder:
# such a path is written from `~` (`/home/me/.cache/bksdm_lab/demo` -> `~/.cache/bksdm_lab/demo`), which the same
# user's tools expand again (`Path.expanduser`), so export still finds the run's teacher; other paths are kept.
# A model card names a model source by its hub id or its folder name only (`public_source`).
LOCAL = "<local>"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _home_spellings() -> list[str]:
    """The home folder as given by $HOME and with symlinks resolved, longest first (none if it is ``/``)."""
    try:
        home = str(Path.home())
    except RuntimeError:  # no home folder known
        return []
    spellings = {os.path.abspath(home)}
    try:
        spellings.add(os.path.realpath(home))
    except OSError:
        pass
    return sorted({p.rstrip("/") for p in spellings} - {""}, key=len, reverse=True)


def shareable_text(text: str) -> str:
    """``text`` with every absolute path under the home folder written from ``~``."""
    for home in _home_spellings():
        if home in text:
            text = re.sub(re.escape(home) + r"(?=/|$|[^\w.\-])", "~", text)
    return text


def shareable(obj: Any) -> Any:
    """A copy of a config container with :func:`shareable_text` applied to every string (keys included)."""
    if isinstance(obj, dict):
        return {(shareable_text(k) if isinstance(k, str) else k): shareable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(shareable(v) for v in obj)
    if isinstance(obj, Path):
        return shareable_text(str(obj))
    return shareable_text(obj) if isinstance(obj, str) else obj


def public_source(source: str | Path | None) -> str | None:
    """How a model card names a model source: a hub id as it is, a local folder by its name only
    (``/home/me/models/stable-diffusion-v1-4`` -> ``<local>/stable-diffusion-v1-4``)."""
    if source is None:
        return None
    text = str(source)
    if HUB_ID.match(text) and not os.path.exists(os.path.expanduser(text)):
        return text
    return f"{LOCAL}/{Path(text.rstrip('/')).name or text}"
