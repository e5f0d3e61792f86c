#!/usr/bin/env bash
# LSUN church (outdoor) at 64x64, the paper's settings and 600K iterations (see train_lsun64.sh).
#
#   scripts/train_lsun_church64.sh DATA RUN_DIR [more `blurfast train` flags]
#
# DATA: OUT_DIR/church_outdoor_64.npy from scripts/prepare_lsun.sh (or the lmdb directory).
set -euo pipefail
STEPS=600000 exec "$(dirname "$0")/train_lsun64.sh" "$@"
