"""Where a training step's GPU time goes (a development aid for issue 4; CUDA only).

    python scripts/profile_step.py --batch 16 --out /tmp/profile_step.txt

1. Times TrainStep (paper64 by default) in several configurations, same process: bf16
   autocast or fp32 (TF32), CUDA graph or eager, the bf16 weights cast per use
   (autocast) or once per step (``cast_once``), and with ``--compile`` torch.compile
   plus the graph (NCHW, and channels_last), so the cost of each setting shows.
2. Profiles a few steps with torch.profiler and prints the kernels that take the most
   GPU time: of the fastest compiled configuration (bf16, compiled model, CUDA graph;
   train()'s default on one GPU is NCHW and casts per use) with ``--compile``, else of
   eager bf16 steps (NCHW).

A configuration that raises is reported on its line and the others go on (exit code 1
at the end); ``--out`` is rewritten after each configuration, so a run cut short by a
time limit keeps the lines it finished.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from blurfast.diffusion import BlurDiffusion  # noqa: E402
from blurfast.fileio import atomic_path  # noqa: E402
from blurfast.models import UNet  # noqa: E402
from blurfast.training import TrainStep  # noqa: E402

CONFIGS = {   # name: TrainStep keyword arguments (channels_last lost to NCHW in run v4)
    "bf16 + graph (NCHW)": dict(precision="bf16", cuda_graphs=True),
    "bf16 + graph + cast_once": dict(precision="bf16", cuda_graphs=True, cast_once=True),
    "bf16, eager": dict(precision="bf16", cuda_graphs=False),
    "fp32 (TF32) + graph (NCHW)": dict(precision="fp32", cuda_graphs=True),
}
COMPILED = {
    "bf16 + compile + graph": dict(precision="bf16", compile=True, cuda_graphs=True),
    "bf16 + compile + graph + cast_once": dict(precision="bf16", compile=True,
                                               cuda_graphs=True, cast_once=True),
    # Uncompiled, channels_last lost to GroupNorm's layout copies (run v4); compiled,
    # Inductor writes the norms itself and cuDNN's bf16 convolutions take NHWC natively.
    "bf16 + compile + graph + channels_last": dict(precision="bf16", compile=True,
                                                   cuda_graphs=True, channels_last=True),
}


def make_step(preset, res, batch, **kw):
    torch.manual_seed(0)
    diff = BlurDiffusion(resolution=res)
    model = UNet.from_preset(preset, resolution=res, channels=3)
    step = TrainStep(model, diff, device="cuda", **kw)
    x = torch.randint(0, 256, (batch, res, res, 3), dtype=torch.uint8).pin_memory()
    flip = torch.zeros(batch, dtype=torch.bool).pin_memory()
    t = torch.randint(1, diff.num_steps, (batch,)).pin_memory()
    return lambda: step(x, flip, t, 1, 0)


def ms_per_step(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e3


def gpu_busy(prof, steps: int, wall_ms) -> str:
    """Kernels per step and their summed GPU time against the step's wall-clock time: a
    step that keeps the GPU busy for much less than its wall time waits on launches
    and gaps between small kernels, not on the kernels themselves."""
    try:
        kernels = [e for e in prof.events()
                   if str(getattr(e, "device_type", "")).endswith("CUDA")]
        busy_us = sum(e.time_range.elapsed_us() for e in kernels)
    except Exception as e:                 # the profiler's event API moves between releases
        return f"GPU busy time: not available ({type(e).__name__}: {e})"
    busy_ms = busy_us / steps / 1e3
    text = (f"GPU activities (kernels, copies) per step: {len(kernels) / steps:.0f}, their "
            f"summed time {busy_ms:.2f} ms per step")
    if wall_ms:
        text += f" against {wall_ms:.2f} ms of wall-clock time ({busy_ms / wall_ms:.0%})"
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="paper64")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rows", type=int, default=30, help="kernels listed by the profiler")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile of the model with the CUDA graph, and "
                        "profile that step (compiling paper64 takes minutes)")
    p.add_argument("--compiled-only", action="store_true",
                   help="with --compile: time the compiled configurations only (the "
                        "uncompiled ones are in the bench's steps rows)")
    p.add_argument("--out", help="also write the report here")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step.py: needs a CUDA device", file=sys.stderr)
        return 2
    # The flags train() sets (TF32, cuDNN autotuning).
    from blurfast.bench_steps import BACKEND_FLAGS
    b = torch.backends
    b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark = BACKEND_FLAGS["blurfast"]
    lines = [f"{torch.cuda.get_device_name()} | torch {torch.__version__} | {a.preset} "
             f"{a.resolution}x{a.resolution}, batch {a.batch}"]
    print(lines[0], flush=True)
    if a.compiled_only and not a.compile:
        p.error("--compiled-only: needs --compile")
    configs = {**({} if a.compiled_only else CONFIGS), **(COMPILED if a.compile else {})}
    profiled, best = None, float("inf")    # (what, step): the fastest compiled one
    failed = 0

    def write():               # after each configuration: a time limit keeps what ran
        if a.out:
            with atomic_path(a.out, suffix=".txt") as tmp:
                tmp.write_text("\n".join(lines) + "\n")

    for name, kw in configs.items():
        try:
            fn = make_step(a.preset, a.resolution, a.batch, **kw)
            ms = ms_per_step(fn, warmup=5, iters=a.iters)
        except Exception as e:             # one that fails (a compile) leaves the others
            failed += 1
            fn = None
            lines.append(f"{name:36s} failed: {type(e).__name__}: {e}"[:500])
        else:
            lines.append(f"{name:36s} {ms:8.2f} ms/step  {a.batch / ms * 1e3:8.1f} images/s")
            if kw.get("compile") and ms < best:
                profiled, best = (f"3 steps of {name}, the fastest compiled step", fn), ms
        print(lines[-1], flush=True)
        write()
        del fn
        torch.cuda.empty_cache()

    from torch.profiler import ProfilerActivity, profile
    if profiled is None:
        profiled = ("3 eager steps of bf16 (NCHW)",
                    make_step(a.preset, a.resolution, a.batch, precision="bf16",
                              channels_last=False))
    what, fn = profiled
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    lines += ["", gpu_busy(prof, steps=3, wall_ms=best if best < float("inf") else None)]
    ka = prof.key_averages()
    for key in ("self_device_time_total", "self_cuda_time_total"):
        try:
            table = ka.table(sort_by=key, row_limit=a.rows, max_name_column_width=70)
            break
        except (AttributeError, KeyError, ValueError):
            table = None
    lines += ["", f"torch.profiler, {what}, by GPU time:", table or "?"]
    print("\n".join(lines[-5:]), flush=True)
    write()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
