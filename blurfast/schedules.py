"""Blur eigenvalues and the noise and blur schedules of the process (float64).

docs/process.md sections 2 and 3 are the specification.
"""
from __future__ import annotations

import math

import torch

from .checks import check_bool, check_int, check_number, check_size

__all__ = ["gaussian_eigenvalues", "blur_eigenvalues_2d"]


def gaussian_eigenvalues(n: int, sigma: float, kind: str = "discrete",
                         truncate: float = 4.0) -> torch.Tensor:
    """Eigenvalues (n,) float64 of a 1-D Gaussian blur in the DCT-II basis.

    ``kind="discrete"``: the normalized sampled kernel of radius
    ``int(truncate*sigma + 0.5)`` with half-sample symmetric ("reflect")
    boundaries, exactly what ``scipy.ndimage.gaussian_filter(mode="reflect")``
    applies. ``kind="continuous"``: the heat equation, ``exp(-sigma^2 (pi k/n)^2 / 2)``.
    ``truncate`` (> 0, in sigmas) is used by ``discrete`` only.
    """
    n = check_int("n", n)
    sigma = check_number("sigma", sigma, 0)
    truncate = check_number("truncate", truncate, 0, lo_open=True)
    if kind not in KERNELS:
        raise ValueError(f"kind: expected one of {KERNELS}, got {kind!r}")
    k = torch.arange(n, dtype=torch.float64)
    if kind == "continuous":
        return torch.exp(-0.5 * (sigma * math.pi * k / n) ** 2)
    if sigma == 0:
        return torch.ones(n, dtype=torch.float64)
    r = int(truncate * sigma + 0.5)
    m = torch.arange(r + 1, dtype=torch.float64)
    h = torch.exp(-0.5 * (m / sigma) ** 2)
    h = h / (h[0] + 2 * h[1:].sum())
    # Reflect extension is 2n-periodic and even, so every tap m contributes cos(pi k m / n).
    lam = h[0] + 2 * (h[1:, None] * torch.cos(math.pi * m[1:, None] * k[None, :] / n)).sum(0)
    return lam


def blur_eigenvalues_2d(size, sigma, kind: str = "discrete") -> torch.Tensor:
    """(H, W) float64 map ``lam_H[k] * lam_W[l]``; ``size`` an int or (H, W), ``sigma`` a
    number or (sigma_h, sigma_w)."""
    h, w = check_size("size", size)
    sh, sw = sigma if isinstance(sigma, (tuple, list)) and len(sigma) == 2 else (sigma, sigma)
    return gaussian_eigenvalues(h, sh, kind)[:, None] * gaussian_eigenvalues(w, sw, kind)[None, :]


# --------------------------------------------------------------------------
# Schedules of the process (docs/process.md section 3). Arrays are indexed by step i = 0..N;
# index 0 is the clean image (beta_0 = 0, f(0) = 0).

NOISE_SCHEDULES = ("linear", "cosine", "exp")
BLUR_SCHEDULES = ("linear", "log", "quadratic", "cubic", "quartic", "triangular")
KERNELS = ("discrete", "continuous")
MAX_BETA = 0.999
# Floor of the 2-D eigenvalue map d, so that d ** (2 F) and log d stay finite.
EIG_FLOOR = 1e-3

__all__ += ["NOISE_SCHEDULES", "BLUR_SCHEDULES", "KERNELS", "MAX_BETA", "EIG_FLOOR",
            "noise_betas", "log_alpha_bar", "blur_f", "process_eigenvalues"]


def _check_steps(num_steps) -> int:
    return check_int("num_steps", num_steps, 2)


def noise_betas(name: str, num_steps: int, beta_min: float = 1e-4,
                beta_max: float = 0.02) -> torch.Tensor:
    """``beta_i`` for i = 0..N as an (N+1,) float64 tensor with ``beta_0 = 0``.

    ``linear``: linspace(beta_min, beta_max, N). ``cosine``: Nichol & Dhariwal,
    ``1 - c(i/N)/c((i-1)/N)`` with ``c(t) = cos^2((t + 0.008)/1.008 * pi/2)``.
    ``exp``: ``1 - e(i)/e(i-1)`` with ``e(i) = 1 - g(i)/g(N)``,
    ``g(i) = exp(5 i/N - 5) + 1e-4``. cosine and exp are capped at 0.999. Only
    ``linear`` uses beta_min and beta_max; every schedule checks them all the same (a
    process's config keeps them).
    """
    num_steps = _check_steps(num_steps)
    beta_min = check_number("beta_min", beta_min, 0, hi=1, hi_open=True)
    beta_max = check_number("beta_max", beta_max, 0, hi=1, hi_open=True)
    if beta_min > beta_max:
        raise ValueError(f"beta_min: expected <= beta_max ({beta_max}), got {beta_min}")
    n = num_steps
    i = torch.arange(1, n + 1, dtype=torch.float64)
    if name == "linear":
        b = torch.linspace(beta_min, beta_max, n, dtype=torch.float64)
    elif name == "cosine":
        def c(t):
            return torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        b = (1 - c(i / n) / c((i - 1) / n)).clamp(max=MAX_BETA)
    elif name == "exp":
        # 1 - e(i)/e(i-1) = (g(i) - g(i-1)) / (g(N) - g(i-1)); with a = 5 (i-1)/N - 5 that is
        # exp(a) expm1(5/N) / -expm1(a), free of the cancellation of the plain form (and a
        # written so as not to cancel either).
        a = -5 * (n - i + 1) / n
        b = (torch.exp(a) * math.expm1(5 / n) / -torch.expm1(a)).clamp(max=MAX_BETA)
    else:
        raise ValueError(f"noise_schedule: expected one of {NOISE_SCHEDULES}, got {name!r}")
    return torch.cat([torch.zeros(1, dtype=torch.float64), b])


def log_alpha_bar(betas: torch.Tensor) -> torch.Tensor:
    """``log alpha_bar_i = sum_{j<=i} log(1 - beta_j)`` (same indexing as ``betas``)."""
    if not isinstance(betas, torch.Tensor) or betas.dim() != 1 \
            or not betas.dtype.is_floating_point:
        raise ValueError(f"betas: expected a 1-D floating-point tensor, got "
                         f"{getattr(betas, 'dtype', type(betas).__name__)} "
                         f"{tuple(getattr(betas, 'shape', ()))}")
    if not bool(((betas >= 0) & (betas < 1)).all()):
        raise ValueError("betas: expected values in [0, 1)")
    return torch.cumsum(torch.log1p(-betas), 0)


def blur_f(name: str, num_steps: int, f_1: float, f_N: float) -> torch.Tensor:
    """Blur exponents ``f(i)`` for i = 0..N as an (N+1,) float64 tensor, ``f(0) = 0``.

    ``f_1 = (sigma_min/sigma)^2``, ``f_N = (sigma_max/sigma)^2``; the f-types of
    docs/process.md section 3 (the paper's code conventions).
    """
    num_steps = _check_steps(num_steps)
    f_1 = check_number("f_1", f_1, 0)
    f_N = check_number("f_N", f_N, 0)
    n = num_steps
    i = torch.arange(1, n + 1, dtype=torch.float64)

    def f_linear(j):
        return (f_N - f_1) * (j - 1) / (n - 1) + f_1

    if name == "linear":
        f = f_linear(i)
    elif name == "log":
        def L(x):
            return torch.log(x + 1e-6) / (10 * math.log(n))
        f = (f_N - f_1) * L(i) / L(torch.tensor(float(n), dtype=torch.float64)) + f_1
    elif name == "quadratic":
        a = (f_N - f_1) / (n ** 2 - 1)
        f = a * i ** 2 + (f_1 - a)
    elif name == "cubic":
        f = (f_N - f_1) * i ** 3 / n ** 3 + f_1
    elif name == "quartic":
        f = (f_N - f_1) * i ** 4 / n ** 4 + f_1
    elif name == "triangular":
        f = torch.where(i < n / 2, f_linear(i), f_linear(n - i))
    else:
        raise ValueError(f"blur_schedule: expected one of {BLUR_SCHEDULES}, got {name!r}")
    return torch.cat([torch.zeros(1, dtype=torch.float64), f])


def process_eigenvalues(size, sigma: float, kind: str = "discrete",
                        coarse_to_fine: bool = True, floor: float = EIG_FLOOR) -> torch.Tensor:
    """The (H, W) float64 map ``d`` of the process, floored at ``floor``.

    ``d = blur_eigenvalues_2d(size, sigma, kind)``; ``coarse_to_fine=False`` (the
    fine-to-coarse ablation) uses ``1 - d``. Values are clamped to [floor, 1], floor in
    (0, 1].
    """
    if kind not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kind!r}")
    check_bool("coarse_to_fine", coarse_to_fine)
    floor = check_number("floor", floor, 0, lo_open=True, hi=1)
    d = blur_eigenvalues_2d(size, sigma, kind)
    if not coarse_to_fine:
        d = 1 - d
    return d.clamp(min=floor, max=1.0)
