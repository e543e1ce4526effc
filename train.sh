#!/usr/bin/env bash
# All three stages in order; a finished stage is skipped, an unfinished one resumes its newest
# checkpoint, and each new stage starts from the previous stage's final.ckpt (scripts/stage.sh).
# Rerun it after any interruption. Extra arguments go to every stage, e.g. ./train.sh --config configs/toy.yaml
# Stops at the first stage that does not finish, with its exit status (75: preempted, rerun me).
set -euo pipefail
cd "$(dirname "$0")"
./train_stage1.sh "$@"
./train_stage2.sh "$@"
./train_stage3.sh "$@"
