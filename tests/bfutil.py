"""Helpers shared by the tests (imported by name; not a conftest, so no clash with benchmarks/)."""
import functools
import math
import socket

import numpy as np
import scipy.fft
import torch

import blurfast.reference as ref


def _long_double(t) -> np.ndarray:
    if isinstance(t, torch.Tensor):
        t = t.detach().cpu().double().numpy()
    return np.asarray(t, dtype=np.longdouble)


def rel_err(a, b) -> float:
    """max |a - b| / max |b|: in float64, or in long double where either is a long double
    array (the truth of the float64 tests, see :func:`truth_dct2`)."""
    if any(isinstance(t, np.ndarray) and t.dtype == np.longdouble for t in (a, b)):
        a, b = _long_double(a), _long_double(b)
        return float(np.abs(a - b).max() / max(np.abs(b).max(), np.longdouble(1e-300)))
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# ------------------------------------------------------------------ the twice-torch rule
#
# The project's accuracy rule for kernels (flash-attention's): against a truth more precise
# than the dtype under test, the kernel's error is at most twice the error of a PyTorch
# implementation in the same precision, measured the same way (rel_err: max |error| over
# max |truth|). The floor, one rounding of the dtype (its unit roundoff), keeps the bound
# from being 0 where torch happens to be exact (a 1 x 1 plane).

def unit_roundoff(dtype: torch.dtype) -> float:
    """Half an ulp of 1: 2**-24 float32, 2**-53 float64, 2**-11 float16, 2**-8 bfloat16."""
    return torch.finfo(dtype).eps / 2


def assert_within_twice_torch(got, want, torch_same_dtype, what: str = "") -> float:
    """``rel_err(got, want) <= 2 * max(rel_err(torch_same_dtype, want), unit roundoff)``.

    ``want`` is the truth: float64 for float32 and half types, long double
    (:func:`truth_dct2`, :func:`truth_spectral`) for float64. Returns the error.
    """
    err = rel_err(got, want)
    peer = rel_err(torch_same_dtype, want)
    floor = unit_roundoff(got.dtype)
    assert err <= 2 * max(peer, floor), (
        f"{what}: error {err:.3g} > twice max(torch's {peer:.3g}, {got.dtype} rounding "
        f"{floor:.3g})")
    return err


@functools.lru_cache(maxsize=32)
def torch_dct2(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """PyTorch's matrix DCT (idct2 with ``inverse``) in the precision blurfast uses for x's
    dtype (float32 for float32 and half types: one rounding to the half type at the end),
    with matrices from exactly reduced angles rounded once to that precision: the
    reference's. The same-precision peer of the twice-torch rule."""
    return ref.idct2(x) if inverse else ref.dct2(x)


def _fft_dct_1d(x: torch.Tensor, inverse: bool) -> torch.Tensor:
    # Makhoul's DCT through one complex FFT of length n (even) on the last dim.
    n = x.shape[-1]
    assert n % 2 == 0, n
    k = torch.arange(n, dtype=torch.float64)
    s = torch.full((n,), math.sqrt(2.0 / n), dtype=torch.float64)
    s[0] = math.sqrt(1.0 / n)
    cplx = torch.complex64 if x.dtype == torch.float32 else torch.complex128
    if not inverse:
        v = torch.cat([x[..., ::2], x[..., 1::2].flip(-1)], -1)
        return (torch.fft.fft(v) * torch.polar(s, -math.pi * k / (2 * n)).to(cplx)).real
    v = (torch.fft.ifft(x.to(cplx) * torch.polar(s, math.pi * k / (2 * n)).to(cplx)) * n).real
    out = torch.empty_like(x)
    out[..., ::2], out[..., 1::2] = v[..., : n // 2], v[..., n // 2:].flip(-1)
    return out


def torch_fft_dct2(x: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """The same transform as :func:`torch_dct2` (float32 or float64, even sides) through
    torch.fft: the peer of the kernels' fast (butterfly) passes where the matrix product is
    not a fair one, on basis vectors (a one-hot plane makes each of its outputs a single
    product, one rounding; a butterfly algorithm's output passes log2 n of them)."""
    y = _fft_dct_1d(x, inverse).transpose(-1, -2)
    return _fft_dct_1d(y, inverse).transpose(-1, -2)


def torch_spectral(x, a, x2=None, a2=None, g=None, zb=None, return_noise=False):
    """``idct2(a dct2(x) + a2 dct2(x2) + g zb)`` in PyTorch in blurfast's precision for x's
    dtype (maps and the frequency-space noise ``zb`` rounded to it, as the kernels take
    them); with ``return_noise`` also ``idct2(zb)``. The peer of the fused op."""
    ct = ref._compute_dtype(x.dtype)   # the precision blurfast computes x's dtype in
    z = a.to(ct) * torch_dct2(x.to(ct))
    if x2 is not None:
        z = z + a2.to(ct) * torch_dct2(x2.to(ct))
    if g is not None:
        z = z + g.to(ct) * zb.to(ct)
    out = torch_dct2(z, inverse=True).to(x.dtype)
    if return_noise:
        return out, torch_dct2(zb.to(ct).expand(x.shape), inverse=True).to(x.dtype)
    return out


def truth_dct2(x, inverse: bool = False) -> np.ndarray:
    """The orthonormal DCT (inverse: DCT-III) of x's values in long double (scipy's pocketfft
    in 64-bit mantissa arithmetic): the truth of the float64 tests, whose float64 truths
    would be as inexact as the kernel."""
    f = scipy.fft.idctn if inverse else scipy.fft.dctn
    return f(_long_double(x), axes=(-2, -1), norm="ortho")


def truth_philox_normal(shape, seed: int, offset: int = 0) -> np.ndarray:
    """The noise stream's numbers (blurfast.reference's Philox words and Box-Muller) in long
    double: the truth against which reference.philox_normal's float64 Box-Muller (torch's
    log, cos, sin) is the same-precision peer of the kernels' float64 one."""
    n = math.prod(shape)
    e = torch.arange(n, dtype=torch.int64) + int(offset)
    b, lane = e >> 2, (e & 3).numpy()
    w = ref.philox4x32((b & 0xFFFFFFFF, b >> 32, 0, 0),
                       (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF))
    u = [(wi.numpy().astype(np.longdouble) + np.longdouble(0.5)) * np.longdouble(2.0 ** -32)
         for wi in w]
    two_pi = 2 * np.arccos(np.longdouble(-1))
    z = []
    for j in (0, 2):
        r = np.sqrt(-2 * np.log(u[j]))
        z += [r * np.cos(two_pi * u[j + 1]), r * np.sin(two_pi * u[j + 1])]
    return np.stack(z, -1)[np.arange(n), lane].reshape(shape)


def truth_spectral(x, a, x2=None, a2=None, g=None, zb=None, return_noise=False):
    """The fused op's formula in long double, on the values of its (any-precision) inputs."""
    z = _long_double(a) * truth_dct2(x)
    if x2 is not None:
        z = z + _long_double(a2) * truth_dct2(x2)
    if g is not None:
        z = z + _long_double(g) * _long_double(zb)
    out = truth_dct2(z, inverse=True)
    if return_noise:
        return out, truth_dct2(np.broadcast_to(_long_double(zb), out.shape), inverse=True)
    return out


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
