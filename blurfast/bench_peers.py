"""The comparison implementations ("peers") the kernels are benchmarked against: our own
code, written from the mathematics and tested against scipy (tests/test_peers.py).

* ``matmul_dct2`` / ``matmul_idct2``: ``C_H @ x @ C_W^T`` with cached orthonormal DCT
  matrices (the reference's), fp32; TF32 inside ``tf32_matmul(True)``, CUDA only.
* ``fft_dct2`` / ``fft_idct2``: per dim, reorder (evens, then odds reversed), complex FFT,
  twiddle ``exp(-i pi k / 2N)`` and orthonormal scaling (Makhoul's method, the way the
  torch-dct package computes it); the inverse undoes each step.
* ``ref_q_sample`` / ``ref_sampler_step``: dct2, combine with ``torch.randn``
  frequency-space noise, idct2 (the torch reference of the fused op), with either pair.
"""
from __future__ import annotations

import contextlib
import functools
import math

import torch

from . import reference as R

__all__ = ["matmul_dct2", "matmul_idct2", "tf32_matmul", "fft_dct2", "fft_idct2",
           "ref_q_sample", "ref_sampler_step"]

# ----------------------------------------------------------------------------
# Peer 1: matrix-product DCT (torch matmul)
# ----------------------------------------------------------------------------

def _dct_mat(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    """Orthonormal DCT-II matrix C (n, n), built in float64: X = C @ x (the reference's)."""
    return R.dct_matrix(n, dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _dct_mat_t(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    return _dct_mat(n, dtype, device).t().contiguous()


def matmul_dct2(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D DCT-II over the last two dims: ``C_H @ x @ C_W^T``."""
    dev = str(x.device)
    ch = _dct_mat(x.shape[-2], x.dtype, dev)
    cwt = _dct_mat_t(x.shape[-1], x.dtype, dev)
    return torch.matmul(torch.matmul(ch, x), cwt)


def matmul_idct2(X: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`matmul_dct2`: ``C_H^T @ X @ C_W``."""
    dev = str(X.device)
    cht = _dct_mat_t(X.shape[-2], X.dtype, dev)
    cw = _dct_mat(X.shape[-1], X.dtype, dev)
    return torch.matmul(torch.matmul(cht, X), cw)


@contextlib.contextmanager
def tf32_matmul(enabled: bool):
    """Allow (or forbid) TF32 in cuBLAS fp32 matmuls inside the block; restores after.

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` and refuses
    mixed use of it and the legacy ``allow_tf32`` flag, so the new API is used
    where it exists.
    """
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):
        prev = m.fp32_precision
        m.fp32_precision = "tf32" if enabled else "ieee"
        try:
            yield
        finally:
            m.fp32_precision = prev
    else:
        prev = m.allow_tf32
        m.allow_tf32 = bool(enabled)
        try:
            yield
        finally:
            m.allow_tf32 = prev


# ----------------------------------------------------------------------------
# Peer 2: FFT DCT (reorder + FFT + twiddle per dim, Makhoul 1980)
# ----------------------------------------------------------------------------
#
# Unnormalized DCT-II: Y[k] = sum_n x[n] cos(pi (2n+1) k / (2N)). Reorder
# v = (x[0], x[2], x[4], ..., x[5], x[3], x[1]) (evens, then odds reversed);
# then Y[k] = Re(exp(-i pi k / (2N)) * FFT(v)[k]). Orthonormal: X[k] = s_k Y[k].
# Inverse: with Y = X / s_k and V = FFT(v) Hermitian, exp(-i pi k/(2N)) V[k] =
# Y[k] - i Y[N-k] (Y[N] := 0), so V[k] = exp(i pi k/(2N)) (Y[k] - i Y[N-k]),
# v = irfft(V), and x is v un-reordered.

@functools.lru_cache(maxsize=64)
def _fft_consts(n: int, dtype: torch.dtype, device: str):
    """(twiddle exp(-i pi k/2N) as complex, scale s_k) for real ``dtype``."""
    k = torch.arange(n, dtype=torch.float64)
    ang = -math.pi * k / (2.0 * n)
    tw = torch.complex(torch.cos(ang), torch.sin(ang))
    s = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64)
    s[0] = math.sqrt(1.0 / n)
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    return tw.to(device=device, dtype=cdt), s.to(device=device, dtype=dtype)


def _fft_dct_last(x: torch.Tensor) -> torch.Tensor:
    n = x.shape[-1]
    tw, s = _fft_consts(n, x.dtype, str(x.device))
    v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], dim=-1)
    V = torch.fft.fft(v, dim=-1)
    return torch.real(V * tw) * s


def _fft_idct_last(X: torch.Tensor) -> torch.Tensor:
    n = X.shape[-1]
    tw, s = _fft_consts(n, X.dtype, str(X.device))
    Y = X / s
    Yrev = torch.cat([torch.zeros_like(Y[..., :1]), Y[..., 1:].flip(-1)], dim=-1)
    V = torch.complex(Y, -Yrev) * tw.conj()
    v = torch.fft.irfft(V[..., : n // 2 + 1], n=n, dim=-1)
    x = torch.empty_like(v)
    ne = n - n // 2                      # number of even-indexed samples
    x[..., ::2] = v[..., :ne]
    x[..., 1::2] = v[..., ne:].flip(-1)
    return x


def fft_dct2(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D DCT-II via FFTs: last dim, then the second-to-last."""
    y = _fft_dct_last(x)
    return _fft_dct_last(y.transpose(-1, -2)).transpose(-1, -2)


def fft_idct2(X: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`fft_dct2`."""
    y = _fft_idct_last(X)
    return _fft_idct_last(y.transpose(-1, -2)).transpose(-1, -2)


# ----------------------------------------------------------------------------
# Peer 3: the torch reference composition of the fused op
# ----------------------------------------------------------------------------

def ref_q_sample(x0, a, g, *, dct2=matmul_dct2, idct2=matmul_idct2, noise=None):
    """``(idct2(a*dct2(x0) + g*zb), idct2(zb))``; zb = ``noise`` or ``torch.randn``."""
    zb = torch.randn_like(x0) if noise is None else noise
    return idct2(a * dct2(x0) + g * zb), idct2(zb)


def ref_sampler_step(x_t, eps, c1, c2, sig, *, dct2=matmul_dct2, idct2=matmul_idct2,
                     noise=None):
    """``idct2(c1*dct2(x_t) + c2*dct2(eps) + sig*zb)``; zb = ``noise`` or ``torch.randn``."""
    zb = torch.randn_like(x_t) if noise is None else noise
    return idct2(c1 * dct2(x_t) + c2 * dct2(eps) + sig * zb)
