"""The kernels worth a hardware profile, one call each, for Nsight Compute.

Every case runs once to warm up (allocation, planning, the shared-memory attribute);
then, between ``cudaProfilerStart`` and ``cudaProfilerStop``, each case runs once more
with nothing else on the GPU, so an ncu run with ``--profile-from-start off`` profiles
exactly these launches. gpu_check.sh's ``ncu`` step profiles one case per ncu run
(``--case K``), each with its own report, so a time limit loses only the cases it cuts:

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \\
        --section Occupancy --section WarpStateStats python scripts/ncu_case.py --case 0

The cases are CASES below (float32; q_sample returns its noise), the most wanted first:
the fused op on the default geometries at 64 x 64, dct2, and the 256 x 256 path (since
version 8 three passes: row strips, the column kernel with the combine step, row strips).
Exits 2 without a CUDA device.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (name, call, shape, BLURFAST_CUDA_KERNELS or None), the most wanted first.
CASES = [
    ("q_sample 256x3x64x64", "q_sample", (256, 3, 64, 64), None),
    ("q_sample 16x3x64x64", "q_sample", (16, 3, 64, 64), None),
    ("dct2 256x3x64x64", "dct2", (256, 3, 64, 64), None),
    ("q_sample 64x3x256x256", "q_sample", (64, 3, 256, 256), None),
    ("q_sample 16x3x64x64 fast+wide", "q_sample", (16, 3, 64, 64), "fast+wide"),
]
CASE_NAMES = [c[0] for c in CASES]


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", type=int, default=None,
                   help="profile only case number CASE (0-based); --list prints them")
    p.add_argument("--list", action="store_true", help="print the cases, one per line")
    a = p.parse_args(argv)
    if a.list:
        print("\n".join(CASE_NAMES))
        return 0
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    import blurfast as bf
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)

    def inputs(shape):
        b, _, h, w = shape
        x = torch.randn(shape, device=dev, generator=gen)
        a = torch.rand(b, 1, h, w, device=dev, generator=gen)
        return x, a, torch.sqrt(1 - a * a)

    def q_sample(shape):
        x, a, g = inputs(shape)
        return lambda: bf.spectral(x, a, g=g, seed=1, return_noise=True)

    def dct2(shape):
        x, _, _ = inputs(shape)
        return lambda: bf.dct2(x)

    makers = {"q_sample": q_sample, "dct2": dct2}
    cases = [(name, kernels, makers[case](shape)) for name, case, shape, kernels in CASES
             if a.case is None or CASES.index((name, case, shape, kernels)) == a.case]
    if not cases:
        p.error(f"--case: expected 0 .. {len(CASES) - 1}, got {a.case}")

    def run(kernels, fn):
        if kernels:
            os.environ["BLURFAST_CUDA_KERNELS"] = kernels
        else:
            os.environ.pop("BLURFAST_CUDA_KERNELS", None)
        fn()

    for _, kernels, fn in cases:
        run(kernels, fn)
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for name, kernels, fn in cases:
        torch.cuda.nvtx.range_push(name)
        run(kernels, fn)
        torch.cuda.nvtx.range_pop()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    os.environ.pop("BLURFAST_CUDA_KERNELS", None)
    print("profiled:", "; ".join(name for name, _, _ in cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
