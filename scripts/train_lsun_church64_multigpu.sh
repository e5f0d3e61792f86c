#!/usr/bin/env bash
# LSUN church 64x64, the paper's settings (scripts/lsun64_paper.yaml) on several GPUs
# of one machine: torchrun + DistributedDataParallel (NCCL). The global batch stays
# the paper's 16 unless GLOBAL_BATCH is set; each GPU takes GLOBAL_BATCH / NGPUS (default:
# the GPUs CUDA_VISIBLE_DEVICES leaves visible). torch.compile is on; --cuda-graphs (as an
# extra flag) captures each rank's step with its all-reduce, not yet run on several GPUs.
#
#   NGPUS=8 [GLOBAL_BATCH=64] scripts/train_lsun_church64_multigpu.sh DATA RUN_DIR [flags]
#
# With a larger GLOBAL_BATCH consider a larger --lr and fewer --steps.
set -euo pipefail

if [ $# -lt 2 ]; then
  sed -n '2,10p' "$0"
  exit 2
fi
DATA=$1
OUT=$2
shift 2
# The GPUs this process may use: CUDA_VISIBLE_DEVICES's entries where it is set, else the
# GPU lines of nvidia-smi -L (not its MIG lines).
if [ -z "${NGPUS:-}" ]; then
  if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
    NGPUS=$(printf '%s\n' "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true)
  else
    NGPUS=$(nvidia-smi -L | grep -c '^GPU ' || true)
  fi
fi
if ! [ "$NGPUS" -ge 1 ] 2>/dev/null; then
  echo "NGPUS=$NGPUS: expected the number of GPUs to use (>= 1)" >&2
  exit 2
fi
GLOBAL_BATCH=${GLOBAL_BATCH:-16}
if [ $((GLOBAL_BATCH % NGPUS)) -ne 0 ]; then
  echo "GLOBAL_BATCH=$GLOBAL_BATCH is not divisible by NGPUS=$NGPUS" >&2
  exit 2
fi

exec torchrun --standalone --nproc_per_node="$NGPUS" -m blurfast train \
  --config "$(dirname "$0")/lsun64_paper.yaml" --data "$DATA" --out "$OUT" --resume auto \
  --batch-size $((GLOBAL_BATCH / NGPUS)) --device cuda --no-cuda-graphs "$@"
