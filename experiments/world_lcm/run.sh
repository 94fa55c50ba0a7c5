#!/usr/bin/env bash
# The few-step student in the CPU world (docs/world.md): BK-SDM-Tiny distilled from the world teacher, then made
# few-step by latent consistency distillation, with the student itself as the ODE teacher (lcm) and with the world
# teacher as the ODE teacher (lcm_teacher_ode). The judge scores, on the same prompts, the teacher and the student
# (PNDM, 25 steps) against both LCM students (LCMScheduler, 1, 2, 4 and 8 steps), all at the world's guidance 1.75.
#   experiments/world_lcm/run.sh [--out DIR] [--prompts N] [-- train overrides for the LCM runs]
# Writes DIR/student, DIR/lcm, DIR/lcm_teacher_ode (run folders), DIR/gen/<model>/ (generate's layout),
# DIR/scores.json and prints the judge's table. Every step skips what DIR already holds.
set -euo pipefail
python="${PYTHON:-python}"
out="outputs/world_lcm"
num=200
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out) out="$2"; shift 2 ;;
    --prompts) num="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "usage: $0 [--out DIR] [--prompts N] [-- train overrides]" >&2; exit 2 ;;
  esac
done
mkdir -p "$out/gen"
teacher="$("$python" -m bksdm_lab.world.teacher | sed -n 's/^world teacher: //p')"   # trains it once (~25 min)

train() {  # run folder, then train overrides; a finished run (its pipeline) is kept
  local run="$1"; shift
  [[ -f "$run/pipeline/model_index.json" ]] || "$python" -m bksdm_lab.train "$@" "hydra.run.dir=$run" overwrite=true
}
train "$out/student" experiment=world arch=tiny
train "$out/lcm" experiment=world_lcm "teacher.pretrained=$out/student/pipeline" "$@"
train "$out/lcm_teacher_ode" experiment=world_lcm teacher=world "module.lcm.init_from=$out/student/pipeline" "$@"

"$python" -m bksdm_lab.world.judge prompts --num "$num" > "$out/prompts.txt"
generate() {  # name, pipeline, sampling overrides
  local name="$1" pipeline="$2"; shift 2
  "$python" -m bksdm_lab.generate "pipeline=$pipeline" "prompts_file=$out/prompts.txt" sampling.guidance=1.75 \
    sampling.seed_mode=per-prompt sampling.generator_device=cpu progress=false "out=$out/gen/$name" "$@"
}
generate teacher "$teacher"
generate student_pndm25 "$out/student/pipeline"
for model in lcm lcm_teacher_ode; do
  for steps in 1 2 4 8; do
    generate "${model}_lcm${steps}" "$out/$model/pipeline" sampling=lcm "sampling.steps=$steps"
  done
done
"$python" -m bksdm_lab.world.judge score "$out"/gen/* --json "$out/scores.json"
