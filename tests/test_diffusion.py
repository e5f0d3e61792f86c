"""BlurDiffusion against float64 formulas written here from docs/process.md sections 3-5 (numpy/scipy)."""
import math
import warnings

import numpy as np
import pytest
import scipy.fft
import scipy.ndimage
import torch

from blurfast.diffusion import BlurDiffusion, scales
from bfutil import dct2, idct2

H, W, C, N = 16, 12, 3, 1000
# The floor on the blur eigenvalues, as docs/process.md section 2 states it (written
# here, not read from blurfast.schedules: the truth must not follow the code).
DOC_EIG_FLOOR = 1e-3


def eig1d(n, sigma):
    """Eigenvalues of scipy's reflect-mode 1-D Gaussian filter in the DCT-II basis."""
    g = scipy.ndimage.gaussian_filter1d(np.eye(n), sigma, axis=0, mode="reflect")
    c = scipy.fft.dct(np.eye(n), axis=0, norm="ortho")
    m = c @ g @ c.T
    assert np.abs(m - np.diag(np.diag(m))).max() < 1e-12    # diagonal in this basis
    return np.diag(m)


def blur_d(h, w, sigma, coarse_to_fine=True):
    """The unfloored (H, W) map d of docs/process.md section 2 (1 - d fine-to-coarse)."""
    d = np.outer(eig1d(h, sigma), eig1d(w, sigma))
    return d if coarse_to_fine else 1 - d


def log_abar_truth(h=H, w=W, n=N, beta=(1e-4, 0.02), sigma=0.4, smax=0.15,
                   coarse_to_fine=True):
    """(N+1, H, W) log Abar for the linear noise and quartic blur schedules.

    log1p: log(1 - beta) of beta = 1e-4 computed as np.log(1 - beta) carries a relative
    error of u / beta ~ 1e-12 from rounding 1 - beta, which would set the tolerance."""
    la = np.concatenate([[0.0], np.cumsum(np.log1p(-np.linspace(*beta, n)))])
    i = np.arange(1, n + 1)
    f = (smax / sigma) ** 2 * (i / n) ** 4
    F = np.concatenate([[0.0], np.cumsum(f)])
    d = np.clip(blur_d(h, w, sigma, coarse_to_fine), DOC_EIG_FLOOR, 1)
    return la[:, None, None] + 2 * F[:, None, None] * np.log(d)


@pytest.fixture(scope="module")
def diff():
    return BlurDiffusion(resolution=(H, W), channels=C, num_steps=N)


def test_config_round_trip():
    for kw in [dict(), dict(resolution=(8, 12), channels=1, num_steps=50,
                            noise_schedule="cosine", blur_schedule="log", sigma=0.5,
                            sigma_min=0.01, sigma_max=0.3, kernel="continuous",
                            coarse_to_fine=False),
               dict(noise_schedule="exp", blur_schedule="triangular", sigma_max=0.0)]:
        d = BlurDiffusion(**kw)
        cfg = d.config
        assert isinstance(cfg, dict)
        d2 = BlurDiffusion(**cfg)
        assert d2.config == cfg and d2 == d
        torch.testing.assert_close(d2.log_abar(torch.arange(0, d.num_steps + 1, 7)),
                                   d.log_abar(torch.arange(0, d.num_steps + 1, 7)),
                                   rtol=0, atol=0)
        for k, v in kw.items():
            assert cfg[k] == v


def test_log_abar_equals_definition(diff):
    t = torch.tensor([0, 1, 2, 10, 500, 999, 1000])
    got = diff.log_abar(t)
    assert got.dtype == torch.float64 and got.shape == (len(t), H, W)
    # Measured max relative error 4.4e-15 (both sides sum 1000 logs; the truth's eigenvalues
    # come from scipy's filter matrix): 5e-14 is about 10x that. Step 0 is exactly 0.
    np.testing.assert_allclose(got.numpy(), log_abar_truth()[t.numpy()], rtol=5e-14, atol=0)


@pytest.mark.parametrize("kw", [dict(coarse_to_fine=False), dict(sigma=2.5)],
                         ids=["fine_to_coarse", "sigma2.5"])
def test_log_abar_where_the_eigenvalue_floor_binds(kw):
    # At the default sigma 0.4 every d is above 0.7: the floor never acts there. Here it
    # does: 1 - d is 0 at DC (fine-to-coarse), and at sigma 2.5 the high frequencies
    # of d are far below 1e-3 (or round to <= 0). The truth floors at the documented 1e-3.
    sigma = kw.get("sigma", 0.4)
    d = blur_d(H, W, sigma, kw.get("coarse_to_fine", True))
    assert (d < DOC_EIG_FLOOR).sum() >= 1 and (d > DOC_EIG_FLOOR).sum() >= 1
    diff = BlurDiffusion(resolution=(H, W), channels=C, num_steps=N, **kw)
    t = torch.tensor([0, 1, 10, 500, 1000])
    want = log_abar_truth(**kw)[t.numpy()]
    got = diff.log_abar(t).numpy()
    # Measured max relative error 7.6e-14 fine-to-coarse, 1e-15 at sigma 2.5: 1 - d
    # cancels where d is near 1 (smallest 1 - d above the floor: 1.55e-3), so the ~1e-16
    # rounding of d is a relative 7e-14 in log(1 - d). 5e-13 is ~7x the measured error.
    np.testing.assert_allclose(got, want, rtol=5e-13, atol=0)


def test_log_abar_is_the_product_of_steps(diff):
    # Abar_i = prod_{j<=i} A_j with the one-step A_j = (1 - beta_j) d^(2 f(j)).
    la = torch.cumsum(diff.log_a(torch.arange(1, N + 1)), 0)
    # Two float64 sums of up to 1000 terms (values up to 30): measured 3.9e-14 absolute,
    # 1.6e-15 relative; 2e-14 relative is ~10x.
    torch.testing.assert_close(la[[0, 99, 999]], diff.log_abar(torch.tensor([1, 100, 1000])),
                               rtol=2e-14, atol=0)


def test_memory_is_o_n_plus_hw():
    d = BlurDiffusion(resolution=64, num_steps=1000)
    sizes = [v.numel() for v in vars(d).values() if isinstance(v, torch.Tensor)]
    assert max(sizes) <= max(1001, 64 * 64)
    assert sum(sizes) <= 10 * (1001 + 64 * 64)


def test_q_sample_given_noise_equals_formula(diff):
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, (5, C, H, W))
    eps = rng.standard_normal((5, C, H, W))
    t = np.array([1, 7, 300, 999, 1000])
    lab = log_abar_truth()[t][:, None]
    want = idct2(np.exp(lab / 2) * dct2(x0) + np.sqrt(1 - np.exp(lab)) * dct2(eps))
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        e = torch.tensor(eps, dtype=dtype)
        xt, e_out = diff.q_sample(torch.tensor(x0, dtype=dtype), torch.tensor(t), noise=e)
        assert e_out is e and xt.dtype == dtype
        np.testing.assert_allclose(xt.double().numpy(), want, rtol=0, atol=tol)


def test_q_sample_generated_noise_is_the_returned_eps(diff):
    x0 = torch.rand(4, C, H, W, dtype=torch.float64) * 2 - 1
    t = torch.tensor([3, 30, 300, 1000])
    xt, eps = diff.q_sample(x0, t, seed=11)
    xt2, _ = diff.q_sample(x0, t, noise=eps)
    torch.testing.assert_close(xt, xt2, rtol=0, atol=1e-12)
    xt3, eps3 = diff.q_sample(x0, t, seed=11)
    assert torch.equal(xt3, xt) and torch.equal(eps3, eps)
    assert not torch.equal(diff.q_sample(x0, t, seed=12)[1], eps)


def test_prior_sample_defaults_to_step_n_minus_1_and_equals_its_formula(diff):
    # docs/process.md section 6: the samplers start at step N-1 from the prior
    # x_{N-1} = idct2(sqrt(1 - Abar_{N-1}) zb), zb the op's Philox normals at (seed, offset).
    # A default of N moves the draw by 2.3e-7 here (1 - Abar_{N-1} and 1 - Abar_N differ
    # by ~1e-6 at DC), far above float64 rounding.
    from blurfast.reference import philox_normal
    shape = (2, C, H, W)
    lab = log_abar_truth()
    # A tensor of steps: one per sample (each sample's own map, not the first's).
    for t, offset in ((None, 0), (None, 5), (300, 0), (torch.tensor([300, 20]), 0)):
        got = diff.prior_sample(shape, t, seed=9, offset=offset, dtype=torch.float64)
        z = philox_normal(shape, 9, offset, torch.float64).numpy()
        steps = N - 1 if t is None else t.numpy()[:, None] if torch.is_tensor(t) else t
        want = idct2(np.sqrt(-np.expm1(lab[steps])) * z)
        # One scaled idct2 in float64: measured 1.9e-15 at |x| up to 3.6; 1e-14 is ~5x.
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("step", [50, 400, 900])
def test_q_sample_per_frequency_moments(diff, step):
    # n draws of x_t for one fixed x0: per coefficient the mean is sqrt(Abar) xb0 and
    # the variance 1 - Abar. 5-sigma bounds on each of the C*H*W coefficients (a false
    # alarm anywhere has probability < 4e-4 per test).
    n = 4000
    x0 = torch.rand(1, C, H, W, dtype=torch.float64) * 2 - 1
    t = torch.full((n,), step)
    xt, _ = diff.q_sample(x0.expand(n, -1, -1, -1), t, seed=step)
    xb = dct2(xt.numpy())
    abar = np.exp(log_abar_truth()[step])
    mean_err = (xb.mean(0) - np.sqrt(abar) * dct2(x0.numpy())[0]) / np.sqrt((1 - abar) / n)
    assert np.abs(mean_err).max() < 5
    var_err = (xb.var(0, ddof=1) / (1 - abar) - 1) / math.sqrt(2 / (n - 1))
    assert np.abs(var_err).max() < 5


def test_variance_preserving_for_unit_variance_data(diff):
    # x0 with iid N(0, 1) pixels has unit-variance DCT coefficients, and so has x_t.
    n = 3000
    x0 = torch.randn(n, C, H, W, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([1, 200, 600, 1000]).repeat_interleave(n // 4)
    xt, _ = diff.q_sample(x0, t, seed=3)
    for k in range(4):
        xb = dct2(xt[k * n // 4:(k + 1) * n // 4].numpy())
        m = n // 4
        z = (xb.var(0, ddof=1) - 1) / math.sqrt(2 / (m - 1))
        assert np.abs(z).max() < 5


def test_sigma_max_zero_is_ddpm():
    d = BlurDiffusion(resolution=8, channels=3, num_steps=N, sigma_max=0.0)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, N))
    t = np.array([1, 10, 100, 999, 1000])
    # cumprod against exp(cumsum(log)): measured 2.7e-15 relative; 3e-14 is ~10x.
    np.testing.assert_allclose(np.exp(d.log_abar(torch.tensor(t)).numpy()),
                               np.broadcast_to(abar[t - 1][:, None, None], (5, 8, 8)),
                               rtol=3e-14, atol=0)
    rng = np.random.default_rng(1)
    x0, eps = rng.uniform(-1, 1, (5, 3, 8, 8)), rng.standard_normal((5, 3, 8, 8))
    want = np.sqrt(abar[t - 1])[:, None, None, None] * x0 + \
        np.sqrt(1 - abar[t - 1])[:, None, None, None] * eps
    xt, _ = d.q_sample(torch.tensor(x0), torch.tensor(t), noise=torch.tensor(eps))
    np.testing.assert_allclose(xt.numpy(), want, rtol=0, atol=1e-12)


def test_scaled_sigmas_give_the_same_process_at_twice_the_side():
    # docs/training.md, "Larger images": with the continuous kernel, sigma, sigma_min and
    # sigma_max doubled at 128 x 128 give DCT index k (k/2 cycles across the image) the
    # process it has at 64 x 64, since exp(-(2s pi k / 128)^2 / 2) = exp(-(s pi k / 64)^2 / 2).
    kw = dict(num_steps=100, blur_schedule="quartic", kernel="continuous")
    small = BlurDiffusion(resolution=64, sigma=0.4, sigma_min=0.05, sigma_max=0.15, **kw)
    large = BlurDiffusion(resolution=128, sigma=0.8, sigma_min=0.1, sigma_max=0.3, **kw)
    t = torch.tensor([1, 37, 100])
    np.testing.assert_allclose(large.log_abar(t)[:, :64, :64].numpy(),
                               small.log_abar(t).numpy(), rtol=1e-12, atol=1e-12)
    # the discrete kernel at 0.4 pixel is far from Gaussian, so there the two differ
    kw["kernel"] = "discrete"
    small = BlurDiffusion(resolution=64, sigma=0.4, sigma_max=0.15, **kw)
    large = BlurDiffusion(resolution=128, sigma=0.8, sigma_max=0.3, **kw)
    assert (large.log_abar(torch.tensor([100]))[:, :64, :64] - small.log_abar(torch.tensor([100]))).abs().max() > 1


def test_fine_to_coarse_destroys_low_frequencies_first():
    c2f = BlurDiffusion(resolution=16, coarse_to_fine=True).log_abar(torch.tensor([500]))[0]
    f2c = BlurDiffusion(resolution=16, coarse_to_fine=False).log_abar(torch.tensor([500]))[0]
    assert c2f[0, 0] > c2f[-1, -1]           # coarse-to-fine: DC keeps the most signal
    assert f2c[0, 0] < f2c[-1, -1]
    la = np.log(np.cumprod(1 - np.linspace(1e-4, 0.02, N)))[499]
    assert c2f[0, 0].item() == pytest.approx(la, rel=1e-12)     # d(DC) = 1


# ------------------------------------------------------------ conversions
def test_conversions_match_definitions(diff):
    rng = np.random.default_rng(2)
    x0, eps = rng.uniform(-1, 1, (3, C, H, W)), rng.standard_normal((3, C, H, W))
    t = np.array([2, 333, 999])
    lab = log_abar_truth()[t][:, None]
    abar = np.exp(lab)
    tt = torch.tensor(t)
    xt, _ = diff.q_sample(torch.tensor(x0), tt, noise=torch.tensor(eps))
    e = torch.tensor(eps)
    # x0 from eps, and back
    # eps_to_x0 divides by sqrt(Abar), 3.7e-7 at t = 999's highest frequency: double
    # rounding grows to 1e-9 there (measured 9.8e-10)
    np.testing.assert_allclose(diff.eps_to_x0(xt, e, tt).numpy(), x0, rtol=0, atol=1e-8)
    np.testing.assert_allclose(diff.x0_to_eps(xt, torch.tensor(x0), tt).numpy(), eps,
                               rtol=0, atol=1e-12)
    # score of q(x_t | x0) = N(U sqrt(Abar) xb0, U diag(1 - Abar) U^T): -Sigma^-1 (x_t - mean)
    # This truth subtracts sqrt(Abar) xb0 from xb_t (values ~1) and divides by 1 - Abar,
    # as small as 2.1e-4 at t = 2: rounding ~1e-15 becomes ~1e-11 (measured 6.2e-11 at
    # |score| up to 218); 5e-10 is ~8x.
    score = -idct2((dct2(xt.numpy()) - np.sqrt(abar) * dct2(x0)) / (1 - abar))
    np.testing.assert_allclose(diff.eps_to_score(e, tt).numpy(), score, rtol=0, atol=5e-10)
    std = idct2(np.sqrt(1 - abar) * dct2(eps))
    np.testing.assert_allclose(diff.eps_to_std(e, tt).numpy(), std, rtol=0, atol=1e-12)
    # Back to eps: std_to_eps divides by sqrt(1 - Abar) >= 0.014, score_to_eps
    # multiplies the truth's score (error 6e-11, above) by sqrt(1 - Abar): measured 4.4e-13
    # and 9.2e-13. rtol=0 (numpy's default rtol 1e-7 would dominate), atol 5e-12 / 1e-11.
    np.testing.assert_allclose(diff.std_to_eps(torch.tensor(std), tt).numpy(), eps,
                               rtol=0, atol=5e-12)
    np.testing.assert_allclose(diff.score_to_eps(torch.tensor(score), tt).numpy(), eps,
                               rtol=0, atol=1e-11)


@pytest.mark.parametrize("target", ["std", "score"])
def test_eps_model_converts_without_checking_t(diff, target, monkeypatch):
    # The wrapped model is what samplers call each step: it must give eps without the
    # host-side check of t (a GPU synchronization per call).
    rng = np.random.default_rng(4)
    eps = torch.tensor(rng.standard_normal((3, C, H, W)))
    t = torch.tensor([1, 400, 1000])
    to_target = diff.eps_to_std if target == "std" else diff.eps_to_score
    pred = to_target(eps, t)
    wrapped = diff.eps_model(lambda x, tt: pred, target)

    def no_check(*args, **kwargs):
        raise AssertionError("check_t called")
    monkeypatch.setattr(diff, "check_t", no_check)
    # A round trip through two float64 fused calls: measured 3.6e-15 (std: 3.0e-15);
    # 4e-14 is ~10x.
    np.testing.assert_allclose(wrapped(torch.zeros_like(eps), t).numpy(), eps.numpy(),
                               rtol=0, atol=4e-14)


# -------------------------------------------------------------------- loss
class Affine(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
        self.seen = []

    def forward(self, x, t):
        self.seen.append(t.clone())
        return self.w * x


@pytest.mark.parametrize("target", ["eps", "std", "score"])
def test_loss_targets(diff, target):
    rng = np.random.default_rng(3)
    x0 = torch.tensor(rng.uniform(-1, 1, (4, C, H, W)))
    t = torch.tensor([1, 10, 500, 999])
    model = Affine()
    loss = diff.loss(model, x0, t, target=target, seed=9)
    xt, eps = diff.q_sample(x0, t, seed=9)
    lab = log_abar_truth()[t.numpy()][:, None]
    y = {"eps": eps.numpy(),
         "std": idct2(np.sqrt(1 - np.exp(lab)) * dct2(eps.numpy())),
         "score": -idct2(dct2(eps.numpy()) / np.sqrt(1 - np.exp(lab)))}[target]
    assert loss.item() == pytest.approx(np.mean((0.3 * xt.numpy() - y) ** 2), rel=1e-10)
    loss.backward()
    want_grad = np.mean(2 * (0.3 * xt.numpy() - y) * xt.numpy())
    assert model.w.grad.item() == pytest.approx(want_grad, rel=1e-9)


def test_loss_draws_steps_uniformly_from_1_to_n_minus_1():
    d = BlurDiffusion(resolution=4, channels=1, num_steps=5)
    model = Affine()
    torch.manual_seed(0)
    for _ in range(200):
        d.loss(model, torch.zeros(10, 1, 4, 4, dtype=torch.float64))
    t = torch.cat(model.seen)
    counts = torch.bincount(t, minlength=6).tolist()
    assert counts[0] == 0 and counts[5] == 0
    # 2000 draws over 4 values: each count ~ Binomial(2000, 1/4), sd 19.4; 5 sd bound.
    assert all(abs(c - 500) < 5 * 19.4 for c in counts[1:5])


# -------------------------------------------------------------- torch.func
def _dct_kron(h, w):
    """K = kron(C_H, C_W): the orthonormal 2-D DCT-II of a row-major plane (scipy, float64)."""
    c = lambda n: scipy.fft.dct(np.eye(n), norm="ortho", axis=0)
    return np.kron(c(h), c(w))


def test_jacobians_of_q_sample_and_eps_to_x0_under_torch_func(diff):
    # Per channel x_t = K^T (sqrt(Abar) K x0 + sqrt(1 - Abar) K eps): the Jacobians are
    # K^T diag(sqrt Abar) K in x0 and K^T diag(sqrt(1 - Abar)) K in eps, block diagonal over
    # the channels; eps_to_x0's in eps is -K^T diag(sqrt((1 - Abar) / Abar)) K. By
    # torch.func.jacrev (reverse mode) and jacfwd (forward), with given and made noise.
    # Truth: scipy's DCT matrices and log_abar_truth in float64; measured <= 2e-15 of the
    # largest entry, bound 1e-13.
    rng = np.random.default_rng(5)
    x0 = torch.tensor(rng.uniform(-1, 1, (1, C, H, W)))
    eps = torch.tensor(rng.standard_normal((1, C, H, W)))
    t = torch.tensor([300])
    abar = np.exp(log_abar_truth()[300]).reshape(-1)
    k, n = _dct_kron(H, W), C * H * W

    def check(jac, diag):
        want = np.kron(np.eye(C), k.T @ np.diag(diag) @ k)
        got = jac.reshape(n, n).numpy()
        assert np.abs(got - want).max() <= 1e-13 * np.abs(want).max()
    given = lambda x0, eps: diff.q_sample(x0, t, noise=eps)[0]
    for jac in (torch.func.jacrev, torch.func.jacfwd):
        jx, je = jac(given, argnums=(0, 1))(x0, eps)
        check(jx, np.sqrt(abar))
        check(je, np.sqrt(1 - abar))
        jx, jeps = jac(lambda x0: diff.q_sample(x0, t, seed=4))(x0)
        check(jx, np.sqrt(abar))
        assert torch.equal(jeps, torch.zeros_like(jeps))     # made eps: no dependence
    xt = given(x0, eps)
    check(torch.func.jacrev(lambda e: diff.eps_to_x0(xt, e, t))(eps),
          -np.sqrt((1 - abar) / abar))


class _FreqConv(torch.nn.Module):
    """A model through blurfast's transforms: idct2(conv(dct2(x)))."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(C, C, 3, padding=1, dtype=torch.float64)

    def forward(self, x, t):
        from blurfast import ops
        return ops.idct2(self.conv(ops.dct2(x)))


@pytest.mark.parametrize("target", ["eps", "std"])
def test_per_sample_loss_gradients_by_vmap_of_grad(diff, target):
    # Per-sample gradients of the loss (as DP-SGD takes them): vmap of torch.func.grad over
    # the parameters (functional_call) and the data equal, sample by sample, the gradients
    # .backward() gives for a batch of one (the custom ops' own autograd, outside torch.func).
    # One t and seed for all: a batched t would be read on the host by check_t, which vmap
    # refuses. Measured equal to the last bit; bound 1e-12 relative. No warning: spectral and
    # normal_like batch in one call (torch's per-sample fallback warned of its slowness).
    model = _FreqConv()
    params = {k: v.detach() for k, v in model.named_parameters()}
    x0 = torch.tensor(np.random.default_rng(6).uniform(-1, 1, (3, C, H, W)))
    t = torch.tensor([250])

    def loss(p, x):
        f = lambda xt, tt: torch.func.functional_call(model, p, (xt, tt))
        return diff.loss(f, x[None], t, target=target, seed=5)
    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        per = per_sample(params, x0)
    for i in range(3):
        model.zero_grad()
        xi = x0[i:i + 1].clone().requires_grad_()
        diff.loss(model, xi, t, target=target, seed=5).backward()
        for name, p in model.named_parameters():
            assert torch.allclose(per[0][name][i], p.grad, rtol=1e-12, atol=0), (i, name)
        assert torch.allclose(per[1][i], xi.grad[0], rtol=1e-12, atol=1e-15), i


# -------------------------------------------------------------- arguments
def test_bad_arguments_raise_value_error_naming_them(diff):
    x0 = torch.zeros(2, C, H, W)
    with pytest.raises(ValueError, match=r"^t: expected"):
        diff.q_sample(x0, torch.tensor([0, 5]))
    with pytest.raises(ValueError, match=r"^t: expected"):
        diff.q_sample(x0, torch.tensor([5, N + 1]))
    with pytest.raises(ValueError, match=r"^t: expected"):
        diff.q_sample(x0, torch.tensor([5.0, 6.0]))
    with pytest.raises(ValueError, match=r"^t: expected"):
        diff.q_sample(x0, torch.tensor([5, 6, 7]))
    with pytest.raises(ValueError, match=r"^t: expected"):
        diff.log_abar(torch.tensor([N + 1]))
    with pytest.raises(ValueError, match=r"^x0:"):
        diff.q_sample(torch.zeros(2, C, W, H), torch.tensor([5, 6]))
    with pytest.raises(ValueError, match=r"^x0:"):
        diff.q_sample(torch.zeros(C, H, W), torch.tensor([5]))
    with pytest.raises(ValueError, match=r"^noise:"):
        diff.q_sample(x0, torch.tensor([5, 6]), noise=torch.zeros(2, C, H, W + 1))
    with pytest.raises(ValueError, match="target"):
        diff.loss(lambda x, t: x, x0, target="v")
    with pytest.raises(ValueError, match=r"^eps: expected shape"):
        diff.eps_to_x0(x0, torch.zeros(2, C, H, W + 1), torch.tensor([5, 6]))
    with pytest.raises(ValueError, match=r"^x0: expected a floating-point tensor"):
        diff.x0_to_eps(x0, None, torch.tensor([5, 6]))
    for kw, name in [(dict(noise_schedule="sigmoid"), "noise_schedule"),
                     (dict(noise_schedule="cosine", beta_min=-1.0), "beta_min"),
                     (dict(noise_schedule="exp", beta_max=math.nan), "beta_max"),
                     (dict(blur_schedule="gauss"), "blur_schedule"),
                     (dict(kernel="box"), "kernel"),
                     (dict(resolution=0), "resolution"),
                     (dict(resolution=(4, 4, 4)), "resolution"),
                     (dict(channels=0), "channels"),
                     (dict(num_steps=1), "num_steps"),
                     (dict(sigma=0.0), "sigma"),
                     (dict(sigma_max=-0.1), "sigma_max"),
                     (dict(beta_min=0.0, sigma_max=0.0), "beta_min")]:
        with pytest.raises(ValueError, match=name):
            BlurDiffusion(**kw)
    # triangular's f(N) is the linear f(0) = f_1 - (f_N - f_1) / (N - 1) < 0: the last step
    # sharpens; it was blamed on beta_min (1e-4 here), with "use beta_min > 0"
    with pytest.raises(ValueError, match=r"^blur_schedule: 'triangular' gives f\(2\) = -0\.25 < 0"):
        BlurDiffusion(num_steps=2, blur_schedule="triangular", sigma_max=0.2)


X = torch.zeros(2, C, H, W)


@pytest.mark.parametrize("call, words", [
    # the public conversions check each tensor (check_x) and name it
    (lambda d: d.eps_to_std(torch.zeros(2, 1, H, W), 5), "eps: expected shape (B, 3, 16, 12)"),
    (lambda d: d.eps_to_x0(torch.zeros(2, C, H + 1, W), X, 5), "x_t: expected shape"),  # was 'a'
    (lambda d: d.eps_to_x0(X, torch.zeros(2, C, H, W, dtype=torch.int64), 5),
     "eps: expected a floating-point tensor"),
    (lambda d: d.eps_to_score([1], 5), "eps: expected a floating-point tensor, got list"),
    (lambda d: d.score_to_eps(torch.zeros(C, H, W), 5), "score: expected shape"),
    (lambda d: d.std_to_eps(None, 5), "std: expected a floating-point tensor"),
    (lambda d: d.x0_to_eps(torch.zeros(2, C, W, H), X, 5), "x_t: expected shape"),
    (lambda d: d.x0_to_eps(X, torch.zeros(2, 1, H, W), 5), "x0: expected shape"),
    (lambda d: d.x0_to_eps(X, torch.zeros(3, C, H, W), 5), "x0: expected a tensor of shape (2,"),
    # tensors on another device than x_t / x0 were named x2 (the fused op's argument)
    (lambda d: d.x0_to_eps(X, torch.zeros(2, C, H, W, device="meta"), 5),
     "x0: expected a tensor of shape (2, 3, 16, 12) on cpu, got (2, 3, 16, 12) on meta"),
    (lambda d: d.eps_to_x0(X, torch.zeros(2, C, H, W, device="meta"), 5), "eps: expected a"),
    (lambda d: d.q_sample(X, 5, noise=torch.zeros(2, C, H, W, device="meta")),
     "noise: expected a tensor of shape (2, 3, 16, 12) on cpu, got (2, 3, 16, 12) on meta"),
    (lambda d: d.q_sample(X, 5, noise=[0.0]), "noise: expected a tensor of shape"),
    # seeds: 1.7 was truncated to 1, 'a' gave int()'s error
    (lambda d: d.prior_sample((2, C, H, W), seed=1.7), "seed: expected an int >= 0, got 1.7"),
    (lambda d: d.prior_sample((2, C, H, W), seed="a"), "seed: expected an int >= 0, got 'a'"),
    (lambda d: d.prior_sample((2, C, H, W), seed=-3), "seed: expected an int >= 0, got -3"),
    (lambda d: d.q_sample(X, 5, seed=1.5), "seed: expected an int >= 0 or None, got 1.5"),
    (lambda d: d.prior_sample(None), "shape: expected (B, 3, 16, 12), got None"),
    (lambda d: d.prior_sample((-1, C, H, W)), "shape[0]: expected an int >= 0, got -1"),
    (lambda d: d.prior_sample((2, C, H, W), dtype=torch.int64),
     "dtype: expected a floating-point torch.dtype"),
    (lambda d: d.sample_t(-1), "batch: expected an int >= 0, got -1"),
    (lambda d: d.sample_t(2.5), "batch: expected an int >= 0, got 2.5"),
])
def test_bad_arguments_of_the_methods_are_named(diff, call, words):
    with pytest.raises((TypeError, ValueError)) as e:
        call(diff)
    assert str(e.value).startswith(words), e.value


def test_numpy_numbers_are_arguments_and_the_config_stays_json():
    import json
    d = BlurDiffusion(resolution=8, sigma=np.float32(0.5), sigma_max=np.float64(0.2),
                      beta_max=np.float32(0.03))
    assert d == BlurDiffusion(resolution=8, sigma=0.5, sigma_max=0.2,
                              beta_max=float(np.float32(0.03)))
    assert json.loads(json.dumps(d.config)) == d.config
    assert torch.equal(d.prior_sample((1, 3, 8, 8), seed=np.int64(4)),
                       d.prior_sample((1, 3, 8, 8), seed=4))


def test_scales_keep_one_minus_abar_accurate_near_abar_one():
    # sqrt(1 - Abar) where Abar is within 1e-4 of 1 (t = 1, 2, ...): against long double,
    # within 2 ulp (measured 1.2e-16; the plain sqrt(1 - exp(lab)) is 2.8e-13 off).
    d = BlurDiffusion(resolution=8, num_steps=1000)
    lab = d.log_abar(torch.tensor([1, 2, 3, 10]))
    sa, g = scales(lab)
    la = lab.numpy().astype(np.longdouble)
    np.testing.assert_allclose(g.numpy(), np.sqrt(-np.expm1(la)).astype(np.float64),
                               rtol=4.5e-16, atol=0)
    np.testing.assert_allclose(sa.numpy(), np.exp(la / 2).astype(np.float64), rtol=4.5e-16,
                               atol=0)
