#!/usr/bin/env bash
# Decode LSUN lmdb databases once into memory-mapped uint8 arrays for training.
#
#   scripts/prepare_lsun.sh LSUN_DIR OUT_DIR [CATEGORY ...]
#
# LSUN_DIR holds the databases as distributed (<category>_train_lmdb, e.g. from
# https://github.com/fyu/lsun: `python download.py -c church_outdoor`, then unzip).
# CATEGORY defaults to church_outdoor and bedroom. Writes OUT_DIR/<category>_64.npy
# at 64x64 with the paper's preprocessing (resize without cropping: --resize squash).
# RESOLUTION and RESIZE may be set in the environment (e.g. RESIZE=center-crop). An
# array already in OUT_DIR is kept; OVERWRITE=1 decodes it again.
set -euo pipefail

if [ $# -lt 2 ]; then
  sed -n '2,11p' "$0"
  exit 2
fi
LSUN_DIR=$1
OUT_DIR=$2
shift 2
CATEGORIES=("$@")
[ ${#CATEGORIES[@]} -gt 0 ] || CATEGORIES=(church_outdoor bedroom)
RESOLUTION=${RESOLUTION:-64}
RESIZE=${RESIZE:-squash}

mkdir -p "$OUT_DIR"
for c in "${CATEGORIES[@]}"; do
  src="$LSUN_DIR/${c}_train_lmdb"
  if [ ! -f "$src/data.mdb" ]; then
    echo "prepare_lsun.sh: $src/data.mdb not found (download and unzip ${c}_train_lmdb.zip)" >&2
    exit 1
  fi
  out="$OUT_DIR/${c}_${RESOLUTION}.npy"
  extra=()
  if [ -e "$out" ]; then
    if [ "${OVERWRITE:-0}" != 1 ]; then
      echo "prepare_lsun.sh: $out exists, kept (OVERWRITE=1 to decode it again)"
      continue
    fi
    extra=(--overwrite)
  fi
  blurfast prepare "$src" "$out" --resolution "$RESOLUTION" --resize "$RESIZE" ${extra[@]+"${extra[@]}"}
done
