"""The comparison implementations ("peers") the kernels are benchmarked against.

They are defined in :mod:`blurfast.bench_peers` (the impl table in :mod:`blurfast.bench`)
so that the runner also works from an installed package (``blurfast bench``), where this
directory does not exist; this module re-exports them for use from ``benchmarks/``. All are our own code,
written from the mathematics, and tested against scipy in ``tests/test_peers.py``:

* ``matmul_dct2`` / ``matmul_idct2``: ``C_H @ x @ C_W^T`` with cached orthonormal
  DCT matrices (fp32; TF32 inside ``tf32_matmul(True)``, CUDA only).
* ``fft_dct2`` / ``fft_idct2``: per dim, reorder (evens, then odds reversed),
  complex FFT, twiddle ``exp(-i pi k / 2N)`` and orthonormal scaling (Makhoul's
  method, the way the torch-dct package computes it); the inverse undoes each step.
* ``ref_q_sample`` / ``ref_sampler_step``: dct2, combine with ``torch.randn``
  frequency-space noise, idct2 (the torch reference of the fused op), with any
  of the DCT pairs above.
* cupy: ``cupyx.scipy.fft.dctn`` / ``idctn`` with ``norm="ortho"``
  (``impl_function("cupy", "dct2")``), where cupy imports.
"""
from blurfast.bench import get_impl, impl_function  # noqa: F401
from blurfast.bench_peers import (  # noqa: F401
    fft_dct2,
    fft_idct2,
    matmul_dct2,
    matmul_idct2,
    ref_q_sample,
    ref_sampler_step,
    tf32_matmul,
)

__all__ = ["fft_dct2", "fft_idct2", "get_impl", "impl_function", "matmul_dct2", "matmul_idct2",
           "ref_q_sample", "ref_sampler_step", "tf32_matmul"]
