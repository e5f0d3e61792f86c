#!/usr/bin/env bash
# FID-10K of a trained run, the paper's protocol: 10,000 samples from the EMA weights with
# the paper's reverse diffusion sampler over the full chain (N-1 model calls), and with DDIM
# at 100 steps; each scored with clean-fid's InceptionV3 (loaded first) against REF.
#
#   scripts/eval_fid10k.sh RUN_DIR REF
#
# REF: the training data (prepared .npy, LSUN lmdb or image folder; folders and lmdb are
# resized and read in the channels the run's config says) or a STATS.npz. Environment:
# NPROC (GPUs, through torchrun; default 1), BATCH (default 256), SEED (default 0),
# N (default 10000), INCEPTION (path of inception-2015-12-05.pt; default clean-fid's /tmp
# copy), OUT (default RUN_DIR/fid10k), SAMPLE_ARGS (more `blurfast sample` flags, for
# example "--cuda-graph --compile"), KID=1 (the KID too; REF then images, or a STATS.npz
# saved with --kid). Results: OUT/fid10k.txt, one line per sampler.
set -euo pipefail

if [ $# -ne 2 ]; then
  sed -n '2,14p' "$0"
  exit 2
fi
RUN=$1
REF=$2
N=${N:-10000}
NPROC=${NPROC:-1}
BATCH=${BATCH:-256}
SEED=${SEED:-0}
OUT=${OUT:-$RUN/fid10k}
mkdir -p "$OUT"

# The run's own preprocessing of the reference (config.json holds every train() argument).
run_config() {
  python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$RUN/config.json" "$1"
}
RESOLUTION=$(run_config resolution)
RESIZE=$(run_config resize)
CHANNELS=$(run_config channels)
if [ "$NPROC" -gt 1 ]; then
  SAMPLE=(torchrun --standalone --nproc_per_node="$NPROC" -m blurfast sample)
else
  SAMPLE=(blurfast sample)
fi
FID_ARGS=(--ref "$REF" --n "$N" --resolution "$RESOLUTION" --resize "$RESIZE"
          --channels "$CHANNELS")
if [ -n "${INCEPTION:-}" ]; then FID_ARGS+=(--inception "$INCEPTION"); fi
if [ -n "${KID:-}" ] && [ "$KID" != 0 ]; then FID_ARGS+=(--kid); fi   # KID=0: off
# InceptionV3's weights and REF, checked before the samples are made.
blurfast fid --check "${FID_ARGS[@]}"
: > "$OUT/fid10k.txt"          # this run's lines only (a rerun does not add to an earlier one's)

for spec in "reverse_sde 0" "ddim 100"; do
  read -r sampler steps <<< "$spec"
  dir="$OUT/${sampler}_${steps}"
  "${SAMPLE[@]}" --ckpt "$RUN" --num-samples "$N" --sampler "$sampler" --steps "$steps" \
    --batch "$BATCH" --seed "$SEED" --format npz --out "$dir" ${SAMPLE_ARGS:-}
  # the score lines (FID, and KID with KID=1) as one
  value=$(blurfast fid --samples "$dir/samples.npz" "${FID_ARGS[@]}" \
    | grep -E '^(FID|KID) ' | paste -sd ';' - | sed 's/;/; /g')
  echo "$sampler steps=${steps/#0/full} $value" | tee -a "$OUT/fid10k.txt"
done
