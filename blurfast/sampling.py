"""Samplers of blur diffusion (docs/process.md section 6).

Every sampler is a flat function with one signature (k-diffusion style)::

    fn(model, diff, x, timesteps, *, eta=0.0, seed=0, offset=0, callback=None, progress=True)

``x`` is the state at ``timesteps[0]``; ``timesteps`` is strictly decreasing,
in 1..N; the last step goes to step 0 and the function returns x_0. Each step is
one model call and one call of the fused op::

    x_s = spectral(x_i, ca, eps_theta, ce, g=cz, seed=seed, offset=...)

with (H, W) coefficient maps computed in float64 from ``diff.log_abar`` and cast
once. Step k (1-based) draws its noise at Philox offset ``offset + k * 2**40``;
the prior in :func:`sample` uses ``offset`` itself. Same seed, same images.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable, List, Optional, Sequence, Union

import torch

from . import ops
from .checks import check_int, check_number, is_int
from .diffusion import BlurDiffusion

__all__ = ["sample", "variations", "clip_x0", "timesteps", "reverse_sde", "ancestral", "ddim",
           "exp2m", "eta_first", "check_eta", "SAMPLERS", "ETA_SAMPLERS", "STEP_OFFSET"]

# Philox counter distance between the noise of consecutive steps (elements per step < 2**40).
STEP_OFFSET = 2 ** 40

# The samplers that take eta; reverse_sde and ancestral have their own fixed noise.
ETA_SAMPLERS = ("ddim", "exp2m")


def check_eta(sampler: str, eta, name: str = "eta", steps: Optional[int] = None) -> List[float]:
    """The per-step etas of ``eta``: a number in [0, 1], or one per step (``steps`` of
    them, when given). Raises, naming ``name``, otherwise, and when ``eta`` is nonzero
    for a sampler that has no eta: it would be ignored."""
    scalar = isinstance(eta, numbers.Real)
    try:
        etas = [eta] if scalar else list(eta)
    except TypeError:
        etas = None
    if sampler not in ETA_SAMPLERS and (etas is None or any(e != 0 for e in etas)):
        raise ValueError(f"{name}: only {' and '.join(ETA_SAMPLERS)} take it, not {sampler}; "
                         f"got {eta!r}")
    if etas is None or (steps is not None and not scalar and len(etas) != steps) or not all(
            isinstance(e, numbers.Real) and not isinstance(e, bool) and 0 <= e <= 1
            for e in etas):
        per_step = "" if scalar else \
            f" or {steps if steps is not None else 'a list'} of them (one per step)"
        raise ValueError(f"{name}: expected a number in [0, 1]{per_step}, got {eta!r}")
    return etas * steps if scalar and steps is not None else etas


def timesteps(diff: BlurDiffusion, steps: Optional[int] = None,
              spacing: Union[str, Sequence[int]] = "uniform",
              start: Optional[int] = None) -> List[int]:
    """Strictly decreasing model-call steps, from ``start`` (default N-1, the paper's
    start; at most N-1) down to 1.

    ``spacing``: ``"uniform"`` (rounded linspace), ``"quadratic"`` (denser near 0,
    ``1 + (start-1) (k/(S-1))^2``), or an explicit sequence of steps in 1..N
    (strictly decreasing; ``steps`` must then be None or its length, ``start`` None).
    ``steps`` None means every step start..1 (the paper's full chain from N-1).
    """
    n = diff.num_steps
    if start is not None:
        if not isinstance(spacing, str):
            raise ValueError("start: give None with an explicit spacing (its first step is "
                             "the start)")
        start = check_int("start", start, 1, n - 1)
    if not isinstance(spacing, str):
        seq = _step_list("spacing", spacing, n)
        if steps is not None and steps != len(seq):
            raise ValueError(f"steps: expected None or len(spacing) = {len(seq)}, got {steps!r}")
        return seq
    top = n - 1 if start is None else start
    if steps is None:
        steps = top
    steps = check_int("steps", steps, 1, top)
    if steps == 1:
        return [top]
    k = torch.arange(steps, dtype=torch.float64) / (steps - 1)
    if spacing == "uniform":
        seq = torch.round(1 + (top - 1) * k).long().tolist()   # spacing >= 1: distinct
    elif spacing == "quadratic":
        seq = torch.round(1 + (top - 1) * k ** 2).long().tolist()
        for j in range(1, steps):                             # distinct near 0 ...
            seq[j] = max(seq[j], seq[j - 1] + 1)
        seq[-1] = top
        for j in range(steps - 2, -1, -1):                    # ... and below the start
            seq[j] = min(seq[j], seq[j + 1] - 1)
    else:
        raise ValueError(f"spacing: expected 'uniform', 'quadratic' or a list of ints, "
                         f"got {spacing!r}")
    return seq[::-1]


def _step_list(name: str, seq, n: int) -> List[int]:
    """``seq`` as Python ints: strictly decreasing steps in [1, n], each an int
    (:func:`~blurfast.checks.is_int`: Python's or numpy's, a bool not), or a 1-D integer
    tensor of them; else ValueError naming ``name`` (a float such as 5.0 too)."""
    if isinstance(seq, torch.Tensor):
        integer = not (seq.dtype.is_floating_point or seq.dtype.is_complex
                       or seq.dtype == torch.bool)
        items = seq.tolist() if seq.dim() == 1 and integer else None
    else:
        try:
            items = list(seq)
        except TypeError:              # not a sequence
            items = None
    if items is None or not items or not all(is_int(s) and 1 <= s <= n for s in items) \
            or any(a <= b for a, b in zip(items, items[1:])):
        raise ValueError(f"{name}: expected strictly decreasing integer steps in [1, {n}], "
                         f"got {seq!r}")
    return [int(s) for s in items]


# ----------------------------------------------------------------------------
# Per-step coefficient maps (float64, (1, 1, H, W)) for a step from i to s < i.
# la_i, la_s are log Abar; A = Abar_i / Abar_s is the step's per-frequency decay.

def _reverse_sde_coefs(la_i, la_s, i, s, eta):
    """Paper Eq. 20: ca = 2 - sqrt(A), ce = -(1-A)/sqrt(1-Abar_i), cz = sqrt(1-A), no noise
    for i <= 2 or s = 0 (for the full chain s = i-1, that is exactly the paper's i <= 2)."""
    one_m_a = -torch.expm1(la_i - la_s)
    ca = 2 - torch.exp(0.5 * (la_i - la_s))
    ce = -one_m_a * torch.rsqrt(-torch.expm1(la_i))
    cz = torch.sqrt(one_m_a) if (i > 2 and s > 0) else None
    return ca, ce, cz


def _ancestral_coefs(la_i, la_s, i, s, eta):
    """Exact posterior q(xb_s | xb_i, x0b) with x0b from eps (DDPM with alpha -> A):
    mean = (xb_i - (1-A)/sqrt(1-Abar_i) eb) / sqrt(A), var = (1-Abar_s)/(1-Abar_i) (1-A)."""
    one_m_a = -torch.expm1(la_i - la_s)
    inv_sqrt_a = torch.exp(-0.5 * (la_i - la_s))
    one_m_abar_i = -torch.expm1(la_i)
    ce = -one_m_a * inv_sqrt_a * torch.rsqrt(one_m_abar_i)
    cz = torch.sqrt(-torch.expm1(la_s) / one_m_abar_i * one_m_a) if s > 0 else None
    return inv_sqrt_a, ce, cz


def _ddim_coefs(la_i, la_s, i, s, eta):
    """xb_s = r (xb_i - sqrt(1-Abar_i) eb) + sqrt(1-Abar_s-sig^2) eb + sig zb, r = sqrt(Abar_s/Abar_i),
    sig^2 = eta^2 (1-Abar_s)/(1-Abar_i) (1 - Abar_i/Abar_s)."""
    r = torch.exp(0.5 * (la_s - la_i))
    one_m_abar_i = -torch.expm1(la_i)
    one_m_abar_s = -torch.expm1(la_s)
    sig2 = eta ** 2 * one_m_abar_s / one_m_abar_i * -torch.expm1(la_i - la_s)
    ce = torch.sqrt((one_m_abar_s - sig2).clamp(min=0)) - r * torch.sqrt(one_m_abar_i)
    cz = torch.sqrt(sig2) if (eta > 0 and s > 0) else None
    return r, ce, cz


def _lambda(la):
    """Per-frequency half log-SNR ``log(sqrt(Abar) / sqrt(1 - Abar))``; +inf at Abar = 1."""
    return 0.5 * (la - torch.log(-torch.expm1(la)))


def _exp2m_coefs(la_i, la_s, la_p, i, s):
    """Second-order multistep exponential integrator of the probability-flow ODE per
    frequency, in lambda = log(alpha/sigma) (alpha = sqrt(Abar), sigma = sqrt(1-Abar)):

        x_s = (alpha_s/alpha_i) x_i - alpha_s int_{lam_i}^{lam_s} e^(-lam) eps(lam) dlam

    with eps linear in lambda through (lam_p, eps_p) and (lam_i, eps_i), integrated
    exactly: x_s = r x_i - c1 eps_i - c2 (eps_i - eps_p), r = alpha_s/alpha_i,
    c1 = sigma_s (e^h - 1) = r sigma_i - sigma_s, c2 = sigma_s (e^h - 1 - h) / h_p,
    h = lam_s - lam_i, h_p = lam_i - lam_p. Returns (ca, ce, cp): cp multiplies eps_p.
    """
    r = torch.exp(0.5 * (la_s - la_i))
    sig_i = torch.sqrt(-torch.expm1(la_i))
    sig_s = torch.sqrt(-torch.expm1(la_s))
    c1 = r * sig_i - sig_s
    lam_i = _lambda(la_i)
    sh = sig_s * (_lambda(la_s) - lam_i) if s > 0 else torch.zeros_like(c1)  # sigma_s h -> 0
    c2 = (c1 - sh) / (lam_i - _lambda(la_p))
    return r, -(c1 + c2), c2


def _run(coefs: Callable, model, diff: BlurDiffusion, x: torch.Tensor, steps: Sequence[int],
         eta=0.0, seed: int = 0, offset: int = 0, callback=None, progress: bool = True,
         desc: str = "sampling", multistep: bool = False):
    from tqdm.auto import tqdm

    diff.check_x(x, "x")
    steps = _step_list("timesteps", steps, diff.num_steps)
    etas = check_eta(desc, eta, steps=len(steps))          # desc: the sampler's name
    if x.numel() >= STEP_OFFSET:
        raise ValueError(f"x: at most {STEP_OFFSET - 1} elements per batch, got {x.numel()}")
    seed = check_int("seed", seed, 0)
    # the last step's noise is at offset + len(steps) * STEP_OFFSET, below the op's limit
    offset = check_int("offset", offset, 0, ops._SEED_LIMIT - 1 - len(steps) * STEP_OFFSET)
    b, dev = x.shape[0], x.device
    lab = diff.log_abar(torch.tensor(steps + [0]), device=dev)[:, None, None]  # (S+1, 1, 1, H, W)
    eps_prev = None                            # multistep: dct2 of the previous eps
    with torch.no_grad():
        for k, (i, s) in enumerate(tqdm(list(zip(steps, steps[1:] + [0])), desc=desc,
                                        disable=not progress, leave=False), start=1):
            t = torch.full((b,), i, dtype=torch.int64, device=dev)
            eps = model(x, t)
            if k == 1 and (not isinstance(eps, torch.Tensor) or eps.shape != x.shape):
                raise ValueError(f"model: expected eps of shape {tuple(x.shape)}, got "
                                 f"{tuple(getattr(eps, 'shape', ())) or type(eps).__name__}")
            eps = eps.to(x.dtype)
            if callback is not None:
                callback(i, x, diff.eps_to_x0_at(x, eps, lab[k - 1]))
            if multistep and eps_prev is not None and etas[k - 1] == 0:
                ca, ce, cp = _exp2m_coefs(lab[k - 1], lab[k], lab[k - 2], i, s)
                x_new = ops.spectral(x, diff.cast(ca, x), eps, diff.cast(ce, x),
                                     diff.cast(cp, x), noise=eps_prev)
            else:
                ca, ce, cz = coefs(lab[k - 1], lab[k], i, s, etas[k - 1])
                if cz is None:
                    x_new = ops.spectral(x, diff.cast(ca, x), eps, diff.cast(ce, x))
                else:
                    x_new = ops.spectral(x, diff.cast(ca, x), eps, diff.cast(ce, x),
                                         diff.cast(cz, x), seed=seed,
                                         offset=offset + k * STEP_OFFSET)
            # History only across deterministic steps (a noisy step breaks the ODE path).
            eps_prev = ops.dct2(eps) if (multistep and s > 0 and etas[k - 1] == 0) else None
            x = x_new
    return x


def reverse_sde(model, diff, x, timesteps, *, eta=0.0, seed=0, offset=0, callback=None,
                progress=True):
    """The paper's reverse diffusion (Eq. 20); on a subsequence A_i becomes Abar_i/Abar_s.
    No eta: a nonzero one raises."""
    check_eta("reverse_sde", eta)
    return _run(_reverse_sde_coefs, model, diff, x, timesteps, 0.0, seed, offset, callback,
                progress, "reverse_sde")


def ancestral(model, diff, x, timesteps, *, eta=0.0, seed=0, offset=0, callback=None,
              progress=True):
    """Ancestral sampling from the per-frequency Gaussian posterior q(x_s | x_i, x0_hat).
    No eta (it is DDIM's eta = 1): a nonzero one raises."""
    check_eta("ancestral", eta)
    return _run(_ancestral_coefs, model, diff, x, timesteps, 0.0, seed, offset, callback,
                progress, "ancestral")


def ddim(model, diff, x, timesteps, *, eta=0.0, seed=0, offset=0, callback=None,
         progress=True):
    """DDIM per frequency; eta=0 deterministic, eta=1 the ancestral posterior.

    ``eta`` may also be a list, one value per step (e.g. stochastic first steps).
    """
    return _run(_ddim_coefs, model, diff, x, timesteps, eta, seed, offset, callback,
                progress, "ddim")


def exp2m(model, diff, x, timesteps, *, eta=0.0, seed=0, offset=0, callback=None,
          progress=True):
    """Second-order multistep exponential integrator per frequency (see _exp2m_coefs).

    The first step, and any step with eta > 0, is a DDIM step (``eta`` as in
    :func:`ddim`). Each step is one fused call on (x_i, eps_i, dct2(eps_prev)), plus
    one dct2 of eps kept for the next step.
    """
    return _run(_ddim_coefs, model, diff, x, timesteps, eta, seed, offset, callback,
                progress, "exp2m", multistep=True)


def eta_first(steps: int, fraction: float, eta: float = 1.0) -> List[float]:
    """Per-step eta: ``eta`` for the first ``ceil(fraction * steps)`` steps, then 0.

    Stochastic first steps let DDIM / exp2m correct the prior's error (it ignores
    ``sqrt(Abar) x0``, which matters at low frequencies) before the ODE takes over.
    """
    steps = check_int("steps", steps)
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction: expected a number in [0, 1], got {fraction!r}")
    k = math.ceil(fraction * steps - 1e-9)
    return [float(eta)] * k + [0.0] * (steps - k)


SAMPLERS = {"reverse_sde": reverse_sde, "ancestral": ancestral, "ddim": ddim, "exp2m": exp2m}


def _clip_range(clip) -> tuple:
    """``clip`` as ``(lo, hi)`` when it is a pair of finite numbers with lo < hi; else
    ValueError naming clip."""
    if not isinstance(clip, (tuple, list)) or len(clip) != 2:
        raise ValueError(f"clip: expected None or a pair (lo, hi) of finite numbers, "
                         f"got {clip!r}")
    lo, hi = (check_number("clip", v) for v in clip)
    if not lo < hi:
        raise ValueError(f"clip: expected lo < hi, got {tuple(clip)!r}")
    return lo, hi


def clip_x0(model, diff: BlurDiffusion, lo: float = -1.0, hi: float = 1.0):
    """``model`` with its x0 estimate clamped to [lo, hi]: returns the eps of the clamped
    x0 (two more fused calls per step). A trained model's eps error is amplified by
    ``sqrt(Abar_s / Abar_t)``, huge at the high frequencies a blur process empties; the
    clamp keeps an imperfect model's samples in range. The exact model is unaffected
    wherever its x0 estimate already lies in [lo, hi]. ``lo`` and ``hi`` are finite
    numbers with lo < hi (ValueError naming ``clip`` otherwise)."""
    lo, hi = _clip_range((lo, hi))
    def clipped(x, t):          # t as the samplers pass it: not checked (a host sync)
        eps = model(x, t).to(x.dtype)
        lab = diff.log_abar_unchecked(t.to(x.device))[:, None]
        return diff.x0_to_eps_at(x, diff.eps_to_x0_at(x, eps, lab).clamp(lo, hi), lab)
    return clipped


def sample(model, diff: BlurDiffusion, shape, sampler: str = "ddim", steps: Optional[int] = 100,
           eta: float = 0.0, spacing="uniform", seed: int = 0, callback=None,
           progress: bool = True, *, x_init: Optional[torch.Tensor] = None,
           dtype=torch.float32, device=None, clip=None, offset: int = 0) -> torch.Tensor:
    """Samples (B, C, H, W) of ``model`` (eps in pixel space) under ``diff``.

    ``sampler``: ``reverse_sde`` | ``ancestral`` | ``ddim`` | ``exp2m``; ``eta``: ddim and
    exp2m only (a number or one per step; nonzero with the others raises); ``steps``: model calls
    (None: the full chain N-1..1); ``spacing``: see :func:`timesteps` (an explicit
    list of steps overrides ``steps``). Starts from
    the prior at the first step (``diff.prior_sample``) unless ``x_init`` (the state
    at the first step) is given. ``callback(step, x_t, x0_hat)`` is called before
    each update. ``clip=(lo, hi)``, finite numbers with lo < hi, clamps the model's x0
    estimate (:func:`clip_x0`; the data range, e.g. (-1, 1), for trained models).
    ``offset``: the Philox offset of the first image's noise (image i's is at ``offset +
    i * C*H*W``): ``offset=b0 * C*H*W`` samples images b0.. of a larger batch, the same.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {tuple(SAMPLERS)}, got {sampler!r}")
    check_eta(sampler, eta)
    if clip is not None:
        model = clip_x0(model, diff, *_clip_range(clip))
    seq = timesteps(diff, steps if isinstance(spacing, str) else None, spacing)
    if x_init is None:
        device = torch.device("cpu") if device is None else torch.device(device)
        x = diff.prior_sample(shape, seq[0], seed=seed, offset=offset, dtype=dtype,
                              device=device)
    else:
        diff.check_x(x_init, "x_init")
        if tuple(x_init.shape) != tuple(shape):
            raise ValueError(f"x_init: expected shape {tuple(shape)}, got {tuple(x_init.shape)}")
        x = x_init
    return SAMPLERS[sampler](model, diff, x, seq, eta=eta, seed=seed, offset=offset,
                             callback=callback, progress=progress)


def variations(model, diff: BlurDiffusion, x0: torch.Tensor, start: int,
               sampler: str = "ddim", steps: Optional[int] = None, eta: float = 0.0,
               spacing: str = "uniform", seed: int = 0, callback=None, progress: bool = True,
               *, clip=None, offset: int = 0) -> torch.Tensor:
    """Variations of images ``x0`` (B, C, H, W): each taken forward by the process to step
    ``start`` in [1, N-1] (``diff.q_sample``: blurred, faded and noised) and run back from
    there by ``sampler`` (SDEdit, Meng et al. 2022). In blur diffusion the high
    frequencies go first, so a moderate ``start`` keeps an image's coarse layout and
    colours and draws its details anew; the later the start, the less is kept (at N-1
    little more than what the prior's start leaves of an image).
    ``steps``: model calls from ``start`` down to 1 (None: every step); ``spacing``:
    ``"uniform"`` or ``"quadratic"``; the other arguments as :func:`sample`'s. The forward
    noise of image i is at Philox offset ``offset + i * C*H*W``, below every step's."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {tuple(SAMPLERS)}, got {sampler!r}")
    check_eta(sampler, eta)
    if not isinstance(spacing, str):
        raise ValueError(f"spacing: expected 'uniform' or 'quadratic', got {spacing!r}")
    diff.check_x(x0, "x0")
    seq = timesteps(diff, steps, spacing, start=start)
    # as _run takes them, before q_sample draws (it would take seed None, and any offset)
    seed = check_int("seed", seed, 0)
    offset = check_int("offset", offset, 0, ops._SEED_LIMIT - 1 - len(seq) * STEP_OFFSET)
    if clip is not None:
        model = clip_x0(model, diff, *_clip_range(clip))
    t = torch.full((x0.shape[0],), seq[0], dtype=torch.int64, device=x0.device)
    x = diff.q_sample(x0, t, seed=seed, offset=offset)[0]
    return SAMPLERS[sampler](model, diff, x, seq, eta=eta, seed=seed, offset=offset,
                             callback=callback, progress=progress)

