"""pytest-benchmark cases: {dct2, idct2, q_sample, sampler_step} x impls x shapes.

Each case records in ``benchmark.extra_info`` the minimum traffic in bytes, the
GB/s that traffic gives at the median time, and that as a share of the
device-to-device copy bandwidth measured in the same session. Times here are
host wall-clock per call (of calls whose output was first checked against a float64
truth, as the runner does), with ``torch.cuda.synchronize`` inside the timed
function on CUDA (launch overhead and the synchronize included); the CUDA-event
device times are what ``benchmarks/run.py`` reports.
"""
import itertools

import pytest
import torch

from blurfast import bench


def test_kernel(benchmark, bench_device, bench_rounds, copy_gbps, case, shape, impl):
    spec = bench.get_impl(impl)
    ok, why = spec.available(bench_device)
    if not ok:
        pytest.skip(why)
    fn = spec.functions().get(case)
    if fn is None:
        pytest.skip(f"{impl} has no {case}")
    is_cuda = bench_device.type == "cuda"

    base = bench.make_inputs(case, shape, bench_device)
    # Once, before timing: the output against the float64 truth (blurfast/bench_check.py);
    # a wrong output fails the case instead of timing a wrong computation.
    bench.check_impl(impl, case, fn, base, bench_device)
    nsets = bench.num_input_sets(bench._set_bytes(base), bench_device) if is_cuda else 1
    arg_sets = [base] + [tuple(a.clone() for a in base) for _ in range(nsets - 1)]

    def target(*args):
        out = fn(*args)
        if is_cuda:
            torch.cuda.synchronize(bench_device)
        return out

    nbytes = bench.traffic_bytes(case, shape)
    benchmark.group = f"{case} {'x'.join(map(str, shape))}"
    benchmark.extra_info.update({
        "case": case, "shape": list(shape), "impl": impl,
        "device": bench._device_name(bench_device), "bytes": nbytes,
        "copy_gbps": round(copy_gbps, 1), "input_sets": nsets,
    })
    with spec.context(bench_device):
        sets = itertools.cycle([spec.convert(a) for a in arg_sets])
        benchmark.pedantic(target, setup=lambda: (next(sets), {}), rounds=bench_rounds,
                           warmup_rounds=2 if is_cuda else 1, iterations=1)
    stats = getattr(benchmark, "stats", None)
    if stats is not None:                     # None under --benchmark-disable
        median_s = stats.stats.median
        gbps = nbytes / median_s / 1e9
        benchmark.extra_info.update({
            "median_us": round(median_s * 1e6, 2),
            "gbps": round(gbps, 2),
            "copy_fraction": round(gbps / copy_gbps, 4),
        })
