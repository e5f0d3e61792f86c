"""An exact eps model for testing samplers, and the Fréchet distance (docs/process.md section 6).

Data: a mixture of Gaussians ``x0 ~ sum_k w_k N(mu_k, U diag(v_k) U^T)`` whose
covariances are diagonal in the DCT basis. Under the blur diffusion each
component stays Gaussian and diagonal in that basis:

    xb_t | k ~ N(sqrt(Abar_t) mub_k, s2_k),   s2_k = Abar_t v_k + 1 - Abar_t,
    E[eb | xb_t, k] = sqrt(1 - Abar_t) (xb_t - sqrt(Abar_t) mub_k) / s2_k,

so ``E[eps | x_t] = idct2(sum_k r_k E[eb | xb_t, k])`` with responsibilities
``r_k`` the softmax over k of ``log w_k + log N(xb_t; ...)``. All in float64.
"""
from __future__ import annotations

import math

import torch

from . import ops
from .checks import check_int, check_number
from .evaluation import gaussian_frechet_distance
from .diffusion import BlurDiffusion, scales

__all__ = ["GaussianMixtureOracle", "example_oracle", "frechet_distance",
           "gaussian_frechet_distance"]


class GaussianMixtureOracle:
    """``oracle(x_t, t)`` returns the exact ``E[eps | x_t]`` (pixel space, x_t's dtype).

    ``means``: (K, C, H, W) pixel-space mean images (finite, K >= 1); ``variances``:
    (K, C, H, W) per-frequency variances (finite, > 0) in the DCT basis; ``weights``: (K,)
    positive and finite, normalized here (default uniform).
    """

    def __init__(self, diff: BlurDiffusion, means, variances, weights=None):
        means = torch.as_tensor(means, dtype=torch.float64)
        variances = torch.as_tensor(variances, dtype=torch.float64)
        if means.dim() != 4 or tuple(means.shape[1:]) != diff.shape or not len(means):
            raise ValueError(f"means: expected shape (K, {diff.channels}, {diff.H}, {diff.W}), "
                             f"K >= 1, got {tuple(means.shape)}")
        if not bool(torch.isfinite(means).all()):
            raise ValueError("means: expected finite values")
        if variances.shape != means.shape:
            raise ValueError(f"variances: expected shape {tuple(means.shape)}, got "
                             f"{tuple(variances.shape)}")
        if not bool((variances > 0).all()) or not bool(torch.isfinite(variances).all()):
            raise ValueError("variances: expected finite values > 0")
        k = means.shape[0]
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or not bool(((weights > 0) & torch.isfinite(weights)).all()):
            raise ValueError(f"weights: expected {k} positive numbers, got {weights.tolist()}")
        self.diff = diff
        self.means = means
        self.mean_coefs = ops.dct2(means)          # (K, C, H, W) mub_k
        self.variances = variances                 # (K, C, H, W) v_k
        self.weights = weights / weights.sum()
        self.calls = 0

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    # ------------------------------------------------------------ posterior
    def _posterior(self, xb: torch.Tensor, lab: torch.Tensor):
        """Responsibilities (B, K) and E[eb | xb] (B, C, H, W) for frequency-space xb.

        ``lab``: (B, 1, H, W) float64 log Abar.
        """
        dev = xb.device
        if bool((lab == lab[:1]).all()):
            lab = lab[:1]                                      # one step for the whole batch
        mub = self.mean_coefs.to(dev).flatten(1)               # (K, D)
        v = self.variances.to(dev).flatten(1)
        c = self.mean_coefs.shape[1]
        la = lab.expand(-1, c, -1, -1).flatten(1)[:, None]     # (B or 1, 1, D)
        one_m = -torch.expm1(la)
        s2 = torch.exp(la) * v + one_m                         # (B or 1, K, D)
        q = (xb.flatten(1)[:, None] - torch.exp(0.5 * la) * mub) / s2      # (B, K, D)
        r = q * s2
        logp = -0.5 * ((r * q).sum(-1) + torch.log(s2).sum(-1))            # (B, K)
        resp = torch.softmax(torch.log(self.weights.to(dev)) + logp, dim=1)
        eb = torch.sqrt(one_m[:, 0]) * torch.einsum("bk,bkd->bd", resp, q)
        return resp, eb.reshape(xb.shape)

    def responsibilities(self, x: torch.Tensor, t) -> torch.Tensor:
        """(B, K) posterior probabilities of the components given x_t (t=0: the data)."""
        self.diff.check_x(x, "x")
        t = self.diff.check_t(t, batch=x.shape[0])
        lab = self.diff.log_abar(t, device=x.device)[:, None]
        return self._posterior(ops.dct2(x.to(torch.float64)), lab)[0]

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        self.diff.check_x(x, "x")
        t = self.diff.check_t(t, low=1, batch=x.shape[0])
        self.calls += 1
        lab = self.diff.log_abar(t, device=x.device)[:, None]
        eb = self._posterior(ops.dct2(x.to(torch.float64)), lab)[1]
        return ops.idct2(eb).to(x.dtype)

    # ---------------------------------------------------------------- draws
    def sample(self, n: int, seed: int = 0, t: int = 0, return_labels: bool = False):
        """``n`` (>= 1) exact draws of x_t, t an int in 0..N (0: the data), float64, from a
        torch generator seeded ``seed``."""
        n = check_int("n", n)
        t = check_int("t", t, 0, self.diff.num_steps)
        gen = torch.Generator().manual_seed(check_int("seed", seed, 0))
        labels = torch.multinomial(self.weights, n, replacement=True, generator=gen)
        z0 = torch.randn((n,) + self.diff.shape, dtype=torch.float64, generator=gen)
        xb0 = self.mean_coefs[labels] + torch.sqrt(self.variances[labels]) * z0
        if t:
            t = self.diff.check_t(t, low=1, batch=n)
            sa, g = scales(self.diff.log_abar(t)[:, None])
            z = torch.randn((n,) + self.diff.shape, dtype=torch.float64, generator=gen)
            xb0 = sa * xb0 + g * z
        x = ops.idct2(xb0)
        return (x, labels) if return_labels else x

    # -------------------------------------------------------------- moments
    def moments(self):
        """Mean (D,) and covariance (D, D) of the data in the DCT basis, float64."""
        w = self.weights
        mub = self.mean_coefs.flatten(1)                       # (K, D)
        m = w @ mub
        dm = mub - m
        cov = torch.diag(w @ self.variances.flatten(1)) + (dm.T * w) @ dm
        return m, cov

    def coef_moments(self):
        """Per-coefficient mean, variance and fourth central moment (C, H, W), float64."""
        w = self.weights[:, None, None, None]
        m = (w * self.mean_coefs).sum(0)
        dl = self.mean_coefs - m
        v = self.variances
        var = (w * (dl ** 2 + v)).sum(0)
        m4 = (w * (dl ** 4 + 6 * dl ** 2 * v + 3 * v ** 2)).sum(0)
        return m, var, m4

    def frechet_distance(self, samples: torch.Tensor) -> float:
        """Fréchet distance between the Gaussian fit of ``samples`` and the mixture's moments."""
        self.diff.check_x(samples, "samples")
        xb = ops.dct2(samples.to(torch.float64)).flatten(1)
        m, cov = self.moments()
        return gaussian_frechet_distance(xb.mean(0), torch.cov(xb.T), m, cov)


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Fréchet distance between the Gaussian fits of two batches (B, ...) of B >= 2
    finite samples."""
    for name, a in (("x", x), ("y", y)):
        got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
        if not isinstance(a, torch.Tensor) or a.dim() < 2 or a.shape[0] < 2:
            raise ValueError(f"{name}: expected a tensor (B, ...) of B >= 2 samples, got {got}")
        if not torch.isfinite(a).all():
            raise ValueError(f"{name}: expected finite values")
    x = x.to(torch.float64).flatten(1)
    y = y.to(torch.float64).flatten(1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"y: expected {x.shape[1]} features per sample, got {y.shape[1]}")
    return gaussian_frechet_distance(x.mean(0), torch.cov(x.T), y.mean(0), torch.cov(y.T))


def example_oracle(diff: BlurDiffusion, components: int = 3, seed: int = 0,
                   weights=None, floor: float = 0.01) -> GaussianMixtureOracle:
    """A fixed image-like mixture for tests and benchmarks of samplers.

    Component means are smooth random images (DCT coefficients with |k|, |l| < 4,
    amplitude decaying as 1/(1 + k^2 + l^2), pixel values mostly in [-1, 1]);
    variances follow a power spectrum ``a_j / (1 + k^2 + l^2) + floor`` (frequencies
    scaled to a 16-pixel side; a different amplitude ``a_j`` per component; the
    default floor 0.01 is pixel noise of std 0.1). Default weights: 1 : 2 : ... : K.
    Samplers lose variance on coefficients whose variance is small (their last
    steps output posterior means): with the paper's process and 1000 steps,
    ancestral keeps 93% of a variance of 0.01 and 98% of 0.2. ``components`` >= 1,
    ``floor`` > 0.
    """
    components = check_int("components", components)
    check_number("floor", floor, 0, lo_open=True)
    gen = torch.Generator().manual_seed(check_int("seed", seed, 0))
    c, h, w = diff.shape
    ky = torch.arange(h, dtype=torch.float64)[:, None] * 16 / h
    kx = torch.arange(w, dtype=torch.float64)[None, :] * 16 / w
    decay = 1.0 / (1.0 + ky ** 2 + kx ** 2)                       # (H, W)
    low = ((ky < 4) & (kx < 4)).to(torch.float64)
    scale = math.sqrt(h * w)                                      # DC coefficient of a unit image
    coefs = torch.randn((components, c, h, w), dtype=torch.float64, generator=gen)
    mub = 0.35 * scale * decay * low * coefs
    means = ops.idct2(mub)
    amp = 0.02 * scale * torch.linspace(0.5, 1.5, components, dtype=torch.float64)
    variances = amp[:, None, None, None] * decay + floor * torch.ones(components, c, 1, 1,
                                                                      dtype=torch.float64)
    if weights is None:
        weights = torch.arange(1, components + 1, dtype=torch.float64)
    return GaussianMixtureOracle(diff, means, variances, weights)
