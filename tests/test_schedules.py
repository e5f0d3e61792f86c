"""Schedules and blur eigenvalues against scipy and formulas written here in numpy."""

import numpy as np
import pytest
import scipy.fft
import scipy.ndimage

import torch

from blurfast import schedules as S
from blurfast.diffusion import BlurDiffusion

# docs/process.md section 2: "Eigenvalues are floored at EIG_FLOOR = 1e-3" (the documented
# value, written here so that the truth does not follow the code).
DOC_EIG_FLOOR = 1e-3

def _apply_eigs(d, x):
    """idct2(d * dct2(x)) with scipy's orthonormal DCT, float64."""
    return scipy.fft.idctn(d * scipy.fft.dctn(x, axes=(-2, -1), norm="ortho"),
                           axes=(-2, -1), norm="ortho")


@pytest.mark.parametrize("size,sigma", [((16, 16), 0.4), ((16, 16), 1.0), ((12, 20), 0.7),
                                        ((32, 9), 1.5), ((20, 20), 2.5), ((7, 13), 0.4)])
def test_discrete_eigenvalues_equal_scipy_gaussian_filter(size, sigma):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3) + size)
    d = S.blur_eigenvalues_2d(size, sigma).numpy()
    want = scipy.ndimage.gaussian_filter(x, sigma=(0, 0, sigma, sigma), mode="reflect",
                                         truncate=4.0)
    # Two float64 filter passes against DCT, eigenvalues, inverse DCT on unit-variance
    # data: measured at most 1.3e-15; 1e-14 is ~8x.
    np.testing.assert_allclose(_apply_eigs(d, x), want, rtol=0, atol=1e-14)


def test_anisotropic_sigma_equals_scipy():
    x = np.random.default_rng(1).standard_normal((10, 14))
    d = S.blur_eigenvalues_2d((10, 14), (0.8, 1.6)).numpy()
    want = scipy.ndimage.gaussian_filter(x, sigma=(0.8, 1.6), mode="reflect")
    np.testing.assert_allclose(_apply_eigs(d, x), want, rtol=0, atol=1e-14)  # measured 3.3e-16


def test_continuous_eigenvalues_approach_discrete_for_wide_kernels():
    # The sampled Gaussian's spectrum is the periodized continuous one; for sigma = 2
    # the aliases and the 4-sigma truncation are below 1e-3.
    n, sigma = 64, 2.0
    cont = S.gaussian_eigenvalues(n, sigma, "continuous").numpy()
    k = np.arange(n)
    np.testing.assert_allclose(cont, np.exp(-0.5 * (sigma * np.pi * k / n) ** 2), atol=1e-15)
    disc = S.gaussian_eigenvalues(n, sigma, "discrete").numpy()
    assert np.max(np.abs(cont - disc)) < 1e-3


def test_process_eigenvalues_floor_and_fine_to_coarse():
    assert S.EIG_FLOOR == DOC_EIG_FLOOR        # the exported constant is the documented one
    d = S.blur_eigenvalues_2d(16, 0.4).numpy()
    c2f = S.process_eigenvalues(16, 0.4).numpy()
    np.testing.assert_array_equal(c2f, np.clip(d, DOC_EIG_FLOOR, 1))
    f2c = S.process_eigenvalues(16, 0.4, coarse_to_fine=False).numpy()
    np.testing.assert_array_equal(f2c, np.clip(1 - d, DOC_EIG_FLOOR, 1))
    assert f2c[0, 0] == DOC_EIG_FLOOR          # DC of 1 - d is 0: floored
    # 1 - d also has entries between 1e-3 and 1e-2 (1.5e-3 next to DC): a floor other
    # than the documented one changes them.
    assert ((1 - d > DOC_EIG_FLOOR) & (1 - d < 1e-2)).any()
    wide = S.process_eigenvalues(16, 6.0, kind="continuous").numpy()
    assert wide.min() == DOC_EIG_FLOOR and wide.max() == 1.0


# ------------------------------------------------------------------ noise
N = 1000


def test_linear_betas():
    b = S.noise_betas("linear", N, 1e-4, 0.02).numpy()
    assert b.shape == (N + 1,) and b[0] == 0
    np.testing.assert_allclose(b[1:], np.linspace(1e-4, 0.02, N), rtol=1e-15, atol=0)


def test_cosine_alpha_bar_telescopes_to_nichol_dhariwal():
    # prod_{j<=i} (1 - beta_j) = c(i/N) / c(0) wherever the 0.999 cap is inactive.
    def c(t):
        return np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2
    b = S.noise_betas("cosine", N).numpy()
    la = S.log_alpha_bar(S.noise_betas("cosine", N)).numpy()
    i = np.arange(N + 1)
    uncapped = np.concatenate([[True], b[1:] < 0.999])
    last = np.argmin(uncapped) - 1 if not uncapped.all() else N
    # cumsum of 1000 log1p terms against the telescoped ratio: measured 6.1e-15 relative;
    # 6e-14 is ~10x.
    np.testing.assert_allclose(np.exp(la[:last + 1]), c(i[:last + 1] / N) / c(0), rtol=6e-14,
                               atol=0)
    assert b.max() == pytest.approx(0.999) and b[-1] == pytest.approx(0.999)


def test_exp_schedule():
    # The truth in long double: its plain form 1 - e(i)/e(i-1) cancels (in float64 it is
    # 4e-12 off where beta is small).
    i = np.arange(N + 1, dtype=np.longdouble)
    g = np.exp(5 * i / N - 5) + np.longdouble("1e-4")
    el = 1 - g / g[N]
    want_b = np.minimum(1 - el[1:] / el[:-1], np.longdouble("0.999"))
    b = S.noise_betas("exp", N).numpy()
    np.testing.assert_allclose(b[1:], want_b.astype(np.float64), rtol=1e-14, atol=0)
    e = el.astype(np.float64)
    # alpha_bar_i = e(i)/e(0) below the cap; the last step is capped (e(N) = 0).
    la = S.log_alpha_bar(S.noise_betas("exp", N)).numpy()
    np.testing.assert_allclose(np.exp(la[1:N]), e[1:N] / e[0], rtol=1e-14, atol=0)  # 1.1e-15
    assert b[N] == 0.999


# ------------------------------------------------------------------ blur
F1, FN = 0.0, (0.15 / 0.4) ** 2


@pytest.mark.parametrize("name", S.BLUR_SCHEDULES)
def test_blur_f_formulas(name):
    f1, fN = 0.01, FN
    i = np.arange(1, N + 1, dtype=np.float64)
    lin = (fN - f1) * (i - 1) / (N - 1) + f1
    want = {
        "linear": lin,
        "log": (fN - f1) * np.log(i + 1e-6) / np.log(N + 1e-6) + f1,
        "quadratic": (fN - f1) / (N ** 2 - 1) * (i ** 2 - 1) + f1,
        "cubic": (fN - f1) * (i / N) ** 3 + f1,
        "quartic": (fN - f1) * (i / N) ** 4 + f1,
        "triangular": np.where(i < N / 2, lin, (fN - f1) * (N - i - 1) / (N - 1) + f1),
    }[name]
    f = S.blur_f(name, N, f1, fN).numpy()
    assert f.shape == (N + 1,) and f[0] == 0
    np.testing.assert_allclose(f[1:], want, rtol=1e-12, atol=1e-15)
    if name in ("linear", "quadratic", "log"):
        # endpoints f_1, f_N (log: f(1) = f_1 + (f_N - f_1) ln(1 + 1e-6)/ln N = f_1 + 1.9e-8)
        assert f[1] == pytest.approx(f1, abs=3e-8) and f[N] == pytest.approx(fN, rel=1e-12)


def test_paper_default_f_N():
    # BlurDiffusion's defaults are the paper's: quartic blur up to f_N = (0.15 / 0.4)^2.
    from blurfast.diffusion import BlurDiffusion
    f = BlurDiffusion().f
    assert f.shape == (N + 1,) and f[N].item() == pytest.approx(0.140625, rel=1e-12)
    np.testing.assert_allclose(f[1:].numpy(), 0.140625 * (np.arange(1, N + 1) / N) ** 4,
                               rtol=1e-12)


@pytest.mark.parametrize("fn,args,argname", [
    (S.noise_betas, ("sigmoid", N), "noise_schedule"),
    (S.blur_f, ("gaussian", N, 0.0, 0.1), "blur_schedule"),
    (S.process_eigenvalues, (16, 0.4, "box"), "kernel"),
    (S.noise_betas, ("linear", 1), "num_steps"),
    (S.noise_betas, ("linear", N, 0.03, 0.02), "beta_min"),
    (S.noise_betas, ("linear", N, 1e-4, 1.5), "beta_max"),
    (S.noise_betas, ("linear", N, 1e-4, 1.0), "beta_max: expected a finite number >= 0 and < 1"),
    # unused by cosine and exp, but checked (a process's config keeps them)
    (S.noise_betas, ("cosine", N, -1.0), "beta_min: expected a finite number >= 0 and < 1"),
    (S.noise_betas, ("exp", N, 1e-4, np.nan), "beta_max: expected a finite number"),
    (S.gaussian_eigenvalues, (8, 1.0, "discrete", -1), "truncate: expected a finite number > 0"),
    (S.gaussian_eigenvalues, (8, 1.0, "discrete", np.nan), "truncate: expected a finite"),
    (S.gaussian_eigenvalues, (8, True), "sigma: expected a finite number"),
    (S.gaussian_eigenvalues, (8, np.bool_(True)), "sigma: expected a finite number"),
    (S.gaussian_eigenvalues, (True, 1.0), "n: expected an int >= 1"),
    (S.gaussian_eigenvalues, (8, 1.0, "box"), "kind: expected one of"),
    (S.blur_eigenvalues_2d, ((8, 8, 8), 1.0), "size: expected an int >= 1 or a pair"),
    (S.blur_eigenvalues_2d, (8, (1.0, np.inf)), "sigma: expected a finite number >= 0"),
    (S.process_eigenvalues, (8, 1.0, "discrete", True, np.nan), "floor: expected a finite"),
    (S.process_eigenvalues, (8, 1.0, "discrete", True, 0.0), "floor: expected a finite"),
    (S.blur_f, ("linear", 10, np.nan, 1.0), "f_1: expected a finite number >= 0"),
    (S.blur_f, ("linear", 10, 0.0, -1.0), "f_N: expected a finite number >= 0"),
    (S.log_alpha_bar, ([0.0, 0.1],), "betas: expected a 1-D floating-point tensor"),
    (S.log_alpha_bar, (torch.tensor([0.0, 1.5], dtype=torch.float64),), "betas: expected values"),
])
def test_bad_arguments_name_themselves(fn, args, argname):
    with pytest.raises(ValueError, match=argname) as e:
        fn(*args)
    assert str(e.value).startswith(argname.split(":")[0] + ":"), e.value


@pytest.mark.parametrize("value", [1, "yes", None])
def test_coarse_to_fine_must_be_a_bool(value):
    # a truthy string such as "no" would otherwise read as True
    for call in (lambda: S.process_eigenvalues(8, 1.0, "discrete", value),
                 lambda: BlurDiffusion(resolution=8, coarse_to_fine=value)):
        with pytest.raises(TypeError, match=f"^coarse_to_fine: expected a bool, got {value!r}"):
            call()


def test_numpy_numbers_are_numbers():
    # np.float32 was "expected a finite number"; numpy's numbers give Python's results
    torch.testing.assert_close(S.gaussian_eigenvalues(8, np.float32(1.0)),
                               S.gaussian_eigenvalues(8, 1.0), rtol=0, atol=0)
    torch.testing.assert_close(S.process_eigenvalues(8, np.float64(0.5), floor=np.float32(0.25)),
                               S.process_eigenvalues(8, 0.5, floor=0.25), rtol=0, atol=0)
    torch.testing.assert_close(S.blur_f("cubic", 10, np.int64(0), np.float32(0.5)),
                               S.blur_f("cubic", 10, 0, 0.5), rtol=0, atol=0)
