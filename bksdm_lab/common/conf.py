"""Where the Hydra configs are: ``conf/`` of the clone this package is installed from (editable install)."""

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
