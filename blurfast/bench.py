"""Kernel throughput benchmark: blurfast against its peers, one JSON shape.

Used by ``benchmarks/run.py`` (and ``python -m blurfast.bench``), by the
pytest-benchmark suite in ``benchmarks/`` and by ``scripts/gpu_check.sh``.

Cases (float32 in and out, and bfloat16 in and out for blurfast on CUDA; maps are
(B, 1, H, W) float32 per-sample coefficients):

* ``dct2``, ``idct2``: orthonormal 2-D DCT-II / DCT-III over the last two dims.
* ``q_sample``: read x0, write x_t and eps (docs/process.md section 4):
  ``x_t = idct2(a * dct2(x0) + g * zb)``, ``eps = idct2(zb)``, zb ~ N(0, I).
* ``sampler_step``: read x_t and eps_theta, write x_{t-1} (docs/process.md section 6):
  ``idct2(c1 * dct2(x_t) + c2 * dct2(eps_theta) + sig * zb)``.

Implementations (the peers are our own code, written from the mathematics, in
``blurfast/bench_peers.py``; the timing is ``blurfast/bench_timing.py``):

* ``blurfast``: ``blurfast.dct2`` / ``idct2`` / ``spectral`` (whatever backend
  the installed package dispatches to).
* ``blurfast_dense``: the same with the fused kernel's dense passes instead of the
  fast ones (``BLURFAST_CUDA_KERNELS=dense``; CUDA only): the A/B of the two pass
  families, benchmarks/NOTES.md.
* ``blurfast_prefetch``, ``blurfast_noprefetch``: the fast kernel prefetching the next
  plane group in every call, or in none (``BLURFAST_CUDA_KERNELS=fast+prefetch`` or
  ``fast+noprefetch``; by default it does in calls with two buffers).
  ``blurfast_wide``: every call at 64 x 64 on the fast passes' wide geometry
  (``fast+wide``, 256 threads per plane; the default for float32 fused calls there).
  ``blurfast_separate``: the fused op at 256 x 256 as version 5 ran it, six strip passes
  and a combine kernel (``fast+separate``), against the default three passes;
  ``blurfast_fill``: the three passes in chunks of planes that fill the GPU rather than
  half its L2 (``fast+fill``).
  CUDA only, run only when named in ``impls``: the A/B of benchmarks/NOTES.md.
  ``blurfast_given_noise``: the fused cases with the frequency-space noise ``zb`` passed
  in (``spectral(noise=zb)``, one float32 tensor per shape made before timing) instead of
  made in the kernel: the row's difference from ``blurfast`` is what Philox and
  Box-Muller cost on the kernel's critical path, less the time of reading ``zb`` (from L2
  where it fits there). Not on CUDA only; run only when named.
* ``blurfast_simple``: the same with the fused whole-plane CUDA kernel turned off
  (``BLURFAST_CUDA_KERNELS=simple``): the simple multi-launch kernels (CUDA only).
* ``torch_fp32``: DCT as two matrix products with cached DCT matrices (the way
  ``blurfast.reference`` computes it), cuBLAS in IEEE fp32; q_sample and the
  sampler step composed from it with ``torch.randn`` noise.
* ``torch_tf32``: the same with TF32 matmuls allowed (CUDA only).
* ``torch_fft``: DCT by reordering + complex FFT + twiddle along each of the
  two dims (Makhoul's method, as the torch-dct package does it).
* ``cupy``: ``cupyx.scipy.fft.dctn`` / ``idctn`` with ``norm="ortho"`` (dct2 and
  idct2 only; CUDA only, where cupy imports).

Before a row is timed, one call's output is checked against a float64 truth
(``blurfast/bench_check.py``); a row that fails is not timed but listed in ``skipped``
with ``error`` and ``wrong_output`` set (``--strict`` exits 1 on it).

Traffic is the minimum number of bytes a call must move: every input tensor
read once and every output written once; the coefficient maps are *not*
counted (a kernel can compute them from per-sample scalars and one (H, W) map,
the floors in benchmarks/NOTES.md count the same way).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import functools
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from .bench_peers import (fft_dct2, fft_idct2, matmul_dct2, matmul_idct2, ref_q_sample,
                          ref_sampler_step, tf32_matmul)
from .bench_check import CHECK_TOL, WrongOutput, check_output
from .bench_timing import launched_kernels, measure_copy_gbps, num_input_sets, time_call
from .checks import check_device, check_gpu_seen, check_int

__all__ = [
    "CASES", "IMPLS", "VARIANT_IMPLS", "DTYPES", "CUDA_SHAPES", "CUDA_EXTRA_SHAPES", "CPU_SHAPES",
    "matmul_dct2", "matmul_idct2", "fft_dct2", "fft_idct2",
    "ref_q_sample", "ref_sampler_step", "tf32_matmul",
    "get_impl", "impl_function", "given_noise", "check_impl", "CHECK_TOL", "WrongOutput", "make_inputs",
    "traffic_bytes", "targets", "TARGETS",
    "measure_copy_gbps", "time_call", "num_input_sets", "run", "run_header", "dumps", "format_table",
    "main",
]

CASES = ("dct2", "idct2", "q_sample", "sampler_step")
IMPLS = ("blurfast", "blurfast_dense", "blurfast_simple", "torch_fp32", "torch_tf32",
         "torch_fft", "cupy")
VARIANT_IMPLS = ("blurfast_prefetch", "blurfast_noprefetch", "blurfast_wide",
                 "blurfast_separate", "blurfast_fill", "blurfast_given_noise")
# Timed and untimed calls per row: {device type: (full run, --quick)}.
ITERS = {"cuda": (200, 30), "cpu": (20, 10)}
WARMUP = {"cuda": (20, 5), "cpu": (3, 3)}
DTYPES = ("float32", "bfloat16")      # bfloat16 rows: blurfast impls on CUDA only
CUDA_SHAPES = ((256, 3, 64, 64), (64, 3, 256, 256), (16, 3, 64, 64))
CUDA_EXTRA_SHAPES = ((256, 3, 32, 32), (64, 3, 128, 128))   # full (not --quick) runs
CPU_SHAPES = ((8, 3, 64, 64), (2, 3, 256, 256))

_SEED = 1234          # noise seed for the blurfast fused op in timed calls


# ----------------------------------------------------------------------------
# Implementations table
# ----------------------------------------------------------------------------

def _cupy():
    try:
        import cupy  # noqa: F401
        import cupyx.scipy.fft  # noqa: F401
        return cupy
    except Exception:  # ImportError, or a cupy that cannot find its CUDA libraries
        return None


@dataclass
class Impl:
    name: str
    functions: Callable[[], dict]                 # case -> callable (lazy imports)
    cuda_only: bool = False
    needs_cupy: bool = False
    dtypes: tuple = ("float32",)                  # I/O types it is timed with
    context: Callable[[torch.device], contextlib.AbstractContextManager] = \
        field(default=lambda device: contextlib.nullcontext())
    convert: Callable[[tuple], tuple] = field(default=lambda args: args)
    # Bound of the one-time output check (blurfast/bench_check.py) where the arithmetic
    # is coarser than the I/O type says (TF32 matmuls); None: CHECK_TOL of the I/O type.
    check_tol: Optional[float] = None

    def available(self, device) -> tuple[bool, str]:
        device = torch.device(device)
        if self.cuda_only and device.type != "cuda":
            return False, "CUDA only"
        if self.needs_cupy and _cupy() is None:
            return False, "cupy not importable"
        return True, ""


def _blurfast_functions():
    import blurfast as bf
    return {
        "dct2": bf.dct2,
        "idct2": bf.idct2,
        "q_sample": lambda x0, a, g: bf.spectral(x0, a, g=g, seed=_SEED, return_noise=True),
        "sampler_step": lambda x_t, eps, c1, c2, sig: bf.spectral(x_t, c1, eps, c2, g=sig,
                                                                  seed=_SEED),
    }


def given_noise(shape, device) -> torch.Tensor:
    """The noise ``zb`` that ``blurfast_given_noise`` passes in for inputs of ``shape`` on
    ``device``: float32 standard normals from a generator seeded with the bench's seed."""
    gen = torch.Generator(device=device).manual_seed(_SEED)
    return torch.randn(tuple(shape), generator=gen, device=device, dtype=torch.float32)


def _given_noise_functions():
    """The fused cases of ``blurfast_given_noise``: :func:`given_noise`, made once per
    shape and device at the first (untimed) call."""
    import blurfast as bf
    made = {}

    def zb(x):
        key = (tuple(x.shape), x.device)
        if key not in made:
            made[key] = given_noise(x.shape, x.device)
        return made[key]

    return {
        "q_sample": lambda x0, a, g: bf.spectral(x0, a, g=g, noise=zb(x0), return_noise=True),
        "sampler_step": lambda x_t, eps, c1, c2, sig: bf.spectral(x_t, c1, eps, c2, g=sig,
                                                                  noise=zb(x_t)),
    }


def _torch_functions(dct2, idct2):
    return {
        "dct2": dct2,
        "idct2": idct2,
        "q_sample": functools.partial(ref_q_sample, dct2=dct2, idct2=idct2),
        "sampler_step": functools.partial(ref_sampler_step, dct2=dct2, idct2=idct2),
    }


def _cupy_functions():
    import cupyx.scipy.fft as cfft
    return {
        "dct2": lambda x: cfft.dctn(x, type=2, axes=(-2, -1), norm="ortho"),
        "idct2": lambda X: cfft.idctn(X, type=2, axes=(-2, -1), norm="ortho"),
    }


def _cupy_context(device):
    """Run cupy on torch's current stream, so CUDA events bracket its work."""
    cupy = _cupy()
    stream = cupy.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)
    return _nested(cupy.cuda.Device(torch.device(device).index or 0), stream)


@contextlib.contextmanager
def _nested(*cms):
    with contextlib.ExitStack() as st:
        for cm in cms:
            st.enter_context(cm)
        yield


def _cupy_convert(args):
    """Zero-copy views of torch tensors as cupy arrays (done outside the timed calls)."""
    import torch.utils.dlpack
    cupy = _cupy()
    torch.cuda.synchronize()
    out = []
    for a in args:
        try:
            out.append(cupy.from_dlpack(a))
        except Exception:   # stream handshake refused: fall back to a legacy capsule
            out.append(cupy.from_dlpack(torch.utils.dlpack.to_dlpack(a)))
    return tuple(out)


def _kernels_env(value):
    """Context factory: BLURFAST_CUDA_KERNELS=value (read by the C++ on every call)."""
    @contextlib.contextmanager
    def ctx(device):
        old = os.environ.get("BLURFAST_CUDA_KERNELS")
        os.environ["BLURFAST_CUDA_KERNELS"] = value
        try:
            yield
        finally:
            if old is None:
                del os.environ["BLURFAST_CUDA_KERNELS"]
            else:
                os.environ["BLURFAST_CUDA_KERNELS"] = old
    return ctx


def _tf32_context(enabled):
    def ctx(device):
        if torch.device(device).type == "cuda":
            return tf32_matmul(enabled)
        return contextlib.nullcontext()
    return ctx


_IMPLS = {
    "blurfast": Impl("blurfast", _blurfast_functions, dtypes=DTYPES),
    "blurfast_dense": Impl("blurfast_dense", _blurfast_functions, cuda_only=True,
                           dtypes=DTYPES, context=_kernels_env("dense")),
    **{f"blurfast_{v}": Impl(f"blurfast_{v}", _blurfast_functions, cuda_only=True,
                             dtypes=DTYPES, context=_kernels_env("fast+" + v))
       for v in ("prefetch", "noprefetch", "wide", "separate", "fill")},
    "blurfast_given_noise": Impl("blurfast_given_noise", _given_noise_functions,
                                 dtypes=DTYPES),
    "blurfast_simple": Impl("blurfast_simple", _blurfast_functions, cuda_only=True,
                            dtypes=DTYPES, context=_kernels_env("simple")),
    "torch_fp32": Impl("torch_fp32", lambda: _torch_functions(matmul_dct2, matmul_idct2),
                       context=_tf32_context(False)),
    "torch_tf32": Impl("torch_tf32", lambda: _torch_functions(matmul_dct2, matmul_idct2),
                       cuda_only=True, context=_tf32_context(True),
                       check_tol=CHECK_TOL["tf32"]),
    "torch_fft": Impl("torch_fft", lambda: _torch_functions(fft_dct2, fft_idct2)),
    "cupy": Impl("cupy", _cupy_functions, cuda_only=True, needs_cupy=True,
                 context=_cupy_context, convert=_cupy_convert),
}


def get_impl(name: str) -> Impl:
    if name not in _IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS + VARIANT_IMPLS}, got {name!r}")
    return _IMPLS[name]


def check_impl(impl_name: str, case: str, fn, args: tuple, device=None) -> None:
    """The one-time output check of a row (blurfast/bench_check.py): call ``fn`` (the
    impl's function for ``case``) on the torch inputs ``args`` converted for the impl,
    inside the impl's context where ``device`` is given, and compare with the float64
    truth; raise :class:`WrongOutput`, naming the row and the error, when they disagree."""
    impl = get_impl(impl_name)
    dtype = str(args[0].dtype).replace("torch.", "")
    tol = impl.check_tol if impl.check_tol is not None else CHECK_TOL[dtype]
    ctx = impl.context(torch.device(device)) if device is not None else contextlib.nullcontext()
    with ctx:
        why = check_output(case, fn, args, tol, convert=impl.convert)
    if why:
        shape = "x".join(map(str, args[0].shape))
        raise WrongOutput(f"{case} {shape} {dtype} {impl_name}: wrong output, not timed: "
                          f"{why}")


def impl_function(impl: str, case: str):
    """The callable for (impl, case), or None where that impl has no such case."""
    if case not in CASES:
        raise ValueError(f"case: expected one of {CASES}, got {case!r}")
    return get_impl(impl).functions().get(case)


# ----------------------------------------------------------------------------
# Inputs and traffic
# ----------------------------------------------------------------------------

def make_inputs(case: str, shape, device, seed: int = 0, dtype=torch.float32) -> tuple:
    """Positional arguments of ``case`` for one call (values are plausible, not special)."""
    b, c, h, w = shape
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def randn(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)

    def coef(lo, hi):       # (B, 1, H, W) float32 map with values in [lo, hi]
        u = torch.rand(b, 1, h, w, generator=gen, dtype=torch.float32)
        return (lo + (hi - lo) * u).to(device=device)

    if case in ("dct2", "idct2"):
        return (randn(b, c, h, w),)
    if case == "q_sample":
        a = coef(0.05, 0.99)
        return (randn(b, c, h, w), a, torch.sqrt(1 - a * a))
    if case == "sampler_step":
        return (randn(b, c, h, w), randn(b, c, h, w), coef(0.9, 1.1), coef(-0.1, 0.0),
                coef(0.0, 0.2))
    raise ValueError(f"case: expected one of {CASES}, got {case!r}")


def traffic_bytes(case: str, shape, itemsize: int = 4) -> int:
    """Minimum bytes moved: image-sized inputs read once, outputs written once."""
    n = math.prod(shape) * itemsize
    return {"dct2": 2 * n, "idct2": 2 * n, "q_sample": 3 * n, "sampler_step": 3 * n}[case]


def _set_bytes(args) -> int:
    return sum(a.numel() * a.element_size() for a in args)


# ----------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------

def _driver_version() -> Optional[str]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].strip()
    except Exception:
        pass
    return None


def _device_name(device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {_cpu_model()} ({os.cpu_count()} logical cores)"


def _cpu_model() -> str:
    """The processor's name ("model name" of /proc/cpuinfo on Linux), else the machine type."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _blurfast_version() -> Optional[str]:
    try:
        import blurfast
        return getattr(blurfast, "__version__", None)
    except Exception as e:  # pragma: no cover - reported, not raised
        return f"import failed: {e}"


def _parse_shape(s, name: str = "shape") -> tuple:
    given = s
    try:
        if isinstance(s, str):
            s = [int(p) for p in s.lower().replace("x", ",").split(",") if p.strip()]
        s = tuple(int(v) for v in s)
    except (TypeError, ValueError):
        s = ()
    if len(s) != 4 or min(s) < 1:
        raise ValueError(f"{name}: expected four positive sizes B,C,H,W, got {given!r}")
    return s


def _ticked(items, bar, label):
    """``items``, showing ``label(item)`` on the progress bar while each is worked on
    and counting it done after."""
    for item in items:
        bar.set_postfix_str(label(item))
        yield item
        bar.update(1)


def _time_impls(case, shape, dtype_name, impls, device, iters, warmup, copy_gbps,
                skipped, bar) -> list:
    """Rows for one (case, shape, dtype) across ``impls``; rows that cannot run are
    appended to ``skipped``. ``bar`` (tqdm) counts each impl."""
    is_cuda = device.type == "cuda"
    dtype = getattr(torch, dtype_name)
    nbytes = traffic_bytes(case, shape, itemsize=dtype.itemsize)
    base = make_inputs(case, shape, device, dtype=dtype)
    nsets = num_input_sets(_set_bytes(base), device) if is_cuda else 1
    arg_sets = [base] + [tuple(a.clone() for a in base) for _ in range(nsets - 1)]
    rows = []

    def skip(impl_name, reason, error):
        skipped.append({"case": case, "shape": list(shape), "impl": impl_name,
                        "dtype": dtype_name, "reason": reason[:500], "error": error})

    size = "x".join(map(str, shape))
    for impl_name in _ticked(impls, bar, lambda i: f"{case} {size} {i} {dtype_name}"):
        impl = get_impl(impl_name)
        ok, why = impl.available(device)
        if ok and dtype_name not in impl.dtypes:
            continue                     # e.g. bfloat16 for a float32-only peer
        if not ok:
            skip(impl_name, why, False)
            continue
        try:
            fn = impl.functions().get(case)
        except Exception as e:           # an impl that fails to import is an error
            skip(impl_name, f"{type(e).__name__}: {e}", True)
            continue
        if fn is None:
            skip(impl_name, f"no {case} in {impl_name}", False)
            continue
        try:
            with impl.context(device):
                check_impl(impl_name, case, fn, base)     # once per row, before timing
                sets = [impl.convert(a) for a in arg_sets]
                t = time_call(fn, sets, device, iters=iters, warmup=warmup)
                kernels = launched_kernels(fn, sets[0], device)
            del sets
        except WrongOutput as e:          # recorded as an error; --strict fails on it
            skip(impl_name, f"WrongOutput: {e}", True)
            skipped[-1]["wrong_output"] = True
            continue
        except Exception as e:
            skip(impl_name, f"{type(e).__name__}: {e}", True)
            continue
        gbps = nbytes / (t["median_us"] * 1e-6) / 1e9
        rows.append({
            "case": case, "shape": list(shape), "impl": impl_name, "dtype": dtype_name,
            "median_us": round(t["median_us"], 2),
            "gbps": round(gbps, 2),
            "copy_fraction": round(gbps / copy_gbps, 4),
            "speedup_vs_torch_fp32": None,
            "wall_us": round(t["wall_us"], 2),
            "bytes": nbytes,
            "launches": None if kernels is None else len(kernels),
            "kernels": kernels,
        })
    del arg_sets, base
    if is_cuda:
        torch.cuda.empty_cache()
    return rows


def _resolve_device(device) -> torch.device:
    """``device`` as a torch.device with an index on CUDA (default: cuda when available)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = check_device("device", device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def run_header(device=None, quick: bool = False, iters: Optional[int] = None) -> dict:
    """The results dict without rows: card, driver, torch, date, copy bandwidth."""
    device = _resolve_device(device)
    is_cuda = device.type == "cuda"
    copy_gbps = measure_copy_gbps(device)
    result = {
        "gpu": _device_name(device),
        "driver": _driver_version() if is_cuda else None,
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "copy_gbps": round(copy_gbps, 1),
        "rows": [],
        "device": device.type,
        "cuda_runtime": torch.version.cuda,
        "blurfast": _blurfast_version(),
        "quick": bool(quick),
        "iters": iters,
        "cpu_threads": torch.get_num_threads(),
        "timing": ("median_us: CUDA-event device time per call, host launch overhead hidden; "
                   "wall_us: host wall-clock per call in a back-to-back loop"
                   if is_cuda else "median_us: median wall-clock per call; wall_us: mean"),
        "traffic": "image-sized inputs read once + outputs written once; maps not counted",
        "launches": "CUDA kernels per call, counted by the torch profiler; kernels: their "
                    "names (for blurfast's, the geometry that served the call)",
        "skipped": [],
    }
    return result


def run(device=None, quick: bool = False, *, cases=None, impls=None, shapes=None,
        dtypes=None, iters: Optional[int] = None, warmup: Optional[int] = None,
        json_path=None, print_table: bool = True, file=None,
        progress: bool = False, row_log=None) -> dict:
    """Time every (case, shape, impl); return (and optionally write) the results dict.

    ``device``: "cuda" (default when available) or "cpu". ``quick``: fewer
    iterations and, on CUDA, only the three shapes of issue 6 (a full run adds
    32x32 and 128x128). ``cases``/``impls``/``shapes``/``dtypes`` restrict the run
    (default dtypes: float32, plus bfloat16 on CUDA for the impls that take it).
    Rows that cannot run (impl unavailable, an exception, or an output that fails the
    one-time check against the float64 truth, blurfast/bench_check.py) go to ``skipped``.
    ``json_path``: written (atomically) after every case and shape with the rows so far
    and ``"partial": true``, and at the end without it, so a run cut short by a time
    limit still leaves its finished rows. ``progress``: a progress bar (stderr) over the
    (case, shape, dtype, impl) rows. ``row_log``: a text stream that gets each finished
    row (timed or skipped) as one line, flushed, after every case and shape (a log that
    a time limit cuts keeps them; the table is printed only at the end).
    """
    from tqdm.auto import tqdm
    device = _resolve_device(device)
    is_cuda = device.type == "cuda"

    # one name alone as a list of it (tuple("dct2") would be its letters)
    cases, impls, shapes, dtypes = ((v,) if isinstance(v, str) else v
                                    for v in (cases, impls, shapes, dtypes))
    cases = tuple(cases) if cases else CASES
    impls = tuple(impls) if impls else IMPLS
    for c in cases:
        if c not in CASES:
            raise ValueError(f"cases: unknown case {c!r}; expected some of {CASES}")
    for i in impls:
        if i not in _IMPLS:
            raise ValueError(f"impls: unknown impl {i!r}; expected some of "
                             f"{IMPLS + VARIANT_IMPLS}")
    # as Python ints (numpy's taken too): iters goes into the JSON
    iters = check_int("iters", iters, none_ok=True)
    warmup = check_int("warmup", warmup, lo=0, none_ok=True)
    if dtypes is None:
        dtypes = DTYPES if is_cuda else ("float32",)
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"dtypes: unknown dtype {d!r}; expected some of {DTYPES}")
    if shapes:
        shapes = tuple(_parse_shape(s, "shapes") for s in shapes)
    elif is_cuda:
        shapes = CUDA_SHAPES if quick else CUDA_SHAPES + CUDA_EXTRA_SHAPES
    else:
        shapes = CPU_SHAPES
    kind = "cuda" if is_cuda else "cpu"
    if iters is None:
        iters = ITERS[kind][quick]
    if warmup is None:
        warmup = WARMUP[kind][quick]

    torch.manual_seed(0)
    result = run_header(device, quick=quick, iters=iters)
    copy_gbps = result["copy_gbps"]
    bar = tqdm(total=len(cases) * len(shapes) * len(dtypes) * len(impls), desc="bench",
               unit="row", disable=not progress, leave=False)
    for case in cases:
        for shape in shapes:
            case_rows, n_skipped = [], len(result["skipped"])
            for dtype_name in dtypes:
                case_rows += _time_impls(case, shape, dtype_name, impls, device, iters, warmup,
                                         copy_gbps, result["skipped"], bar)
            ref = next((r for r in case_rows
                        if r["impl"] == "torch_fp32" and r["dtype"] == "float32"), None)
            if ref is not None:
                for r in case_rows:
                    r["speedup_vs_torch_fp32"] = round(ref["median_us"] / r["median_us"], 3)
            result["rows"].extend(case_rows)
            if json_path:
                _write_json(json_path, dict(result, partial=True, targets=targets(result)))
            if row_log is not None:
                for r in case_rows:
                    print(row_line(r), file=row_log)
                for r in result["skipped"][n_skipped:]:
                    print(f"skipped {r['case']} {'x'.join(map(str, r['shape']))} {r['impl']} "
                          f"{r['dtype']}: {r['reason']}", file=row_log)
                row_log.flush()
    bar.close()
    result["targets"] = targets(result)

    if json_path:
        _write_json(json_path, result)
    if print_table:
        print(format_table(result), file=file or sys.stdout)
    return result


def _write_json(path, result: dict) -> None:
    from .fileio import atomic_path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path, suffix=".json") as tmp:
        tmp.write_text(dumps(result))


# Issue 6's goals for blurfast's float32 rows: (case, shape) -> (share of copy, speedup
# over torch_fp32); and for every op at the paper's batch, one launch within 12 µs.
TARGETS = {
    ("dct2", (256, 3, 64, 64)): (0.75, 5.0),
    ("dct2", (64, 3, 256, 256)): (0.60, 5.0),
    ("q_sample", (256, 3, 64, 64)): (0.70, 10.0),
    ("q_sample", (64, 3, 256, 256)): (0.55, 10.0),
    ("sampler_step", (256, 3, 64, 64)): (0.60, 10.0),
    ("sampler_step", (64, 3, 256, 256)): (0.60, 10.0),
}
SMALL_BATCH = ((16, 3, 64, 64), 12.0)     # shape, most µs per call (and one launch)
TRAIN_STEP_SPEEDUP = 5.0                  # issue 4: whole training step, batch 16, paper64


def targets(result: dict) -> list:
    """Issue 6's goals against the measured ``blurfast`` float32 rows of ``result``, and
    issue 4's against its ``model_steps``: ``{case, shape, goal, got, met}`` per row that
    has a goal (none on CPU). Where a merged result has the same row twice (several
    bench runs), the first one counts."""
    if result.get("device") != "cuda":
        return []
    out, seen = [], set()
    for r in result["rows"]:
        if r["impl"] != "blurfast" or r.get("dtype", "float32") != "float32":
            continue
        shape = tuple(r["shape"])
        if (r["case"], shape) in seen:
            continue
        seen.add((r["case"], shape))
        if (r["case"], shape) in TARGETS:
            frac, speed = TARGETS[(r["case"], shape)]
            got_speed = r["speedup_vs_torch_fp32"]
            out.append({
                "case": r["case"], "shape": list(shape),
                "goal": f">= {frac:.0%} of copy and >= {speed:g}x torch_fp32",
                "got": f"{r['copy_fraction']:.0%} of copy, "
                       + (f"{got_speed:.2f}x" if got_speed is not None else "no torch_fp32 row"),
                "met": bool(r["copy_fraction"] >= frac and got_speed is not None
                            and got_speed >= speed),
            })
        elif shape == SMALL_BATCH[0]:
            launches = r.get("launches")
            out.append({
                "case": r["case"], "shape": list(shape),
                "goal": f"one launch, <= {SMALL_BATCH[1]:g} µs",
                "got": f"{launches if launches is not None else '?'} launch(es), "
                       f"{r['median_us']:.1f} µs",
                "met": bool(launches == 1 and r["median_us"] <= SMALL_BATCH[1]),
            })
    for r in result.get("model_steps", []):
        if (r["case"] == "train_step" and r["impl"].startswith("blurfast")
                and r["shape"][0] == 16 and r.get("preset") == "paper64"):
            # Against torch's default flags (TF32 convolutions) where the row has it; rows
            # of runs before that baseline existed have only the IEEE one.
            base = "torch_default" if "speedup_vs_torch_default" in r else "torch_fp32"
            speed = r[f"speedup_vs_{base}"]
            out.append({
                "case": "train_step", "shape": list(r["shape"]), "impl": r["impl"],
                "goal": f">= {TRAIN_STEP_SPEEDUP:g}x the paper-style fp32 step, {base} "
                        f"(issue 4)",
                "got": f"{speed:.2f}x, {r['images_per_s']} images/s"
                       if speed is not None else "no baseline row",
                "met": bool(speed is not None and speed >= TRAIN_STEP_SPEEDUP),
            })
    return out


def dumps(result: dict) -> str:
    """JSON text of a results dict, one row per line (diff-friendly)."""
    lists = ("rows", "model_steps", "targets", "skipped")
    head = {k: v for k, v in result.items() if k not in lists}
    parts = [json.dumps(head, indent=1)[:-2]]
    for key in lists:
        if key not in result:
            continue
        items = result[key]
        body = ",\n".join("  " + json.dumps(r) for r in items)
        parts.append(f',\n "{key}": [\n{body}\n ]' if items else f',\n "{key}": []')
    return "".join(parts) + "\n}\n"


# The keys a results file, its kernel rows and its model-step rows have (issue 6's JSON
# shape, and issue 4's step rows).
RESULT_KEYS = ("gpu", "driver", "torch", "date", "copy_gbps", "device", "rows")
ROW_KEYS = ("case", "shape", "impl", "median_us", "gbps", "copy_fraction",
            "speedup_vs_torch_fp32")
STEP_KEYS = ("case", "preset", "shape", "impl", "ms_per_step", "images_per_s",
             "speedup_vs_torch_fp32")


def read_result(path, arg: str, steps: bool = False) -> dict:
    """The results dict in the JSON file ``path`` (``blurfast bench --json``, a merged GPU
    run); ValueError naming ``arg`` and what is wrong where the file is not readable JSON
    or not of this shape: a header or a row without its keys (``steps``: the file must
    have ``model_steps``)."""
    try:
        with open(path) as f:
            e = json.load(f)
    except (OSError, ValueError) as err:
        raise ValueError(f"{arg}: not readable as JSON ({err})") from None
    if not isinstance(e, dict):
        raise ValueError(f"{arg}: expected a JSON object, got {type(e).__name__}")
    need = RESULT_KEYS + (("model_steps",) if steps else ())
    missing = [k for k in need if k not in e]
    if missing:
        raise ValueError(f"{arg}: no {', '.join(missing)}; expected the keys {need}")
    if not isinstance(e["date"], str):
        raise ValueError(f"{arg}: date: expected an ISO date string, got {e['date']!r}")
    for key, keys in (("rows", ROW_KEYS), ("model_steps", STEP_KEYS), ("skipped", ())):
        items = e.get(key, [])
        if not isinstance(items, list):
            raise ValueError(f"{arg}: {key}: expected a list, got {type(items).__name__}")
        for i, r in enumerate(items):
            lacks = [k for k in keys if k not in r] if isinstance(r, dict) else list(keys)
            if not isinstance(r, dict) or lacks:
                raise ValueError(f"{arg}: {key}[{i}] is not a row with the keys {keys}"
                                 + (f" (no {', '.join(lacks)})" if lacks else ""))
    return e


def row_line(r: dict, iw: int = 16) -> str:
    """One kernel row as a line of :func:`format_table` (``iw``: the impl column's width)."""
    sp = r["speedup_vs_torch_fp32"]
    nl = r.get("launches")
    return (f"{r['case']:<13}{'x'.join(map(str, r['shape'])):<16}{r['impl']:<{iw}}"
            f"{r.get('dtype', 'float32'):<9}"
            f"{r['median_us']:>10.1f}{r['wall_us']:>10.1f}{r['gbps']:>9.1f}"
            f"{100 * r['copy_fraction']:>7.1f}%"
            f"{(f'{sp:.2f}x' if sp is not None else '-'):>9}"
            f"{(str(nl) if nl is not None else '-'):>7}")


def format_table(result: dict) -> str:
    lines = [f"{result['gpu']} | torch {result['torch']} | driver {result['driver']} | "
             f"{result['date']}",
             f"device copy: {result['copy_gbps']:.1f} GB/s (read + write)"]
    iw = max([16] + [len(r["impl"]) + 2 for r in result["rows"]])    # the impl column
    hdr = f"{'case':<13}{'shape':<16}{'impl':<{iw}}{'dtype':<9}{'median_us':>10}" \
          f"{'wall_us':>10}{'GB/s':>9}{'copy%':>8}{'vs fp32':>9}{'launch':>7}"
    lines += [hdr, "-" * len(hdr)]
    lines += [row_line(r, iw) for r in result["rows"]]
    seen = {}
    for s in result["skipped"]:
        seen.setdefault((s["impl"], s["reason"]), []).append(
            f"{s['case']} {'x'.join(map(str, s['shape']))}")
    for (impl, reason), where in seen.items():
        lines.append(f"skipped {impl} ({len(where)} rows, e.g. {where[0]}): {reason}")
    goals = targets(result)
    if goals:
        lines.append("goals (issue 6: blurfast float32 kernels; issue 4: training step):")
        for t in goals:
            lines.append(f"  {'MET ' if t['met'] else 'MISS'} {t['case']:<13}"
                         f"{'x'.join(map(str, t['shape'])):<16}{t['goal']}: {t['got']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    from .bench_steps import STEP_IMPLS, check_step_impls, format_steps, run_steps, step_line
    from .bench_chart import figure_class, plot
    from .cli import _Parser, nonnegative_int, positive_int
    from .console import bars_on
    from .fileio import check_writable
    p = _Parser(prog="blurfast bench", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--quick", action="store_true", help="fewer iterations and shapes")
    p.add_argument("--json", dest="json_path", default=None, help="write the results here")
    p.add_argument("--plot", default=None,
                   help="write a bar chart (PNG) of the kernel rows' times here (not "
                        "--json's path; nothing, with a warning, when every row is skipped)")
    p.add_argument("--kernels", action=argparse.BooleanOptionalAction, default=True,
                   help="time the kernel cases (default on; --no-kernels with --steps times "
                        "only the model steps)")
    p.add_argument("--steps", action=argparse.BooleanOptionalAction, default=True,
                   help="also time a whole training step and sampler step (model included) "
                        "against the paper-style baseline (default on)")
    p.add_argument("--step-batches", nargs="+", type=positive_int, default=None, metavar="B",
                   help="batch sizes of the model steps (default: 16 and 64 on a GPU, 16 "
                        "with --quick; 8 on a CPU)")
    p.add_argument("--step-impls", nargs="+", default=None, metavar="IMPL",
                   choices=STEP_IMPLS,
                   help="model-step configurations besides the two baselines, which are "
                        "always timed (default: blurfast; blurfast_compile adds torch.compile, "
                        "which takes minutes to compile, blurfast_compile_cl the same in "
                        "channels_last; a _cast_once variant casts the bf16 weights once "
                        "per step, on a GPU; blurfast_ckpt adds activation checkpointing; "
                        "blurfast_fp16 is the step in float16 with its loss scale, on a GPU)")
    p.add_argument("--cases", nargs="+", choices=CASES, default=None, metavar="CASE",
                   help=f"default: all of {', '.join(CASES)}")
    p.add_argument("--impls", nargs="+", choices=IMPLS + VARIANT_IMPLS, default=None,
                   metavar="IMPL", help=f"default: {', '.join(IMPLS)}; variants on trial: "
                                        f"{', '.join(VARIANT_IMPLS)}")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=None,
                   help="I/O types (default: float32, plus bfloat16 on CUDA)")
    p.add_argument("--shapes", nargs="+", default=None, metavar="BxCxHxW",
                   help="e.g. 16x3x64x64 (overrides the default shapes)")
    p.add_argument("--iters", type=positive_int, default=None,
                   help="timed calls per row, median reported (default: CUDA "
                        "{0[cuda][0]}, {0[cuda][1]} with --quick; CPU {0[cpu][0]}, "
                        "{0[cpu][1]} with --quick)".format(ITERS))
    p.add_argument("--warmup", type=nonnegative_int, default=None,
                   help="untimed calls first (default: CUDA {0[cuda][0]}, {0[cuda][1]} with "
                        "--quick; CPU {0[cpu][0]})".format(WARMUP))
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when blurfast or a torch peer raised, or any impl's output "
                        "failed the check before timing (other cupy errors are only "
                        "reported: they depend on the machine's cupy install)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's); 1 gives steadier CPU numbers "
                        "on a shared machine")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (shown on stderr when it is a terminal; "
                        "elsewhere a line per finished row instead)")
    a = p.parse_args(argv)
    if not (a.kernels or a.steps):
        p.error("nothing to time: --no-kernels needs --steps")
    if a.plot and not a.kernels:
        p.error("--plot: charts the kernel rows, and --no-kernels times none")
    if a.plot and a.json_path and Path(a.plot).resolve() == Path(a.json_path).resolve():
        p.error(f"--json, --plot: both name {a.plot!r}, and one would overwrite the other; "
                f"give each its own file")
    # Where the results go is checked before anything is timed (a GPU run takes minutes).
    for shape in a.shapes or ():     # named as the flag; run() names its argument
        _parse_shape(shape, "--shapes")
    try:
        for flag, path in (("--json", a.json_path), ("--plot", a.plot)):
            if path:
                check_writable(flag, path)
        if a.plot:
            figure_class("--plot")
        if a.steps:
            cuda = (a.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
            check_step_impls("--step-impls", a.step_impls or (), cuda)
    except (ValueError, ImportError) as e:
        p.error(str(e))
    if a.device == "cuda":           # named as the flag; run() names its argument
        check_gpu_seen("--device")
    if a.threads:
        torch.set_num_threads(a.threads)
    progress = bars_on(a.no_progress)
    # No bar (stderr is a file or pipe, as in gpu_check.sh's logs): a line per finished
    # row instead, so a run killed by a time limit leaves more than an empty log.
    row_log = sys.stderr if not (a.no_progress or progress) else None
    if a.kernels:
        res = run(a.device, a.quick, cases=a.cases, impls=a.impls, shapes=a.shapes,
                  dtypes=a.dtypes, iters=a.iters, warmup=a.warmup, json_path=a.json_path,
                  progress=progress, row_log=row_log)
    else:
        res = run_header(a.device, quick=a.quick)
    if a.steps:
        errors, logged = [], set()

        def save_partial(rows):      # a run cut short by a time limit keeps these rows
            if a.json_path:          # and the errors of the configurations that failed
                _write_json(a.json_path, dict(res, model_steps=rows, partial=True,
                                              skipped=res.get("skipped", []) + errors))
            for r in rows if row_log is not None else ():
                key = (r["case"], r["impl"], tuple(r["shape"]))
                if key not in logged:
                    logged.add(key)
                    print(step_line(r), file=row_log, flush=True)
        save_partial([])             # the kernel rows: partial until the steps are done
        res["model_steps"] = run_steps(a.device, a.quick, batches=a.step_batches,
                                       impls=a.step_impls or ("blurfast",), errors=errors,
                                       on_progress=save_partial, progress=progress)
        res["skipped"] = res.get("skipped", []) + errors
        print(format_steps(res["model_steps"]))
    res["targets"] = targets(res)
    if a.json_path:
        _write_json(a.json_path, res)
    if a.plot and not res["rows"]:
        import warnings
        warnings.warn(f"--plot: nothing written to {a.plot}: every kernel row was skipped "
                      f"(see 'skipped' above), so the chart would be empty", stacklevel=1)
    elif a.plot:
        plot(res, a.plot)
        print(f"plot: {a.plot}")
    errors = [s for s in res["skipped"] if s.get("error")]
    wrong = [s for s in errors if s.get("wrong_output")]
    if errors:
        print(f"{len(errors)} row(s) raised an exception (see 'skipped')"
              + (f", {len(wrong)} of them a wrong output" if wrong else ""), file=sys.stderr)
    for s in wrong:
        print(s["reason"], file=sys.stderr)
    # A wrong output fails --strict whatever the impl (cupy's too: its speed would mean
    # nothing); other cupy errors depend on the machine's cupy install.
    return 1 if (a.strict and [s for s in errors
                               if s["impl"] != "cupy" or s.get("wrong_output")]) else 0


if __name__ == "__main__":       # as `blurfast bench`: bad input in one line, exit 2
    from .cli import main as cli_main
    sys.exit(cli_main(["bench", *sys.argv[1:]]))
