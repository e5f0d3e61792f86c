#!/usr/bin/env bash
# Builds blurfast._C with its CUDA kernels here, for the GPU machine's Python, so that a
# GPU session spends none of its device time building (150 s of the v4 run's 335):
#
#   bash scripts/prebuild_gpu_ext.sh            # sm_90 (H100, H200), Python 3.12
#   ARCHS="90;100" PYTHON=python3.13 bash scripts/prebuild_gpu_ext.sh
#
# The extension links neither libtorch nor the CUDA runtime dynamically (cudart is
# static), so it needs only the interpreter's minor version and a glibc no newer than the
# GPU machine's. Then, on the GPU machine (the device tool: carry the .so it prints):
#
#   PYTHONPATH=$PWD GPU_CHECK_SKIP=build bash scripts/gpu_check.sh
#
# Environment: PYTHON (default python3.12 on PATH, else pyenv's 3.12), ARCHS (default 90), VENV (a venv with
# pybind11, cmake and ninja for that Python, made on the first run; default
# /tmp/blurfast-gpu-build-venv), CMAKE_BUILD_PARALLEL_LEVEL.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then     # python3.12 on PATH, else pyenv's (its shim may not run)
  for c in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
    if "$c" -c "" 2> /dev/null; then PY=$c; break; fi
  done
fi
ARCHS=${ARCHS:-90}
VENV=${VENV:-/tmp/blurfast-gpu-build-venv}
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}

[[ -n "$PY" ]] && "$PY" -c "" || { echo "PYTHON: no Python 3.12 found; name one" >&2; exit 2; }
[[ -x "$CUDA_HOME/bin/nvcc" ]] || { echo "CUDA_HOME: no bin/nvcc under $CUDA_HOME" >&2; exit 2; }
# Marked ready only once its packages are in: a venv whose pip install failed (no
# network) is completed on the next run, not used without pybind11.
if [[ ! -f "$VENV/.blurfast-ready" ]]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q setuptools pybind11 cmake ninja
  : > "$VENV/.blurfast-ready"
fi
cd "$ROOT"
# build_ext --inplace keeps each interpreter's CMake tree apart
# (build/temp.linux-x86_64-cpython-3XY) and writes blurfast/_C.cpython-3XY-*.so beside
# the development build's.
env PATH="$VENV/bin:$CUDA_HOME/bin:$PATH" BLURFAST_CUDA=1 BLURFAST_CUDA_ARCHS="$ARCHS" \
  CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
  "$VENV/bin/python" setup.py -q build_ext --inplace
# Loaded by path: the package itself would import torch, which this venv lacks.
"$VENV/bin/python" - <<'EOF'
import importlib.machinery, importlib.util, pathlib
so = pathlib.Path("blurfast") / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])
spec = importlib.util.spec_from_file_location("_C", so)
c = importlib.util.module_from_spec(spec)
spec.loader.exec_module(c)
assert c.has_cuda, f"{so}: built without CUDA kernels"
print(f"built {so} for CUDA archs {c.cuda_archs}")
print(f"carry: {so}")
EOF
