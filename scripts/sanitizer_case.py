"""Small CUDA workload for compute-sanitizer (memcheck, racecheck), also a correctness check.

Calls blurfast.dct2 / idct2 / spectral on CUDA at a few sizes (the fused whole-plane
kernel's squares 32, 64, 128 in float32 and bfloat16; the strip kernel at 256 x 256 and
64 x 128, and the fused op's three passes there (and its six with fast+separate); the same
squares again with the dense passes and with the simple kernels; the
prefetching fused op on many planes; odd sizes, an empty batch, a non-contiguous input,
broadcast maps, batches large enough for the throughput geometry and for blocks that loop
over plane groups), copies the results back and compares them with blurfast.reference on
the CPU in float64.
Exits 0 when every case ran and matched, 1 on a mismatch or an exception, 2
when there is no CUDA device. Run it under the sanitizer with the caching
allocator off, so out-of-bounds accesses land outside real allocations:

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
        --error-exitcode 3 python scripts/sanitizer_case.py
"""
import argparse
import os
import sys
import traceback

import torch

# The blurfast of this tree (the one gpu_check.sh's ext step made importable), as
# ncu_case.py and profile_step.py import it; run as a script, Python puts scripts/ first.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPES = [
    (2, 3, 8, 8), (2, 3, 16, 16), (2, 3, 32, 32), (2, 3, 64, 64), (1, 3, 128, 128),
    (1, 2, 256, 256), (1, 1, 1, 1), (2, 1, 7, 12), (1, 2, 33, 20), (0, 3, 16, 16),
    (1, 2, 64, 128), (1, 3, 96, 256), (1, 1, 32, 64),   # strip passes with partial blocks
    (2, 1, 5, 7),                # planes of 35: the combine step's last quad is partial
]
SQUARES = [(2, 3, 32, 32), (2, 3, 64, 64), (1, 3, 128, 128)]
REL_TOL = 1e-5          # float32 kernels vs float64 reference, relative to max |ref|
BF16_TOL = 1e-2         # bfloat16 I/O: one rounding of the result
# --quick (gpu_check.sh's ext step): every op once at 64 x 64 (the fused whole-plane
# kernel) and at 7 x 12 (the simple kernels), float32 and bfloat16, to this script's
# bounds: a gate for kernels that do not run or are plainly wrong (another GPU's build),
# which would waste every later step. Only an op that raises fails it (exit 1); a wrong
# result is printed (FAIL) and the run goes on: the benches skip that row and time the
# rest, and the tests step holds every kernel to tests/test_cuda.py's tighter bounds.
QUICK_RUNS = [((2, 3, 64, 64), torch.float32), ((2, 3, 64, 64), torch.bfloat16),
              ((2, 1, 7, 12), torch.float32), ((2, 1, 7, 12), torch.bfloat16)]


def _rel_err(got, want):
    want = want.double()
    scale = max(want.abs().max().item(), 1e-30) if want.numel() else 1.0
    return ((got.cpu().double() - want).abs().max().item() / scale) if want.numel() else 0.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-hw", type=int, default=256, help="skip shapes with H or W above this")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu only to test this script")
    p.add_argument("--quick", action="store_true",
                   help="only QUICK_RUNS: does each kernel family run on this GPU and give "
                        "the right result, to this script's bounds (a few seconds)")
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    import blurfast as bf
    from blurfast import reference as ref

    gen = torch.Generator().manual_seed(0)
    failures = raised = 0

    def check(name, fn, tol=REL_TOL):
        nonlocal failures, raised
        try:
            err = fn()
            sync()
            ok = err <= tol
            print(f"{'ok  ' if ok else 'FAIL'} {name}: max rel err {err:.2e}", flush=True)
            failures += not ok
        except Exception:
            failures += 1
            raised += 1
            print(f"FAIL {name}: exception", flush=True)
            traceback.print_exc()

    # The variants first (racecheck is slow, and a time limit should cut the plain cases).
    # Prefetching blocks looping over plane groups, in the fused op too (fast+prefetch).
    runs = [((400, 3, 32, 32), torch.float32, "fast+prefetch")]
    runs += [((300, 3, 64, 64), torch.float32, "fast+prefetch")]
    runs += [((150, 1, 128, 128), torch.float32, "fast+prefetch")]
    runs += [((16, 3, 64, 64), torch.float32, "fast+wide")]          # the wide geometry
    runs += [((150, 3, 64, 64), torch.float32, "fast+wide")]         # its blocks looping
    # The fused op at 256 x 256 in three passes (the default; column_program.h), in
    # bfloat16 too, and version 5's six passes and combine kernel.
    runs += [((2, 3, 256, 256), torch.bfloat16, "")]
    runs += [((1, 2, 256, 256), torch.float32, "fast+separate")]
    runs += [(shape, torch.float32, "") for shape in SHAPES]
    runs += [(shape, torch.bfloat16, "") for shape in SQUARES]
    runs += [(shape, torch.float32, "dense") for shape in SQUARES]
    runs += [(shape, torch.float32, "simple") for shape in SQUARES]
    runs += [((400, 3, 32, 32), torch.float32, "")]     # more plane groups than blocks
    runs += [((150, 3, 64, 64), torch.float32, "")]     # more plane groups than SMs
    runs += [((150, 3, 64, 64), torch.float32, "dense")]
    if a.quick:
        runs = [(shape, dtype, "") for shape, dtype in QUICK_RUNS]
    for shape, dtype, kernels in runs:
        b, c, h, w = shape
        if max(h, w) > a.max_hw:
            continue
        if kernels:
            os.environ["BLURFAST_CUDA_KERNELS"] = kernels
        else:
            os.environ.pop("BLURFAST_CUDA_KERNELS", None)
        tol = BF16_TOL if dtype == torch.bfloat16 else REL_TOL
        tag = "x".join(map(str, shape)) + (" bfloat16" if dtype == torch.bfloat16 else "") + \
            (f" (BLURFAST_CUDA_KERNELS={kernels})" if kernels else "")
        x = torch.randn(*shape, generator=gen)
        x2 = torch.randn(*shape, generator=gen)
        am = torch.rand(b, 1, h, w, generator=gen)
        gm = torch.sqrt(1 - am * am)
        bm = -0.1 * torch.rand(b, 1, h, w, generator=gen)
        s1 = torch.rand(1, 1, h, w, generator=gen)
        zb = torch.randn(*shape, generator=gen)
        xc, x2c = x.to(dev, dtype), x2.to(dev, dtype)
        amc, gmc, bmc, s1c, zbc = (t.to(dev) for t in (am, gm, bm, s1, zb))

        check(f"dct2 {tag}", lambda: _rel_err(bf.dct2(xc), ref.dct2(x.double())), tol)
        check(f"idct2 {tag}", lambda: _rel_err(bf.idct2(xc), ref.idct2(x.double())), tol)

        def q_sample():
            out, eps = bf.spectral(xc, amc, g=gmc, seed=7, offset=3, return_noise=True)
            r_out, r_eps = ref.spectral(x.double(), am.double(), g=gm.double(), seed=7,
                                        offset=3, return_noise=True)
            return max(_rel_err(out, r_out), _rel_err(eps, r_eps))
        check(f"spectral q_sample {tag}", q_sample, tol)

        def sampler_step():
            out = bf.spectral(xc, amc, x2c, bmc, g=s1c, seed=11)
            r = ref.spectral(x.double(), am.double(), x2.double(), bm.double(),
                             g=s1.double(), seed=11)
            return _rel_err(out, r)
        check(f"spectral sampler_step {tag}", sampler_step, tol)

        def given_noise():
            out = bf.spectral(xc, s1c, g=gmc, noise=zbc)
            r = ref.spectral(x.double(), s1.double(), g=gm.double(), noise=zb.double())
            return _rel_err(out, r)
        check(f"spectral given noise {tag}", given_noise, tol)
    os.environ.pop("BLURFAST_CUDA_KERNELS", None)

    if not a.quick:       # a non-contiguous input (a transposed view) and a rank-2 input
        xt = torch.randn(2, 3, 32, 16, generator=gen)
        check("dct2 non-contiguous", lambda: _rel_err(bf.dct2(xt.to(dev).transpose(-1, -2)),
                                                      ref.dct2(xt.double().transpose(-1, -2))))
        x2d = torch.randn(64, 64, generator=gen)
        check("idct2 rank 2", lambda: _rel_err(bf.idct2(x2d.to(dev)), ref.idct2(x2d.double())))

    sync()
    print(f"{failures} failure(s)")
    if a.quick:
        # Only an op that raised (no kernel image for this GPU, a launch error) fails the
        # gate: the benches skip a wrong row (wrong_output) and time the others, and the
        # tests step names it.
        if failures and not raised:
            print("wrong results but every op ran: the run goes on", flush=True)
        return 1 if raised else 0
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
