"""Helpers shared by the tests (imported by name; not a conftest, so no clash with benchmarks/)."""
import socket

import numpy as np
import scipy.fft
import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def dct2(x: np.ndarray) -> np.ndarray:
    """scipy's orthonormal 2-D DCT-II over the last two axes: the float64 truth."""
    return scipy.fft.dctn(x, axes=(-2, -1), norm="ortho")


def idct2(x: np.ndarray) -> np.ndarray:
    """Inverse of :func:`dct2` (scipy)."""
    return scipy.fft.idctn(x, axes=(-2, -1), norm="ortho")


def free_port() -> int:
    """A TCP port free on this machine now (for a torch.distributed rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
