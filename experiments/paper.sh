#!/usr/bin/env bash
# The BK-SDM paper recipe: experiments/paper.sh [base|small|tiny] [hydra overrides...]
# Data: $BKSDM_DATA_DIR/preprocessed_212k. Teacher: SD-v1.4 from the hub, or teacher.pretrained=/local/folder
set -euo pipefail
arch="${1:-tiny}"
shift || true
exec python -m bksdm_lab.train experiment=paper arch="$arch" "$@"
