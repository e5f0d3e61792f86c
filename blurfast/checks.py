"""Argument checks used across the package (each error names the argument and says what
was expected), and what a device supports: torch.compile, bf16."""
from __future__ import annotations

import math
import numbers
from typing import Optional

__all__ = ["is_int", "check_bool", "check_int", "check_number", "check_size", "check_gpu_seen",
           "compile_problem", "default_precision", "PRECISIONS", "autocast_dtype"]


def is_int(v) -> bool:
    """Whether ``v`` is an integer scalar: a Python int or a numpy integer (np.int64 ...).
    A bool is not, Python's (an int subclass) or numpy's (no numbers.Integral)."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def check_bool(name: str, v) -> bool:
    """``v`` when it is a Python bool; else TypeError naming ``name`` (numpy's bool, an
    int, 0 or 1 are not)."""
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected a bool, got {v!r}")
    return v


def check_int(name: str, v, lo: int = 1, hi: Optional[int] = None, none_ok: bool = False):
    """``v`` as a Python int when it is an integer (:func:`is_int`: numpy's too, a bool
    not) with ``lo <= v`` and, given ``hi``, ``v <= hi`` (or None with ``none_ok``); else
    ValueError naming ``name``."""
    if v is None and none_ok:
        return v
    if not is_int(v) or v < lo or (hi is not None and v > hi):
        want = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{name}: expected an int {want}{' or None' if none_ok else ''}, "
                         f"got {v!r}")
    return int(v)


def check_gpu_seen(name: str) -> None:
    """ValueError naming ``name`` (a device argument given as 'cuda') unless torch sees a
    GPU."""
    import torch
    if not torch.cuda.is_available():
        raise ValueError(f"{name}: 'cuda' was asked for but torch sees no GPU")


def check_device(name: str, v):
    """``v`` (a str or torch.device) as a torch.device; ValueError naming ``name`` when it
    is no device torch knows, or 'cuda' where torch sees no GPU."""
    import torch
    try:
        dev = torch.device(v)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name}: expected a device such as 'cpu' or 'cuda', got {v!r}") \
            from None
    if dev.type == "cuda":
        check_gpu_seen(name)
    return dev


def check_number(name: str, v, lo=None, lo_open: bool = False, hi=None, hi_open: bool = False,
                 none_ok: bool = False):
    """``v`` when it is a finite real number (numpy's scalars too, returned as an int or a
    float; a bool is not) within the bounds given (open or closed at each end), or None
    with ``none_ok``; else ValueError naming it."""
    if v is None and none_ok:
        return v
    # numpy's bool is no numbers.Real; Python's bool is an int. An int is finite (isfinite
    # would raise OverflowError beyond float's range). Comparisons, not math.isfinite: a
    # symbolic float of torch.compile (dynamic=True) takes them, isfinite broke the graph.
    if isinstance(v, bool) or not isinstance(v, numbers.Real) \
            or not (isinstance(v, numbers.Integral) or -math.inf < v < math.inf) \
            or (lo is not None and (v <= lo if lo_open else v < lo)) \
            or (hi is not None and (v >= hi if hi_open else v > hi)):
        bounds = [f" {'>' if lo_open else '>='} {lo}" if lo is not None else "",
                  f" {'<' if hi_open else '<='} {hi}" if hi is not None else ""]
        raise ValueError(f"{name}: expected a finite number"
                         f"{' and'.join(b for b in bounds if b)}"
                         f"{' or None' if none_ok else ''}, got {v!r}")
    return int(v) if isinstance(v, numbers.Integral) else float(v)


def check_size(name: str, v) -> tuple:
    """``(H, W)`` (Python ints) from ``v``, an int >= 1 (a square) or a pair of them (numpy's
    integers too); else ValueError naming ``name``."""
    hw = tuple(v) if isinstance(v, (list, tuple)) else (v, v)
    if len(hw) != 2 or any(not is_int(s) or s < 1 for s in hw):
        raise ValueError(f"{name}: expected an int >= 1 or a pair (H, W) of them, got {v!r}")
    return tuple(int(s) for s in hw)


def compile_problem(device) -> Optional[str]:
    """Why ``torch.compile`` cannot run a model on ``device`` (a torch.device), or None.
    On CUDA, Inductor writes Triton kernels: it needs the triton package and a GPU of
    compute capability 7.0 or newer, and otherwise fails only at the first call."""
    if device.type != "cuda":
        return None
    import importlib.util

    import torch
    if importlib.util.find_spec("triton") is None:
        return "torch.compile on CUDA needs the triton package, which is not installed"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 7:
        return (f"torch.compile on CUDA needs a GPU of compute capability 7.0 or newer "
                f"(Triton's minimum); {torch.cuda.get_device_name(device)} is {major}.{minor}")
    return None


PRECISIONS = ("bf16", "fp16", "fp32")


def autocast_dtype(precision: str):
    """The autocast dtype of a precision (``PRECISIONS``): torch.bfloat16, torch.float16,
    or None for "fp32" (no autocast)."""
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]


def default_precision(device) -> str:
    """"bf16" on a CUDA device with bfloat16 tensor cores (compute capability 8.0 or
    newer), else "fp32": older GPUs would emulate bfloat16, slower than float32."""
    import torch
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return "bf16"
    return "fp32"
