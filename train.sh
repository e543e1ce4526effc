#!/usr/bin/env bash
# All three stages in order, each starting from the newest valid checkpoint of the one before.
# Extra arguments go to every stage, e.g. ./train.sh --config configs/toy.yaml
set -euo pipefail
cd "$(dirname "$0")"
./train_stage1.sh "$@"
./train_stage2.sh "$@"
./train_stage3.sh "$@"
