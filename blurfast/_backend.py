"""Loads the compiled kernel library and says which backend serves a device."""
from __future__ import annotations

import torch

try:
    from . import _C
except ImportError as e:  # pragma: no cover - exercised only on a broken install
    raise ImportError(
        "blurfast._C (the compiled kernels) could not be imported. Install the package with "
        "`pip install .` (or `pip install -e .` for development), and do not run Python from "
        f"a directory that shadows the installed package. Cause: {e}"
    ) from e

HAS_CUDA_KERNELS: bool = bool(_C.has_cuda)
CUDA_ARCHS: list[str] = [a for a in str(_C.cuda_archs).split(",") if a]

# Element-type codes of csrc/blurfast.h (enum DType).
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}


def describe_archs(archs=None) -> str:
    """CMake architecture entries as people read them: '80-real' -> sm_80, '90' -> sm_90 + PTX."""
    out = []
    for a in CUDA_ARCHS if archs is None else archs:
        num = a.split("-")[0]
        out.append(f"sm_{num}" if a.endswith("-real") else f"sm_{num} + PTX compute_{num}")
    return ", ".join(out)


def backend_for(device) -> str:
    """Name of the implementation that serves tensors on ``device``."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return "C++ CPU kernels"
    if dev.type == "cuda":
        return "CUDA kernels" if HAS_CUDA_KERNELS else "none (built without CUDA kernels)"
    return f"none ({dev.type} is not supported)"
