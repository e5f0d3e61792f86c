#!/usr/bin/env bash
# LSUN at 64x64 with the paper's settings (Lee et al. 2022; docs/process.md section 3):
# N = 1000 steps, linear noise (beta 1e-4 .. 0.02), quartic blur, sigma 0.4,
# sigma_max 0.15; the paper64 U-Net; Adam, lr 5e-5, batch 16, EMA 0.9999; STEPS
# iterations (default 600K as for church; the bedroom recipe sets 450K); pixels in
# [0, 1] as the paper's code. One GPU, bf16, torch.compile and the whole step in a
# CUDA graph (add --no-cuda-graphs or --no-compile to turn off).
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

exec blurfast train --data "$DATA" --out "$OUT" --resume auto \
  --preset paper64 --resolution 64 --resize squash --pixel-range 0,1 --flip \
  --num-steps 1000 --noise-schedule linear --beta-min 1e-4 --beta-max 0.02 \
  --blur-schedule quartic --sigma 0.4 --sigma-min 0 --sigma-max 0.15 --target eps \
  --batch-size 16 --steps "${STEPS:-600000}" --lr 5e-5 --optimizer adam --grad-clip 1.0 \
  --ema-decay 0.9999 \
  --precision bf16 --compile --cuda-graphs \
  --log-every 100 --save-every 5000 --keep 3 --sample-every 10000 --sample-count 64 \
  "$@"
