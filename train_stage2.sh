#!/usr/bin/env bash
# Stage 2: ./train_stage2.sh [CKPT] [extra args]. See scripts/stage.sh.
exec "$(dirname "$0")/scripts/stage.sh" 2 "$@"
