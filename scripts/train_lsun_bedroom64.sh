#!/usr/bin/env bash
# LSUN bedroom at 64x64, the paper's settings and 450K iterations (see train_lsun64.sh).
#
#   scripts/train_lsun_bedroom64.sh DATA RUN_DIR [more `blurfast train` flags]
#
# DATA: OUT_DIR/bedroom_64.npy from scripts/prepare_lsun.sh (or the lmdb directory).
set -euo pipefail
STEPS=450000 exec "$(dirname "$0")/train_lsun64.sh" "$@"
