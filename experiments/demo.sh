#!/usr/bin/env bash
# Offline demo (no network, no GPU). Extra args are Hydra overrides, e.g. arch=base trainer.max_steps=50
set -euo pipefail
exec python -m bksdm_lab.train experiment=demo "$@"
