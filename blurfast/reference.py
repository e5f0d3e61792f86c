"""Pure-PyTorch reference: the specification every kernel is tested against.

Everything here is written for clarity, works on any device and in float64, and
is itself tested against scipy. Conventions (see docs/process.md, "The mathematics"):

* ``dct2`` is the orthonormal 2-D DCT-II over the last two dims, ``idct2`` its
  inverse (DCT-III); both as products with cached DCT matrices.
* ``spectral(x, a, x2, a2, g, noise)`` is ``idct2(a*dct2(x) + a2*dct2(x2) + g*zb)``.
* In-kernel noise: element ``e = offset + flat_index`` of a tensor takes lane
  ``e % 4`` of the four normals made by Box-Muller from Philox4x32-10 with
  key ``(seed lo, seed hi)`` and counter ``(b lo, b hi, 0, 0)``, ``b = e // 4``.
  Here in float64; kernels computing in float32 evaluate the same Box-Muller in float
  (within 4 * 2**-23 of these values, relatively).
"""
from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "dct_matrix", "dct2", "idct2", "spectral", "philox4x32", "philox_normal",
]

_M32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


@functools.lru_cache(maxsize=64)
def _dct_matrix_cached(n: int, dtype: torch.dtype, device: str) -> torch.Tensor:
    # The angle pi (2i+1) k / (2n) is reduced modulo 2 pi in integers before the cosine
    # (as csrc/common.h does): a float64 angle up to pi n would carry an error of about
    # 1e-16 pi n, 4e-14 in the DCT at n = 256.
    # Made outside inference mode: a cached inference tensor could not be saved for the
    # backward of a later call.
    with torch.inference_mode(False):
        k = torch.arange(n, dtype=torch.int64).unsqueeze(1)
        i = torch.arange(n, dtype=torch.int64).unsqueeze(0)
        m = ((2 * i + 1) * k) % (4 * n)
        c = torch.cos(math.pi * m.to(torch.float64) / (2 * n)) * math.sqrt(2.0 / n)
        c[0] = math.sqrt(1.0 / n)
        return c.to(dtype=dtype, device=device)


def dct_matrix(n: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Orthonormal DCT-II matrix ``C`` (n, n): ``X = C @ x``, ``x = C.T @ X``."""
    return _dct_matrix_cached(int(n), dtype, str(torch.device(device)))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def dct2(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D DCT-II over the last two dims."""
    ct = _compute_dtype(x.dtype)
    ch = dct_matrix(x.shape[-2], ct, x.device)
    cw = dct_matrix(x.shape[-1], ct, x.device)
    return (ch @ x.to(ct) @ cw.T).to(x.dtype)


def idct2(X: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`dct2` (orthonormal 2-D DCT-III)."""
    ct = _compute_dtype(X.dtype)
    ch = dct_matrix(X.shape[-2], ct, X.device)
    cw = dct_matrix(X.shape[-1], ct, X.device)
    return (ch.T @ X.to(ct) @ cw).to(X.dtype)


def _mulhilo(a: torch.Tensor, m: int):
    """(hi, lo) 32-bit words of a * m for 32-bit a (int64 tensor), without overflow."""
    p_lo = a * (m & 0xFFFF)                    # < 2^48
    p_hi = a * (m >> 16)                       # < 2^48
    low = p_lo + ((p_hi & 0xFFFF) << 16)       # < 2^49
    return (low >> 32) + (p_hi >> 16), low & _M32


def philox4x32(counter, key, rounds: int = 10):
    """Philox4x32 on int64 tensors holding 32-bit words.

    ``counter`` is four tensors (or ints), ``key`` two; returns four tensors.
    """
    c = [torch.as_tensor(w, dtype=torch.int64) for w in counter]
    k0 = torch.as_tensor(key[0], dtype=torch.int64)
    k1 = torch.as_tensor(key[1], dtype=torch.int64)
    for r in range(rounds):
        hi0, lo0 = _mulhilo(c[0], _PHILOX_M[0])
        hi1, lo1 = _mulhilo(c[2], _PHILOX_M[1])
        c = [hi1 ^ c[1] ^ k0, lo1, hi0 ^ c[3] ^ k1, lo0]
        if r + 1 < rounds:
            k0 = (k0 + _PHILOX_W[0]) & _M32
            k1 = (k1 + _PHILOX_W[1]) & _M32
    return c


def philox_normal(shape, seed: int, offset: int = 0, dtype=torch.float32,
                  device="cpu") -> torch.Tensor:
    """Standard normals for elements ``offset .. offset + numel - 1`` (see module doc)."""
    shape = tuple(shape)
    n = math.prod(shape)
    offset = int(offset)
    # Element e = offset + i as block e // 4 and lane e % 4, in int64 for any offset below
    # 2**64: e itself could pass 2**63, offset // 4 plus (offset % 4 + i) // 4 does not.
    j = torch.arange(n, dtype=torch.int64, device=device) + (offset & 3)
    b, lane = (offset >> 2) + (j >> 2), j & 3
    w = philox4x32((b & _M32, b >> 32, 0, 0), (seed & _M32, (seed >> 32) & _M32))
    u = [(wi.to(torch.float64) + 0.5) * 2.0 ** -32 for wi in w]
    z = []
    for j in (0, 2):
        r = torch.sqrt(-2.0 * torch.log(u[j]))
        ang = 2.0 * math.pi * u[j + 1]
        z += [r * torch.cos(ang), r * torch.sin(ang)]
    out = torch.stack(z, dim=-1).gather(-1, lane.unsqueeze(-1)).squeeze(-1)
    return out.to(dtype).reshape(shape)


def spectral(x, a, x2=None, a2=None, g=None, noise=None, *, seed=None, offset=0,
             return_noise=False):
    """``idct2(a*dct2(x) + a2*dct2(x2) + g*zb)`` computed in float64.

    ``zb`` is ``noise`` (frequency-space, broadcast to the shape of ``x``) when given, else
    Philox normals from ``(seed, offset)``. With ``return_noise`` also returns ``idct2(zb)``
    (the shape of ``x``).
    """
    f64 = torch.float64
    z = a.to(f64) * dct2(x.to(f64))
    if x2 is not None:
        z = z + a2.to(f64) * dct2(x2.to(f64))
    zb = None
    if g is not None or return_noise:
        if noise is not None:
            zb = noise.to(f64).expand(x.shape)
        else:
            zb = philox_normal(x.shape, seed, offset, f64, x.device)
        if g is not None:
            z = z + g.to(f64) * zb
    out = idct2(z).to(x.dtype)
    if return_noise:
        return out, idct2(zb).to(x.dtype)
    return out
