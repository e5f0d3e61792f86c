"""Loads the compiled kernel library and says which backend serves a device."""
from __future__ import annotations

import re
from typing import Optional

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
    """CMake architecture entries as people read them: '80-real' -> sm_80, '90-virtual' ->
    PTX compute_90, '90' -> sm_90 + PTX."""
    out = []
    for a in CUDA_ARCHS if archs is None else archs:
        num = a.split("-")[0]
        out.append(f"sm_{num}" if a.endswith("-real") else f"PTX compute_{num}"
                   if a.endswith("-virtual") else f"sm_{num} + PTX compute_{num}")
    return ", ".join(out)


_ARCH = re.compile(r"^(\d+)([af]?)(-real|-virtual)?$")


def archs_run_on(capability, archs=None) -> Optional[bool]:
    """Whether code built for CMake architecture entries ``archs`` runs on a GPU of compute
    capability (major, minor); None when an entry cannot be read ("native", "all").

    Real code sm_XY runs on major X with minor >= Y; PTX compute_XY on any later GPU,
    compiled there by the driver. The arch-specific sm_XYa and compute_XYa run on X.Y only,
    the family-specific sm_XYf and compute_XYf on major X with minor >= Y only.
    """
    major, minor = capability
    cc = 10 * major + minor
    for a in CUDA_ARCHS if archs is None else archs:
        m = _ARCH.match(a)
        if m is None:
            return None
        num, suffix, kind = int(m.group(1)), m.group(2), m.group(3)
        if suffix == "a":
            if cc == num:
                return True
            continue
        if suffix == "f":
            if num // 10 == major and num % 10 <= minor:
                return True
            continue
        if kind != "-virtual" and num // 10 == major and num % 10 <= minor:
            return True
        if kind != "-real" and cc >= num:
            return True
    return False


_DEVICES_CHECKED: set = set()


def check_cuda_device(index: int) -> None:
    """RuntimeError, once per device, when this build has no code that runs on GPU ``index``
    (the kernels would fail with the driver's "no kernel image is available")."""
    if index in _DEVICES_CHECKED:
        return
    cap = torch.cuda.get_device_capability(index)
    if archs_run_on(cap) is False:
        raise RuntimeError(
            f"blurfast's CUDA kernels were built for {describe_archs()}, which cannot run on "
            f"cuda:{index} ({torch.cuda.get_device_name(index)}, compute capability "
            f"{cap[0]}.{cap[1]}). Rebuild with BLURFAST_CUDA_ARCHS including "
            f"\"{cap[0]}{cap[1]}\", e.g. BLURFAST_CUDA_ARCHS=\"{cap[0]}{cap[1]}\" pip install .")
    _DEVICES_CHECKED.add(index)


def backend_for(device) -> str:
    """Name of the implementation that serves tensors on ``device``."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return "C++ CPU kernels"
    if dev.type == "cuda":
        return "CUDA kernels" if HAS_CUDA_KERNELS else "none (built without CUDA kernels)"
    return f"none ({dev.type} is not supported)"
