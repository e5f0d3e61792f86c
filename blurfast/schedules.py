"""Blur eigenvalues and the noise and blur schedules of the process (float64).

DESIGN.md 2.1 and 2.2 are the specification.
"""
from __future__ import annotations

import math

import torch

__all__ = ["gaussian_eigenvalues", "blur_eigenvalues_2d"]


def gaussian_eigenvalues(n: int, sigma: float, kind: str = "discrete",
                         truncate: float = 4.0) -> torch.Tensor:
    """Eigenvalues (n,) float64 of a 1-D Gaussian blur in the DCT-II basis.

    ``kind="discrete"``: the normalized sampled kernel of radius
    ``int(truncate*sigma + 0.5)`` with half-sample symmetric ("reflect")
    boundaries, exactly what ``scipy.ndimage.gaussian_filter(mode="reflect")``
    applies. ``kind="continuous"``: the heat equation, ``exp(-sigma^2 (pi k/n)^2 / 2)``.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma: expected a finite number >= 0, got {sigma!r}")
    k = torch.arange(n, dtype=torch.float64)
    if kind == "continuous":
        return torch.exp(-0.5 * (sigma * math.pi * k / n) ** 2)
    if kind != "discrete":
        raise ValueError(f"kind: expected 'discrete' or 'continuous', got {kind!r}")
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
    """(H, W) float64 map ``lam_H[k] * lam_W[l]``; ``sigma`` a number or (sigma_h, sigma_w)."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    sh, sw = (sigma, sigma) if not isinstance(sigma, (tuple, list)) else tuple(sigma)
    return gaussian_eigenvalues(h, sh, kind)[:, None] * gaussian_eigenvalues(w, sw, kind)[None, :]
