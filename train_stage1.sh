#!/usr/bin/env bash
# Stage 1: ./train_stage1.sh [CKPT] [extra args]. See scripts/stage.sh.
exec "$(dirname "$0")/scripts/stage.sh" 1 "$@"
