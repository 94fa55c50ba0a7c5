#!/usr/bin/env bash
# BK-SDM-v2-*, distilled from SD-v2.1-base: experiments/paper_v2.sh [base|small|tiny] [hydra overrides...]
# Data: $BKSDM_DATA_DIR/preprocessed_212k. Teacher: stabilityai/stable-diffusion-2-1-base, or teacher.pretrained=/local/folder
set -euo pipefail
arch="${1:-tiny}"
shift || true
exec python -m bksdm_lab.train experiment=paper_v2 arch="$arch" "$@"
