"""The Gaussian-mixture oracle against numerical integration, and the Fréchet distance."""
import math

import numpy as np
import pytest
import scipy.fft
import scipy.integrate
import scipy.linalg
import scipy.stats
import torch

from blurfast.diffusion import BlurDiffusion
from blurfast.testing import (GaussianMixtureOracle, example_oracle, frechet_distance,
                              gaussian_frechet_distance)


def _npdf(x, m, v):
    return math.exp(-0.5 * (x - m) ** 2 / v) / math.sqrt(2 * math.pi * v)


def test_oracle_is_the_conditional_mean_in_1d():
    # E[eps | x_t] = int eps(x0) p(x0) N(x_t; sqrt(Abar) x0, 1 - Abar) dx0 / int (same, no eps)
    d = BlurDiffusion(resolution=1, channels=1, num_steps=100)
    mu, var, w = np.array([-1.0, 0.5, 2.0]), np.array([0.04, 0.2, 0.01]), np.array([0.2, 0.5, 0.3])
    o = GaussianMixtureOracle(d, torch.tensor(mu).view(3, 1, 1, 1),
                              torch.tensor(var).view(3, 1, 1, 1), torch.tensor(w))
    for t in (2, 30, 90):
        abar = math.exp(d.log_abar(torch.tensor([t])).item())
        for x in (-1.3, 0.1, 1.7):
            def dens(x0):
                p0 = sum(wk * _npdf(x0, m, v) for wk, m, v in zip(w, mu, var))
                return p0 * _npdf(x, math.sqrt(abar) * x0, 1 - abar)
            eps = lambda x0: (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
            pts = list(mu)
            num = scipy.integrate.quad(lambda z: eps(z) * dens(z), -8, 8, points=pts, limit=200)[0]
            den = scipy.integrate.quad(dens, -8, 8, points=pts, limit=200)[0]
            got = o(torch.tensor([[[[x]]]], dtype=torch.float64), torch.tensor([t])).item()
            assert got == pytest.approx(num / den, rel=1e-6, abs=1e-8)


def test_oracle_is_the_conditional_mean_in_2d_with_blur():
    # Two pixels (1 x 2 image): the DCT mixes them and the two frequencies diffuse at
    # different speeds; integrate over x0 in pixel space with the explicit DCT matrix.
    d = BlurDiffusion(resolution=(1, 2), channels=1, num_steps=50, sigma=0.4, sigma_max=0.6,
                      blur_schedule="linear")
    u = scipy.fft.dct(np.eye(2), axis=0, norm="ortho")          # xb = u @ x
    means = np.array([[0.8, -0.4], [-0.5, 0.3]])
    variances = np.array([[0.05, 0.2], [0.1, 0.03]])            # per frequency
    w = np.array([0.4, 0.6])
    o = GaussianMixtureOracle(d, torch.tensor(means).view(2, 1, 1, 2),
                              torch.tensor(variances).view(2, 1, 1, 2), torch.tensor(w))
    t = 30
    abar = np.exp(d.log_abar(torch.tensor([t]))[0, 0].numpy())     # (2,) per frequency
    assert abs(abar[0] - abar[1]) > 0.05                            # blur acts
    x = np.array([0.3, -0.2])
    xb = u @ x
    covs = [u.T @ np.diag(v) @ u for v in variances]         # pixel-space covariances
    precs = [np.linalg.inv(c) for c in covs]
    norms = [1 / (2 * np.pi * math.sqrt(np.linalg.det(c))) for c in covs]

    def dens(x1, x0):
        z = np.array([x0, x1])
        r = xb - np.sqrt(abar) * (u @ z)
        lik = math.exp(-0.5 * np.sum(r ** 2 / (1 - abar))) / (2 * np.pi * math.sqrt(np.prod(1 - abar)))
        prior = sum(wk * nk * math.exp(-0.5 * (z - m) @ pk @ (z - m))
                    for wk, nk, pk, m in zip(w, norms, precs, means))
        return prior * lik

    def eps(z):
        return u.T @ ((xb - np.sqrt(abar) * (u @ z)) / np.sqrt(1 - abar))

    lim = (-3, 3)
    den = scipy.integrate.dblquad(dens, *lim, *lim, epsabs=1e-10)[0]
    want = [scipy.integrate.dblquad(lambda x1, x0: eps(np.array([x0, x1]))[j] * dens(x1, x0),
                                    *lim, *lim, epsabs=1e-10)[0] / den for j in range(2)]
    got = o(torch.tensor(x).view(1, 1, 1, 2), torch.tensor([t])).view(2).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_example_oracle_draws_have_its_moments():
    d = BlurDiffusion(resolution=16, channels=3)
    o = example_oracle(d)
    n = 4000
    x, labels = o.sample(n, seed=3, return_labels=True)
    xb = scipy.fft.dctn(x.numpy(), axes=(-2, -1), norm="ortho")
    m, var, m4 = (a.numpy() for a in o.coef_moments())
    assert np.abs((xb.mean(0) - m) / np.sqrt(var / n)).max() < 5
    se_var = np.sqrt((m4 - var ** 2) / n)
    assert np.abs((xb.var(0) - var) / se_var).max() < 5
    # The components are separated: the posterior at t = 0 recovers every label.
    resp = o.responsibilities(x, torch.zeros(n, dtype=torch.int64))
    assert torch.equal(resp.argmax(1), labels)
    w = o.weights.numpy()
    counts = np.bincount(labels.numpy(), minlength=3) / n
    assert np.all(np.abs(counts - w) < 5 * np.sqrt(w * (1 - w) / n))


def _small_mixture():
    """A 3-component mixture on 2 x 4 x 3 images (D = 24) whose means are far apart
    against its variances, so that the between-component covariance dominates."""
    d = BlurDiffusion(resolution=(4, 3), channels=2, num_steps=10)
    rng = np.random.default_rng(7)
    means = rng.normal(0, 1.0, (3, 2, 4, 3))
    variances = rng.uniform(0.05, 0.5, (3, 2, 4, 3))
    w = np.array([0.2, 0.3, 0.5])
    return d, means, variances, w, GaussianMixtureOracle(d, means, variances, w)


def _mixture_moments(means, variances, w):
    """Exact DCT-basis mean and covariance of the mixture (law of total covariance)."""
    mub = scipy.fft.dctn(means, axes=(-2, -1), norm="ortho").reshape(len(w), -1)
    v = variances.reshape(len(w), -1)
    m = w @ mub
    dm = mub - m
    within = np.diag(w @ v)
    between = sum(wk * np.outer(r, r) for wk, r in zip(w, dm))
    return m, within + between, between


def test_mixture_moments_equal_the_law_of_total_covariance():
    _, means, variances, w, o = _small_mixture()
    m, cov, _ = _mixture_moments(means, variances, w)
    got_m, got_cov = (a.numpy() for a in o.moments())
    # Sums of three products of O(1) numbers: measured 3.3e-16 (mean), 8.9e-16
    # (covariance), 1.1e-15 (coef_moments' variance); 1e-14 is ~10x.
    np.testing.assert_allclose(got_m, m, rtol=0, atol=1e-14)
    np.testing.assert_allclose(got_cov, cov, rtol=0, atol=1e-14)
    # The per-coefficient moments are the same mixture's: var is the diagonal.
    cm, cvar, _ = (a.numpy().ravel() for a in o.coef_moments())
    np.testing.assert_allclose(cm, m, rtol=0, atol=1e-14)
    np.testing.assert_allclose(cvar, np.diag(cov), rtol=0, atol=1e-14)


def test_mixture_moments_equal_those_of_its_draws():
    # 1e5 exact draws (oracle.sample); each entry of the mean and covariance within 5
    # standard errors, estimated from the draws (324 entries: a false alarm < 2e-4).
    _, means, variances, w, o = _small_mixture()
    n = 100_000
    xb = scipy.fft.dctn(o.sample(n, seed=5).numpy(), axes=(-2, -1), norm="ortho").reshape(n, -1)
    m_hat, cov_hat = np.mean(xb, 0), np.cov(xb, rowvar=False)
    m, cov = (a.numpy() for a in o.moments())
    c = xb - m_hat
    zm = (m_hat - m) / np.sqrt(np.diag(cov_hat) / n)
    se_cov = np.sqrt(np.einsum("ni,nj->ij", c ** 2, c ** 2) / n - cov_hat ** 2) / np.sqrt(n)
    zc = (cov_hat - cov) / se_cov
    print(f"\nmax |z|: mean {np.abs(zm).max():.2f}, covariance {np.abs(zc).max():.2f}")
    assert np.abs(zm).max() < 5 and np.abs(zc).max() < 5
    # The check can fail: the between-component term alone is far beyond 5 errors.
    between = _mixture_moments(means, variances, w)[2]
    assert np.abs(between / se_cov).max() > 50


def _dct_matrix(c, h, w):
    """(D, D) orthonormal matrix of the 2-D DCT-II of (c, h, w) images: xb = U x."""
    uh = scipy.fft.dct(np.eye(h), axis=0, norm="ortho")
    uw = scipy.fft.dct(np.eye(w), axis=0, norm="ortho")
    return np.kron(np.eye(c), np.kron(uh, uw))


def test_oracle_frechet_distance_is_that_of_the_pixel_moments():
    # The Fréchet distance is invariant under the orthonormal DCT: computed here in pixel
    # space (sample mean and covariance of the images, the mixture's moments mapped back
    # by the explicit DCT matrix) with scipy's sqrtm.
    d, means, variances, w, o = _small_mixture()
    m, cov, _ = _mixture_moments(means, variances, w)
    u = _dct_matrix(*d.shape)
    mp, covp = u.T @ m, u.T @ cov @ u
    for shift, scale in ((0.0, 1.0), (0.3, 0.7)):
        x = o.sample(400, seed=9) * scale + shift
        f = x.numpy().reshape(400, -1)
        s1 = np.cov(f, rowvar=False)
        want = np.sum((f.mean(0) - mp) ** 2) + np.trace(s1 + covp - 2 * scipy.linalg.sqrtm(s1 @ covp).real)
        got = o.frechet_distance(x)
        print(f"\nshift {shift}, scale {scale}: FD {got:.6f}, scipy {want:.6f}")
        # measured 7.4e-14 and 8.6e-15 relative (scipy's sqrtm of the non-symmetric
        # product against the code's symmetric eigendecompositions); 1e-12 is ~13x.
        assert got == pytest.approx(want, rel=1e-12, abs=0)


def test_gaussian_frechet_distance_equals_scipy_sqrtm_formula():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((6, 6)), rng.standard_normal((6, 6))
    s1, s2 = a @ a.T + 0.1 * np.eye(6), b @ b.T
    m1, m2 = rng.standard_normal(6), rng.standard_normal(6)
    want = np.sum((m1 - m2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    assert gaussian_frechet_distance(m1, s1, m2, s2) == pytest.approx(want, rel=1e-9)
    assert gaussian_frechet_distance(m1, s1, m1, s1) == pytest.approx(0, abs=1e-9)
    x = torch.tensor(rng.standard_normal((50, 6)))
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-9)
    assert frechet_distance(x, x + 1) == pytest.approx(6, rel=1e-9)   # pure mean shift


def test_oracle_bad_arguments():
    d = BlurDiffusion(resolution=4, channels=1, num_steps=10)
    with pytest.raises(ValueError, match="means"):
        GaussianMixtureOracle(d, torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4))
    with pytest.raises(ValueError, match="variances"):
        GaussianMixtureOracle(d, torch.zeros(2, 1, 4, 4), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="weights"):
        GaussianMixtureOracle(d, torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4), [1.0, -1.0])


_D = BlurDiffusion(resolution=4, channels=1, num_steps=10)


@pytest.mark.parametrize("call, words", [
    (lambda o: example_oracle(_D, 0), "components: expected an int >= 1, got 0"),  # was empty
    (lambda o: example_oracle(_D, -1), "components: expected an int >= 1, got -1"),
    (lambda o: example_oracle(_D, 2.5), "components: expected an int >= 1"),
    (lambda o: example_oracle(_D, 2, floor=0.0), "floor: expected a finite number > 0"),
    (lambda o: example_oracle(_D, 2, seed=1.5), "seed: expected an int >= 0, got 1.5"),
    (lambda o: GaussianMixtureOracle(_D, torch.zeros(0, 1, 4, 4), torch.ones(0, 1, 4, 4)),
     "means: expected shape (K, 1, 4, 4), K >= 1, got (0, 1, 4, 4)"),
    (lambda o: GaussianMixtureOracle(_D, torch.full((2, 1, 4, 4), math.nan),
                                     torch.ones(2, 1, 4, 4)), "means: expected finite values"),
    (lambda o: GaussianMixtureOracle(_D, torch.zeros(2, 1, 4, 4), torch.ones(2, 1, 4, 4),
                                     [1.0, math.inf]), "weights: expected 2 positive numbers"),
    (lambda o: o.sample(0), "n: expected an int >= 1, got 0"),
    (lambda o: o.sample(2, t=11), "t: expected an int in [0, 10], got 11"),
    (lambda o: o.sample(2, seed="a"), "seed: expected an int >= 0, got 'a'"),
    (lambda o: o.responsibilities(torch.zeros(2, 3, 4, 4), 1), "x: expected shape (B, 1, 4, 4)"),
    (lambda o: o.responsibilities(torch.zeros(2, 1, 4, 4, dtype=torch.int64), 1),
     "x: expected a floating-point tensor"),
    (lambda o: frechet_distance([1.0, 2.0], torch.zeros(3, 2)), "x: expected a tensor (B, ...)"),
    (lambda o: frechet_distance(torch.zeros(3, 2), torch.zeros(3)), "y: expected a tensor (B, ...)"),
])
def test_oracle_arguments_are_named(call, words):
    with pytest.raises(ValueError) as e:
        call(example_oracle(_D, 2))
    assert str(e.value).startswith(words), e.value
