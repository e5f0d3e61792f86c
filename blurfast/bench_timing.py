"""Timing of the benchmarks: CUDA events or wall clock, medians over rotated input sets
(larger than L2 on a GPU), the kernels a call launches, and the copy bandwidth every row
is measured against."""
from __future__ import annotations

import functools
import math
import re
import statistics
import time
from typing import Optional

import torch

__all__ = ["time_call", "short_kernel_name", "launched_kernels", "num_input_sets",
           "measure_copy_gbps"]

# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _sleep_cycles_per_us(device_index: int) -> Optional[float]:
    """GPU clock cycles per microsecond of ``torch.cuda._sleep`` (None if unavailable)."""
    if not hasattr(torch.cuda, "_sleep"):
        return None
    with torch.cuda.device(device_index):
        torch.cuda._sleep(1000)
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 20_000_000
        s.record()
        torch.cuda._sleep(cycles)
        e.record()
        torch.cuda.synchronize()
        us = s.elapsed_time(e) * 1000.0
    return cycles / us if us > 0 else None


def time_call(fn, arg_sets, device, iters: int, warmup: int) -> dict:
    """Time ``fn(*arg_sets[i % len(arg_sets)])``.

    Returns ``{"median_us", "wall_us", "iters"}``:

    * CUDA: ``median_us`` is the median over ``iters`` calls of the GPU time of
      one call, from CUDA events recorded around it, with the stream first
      given a spin kernel long enough for the host to queue all the calls (so
      host launch overhead does not show; this is the device time of the
      call's kernels). ``wall_us`` is host wall-clock per call over ``iters``
      back-to-back calls ended by a synchronize (what a Python loop pays,
      launch overhead included).
    * CPU: ``median_us`` is the median of per-call wall-clock times;
      ``wall_us`` their mean.
    """
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            return _time_call_cuda(fn, arg_sets, device, iters, warmup)
    k = len(arg_sets)
    for i in range(max(warmup, 1)):
        fn(*arg_sets[i % k])
    ts = []
    for i in range(iters):
        t0 = time.perf_counter()
        fn(*arg_sets[i % k])
        ts.append((time.perf_counter() - t0) * 1e6)
    return {"median_us": statistics.median(ts), "wall_us": statistics.fmean(ts),
            "iters": iters}


def _time_call_cuda(fn, arg_sets, device, iters, warmup):
    k = len(arg_sets)
    for i in range(max(warmup, 1)):
        fn(*arg_sets[i % k])
    torch.cuda.synchronize(device)

    # Host wall-clock per call (steady state, launch overhead included).
    t0 = time.perf_counter()
    for i in range(iters):
        fn(*arg_sets[i % k])
    enqueue_us = (time.perf_counter() - t0) * 1e6 / iters
    torch.cuda.synchronize(device)
    wall_us = (time.perf_counter() - t0) * 1e6 / iters

    # Device time per call: queue everything behind a spin kernel, then events.
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    cpu = _sleep_cycles_per_us(device.index if device.index is not None
                               else torch.cuda.current_device())
    if cpu is not None:
        # Enough spin for the host to enqueue all calls (it took enqueue_us
        # per call above, events add a little), capped at 0.5 s.
        lead_us = min(2.0 * enqueue_us * iters + 500.0, 500_000.0)
        torch.cuda._sleep(int(lead_us * cpu))
    for i in range(iters):
        starts[i].record()
        fn(*arg_sets[i % k])
        ends[i].record()
    torch.cuda.synchronize(device)
    ts = [s.elapsed_time(e) * 1000.0 for s, e in zip(starts, ends)]
    return {"median_us": statistics.median(ts), "wall_us": wall_us, "iters": iters}


def short_kernel_name(name: str) -> str:
    """A CUDA kernel's name without its return type, namespaces and parameter list:
    ``plane_kernel<Geom<64, 2, true>, float>`` (which geometry served a call)."""
    name = re.sub(r"^void ", "", name)
    name = re.sub(r"\b[A-Za-z_]\w*::", "", name)
    if name.endswith(")"):                       # the parameter list
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    return name[:160]


def launched_kernels(fn, args, device) -> Optional[list]:
    """Short names of the CUDA kernels one call of ``fn(*args)`` launches, in order, from
    the torch profiler (None on CPU or when the profiler is unavailable)."""
    if torch.device(device).type != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile
        fn(*args)                                  # caches, allocator, lazy init
        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn(*args)
            torch.cuda.synchronize(device)
        kinds = {"cuda", "privateuse1"}
        return [short_kernel_name(e.name) for e in prof.events()
                if str(getattr(e, "device_type", "")).split(".")[-1].lower() in kinds
                and not e.name.startswith(("Memcpy", "Memset", "cudaMem"))]
    except Exception:
        return None


def _l2_bytes(device) -> int:
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    return 0


def num_input_sets(set_bytes: int, device, max_sets: int = 256,
                   max_bytes: int = 2 * 2**30) -> int:
    """How many distinct input sets to rotate through so that each call reads
    data not touched for at least twice the L2 size (CUDA); 1 on CPU."""
    l2 = _l2_bytes(device)
    if l2 == 0 or set_bytes == 0:
        return 1
    k = math.ceil(2 * l2 / set_bytes)
    k = min(k, max_sets, max(1, max_bytes // set_bytes))
    return max(k, 2)


def measure_copy_gbps(device, nbytes: Optional[int] = None, iters: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written), median."""
    device = torch.device(device)
    if nbytes is None:
        nbytes = 512 * 2**20 if device.type == "cuda" else 32 * 2**20
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            nbytes = min(nbytes, max(free // 8, 16 * 2**20))
    n = nbytes // 4
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    if device.type != "cuda":
        iters = min(iters, 5)
    res = time_call(lambda: dst.copy_(src), [()], device, iters=iters, warmup=3)
    return 2 * n * 4 / (res["median_us"] * 1e-6) / 1e9
