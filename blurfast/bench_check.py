"""The benchmarks' one-time output check: before a row is timed, one call of the
implementation on the row's inputs is compared with a float64 truth, so no row times a
wrong computation (a speed of a wrong result means nothing).

The truth is :mod:`blurfast.reference` in float64 (DCT matrices built in float64;
tests/test_peers.py checks it against ``scipy.fft.dctn(norm="ortho")``), with the noise
taken from what the implementation drew, so every implementation is checked the same way
whatever its random generator:

* ``dct2`` / ``idct2``: against the reference transform of the same input.
* ``q_sample``: ``eps`` as returned is the pixel-space noise; ``x_t`` must equal
  ``idct2(a * dct2(x0) + g * dct2(eps))``, and ``eps`` must look like standard normals
  (an orthonormal transform of i.i.d. N(0, 1) is i.i.d. N(0, 1)).
* ``sampler_step``: one extra call with ``sig = 0`` must equal
  ``idct2(c1 * dct2(x_t) + c2 * dct2(eps))``; in the call with the row's ``sig`` the
  residual ``(dct2(out) - c1 * dct2(x_t) - c2 * dct2(eps)) / sig`` (where ``sig`` is not
  small) must look like standard normals: it is the frequency-space noise ``zb``.

Error measure: ``max |out - truth| / max |truth|``. Bounds (:data:`CHECK_TOL`), set by
the precision of the arithmetic; a dropped or wrong term moves the output by about 1e-1:

* ``float32``: 1e-5. float32 rounding: the float32 peers and kernels reach at most
  5e-7 (8.4 units of 2**-24) at 256 x 256 on the CPU (tests/test_peers.py) and
  tests/test_cuda.py holds the CUDA kernels to 2e-6; the rounding of a K-term dot
  product grows like sqrt(K), so 1e-5 leaves room for larger planes.
* ``bfloat16`` I/O: 2e-2, about 5 units of bfloat16 rounding (2**-8): the output's own
  rounding and, for q_sample, the truth built from ``eps`` as returned (rounded); at most
  4.8e-3 measured on the CPU (tests/test_cuda.py bounds bfloat16 at 1e-2).
* ``tf32`` (``torch_tf32``: TF32 matmuls): 2e-2, about 40 units of TF32 rounding
  (2**-11) over up to four chained matmuls (tests/test_peers.py bounds one TF32 dct2 at
  1e-2).

Noise statistics: sample mean within 6 standard errors of 0 and sample standard deviation
within 6 standard errors of 1 (a false alarm about once in 10**9 checks).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import reference as R

__all__ = ["CHECK_TOL", "WrongOutput", "check_output", "rel_err"]

CHECK_TOL = {"float32": 1e-5, "bfloat16": 2e-2, "tf32": 2e-2}
_F64 = torch.float64


class WrongOutput(AssertionError):
    """An implementation's output disagrees with the float64 truth (the row is not timed)."""


def _as_torch(x) -> torch.Tensor:
    """A torch tensor of an output (cupy arrays through DLPack)."""
    return x if isinstance(x, torch.Tensor) else torch.from_dlpack(x)


def _outputs(out) -> list:
    return [_as_torch(o) for o in (out if isinstance(out, (tuple, list)) else (out,))]


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """``max |got - want| / max |want|``, in float64 on ``want``'s device."""
    got = got.to(device=want.device, dtype=_F64)
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-300))


def _normal_stats(z: torch.Tensor, what: str) -> Optional[str]:
    """None when ``z`` (float64) looks like i.i.d. N(0, 1) samples, else why not."""
    n = z.numel()
    if n < 64:                                  # too few samples to say anything
        return None
    mean, std = float(z.mean()), float(z.std())
    if not (math.isfinite(mean) and math.isfinite(std)):
        return f"{what}: not finite (mean {mean}, std {std})"
    if abs(mean) > 6 / math.sqrt(n) or abs(std - 1) > 6 / math.sqrt(2 * n):
        return (f"{what}: mean {mean:.4g}, std {std:.4g} over {n} samples (standard "
                f"normals expected: |mean| <= {6 / math.sqrt(n):.2g}, "
                f"|std - 1| <= {6 / math.sqrt(2 * n):.2g})")
    return None


def _close(got, want, tol, what, dtype) -> Optional[str]:
    if tuple(got.shape) != tuple(want.shape) or got.dtype != dtype:
        return (f"{what}: {got.dtype} {tuple(got.shape)}, expected {dtype} "
                f"{tuple(want.shape)}")
    err = rel_err(got, want)
    if not err <= tol:                          # NaN fails too
        return f"{what}: max |out - truth| / max |truth| = {err:.3g} > {tol:g}"
    return None


def check_output(case: str, fn, args: tuple, tol: float, convert=lambda a: a) -> Optional[str]:
    """Call ``fn(*convert(args))`` once (twice for sampler_step) and compare with the float64
    truth of ``case`` on the torch inputs ``args``. Returns None when it agrees within
    ``tol`` (module doc), else a one-line description of the disagreement."""
    f = [a.to(_F64) for a in args]
    dt = args[0].dtype                          # the I/O type of the row
    if case in ("dct2", "idct2"):
        want = (R.dct2 if case == "dct2" else R.idct2)(f[0])
        return _close(_outputs(fn(*convert(args)))[0], want, tol, case, dt)
    if case == "q_sample":
        x0, a, g = f
        out = _outputs(fn(*convert(args)))
        if len(out) != 2:
            return f"q_sample: {len(out)} outputs, expected (x_t, eps)"
        xt, eps = out
        want = R.idct2(a * R.dct2(x0) + g * R.dct2(eps.to(_F64)))
        if eps.dtype != dt or tuple(eps.shape) != tuple(x0.shape):
            return f"eps: {eps.dtype} {tuple(eps.shape)}, expected {dt} {tuple(x0.shape)}"
        return (_close(xt, want, tol, "x_t = idct2(a dct2(x0) + g dct2(eps))", dt)
                or _normal_stats(eps.to(_F64), "eps"))
    if case == "sampler_step":
        x, e, c1, c2, sig = f
        det = c1 * R.dct2(x) + c2 * R.dct2(e)
        no_noise = args[:4] + (torch.zeros_like(args[4]),)
        why = _close(_outputs(fn(*convert(no_noise)))[0], R.idct2(det), tol,
                     "with sig = 0: out = idct2(c1 dct2(x_t) + c2 dct2(eps))", dt)
        if why:
            return why
        out = _outputs(fn(*convert(args)))[0].to(_F64)
        sel = (sig >= sig.max() / 4).expand(out.shape)
        if not bool(sel.any()) or float(sig.max()) <= 0:
            return None
        zb = ((R.dct2(out) - det) / sig.clamp_min(1e-300))[sel]
        return _normal_stats(zb, "(dct2(out) - c1 dct2(x_t) - c2 dct2(eps)) / sig")
    raise ValueError(f"case: unknown {case!r}")
