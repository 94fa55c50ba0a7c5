#!/usr/bin/env bash
# BK-SDM-*-2M, the paper recipe on LAION-Aesthetics 2256k: experiments/paper_2m.sh [base|small|tiny] [hydra overrides...]
# Data: $BKSDM_DATA_DIR/preprocessed_2256k (python -m bksdm_lab.data.download 2256k). Teacher: SD-v1.4.
set -euo pipefail
arch="${1:-tiny}"
shift || true
exec python -m bksdm_lab.train experiment=paper_2m arch="$arch" "$@"
