"""TEMPORARY: public op signatures delegating to the reference (kernels land next)."""
from . import reference as _ref
from .schedules import blur_eigenvalues_2d


def dct2(x):
    return _ref.dct2(x)


def idct2(X):
    return _ref.idct2(X)


def spectral(x, a, x2=None, a2=None, g=None, noise=None, *, seed=None, offset=0, return_noise=False):
    if seed is None:
        seed = 0
    return _ref.spectral(x, a, x2, a2, g, noise, seed=seed, offset=offset, return_noise=return_noise)


def gaussian_blur(x, sigma, kind="discrete"):
    d = blur_eigenvalues_2d(tuple(x.shape[-2:]), sigma, kind).to(x.device)
    return spectral(x, d)
