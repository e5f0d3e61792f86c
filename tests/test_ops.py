"""The ops and CPU kernels against the float64 reference, and the reference against scipy."""
import math
import warnings

import numpy as np
import pytest
import scipy.fft
import scipy.ndimage
import torch

import blurfast as bf
from blurfast import reference as ref
from blurfast.ops import normal_like
from bfutil import (assert_within_twice_torch, rel_err, torch_dct2, torch_spectral, truth_dct2,
                    truth_spectral, unit_roundoff)

FAST_SIZES = [8, 16, 32, 64, 128, 256]
ODD_SIZES = [(1, 1), (7, 12), (33, 20), (1, 9), (5, 1), (3, 100)]


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


# --------------------------------------------------------------- reference vs scipy

@pytest.mark.parametrize("hw", [(8, 8), (64, 64), (7, 12), (33, 20), (1, 1), (256, 256)])
def test_reference_matches_scipy(hw):
    # Against scipy in long double: within (2 + log2(H W)) units of 2**-53 (measured 3.1 to
    # 11.9 units, 11.9 at 256 x 256). Angles not reduced in integers first made 17 (8 x 8)
    # to 432 (256 x 256).
    x = _rand(2, 3, *hw, dtype=torch.float64)
    bound = (2 + math.log2(hw[0] * hw[1])) * 2.0**-53
    for inverse, f in ((False, ref.dct2), (True, ref.idct2)):
        err = rel_err(f(x), truth_dct2(x, inverse))
        assert err <= bound, (hw, inverse, err / 2.0**-53)


def test_reference_matrix_is_orthonormal():
    for n in (1, 5, 64):
        c = ref.dct_matrix(n)
        assert torch.allclose(c @ c.T, torch.eye(n, dtype=torch.float64), atol=1e-14)


# --------------------------------------------------------------- CPU kernels vs reference

# Both builds of the CPU transform: AVX2 + FMA where the CPU has them, and the baseline.
ISAS = ["default", "baseline"]


@pytest.fixture(params=ISAS)
def cpu_isa(request, monkeypatch):
    if request.param == "baseline":
        monkeypatch.setenv("BLURFAST_CPU_KERNELS", "baseline")
        # the switch must reach the dispatch, else these cases rerun the AVX2 code
        from blurfast import _C
        assert _C.cpu_build() in ("baseline", "portable")
    return request.param


# Accuracy: within twice the error of torch's matrix DCT in the same precision, against a
# truth more precise than it (bfutil.assert_within_twice_torch).

def _check_dct2(x, what=""):
    """bf.dct2 and bf.idct2 of x by the twice-torch rule: float64 truth for float32 inputs,
    long double for float64."""
    for inverse, ours in ((False, bf.dct2), (True, bf.idct2)):
        if x.dtype == torch.float64:
            want = truth_dct2(x, inverse)
        else:
            want = ref.idct2(x.double()) if inverse else ref.dct2(x.double())
        assert_within_twice_torch(ours(x), want, torch_dct2(x, inverse),
                                  f"{what} {ours.__name__}")


@pytest.mark.parametrize("n", FAST_SIZES)
def test_dct2_fast_paths_float32(n, cpu_isa):
    _check_dct2(_rand(2, 3, n, n, seed=n), n)


@pytest.mark.parametrize("hw", [(8, 8), (64, 64), (256, 256), (8, 256), (256, 8), (64, 128),
                                (32, 16)])
def test_dct2_vector_passes_within_twice_torchs_error(hw, cpu_isa):
    # float32 planes with power-of-two sides 8..256 (square or not) take the vector passes:
    # at most twice the error of torch's float32 matrix DCT.
    _check_dct2(_rand(3, 2, *hw, seed=hw[0] + hw[1]), hw)


def test_cpu_results_do_not_depend_on_the_thread_count():
    # 16x3x256x256 is estimated at several ms, so with 2 threads the planes are split
    # between two (csrc/cpu_kernels.cpp, parallel_planes); each plane's bits stay the same.
    x = _rand(16, 3, 256, 256)
    a = torch.rand(16, 1, 256, 256, generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    got = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got.append((bf.dct2(x), bf.idct2(x), *bf.spectral(x, a, g=a, seed=5, return_noise=True)))
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*got):
        assert torch.equal(one, two)


@pytest.mark.parametrize("hw", ODD_SIZES)
def test_dct2_generic_sizes_float32(hw, cpu_isa):
    _check_dct2(_rand(4, *hw), hw)


@pytest.mark.parametrize("hw", [(1, 513), (384, 50), (513, 31)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dct2_long_generic_sides_within_twice_torchs_error(hw, dtype, cpu_isa):
    # Sums of hundreds of terms: in order and in the input's precision they had up to 3.3x
    # (float32) and 2.3x (float64) torch's error, which blocks its sums; the dense passes
    # sum wider: double for float32, Dot2 for float64 (csrc/cpu_kernels.cpp,
    # transform_plane_body and transform_plane_dot2).
    for seed in range(3):
        _check_dct2(_rand(2, *hw, seed=seed, dtype=dtype), (hw, dtype, seed))


def _ill_conditioned_dots(rng, n, in_float, trials=30, m=None):
    """(x, m, exact) with terms x_i m_i spread over 2^-20..2^20 and a last term cancelling the
    others' sum, so the exact result (a Fraction) is tiny against sum |x_i m_i|. m: the
    factors m_i (standard normals if None)."""
    from fractions import Fraction
    given = m
    for _ in range(trials):
        x = rng.standard_normal(n) * 2.0 ** rng.integers(-20, 21, n)
        m = rng.standard_normal(n) if given is None else given
        head = sum(Fraction(a) * Fraction(b) for a, b in zip(x[:-1], m[:-1]))
        x[-1] = float(-head / Fraction(m[-1]))
        if in_float:
            x = x.astype(np.float32).astype(np.float64)
        yield x, m, sum(Fraction(a) * Fraction(b) for a, b in zip(x, m))


@pytest.mark.parametrize("in_float", [True, False], ids=["float32", "float64"])
def test_simple_cuda_kernels_sums_against_exact(in_float):
    # DotSum (csrc/common.h): the sums of the simple CUDA kernels (sides that are not powers of
    # two), run on the host through a test binding. Against exact rational sums of
    # ill-conditioned products: float32, a double sum rounded once, within half a float ulp
    # plus n 2^-53 sum |x m|; float64, Dot2's bound (Ogita, Rump, Oishi 2005),
    # 2^-53 |exact| + g^2 sum |x m| with g = n 2^-53 / (1 - n 2^-53). Summing in order in the
    # input's precision (what the kernels did) breaks the bound on these inputs.
    from fractions import Fraction
    from blurfast._backend import _C
    n, u = 600, 2.0 ** -53
    g = n * u / (1 - n * u)
    naive_broke = 0
    for x, m, exact in _ill_conditioned_dots(np.random.default_rng(7), n, in_float):
        size = float(sum(abs(Fraction(a) * Fraction(b)) for a, b in zip(x, m)))
        if in_float:
            bound = 2.0 ** -24 * abs(float(exact)) + n * u * size
            naive = np.float32(0)
            for a, b in zip(x.astype(np.float32), m.astype(np.float32)):
                naive = np.float32(naive + a * b)
        else:
            bound = u * abs(float(exact)) + g * g * size
            naive = 0.0
            for a, b in zip(x, m):
                naive += a * b
        got = _C.dot_sum(x.tolist(), m.tolist(), in_float)
        assert abs(Fraction(got) - exact) <= Fraction(bound), (got, float(exact), bound)
        naive_broke += abs(Fraction(float(naive)) - exact) > Fraction(bound)
    assert naive_broke >= 20, naive_broke


@pytest.mark.parametrize("column", [False, True], ids=["row_pass", "column_pass"])
def test_dct2_float64_dense_passes_within_dot2_bound(column, cpu_isa):
    # float64 planes with a side that is not a power of two from 8 to 256 take the dense
    # passes, which sum by Dot2 as the simple CUDA kernels' DotSum (csrc/cpu_kernels.cpp,
    # transform_plane_dot2). A 1 x n plane (n x 1: column) is one pass, each output a sum of
    # n products x_i C[k, i] (the other pass multiplies by C of size 1, exactly 1). The
    # kernel's own matrix entries, read off one-hot planes (one exact product each), give
    # the exact rational sums of ill-conditioned products; the result must keep to Dot2's
    # bound, 2^-53 |exact| + g^2 sum |x m| with g = n 2^-53 / (1 - n 2^-53). x87 long
    # double sums (session 23's) miss it by far, and so does Dot2 with a rounded product
    # contracted into its TwoSum's addition.
    from fractions import Fraction
    n, u = 601, 2.0 ** -53
    g = n * u / (1 - n * u)
    shape = (n, 1) if column else (1, n)
    c = bf.dct2(torch.eye(n, dtype=torch.float64).reshape(n, *shape)).reshape(n, n).T
    assert torch.allclose(c, ref.dct_matrix(n), rtol=0, atol=1e-15)
    rng = np.random.default_rng(11)
    for k in (7, 600):
        m = c[k].numpy()
        for x, m, exact in _ill_conditioned_dots(rng, n, False, trials=8, m=m):
            got = bf.dct2(torch.from_numpy(x).reshape(shape)).reshape(n)[k].item()
            size = float(sum(abs(Fraction(a) * Fraction(b)) for a, b in zip(x, m)))
            bound = u * abs(float(exact)) + g * g * size
            assert abs(Fraction(got) - exact) <= Fraction(bound), (k, got, float(exact), bound)


@pytest.mark.parametrize("hw", [(100, 100), (1, 513), (7, 12)])
def test_dct2_float64_dense_passes_scale_exactly_up_to_the_largest_doubles(hw, cpu_isa):
    # The transforms are linear and Dot2's steps commute exactly with powers of two, so
    # scaling a plane by 2^k scales its result by 2^k, bit for bit, until the result
    # itself overflows. The baseline build's Dekker splits overflowed from 2^996 (NaN).
    x = _rand(2, *hw, dtype=torch.float64)
    for op in (bf.dct2, bf.idct2):
        y = op(x)
        for k in (900, 975, 985, 1000):
            got = op(x * 2.0 ** k)
            assert torch.isfinite(got).all(), (op.__name__, k)
            assert torch.equal(got, y * 2.0 ** k), (op.__name__, k)


@pytest.mark.parametrize("hw", [(64, 64), (7, 12), (256, 256), (8, 256), (32, 16)])
def test_dct2_float64(hw, cpu_isa):
    # The truth in long double (scipy's DCT of the same values in 64-bit mantissa arithmetic).
    x = _rand(2, *hw, dtype=torch.float64)
    assert bf.dct2(x).dtype == torch.float64
    _check_dct2(x, hw)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dct2_half_types_use_float32_arithmetic(dtype):
    x = _rand(2, 3, 32, 32).to(dtype)
    u = unit_roundoff(dtype)
    for ours, scipy_fn, inverse in ((bf.dct2, scipy.fft.dctn, False),
                                    (bf.idct2, scipy.fft.idctn, True)):
        y = ours(x)
        assert y.dtype == dtype
        # Exactly the float32 result rounded once to the half type.
        y32 = ours(x.float())
        assert torch.equal(y, y32.to(dtype))
        # Against scipy in float64 of the half inputs: the float32 result by the twice-torch
        # rule (error e32), and y within one rounding to the half type of it. Per element
        # |y - t| <= u |y32| + |y32 - t|, u the half type's unit roundoff (2**-11 float16,
        # 2**-8 bfloat16), so relative to max |t|: u (1 + e32) + e32.
        want = torch.from_numpy(scipy_fn(x.double().numpy(), axes=(-2, -1), norm="ortho"))
        e32 = assert_within_twice_torch(y32, want, torch_dct2(x.float(), inverse),
                                        f"{ours.__name__} float32 of half inputs")
        assert rel_err(y, want) <= u * (1 + e32) + e32, ours.__name__


@pytest.mark.parametrize("shape", [(16, 16), (5, 2, 3, 8, 8), (2, 1, 1, 7, 12)])
def test_any_rank(shape):
    x = _rand(*shape)
    assert bf.dct2(x).shape == x.shape
    _check_dct2(x, shape)


def test_round_trip_and_parseval():
    x = _rand(3, 3, 64, 64)
    assert_within_twice_torch(bf.idct2(bf.dct2(x)), x, torch_dct2(torch_dct2(x), inverse=True))
    X = bf.dct2(x.double())
    assert torch.allclose((X ** 2).sum((-2, -1)), (x.double() ** 2).sum((-2, -1)), rtol=1e-12)


def test_non_contiguous_and_empty():
    x = _rand(3, 32, 48)
    xt = x.transpose(-1, -2)                 # (3, 48, 32), not contiguous
    assert not xt.is_contiguous()
    _check_dct2(xt)
    e = torch.empty(0, 3, 8, 8)
    assert bf.dct2(e).shape == e.shape
    assert bf.spectral(e, torch.ones(8, 8), g=torch.ones(8, 8), seed=1).shape == e.shape
    # empty planes too (gaussian_blur built a map of side 0: "size: expected an int >= 1")
    for e in (torch.empty(2, 0, 8), torch.empty(3, 5, 0), torch.empty(0, 0)):
        assert bf.gaussian_blur(e, 1.0).shape == e.shape
        assert scipy.ndimage.gaussian_filter(e.numpy(), 1.0, mode="reflect").shape == e.shape
    with pytest.raises(ValueError, match="sigma: expected"):
        bf.gaussian_blur(torch.empty(2, 0, 8), -1.0)


# --------------------------------------------------------------- the fused op

def _maps(b, h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(*s, generator=g) for s in [(b, 1, h, w), (1, 1, h, w), (b, 1, 1, 1)]]


@pytest.mark.parametrize("hw", [(32, 32), (64, 64), (7, 12), (1, 1)])
def test_spectral_two_inputs_given_noise(hw):
    b = 4
    x, x2, zb = _rand(b, 3, *hw, seed=1), _rand(b, 3, *hw, seed=2), _rand(b, 3, *hw, seed=3)
    a, a2, g = _maps(b, *hw)
    out, npx = bf.spectral(x, a, x2, a2, g, zb, return_noise=True)
    want, want_n = ref.spectral(x.double(), a, x2.double(), a2, g, zb.double(), return_noise=True)
    peer, peer_n = torch_spectral(x, a, x2, a2, g, zb, return_noise=True)
    assert_within_twice_torch(out, want, peer, "out")
    assert_within_twice_torch(npx, want_n, peer_n, "noise")


def test_reference_returns_broadcast_noise_in_x_shape():
    # Broadcast noise (H, W): the returned idct2(zb) has x's shape, as the op's (the
    # reference returned (H, W)). Truth: scipy's inverse DCT of the broadcast noise.
    x, a = _rand(2, 3, 7, 12, dtype=torch.float64), torch.rand(7, 12, dtype=torch.float64)
    zb = _rand(7, 12, seed=1, dtype=torch.float64)
    want = torch.from_numpy(scipy.fft.idctn(zb.expand(x.shape).numpy(), axes=(-2, -1),
                                            norm="ortho"))
    for f in (ref.spectral, bf.spectral):
        npx = f(x, a, g=a, noise=zb, return_noise=True)[1]
        assert npx.shape == x.shape, f
        assert rel_err(npx, want) < 1e-12, f


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_spectral_half_types(dtype):
    # Half inputs x, x2 with float32 maps and noise: ops._run_spectral runs the float32
    # kernel on the half inputs' values (maps and noise taken in float32) and rounds the
    # results once to the half type. Truth: the formula in float64 on the half inputs'
    # values. The float32 results by the twice-torch rule (error e32, peer torch_spectral);
    # the half results within one rounding of them: |y - t| <= u |y32| + |y32 - t| per
    # element, so u (1 + e32) + e32 relative to max |t| (u = 2**-11 float16, 2**-8 bfloat16).
    b, hw = 4, (16, 24)
    x, x2 = _rand(b, 3, *hw, seed=1).to(dtype), _rand(b, 3, *hw, seed=2).to(dtype)
    zb = _rand(b, 3, *hw, seed=3)
    a, a2, g = _maps(b, *hw)
    u = unit_roundoff(dtype)
    gen = ref.philox_normal(x.shape, 3, 5, torch.float64)     # the noise of seed 3, offset 5
    cases = [  # (name, half call, float32 call, truth, peer)
        ("two inputs, given noise",
         lambda t, t2: bf.spectral(t, a, t2, a2, g, zb, return_noise=True),
         ref.spectral(x.double(), a, x2.double(), a2, g, zb.double(), return_noise=True),
         torch_spectral(x.float(), a, x2.float(), a2, g, zb, return_noise=True)),
        ("one input, generated noise",
         lambda t, t2: (bf.spectral(t, a, g=g, seed=3, offset=5),),
         (ref.spectral(x.double(), a, g=g, noise=gen),),
         (torch_spectral(x.float(), a, g=g, zb=gen),)),
    ]
    for name, call, wants, peers in cases:
        halves, singles = call(x, x2), call(x.float(), x2.float())
        for i, (y, y32, want, peer) in enumerate(zip(halves, singles, wants, peers)):
            assert y.dtype == dtype
            assert torch.equal(y, y32.to(dtype)), (name, i)
            e32 = assert_within_twice_torch(y32, want, peer, f"{name} [{i}] float32")
            assert rel_err(y, want) <= u * (1 + e32) + e32, (name, i)


@pytest.mark.parametrize("map_shape", [(4, 3, 16, 16), (1, 3, 16, 16), (16, 16), (4, 1, 1, 16),
                                       (4, 1, 1, 1), (1, 3, 1, 1), (4, 3, 1, 1)])
def test_spectral_map_broadcasting(map_shape):
    x = _rand(4, 3, 16, 16)
    a = torch.rand(map_shape, generator=torch.Generator().manual_seed(7))
    assert_within_twice_torch(bf.spectral(x, a), ref.spectral(x.double(), a), torch_spectral(x, a))


def test_spectral_materialized_broadcast():
    # Varying dims 0 and 2 with a broadcast dim between them: cannot be a (div, mod) view.
    x = _rand(2, 3, 4, 8, 8)
    a = torch.rand(2, 1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    assert_within_twice_torch(bf.spectral(x, a), ref.spectral(x.double(), a), torch_spectral(x, a))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spectral_generated_noise_matches_reference(dtype):
    x = _rand(3, 3, 16, 24, dtype=dtype)
    a, _, g = _maps(3, 16, 24)
    out, npx = bf.spectral(x, a, g=g, seed=12345, offset=77, return_noise=True)
    assert out.dtype == dtype
    # The truth takes the reference's float64 noise (the specification's numbers): the
    # kernel's own, float Box-Muller in float32 (within 4 * 2**-23 relatively, see
    # test_kernel_noise_equals_reference_noise), is part of its error.
    zb = ref.philox_normal(x.shape, 12345, 77, torch.float64)
    if dtype == torch.float64:
        want, want_n = truth_spectral(x, a, g=g, zb=zb, return_noise=True)
    else:
        want, want_n = ref.spectral(x.double(), a, g=g, noise=zb, return_noise=True)
    peer, peer_n = torch_spectral(x, a, g=g, zb=zb, return_noise=True)
    assert_within_twice_torch(out, want, peer, "out")
    assert_within_twice_torch(npx, want_n, peer_n, "noise")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_returned_without_g_is_drawn_but_not_added(dtype):
    # spectral(x, a, return_noise=True) with no g: the noise is drawn and returned (its
    # idct2), and out is idct2(a dct2(x)) alone; a ragged plane and an offset that is no
    # multiple of 4. A CPU kernel that drew zb only for g left the noise output unwritten.
    x = _rand(2, 3, 7, 12, dtype=dtype, seed=4)
    a = _maps(2, 7, 12)[0]
    out, npx = bf.spectral(x, a, seed=21, offset=5, return_noise=True)
    zb = ref.philox_normal(x.shape, 21, 5, torch.float64)
    if dtype == torch.float64:
        want, want_n = truth_spectral(x, a, zb=zb, return_noise=True)
    else:          # as above: the reference's float64 noise is the specification's
        want, want_n = ref.spectral(x.double(), a, noise=zb, return_noise=True)
    peer, peer_n = torch_spectral(x, a, zb=zb, return_noise=True)
    assert_within_twice_torch(out, want, peer, "out")
    assert_within_twice_torch(npx, want_n, peer_n, "noise")


def test_noise_stream_is_positional():
    x = torch.zeros(2, 3, 8, 8)
    full = normal_like(x, seed=9)
    # The second sample alone, with its offset, gets the same numbers.
    part = normal_like(x[1:], seed=9, offset=3 * 64)
    assert torch.equal(full[1:], part)
    assert torch.equal(full, normal_like(x, seed=9))
    assert not torch.equal(full, normal_like(x, seed=10))


def test_spectral_q_sample_form():
    """q_sample with given pixel noise = idct2(sqrt(ab) X0 + sqrt(1-ab) dct2(eps))."""
    x0, eps = _rand(2, 3, 16, 16, seed=4), _rand(2, 3, 16, 16, seed=5)
    ab = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    out = bf.spectral(x0, ab.sqrt(), eps, (1 - ab).sqrt())
    want = ref.idct2(ab.sqrt() * ref.dct2(x0.double()) + (1 - ab).sqrt() * ref.dct2(eps.double()))
    assert_within_twice_torch(out, want, torch_spectral(x0, ab.sqrt(), eps, (1 - ab).sqrt()))


# --------------------------------------------------------------- Philox

KAT = [  # Random123 kat_vectors, philox4x32 10: counter, key, expected
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_philox_known_answers(ctr, key, want):
    from blurfast._backend import _C
    assert tuple(_C.philox4x32_10(list(ctr), list(key))) == want
    assert tuple(int(v) for v in ref.philox4x32(ctr, key)) == want


# 2^40 + 3: Philox block counters above 2^32 (the counter's high word), unaligned;
# 2^63 - 7, the op's largest offsets: positions offset + i pass 2^63 within the tensor
@pytest.mark.parametrize("offset", [5, 2 ** 40 + 3, 2 ** 63 - 7])
def test_kernel_noise_equals_reference_noise(offset):
    x = torch.zeros(1000, 37)
    seed = 2 ** 40 + 17
    k = normal_like(x.double(), seed=seed, offset=offset)
    r = ref.philox_normal(x.shape, seed, offset, torch.float64)
    assert (k - r).abs().max() <= 1e-12
    # float32: Box-Muller evaluated in float (common.h box_muller_f), a few roundings of
    # relative size 2^-24 each: within 4 * 2^-23 of the float64 value, relatively, also
    # for numbers near zero (small radius or an angle near a quarter turn).
    k32 = normal_like(x, seed=seed, offset=offset).double()
    assert ((k32 - r).abs() <= 4 * 2.0 ** -23 * r.abs()).all()


def test_float_noise_same_bits_in_both_cpu_builds(monkeypatch):
    # box_muller_f is written so that no fma contraction can change a bit: the AVX2 build
    # (hardware fma) and the baseline build (libm fmaf) must agree exactly.
    x = torch.zeros(50_000)
    fast = normal_like(x, seed=21, offset=3)
    monkeypatch.setenv("BLURFAST_CPU_KERNELS", "baseline")
    assert torch.equal(normal_like(x, seed=21, offset=3), fast)


@pytest.mark.parametrize("w1", [0, 1, 2 ** 31, 0xB504F333, 0xB504F334, 0xFFFFFFF0, 0xFFFFFFFF])
@pytest.mark.parametrize("w2", [0, 0x3FFFFFFF, 0x40000000, 0x7FFFFFFF, 0xBFFFFFFF,
                                0xC0000000, 0xE0000000, 0xFFFFFFFF, 0x12345678])
def test_float_box_muller_at_the_edges(w1, w2):
    # Largest radius (w1 = 0), radius near zero (w1 near 2^32: u1 near 1), both sides of
    # the switch to 1 - u1, and angles at and beside each quarter turn, against float64.
    # The truth in 40 digits: float64 cos(2 pi u2) itself loses relative accuracy near
    # the zeros of cos and sin.
    mp = pytest.importorskip("mpmath").mp
    from blurfast._backend import _C
    c, s = _C.box_muller_f(w1, w2)
    with mp.workdps(40):
        u1, u2 = (mp.mpf(w1) + 0.5) / 2 ** 32, (mp.mpf(w2) + 0.5) / 2 ** 32
        r = mp.sqrt(-2 * mp.log(u1))
        truth = (float(r * mp.cos(2 * mp.pi * u2)), float(r * mp.sin(2 * mp.pi * u2)))
    for got, want in zip((c, s), truth):
        assert abs(got - want) <= 4 * 2.0 ** -23 * abs(want)


def test_noise_statistics():
    n = 1_000_000
    z = normal_like(torch.zeros(n, dtype=torch.float64), seed=3).numpy()
    se = 1 / math.sqrt(n)
    assert abs(z.mean()) < 5 * se
    assert abs(z.var() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z ** 3).mean()) < 5 * math.sqrt(15 / n)
    assert abs((z ** 4).mean() - 3) < 5 * math.sqrt(96 / n)
    # Kolmogorov-Smirnov against the normal CDF; neighbours uncorrelated.
    from scipy import stats
    assert stats.kstest(z[:200_000], "norm").pvalue > 1e-4
    assert abs(np.corrcoef(z[:-1], z[1:])[0, 1]) < 5 * se


# --------------------------------------------------------------- gaussian blur

BLUR_CASES = [((32, 32), 1.0), ((7, 12), 2.5), ((33, 20), 0.4), ((64, 64), 3.0), ((4, 4), 10.0),
              ((16, 24), (1.0, 2.0))]


def _gaussian_filter_long_double(x: np.ndarray, sigma, axis: int) -> np.ndarray:
    """scipy.ndimage.gaussian_filter1d(mode="reflect", truncate=4) written out in long double:
    the sampled kernel of radius int(4 sigma + 0.5), normalized, on the half-sample
    symmetric extension (numpy's "symmetric" padding, repeated for radii beyond the side)."""
    r = int(4.0 * sigma + 0.5)
    m = np.arange(-r, r + 1).astype(np.longdouble)
    w = np.exp(-m * m / (2 * np.longdouble(sigma) ** 2))
    w = w / w.sum()
    x = np.moveaxis(x, axis, -1)
    p = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(r, r)], mode="symmetric")
    n = x.shape[-1]
    return np.moveaxis(sum(w[j] * p[..., j:j + n] for j in range(2 * r + 1)), -1, axis)


@pytest.mark.parametrize("hw,sigma", BLUR_CASES)
def test_gaussian_blur_matches_scipy(hw, sigma):
    from blurfast.schedules import blur_eigenvalues_2d
    x = _rand(2, 3, *hw, dtype=torch.float64)
    d = blur_eigenvalues_2d(hw, sigma)      # the peers: torch's DCTs with blurfast's map
    # float32 against scipy itself (float64); float64 against scipy's filter in long double.
    want = np.stack([[scipy.ndimage.gaussian_filter(c, sigma, mode="reflect") for c in s]
                     for s in x.numpy()])
    assert_within_twice_torch(bf.gaussian_blur(x.float(), sigma), torch.from_numpy(want),
                              torch_spectral(x.float(), d), "float32")
    sh, sw = sigma if isinstance(sigma, tuple) else (sigma, sigma)
    exact = _gaussian_filter_long_double(
        _gaussian_filter_long_double(x.numpy().astype(np.longdouble), sh, -2), sw, -1)
    assert_within_twice_torch(bf.gaussian_blur(x, sigma), exact, torch_spectral(x, d), "float64")


@pytest.mark.parametrize("hw,sigma", BLUR_CASES)
def test_gaussian_blur_continuous_kernel(hw, sigma):
    # docs/process.md section 2: kind="continuous" is the heat equation,
    # lam[k] = exp(-(sigma pi k / N)^2 / 2) per side, d[k, l] = lam_H[k] lam_W[l], applied as
    # idct2(d * dct2(x)). The truth: that formula with scipy's DCTs in long double; the
    # peers: torch's DCTs in the dtype with the map from the formula in float64.
    sh, sw = sigma if isinstance(sigma, tuple) else (sigma, sigma)

    def lam(n, s, pi, xp, dtype):
        return xp.exp(-(s * pi * xp.arange(n, dtype=dtype) / n) ** 2 / 2)
    pi = np.arccos(np.longdouble(-1))
    d_exact = np.outer(lam(hw[0], sh, pi, np, np.longdouble), lam(hw[1], sw, pi, np, np.longdouble))
    d = torch.outer(lam(hw[0], sh, math.pi, torch, torch.float64),
                    lam(hw[1], sw, math.pi, torch, torch.float64))
    x = _rand(2, 3, *hw, dtype=torch.float64)
    for xd in (x.float(), x):
        exact = truth_spectral(xd, d_exact)
        assert_within_twice_torch(bf.gaussian_blur(xd, sigma, kind="continuous"), exact,
                                  torch_spectral(xd, d), str(xd.dtype))


# --------------------------------------------------------------- autograd, opcheck, compile

def test_gradcheck_dct2():
    x = _rand(2, 5, 6, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(bf.dct2, (x,))
    assert torch.autograd.gradcheck(bf.idct2, (x,))


def test_gradcheck_spectral_all_inputs():
    d = dict(dtype=torch.float64)
    x, x2 = _rand(2, 2, 5, 6, **d), _rand(2, 2, 5, 6, seed=1, **d)
    a, a2 = torch.rand(2, 1, 5, 6, **d), torch.rand(5, 6, **d)
    g, zb = torch.rand(1, 1, 5, 6, **d), _rand(2, 2, 5, 6, seed=2, **d)
    ins = [t.requires_grad_() for t in (x, a, x2, a2, g, zb)]

    def f(x, a, x2, a2, g, zb):
        out, n = bf.spectral(x, a, x2, a2, g, zb, return_noise=True)
        return out, n
    assert torch.autograd.gradcheck(f, ins)

    def f_gen(x, a, g):   # generated noise: gradient of g uses the regenerated stream
        return bf.spectral(x, a, g=g, seed=4, offset=2)
    assert torch.autograd.gradcheck(f_gen, (x, a, g))


def test_backward_to_the_noise_alone_is_g_times_dct2_of_grad_out():
    # out = idct2(a*dct2(x) + g*zb) with zb in frequency space, so d<w, out>/d zb =
    # g * dct2(w): the truth with scipy's orthonormal DCT in float64. Only zb requires grad
    # (the output gradient in frequency space must still be formed for it).
    d = dict(dtype=torch.float64)
    x, zb = _rand(2, 3, 6, 7, **d), _rand(2, 3, 6, 7, seed=1, **d).requires_grad_()
    a, g = torch.rand(2, 1, 6, 7, **d), torch.rand(1, 1, 6, 7, **d)
    w = _rand(2, 3, 6, 7, seed=2, **d)
    (bf.spectral(x, a, g=g, noise=zb) * w).sum().backward()
    want = g.numpy() * scipy.fft.dctn(w.numpy(), axes=(-2, -1), norm="ortho")
    # float64 transforms of 6- and 7-term sums: measured 6e-16, bound 1e-12
    assert rel_err(zb.grad, torch.from_numpy(want)) < 1e-12
    # and a broadcast (1, 1, H, W) noise, checked numerically
    zb1 = _rand(1, 1, 6, 7, seed=3, **d).requires_grad_()
    assert torch.autograd.gradcheck(lambda z: bf.spectral(x, a, g=g, noise=z), (zb1,))


def test_noise_has_no_gradient_and_spectral_twice_differentiable():
    # normal_like's values do not depend on x: d<x, normal_like(x)>/dx is the noise itself.
    # The backward of spectral with generated noise calls it on the saved x, so the second
    # derivatives (checked numerically) go through it.
    d = dict(dtype=torch.float64)
    x = _rand(2, 3, 5, 4, **d).requires_grad_()
    n = normal_like(x, 7, 3)
    (n * x).sum().backward()
    assert torch.equal(x.grad, n.detach())
    a, g = torch.rand(2, 1, 5, 4, **d), torch.rand(5, 4, **d)
    ins = [t.requires_grad_() for t in (x.detach(), a, g)]
    assert torch.autograd.gradgradcheck(lambda x, a, g: bf.spectral(x, a, g=g, seed=3), ins)


def test_opcheck():
    from torch.library import opcheck
    x = _rand(2, 3, 8, 8).requires_grad_()
    opcheck(torch.ops.blurfast.dct2.default, (x,))
    opcheck(torch.ops.blurfast.idct2.default, (x,))
    a = torch.rand(2, 1, 8, 8, requires_grad=True)
    g = torch.rand(8, 8)
    opcheck(torch.ops.blurfast.spectral.default, (x, a, x.detach() * 2, a, g, None, 3, 0, True))
    opcheck(torch.ops.blurfast.spectral.default, (x, a, None, None, g, _rand(2, 3, 8, 8), 3, 0, False))
    opcheck(torch.ops.blurfast.normal_like.default, (x.detach(), 1, 0))


def test_torch_compile_fullgraph():
    def step(x, a, g):
        y = bf.dct2(x) * 2
        return bf.spectral(bf.idct2(y), a, g=g, seed=7) + 1

    compiled = torch.compile(step, fullgraph=True)   # inductor, forward and backward
    x, a, g = _rand(2, 3, 16, 16), torch.rand(2, 1, 16, 16), torch.rand(16, 16)
    xc = x.clone().requires_grad_()
    xe = x.clone().requires_grad_()
    out_c, out_e = compiled(xc, a, g), step(xe, a, g)
    assert torch.allclose(out_c, out_e, atol=1e-5)
    (out_c ** 2).sum().backward()
    (out_e ** 2).sum().backward()
    assert torch.allclose(xc.grad, xe.grad, atol=1e-4)


def test_gaussian_blur_compiles_once_for_dynamic_sizes_and_sigmas():
    # torch.compile(dynamic=True): the blur map's argument check (math.isfinite of a
    # symbolic float) broke the graph (fullgraph=True failed), and Dynamo bypassed the
    # map's lru_cache with a warning. Now one graph serves every size and sigma, and each
    # call is scipy's blur (the truth: gaussian_filter, reflect).
    import warnings
    from torch._dynamo.utils import counters
    cases = (((8, 10), 1.5), ((9, 12), 1.5), ((9, 12), 2.25), ((11, 7), 0.8))

    def graphs(f, check=None):
        torch._dynamo.reset()
        counters.clear()
        f = torch.compile(f, dynamic=True, fullgraph=True, backend="eager")
        for hw, s in cases:
            x = _rand(2, 3, *hw, dtype=torch.float64)
            out = f(x, s)
            if check:
                check(x, s, out)
        return counters["stats"]["unique_graphs"]

    def check(x, s, out):
        want = scipy.ndimage.gaussian_filter(x.numpy(), (0, 0, s, s), mode="reflect")
        np.testing.assert_allclose(out.numpy(), want, atol=1e-12)

    # The graphs torch itself makes of a float argument: 1 on torch 2.11 and 2.13; 2.6
    # specializes the first sigma and recompiles once, with sigma dynamic: no more here.
    floor = graphs(lambda x, s: x * s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # the lru_cache warning among them
        assert graphs(lambda x, s: bf.gaussian_blur(x, s), check) == floor


def _dynamo_traces_item() -> bool:
    """Whether torch.compile(fullgraph=True) traces int(t.item()) with torch's defaults."""
    f = torch.compile(lambda x: x + int(torch.randint(0, 2 ** 62, (1,)).item()),
                      fullgraph=True, backend="eager")
    try:
        f(torch.zeros(2))
    except torch._dynamo.exc.Unsupported:
        return False
    finally:
        torch._dynamo.reset()
    return True


def test_torch_compile_fullgraph_draws_the_seed():
    # seed=None draws a seed from torch's generator (a data-dependent int under dynamo):
    # it traced into a failed guard on the range check. Each call draws afresh, and the
    # output is the formula on the returned noise (truth: scipy's DCTs in float64).
    a, g = torch.rand(2, 1, 8, 8, dtype=torch.float64), torch.rand(8, 8, dtype=torch.float64)
    x = _rand(2, 3, 8, 8, dtype=torch.float64)
    # torch 2.6's dynamo breaks the graph at any Tensor.item() (capture_scalar_outputs off):
    # there, the draw runs eagerly and the rest is still checked.
    step = torch.compile(lambda x: bf.spectral(x, a, g=g, return_noise=True),
                         fullgraph=_dynamo_traces_item(), backend="eager")
    (out, eps), (out2, eps2) = step(x), step(x)
    assert not torch.equal(eps, eps2)
    dct = lambda t: scipy.fft.dctn(t.numpy(), axes=(-2, -1), norm="ortho")
    for o, e in ((out, eps), (out2, eps2)):
        want = scipy.fft.idctn(a.numpy() * dct(x) + g.numpy() * dct(e), axes=(-2, -1),
                               norm="ortho")
        assert rel_err(o, torch.from_numpy(want)) < 1e-12


def test_training_backward_matches_reference():
    x = _rand(4, 3, 16, 16).requires_grad_()
    a = torch.rand(4, 1, 16, 16)
    w = _rand(4, 3, 16, 16, seed=9)
    (bf.spectral(x, a) * w).sum().backward()
    xr = x.detach().double().requires_grad_()
    (ref.spectral(xr, a) * w.double()).sum().backward()
    xp = x.detach().clone().requires_grad_()          # torch's float32 autograd: the peer
    (torch_spectral(xp, a) * w).sum().backward()
    assert_within_twice_torch(x.grad, xr.grad, xp.grad)


def test_backward_to_x_alone_transforms_nothing_extra(monkeypatch):
    # With only x requiring grad the backward is one spectral call: the frequency-space
    # output gradient (for the maps and the noise) is not computed.
    import blurfast.ops as ops
    calls = []
    real = ops._dct2_op
    monkeypatch.setattr(ops, "_dct2_op", lambda t: calls.append(1) or real(t))
    x = _rand(2, 3, 8, 8).requires_grad_()
    bf.spectral(x, torch.rand(2, 1, 8, 8), g=torch.rand(2, 1, 1, 1), seed=1).sum().backward()
    assert calls == []
    a = torch.rand(2, 1, 8, 8).requires_grad_()
    bf.spectral(x, a).sum().backward()
    assert len(calls) == 2            # gz and dct2(x), for a's gradient
    # the same under torch.func.grad (through blurfast's autograd.Function)
    g = torch.rand(2, 1, 1, 1)
    torch.func.grad(lambda x: bf.spectral(x, a.detach(), g=g, seed=1).sum())(x.detach())
    assert len(calls) == 2
    torch.func.grad(lambda a: bf.spectral(x.detach(), a).sum())(a.detach())
    assert len(calls) == 4


def test_maps_cached_under_inference_mode_still_train():
    # gaussian_blur's eigenvalue map and the reference's DCT matrices are cached; a first
    # call under torch.inference_mode() must not leave an inference tensor in the cache,
    # which a later call's backward could not save. The truth of each gradient with scipy:
    # d<w, blur(x)>/dx = blur(w) (the reflect blur is symmetric), d<w, dct2(x)>/dx = idct2(w).
    import blurfast.ops as ops
    ops._blur_map.cache_clear()
    ref._dct_matrix_cached.cache_clear()
    x = _rand(2, 11, 13, dtype=torch.float64)
    w = _rand(2, 11, 13, seed=1, dtype=torch.float64)
    with torch.inference_mode():
        bf.gaussian_blur(x, 1.3)
        ref.dct2(x)
    xg = x.clone().requires_grad_()
    (bf.gaussian_blur(xg, 1.3) * w).sum().backward()
    want = np.stack([scipy.ndimage.gaussian_filter(c, 1.3, mode="reflect") for c in w.numpy()])
    assert rel_err(xg.grad, torch.from_numpy(want)) < 1e-12
    xr = x.clone().requires_grad_()
    (ref.dct2(xr) * w).sum().backward()
    want = scipy.fft.idctn(w.numpy(), axes=(-2, -1), norm="ortho")
    assert rel_err(xr.grad, torch.from_numpy(want)) < 1e-12


# --------------------------------------------------------------- torch.func

# torch.func's transforms refuse the autograd.Function that register_autograd generates
# (pytorch/pytorch 168393, 179652); the ops go through their own Functions under a transform.

def _dct_kron(h, w):
    """The (H W, H W) matrix of the orthonormal 2-D DCT-II on row-major planes: kron(C_H, C_W)
    with C_n = scipy's orthonormal DCT-II of the identity (float64)."""
    c = lambda n: scipy.fft.dct(np.eye(n), norm="ortho", axis=0)
    return torch.from_numpy(np.kron(c(h), c(w)))


@pytest.mark.parametrize("hw", [(8, 8), (5, 7), (1, 6)])
def test_func_jacobians_of_dct2_are_the_dct_matrix(hw):
    # The transforms are linear: their Jacobian is the DCT matrix K (dct2) and K^T (idct2),
    # by reverse mode (jacrev: vmap over vjp), forward mode (jacfwd: vmap over jvp) and the
    # vjp/jvp of one vector. Float64 sums of <= 8 terms: measured <= 1.2e-15, bound 1e-14.
    h, w = hw
    k = _dct_kron(h, w)
    x = _rand(h, w, dtype=torch.float64)
    for f, want in ((bf.dct2, k), (bf.idct2, k.T)):
        for jac in (torch.func.jacrev, torch.func.jacfwd):
            got = jac(f)(x).reshape(h * w, h * w)
            assert rel_err(got, want) < 1e-14, (f.__name__, jac.__name__)
        v = _rand(h, w, seed=1, dtype=torch.float64)
        out, vjp = torch.func.vjp(f, x)
        assert rel_err(vjp(v)[0], (want.T @ v.reshape(-1)).reshape(h, w)) < 1e-14
        _, tangent = torch.func.jvp(f, (x,), (v,))
        assert rel_err(tangent, (want @ v.reshape(-1)).reshape(h, w)) < 1e-14


def test_func_grad_of_dct2_and_its_second_derivative():
    # grad of <w, dct2(x)>^2 / 2 is <w, dct2(x)> idct2(w) (K^T w); its Hessian is
    # K^T w (K^T w)^T: second order through the backward, by grad of grad and by
    # jacfwd of jacrev. Truth: scipy's DCT matrix in float64.
    x = _rand(2, 3, 4, 5, dtype=torch.float64)
    w = _rand(2, 3, 4, 5, seed=1, dtype=torch.float64)
    f = lambda x: (w * bf.dct2(x)).sum() ** 2 / 2
    ktw = torch.einsum("ij,bcj->bci", _dct_kron(4, 5).T, w.reshape(2, 3, 20)).reshape(x.shape)
    s = (w * bf.dct2(x)).sum()
    assert rel_err(torch.func.grad(f)(x), s * ktw) < 1e-13
    hess = torch.func.jacfwd(torch.func.jacrev(f))(x).reshape(120, 120)
    want = torch.outer(ktw.reshape(-1), ktw.reshape(-1))
    assert rel_err(hess, want) < 1e-13
    u = _rand(2, 3, 4, 5, seed=2, dtype=torch.float64)    # grad of a directional derivative
    hu = torch.func.grad(lambda x: (torch.func.grad(f)(x) * u).sum())(x)
    assert rel_err(hu, (want @ u.reshape(-1)).reshape(x.shape)) < 1e-13


def _spectral_inputs(broadcast: bool):
    d = dict(dtype=torch.float64)
    x, x2 = _rand(2, 3, 6, 7, **d), _rand(2, 3, 6, 7, seed=1, **d)
    if broadcast:   # the maps' gradients are summed back to their broadcast shapes
        a, a2, g, zb = (torch.rand(2, 1, 6, 7, **d), torch.rand(6, 7, **d),
                        torch.rand(1, 1, 6, 7, **d), _rand(1, 3, 6, 7, seed=2, **d))
    else:
        a, a2, g, zb = (torch.rand(2, 3, 6, 7, **d) for _ in range(4))
    return x, a, x2, a2, g, zb


@pytest.mark.parametrize("broadcast", [False, True])
def test_func_grad_of_spectral_matches_the_reference(broadcast):
    # torch.func.grad with respect to x, every map and the noise, of a nonlinear loss of both
    # outputs, against torch's autograd on the pure-PyTorch reference in float64 (its matrix
    # DCTs). Measured <= 6e-16 relatively; bound 1e-13.
    ins = _spectral_inputs(broadcast)
    w = _rand(2, 3, 6, 7, seed=3, dtype=torch.float64)

    def loss(f, x, a, x2, a2, g, zb):
        out, npx = f(x, a, x2, a2, g, zb, return_noise=True)
        return (w * out).sin().sum() + (out * npx).sum()
    got = torch.func.grad(lambda *t: loss(bf.spectral, *t), argnums=tuple(range(6)))(*ins)
    leaves = [t.clone().requires_grad_() for t in ins]
    want = torch.autograd.grad(loss(ref.spectral, *leaves), leaves)
    for name, gt, wt in zip(("x", "a", "x2", "a2", "g", "noise"), got, want):
        assert gt.shape == wt.shape, name
        assert rel_err(gt, wt) < 1e-13, name


def test_func_grad_of_spectral_with_generated_noise():
    # Noise made in the kernel from (seed, offset): the reference takes the same Philox
    # normals as given noise. Gradients of x, a and g (whose gradient uses the regenerated
    # stream), and the Hessian in g by jacfwd of jacrev (forward mode over the backward).
    x, a, _, _, g, _ = _spectral_inputs(True)
    zb = ref.philox_normal(x.shape, 11, 6, torch.float64)
    w = _rand(2, 3, 6, 7, seed=3, dtype=torch.float64)
    ours = lambda x, a, g: (w * bf.spectral(x, a, g=g, seed=11, offset=6)).sin().sum()
    theirs = lambda x, a, g: (w * ref.spectral(x, a, g=g, noise=zb)).sin().sum()
    got = torch.func.grad(ours, argnums=(0, 1, 2))(x, a, g)
    leaves = [t.clone().requires_grad_() for t in (x, a, g)]
    want = torch.autograd.grad(theirs(*leaves), leaves)
    for name, gt, wt in zip("xag", got, want):
        assert rel_err(gt, wt) < 1e-13, name
    hess = torch.func.jacfwd(torch.func.jacrev(ours, argnums=2), argnums=2)(x, a, g)
    want = torch.autograd.functional.hessian(lambda g: theirs(x, a, g), g)
    assert rel_err(hess, want) < 1e-12


def test_func_jvp_of_spectral_matches_the_reference():
    # Forward mode: the op is linear in x, x2 and the noise and in each map, so its tangent is
    # the sum of the op with one input replaced by its tangent at a time. Against the
    # reference's jvp (torch's forward AD through its matrix DCTs), with every input and
    # with a subset carrying a tangent; given noise (both outputs) and made noise.
    ins = _spectral_inputs(True)
    tans = [_rand(*t.shape, seed=10 + i, dtype=torch.float64) for i, t in enumerate(ins)]
    for idx in ((0, 1, 2, 3, 4, 5), (1, 4), (5,), (2,)):
        def call(f, *sub):
            args = list(ins)
            for i, t in zip(idx, sub):
                args[i] = t
            return f(*args, return_noise=True)
        primals, tangents = tuple(ins[i] for i in idx), tuple(tans[i] for i in idx)
        got = torch.func.jvp(lambda *s: call(bf.spectral, *s), primals, tangents)[1]
        want = torch.func.jvp(lambda *s: call(ref.spectral, *s), primals, tangents)[1]
        for name, gt, wt in zip(("out", "noise"), got, want):
            assert rel_err(gt, wt) < 1e-13, (idx, name)
    x, a, _, _, g, _ = ins
    zb = ref.philox_normal(x.shape, 4, 1, torch.float64)
    tx, ta, tg = tans[0], tans[1], tans[4]
    got = torch.func.jvp(lambda x, a, g: bf.spectral(x, a, g=g, seed=4, offset=1, return_noise=True),
                         (x, a, g), (tx, ta, tg))[1]
    want = ref.spectral(tx, a) + ref.spectral(x, ta) + ref.idct2(tg * zb)
    assert rel_err(got[0], want) < 1e-13
    assert torch.equal(got[1], torch.zeros_like(x))      # made noise: no tangent


def test_func_vmap_of_grad_gives_per_sample_gradients():
    # Per-sample gradients (vmap of grad) equal a loop of single-sample gradients, through
    # dct2, idct2, the fused op with made noise (each sample draws the same stream, as a
    # single-sample call does) and gaussian_blur; float32 inputs, per-sample maps. No
    # warning: every op batches in one call.
    x = _rand(4, 3, 8, 8)
    a = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    g = torch.rand(8, 8, generator=torch.Generator().manual_seed(2))

    def loss(x, a):          # one sample: x (3, 8, 8), a (1, 8, 8)
        y = bf.spectral(bf.idct2(bf.dct2(x) * 0.5), a, g=g, seed=7, offset=3)
        return (bf.gaussian_blur(y, 1.0) ** 2).sum() + (a * bf.dct2(a)).sum()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)))(x, a)
    for i in range(4):
        one = torch.func.grad(loss, argnums=(0, 1))(x[i], a[i])
        for got, want in zip(per_sample, one):
            assert torch.allclose(got[i], want, rtol=1e-6, atol=1e-6), i
    # and against autograd on the reference in float64, sample by sample
    xr = x.double().requires_grad_()
    zb = ref.philox_normal((3, 8, 8), 7, 3, torch.float64)
    blur = bf.ops._blur_map(8, 8, 1.0, "discrete", torch.device("cpu"), torch.float64)
    for i in range(4):
        ar = a[i].double().requires_grad_()
        y = ref.spectral(ref.idct2(ref.dct2(xr[i]) * 0.5), ar, g=g, noise=zb)
        total = (ref.spectral(y, blur) ** 2).sum() + (ar * ref.dct2(ar)).sum()
        gx, ga = torch.autograd.grad(total, (xr, ar))
        assert rel_err(per_sample[0][i], gx[i]) < 1e-5, i
        assert rel_err(per_sample[1][i], ga) < 1e-5, i


def test_func_vmap_of_dct2_batches_in_one_call(monkeypatch):
    # dct2 and idct2 move vmap's dimension in front and transform every plane in one call
    # (not torch's loop of one call per sample): the same bits as a loop, at any in_dims.
    import blurfast.ops as ops
    calls = []
    real = ops._dct2_op
    monkeypatch.setattr(ops, "_dct2_op", lambda t: calls.append(t.shape) or real(t))
    x = _rand(5, 3, 8, 12)
    got = torch.func.vmap(bf.dct2, in_dims=2, out_dims=1)(x.permute(1, 2, 0, 3))
    assert calls == [(5, 3, 8, 12)]
    assert torch.equal(got.permute(1, 0, 2, 3), torch.stack([real(t) for t in x]))
    assert torch.equal(torch.func.vmap(bf.idct2)(x), torch.stack([bf.idct2(t) for t in x]))


# vmap of spectral and normal_like: one kernel call for the batch (their vmap staticmethods),
# the same bits as a loop of single-sample calls, and no warning (torch's generated rule ran
# the custom op once per sample, warning each time "There is a performance drop because we
# have not yet implemented the batching rule for blurfast::spectral").

V = 3          # vmap's batch size in these tests
SAMPLE = (2, 3, 8, 8)

# name: {argument: (logical shape, vmap dim or None)}; an argument left out is None
VMAP_CASES = {
    "x": dict(x=(SAMPLE, 0), a=((8, 8), None), g=((1, 3, 8, 8), None)),
    "x batched at dim 2": dict(x=(SAMPLE, 2), a=((2, 1, 8, 8), None), g=((8, 8), None)),
    "x2 only": dict(x=(SAMPLE, None), a=((8, 8), None), x2=(SAMPLE, 1), a2=((3, 8, 8), None),
                    g=((8, 8), None)),
    "a (H, W) against 4-D x, x unbatched": dict(x=(SAMPLE, None), a=((8, 8), 0),
                                                g=((8, 8), None)),
    "a (H, W) against 4-D x": dict(x=(SAMPLE, 0), a=((8, 8), 2), g=((3, 8, 8), None)),
    "a2 (B, 1, H, W)": dict(x=(SAMPLE, 0), a=((8, 8), None), x2=(SAMPLE, 0),
                            a2=((2, 1, 8, 8), 1)),
    "g broadcast in H, x unbatched": dict(x=(SAMPLE, None), a=((1, 8), None),
                                          g=((3, 1, 8), 3)),
    "g (1, C, H, W), materialized": dict(x=(SAMPLE, 0), a=((8, 8), None), g=((1, 3, 8, 8), 0)),
    "noise given, batched": dict(x=(SAMPLE, 0), a=((8, 8), None), g=((8, 8), None),
                                 noise=((3, 8, 8), 1)),
    "noise given, only it batched": dict(x=(SAMPLE, None), a=((8, 8), None),
                                         g=((2, 1, 8, 8), None), noise=(SAMPLE, 4)),
    "noise given, unbatched": dict(x=(SAMPLE, 0), a=((8, 8), 0), g=((8, 8), None),
                                   noise=((1, 3, 8, 8), None)),
    "no noise": dict(x=(SAMPLE, 1), a=((2, 3, 8, 8), 0)),
    "everything": dict(x=(SAMPLE, 0), a=((3, 8, 8), 1), x2=(SAMPLE, 4), a2=((8, 1), 0),
                       g=((2, 1, 8, 8), 2), noise=((8, 8), 0)),
    "everything, made noise": dict(x=(SAMPLE, 3), a=((1, 1, 8, 8), 0), x2=(SAMPLE, None),
                                   a2=((2, 3, 8, 8), 4), g=((1, 8), 1)),
}


def _count_kernel_runs(monkeypatch):
    """The shapes of x that _run_spectral and _run_normal (the custom ops' bodies, the kernel
    calls) are given, as they are called."""
    import blurfast.ops as ops
    runs = {"spectral": [], "normal": []}
    real_s, real_n = ops._run_spectral, ops._run_normal
    monkeypatch.setattr(ops, "_run_spectral",
                        lambda x, *r: runs["spectral"].append(tuple(x.shape)) or real_s(x, *r))
    monkeypatch.setattr(ops, "_run_normal",
                        lambda x, *r: runs["normal"].append((tuple(x.shape), x.dtype)) or
                        real_n(x, *r))
    return runs


def _vmap_args(case, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    args = {}
    for name, (shape, bdim) in case.items():
        if bdim is not None:
            shape = shape[:bdim] + (V,) + shape[bdim:]
        t = (torch.randn if name in ("x", "x2", "noise") else torch.rand)(
            shape, generator=gen, dtype=torch.float64)
        args[name] = t.to(dtype)
    return args


@pytest.mark.parametrize("return_noise", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(VMAP_CASES))
def test_func_vmap_of_spectral_is_one_call_with_the_loops_bits(name, dtype, return_noise,
                                                               monkeypatch):
    case = VMAP_CASES[name]
    args = _vmap_args(case, dtype)
    batched = [n for n in args if case[n][1] is not None]
    fixed = {n: t for n, t in args.items() if case[n][1] is None}

    def one(*ts):
        return bf.spectral(**fixed, **dict(zip(batched, ts)), seed=2 ** 40 + 9, offset=5,
                           return_noise=return_noise)
    runs = _count_kernel_runs(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = torch.func.vmap(one, in_dims=tuple(case[n][1] for n in batched))(
            *(args[n] for n in batched))
    made = "noise" not in case and ("g" in case or return_noise)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    assert runs == {"spectral": [(V,) + SAMPLE], "normal": [(SAMPLE, ct)] if made else []}
    loop = [one(*(args[n].select(case[n][1], k) for n in batched)) for k in range(V)]
    if return_noise:
        for i in range(2):
            assert torch.equal(got[i], torch.stack([w[i] for w in loop])), i
    else:
        assert torch.equal(got, torch.stack(loop))


def test_func_vmap_of_spectral_half_and_out_dims(monkeypatch):
    # Half precision (float32 arithmetic and noise, rounded once to half), vmap over dim 1
    # with out_dims=2, and an empty batch (which torch's fallback refused).
    x = _rand(2, V, 8, 8, dtype=torch.float16)
    g = torch.rand(8, 8)
    one = lambda x: bf.spectral(x, g, g=g, seed=4, offset=1, return_noise=True)
    runs = _count_kernel_runs(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = torch.func.vmap(one, in_dims=1, out_dims=2)(x)
    # (on CPU the half runner runs itself again on float32 copies: every run sees the batch)
    assert set(runs["spectral"]) == {(V, 2, 8, 8)}
    assert runs["normal"] == [((2, 8, 8), torch.float32)]
    for i in range(2):
        assert torch.equal(got[i].movedim(2, 0), torch.stack([one(x[:, k])[i] for k in range(V)]))
    empty = torch.func.vmap(one)(torch.zeros(0, 3, 8, 8))
    assert empty[0].shape == empty[1].shape == (0, 3, 8, 8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_kernel_noise_is_normal_like_in_the_compute_dtype(dtype):
    # The claim vmap's rule rests on: noise made in the kernel from (seed, offset) is
    # normal_like(x) in x's compute dtype, to the bit (given as noise, the same outputs).
    x, a, g = _rand(2, 3, 8, 8, dtype=dtype), torch.rand(8, 8), torch.rand(3, 8, 8)
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    zb = normal_like(torch.empty(x.shape, dtype=ct), seed=77, offset=2 ** 40 + 1)
    made = bf.spectral(x, a, g=g, seed=77, offset=2 ** 40 + 1, return_noise=True)
    given = bf.spectral(x, a, g=g, noise=zb, return_noise=True)
    for m, gv in zip(made, given):
        assert torch.equal(m, gv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("in_dim", [0, 2, -1])
def test_func_vmap_of_normal_like_is_one_call(dtype, in_dim, monkeypatch):
    # One sample's stream, the same in every sample (unbatched: vmap expands it), made once.
    x = _rand(4, 5, 6, dtype=dtype).movedim(0, in_dim)
    runs = _count_kernel_runs(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        got = torch.func.vmap(lambda t: normal_like(t, 3, 7), in_dims=in_dim)(x)
    assert runs["normal"] == [((5, 6), dtype)]
    loop = torch.stack([normal_like(x.select(in_dim, k), 3, 7) for k in range(4)])
    assert torch.equal(got, loop)
    assert torch.func.vmap(lambda t: normal_like(t, 3))(torch.zeros(0, 2, 2)).shape == (0, 2, 2)


def test_func_transforms_around_vmap_of_spectral():
    # The batched call goes through _spectral_call: transforms outside vmap see it. grad of a
    # sum over vmap is the sum of per-sample gradients; vmap of vmap is a loop of loops;
    # jacrev (vmap over vjp) and jacfwd (vmap over jvp) of a vmapped function agree with the
    # reference's Jacobians, and its Hessian in g; jvp of a vmap; torch's own autograd
    # (.backward) through a vmap, whose batched call saves the one sample's noise it was
    # given (made for the whole batch, g's gradient would take other stream positions).
    # Float64, made noise throughout.
    x = _rand(V, 2, 6, 7, dtype=torch.float64)
    a = torch.rand(V, 6, 7, dtype=torch.float64)
    g = torch.rand(6, 7, dtype=torch.float64)
    w = _rand(2, 6, 7, seed=3, dtype=torch.float64)
    zb = ref.philox_normal((2, 6, 7), 11, 4, torch.float64)
    one = lambda x, a, g: bf.spectral(x, a, g=g, seed=11, offset=4)
    per = lambda x, a, g: (w * one(x, a, g)).sin().sum()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        # grad(sum of vmap) against autograd on the reference
        total = lambda x, a, g: torch.func.vmap(per, in_dims=(0, 0, None))(x, a, g).sum()
        got = torch.func.grad(total, argnums=(0, 1, 2))(x, a, g)
        leaves = [t.clone().requires_grad_() for t in (x, a, g)]
        s = sum((w * ref.spectral(leaves[0][k], leaves[1][k], g=leaves[2], noise=zb)).sin().sum()
                for k in range(V))
        want_grad = torch.autograd.grad(s, leaves)
        for n, gt, wt in zip("xag", got, want_grad):
            assert rel_err(gt, wt) < 1e-13, n
        # vmap of vmap (x batched twice, a once)
        xx = _rand(2, V, 2, 6, 7, seed=5, dtype=torch.float64)
        inner = torch.func.vmap(one, in_dims=(0, 0, None))
        got = torch.func.vmap(inner, in_dims=(0, None, None))(xx, a, g)
        assert torch.equal(got, torch.stack([torch.stack([one(xx[i, k], a[k], g)
                                                          for k in range(V)]) for i in range(2)]))
        # Jacobians of the batched op in g, by reverse and forward mode
        f = lambda g: torch.func.vmap(one, in_dims=(0, 0, None))(x, a, g)
        want = torch.autograd.functional.jacobian(
            lambda g: torch.stack([ref.spectral(x[k], a[k], g=g, noise=zb) for k in range(V)]), g)
        for jac in (torch.func.jacrev, torch.func.jacfwd):
            assert rel_err(jac(f)(g), want) < 1e-13, jac.__name__
        # jvp of a vmap, tangents in x and a
        tx = _rand(*x.shape, seed=6, dtype=torch.float64)
        ta = _rand(*a.shape, seed=7, dtype=torch.float64)
        _, t = torch.func.jvp(lambda x, a: torch.func.vmap(one, in_dims=(0, 0, None))(x, a, g),
                              (x, a), (tx, ta))
        want = torch.stack([ref.spectral(tx[k], a[k]) + ref.spectral(x[k], ta[k])
                            for k in range(V)])
        assert rel_err(t, want) < 1e-13
        # Hessian in g of the summed loss (forward over reverse over vmap)
        hess = torch.func.hessian(total, argnums=2)(x, a, g)
        want = torch.autograd.functional.hessian(
            lambda g: sum((w * ref.spectral(x[k], a[k], g=g, noise=zb)).sin().sum()
                          for k in range(V)), g)
        assert rel_err(hess, want) < 1e-12
        # .backward() through vmap, outside torch.func's grad
        leaves = [t.clone().requires_grad_() for t in (x, a, g)]
        torch.func.vmap(per, in_dims=(0, 0, None))(*leaves).sum().backward()
        for n, leaf, wt in zip("xag", leaves, want_grad):
            assert rel_err(leaf.grad, wt) < 1e-13, n


def test_normal_like_under_func_transforms():
    # The noise does not depend on x's values: zero gradient and tangent; under vmap each
    # sample gets the stream of a single-sample call.
    x = _rand(3, 2, 4, 5, dtype=torch.float64)
    assert torch.equal(torch.func.grad(lambda x: (normal_like(x, 5) * x).sum())(x),
                       normal_like(x, 5))
    _, t = torch.func.jvp(lambda x: normal_like(x, 5), (x,), (torch.ones_like(x),))
    assert torch.equal(t, torch.zeros_like(x))
    got = torch.func.vmap(lambda x: normal_like(x, 5, 2))(x)
    assert torch.equal(got, normal_like(x[0], 5, 2).expand(x.shape))


def test_forward_ad_without_func():
    # torch.autograd.forward_ad (dual tensors, no torch.func) takes the same jvp formulas;
    # outside a dual level the custom ops are called as before (grad_fn names unchanged).
    import torch.autograd.forward_ad as fwad
    x, a = _rand(2, 6, 7, dtype=torch.float64), torch.rand(6, 7, dtype=torch.float64)
    tx = _rand(2, 6, 7, seed=1, dtype=torch.float64)
    with fwad.dual_level():
        y = bf.spectral(fwad.make_dual(x, tx), a)
        assert rel_err(fwad.unpack_dual(y).tangent, ref.spectral(tx, a)) < 1e-13
        z = bf.idct2(fwad.make_dual(x, tx))
        assert rel_err(fwad.unpack_dual(z).tangent, ref.idct2(tx)) < 1e-13
    xg = x.clone().requires_grad_()
    assert "blurfast_dct2" in type(bf.dct2(xg).grad_fn).__name__
    assert "blurfast_spectral" in type(bf.spectral(xg, a).grad_fn).__name__


# --------------------------------------------------------------- errors

@pytest.mark.parametrize("call,exc,words", [
    (lambda: bf.dct2(torch.zeros(5)), ValueError, "x: expected at least 2 dims"),
    (lambda: bf.dct2(torch.zeros(4, 4, dtype=torch.int64)), TypeError, "x: expected dtype"),
    (lambda: bf.dct2([[1.0]]), TypeError, "x: expected a torch.Tensor"),
    (lambda: bf.idct2(torch.zeros(3)), ValueError, "X: expected at least 2 dims"),
    (lambda: bf.spectral(torch.zeros(2, 3, 8, 8), torch.ones(2, 8, 8)), ValueError, "a: shape"),
    (lambda: bf.spectral(torch.zeros(2, 3, 8, 8), torch.ones(8, 8), g=torch.ones(2, 2, 8, 8)),
     ValueError, "g: shape"),
    (lambda: bf.spectral(torch.zeros(3, 8, 8), torch.ones(1, 3, 8, 8)), ValueError, "a: shape"),
    (lambda: bf.spectral(torch.zeros(8, 8), torch.ones(8, 8), torch.zeros(8, 8)), ValueError,
     "x2, a2"),
    (lambda: bf.spectral(torch.zeros(8, 8), torch.ones(8, 8), torch.zeros(4, 4), torch.ones(8, 8)),
     ValueError, "x2: expected shape"),
    (lambda: bf.spectral(torch.zeros(8, 8), torch.ones(8, 8, dtype=torch.int32)), TypeError, "a:"),
    (lambda: bf.spectral(torch.zeros(8, 8), torch.ones(8, 8), g=torch.ones(8, 8), seed=-1),
     ValueError, "seed"),
    (lambda: bf.spectral(torch.zeros(8, 8), torch.ones(8, 8), noise=torch.ones(8, 8)), ValueError,
     "noise: given but unused"),
    (lambda: bf.spectral(torch.zeros(8, 8), torch.ones(8, 8, device="meta")), ValueError,
     "a: is on meta"),
    (lambda: bf.spectral(torch.zeros(8, 8), torch.ones(8, 8), torch.zeros(8, 8).double(),
                         torch.ones(8, 8)), TypeError, "x2: expected x's dtype torch.float32"),
    (lambda: bf.gaussian_blur(torch.zeros(8, 8), "abc"), ValueError, "sigma: expected"),
    (lambda: bf.gaussian_blur(torch.zeros(8, 8), (1.0, 2.0, 3.0)), ValueError, "sigma: expected"),
    (lambda: bf.gaussian_blur(torch.zeros(8, 8), None), ValueError, "sigma: expected"),
    # float() took these as 1.0, 2.0 and 1.5
    (lambda: bf.gaussian_blur(torch.zeros(8, 8), True), ValueError, "sigma: expected"),
    (lambda: bf.gaussian_blur(torch.zeros(8, 8), (1.0, "2")), ValueError, "sigma: expected"),
    (lambda: bf.gaussian_blur(torch.zeros(8, 8), torch.tensor(1.5)), ValueError,
     "sigma: expected"),
])
def test_bad_input_names_the_argument(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


@pytest.mark.parametrize("x2, a2, words", [
    (torch.zeros(4, 8, 8), None, "x2, a2: give both"),                   # was a segfault
    (None, torch.ones(8, 8), "x2, a2: give both"),                       # x2 silently dropped
    (torch.zeros(1, 8, 8), torch.ones(8, 8), r"x2: expected x's shape"),  # read past its end
    (torch.zeros(4, 8, 8, dtype=torch.float64), torch.ones(8, 8), "x2: expected"),  # NaN
])
def test_custom_op_called_directly_checks_what_the_kernel_trusts(x2, a2, words):
    # torch.ops.blurfast.spectral is documented for direct calls, which skip spectral()'s
    # checks: the kernel must not read through a null pointer or past a buffer's end.
    x, a = torch.zeros(4, 8, 8), torch.ones(8, 8)
    with pytest.raises(ValueError, match=words):
        torch.ops.blurfast.spectral(x, a, x2, a2, None, None, 0, 0, False)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode, pytest.raises(ValueError,
                                                                                match=words):
        f = mode.from_tensor
        torch.ops.blurfast.spectral(f(x), f(a), None if x2 is None else f(x2),
                                    None if a2 is None else f(a2), None, None, 0, 0, False)


def test_custom_op_called_directly_refuses_maps_of_more_dims_than_x():
    # (4, 1, 8, 8) against x (4, 8, 8) broadcasts to (4, 4, 8, 8): it was read as one map
    # per plane of x, an output of x's shape.
    x, a = torch.zeros(4, 8, 8), torch.ones(4, 1, 8, 8)
    for args in ((x, a, None, None, None, None), (x, a[0, 0], None, None, a, None),
                 (x, a[0, 0], None, None, a[0, 0], a)):
        with pytest.raises(ValueError, match=r"does not broadcast to x's shape \(4, 8, 8\)"):
            torch.ops.blurfast.spectral(*args, 0, 0, False)


@pytest.mark.parametrize("name", ["a", "a2", "g", "noise"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64])
def test_custom_op_called_directly_refuses_the_maps_spectral_refuses(name, dtype):
    # An integer map or noise was converted by the direct op, refused by spectral(): now
    # both refuse it alike, eagerly and under FakeTensorMode (torch.compile's tracing).
    x, m = torch.zeros(2, 8, 8), torch.ones(8, 8)
    kw = dict(x=x, a=m, x2=None, a2=None, g=None, noise=None)
    if name == "a2":
        kw["x2"] = x
    kw[name] = torch.ones(x.shape if name == "noise" else m.shape, dtype=dtype)
    words = rf"^{name}: expected a floating-point map, got {dtype}$"
    with pytest.raises(TypeError, match=words):
        bf.spectral(**kw)
    with pytest.raises(TypeError, match=words):
        torch.ops.blurfast.spectral(*kw.values(), 0, 0, False)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode, pytest.raises(TypeError,
                                                                                match=words):
        torch.ops.blurfast.spectral(*(None if t is None else mode.from_tensor(t)
                                      for t in kw.values()), 0, 0, False)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.bool,
                                   torch.complex64])
def test_custom_ops_called_directly_name_x_and_the_dtypes_they_take(dtype):
    # An integer (or bool, complex) x reached the kernels' dtype table: a KeyError naming
    # the dtype alone. Eagerly and under FakeTensorMode (torch.compile's tracing) alike.
    x, a = torch.zeros(2, 8, 8, dtype=dtype), torch.ones(8, 8)
    calls = [lambda x: torch.ops.blurfast.dct2(x), lambda x: torch.ops.blurfast.idct2(x),
             lambda x: torch.ops.blurfast.spectral(x, a, None, None, None, None, 0, 0, False),
             lambda x: torch.ops.blurfast.normal_like(x, 0, 0),
             lambda x: bf.dct2(x), lambda x: bf.spectral(x, a)]
    words = rf"^x: expected dtype float32, float64, float16 or bfloat16, got {dtype}$"
    for call in calls:
        with pytest.raises(TypeError, match=words):
            call(x)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx, a = mode.from_tensor(x), mode.from_tensor(a)
        for call in calls[:4]:
            with pytest.raises(TypeError, match=words):
                call(fx)


def test_cuda_tensor_without_cuda_kernels(monkeypatch):
    import blurfast.ops as ops
    monkeypatch.setattr(ops, "HAS_CUDA_KERNELS", False)
    fake_cuda = torch.empty(2, 2, device="meta")
    monkeypatch.setattr(type(fake_cuda), "device", property(lambda self: torch.device("cuda", 0)))
    with pytest.raises(ValueError, match="built without CUDA kernels"):
        ops._check_data("x", fake_cuda)


# The rules of NVIDIA's CUDA compatibility guide, by hand: real code sm_XY runs on
# capability X.y for y >= Y; PTX compute_XY on every capability >= X.Y; sm_XYa only on X.Y;
# sm_XYf and compute_XYf (family-specific) on X.y for y >= Y only.
@pytest.mark.parametrize("cap,archs,runs", [
    ((7, 5), ["80-real", "86-real", "89-real", "90"], False),     # T4: default build
    ((8, 0), ["80-real", "86-real", "89-real", "90"], True),
    ((8, 7), ["80-real", "86-real", "89-real", "90"], True),      # Orin: sm_80 code
    ((12, 0), ["80-real", "86-real", "89-real", "90"], True),     # Blackwell: PTX 90
    ((8, 6), ["90"], False),
    ((8, 0), ["86-real"], False),
    ((9, 0), ["80-real"], False),                                  # no sm_80 code on sm_90
    ((9, 0), ["80-virtual"], True),
    ((10, 0), ["90a-real"], False),
    ((9, 0), ["90a-real"], True),
    ((10, 3), ["100f"], True),
    ((12, 0), ["100f"], False),                                    # was True: PTX taken as any
    ((11, 0), ["100f-virtual"], False),
    ((10, 0), ["103f"], False),
    ((9, 0), ["native"], None),                                    # unknown: not refused
])
def test_archs_run_on(cap, archs, runs):
    from blurfast._backend import archs_run_on
    assert archs_run_on(cap, archs) is runs


def test_describe_archs_names_the_code_each_entry_holds():
    from blurfast._backend import describe_archs
    assert describe_archs(["80-real", "90-virtual", "90a"]) == \
        "sm_80, PTX compute_90, sm_90a + PTX compute_90a"        # 90-virtual: was sm_90 + PTX


def test_gpu_without_code_in_this_build_is_named(monkeypatch):
    import blurfast._backend as backend
    monkeypatch.setattr(backend, "CUDA_ARCHS", ["80-real", "90"])
    monkeypatch.setattr(backend, "_DEVICES_CHECKED", set())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "Tesla T4")
    with pytest.raises(RuntimeError, match=r"cuda:1 \(Tesla T4, compute capability 7\.5\)\. "
                                           r"Rebuild with BLURFAST_CUDA_ARCHS"):
        backend.check_cuda_device(1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (8, 6))
    backend.check_cuda_device(1)
    assert backend._DEVICES_CHECKED == {1}
