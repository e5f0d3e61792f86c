"""The kernels worth a hardware profile, one call each, for Nsight Compute.

Every case runs once to warm up (allocation, planning, the shared-memory attribute);
then, between ``cudaProfilerStart`` and ``cudaProfilerStop``, each case runs once more
with nothing else on the GPU, so an ncu run with ``--profile-from-start off`` profiles
exactly these launches (gpu_check.sh's ``ncu`` step):

    ncu --profile-from-start off --clock-control none --section SpeedOfLight \\
        --section Occupancy --section WarpStateStats python scripts/ncu_case.py

Cases (float32): the fused op at 256x3x64x64 (one-plane geometry, q_sample with the
noise returned) and at 16x3x64x64 (the default small-call geometry and fast+wide),
dct2 at 256x3x64x64 (prefetching), q_sample at 64x3x256x256 (strip passes and the
combine step), and q_sample and dct2 there on the cluster kernel (fast+cluster). Exits 2 without a CUDA device.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
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

    cases = [  # (name, BLURFAST_CUDA_KERNELS or None, call)
        ("q_sample 256x3x64x64", None, q_sample((256, 3, 64, 64))),
        ("dct2 256x3x64x64", None, dct2((256, 3, 64, 64))),
        ("q_sample 16x3x64x64", None, q_sample((16, 3, 64, 64))),
        ("q_sample 16x3x64x64 fast+wide", "fast+wide", q_sample((16, 3, 64, 64))),
        ("q_sample 64x3x256x256", None, q_sample((64, 3, 256, 256))),
        ("q_sample 64x3x256x256 fast+cluster", "fast+cluster", q_sample((64, 3, 256, 256))),
        ("dct2 64x3x256x256 fast+cluster", "fast+cluster", dct2((64, 3, 256, 256))),
    ]

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
