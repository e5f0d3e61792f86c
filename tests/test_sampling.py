"""Samplers against step formulas written here (numpy, float64, scipy DCT), and on the oracle."""
import math

import numpy as np
import pytest
import scipy.fft
import torch

from blurfast import ops
from blurfast.diffusion import BlurDiffusion
from blurfast.reference import philox_normal
from blurfast.sampling import (ETA_SAMPLERS, SAMPLERS, STEP_OFFSET, ancestral, ddim, eta_first,
                               sample, timesteps)
from blurfast.testing import GaussianMixtureOracle, example_oracle
from bfutil import dct2, idct2


def toy_model(x, t):
    """A deterministic, nonlinear, step-dependent stand-in for a network."""
    return torch.tanh(x) * (0.5 + t.view(-1, 1, 1, 1) / 100.0) + 0.1 * x.flip(-1)


def zb(shape, seed, k):
    """The frequency-space noise the fused op draws at step k (k = 0: the prior)."""
    return philox_normal(shape, seed, k * STEP_OFFSET, torch.float64).numpy()


def abar_of(diff, t):
    return np.exp(diff.log_abar(torch.tensor([t]))[0].numpy())      # (H, W)


def reference_run(kind, diff, shape, steps, seed, eta=0.0, clip=None):
    """Samplers from docs/process.md section 6 written through x0 and the posterior, in numpy.

    ``eta``: a number or one per step (ddim and exp2m). ``clip=(lo, hi)``: each step's x0
    estimate clamped in pixel space, and the step then takes the eps of the clamped x0."""
    etas = [eta] * len(steps) if np.isscalar(eta) else list(eta)
    x = idct2(np.sqrt(1 - abar_of(diff, steps[0])) * zb(shape, seed, 0))
    prev = None                                        # exp2m: (lambda_p, eb_p) of the last step
    for k, (i, s) in enumerate(zip(steps, steps[1:] + [0]), start=1):
        e = toy_model(torch.tensor(x), torch.full((shape[0],), i)).numpy()
        ai, as_ = abar_of(diff, i), abar_of(diff, s)
        xb, eb = dct2(x), dct2(e)
        x0b = (xb - np.sqrt(1 - ai) * eb) / np.sqrt(ai)
        if clip is not None:
            x0b = dct2(np.clip(idct2(x0b), *clip))
            eb = (xb - np.sqrt(ai) * x0b) / np.sqrt(1 - ai)
        z = zb(shape, seed, k)
        a = ai / as_                                   # one step's A (from s to i)
        eta_k = etas[k - 1]
        if kind == "reverse_sde":                      # paper Eq. 20
            out = (2 - np.sqrt(a)) * xb - (1 - a) / np.sqrt(1 - ai) * eb
            if i > 2 and s > 0:
                out = out + np.sqrt(1 - a) * z
        elif kind == "ancestral":                      # DDPM posterior, alpha -> A
            mean = np.sqrt(as_) * (1 - a) / (1 - ai) * x0b + np.sqrt(a) * (1 - as_) / (1 - ai) * xb
            out = mean + (np.sqrt((1 - as_) / (1 - ai) * (1 - a)) * z if s > 0 else 0)
        elif kind == "exp2m" and eta_k == 0 and prev is not None:
            out = exp2m_step(diff, i, s, xb, eb, *prev)
        else:                                          # DDIM (exp2m: first or noisy steps)
            sig = eta_k * np.sqrt((1 - as_) / (1 - ai) * (1 - ai / as_))
            out = np.sqrt(as_) * x0b + np.sqrt(1 - as_ - sig ** 2) * eb + (sig * z if s > 0 else 0)
        # exp2m keeps eps only along the ODE: a noisy step starts the history afresh.
        prev = (half_log_snr(diff, i), eb) if eta_k == 0 else None
        x = idct2(out)
    return x


def half_log_snr(diff, t):
    """lambda_t = log(alpha_t / sigma_t) per frequency, alpha = sqrt(Abar), sigma = sqrt(1 - Abar)."""
    la = diff.log_abar(torch.tensor([t]))[0].numpy()
    return 0.5 * la - 0.5 * np.log(-np.expm1(la))


def exp2m_step(diff, i, s, xb, eb, lam_p, eb_p):
    """One step i -> s of the second-order multistep exponential integrator (docs/process.md
    section 6), written here from its derivation. Per frequency the probability-flow ODE
    is d(x / alpha) = eps d(sigma / alpha) = -e^(-lambda) eps d lambda, so

        x_s = alpha_s (x_i / alpha_i - int_{lam_i}^{lam_s} e^(-lam) eps(lam) dlam).

    With eps(lam) = eps_i + (lam - lam_i) D, D = (eps_i - eps_p) / (lam_i - lam_p) (the line
    through the last two evaluations) and h = lam_s - lam_i:
        int e^(-lam) dlam            = e^(-lam_i) - e^(-lam_s)
        int (lam - lam_i) e^(-lam)   = e^(-lam_i) - (1 + h) e^(-lam_s)
    The eps_i part is DDIM (alpha_s x0_hat + sigma_s eps_i); what the slope D adds is
    -alpha_s (e^(-lam_i) - (1 + h) e^(-lam_s)) D. At s = 0, alpha_s = 1 and e^(-lam_s) = 0."""
    lab_i = diff.log_abar(torch.tensor([i]))[0].numpy()
    alpha_i, sigma_i = np.exp(0.5 * lab_i), np.sqrt(-np.expm1(lab_i))
    lam_i = half_log_snr(diff, i)
    x0b = (xb - sigma_i * eb) / alpha_i
    slope = (eb - eb_p) / (lam_i - lam_p)
    if s == 0:
        return x0b - np.exp(-lam_i) * slope
    lab_s = diff.log_abar(torch.tensor([s]))[0].numpy()
    alpha_s, sigma_s = np.exp(0.5 * lab_s), np.sqrt(-np.expm1(lab_s))
    lam_s = half_log_snr(diff, s)
    h = lam_s - lam_i
    return alpha_s * x0b + sigma_s * eb - alpha_s * (np.exp(-lam_i) - (1 + h) * np.exp(-lam_s)) * slope


@pytest.fixture(scope="module")
def small():
    return BlurDiffusion(resolution=(8, 6), channels=3, num_steps=40, beta_min=1e-3,
                         beta_max=0.3, sigma_max=0.6)


SHAPE = (3, 3, 8, 6)


@pytest.mark.parametrize("kind,steps,eta", [
    ("reverse_sde", None, 0.0), ("reverse_sde", 9, 0.0), ("ancestral", None, 0.0),
    ("ancestral", 7, 0.0), ("ddim", 7, 0.0), ("ddim", 12, 0.6), ("ddim", None, 1.0),
    ("ddim", 12, eta_first(12, 0.3)),
    ("exp2m", 7, 0.0), ("exp2m", None, 0.0), ("exp2m", 12, eta_first(12, 0.3)),
    # noisy steps inside the run: the step after each one starts the history afresh
    ("exp2m", 10, [0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]),
], ids=lambda v: "first30" if v == eta_first(12, 0.3) else "mixed" if isinstance(v, list) else None)
def test_samplers_equal_reference_formulas(small, kind, steps, eta):
    seq = timesteps(small, steps)
    got = sample(toy_model, small, SHAPE, sampler=kind, steps=steps, eta=eta, seed=7,
                 progress=False, dtype=torch.float64)
    want = reference_run(kind, small, SHAPE, seq, 7, eta)
    # float64 rounding, relative to the largest value (the toy model is no denoiser:
    # its x0 carries 1/sqrt(Abar) ~ 1e4, so values reach ~1e3). Measured 3.5e-15 (7
    # steps) to 2.1e-14 (the 39-step full chains); 1e-13 is ~5x the largest.
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-13 * np.abs(want).max())


@pytest.mark.parametrize("kind,eta", [("ancestral", 0.0), ("ddim", 0.5), ("exp2m", 0.0)])
def test_explicit_spacing_starts_the_prior_at_its_first_step(small, kind, eta):
    # An explicit list of steps overrides steps: the prior is drawn at its first step
    # (30 here), not at N-1 = 39, the first step of every integer `steps`.
    seq = [30, 17, 5]
    got = sample(toy_model, small, SHAPE, sampler=kind, steps=None, spacing=seq, eta=eta,
                 seed=7, progress=False, dtype=torch.float64)
    want = reference_run(kind, small, SHAPE, seq, 7, eta)
    # As in test_samplers_equal_reference_formulas: measured at most 2.1e-15 of the
    # largest value (~39); 1e-13 is that test's bound.
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-13 * np.abs(want).max())


@pytest.mark.parametrize("kind,steps,eta", [("ddim", 7, 0.0), ("ancestral", 5, 0.0),
                                            ("exp2m", 6, 0.0), ("ddim", 6, 1.0)])
def test_clip_to_an_asymmetric_range_equals_reference_formulas(small, kind, steps, eta):
    # clip=(0, 1), the data range of a run with pixel_range "0,1": each step clamps the
    # x0 estimate to [0, 1] (a clamp to [-1, 1] or [-hi, hi] differs: the toy model's x0
    # estimates reach ~1e4, of both signs).
    seq = timesteps(small, steps)
    got = sample(toy_model, small, SHAPE, sampler=kind, steps=steps, eta=eta, seed=7,
                 progress=False, dtype=torch.float64, clip=(0.0, 1.0))
    want = reference_run(kind, small, SHAPE, seq, 7, eta, clip=(0.0, 1.0))
    # The outputs lie near [0, 1], but each step's eps of the clamped x0 divides by
    # sqrt(1 - Abar_i) (0.032 at DC at i = 1) and the earlier steps' values reach ~1e2:
    # measured 2.6e-14 (ddim eta 1) to 1.2e-13 (exp2m) absolute; 1e-12 is ~8x the largest.
    np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


def test_clip_x0_clamps_the_estimate_to_an_asymmetric_range(small):
    # clip_x0(model, diff, 0, 1) gives the eps whose x0 estimate is the model's clamped to
    # [0, 1]: an x0 recomputed from it here (float64, the conversion of docs/process.md
    # section 5) equals np.clip of the model's own, values inside [0, 1] unchanged.
    from blurfast.sampling import clip_x0
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(SHAPE, generator=g, dtype=torch.float64) * 2 - 0.5     # [-0.5, 1.5]
    t = torch.tensor([3, 20, 30])
    x_t, eps = small.q_sample(x0, t, seed=1)
    clipped = clip_x0(lambda x, tt: eps, small, 0.0, 1.0)(x_t, t)

    def x0_of(e):
        ab = np.exp(small.log_abar(t).numpy())[:, None]
        return idct2((dct2(x_t.numpy()) - np.sqrt(1 - ab) * dct2(e.numpy())) / np.sqrt(ab))
    before = x0_of(eps)
    assert (before < -0.2).any() and (before > 1.2).any()         # out of range both ways
    # Two float64 conversions, each dividing by sqrt(Abar) (>= 0.034 here) or sqrt(1 - Abar):
    # measured 2.5e-14; 3e-13 is ~12x.
    np.testing.assert_allclose(x0_of(clipped), np.clip(before, 0, 1), rtol=0, atol=3e-13)


def test_float32_samplers_follow_float64(small):
    for kind in ("reverse_sde", "ancestral", "ddim", "exp2m"):
        a = sample(toy_model, small, SHAPE, sampler=kind, steps=10, seed=1, progress=False)
        b = sample(toy_model, small, SHAPE, sampler=kind, steps=10, seed=1, progress=False,
                   dtype=torch.float64)
        assert a.dtype == torch.float32
        # float32 rounding over 10 steps, relative to the largest value: each step rounds
        # x, eps, the cast coefficient maps and the DCT sums, ~5 roundings of u = 6e-8
        # of the step's largest term, so at most ~10 x 5 x 6e-8 = 3e-6 by the end.
        # Measured 0.8e-6 (reverse_sde) to 1.6e-6 (exp2m).
        assert (a.double() - b).abs().max() < 3e-6 * b.abs().max()


def test_sigma_max_zero_ancestral_is_ddpm():
    # DDPM (Ho et al.) written in pixel space: with f = 0 every map is a scalar and the
    # pixel noise is idct2 of the op's frequency noise.
    n_steps = 50
    d = BlurDiffusion(resolution=8, channels=3, num_steps=n_steps, beta_min=1e-3,
                      beta_max=0.25, sigma_max=0.0)
    beta = np.linspace(1e-3, 0.25, n_steps)
    alpha = 1 - beta
    abar = np.cumprod(alpha)                           # abar[t-1] is alpha_bar_t
    shape = (4, 3, 8, 8)
    x = math.sqrt(1 - abar[n_steps - 2]) * idct2(zb(shape, 5, 0))
    for k, t in enumerate(range(n_steps - 1, 0, -1), start=1):
        e = toy_model(torch.tensor(x), torch.full((4,), t)).numpy()
        x = (x - beta[t - 1] / math.sqrt(1 - abar[t - 1]) * e) / math.sqrt(alpha[t - 1])
        if t > 1:
            var = (1 - abar[t - 2]) / (1 - abar[t - 1]) * beta[t - 1]
            x = x + math.sqrt(var) * idct2(zb(shape, 5, k))
    got = sample(toy_model, d, shape, sampler="ancestral", steps=None, seed=5, progress=False,
                 dtype=torch.float64)
    np.testing.assert_allclose(got.numpy(), x, rtol=0, atol=1e-12 * np.abs(x).max())


def test_ancestral_is_ddim_with_eta_one(small):
    seq = timesteps(small, 11)
    x = small.prior_sample(SHAPE, seq[0], seed=2, dtype=torch.float64)
    a = ancestral(toy_model, small, x, seq, seed=2, progress=False)
    b = ddim(toy_model, small, x, seq, eta=1.0, seed=2, progress=False)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-11)
    # numpy's numbers are numbers too
    c = ddim(toy_model, small, x, seq, eta=np.float32(1.0), seed=2, progress=False)
    assert torch.equal(b, c)


# ---------------------------------------------------------------- exp2m
def gaussian_flow_error(diff, sampler, steps):
    """Mean error against the exact probability-flow map for Gaussian data N(mu, diag v):
    per coefficient x0 = mu + sqrt(v / (Abar v + 1 - Abar)) (x_T - sqrt(Abar) mu)."""
    gen = torch.Generator().manual_seed(0)
    c, h, w = diff.shape
    mub = 3 * torch.randn(1, c, h, w, dtype=torch.float64, generator=gen)
    v = 0.01 + torch.rand(1, c, h, w, dtype=torch.float64, generator=gen)
    o = GaussianMixtureOracle(diff, scipy.fft.idctn(mub.numpy(), axes=(-2, -1), norm="ortho"), v)
    seq = timesteps(diff, steps, "quadratic")
    x = diff.prior_sample((8, c, h, w), seq[0], seed=3, dtype=torch.float64)
    out = sample(o, diff, (8, c, h, w), sampler=sampler, steps=steps, spacing="quadratic",
                 progress=False, x_init=x)
    ab = torch.exp(diff.log_abar(torch.tensor([seq[0]])))[0]
    xb = torch.tensor(dct2(x.numpy()))
    want = mub + torch.sqrt(v / (ab * v + 1 - ab)) * (xb - torch.sqrt(ab) * mub)
    return (torch.tensor(dct2(out.numpy())) - want).abs().mean().item()


def test_exp2m_is_second_order_and_ddim_first_order():
    # Quadratic spacing: with uniform steps in t the last steps stay long in lambda
    # (h ~ log(t_prev / t)), which delays the asymptotic order.
    d = BlurDiffusion(resolution=8, channels=3, num_steps=1000)
    e = {(s, k): gaussian_flow_error(d, s, k) for s in ("ddim", "exp2m") for k in (20, 40, 80)}
    ddim_order = math.log2(e["ddim", 40] / e["ddim", 80])
    exp2m_order = math.log2(e["exp2m", 40] / e["exp2m", 80])
    print(f"\nGaussian flow mean error: {e}; order ddim {ddim_order:.2f}, exp2m {exp2m_order:.2f}")
    assert 0.7 < ddim_order < 1.3
    assert exp2m_order > 1.7
    assert all(e["exp2m", k] < e["ddim", k] / 5 for k in (20, 40, 80))


# ------------------------------------------------------------ timesteps
def test_timesteps():
    d = BlurDiffusion(resolution=4, channels=1, num_steps=1000)
    assert timesteps(d) == list(range(999, 0, -1))
    for spacing in ("uniform", "quadratic"):
        for k in (1, 2, 10, 250, 999):
            seq = timesteps(d, k, spacing)
            assert len(seq) == k and seq[0] == 999 and (k == 1 or seq[-1] == 1)
            assert all(a > b for a, b in zip(seq, seq[1:]))
    assert timesteps(d, 4, "uniform") == [999, 666, 334, 1]    # round(1 + 998 k/3)
    q = timesteps(d, 10, "quadratic")
    assert q == [round(1 + 998 * (j / 9) ** 2) for j in range(9, -1, -1)]
    assert timesteps(d, spacing=[900, 500, 20]) == [900, 500, 20]
    assert eta_first(10, 0.3) == [1.0] * 3 + [0.0] * 7


def test_step_lists_refuse_non_integers_and_take_every_kind_of_int(small):
    # A float step (5.0 as much as 5.7, or a float tensor), or a bool, is refused naming
    # the argument: spacing of timesteps, timesteps of a sampler (not t, an argument the
    # caller never gave). Python and numpy ints and 1-D integer tensors are read as the
    # same steps: the same list, the same images. A repeated step, and a 0-d tensor (not
    # a list of steps), are refused too.
    x = small.prior_sample(SHAPE, 7, seed=1)
    for bad in ([7.0, 4, 1], [7.5, 4, 1], np.array([7.0, 4.0, 1.0]),
                torch.tensor([7.0, 4.0, 1.0]), [True], torch.tensor([[7, 4, 1]]),
                torch.tensor(7), [7, 7, 1], torch.tensor([7, 4, 4])):
        with pytest.raises(ValueError, match=r"^spacing: expected strictly decreasing "
                                             r"integer steps"):
            timesteps(small, spacing=bad)
        with pytest.raises(ValueError, match=r"^timesteps: expected strictly decreasing "
                                             r"integer steps"):
            ddim(toy_model, small, x, bad, progress=False)
    want = ddim(toy_model, small, x, [7, 4, 1], progress=False)
    for good in ((7, 4, 1), [np.int64(7), np.int32(4), 1], np.array([7, 4, 1]),
                 torch.tensor([7, 4, 1])):
        seq = timesteps(small, spacing=good)
        assert seq == [7, 4, 1] and all(type(s) is int for s in seq)
        assert torch.equal(ddim(toy_model, small, x, good, progress=False), want)


def test_eta_first_rounds_a_fractional_count_of_steps_up():
    # ceil(fraction * steps) stochastic steps, counted by hand: 0.3 * 12 = 3.6 -> 4,
    # 0.5 * 7 = 3.5 -> 4; where the product is a whole number in exact arithmetic but
    # not in binary (0.28 * 25 = 7.000000000000001) it is that number, 7, not 8.
    assert eta_first(12, 0.3) == [1.0] * 4 + [0.0] * 8
    assert eta_first(7, 0.5, 0.4) == [0.4] * 4 + [0.0] * 3
    assert 0.28 * 25 > 7 and eta_first(25, 0.28) == [1.0] * 7 + [0.0] * 18
    assert eta_first(5, 0.01) == [1.0] + [0.0] * 4
    assert eta_first(5, 0.0) == [0.0] * 5 and eta_first(5, 1.0) == [1.0] * 5


def test_same_seed_same_images(small):
    for kind in ("reverse_sde", "ancestral", "ddim", "exp2m"):
        kw = dict(sampler=kind, steps=8, eta=0.5 if kind in ETA_SAMPLERS else 0.0,
                  progress=False)
        a = sample(toy_model, small, SHAPE, seed=3, **kw)
        b = sample(toy_model, small, SHAPE, seed=3, **kw)
        c = sample(toy_model, small, SHAPE, seed=4, **kw)
        assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kind", ["reverse_sde", "ancestral"])
def test_an_eta_the_sampler_has_not_is_an_error(small, kind, tmp_path, capsys):
    # These samplers have no eta: one given was ignored (the same images as without).
    x = small.prior_sample(SHAPE, 7, seed=1)
    plain = SAMPLERS[kind](toy_model, small, x, [7, 4, 1], seed=2, progress=False)
    zeros = SAMPLERS[kind](toy_model, small, x, [7, 4, 1], eta=[0.0] * 3, seed=2,
                           progress=False)
    assert torch.equal(plain, zeros)
    for eta in (0.5, eta_first(3, 0.3)):
        with pytest.raises(ValueError, match=f"^eta: only ddim and exp2m take it, not {kind}"):
            sample(toy_model, small, SHAPE, sampler=kind, steps=3, eta=eta, progress=False)
        with pytest.raises(ValueError, match=f"^eta: only ddim and exp2m take it, not {kind}"):
            SAMPLERS[kind](toy_model, small, x, [7, 4, 1], eta=eta, progress=False)
    from blurfast import cli
    base = ["sample", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
            "--sampler", kind]
    for flag in ("--eta", "--stochastic-first"):
        assert cli.main(base + [flag, "0.3"]) == 2
        assert capsys.readouterr().err == (f"blurfast sample: error: {flag}: only ddim and "
                                           f"exp2m take it, not {kind}; got 0.3\n")
    assert not (tmp_path / "out").exists()


def test_cli_stochastic_first_then_eta(tmp_path, monkeypatch):
    # docs/training.md: --stochastic-first F is eta = 1 on the first ceil(F * steps) steps,
    # then --eta. 10 steps, F = 0.3: 3 steps at 1, then 7 at --eta (0.2, or 0 by default).
    from blurfast import checkpoint, cli, generate as G
    got = {}
    monkeypatch.setattr(G, "generate", lambda *a, **kw: got.update(kw))
    # a run of N = 1000 without one: sample reads the checkpoint's N before generate
    monkeypatch.setattr(G, "resolve_checkpoint", lambda p: p)
    monkeypatch.setattr(checkpoint, "stored_config",
                        lambda p: {"diffusion": {"num_steps": 1000}})
    base = ["sample", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
            "--sampler", "ddim", "--steps", "10", "--stochastic-first", "0.3"]
    assert cli.main(base + ["--eta", "0.2"]) == 0
    assert got["eta"] == [1.0] * 3 + [0.2] * 7
    assert cli.main(base) == 0
    assert got["eta"] == [1.0] * 3 + [0.0] * 7


def test_cli_stochastic_first_out_of_range_names_the_flag(tmp_path, capsys):
    from blurfast import cli
    assert cli.main(["sample", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "out"),
                     "--stochastic-first", "1.5"]) == 2
    assert capsys.readouterr().err == ("blurfast sample: error: --stochastic-first: expected "
                                       "a fraction in [0, 1], got 1.5\n")


def test_callback_sees_every_step_and_x0_hat(small):
    seen = []
    sample(toy_model, small, SHAPE, sampler="ddim", steps=6, seed=0, progress=False,
           callback=lambda i, x, x0: seen.append((i, x.clone(), x0.clone())))
    assert [i for i, _, _ in seen] == timesteps(small, 6)
    for i, x, x0 in seen:
        t = torch.full((3,), i)
        torch.testing.assert_close(x0, small.eps_to_x0(x, toy_model(x, t), t))


def test_the_step_loop_with_clip_and_callback_never_checks_t(small, monkeypatch):
    # check_t reads t back to the host: on a GPU, a synchronization. The setup may check;
    # the loop (model, clip, callback, update) must not, so the count of checks is the
    # same for 2 steps and for 6.
    calls = []
    check = small.check_t
    monkeypatch.setattr(small, "check_t", lambda *a, **k: (calls.append(1), check(*a, **k))[1])

    def checks(steps):
        calls.clear()
        sample(toy_model, small, SHAPE, sampler="ddim", steps=steps, seed=0, progress=False,
               clip=(-1, 1), callback=lambda i, x, x0: None)
        return len(calls)
    assert checks(2) == checks(6)


def test_bad_arguments(small):
    kw = dict(progress=False)
    with pytest.raises(ValueError, match="sampler"):
        sample(toy_model, small, SHAPE, sampler="euler", steps=5, **kw)
    with pytest.raises(ValueError, match="steps"):
        sample(toy_model, small, SHAPE, steps=40, **kw)
    with pytest.raises(ValueError, match="steps"):
        sample(toy_model, small, SHAPE, steps=0, **kw)
    with pytest.raises(ValueError, match="spacing"):
        sample(toy_model, small, SHAPE, steps=5, spacing="cosine", **kw)
    with pytest.raises(ValueError, match="spacing"):
        sample(toy_model, small, SHAPE, spacing=[5, 10], **kw)
    with pytest.raises(ValueError, match="spacing"):
        sample(toy_model, small, SHAPE, spacing=[50, 10], **kw)
    with pytest.raises(ValueError, match="eta"):
        sample(toy_model, small, SHAPE, steps=5, eta=1.5, **kw)
    with pytest.raises(ValueError, match="eta"):
        sample(toy_model, small, SHAPE, steps=5, eta=[0.0] * 4, **kw)
    with pytest.raises(ValueError, match="shape"):
        sample(toy_model, small, (3, 3, 8, 8), steps=5, **kw)
    with pytest.raises(ValueError, match="model"):
        sample(lambda x, t: x[:, :1], small, SHAPE, steps=5, **kw)
    with pytest.raises(ValueError, match="x_init"):
        sample(toy_model, small, SHAPE, steps=5, x_init=torch.zeros(2, 3, 8, 6), **kw)


@pytest.mark.parametrize("kw, words", [
    # (1, -1) made every sample NaN, (-1,) was read as (-1, 1), 5 was a raw unpacking error
    (dict(clip=(1.0, -1.0)), "clip: expected lo < hi, got (1.0, -1.0)"),
    (dict(clip=(0.5, 0.5)), "clip: expected lo < hi"),
    (dict(clip=(float("nan"), 1.0)), "clip: expected a finite number, got nan"),
    (dict(clip=(-1.0, float("inf"))), "clip: expected a finite number, got inf"),
    (dict(clip=(-1.0,)), "clip: expected None or a pair (lo, hi)"),
    (dict(clip=5), "clip: expected None or a pair (lo, hi) of finite numbers, got 5"),
    (dict(clip=("a", 1)), "clip: expected a finite number, got 'a'"),
    # 1.5 was truncated to 1, 'a' gave int()'s error
    (dict(seed=1.5), "seed: expected an int >= 0, got 1.5"),
    (dict(seed="a"), "seed: expected an int >= 0, got 'a'"),
    (dict(seed=-1), "seed: expected an int >= 0, got -1"),
    (dict(seed=1.5, x_init=torch.zeros(SHAPE), sampler="ancestral"), "seed: expected an int"),
])
def test_bad_clip_and_seed_are_named(small, kw, words):
    with pytest.raises(ValueError) as e:
        sample(toy_model, small, SHAPE, steps=5, progress=False, **kw)
    assert str(e.value).startswith(words), e.value


@pytest.mark.parametrize("kw, words", [
    (dict(offset=-5, eta=1.0), "offset: expected an int in [0, "),    # was accepted
    (dict(offset=2 ** 63 - 1, eta=1.0), "offset: expected an int in [0, "),  # past the op's
    (dict(offset=0.5), "offset: expected an int"),
    (dict(seed=2.7, eta=1.0), "seed: expected an int >= 0, got 2.7"),
])
def test_sampler_functions_check_seed_and_offset(small, kw, words):
    x, calls = small.prior_sample(SHAPE), []

    def model(x, t):
        calls.append(t)
        return toy_model(x, t)
    with pytest.raises(ValueError) as e:
        ddim(model, small, x, [30, 20, 10], progress=False, **kw)
    assert str(e.value).startswith(words), e.value
    assert not calls                                  # before the first model call


def test_clip_x0_checks_its_range_and_takes_numpy_numbers(small):
    from blurfast.sampling import clip_x0
    with pytest.raises(ValueError, match=r"^clip: expected lo < hi, got \(1, -1\)"):
        clip_x0(toy_model, small, 1, -1)
    x = small.prior_sample(SHAPE, seed=np.int64(3))             # numpy ints are seeds too
    got = sample(toy_model, small, SHAPE, steps=5, progress=False, x_init=x,
                 clip=(np.float32(-1), np.float64(1)))
    want = sample(toy_model, small, SHAPE, steps=5, progress=False, x_init=x, clip=(-1, 1))
    assert torch.equal(got, want)


# ------------------------------------------------------------ on the oracle
@pytest.fixture(scope="module")
def oracle_setup():
    # The paper's process; component variances >= 0.2, where the samplers' own variance
    # loss on low-variance coefficients (their last steps output posterior means) stays
    # below 2% (ancestral, 999 steps), well inside the statistical tolerance below.
    d = BlurDiffusion(resolution=16, channels=3, num_steps=1000)
    return d, example_oracle(d, floor=0.2)


def moment_z_scores(oracle, x):
    """Largest |z| of the component weights (binomial) and of each DCT coefficient's
    mean and variance (standard errors from the mixture's own second/fourth moments)."""
    n = x.shape[0]
    lab = oracle.responsibilities(x, torch.zeros(n, dtype=torch.int64)).argmax(1)
    w = oracle.weights.numpy()
    w_hat = np.bincount(lab.numpy(), minlength=len(w)) / n
    zw = np.abs(w_hat - w) / np.sqrt(w * (1 - w) / n)
    xb = dct2(x.double().numpy())
    m, var, m4 = (a.numpy() for a in oracle.coef_moments())
    zm = np.abs(xb.mean(0) - m) / np.sqrt(var / n)
    zv = np.abs(xb.var(0) - var) / np.sqrt((m4 - var ** 2) / n)
    return zw.max(), zm.max(), zv.max()


FIRST30 = "first30"       # eta = 1 on the first 30% of the steps (scripts/oracle_fid.py)
ORACLE_CASES = [
    # sampler, steps (None: full chain), spacing, eta, samples. On this mixture the
    # samplers' own variance bias is at most 3% (ancestral, 250 quadratic steps), a third
    # of a standard error at these sample sizes.
    ("ddim", 250, "quadratic", 0.0, 500),
    ("exp2m", 100, "quadratic", FIRST30, 1000),
    ("reverse_sde", 250, "quadratic", 0.0, 300),
    ("ancestral", 250, "quadratic", 0.0, 300),
    pytest.param("reverse_sde", None, "uniform", 0.0, 2000, marks=pytest.mark.slow),
    pytest.param("ancestral", None, "uniform", 0.0, 2000, marks=pytest.mark.slow),
    pytest.param("ddim", None, "uniform", 0.0, 2000, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("kind,steps,spacing,eta,n", ORACLE_CASES)
def test_samplers_match_the_mixture(oracle_setup, kind, steps, spacing, eta, n):
    d, o = oracle_setup
    nsteps = len(timesteps(d, steps, spacing))
    eta = eta_first(nsteps, 0.3) if eta == FIRST30 else eta
    x = sample(o, d, (n,) + d.shape, sampler=kind, steps=steps, spacing=spacing, eta=eta,
               seed=11, progress=False)
    zw, zm, zv = moment_z_scores(o, x)
    fd_exact = o.frechet_distance(o.sample(n, seed=12).float())
    print(f"\n{kind} ({nsteps} calls, {spacing}, n={n}): FD {o.frechet_distance(x):.3f} "
          f"(exact draws {fd_exact:.3f}); max |z|: weights {zw:.1f}, means {zm:.1f}, "
          f"variances {zv:.1f}")
    # 5 sigma on 3 weights and on 768 means and variances each (false alarm < 1e-3).
    assert zw < 5 and zm < 5 and zv < 5


def test_fd_table_small():
    """A cheap version of scripts/oracle_fid.py (the same image-like mixture, 100
    samples): prints the Fréchet distances, as a table only. At this size the distance
    is dominated by its finite-sample bias (exact draws score 17.1, above every sampler:
    losing variance lowers the bias), so nothing is asserted on it; the oracle's
    moments and Fréchet distance are tested in test_oracle.py. The check is on a
    statistic that is not biased so: the fraction of the high-frequency variance a
    sampler keeps, which must grow with every increase in steps."""
    d = BlurDiffusion(resolution=16, channels=3, num_steps=1000)
    o = example_oracle(d)
    n = 100
    _, var, _ = o.coef_moments()
    k = np.add.outer(np.arange(16), np.arange(16)) >= 16

    def kept(x):
        return float(np.mean(dct2(x.double().numpy()).var(0)[:, k] / var.numpy()[:, k]))

    fd, keep = {}, {}
    x = o.sample(n, seed=3).float()
    fd["exact", 0], keep["exact", 0] = o.frechet_distance(x), kept(x)
    for kind in ("ddim", "ancestral"):
        for st in (10, 25, 50, 100, 250):
            x = sample(o, d, (n,) + d.shape, sampler=kind, steps=st, seed=4, progress=False)
            fd[kind, st], keep[kind, st] = o.frechet_distance(x), kept(x)
    print(f"\nn={n}: " + ", ".join(f"{k} {s}: FD {fd[k, s]:.2f}, HF variance kept {keep[k, s]:.2f}"
                                  for k, s in fd))
    # Measured kept: ddim 0.13, 0.39, 0.63, 0.79, 0.91; ancestral 0.08, 0.29, 0.48, 0.64,
    # 0.82 (exact draws 0.98). Each gap (>= 0.12) is many times the sampling error of an
    # average over 360 coefficients (~0.14 / sqrt(360) = 0.007 if they were independent).
    steps = (10, 25, 50, 100, 250)
    for kind in ("ddim", "ancestral"):
        assert all(keep[kind, a] < keep[kind, b] for a, b in zip(steps, steps[1:]))
        assert keep[kind, 250] < keep["exact", 0] + 0.05


# ------------------------------------------------------------ variations (SDEdit)
@pytest.mark.parametrize("start", [150, 600])
def test_variations_keep_the_data_distribution_and_more_of_x0_the_earlier_they_start(
        oracle_setup, start):
    # Exact draws x0 of the mixture, taken forward to `start` and run back with the exact
    # model: x_start is then an exact draw of the process at `start`, so the run back
    # ends on the data's distribution (the same moment z-scores as sampling from the
    # prior), while each image keeps what the process kept of it: its component, nearly
    # always from step 150 (measured 1.000), less often from 600 (0.884; 5 standard
    # errors above 0.8). Chance agreement: the sum of the squared weights, 0.39.
    d, o = oracle_setup
    from blurfast.sampling import variations
    x0, labels = o.sample(500, seed=21, return_labels=True)
    x = variations(o, d, x0.float(), start, sampler="ddim", steps=60, spacing="quadratic",
                   seed=22, progress=False)
    zw, zm, zv = moment_z_scores(o, x)
    assert zw < 5 and zm < 5 and zv < 5
    kept = (o.responsibilities(x, torch.zeros(500, dtype=torch.int64)).argmax(1)
            == labels).double().mean().item()
    chance = float((o.weights ** 2).sum())
    print(f"\nstart {start}: component kept {kept:.3f} (chance {chance:.2f})")
    assert chance < 0.5 and kept > (0.97 if start == 150 else 0.8)


def test_variations_are_seeded_per_image_and_start_where_asked(small):
    # The first state is q_sample(x0, start) at the images' Philox offsets; a run on a
    # slice at its offset gives that slice of the whole batch's run; steps from `start`.
    from blurfast.sampling import variations
    g = torch.Generator().manual_seed(5)
    x0 = torch.rand((3,) + small.shape, generator=g) * 2 - 1
    chw = x0[0].numel()
    seen = []
    out = variations(toy_model, small, x0, 7, sampler="ddim", steps=4, seed=3, progress=False,
                     callback=lambda i, x, x0_hat: seen.append((i, x.clone())))
    assert [i for i, _ in seen] == timesteps(small, 4, start=7) == [7, 5, 3, 1]
    t = torch.full((3,), 7, dtype=torch.int64)
    assert torch.equal(seen[0][1], small.q_sample(x0, t, seed=3)[0])
    part = variations(toy_model, small, x0[1:], 7, steps=4, seed=3, offset=chw,
                      progress=False)
    torch.testing.assert_close(part, out[1:], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"^start: expected an int in \[1, "):
        variations(toy_model, small, x0, small.num_steps, progress=False)
    with pytest.raises(ValueError, match=r"^steps: expected an int in \[1, 7\]"):
        variations(toy_model, small, x0, 7, steps=8, progress=False)


def test_variations_refuse_a_bad_seed_or_offset_as_the_sampler_would_before_any_draw(small):
    # The run back takes a seed >= 0 (not None) and an offset whose last step's noise,
    # at offset + S * STEP_OFFSET, stays below the op's limit: both are refused in those
    # words before q_sample draws (seed None would draw from torch's generator first).
    from blurfast.sampling import variations
    x0 = torch.zeros((2,) + small.shape)
    state = torch.get_rng_state()
    with pytest.raises(ValueError, match=r"^seed: expected an int >= 0, got None$"):
        variations(toy_model, small, x0, 7, steps=4, seed=None, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError, match=r"^seed: expected an int >= 0, got -1$"):
        variations(toy_model, small, x0, 7, steps=4, seed=-1, progress=False)
    top = ops._SEED_LIMIT - 1 - 4 * STEP_OFFSET
    assert torch.isfinite(variations(toy_model, small, x0, 7, steps=4, offset=top,
                                     progress=False)).all()
    for bad in (-1, top + 1):
        with pytest.raises(ValueError, match=rf"^offset: expected an int in \[0, {top}\], "
                                             rf"got {bad}$"):
            variations(toy_model, small, x0, 7, steps=4, offset=bad, progress=False)
