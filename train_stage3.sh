#!/usr/bin/env bash
# Stage 3: ./train_stage3.sh [CKPT] [extra args]. See scripts/stage.sh.
exec "$(dirname "$0")/scripts/stage.sh" 3 "$@"
