#!/usr/bin/env bash
# All three stages in order; a finished stage is skipped, an unfinished one resumes its newest
# checkpoint, and each new stage starts from the previous stage's final.ckpt (scripts/stage.sh).
# Rerun it after any interruption. Extra arguments go to every stage, e.g. ./train.sh --config configs/toy.yaml
# Stops at the first stage that does not finish, with its exit status: 75 means it was preempted and
# saved its state (run ./train.sh again to continue; docs/reliability.md).
set -uo pipefail
cd "$(dirname "$0")"
for stage in 1 2 3; do
  "./train_stage$stage.sh" "$@"
  code=$?
  if [ "$code" -eq 75 ]; then
    echo "stage $stage was preempted and saved its state: run ./train.sh again to continue" >&2
  fi
  if [ "$code" -ne 0 ]; then exit "$code"; fi
done
