#!/usr/bin/env bash
# Runs one stage: scripts/stage.sh STAGE [CKPT] [extra LightningCLI args, e.g. --config configs/toy.yaml]
# CKPT of the same stage resumes it exactly; of the previous stage, starts this stage from its weights.
# Without CKPT, stages 2 and 3 start from the newest loadable checkpoint of the previous stage
# (unreadable ones are skipped with a warning); stage 1 starts fresh.
set -euo pipefail
cd "$(dirname "$0")/.."
stage="$1"; shift
ckpt=()
if [ $# -gt 0 ] && [[ "$1" != -* ]]; then
  ckpt=(--ckpt_path "$1"); shift
elif [ "$stage" -gt 1 ]; then
  prev=$((stage - 1))
  found="$(python -m mpp.checkpoints latest "runs/checkpoints/stage$prev")" \
    || { echo "no loadable stage-$prev checkpoint under runs/checkpoints/stage$prev: run ./train_stage$prev.sh first" >&2; exit 1; }
  ckpt=(--ckpt_path "$found")
fi
exec python main.py fit --config "configs/stage$stage.yaml" "${ckpt[@]}" "$@"
