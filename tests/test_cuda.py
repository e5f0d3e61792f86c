"""CUDA kernels against the float64 reference and the CPU kernels (skipped without a GPU)."""
import pytest
import torch

import blurfast as bf
from blurfast import reference as ref
from blurfast.ops import normal_like
from bfutil import rel_err

pytestmark = pytest.mark.cuda

SIZES = [(8, 8), (16, 16), (32, 32), (64, 64), (128, 128), (256, 256), (1, 1), (7, 12), (33, 20),
         (64, 128), (96, 256)]   # the last two: strip kernels on both axes


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("hw", SIZES)
def test_dct2_cuda_float32(hw):
    x = _rand(3, 3, *hw)
    for fn, rfn in ((bf.dct2, ref.dct2), (bf.idct2, ref.idct2)):
        y = fn(x.cuda())
        assert y.is_cuda and y.dtype == torch.float32
        assert rel_err(y, rfn(x.double())) <= 2e-6
        assert rel_err(y, fn(x)) <= 2e-6


@pytest.mark.parametrize("hw", [(1, 513), (384, 50), (513, 31)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dct2_cuda_long_generic_sides_within_twice_torchs_error(hw, dtype):
    # Sums of hundreds of terms in the simple kernels (csrc/cuda_kernels.cu, DotSum): in
    # order in the input's precision, the CPU's such sums had up to 3.3x (float32) and 2.3x
    # (float64) the error of torch's matrix DCT at these sides. Against cuBLAS's product in
    # the same precision (TF32 off, torch's default for matmul); float64 against a long
    # double truth.
    from bfutil import assert_within_twice_torch, torch_dct2, truth_dct2
    x = _rand(2, *hw, dtype=dtype)
    for inverse, fn, rfn in ((False, bf.dct2, ref.dct2), (True, bf.idct2, ref.idct2)):
        want = truth_dct2(x, inverse) if dtype == torch.float64 else rfn(x.double())
        assert_within_twice_torch(fn(x.cuda()), want, torch_dct2(x.cuda(), inverse),
                                  f"{hw} {dtype} {fn.__name__}")


@pytest.mark.parametrize("hw", [(64, 64), (7, 12)])
def test_dct2_cuda_float64(hw):
    x = _rand(2, 3, *hw, dtype=torch.float64)
    assert rel_err(bf.dct2(x.cuda()), ref.dct2(x)) <= 1e-13


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hw", [(64, 64), (33, 20)])
def test_dct2_cuda_half_io(dtype, hw):
    x = _rand(2, 3, *hw).to(dtype)
    y = bf.dct2(x.cuda())
    assert y.dtype == dtype
    want = ref.dct2(x.double())
    # float32 arithmetic, one rounding to the half type at the end: at most the error of
    # rounding the exact result (plus float32 noise).
    err_kernel = rel_err(y, want)
    err_rounding = rel_err(want.to(dtype), want)
    assert err_kernel <= 2 * err_rounding + 2e-6


# (5, 7): planes of 35, so the combine step's quads straddle no plane but end ragged.
@pytest.mark.parametrize("hw", [(64, 64), (256, 256), (7, 12), (5, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_spectral_cuda_generated_noise(hw, dtype):
    b = 4
    x, x2 = _rand(b, 3, *hw, dtype=dtype), _rand(b, 3, *hw, dtype=dtype, seed=1)
    a, a2, g = torch.rand(b, 1, *hw), torch.rand(1, 1, *hw), torch.rand(b, 1, 1, 1)
    cu = [t.cuda() for t in (x, a, x2, a2, g)]
    out, npx = bf.spectral(*cu[:4], g=cu[4], seed=99, offset=12, return_noise=True)
    out_cpu, npx_cpu = bf.spectral(x, a, x2, a2, g=g, seed=99, offset=12, return_noise=True)
    want, want_n = ref.spectral(x.double(), a, x2.double(), a2, g=g, seed=99, offset=12,
                                return_noise=True)
    tol = {torch.float32: 2e-6, torch.float64: 1e-13, torch.bfloat16: 1e-2}[dtype]
    assert out.dtype == dtype
    assert rel_err(out, want) <= tol and rel_err(npx, want_n) <= tol
    assert rel_err(out, out_cpu) <= tol and rel_err(npx, npx_cpu) <= tol


def test_spectral_cuda_given_noise_and_broadcast_maps():
    x, zb = _rand(2, 3, 4, 16, 16), _rand(2, 3, 4, 16, 16, seed=2)
    a = torch.rand(2, 1, 4, 16, 16)          # materialized broadcast
    g = torch.rand(1, 3, 1, 16, 16)
    out = bf.spectral(x.cuda(), a.cuda(), g=g.cuda(), noise=zb.cuda())
    assert rel_err(out, ref.spectral(x.double(), a, g=g, noise=zb.double())) <= 2e-6


def test_noise_same_on_cpu_and_cuda():
    x = torch.zeros(64, 3, 37, 41)
    z_cpu = normal_like(x, seed=2 ** 33 + 5, offset=11)
    z_gpu = normal_like(x.cuda(), seed=2 ** 33 + 5, offset=11)
    assert torch.equal(z_cpu, z_gpu.cpu())     # float Box-Muller: the same bits (common.h)
    z64 = normal_like(x.double().cuda(), seed=7)
    assert (z64.cpu() - ref.philox_normal(x.shape, 7, 0, torch.float64)).abs().max() <= 1e-12


@pytest.mark.parametrize("hw", [(64, 64), (7, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_vmap_of_spectral_cuda_is_the_loop(hw, dtype):
    # vmap's rule passes normal_like of one sample (compute dtype) as given noise to one
    # batched call: the kernel's own noise to the bit, and each sample's output that of a
    # single-sample call (plane count changes only the launch geometry).
    x = _rand(5, 3, *hw, dtype=dtype).cuda()
    a, g = torch.rand(5, *hw).cuda(), torch.rand(3, 1, hw[1]).cuda()
    ct = torch.float64 if dtype == torch.float64 else torch.float32
    zb = normal_like(torch.empty(x.shape[1:], dtype=ct, device="cuda"), seed=9, offset=2 ** 40)
    one = lambda x, a: bf.spectral(x, a, g=g, seed=9, offset=2 ** 40, return_noise=True)
    for made, given in zip(one(x[0], a[0]), bf.spectral(x[0], a[0], g=g, noise=zb,
                                                         return_noise=True)):
        assert torch.equal(made, given)
    got = torch.func.vmap(one)(x, a)
    for i in range(2):
        assert torch.equal(got[i], torch.stack([one(x[k], a[k])[i] for k in range(5)])), i


def test_cuda_non_contiguous_empty_and_stream():
    x = _rand(3, 32, 48).cuda().transpose(-1, -2)
    assert rel_err(bf.dct2(x), ref.dct2(x.double().cpu())) <= 2e-6
    assert bf.dct2(torch.empty(0, 3, 8, 8, device="cuda")).shape == (0, 3, 8, 8)
    # On a side stream whose input is ready only after a long kernel: a launch on any
    # other stream (torch's are non-blocking) would read it too early.
    s = torch.cuda.Stream()
    y = _rand(8, 3, 64, 64).cuda()
    torch.cuda.synchronize()
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)           # tens of ms of spinning on s
        y2 = y * 2
        out = bf.dct2(y2)
    s.synchronize()
    assert rel_err(out, ref.dct2(2 * y.double().cpu())) <= 2e-6


def test_cuda_maps_on_other_device_rejected():
    with pytest.raises(ValueError, match="a: is on cpu"):
        bf.spectral(torch.zeros(8, 8, device="cuda"), torch.ones(8, 8))


def test_cuda_gradcheck_and_opcheck():
    d = dict(dtype=torch.float64, device="cuda")
    x = torch.randn(2, 2, 5, 6, **d, requires_grad=True)
    a = torch.rand(2, 1, 5, 6, **d, requires_grad=True)
    g = torch.rand(5, 6, **d, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, g: bf.spectral(x, a, g=g, seed=3), (x, a, g))
    from torch.library import opcheck
    xf = torch.randn(2, 3, 8, 8, device="cuda", requires_grad=True)
    opcheck(torch.ops.blurfast.dct2.default, (xf,))
    opcheck(torch.ops.blurfast.spectral.default,
            (xf, torch.rand(2, 1, 8, 8, device="cuda"), None, None,
             torch.rand(8, 8, device="cuda"), None, 1, 0, True))


def test_cuda_compile_fullgraph():
    @torch.compile(fullgraph=True)
    def f(x, a, g):
        return bf.spectral(x, a, g=g, seed=5) * 2

    x, a, g = _rand(2, 3, 32, 32).cuda(), torch.rand(2, 1, 32, 32).cuda(), torch.rand(32, 32).cuda()
    assert torch.allclose(f(x, a, g), bf.spectral(x, a, g=g, seed=5) * 2, atol=1e-5)


# ---------------------------------------------------------------- fused whole-plane kernel

_PLANES_PER_BLOCK = {32: 4, 64: 2, 128: 1}


def _plane_kernel_fits(n: int, buffers: int, dense: bool = False) -> bool:
    """Whether this GPU's opt-in shared memory holds the fused kernel's buffers (and, with
    the dense passes, their tables)."""
    optin = getattr(torch.cuda.get_device_properties(0), "shared_memory_per_block_optin", None)
    if optin is None:
        pytest.skip("torch does not report shared_memory_per_block_optin")
    tables = 3 * n * n // 8 if dense else 0
    need = 4 * (tables + buffers * _PLANES_PER_BLOCK[n] * n * n)
    return need <= optin


def _kernel_names(x, a, x2=None, a2=None, g=None, return_noise=False):
    from blurfast._backend import _C
    from blurfast.ops import spectral_kernel_args
    h, w = x.shape[-2:]
    planes = x.numel() // (h * w)
    code = {torch.float32: 0, torch.float16: 2, torch.bfloat16: 3}[x.dtype]
    out = torch.empty_like(x)
    dct = _C.dct2_kernel_name(x.data_ptr(), out.data_ptr(), planes, h, w, code, x.device.index)
    args, keep = spectral_kernel_args(x, a, x2, a2, g, None, 1, 0, out,
                                      torch.empty_like(x) if return_noise else None)
    return dct, _C.spectral_kernel_name(*args, x.device.index)


# The kernel choices of BLURFAST_CUDA_KERNELS with a fused whole-plane kernel ("fast"
# prefetches in two-buffer calls, "fast+prefetch" in all; cuda_fast.cu).
PLANE_CHOICES = ["fast", "dense", "fast+prefetch", "fast+wide"]


@pytest.mark.parametrize("passes", PLANE_CHOICES)
@pytest.mark.parametrize("n", [32, 64, 128])
def test_plane_kernel_serves_square_sizes(n, passes, monkeypatch):
    monkeypatch.setenv("BLURFAST_CUDA_KERNELS", passes)
    x = torch.randn(4, 3, n, n, device="cuda")
    a = torch.rand(4, 1, n, n, device="cuda")
    dct, step = _kernel_names(x, a, x.clone(), a, g=a, return_noise=False)
    dense = passes == "dense"       # the prefetch falls back to no prefetch where it does not fit
    assert dct == ("plane" if _plane_kernel_fits(n, 2, dense) else "simple")
    assert step == ("plane" if _plane_kernel_fits(n, 3, dense) else "simple")
    assert _kernel_names(torch.randn(4, 3, 48, 48, device="cuda"),
                         torch.rand(48, 48, device="cuda")) == ("simple", "simple")


@pytest.mark.parametrize("passes", PLANE_CHOICES)
@pytest.mark.parametrize("n", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_plane_and_simple_kernels_agree(n, dtype, passes, monkeypatch):
    monkeypatch.setenv("BLURFAST_CUDA_KERNELS", passes)
    b = 5                                    # 15 planes: partial plane groups
    x, x2 = _rand(b, 3, n, n, dtype=dtype), _rand(b, 3, n, n, dtype=dtype, seed=1)
    a, a2, g = torch.rand(b, 1, n, n), torch.rand(1, 3, n, n) - 0.5, torch.rand(b, 1, 1, 1)
    cu = [t.cuda() for t in (x, a, x2, a2, g)]
    kw = dict(seed=123, offset=2 ** 41 + 8, return_noise=True)
    fast = bf.spectral(*cu[:4], g=cu[4], **kw)
    fast_dct = bf.dct2(cu[0]), bf.idct2(cu[0])
    monkeypatch.setenv("BLURFAST_CUDA_KERNELS", "simple")
    assert _kernel_names(cu[0], cu[1])[0] == "simple"
    slow = bf.spectral(*cu[:4], g=cu[4], **kw)
    slow_dct = bf.dct2(cu[0]), bf.idct2(cu[0])
    want = ref.spectral(x.double(), a, x2.double(), a2, g=g, **kw)
    want_dct = ref.dct2(x.double()), ref.idct2(x.double())
    for got_f, got_s, w in zip(fast + fast_dct, slow + slow_dct, want + want_dct):
        if dtype == torch.float32:
            assert rel_err(got_f, w) <= 2e-6 and rel_err(got_s, w) <= 2e-6
        else:   # one rounding to bfloat16 at the end dominates
            bound = 2 * rel_err(w.to(dtype), w) + 2e-6
            assert rel_err(got_f, w) <= bound and rel_err(got_s, w) <= bound


@pytest.mark.parametrize("passes", PLANE_CHOICES)
@pytest.mark.parametrize("shape", [(2000, 3, 32, 32), (300, 3, 64, 64), (200, 1, 128, 128)])
def test_plane_kernel_many_planes(shape, passes, monkeypatch):
    monkeypatch.setenv("BLURFAST_CUDA_KERNELS", passes)
    # More plane groups than SMs (the throughput geometry, not the split one) and than
    # resident blocks, so blocks loop over plane groups.
    b, c, h, w = shape
    x, a = _rand(*shape), torch.rand(b, 1, h, w)
    out, eps = bf.spectral(x.cuda(), a.cuda(), g=(1 - a * a).sqrt().cuda(), seed=4,
                           return_noise=True)
    want, want_e = ref.spectral(x.double(), a, g=(1 - a * a).sqrt(), seed=4, return_noise=True)
    assert rel_err(out, want) <= 2e-6 and rel_err(eps, want_e) <= 2e-6


@pytest.mark.parametrize("shape", [(1000, 3, 32, 32), (700, 3, 64, 64), (300, 1, 128, 128),
                                   (33, 3, 64, 64)])
def test_prefetch_and_wide_change_no_bit(shape, monkeypatch):
    # Prefetching moves the same numbers earlier: with blocks looping over many plane
    # groups (the prefetch path) and a partial last group, every call gives the same bits
    # whether the fast kernel prefetches in no call, in two-buffer calls (the default) or
    # in all. The wide geometry (fast+wide) is the default's own kernel for the fused op
    # at 64 (float I/O), so there too the bits are the same.
    b, c, h, w = shape
    x, x2 = _rand(*shape).cuda(), _rand(*shape, seed=1).cuda()
    a, g = torch.rand(b, 1, h, w).cuda(), torch.rand(b, 1, 1, 1).cuda()
    calls = {
        "dct2": lambda: (bf.dct2(x),), "idct2": lambda: (bf.idct2(x),),
        "q_sample": lambda: bf.spectral(x, a, g=g, seed=8, return_noise=True),
        "step": lambda: (bf.spectral(x, a, x2, a, g=g, seed=8),),
    }
    got = {}
    for choice in ("fast+noprefetch", "fast", "fast+prefetch", "fast+wide"):
        monkeypatch.setenv("BLURFAST_CUDA_KERNELS", choice)
        got[choice] = {k: f() for k, f in calls.items()}
    xd = x.double().cpu()
    want = {"dct2": (ref.dct2(xd),), "idct2": (ref.idct2(xd),),
            "q_sample": ref.spectral(xd, a.cpu(), g=g.cpu(), seed=8, return_noise=True),
            "step": (ref.spectral(xd, a.cpu(), x2.double().cpu(), a.cpu(), g=g.cpu(),
                                  seed=8),)}
    for k in calls:
        # dct2 and idct2 at 64 on the wide geometry are a kernel of their own: on the
        # H100 (run v6) its dct2 differed from the one-plane kernel's in some bits, though
        # the emulator runs the same arithmetic in both
        # (test_wide_geometry_pairs_transforms_bit_for_bit); nvcc's choice of fused
        # multiply-adds in each kernel is the likely cause. There it is held to the
        # float64 truth instead.
        own = h == 64 and k in ("dct2", "idct2")
        for choice in ["fast", "fast+prefetch"] + ([] if own else ["fast+wide"]):
            for u, v in zip(got["fast+noprefetch"][k], got[choice][k]):
                assert torch.equal(u, v), (k, choice)
        for choice in ["fast"] + (["fast+wide"] if own else []):
            for u, w_ in zip(got[choice][k], want[k]):
                assert rel_err(u, w_) <= 2e-6, (k, choice)


@pytest.mark.parametrize("passes", ["fast", "dense", "fast+separate", "fast+fill"])
def test_strip_path_in_l2_sized_chunks(passes, monkeypatch):
    # More than a third of the L2 cache of 256 x 256 planes: transform2d goes in chunks of
    # planes (cuda_kernels.cu), the last one partial; dct2, idct2 and the fused op, which
    # "fast" runs in three passes (column_program.h), also in chunks of planes, and the
    # others transform by transform.
    monkeypatch.setenv("BLURFAST_CUDA_KERNELS", passes)
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2 ** 20)
    planes = l2 // 3 // (256 * 256 * 4) * 2 + 3
    x, x2 = _rand(planes, 256, 256).cuda(), _rand(planes, 256, 256, seed=1).cuda()
    a = torch.rand(planes, 1, 1).cuda()
    a2 = torch.rand(256, 256).cuda() - 0.5
    columns = passes in ("fast", "fast+fill")
    assert _kernel_names(x, a)[1] == ("columns" if columns else "simple")
    xd = x.double()          # the reference on the GPU, in float64
    assert rel_err(bf.dct2(x), ref.dct2(xd)) <= 2e-6
    assert rel_err(bf.idct2(x), ref.idct2(xd)) <= 2e-6
    g = (1 - a * a).sqrt()
    out, eps = bf.spectral(x, a, g=g, seed=3, offset=2 ** 40 + 2, return_noise=True)
    want, want_e = ref.spectral(xd, a.double(), g=g.double(), seed=3, offset=2 ** 40 + 2,
                                return_noise=True)
    assert rel_err(out, want) <= 2e-6 and rel_err(eps, want_e) <= 2e-6
    step = bf.spectral(x, a, x2, a2, g=g, seed=4)
    want = ref.spectral(xd, a.double(), x2.double(), a2.double(), g=g.double(), seed=4)
    assert rel_err(step, want) <= 2e-6


@pytest.mark.parametrize("planes", [2, 192])
def test_column_path_workspace_is_a_chunk_of_intermediates(planes):
    # The fused op's three passes at 256 x 256 hold, per chunk of planes, the row passes of
    # the inputs and the column passes of the result and the returned noise: chunks of
    # equal size whose intermediates fill at most half the L2 cache, or with a small L2
    # enough planes for one row-pass block (64 rows) per SM.
    from blurfast._backend import _C
    from blurfast.ops import spectral_kernel_args
    x = torch.zeros(planes, 256, 256, device="cuda")
    hw = 256 * 256
    props = torch.cuda.get_device_properties(0)
    l2, per_sm = props.L2_cache_size, -(-props.multi_processor_count * 64 // 256)
    a = torch.ones(256, 256, device="cuda")
    for x2, noise_out, arrays in ((None, None, 2), (x, None, 3), (None, torch.empty_like(x), 3),
                                  (x, torch.empty_like(x), 4)):
        fit = max(per_sm, l2 // 2 // (arrays * hw * 4))
        chunks = -(-planes // fit)
        chunk = -(-planes // chunks)
        args, keep = spectral_kernel_args(x, a, x2, None if x2 is None else a, a, None, 1, 0,
                                          torch.empty_like(x), noise_out)
        assert _C.spectral_workspace_elems(*args, 0) == chunk * arrays * hw


def test_column_path_fill_chunks_give_two_row_blocks_per_sm(monkeypatch):
    # fast+fill: chunks of planes whose row passes (64 rows of 256 per block) have two
    # blocks for every SM, made equal in size (192 planes on 132 SMs: 3 chunks of 64, 256
    # blocks for 264 places).
    from blurfast._backend import _C
    from blurfast.ops import spectral_kernel_args
    monkeypatch.setenv("BLURFAST_CUDA_KERNELS", "fast+fill")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    x = torch.zeros(192, 256, 256, device="cuda")
    fit = 2 * -(-sms * 64 // 256)
    chunks = -(-192 // fit)
    chunk = -(-192 // chunks)
    args, keep = spectral_kernel_args(x, torch.ones(256, 256, device="cuda"), None, None, None,
                                      None, 1, 0, torch.empty_like(x), torch.empty_like(x))
    assert _C.spectral_workspace_elems(*args, 0) == chunk * 3 * 256 * 256


@pytest.mark.parametrize("planes", [2, 192])
def test_simple_path_workspace_is_one_chunk_plus_the_spectra(planes, monkeypatch):
    # The transform-by-transform path (256 x 256 with "fast+separate") holds one L2-sized
    # chunk of transposed planes, and one full spectrum per input and for the returned
    # noise.
    from blurfast._backend import _C
    from blurfast.ops import spectral_kernel_args
    monkeypatch.setenv("BLURFAST_CUDA_KERNELS", "fast+separate")
    x = torch.zeros(planes, 256, 256, device="cuda")
    hw, n = 256 * 256, planes * 256 * 256
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    per_sm = -(-torch.cuda.get_device_properties(0).multi_processor_count * 64 // 256)
    chunk = min(planes, max(1, per_sm, (l2 // 3) // (hw * 4)))   # at least a block per SM
    a = torch.ones(256, 256, device="cuda")
    for x2, noise_out, spectra in ((None, None, 1), (x, None, 2), (None, torch.empty_like(x), 2),
                                   (x, torch.empty_like(x), 3)):
        args, keep = spectral_kernel_args(x, a, x2, None if x2 is None else a, a, None, 1, 0,
                                          torch.empty_like(x), noise_out)
        assert _C.spectral_workspace_elems(*args, 0) == chunk * hw + spectra * n
    assert _C.dct2_workspace_elems(x.data_ptr(), x.data_ptr(), planes, 256, 256, 0, 0) == \
        chunk * hw


def test_plane_kernel_misaligned_input_falls_back():
    # A view 4 bytes into its storage cannot take float4 loads: the simple kernels serve it.
    flat = _rand(3 * 64 * 64 + 1).cuda()
    xv = flat[1:].view(3, 64, 64)
    assert _kernel_names(xv, torch.ones(64, 64, device="cuda"))[0] == "simple"
    assert rel_err(bf.dct2(xv), ref.dct2(flat[1:].view(3, 64, 64).double().cpu())) <= 2e-6


def _one_element_in(t):
    """t's values in a contiguous view one element into its storage: 4 bytes off 16 for
    float32, 2 bytes off 8 for the 16-bit types, so no vector access fits it."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    v = flat[1:].view(t.shape)
    v.copy_(t)
    return v


@pytest.mark.parametrize("which", ["x", "x2", "a", "a2", "g", "noise"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [64, 256])
def test_fused_op_with_one_misaligned_input_takes_the_simple_kernels(n, dtype, which):
    # Every pointer of a fused call is checked before the whole-plane kernel (64: "plane")
    # or the column path (256: "columns") serves it (cuda_fast.cu, make_plan and
    # column_plan: 16 bytes for float32 data, maps and noise, 8 for 16-bit data); one
    # input that fails the check sends the call to the simple kernels, which read it
    # element by element.
    from blurfast._backend import _C
    from blurfast.ops import spectral_kernel_args
    t = {"x": _rand(2, 3, n, n, dtype=dtype), "x2": _rand(2, 3, n, n, dtype=dtype, seed=1),
         "a": torch.rand(2, 1, n, n), "a2": torch.rand(1, 3, n, n) - 0.5,
         "g": torch.rand(n, n), "noise": _rand(2, 3, n, n, seed=2)}
    cu = {k: v.cuda() for k, v in t.items()}

    def name(c):
        args, keep = spectral_kernel_args(c["x"], c["a"], c["x2"], c["a2"], c["g"], c["noise"],
                                          1, 0, torch.empty_like(c["x"]), None)
        return _C.spectral_kernel_name(*args, 0)

    assert name(cu) in ("plane", "columns")     # (64: "plane" where its shared memory fits)
    cu[which] = _one_element_in(cu[which])
    assert cu[which].data_ptr() % 8 != 0
    assert name(cu) == "simple"     # (the misaligned tensor reached the kernel uncopied)
    got = bf.spectral(cu["x"], cu["a"], cu["x2"], cu["a2"], g=cu["g"], noise=cu["noise"])
    want = ref.spectral(t["x"].double(), t["a"], t["x2"].double(), t["a2"], g=t["g"],
                        noise=t["noise"].double())
    bound = 2e-6 if dtype == torch.float32 else 2 * rel_err(want.to(dtype), want) + 2e-6
    assert got.dtype == dtype and rel_err(got, want) <= bound


def test_plane_kernel_first_call_inside_cuda_graph_capture():
    # float16 at 128 with a second input and returned noise: no other test plans this
    # kernel, so its first plan (shared-memory attribute, occupancy query) happens
    # during capture here.
    x, x2 = _rand(2, 3, 128, 128, dtype=torch.float16).cuda(), _rand(2, 3, 128, 128).half().cuda()
    a, g = torch.rand(2, 1, 128, 128).cuda(), torch.rand(128, 128).cuda()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, eps = bf.spectral(x, a, x2, a, g=g, seed=9, return_noise=True)
    graph.replay()
    torch.cuda.synchronize()
    want, want_e = bf.spectral(x, a, x2, a, g=g, seed=9, return_noise=True)
    assert torch.equal(out, want) and torch.equal(eps, want_e)


def test_drawn_seed_is_refused_inside_a_cuda_graph_capture():
    # seed=None draws a host seed at capture time; every replay would repeat its noise.
    x, a, g = _rand(2, 3, 64, 64).cuda(), torch.rand(2, 1, 64, 64).cuda(), torch.rand(64, 64).cuda()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="seed: None inside a CUDA graph capture"):
        with torch.cuda.graph(graph):
            bf.spectral(x, a, g=g)
    torch.cuda.synchronize()
    eps = torch.randn_like(x)        # given noise, and no noise at all, capture as before
    with torch.cuda.graph(graph):
        out = bf.spectral(x, a, eps, g)
        y = bf.spectral(x, a)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, bf.spectral(x, a, eps, g)) and torch.equal(y, bf.spectral(x, a))


def test_plane_kernel_buffer_counts_in_any_order():
    # One kernel serves two- and three-buffer calls with different shared memory sizes;
    # alternating them must keep working (its shared-memory limit covers the larger).
    x = _rand(3, 3, 128, 128).cuda()
    a = torch.rand(3, 1, 128, 128).cuda()
    want_step = ref.spectral(x.double().cpu(), a.cpu(), x.double().cpu(), a.cpu())
    want_dct = ref.dct2(x.double().cpu())
    for _ in range(2):
        assert rel_err(bf.spectral(x, a, x, a), want_step) <= 2e-6     # three buffers
        assert rel_err(bf.dct2(x), want_dct) <= 2e-6                   # two buffers
