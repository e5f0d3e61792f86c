"""The blur diffusion process (docs/process.md sections 4 and 5).

Per DCT frequency the forward process is a variance-preserving diffusion with
``Abar_i = alpha_bar_i * d ** (2 F_i)``. Only ``log Abar`` is stored, in closed
form: per-step scalars ``log alpha_bar_i`` and ``F_i`` plus one (H, W) map
``log d``, so memory is O(N + H*W). Every map applied to data is computed in
float64 from ``log Abar`` and cast once to the data's dtype, and every
application is one call of the fused op :func:`blurfast.ops.spectral`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from . import ops
from . import schedules as S
from .checks import check_bool, check_int, check_number, check_size, is_int

__all__ = ["BlurDiffusion", "TARGETS", "scales"]

TARGETS = ("eps", "std", "score")


def scales(lab: torch.Tensor):
    """``(sqrt(Abar), sqrt(1 - Abar))`` from ``lab = log Abar``: the forward process's
    signal and noise maps (docs/process.md section 4); expm1 keeps 1 - Abar accurate
    where Abar is close to 1."""
    return torch.exp(0.5 * lab), torch.sqrt(-torch.expm1(lab))


class BlurDiffusion:
    """Blur diffusion of Lee et al. (arXiv 2207.11192), with its schedules.

    ``resolution`` is an int or (H, W). ``sigma_max=0`` gives plain DDPM;
    ``coarse_to_fine=False`` replaces ``d`` by ``1 - d`` (the fine-to-coarse
    ablation). ``BlurDiffusion(**diff.config)`` rebuilds an equal process.
    Steps are i = 0..N; ``Abar_0 = 1``.
    """

    def __init__(self, resolution=64, channels=3, num_steps=1000,
                 noise_schedule="linear", beta_min=1e-4, beta_max=0.02,
                 blur_schedule="quartic", sigma=0.4, sigma_min=0.0, sigma_max=0.15,
                 kernel="discrete", coarse_to_fine=True):
        h, w = check_size("resolution", resolution)
        channels = check_int("channels", channels)
        sigma = check_number("sigma", sigma, 0, lo_open=True)
        sigma_min = check_number("sigma_min", sigma_min, 0)
        sigma_max = check_number("sigma_max", sigma_max, 0)
        # The config is saved as JSON: numpy scalars (checked by noise_betas) as Python's.
        beta_min, beta_max = (v.item() if isinstance(v, np.generic) else v
                              for v in (beta_min, beta_max))
        check_bool("coarse_to_fine", coarse_to_fine)
        num_steps = S._check_steps(num_steps)
        self.H, self.W = h, w
        self.channels = channels
        self.num_steps = num_steps
        self._config = dict(
            resolution=(h if h == w else (h, w)), channels=channels, num_steps=num_steps,
            noise_schedule=noise_schedule, beta_min=beta_min, beta_max=beta_max,
            blur_schedule=blur_schedule, sigma=sigma, sigma_min=sigma_min,
            sigma_max=sigma_max, kernel=kernel, coarse_to_fine=coarse_to_fine)

        # (N+1,) float64 per-step scalars; index 0 is the clean image.
        self.betas = S.noise_betas(noise_schedule, num_steps, beta_min, beta_max)
        self.log_alpha_bar = S.log_alpha_bar(self.betas)
        self.f = S.blur_f(blur_schedule, num_steps, (sigma_min / sigma) ** 2,
                          (sigma_max / sigma) ** 2)
        self.F = torch.cumsum(self.f, 0)
        # (H, W) float64: log of the floored blur eigenvalues.
        self.log_d = torch.log(S.process_eigenvalues((h, w), sigma, kernel, coarse_to_fine))
        self._tables_on = {}

        # log A_i = log(1 - beta_i) + 2 f(i) log d must be < 0 for every i >= 1 and
        # frequency (Abar strictly decreasing, so 1 - Abar_i > 0 for i >= 1). It is
        # affine in log d, so its maximum is at the largest or the smallest log d.
        lb = torch.log1p(-self.betas[1:])
        log_a = torch.maximum(lb + 2 * self.f[1:] * self.log_d.max(),
                              lb + 2 * self.f[1:] * self.log_d.min())
        i = int(log_a.argmax()) + 1
        if not log_a[i - 1] < 0:
            if self.f[i] < 0:       # d ** (2 f) > 1 where d < 1: triangular's f(N) = f_1 - ...
                raise ValueError(f"blur_schedule: {blur_schedule!r} gives f({i}) = "
                                 f"{self.f[i].item():.3g} < 0, a step with A_i >= 1 (it "
                                 f"sharpens more than it adds noise); use another blur "
                                 f"schedule or more steps")
            raise ValueError("beta_min: the schedules give a step with A_i >= 1 (neither "
                             "noise nor blur); use beta_min > 0")

    # ------------------------------------------------------------------ config
    @property
    def config(self) -> dict:
        """Plain dict of the constructor arguments; ``BlurDiffusion(**config)`` rebuilds it."""
        return dict(self._config)

    def __repr__(self):
        args = ", ".join(f"{k}={v!r}" for k, v in self._config.items())
        return f"BlurDiffusion({args})"

    def __eq__(self, other):
        return isinstance(other, BlurDiffusion) and other._config == self._config

    __hash__ = None

    @property
    def shape(self):
        """(C, H, W) of one image."""
        return (self.channels, self.H, self.W)

    # ------------------------------------------------------------ validation
    def check_t(self, t, name: str = "t", low: int = 0, batch: Optional[int] = None,
                device=None) -> torch.Tensor:
        """``t`` as an int64 (B,) tensor with ``low <= t <= N``; ValueError otherwise."""
        if is_int(t):
            t = torch.tensor([t] if batch is None else [t] * batch, dtype=torch.int64)
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype.is_floating_point \
                or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"{name}: expected an integer tensor of shape (B,), got "
                             f"{getattr(t, 'dtype', type(t))} {tuple(getattr(t, 'shape', ()))}")
        if batch is not None and t.shape[0] != batch:
            raise ValueError(f"{name}: expected shape ({batch},), got {tuple(t.shape)}")
        if t.numel() and (int(t.min()) < low or int(t.max()) > self.num_steps):
            raise ValueError(f"{name}: expected steps in [{low}, {self.num_steps}], got "
                             f"[{int(t.min())}, {int(t.max())}]")
        t = t.to(torch.int64)
        return t if device is None else t.to(device)

    def check_x(self, x, name: str = "x0") -> None:
        """ValueError unless ``x`` is a floating (B, C, H, W) tensor of this process (its
        shape and dtype only: no host synchronization)."""
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            raise ValueError(f"{name}: expected a floating-point tensor, got {type(x).__name__}"
                             f" {getattr(x, 'dtype', '')}")
        if x.dim() != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"{name}: expected shape (B, {self.channels}, {self.H}, {self.W}), "
                             f"got {tuple(x.shape)}")

    # ------------------------------------------------------------ schedule maps
    def _tables(self, device):
        """(log alpha_bar, F, log d) on ``device``, copied once per device."""
        key = str(torch.device(device))
        if key not in self._tables_on:
            self._tables_on[key] = tuple(a.to(device) for a in (self.log_alpha_bar, self.F,
                                                                 self.log_d))
        return self._tables_on[key]

    def _log_d(self, device) -> torch.Tensor:
        return self._tables(device)[2]

    def log_abar_unchecked(self, t: torch.Tensor) -> torch.Tensor:
        """``log_abar`` for an int64 tensor t already known to be in 0..N, on t's device,
        with no validation and no host synchronization (safe inside a CUDA graph)."""
        la, F, log_d = self._tables(t.device)
        return la[t][:, None, None] + 2 * F[t][:, None, None] * log_d

    def log_abar(self, t, device=None) -> torch.Tensor:
        """(len(t), H, W) float64: ``log Abar_t = log alpha_bar_t + 2 F_t log d``, t in 0..N."""
        t = self.check_t(t)
        return self.log_abar_unchecked(t if device is None else t.to(device))

    def log_a(self, t, device=None) -> torch.Tensor:
        """(len(t), H, W) float64: the one-step ``log A_t = log(1 - beta_t) + 2 f(t) log d``, t in 1..N."""
        t = self.check_t(t, low=1)
        dev = t.device if device is None else torch.device(device)
        lb = torch.log1p(-self.betas[t.cpu()]).to(dev)
        f = self.f[t.cpu()].to(dev)
        return lb[:, None, None] + 2 * f[:, None, None] * self._log_d(dev)

    def _lab(self, t, x) -> torch.Tensor:
        """(B, 1, H, W) float64 log Abar_t on x's device (t validated against x's batch)."""
        t = self.check_t(t, low=0, batch=x.shape[0])
        return self.log_abar(t, device=x.device)[:, None]

    @staticmethod
    def _like(name: str, v, x: torch.Tensor) -> torch.Tensor:
        """``v`` when it is a tensor of x's shape on x's device; else ValueError naming it
        (the fused op would name it x2)."""
        if not isinstance(v, torch.Tensor) or v.shape != x.shape or v.device != x.device:
            got = (f"{tuple(v.shape)} on {v.device}" if isinstance(v, torch.Tensor)
                   else type(v).__name__)
            raise ValueError(f"{name}: expected a tensor of shape {tuple(x.shape)} on "
                             f"{x.device}, got {got}")
        return v

    @staticmethod
    def cast(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """A float64 coefficient map cast once to x's dtype and device."""
        return m.to(device=x.device, dtype=x.dtype)

    # --------------------------------------------------------------- forward
    def q_sample(self, x0, t, noise=None, seed=None, offset: int = 0):
        """``(x_t, eps)`` with ``xb_t = sqrt(Abar_t) xb_0 + sqrt(1 - Abar_t) eb``; t in 1..N.

        ``noise`` is pixel-space eps (returned unchanged); when None, eps comes from
        the fused op's Philox stream at ``(seed, offset)`` (seed None: drawn from
        torch's default generator). One call of the fused op either way.
        """
        self.check_x(x0)
        t = self.check_t(t, low=1, batch=x0.shape[0])
        a, g = (self.cast(m, x0) for m in scales(self.log_abar(t, device=x0.device)[:, None]))
        if noise is not None:
            return ops.spectral(x0, a, self._like("noise", noise, x0).to(x0.dtype), g), noise
        # None: the op draws one from torch's generator; numpy ints too, not floats
        seed = check_int("seed", seed, 0, none_ok=True)
        return ops.spectral(x0, a, g=g, seed=seed, offset=offset, return_noise=True)

    def prior_sample(self, shape, t: Optional[int] = None, seed: int = 0, offset: int = 0,
                     dtype=torch.float32, device="cpu") -> torch.Tensor:
        """Draw of the prior at step t (default N-1, as the paper's sampler starts):
        ``x_t = idct2(sqrt(1 - Abar_t) zb)``, i.e. N(0, U diag(1 - Abar_t) U^T). ``t`` an
        int, or an int64 (B,) tensor of one step per sample."""
        got = tuple(shape) if isinstance(shape, (tuple, list, torch.Size)) else shape
        if not isinstance(got, tuple) or len(got) != 4 or got[1:] != self.shape:
            raise ValueError(f"shape: expected (B, {self.channels}, {self.H}, {self.W}), "
                             f"got {got!r}")
        got = (check_int("shape[0]", got[0], 0),) + got[1:]
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
        seed = check_int("seed", seed, 0)
        t = self.num_steps - 1 if t is None else t
        per_sample = isinstance(t, torch.Tensor)
        t = self.check_t(t, low=1, batch=got[0])
        z = torch.zeros(got, dtype=dtype, device=device)
        # one (1, 1, H, W) map for an int step, (B, 1, H, W) for a tensor of steps
        lab = self.log_abar(t if per_sample else t[:1], device=device)[:, None]
        g = self.cast(scales(lab)[1], z)
        return ops.spectral(z, torch.zeros_like(g), g=g, seed=seed, offset=offset)

    # ---------------------------------------------------------- conversions
    # Each is one fused call; names say from -> to. x_t, eps, std, score are pixel space.
    # Each tensor is checked (check_x) and named; the _at variants below are not.
    def eps_to_x0(self, x_t, eps, t) -> torch.Tensor:
        """``x0 = idct2((xb_t - sqrt(1 - Abar) eb) / sqrt(Abar))``; unstable where Abar is tiny."""
        self.check_x(x_t, "x_t")
        self.check_x(eps, "eps")
        lab = self._lab(t, x_t)
        return self.eps_to_x0_at(x_t, self._like("eps", eps, x_t), lab)

    def x0_to_eps(self, x_t, x0, t) -> torch.Tensor:
        """``eps = idct2((xb_t - sqrt(Abar) xb0) / sqrt(1 - Abar))``, t in 1..N."""
        self.check_x(x_t, "x_t")
        self.check_x(x0, "x0")
        t = self.check_t(t, low=1, batch=x_t.shape[0])
        return self.x0_to_eps_at(x_t, self._like("x0", x0, x_t), self._lab(t, x_t))

    # The same two conversions at a given float64 log Abar map ((B or 1, 1, H, W), on x_t's
    # device), unchecked: no host synchronization, for the samplers' inner loop.
    def eps_to_x0_at(self, x_t, eps, lab) -> torch.Tensor:
        sa, g = scales(lab)
        a = 1 / sa
        return ops.spectral(x_t, self.cast(a, x_t), eps.to(x_t.dtype), self.cast(-g * a, x_t))

    def x0_to_eps_at(self, x_t, x0, lab) -> torch.Tensor:
        sa, g = scales(lab)
        return ops.spectral(x_t, self.cast(1 / g, x_t), x0.to(x_t.dtype),
                            self.cast(-sa / g, x_t))

    def eps_to_score(self, eps, t) -> torch.Tensor:
        """``score = -idct2((1 - Abar)^(-1/2) eb)`` (paper Eq. 15), t in 1..N."""
        self.check_x(eps, "eps")
        t = self.check_t(t, low=1, batch=eps.shape[0])
        return ops.spectral(eps, self.cast(-1 / scales(self._lab(t, eps))[1], eps))

    def score_to_eps(self, score, t) -> torch.Tensor:
        """Inverse of :meth:`eps_to_score`: ``eps = -idct2(sqrt(1 - Abar) score_b)``."""
        self.check_x(score, "score")
        t = self.check_t(t, low=1, batch=score.shape[0])
        return self._to_eps_unchecked(score, t, "score")

    def eps_to_std(self, eps, t) -> torch.Tensor:
        """``std = idct2(sqrt(1 - Abar) eb)``: the noise part of x_t."""
        self.check_x(eps, "eps")
        return ops.spectral(eps, self.cast(scales(self._lab(t, eps))[1], eps))

    def std_to_eps(self, std, t) -> torch.Tensor:
        """Inverse of :meth:`eps_to_std`, t in 1..N."""
        self.check_x(std, "std")
        t = self.check_t(t, low=1, batch=std.shape[0])
        return self._to_eps_unchecked(std, t, "std")

    def _to_eps_unchecked(self, y, t, target: str) -> torch.Tensor:
        """eps from a ``std`` or ``score`` prediction ``y``, for an int64 t already known to be
        in 1..N: no validation and no host synchronization."""
        g = scales(self.log_abar_unchecked(t.to(y.device))[:, None])[1]
        return ops.spectral(y, self.cast(1 / g if target == "std" else -g, y))

    def eps_model(self, model, target: str = "eps"):
        """Wrap a model trained on ``target`` so that it returns eps (what samplers call);
        the prediction is converted in ``x``'s dtype (float32 under bf16 autocast). The
        wrapper trusts ``t`` (int64, 1..N, as the samplers pass it): checking it would
        synchronize with the GPU once per call."""
        if target == "eps":
            return model
        if target not in TARGETS:
            raise ValueError(f"target: expected one of {TARGETS}, got {target!r}")
        return lambda x, t: self._to_eps_unchecked(model(x, t).to(x.dtype), t, target)

    # ----------------------------------------------------------------- loss
    def sample_t(self, batch: int, device="cpu") -> torch.Tensor:
        """``batch`` training steps, uniform on 1..N-1 (the paper's code), from torch's
        generator."""
        batch = check_int("batch", batch, 0)
        return torch.randint(1, self.num_steps, (batch,), dtype=torch.int64).to(device)

    def loss(self, model, x0, t=None, target: str = "eps", seed=None) -> torch.Tensor:
        """Mean squared error of ``model(x_t, t)`` against the target (docs/process.md section 5).

        ``eps``: eps (paper Eq. 18); ``std``: ``idct2(sqrt(1 - Abar) eb)``;
        ``score``: ``-idct2((1 - Abar)^(-1/2) eb)``. ``t`` None draws 1..N-1.
        """
        if target not in TARGETS:
            raise ValueError(f"target: expected one of {TARGETS}, got {target!r}")
        self.check_x(x0)
        t = self.sample_t(x0.shape[0], x0.device) if t is None else \
            self.check_t(t, low=1, batch=x0.shape[0], device=x0.device)
        x_t, eps = self.q_sample(x0, t, seed=seed)
        with torch.no_grad():
            if target == "eps":
                y = eps
            elif target == "std":
                y = self.eps_to_std(eps, t)
            else:
                y = self.eps_to_score(eps, t)
        pred = model(x_t, t)
        if pred.shape != y.shape:
            raise ValueError(f"model: expected an output of shape {tuple(y.shape)}, "
                             f"got {tuple(pred.shape)}")
        err = pred - y.to(pred.dtype)
        return torch.mean(err.to(torch.promote_types(err.dtype, torch.float32)) ** 2)
