#!/usr/bin/env bash
# Runs one stage: scripts/stage.sh STAGE [CKPT] [extra LightningCLI args, e.g. --config configs/toy.yaml]
# CKPT of the same stage resumes it exactly; of the previous stage, starts this stage from its weights.
# Without CKPT (python -m mpp.resume STAGE runs/checkpoints [the fit's arguments]):
#   - a finished stage (runs/checkpoints/stageN/final.ckpt loads) is not run again (exit 0);
#   - else the stage resumes its own newest loadable checkpoint (highest step in runs/checkpoints/stageN);
#   - else stage 2/3 starts from the previous stage's final.ckpt (an unfinished previous stage is an
#     error), and stage 1 starts fresh.
# Exit status: main.py's; 75 means "preempted, checkpoint saved: run me again" (docs/reliability.md).
# PYTHON: the interpreter to run (default: the python on PATH, e.g. an activated virtualenv's).
set -euo pipefail
cd "$(dirname "$0")/.."
stage="$1"; shift
ckpt=()
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
  ckpt=(--ckpt_path "$1"); shift
else
  # the stage's own checkpoints are checked against the model these arguments configure (mpp.resume)
  plan="$("${PYTHON:-python}" -m mpp.resume "$stage" runs/checkpoints --config "configs/stage$stage.yaml" "$@")"
  case "$plan" in
    done\ *) echo "stage $stage is finished (${plan#done }); nothing to run" >&2; exit 0 ;;
    resume\ *) echo "stage $stage resumes ${plan#resume }" >&2; ckpt=(--ckpt_path "${plan#resume }") ;;
    start\ *) echo "stage $stage starts from ${plan#start }" >&2; ckpt=(--ckpt_path "${plan#start }") ;;
    fresh) echo "stage $stage starts fresh" >&2 ;;
    *) echo "unexpected plan: $plan" >&2; exit 1 ;;
  esac
fi
exec "${PYTHON:-python}" main.py fit --config "configs/stage$stage.yaml" "${ckpt[@]}" "$@"
