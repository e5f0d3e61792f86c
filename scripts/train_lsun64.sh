#!/usr/bin/env bash
# LSUN at 64x64 with the paper's settings (scripts/lsun64_paper.yaml: N = 1000 steps,
# linear noise (beta 1e-4 .. 0.02), quartic blur, sigma 0.4, sigma_max 0.15; the paper64
# U-Net; Adam, lr 5e-5, batch 16, EMA 0.9999; pixels in [0, 1] as the paper's code) and
# STEPS iterations (default 600K as for church; the bedroom recipe sets 450K). One GPU,
# bf16, torch.compile and the whole step in a CUDA graph (add --no-cuda-graphs or
# --no-compile to turn off).
#
#   STEPS=600000 scripts/train_lsun64.sh DATA RUN_DIR [more `blurfast train` flags]
#
# DATA: OUT_DIR/<category>_64.npy from scripts/prepare_lsun.sh (or the lmdb
# directory itself). Interrupted runs continue where they stopped (--resume auto).
set -euo pipefail

if [ $# -lt 2 ]; then
  sed -n '2,12p' "$0"
  exit 2
fi
DATA=$1
OUT=$2
shift 2

exec blurfast train --config "$(dirname "$0")/lsun64_paper.yaml" \
  --data "$DATA" --out "$OUT" --resume auto --steps "${STEPS:-600000}" --cuda-graphs "$@"
