#!/usr/bin/env bash
# The paper's KD ablation in the CPU-scale world (docs/world.md): 5 variants x 3 seeds distilled from
# the world teacher (build it once: python -m bksdm_lab.world.teacher) on its latents, scored with the world's judge.
# Then, optionally, whether block importance predicts distillation: experiments/toy_ablation/prediction.py --out DIR
#   experiments/toy_ablation/run.sh [--out DIR] [--seeds 0,1,2] [--variants bksdm,task_only] [--parallel 2] [--short] [-- overrides]
# Writes DIR/runs/<variant>/seed<k>/ (each a python -m bksdm_lab.train run folder), DIR/table.md, DIR/table.csv,
# DIR/scores.csv. The notebook notebooks/toy_ablation.ipynb plots it (TOY_ABLATION_DIR=DIR; the experiments extra).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${PYTHON:-python}"
out="outputs/toy_ablation/$(date +%Y-%m-%d_%H-%M-%S)"
short=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[$i]}" in
    --) break ;;
    --out) out="${args[$((i + 1))]}" ;;
    --out=*) out="${args[$i]#--out=}" ;;
    --short) short=(--short) ;;
  esac
done
# a given --out reaches ablation.py twice, with the same value
"$python" "$here/ablation.py" --out "$out" "$@"
exec "$python" "$here/collect.py" --out "$out" "${short[@]}"
