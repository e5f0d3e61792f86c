"""The fast CUDA programs, run on the CPU by their emulator (csrc/emulate.cpp).

The emulator executes the kernels' own phase code (csrc/plane_program.h: the fused
whole-plane kernel; csrc/strip_program.h: the strip pass) thread by thread, so these
tests check their indexing, shared-memory layout, even/odd transform, plane grouping,
persistent block loop, prefetching and noise numbering without a GPU. Shared memory
starts as NaN (a read of an unwritten value poisons the output), and running the blocks
and each phase's threads in reverse order must give bit-identical results (a thread
reading what another thread writes in the same phase, or a block writing output that
another block owns, would change them).
"""
import numpy as np
import pytest
import torch

from blurfast import reference as ref
from blurfast._backend import _C, DTYPE_CODES
from blurfast.ops import spectral_kernel_args
from bfutil import (assert_within_twice_torch, torch_dct2, torch_fft_dct2, torch_spectral,
                    truth_philox_normal)

SIZES = (32, 64, 128)
# (N, split, fast): dense passes in every geometry; fast passes (no split 2 at 128; split
# 4, the wide geometry, at 64 only).
GEOMETRIES = [(32, 1, False), (64, 1, False), (64, 2, False), (128, 1, False), (128, 2, False),
              (32, 1, True), (64, 1, True), (64, 2, True), (64, 4, True), (128, 1, True)]
GEOMETRY_IDS = [f"{n}-split{s}-{'fast' if f else 'dense'}" for n, s, f in GEOMETRIES]
DCT2, IDCT2, SPECTRAL = 0, 1, 2


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).float()


def emulate_dct(x, inverse, grid=2, reverse=False, split=1, fast=False, prefetch=False):
    out = torch.empty_like(x)
    n = x.shape[-1]
    _C.plane_emulate(x.numel() // (n * n), n, n, DTYPE_CODES[x.dtype], x.data_ptr(), 0, None,
                     None, None, 0, 0, 0, out.data_ptr(), 0, IDCT2 if inverse else DCT2, grid,
                     reverse, split, fast, prefetch)
    return out


def emulate_spectral(x, a, x2=None, a2=None, g=None, noise=None, *, seed=0, offset=0,
                     return_noise=False, grid=2, reverse=False, split=1, fast=False,
                     prefetch=False):
    out = torch.empty_like(x)
    noise_px = torch.empty_like(x) if return_noise else None
    args, keep = spectral_kernel_args(x, a, x2, a2, g, noise, seed, offset, out, noise_px)
    _C.plane_emulate(*args, SPECTRAL, grid, reverse, split, fast, prefetch)
    del keep
    return (out, noise_px) if return_noise else out


@pytest.mark.parametrize("n,split,fast", GEOMETRIES, ids=GEOMETRY_IDS)
@pytest.mark.parametrize("planes", [1, 5])
def test_dct2_and_idct2_against_float64(n, split, fast, planes):
    # 5 planes: a partial last plane group for every planes-per-block (4, 2, 1).
    x = _rand(planes, n, n)
    for inverse, want in ((False, ref.dct2(x.double())), (True, ref.idct2(x.double()))):
        y = emulate_dct(x, inverse, grid=2, split=split, fast=fast)
        assert torch.isfinite(y).all()
        assert_within_twice_torch(y, want, torch_dct2(x, inverse), f"inverse={inverse}")
        assert torch.equal(y, emulate_dct(x, inverse, grid=3, reverse=True, split=split,
                                          fast=fast))


@pytest.mark.parametrize("fast", [False, True], ids=["dense", "fast"])
def test_round_trip_and_basis_vectors(fast):
    # Every basis vector: an index or sign slip in any butterfly or twiddle shows up here.
    for n in (32, 64):
        eye = torch.zeros(n * n, n, n)
        eye.view(n * n, n * n).fill_diagonal_(1.0)
        c = ref.dct_matrix(n, torch.float64, "cpu")
        want = torch.einsum("ki,lj->klij", c, c)       # basis (k, l) at pixel (i, j)
        # The peer of the fast (butterfly) passes is torch's FFT; of the dense passes
        # torch's float32 matrix product, which on a one-hot plane is one product of two
        # matrix entries: torch_dct2(eye) is this einsum in float32, bit for bit, and cheaper.
        c32 = c.float()
        peer = torch.einsum("ki,lj->klij", c32, c32)
        for inverse, w, p in ((True, want.reshape(n * n, n, n), peer.reshape(n * n, n, n)),
                              (False, want.permute(2, 3, 0, 1).reshape(n * n, n, n),
                               peer.permute(2, 3, 0, 1).reshape(n * n, n, n))):
            if fast:
                p = torch_fft_dct2(eye, inverse)
            assert_within_twice_torch(emulate_dct(eye, inverse=inverse, fast=fast), w, p,
                                      f"{n} inverse={inverse}")
    x = _rand(3, 64, 64)
    assert_within_twice_torch(emulate_dct(emulate_dct(x, False, fast=fast), True, fast=fast), x,
                              torch_dct2(torch_dct2(x), inverse=True), "round trip")


@pytest.mark.parametrize("n,split,fast", GEOMETRIES, ids=GEOMETRY_IDS)
def test_spectral_generated_noise_two_inputs(n, split, fast):
    b, c = 3, 3                                     # 9 planes
    x, x2 = _rand(b, c, n, n), _rand(b, c, n, n, seed=1)
    a = torch.rand(b, 1, n, n, generator=torch.Generator().manual_seed(2))
    a2 = torch.rand(1, c, n, n, generator=torch.Generator().manual_seed(3))
    g = torch.rand(b, 1, 1, 1, generator=torch.Generator().manual_seed(4))
    kw = dict(seed=99, offset=12, return_noise=True)
    out, npx = emulate_spectral(x, a, x2, a2, g, split=split, fast=fast, **kw)
    zb = ref.philox_normal(x.shape, 99, 12, torch.float64)
    want, want_n = ref.spectral(x.double(), a, x2.double(), a2, g=g, noise=zb, return_noise=True)
    peer, peer_n = torch_spectral(x, a, x2, a2, g, zb, return_noise=True)
    assert_within_twice_torch(out, want, peer, "out")
    assert_within_twice_torch(npx, want_n, peer_n, "noise")
    out_r, npx_r = emulate_spectral(x, a, x2, a2, g, grid=4, reverse=True, split=split,
                                    fast=fast, **kw)
    assert torch.equal(out, out_r) and torch.equal(npx, npx_r)


@pytest.mark.parametrize("offset", [0, 5, 2 ** 40 + 3])
@pytest.mark.parametrize("n,split,fast", [(32, 1, False), (64, 2, False), (64, 2, True),
                                          (64, 4, True)])
def test_spectral_noise_numbering(offset, n, split, fast):   # split 2: noise made early
    # Element e of the call uses philox_normal(seed, offset + e), whether or not offset
    # is a multiple of four (the kernel's one-block-per-four-numbers path and its
    # fallback must agree with the reference).
    x = torch.zeros(2, n, n)
    out, npx = emulate_spectral(x, torch.zeros(n, n), g=torch.ones(()), seed=7,
                                offset=offset, return_noise=True, split=split, fast=fast)
    zb = ref.philox_normal((2, n, n), seed=7, offset=offset, dtype=torch.float64)
    want, peer = ref.idct2(zb), torch_dct2(zb.float(), inverse=True)
    assert_within_twice_torch(npx, want, peer, "noise")
    assert_within_twice_torch(out, want, peer, "out")


@pytest.mark.parametrize("split,fast", [(1, False), (2, False), (1, True), (2, True),
                                        (4, True)])
def test_spectral_given_noise_and_single_input(split, fast):
    n = 64
    x = _rand(4, 2, n, n)
    a = torch.rand(n, n, generator=torch.Generator().manual_seed(5))
    zb = _rand(4, 2, n, n, seed=6)
    g = torch.rand(4, 2, 1, 1, generator=torch.Generator().manual_seed(7))
    out, npx = emulate_spectral(x, a, g=g, noise=zb, return_noise=True, split=split, fast=fast)
    want, want_n = ref.spectral(x.double(), a, g=g, noise=zb.double(), return_noise=True)
    peer, peer_n = torch_spectral(x, a, g=g, zb=zb, return_noise=True)
    assert_within_twice_torch(out, want, peer, "out")
    assert_within_twice_torch(npx, want_n, peer_n, "noise")
    plain = emulate_spectral(x, a, split=split, fast=fast)       # no noise term at all
    assert_within_twice_torch(plain, ref.spectral(x.double(), a), torch_spectral(x, a), "plain")
    # Noise drawn but not returned: two buffers, the noise made in the combine step
    # (with it returned, it is made early, while the loads are in flight).
    drawn = emulate_spectral(x, a, g=g, seed=3, offset=8, split=split, fast=fast)
    zb = ref.philox_normal(x.shape, 3, 8, torch.float64)
    assert_within_twice_torch(drawn, ref.spectral(x.double(), a, g=g, noise=zb),
                              torch_spectral(x, a, g=g, zb=zb), "drawn")


NOISE_WITHOUT_G = [(32, 1, False), (64, 2, False), (64, 1, True), (64, 2, True), (64, 4, True)]


@pytest.mark.parametrize("n,split,fast", NOISE_WITHOUT_G,
                         ids=[GEOMETRY_IDS[GEOMETRIES.index(g)] for g in NOISE_WITHOUT_G])
def test_spectral_noise_returned_without_g(n, split, fast):
    # return_noise without g: the noise is drawn and returned but not added. Every other
    # call here that returns the noise has g, so a combine step that draws (and keeps in
    # the third buffer) the noise only when g is given went unseen: the returned noise
    # was then x2's transform, or unwritten shared memory. With x2 the noise is made in
    # the combine step in every geometry (the wide one pairs its inverse transform with
    # the result's); without x2, in the combine step where it is not made early (split 1;
    # split 2 and 4 make it early). The step is shared, so the N = 64 geometries suffice.
    x, x2 = _rand(3, n, n), _rand(3, n, n, seed=1)
    a = torch.rand(3, n, n, generator=torch.Generator().manual_seed(2))
    a2 = torch.rand(n, n, generator=torch.Generator().manual_seed(3))
    zb = ref.philox_normal(x.shape, 13, 6, torch.float64)
    peer_n = torch_dct2(zb.float(), inverse=True)
    for x2_, a2_ in ((None, None), (x2, a2)):
        out, npx = emulate_spectral(x, a, x2_, a2_, seed=13, offset=6, return_noise=True,
                                    grid=2, reverse=True, split=split, fast=fast)
        want = ref.spectral(x.double(), a, None if x2_ is None else x2_.double(), a2_)
        what = "one input" if x2_ is None else "two inputs"
        assert_within_twice_torch(out, want, torch_spectral(x, a, x2_, a2_), f"out, {what}")
        assert_within_twice_torch(npx, ref.idct2(zb), peer_n, f"noise, {what}")


@pytest.mark.parametrize("x2,noise", [(False, True), (True, False), (True, True)],
                         ids=["q_sample", "step", "step_noise"])
def test_wide_geometry_pairs_transforms_bit_for_bit(x2, noise):
    # The wide geometry runs a fused call's two transforms side by side, the second on the
    # threads the passes leave idle, with a fourth buffer (pairs_transforms): x1's and x2's
    # forward transforms, the result's and the noise's inverse ones. Each row's arithmetic
    # is that of the one-plane geometry, so the bits are too.
    n, b, c = 64, 3, 3
    x, xb = _rand(b, c, n, n), _rand(b, c, n, n, seed=1) if x2 else None
    a = torch.rand(b, 1, n, n, generator=torch.Generator().manual_seed(2))
    a2 = torch.rand(1, c, n, n, generator=torch.Generator().manual_seed(3)) if x2 else None
    g = torch.rand(b, 1, 1, 1, generator=torch.Generator().manual_seed(4))
    kw = dict(seed=11, offset=3, return_noise=noise)
    wide = emulate_spectral(x, a, xb, a2, g, split=4, fast=True, grid=3, reverse=True, **kw)
    one = emulate_spectral(x, a, xb, a2, g, split=2, fast=True, **kw)
    for u, v in zip(wide if noise else (wide,), one if noise else (one,)):
        assert torch.equal(u, v)
    zb = ref.philox_normal(x.shape, 11, 3, torch.float64)
    want = ref.spectral(x.double(), a, None if xb is None else xb.double(), a2, g=g, noise=zb,
                        return_noise=noise)
    assert_within_twice_torch(wide[0] if noise else wide, want[0] if noise else want,
                              torch_spectral(x, a, xb, a2, g, zb))


@pytest.mark.parametrize("two", [False, True], ids=["one_input", "two_inputs"])
@pytest.mark.parametrize("given", [False, True], ids=["philox", "given"])
def test_wide_geometry_noise_term_made_early(two, given):
    # Calls with g that do not return the noise (sampler steps, prior draws): the wide
    # geometry makes g zb while the loads are in flight, in place of the map g
    # (noise_term_group), and the combine step adds it. Every product and sum of the step
    # is rounded as written, so the bits are those of the one-plane geometry, which makes
    # the noise in the combine step. Offset 5: the noise of a chunk straddles two Philox
    # blocks; grid 2 over 7 planes: blocks loop over several planes.
    n, b, c = 64, 7, 1
    x, x2 = _rand(b, c, n, n), (_rand(b, c, n, n, seed=1) if two else None)
    a = torch.rand(b, 1, n, n, generator=torch.Generator().manual_seed(2))
    a2 = torch.rand(n, n, generator=torch.Generator().manual_seed(3)) if two else None
    g = torch.rand(b, 1, n, n, generator=torch.Generator().manual_seed(4))
    zb = (_rand(b, c, n, n, seed=5) if given
          else ref.philox_normal(x.shape, 21, 5, torch.float64).float())
    kw = dict(noise=zb if given else None, seed=21, offset=5)
    wide = emulate_spectral(x, a, x2, a2, g, split=4, fast=True, grid=2, reverse=True, **kw)
    one = emulate_spectral(x, a, x2, a2, g, split=2, fast=True, **kw)
    assert torch.equal(wide, one)
    want = ref.spectral(x.double(), a, None if x2 is None else x2.double(), a2, g=g,
                        noise=zb.double())
    assert_within_twice_torch(wide, want, torch_spectral(x, a, x2, a2, g, zb))


FAST_GEOMETRIES = [(n, s, f) for n, s, f in GEOMETRIES if f]


@pytest.mark.parametrize("n,split,fast", FAST_GEOMETRIES,
                         ids=[i for i, g in zip(GEOMETRY_IDS, GEOMETRIES) if g[2]])
def test_prefetch_of_the_next_plane_group(n, split, fast):
    # "fast+prefetch": blocks copy the next group's x1 into a spare buffer, which then
    # trades places with buffer 0. 11 planes, grid 2 and 3: every block loops over several
    # groups (4, 2 or 1 planes each), the last group partial; results must equal the
    # plain program's bit for bit, for every mode and with the early noise.
    x, x2 = _rand(11, n, n), _rand(11, n, n, seed=1)
    a, a2 = torch.rand(n, n, generator=torch.Generator().manual_seed(2)), torch.rand(n, n)
    g = torch.rand(11, 1, 1)
    for grid in (2, 3):
        for inverse in (False, True):
            plain = emulate_dct(x, inverse, grid=grid, split=split, fast=fast)
            assert torch.equal(emulate_dct(x, inverse, grid=grid, split=split, fast=fast,
                                           prefetch=True), plain)
        kw = dict(seed=5, offset=4, grid=grid, split=split, fast=fast)
        for args, rn in (((x, a), True), ((x, a, x2, a2), False), ((x, a), False)):
            plain = emulate_spectral(*args, g=g, return_noise=rn, **kw)
            got = emulate_spectral(*args, g=g, return_noise=rn, prefetch=True, **kw)
            for p_, q_ in zip(plain if rn else (plain,), got if rn else (got,)):
                assert torch.equal(p_, q_)
    zb = ref.philox_normal(x.shape, 5, 4, torch.float64)
    assert_within_twice_torch(emulate_spectral(x, a, g=g, seed=5, offset=4, grid=3, reverse=True,
                                               split=split, fast=fast, prefetch=True),
                              ref.spectral(x.double(), a, g=g, noise=zb),
                              torch_spectral(x, a, g=g, zb=zb))


def test_emulator_refuses_vector_access_at_a_misaligned_address():
    # On the GPU a float4 access at an address that is not a multiple of 16 bytes faults;
    # the dispatch sends such calls to the element-wise kernels. The emulator's accesses
    # are memcpy, so it checks the alignment itself: an input or output one float into its
    # storage (every access then 4 bytes off) throws, for the plane program and the combine.
    buf = _rand(2 * 32 * 32 + 1)
    x, x_off = buf[:-1].view(2, 32, 32), buf[1:].view(2, 32, 32)
    emulate_dct(x_off.clone(), False)                 # its aligned copy runs
    with pytest.raises(IndexError, match="16-byte vector access at an address"):
        emulate_dct(x_off, False)
    out = torch.empty(2 * 32 * 32 + 1)[1:]
    with pytest.raises(IndexError, match="16-byte vector access at an address"):
        _C.plane_emulate(2, 32, 32, DTYPE_CODES[torch.float32], x.data_ptr(), 0, None, None,
                         None, 0, 0, 0, out.data_ptr(), 0, DCT2, 2, False, 1, False, False)
    a = torch.ones(32, 32)
    f1 = buf[1:].view(2, 32, 32)
    args, keep = spectral_kernel_args(f1, a, None, None, None, None, 0, 0, f1, None)
    _C.combine_emulate(*args)            # misaligned: the combine's element-wise path
    f1 = torch.empty(2 * 32 * 32 + 4)[4:].view(2, 32, 32).copy_(x)
    args, keep = spectral_kernel_args(f1, 2 * a, None, None, None, None, 0, 0, f1, None)
    _C.combine_emulate(*args)            # aligned: its quads
    assert torch.equal(f1, 2 * x)
    del keep


def test_emulator_rejects_unsupported_calls():
    x = torch.zeros(1, 48, 48)
    with pytest.raises(ValueError, match="32, 64 or 128"):
        emulate_dct(x, False)
    with pytest.raises(ValueError, match="float32"):
        _C.plane_emulate(1, 32, 32, 1, x.data_ptr(), 0, None, None, None, 0, 0, 0,
                         x.data_ptr(), 0, DCT2, 1, False, 1, False, False)
    with pytest.raises(ValueError, match="split"):
        emulate_dct(torch.zeros(1, 32, 32), False, split=2)
    with pytest.raises(ValueError, match="split"):
        emulate_dct(torch.zeros(1, 128, 128), False, split=2, fast=True)
    with pytest.raises(ValueError, match="split"):
        emulate_dct(torch.zeros(1, 64, 64), False, split=4, fast=False)


def emulate_strips(x, inverse, grid=2, reverse=False, fast=False, out_dtype=torch.float32,
                   same_layout=False, split_planes=None, x2=None):
    """One strip pass; with split_planes (same layout only), the planes from split_planes
    on go to a second output, returned as (out, out2); with x2, the pass of x then x2 in
    one launch (x2's planes read from x2, one output)."""
    planes, rows, length = x.shape
    if x2 is not None:
        out = torch.empty(planes + x2.shape[0], length, rows, dtype=out_dtype)
        _C.strip_emulate(x.data_ptr(), out.data_ptr(), planes + x2.shape[0], rows, length,
                         inverse, grid, reverse, fast, DTYPE_CODES[x.dtype],
                         DTYPE_CODES[out_dtype], False, 0, planes * rows, x2.data_ptr())
        return out
    if split_planes is not None:
        out = torch.empty(split_planes, rows, length, dtype=out_dtype)
        out2 = torch.empty(planes - split_planes, rows, length, dtype=out_dtype)
        ptr2, split = out2.data_ptr(), split_planes * rows
    else:
        out = torch.empty((planes, rows, length) if same_layout else (planes, length, rows),
                          dtype=out_dtype)
        ptr2, split = 0, 0
    _C.strip_emulate(x.data_ptr(), out.data_ptr(), planes, rows, length, inverse, grid, reverse,
                     fast, DTYPE_CODES[x.dtype], DTYPE_CODES[out_dtype], same_layout, ptr2, split,
                     0)
    return out if split_planes is None else (out, out2)


@pytest.mark.parametrize("fast", [False, True], ids=["dense", "fast"])
@pytest.mark.parametrize("length", [32, 64, 128, 256])
def test_strip_pass_against_float64(length, fast):
    # Dense: 3 planes of 96 rows are 9 strips of 32, so with grid 2 and 4 blocks loop and
    # prefetch. Fast: blocks of 64 to 256 rows, the last one partial, blocks looping.
    planes, rows = (3, 96) if not fast else (3, {32: 352, 64: 352, 128: 224, 256: 96}[length])
    x = _rand(planes, rows, length)
    c = ref.dct_matrix(length, torch.float64, "cpu")
    for inverse in (False, True):
        m = c.T if inverse else c
        want = torch.einsum("kn,prn->pkr", m, x.double())
        peer = torch.einsum("kn,prn->pkr", m.float(), x)      # torch in float32
        got = emulate_strips(x, inverse, grid=2, fast=fast)
        assert torch.isfinite(got).all()
        assert_within_twice_torch(got, want, peer, f"inverse={inverse}")
        assert torch.equal(got, emulate_strips(x, inverse, grid=4, reverse=True, fast=fast))


@pytest.mark.parametrize("fast", [False, True], ids=["dense", "fast"])
def test_two_strip_passes_make_dct2_of_256_planes(fast):
    x = _rand(2, 256, 256)
    y = emulate_strips(emulate_strips(x, False, fast=fast), False, fast=fast)
    peer = torch_dct2(x)
    assert_within_twice_torch(y, ref.dct2(x.double()), peer, "dct2")
    z = emulate_strips(emulate_strips(y, True, fast=fast), True, fast=fast)
    assert_within_twice_torch(z, x, torch_dct2(peer, inverse=True), "round trip")


@pytest.mark.parametrize("length", [32, 64, 256])
def test_inverse_strip_pass_in_the_same_layout(length):
    # same_layout keeps each row where it was: out[p][r] = C^T in[p][r]. Rows are not a
    # multiple of a block's, so the last block is partial.
    x = _rand(3, 96, length)
    c = ref.dct_matrix(length, torch.float64, "cpu")
    want = torch.einsum("kn,prk->prn", c, x.double())
    got = emulate_strips(x, True, grid=2, fast=True, same_layout=True)
    assert_within_twice_torch(got, want, torch.einsum("kn,prk->prn", c.float(), x), "rows")
    assert torch.equal(got, emulate_strips(x, True, grid=3, reverse=True, fast=True,
                                           same_layout=True))
    # the transposed pass's numbers, only placed differently
    assert torch.equal(got, emulate_strips(x, True, grid=2, fast=True).transpose(1, 2))
    # two outputs: the first plane to one, the rest to the other (a block of 256 rows at
    # L = 32 straddles the split)
    first, rest = emulate_strips(x, True, grid=2, fast=True, same_layout=True, split_planes=1)
    assert torch.equal(first, got[:1]) and torch.equal(rest, got[1:])


def test_strip_pass_of_two_inputs_in_one_launch():
    # in2: the planes after the first array's come from a second input (blocks of 64 rows at
    # L = 256 end at the split); the same numbers as two launches.
    x, x2 = _rand(2, 64, 256), _rand(3, 64, 256, seed=1)
    both = emulate_strips(x, False, grid=3, fast=True, x2=x2)
    assert torch.equal(both, torch.cat([emulate_strips(x, False, fast=True),
                                        emulate_strips(x2, False, fast=True)]))
    assert torch.equal(both, emulate_strips(x, False, grid=2, reverse=True, fast=True, x2=x2))
    with pytest.raises(ValueError, match="multiple of a block"):
        emulate_strips(_rand(1, 32, 256), False, fast=True, x2=x2)
    with pytest.raises(ValueError, match="same_layout"):
        emulate_strips(x, False, fast=True, same_layout=True)


def emulate_three_passes(x, a, x2=None, a2=None, g=None, noise=None, *, seed=0, offset=0,
                         return_noise=False, grid=2, reverse=False, chunk=None):
    """The CUDA fused op's path at 256 x 256 (column_program.h), run on the CPU as
    cuda_fast.cu chains it: row passes of x1 (and x2), the column pass with the
    frequency-space step (launched on `chunk` planes at a time), the row passes back in
    the same layout."""
    planes = x.numel() // (x.shape[-2] * x.shape[-1])
    h, w = x.shape[-2:]
    rows = lambda t, t2=None: emulate_strips(t.reshape(planes, h, w), False, grid=grid,
                                             reverse=reverse, fast=True,
                                             x2=None if t2 is None else t2.reshape(planes, h, w))
    if x2 is not None and w == 256:      # as column_launch: x1 and x2 in one launch
        t1, t2 = rows(x, x2).split(planes)
    else:
        t1 = rows(x)
        t2 = None if x2 is None else rows(x2)
    u1 = torch.empty(planes, h, w)
    u2 = torch.empty(planes, h, w) if return_noise else None
    # the maps and the noise are indexed as the call's: (planes, H, W) in frequency space
    args, keep = spectral_kernel_args(t1.view(x.shape), a, None if t2 is None else
                                      t2.view(x.shape), a2, g, noise, seed, offset, u1, u2)
    _C.column_emulate(*args, grid, reverse, chunk or planes)
    del keep
    if not return_noise:
        return emulate_strips(u1, True, grid=grid, reverse=reverse, fast=True,
                              same_layout=True).view(x.shape)
    # as column_launch: u1 and u2 one after the other, one launch with two outputs
    out, npx = emulate_strips(torch.cat([u1, u2]), True, grid=grid, reverse=reverse, fast=True,
                              same_layout=True, split_planes=planes)
    return out.view(x.shape), npx.view(x.shape)


@pytest.mark.parametrize("hw", [(256, 256), (64, 64), (32, 64), (128, 32)],
                         ids=["256", "64", "32x64", "128x32"])
def test_three_pass_spectral_against_float64(hw):
    # q_sample's form (generated noise, returned) and the sampler step's (two inputs,
    # noise added, not returned); maps per sample and per channel, broadcast.
    h, w = hw
    b, c = 2, 3
    x, x2 = _rand(b, c, h, w), _rand(b, c, h, w, seed=1)
    a = torch.rand(b, 1, h, w, generator=torch.Generator().manual_seed(2))
    a2 = torch.rand(1, c, h, w, generator=torch.Generator().manual_seed(3)) - 0.5
    g = torch.rand(b, 1, h, w, generator=torch.Generator().manual_seed(4))
    zb = ref.philox_normal(x.shape, 7, 2 ** 33, torch.float64)
    out, npx = emulate_three_passes(x, a, g=g, seed=7, offset=2 ** 33, return_noise=True)
    want, want_n = ref.spectral(x.double(), a, g=g, noise=zb, return_noise=True)
    peer, peer_n = torch_spectral(x, a, g=g, zb=zb, return_noise=True)
    assert_within_twice_torch(out, want, peer, "q_sample form: out")
    assert_within_twice_torch(npx, want_n, peer_n, "q_sample form: noise")
    out_r, npx_r = emulate_three_passes(x, a, g=g, seed=7, offset=2 ** 33, return_noise=True,
                                        grid=3, reverse=True)
    assert torch.equal(out, out_r) and torch.equal(npx, npx_r)
    # in launches of 4 planes (6 planes: a partial last chunk): each finds its maps, noise
    # and given zb by the call's plane index
    out_c, npx_c = emulate_three_passes(x, a, g=g, seed=7, offset=2 ** 33, return_noise=True,
                                        chunk=4)
    assert torch.equal(out, out_c) and torch.equal(npx, npx_c)

    step = emulate_three_passes(x, a, x2, a2, g, seed=7, offset=2 ** 33)
    want = ref.spectral(x.double(), a, x2.double(), a2, g=g, noise=zb)
    assert_within_twice_torch(step, want, torch_spectral(x, a, x2, a2, g, zb), "step form")
    assert torch.equal(step, emulate_three_passes(x, a, x2, a2, g, seed=7, offset=2 ** 33,
                                                  grid=5, reverse=True))


def test_three_pass_spectral_given_noise_both_inputs_returned():
    # x2 and the returned noise together: the column pass writes zb over x2's transform in
    # the second buffer; a given zb; an offset that is not a multiple of four.
    x, x2 = _rand(1, 2, 64, 64), _rand(1, 2, 64, 64, seed=1)
    a, a2 = torch.rand(64, 64), torch.rand(1, 2, 64, 64) - 0.5
    g = torch.full((1, 1, 1, 1), 0.3)
    zb = _rand(1, 2, 64, 64, seed=5)
    out, npx = emulate_three_passes(x, a, x2, a2, g, zb, return_noise=True)
    want, want_n = ref.spectral(x.double(), a, x2.double(), a2, g=g, noise=zb.double(),
                                return_noise=True)
    peer, peer_n = torch_spectral(x, a, x2, a2, g, zb, return_noise=True)
    assert_within_twice_torch(out, want, peer, "out")
    assert_within_twice_torch(npx, want_n, peer_n, "noise")
    chunked = emulate_three_passes(x, a, x2, a2, g, zb, return_noise=True, chunk=1)
    assert torch.equal(out, chunked[0]) and torch.equal(npx, chunked[1])
    out, npx = emulate_three_passes(x, a, x2, a2, g, seed=3, offset=5, return_noise=True)
    zb = ref.philox_normal(x.shape, 3, 5, torch.float64)
    want, want_n = ref.spectral(x.double(), a, x2.double(), a2, g=g, noise=zb,
                                return_noise=True)
    assert_within_twice_torch(npx, want_n, torch_dct2(zb.float(), inverse=True), "offset 5")
    assert_within_twice_torch(out, want, torch_spectral(x, a, x2, a2, g, zb), "offset 5")


def test_column_emulator_rejects_unsupported_calls():
    t = torch.zeros(1, 48, 64)
    args, keep = spectral_kernel_args(t, torch.ones(48, 64), None, None, None, None, 0, 0, t,
                                      None)
    with pytest.raises(ValueError, match="H must be"):
        _C.column_emulate(*args, 1, False, 1)
    t = torch.zeros(1, 64, 48)
    args, keep = spectral_kernel_args(t, torch.ones(64, 48), None, None, None, None, 0, 0, t,
                                      None)
    with pytest.raises(ValueError, match="multiple of 32"):
        _C.column_emulate(*args, 1, False, 1)


def test_strip_emulator_rejects_unsupported_calls():
    x = torch.zeros(1, 48, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        emulate_strips(x, False)
    with pytest.raises(ValueError, match="32, 64, 128 or 256"):
        emulate_strips(torch.zeros(1, 32, 48), False)


# --------------------------------------------------------------- the CUDA path's combine

def emulate_combine(f1, a, f2=None, a2=None, g=None, noise=None, *, seed=0, offset=0,
                    return_noise=False):
    """combine.h run on the CPU: (a1 f1 + a2 f2 + g zb, zb or None), f1 not modified."""
    f1 = f1.clone()
    zb_out = torch.empty_like(f1) if return_noise else None
    args, keep = spectral_kernel_args(f1, a, f2, a2, g, noise, seed, offset, f1, zb_out)
    _C.combine_emulate(*args)
    del keep
    return f1, zb_out


def test_combine_with_f2_overlapping_f1_throws():
    # f2 starts one quad into f1, so the quad written at f1 + 4 k is f2's quad k - 1: a race
    # on the GPU. Every access lies whole in a buffer and f1, which is writable, comes
    # first in the emulator's list, so only the overlap check sees it.
    buf = _rand(2 * 8 * 8 + 4)
    f1, f2 = buf[:128].view(2, 8, 8), buf[4:].view(2, 8, 8)
    a = torch.ones(8, 8, dtype=torch.float64)
    args, keep = spectral_kernel_args(f1, a, f2, a, None, None, 0, 0, f1, None)
    assert f2.data_ptr() == args[5]                         # f2 itself, not a copy
    with pytest.raises(IndexError, match=r"write to f1 also writes f2 \(the buffers overlap\)"):
        _C.combine_emulate(*args)
    del keep


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("hw", [(8, 8), (5, 7)], ids=["quads", "ragged"])   # 35 % 4 = 3
@pytest.mark.parametrize("offset", [0, 3])
def test_combine_quads_against_the_formula(dtype, hw, offset):
    # Each quad's elements share a Philox block and the planes' map offsets: the noise
    # numbering (offset not a multiple of four, planes whose size is not), the plane -> map
    # indexing of broadcast maps and the last, partial quad of a plane are what can go
    # wrong. The truth is the formula in long double, noise from the Python Philox with
    # Box-Muller in long double; the peer the same formula in torch in the dtype, maps
    # rounded to it and the reference's float64 noise (rounded to float32 for float32).
    shape = (3, 2) + hw
    f1, f2 = _rand(*shape).to(dtype), _rand(*shape, seed=1).to(dtype)
    gen = torch.Generator().manual_seed(2)
    a = torch.rand((3, 1) + hw, generator=gen, dtype=torch.float64)    # per sample
    a2 = torch.rand((2,) + hw, generator=gen, dtype=torch.float64)     # per channel
    g = torch.rand(3, 2, 1, 1, generator=gen, dtype=torch.float64)     # per plane
    zb = truth_philox_normal(shape, seed=9, offset=offset)
    a_, a2_, g_ = (t.to(dtype) for t in (a, a2, g))
    zb_ = ref.philox_normal(shape, seed=9, offset=offset, dtype=torch.float64).to(dtype)
    ld = lambda t: t.double().numpy().astype(np.longdouble)           # noqa: E731
    got, got_zb = emulate_combine(f1, a, f2, a2, g, seed=9, offset=offset, return_noise=True)
    assert got.dtype == dtype
    want = ld(a) * ld(f1) + ld(a2) * ld(f2) + ld(g) * zb
    assert_within_twice_torch(got, want, a_ * f1 + a2_ * f2 + g_ * zb_, "two inputs")
    if dtype == torch.float64:
        assert_within_twice_torch(got_zb, zb, zb_, "noise")
    else:   # float Box-Muller: within 4 * 2**-23 of the value, relatively (reference.py)
        assert (np.abs(ld(got_zb) - zb) <= 4 * 2.0 ** -23 * np.abs(zb)).all()
    # Given noise, no x2, noise not returned; and no noise term at all.
    given = _rand(*shape, seed=3).to(dtype)
    got, none = emulate_combine(f1, a, g=g, noise=given)
    assert none is None
    assert_within_twice_torch(got, ld(a) * ld(f1) + ld(g) * ld(given), a_ * f1 + g_ * given,
                              "given noise")
    got, _ = emulate_combine(f1, a)
    assert_within_twice_torch(got, ld(a) * ld(f1), a_ * f1, "one input")


def test_combine_emulator_rejects_other_types():
    x = torch.zeros(1, 4, 4, dtype=torch.float16)
    with pytest.raises(ValueError, match="float32 or float64"):
        emulate_combine(x, torch.ones(4, 4))


# ------------------------------------------------- bfloat16 I/O (csrc/emu_bf16.h)
#
# The programs' 16-bit I/O branches (plane_program.h: no prefetch; the strip programs with
# bfloat16 on one side), run with the GPU's conversions: bfloat16 -> float exact, float ->
# bfloat16 to nearest even. Two checks besides the reverse runs:
# - against the float program on the same values: the arithmetic is float either way and
#   bfloat16 -> float is exact, so the bfloat16 output is the float output rounded by
#   torch (to nearest even), bit for bit: no rounding may flip (0 flips allowed);
# - against the float64 truth rounded to bfloat16 (assert_bf16_near_truth).

BF16 = torch.bfloat16


def _bf16_ordered(t):
    """bfloat16 bits as integers in the order of the values (+0 and -0 both 0), so that
    adjacent values differ by 1."""
    b = t.view(torch.int16).to(torch.int32)
    return torch.where(b < 0, -(b & 0x7FFF), b)


def assert_bf16_near_truth(got, truth, what=""):
    """got (bfloat16) within one bfloat16 ulp of the float64 truth rounded to bfloat16: the
    program's float error (about 2**-22 of the largest value M) can flip a rounding, no
    more. Values under 2**-8 M have ulps small enough for that error to span several, so
    there the bound is one ulp of the largest value under 2**-8 M: |got - truth| <=
    2**-15 M. (torch rounds float64 via float32; that moves a value only off an exact
    tie, within the ulp allowed.)"""
    assert got.dtype == BF16, what
    assert torch.isfinite(got).all(), what
    big_ = truth.abs().max()
    big = truth.abs() >= 2.0 ** -8 * big_
    ulps = (_bf16_ordered(got) - _bf16_ordered(truth.to(BF16))).abs()
    assert ulps[big].max() <= 1, f"{what}: {int(ulps[big].max())} bfloat16 ulps off the truth"
    small_err = (got.double() - truth).abs()[~big]
    assert small_err.numel() == 0 or small_err.max() <= 2.0 ** -15 * big_, (
        f"{what}: small values {float(small_err.max() / big_):.3g} of the largest off the truth")


def assert_bf16_is_rounded(got, got_float, what=""):
    """The bfloat16 output is the float program's output rounded to nearest even."""
    assert got.dtype == BF16 and got_float.dtype == torch.float32, what
    assert torch.equal(got.view(torch.int16), got_float.to(BF16).view(torch.int16)), what


def assert_same_bits(u, v, what=""):
    assert torch.equal(u.view(torch.int16), v.view(torch.int16)), what


def check_bf16_spectral(emulate, args, fwd, rev, kw, truth, what):
    """The bfloat16 checks of a fused-op call returning (out, noise): the reverse run
    (``rev``) gives the same bits as ``fwd``; each output is the float program's output
    rounded, and near its float64 truth (``truth``: (out, noise))."""
    got = emulate(*args, **fwd, **kw)
    floats = [t.float() if isinstance(t, torch.Tensor) and t.dtype == BF16 else t for t in args]
    for u, u_rev, u_float, want, part in zip(got, emulate(*args, **rev, **kw),
                                             emulate(*floats, **fwd, **kw), truth,
                                             ("", ": noise")):
        assert_same_bits(u, u_rev, f"{what}{part}: reverse")
        assert_bf16_is_rounded(u, u_float, what + part)
        assert_bf16_near_truth(u, want, what + part)


def _rand_bf16(*shape, seed=0):
    return _rand(*shape, seed=seed).to(BF16)


@pytest.mark.parametrize("n,split,fast", GEOMETRIES, ids=GEOMETRY_IDS)
def test_bf16_dct2_and_idct2(n, split, fast):
    # 5 planes: a partial last plane group for every planes-per-block (4, 2, 1).
    x = _rand_bf16(5, n, n)
    for inverse in (False, True):
        want = ref.idct2(x.double()) if inverse else ref.dct2(x.double())
        y = emulate_dct(x, inverse, grid=2, split=split, fast=fast)
        assert_bf16_near_truth(y, want, f"inverse={inverse}")
        assert_bf16_is_rounded(y, emulate_dct(x.float(), inverse, grid=2, split=split,
                                              fast=fast), f"inverse={inverse}")
        assert_same_bits(y, emulate_dct(x, inverse, grid=3, reverse=True, split=split,
                                        fast=fast), f"reverse, inverse={inverse}")


@pytest.mark.parametrize("n,split,fast", GEOMETRIES, ids=GEOMETRY_IDS)
def test_bf16_spectral_generated_noise(n, split, fast):
    # q_sample (x1 only, noise returned: made early in the split geometries) and a sampler
    # step with x2 (loaded through load_group too) and the noise returned; 5 planes.
    x, x2 = _rand_bf16(5, n, n), _rand_bf16(5, n, n, seed=1)
    gen = torch.Generator().manual_seed(2)
    a, a2 = torch.rand(5, n, n, generator=gen), torch.rand(n, n, generator=gen) - 0.5
    g = torch.rand(5, 1, 1, generator=gen)
    zb = ref.philox_normal(x.shape, 21, 7, torch.float64)
    for args, what in (((x, a), "q_sample"), ((x, a, x2, a2), "step")):
        kw = dict(g=g, seed=21, offset=7, return_noise=True, split=split, fast=fast)
        x2_ = None if len(args) == 2 else x2.double()
        truth = ref.spectral(x.double(), a, x2_, None if x2_ is None else a2, g=g, noise=zb,
                             return_noise=True)
        check_bf16_spectral(emulate_spectral, args, dict(grid=2), dict(grid=3, reverse=True),
                            kw, truth, what)


FAST_GEOMETRY_IDS = [i for i, g in zip(GEOMETRY_IDS, GEOMETRIES) if g[2]]


@pytest.mark.parametrize("n,split,fast", FAST_GEOMETRIES, ids=FAST_GEOMETRY_IDS)
def test_bf16_asked_to_prefetch_does_not(n, split, fast):
    # Prefetch is float-only (prefetch_group copies floats): with bfloat16 I/O the GPU's
    # plan leaves it off, and so does the emulator. Asked for, the results are those
    # without, bit for bit, with one block looping over several plane groups (a block that
    # believed its next x1 prefetched would transform unwritten, NaN, shared memory).
    x = _rand_bf16(5, n, n)
    a, g = torch.rand(n, n, generator=torch.Generator().manual_seed(2)), torch.rand(5, 1, 1)
    for inverse in (False, True):
        assert_same_bits(emulate_dct(x, inverse, grid=1, split=split, fast=fast, prefetch=True),
                         emulate_dct(x, inverse, grid=1, split=split, fast=fast))
    kw = dict(g=g, seed=5, offset=4, return_noise=True, grid=1, split=split, fast=fast)
    for u, v in zip(emulate_spectral(x, a, prefetch=True, **kw), emulate_spectral(x, a, **kw)):
        assert_same_bits(u, v)


@pytest.mark.parametrize("fast", [False, True], ids=["dense", "fast"])
@pytest.mark.parametrize("length", [32, 64, 128, 256])
def test_bf16_strip_passes(length, fast):
    # The GPU's bfloat16 pairs: bfloat16 in, float out (a 2-D transform's first pass) and
    # float in, bfloat16 out (its second). Rows as in test_strip_pass_against_float64.
    planes, rows = (3, 96) if not fast else (3, {32: 352, 64: 352, 128: 224, 256: 96}[length])
    x = _rand(planes, rows, length)
    xb = x.to(BF16)
    c = ref.dct_matrix(length, torch.float64, "cpu")
    for inverse in (False, True):
        m = c.T if inverse else c
        # bfloat16 in: the float program's output on the same values, bit for bit.
        got = emulate_strips(xb, inverse, grid=2, fast=fast)
        assert got.dtype == torch.float32
        assert torch.equal(got, emulate_strips(xb.float(), inverse, grid=2, fast=fast))
        assert torch.equal(got, emulate_strips(xb, inverse, grid=4, reverse=True, fast=fast))
        assert_within_twice_torch(got, torch.einsum("kn,prn->pkr", m, xb.double()),
                                  torch.einsum("kn,prn->pkr", m.float(), xb.float()),
                                  f"bfloat16 in, inverse={inverse}")
        # bfloat16 out.
        got = emulate_strips(x, inverse, grid=2, fast=fast, out_dtype=BF16)
        assert_bf16_is_rounded(got, emulate_strips(x, inverse, grid=2, fast=fast),
                               f"inverse={inverse}")
        assert_same_bits(got, emulate_strips(x, inverse, grid=4, reverse=True, fast=fast,
                                             out_dtype=BF16), f"reverse, inverse={inverse}")
        assert_bf16_near_truth(got, torch.einsum("kn,prn->pkr", m, x.double()),
                               f"bfloat16 out, inverse={inverse}")


@pytest.mark.parametrize("fast", [False, True], ids=["dense", "fast"])
def test_bf16_two_strip_passes_make_dct2_of_256_planes(fast):
    # As the GPU runs a bfloat16 dct2 / idct2 of 256 x 256 planes: bfloat16 -> float ->
    # bfloat16.
    x = _rand_bf16(1, 256, 256)
    for inverse, want in ((False, ref.dct2(x.double())), (True, ref.idct2(x.double()))):
        y = emulate_strips(emulate_strips(x, inverse, fast=fast), inverse, fast=fast,
                           out_dtype=BF16)
        assert_bf16_near_truth(y, want, f"inverse={inverse}")


def test_bf16_emulator_rejects_other_types():
    for dtype in (torch.float64, torch.float16):
        x = torch.zeros(1, 32, 32, dtype=dtype)
        with pytest.raises(ValueError, match="float32 or bfloat16"):
            emulate_dct(x, False)
    x = torch.zeros(1, 32, 32, dtype=BF16)
    for out_dtype in (BF16, torch.float16):   # bfloat16 on both sides: no GPU kernel either
        with pytest.raises(ValueError, match="in_dtype, out_dtype"):
            emulate_strips(x, False, out_dtype=out_dtype)
    with pytest.raises(ValueError, match="in_dtype, out_dtype"):
        emulate_strips(x.double(), False)
