"""Whole-step benchmarks: one training step and one sampler step (model + process) of
blurfast against the paper-style PyTorch baseline, on the same device in the same run.

Baseline: fp32 eager, the process through the pure-PyTorch reference DCT
(``blurfast.reference``), torch.randn noise, torch's default Adam and a per-parameter
EMA loop, as the paper's code does; timed twice, with torch's default backend flags
(``torch_default``: TF32 convolutions, as a script that sets no flag runs; issue 4's
goal is judged against it) and in IEEE float32 throughout (``torch_fp32``). blurfast:
:class:`blurfast.training.TrainStep` (bf16 autocast and one CUDA graph per step on a
GPU, TF32 and cuDNN autotuning as :func:`blurfast.training.train` sets them; fp32 eager
on a CPU) and a sampler step through the fused op (its model call replayed from a CUDA graph
on a GPU with its convolution and linear weights cast to bf16 once, as ``blurfast sample
--cuda-graph`` runs it since session 15; eager in the v3 and v4 results). Times
are host wall-clock per step of back-to-back steps (launch overhead included: at small
batches that is what a run pays).
"""
from __future__ import annotations

import contextlib
import copy
import gc
import sys
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import reference as R
from .bench_timing import time_call
from .checks import check_bool, check_device, check_int
from .diffusion import BlurDiffusion, scales
from .models import PRESETS, UNet, check_resolution
from .training import BACKEND_FLAGS as TRAIN_FLAGS

__all__ = ["reference_train_step", "run_steps", "format_steps", "EMA", "STEP_IMPLS",
           "BASELINES", "BACKEND_FLAGS", "backend_flags", "check_step_impls"]

EMA = 0.9999


def reference_train_step(model, diff: BlurDiffusion, batch: int, device):
    """The paper-style step as a function of a float batch x0 (B, C, H, W)."""
    opt = torch.optim.Adam(model.parameters(), lr=5e-5)
    ema = [p.detach().clone() for p in model.parameters()]

    def step(x0):
        t = torch.randint(1, diff.num_steps, (batch,))
        a, g = (m.float() for m in scales(diff.log_abar(t, device=device)[:, None]))
        eps = torch.randn_like(x0)
        x_t = R.idct2(a * R.dct2(x0) + g * R.dct2(eps))
        loss = F.mse_loss(model(x_t, t.to(device)), eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, model.parameters()):
                e.mul_(EMA).add_(p, alpha=1 - EMA)
    return step


def _sampler_coefs(diff: BlurDiffusion, batch: int, device):
    """DDIM (eta 1) coefficient maps of one step 500 -> 490, float32 (B, 1, H, W)."""
    from .sampling import _ddim_coefs
    lab = diff.log_abar(torch.tensor([500, 490]), device=device)[:, None, None]
    ca, ce, cz = _ddim_coefs(lab[0], lab[1], 500, 490, 1.0)
    return [m.float().expand(batch, 1, diff.H, diff.W).contiguous() for m in (ca, ce, cz)]


# In the order they run: the compiled configurations after the others, the likelier
# winner first; fp16 last (an H100 has bf16: it answers whether the step runs, not the
# goal, so a run cut short by its time budget loses it first).
STEP_IMPLS = ("torch_default", "torch_fp32", "blurfast", "blurfast_cast_once", "blurfast_ckpt",
              "blurfast_compile", "blurfast_compile_cl", "blurfast_compile_cast_once",
              "blurfast_fp16")
BASELINES = ("torch_default", "torch_fp32")

# Backend flags of each configuration on CUDA: (matmul TF32, cuDNN TF32, cuDNN benchmark).
# torch_default leaves torch's defaults (TF32 convolutions, IEEE matmuls, no autotuning),
# as a script that sets none of them runs; torch_fp32 is IEEE float32 throughout; blurfast
# sets what train() sets.
BACKEND_FLAGS = {"torch_default": (False, True, False), "torch_fp32": (False, False, False),
                 **{impl: TRAIN_FLAGS for impl in STEP_IMPLS[2:]}}


class backend_flags:
    """Sets the backend flags of configuration ``impl`` (a key of BACKEND_FLAGS) for the
    block, and restores the previous ones after it."""

    def __init__(self, impl: str):
        self.flags = BACKEND_FLAGS[impl]

    def _get(self):
        b = torch.backends
        return b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark

    def _set(self, flags):
        b = torch.backends
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark = flags

    def __enter__(self):
        self.prev = self._get()
        self._set(self.flags)

    def __exit__(self, *exc):
        self._set(self.prev)


def check_step_impls(name: str, impls, cuda: bool) -> None:
    """ValueError naming ``name`` unless every one of ``impls`` is in STEP_IMPLS and, where
    not ``cuda``, none is a 16-bit configuration."""
    for impl in impls:
        if impl not in STEP_IMPLS:
            raise ValueError(f"{name}: expected names from {STEP_IMPLS}, got {impl!r}")
        if impl.endswith(("cast_once", "fp16")) and not cuda:
            raise ValueError(f"{name}: {impl} is a 16-bit configuration, and the CPU rows "
                             f"are fp32; it needs a CUDA device")


def run_steps(device=None, quick: bool = False, batches=None, preset: Optional[str] = None,
              resolution: Optional[int] = None, iters: Optional[int] = None,
              impls=("blurfast",), errors: Optional[list] = None, on_progress=None,
              progress: bool = False) -> list:
    """Rows ``{case, preset, shape, impl, flags, ms_per_step, images_per_s, peak_mem_gb,
    speedup_vs_torch_default, speedup_vs_torch_fp32}`` for cases ``train_step`` and
    ``sampler_step_model``. The two baselines are always timed: ``torch_default`` (torch's
    default backend flags, TF32 convolutions) and ``torch_fp32`` (IEEE float32
    throughout). Besides them, from ``impls``: ``blurfast``, ``blurfast_compile`` (the
    model under ``torch.compile`` inside the same CUDA graph; training step only,
    compiling takes minutes) and each with ``_cast_once`` (the bf16 weights cast once per
    step, :class:`blurfast.training.Bf16Weights`; training step only, on CUDA), and
    ``blurfast_compile_cl``: the compiled step with the model and its input in
    channels_last (training step only; run v4 timed channels_last uncompiled only),
    ``blurfast_ckpt``: ``blurfast`` with activation checkpointing (training step only), and
    ``blurfast_fp16``: ``blurfast`` in float16 with its loss scale instead of bfloat16
    (training step only, on CUDA).
    ``peak_mem_gb``: on CUDA, the most memory torch held for the configuration's training
    step (its model, EMA and optimizer state included), None elsewhere.
    ``flags`` records (matmul TF32, cuDNN TF32, cuDNN benchmark) on CUDA. Defaults:
    paper64 at 64x64, batch 16 and 64 on a GPU (16 only with ``quick``); the small U-Net
    at 32x32, batch 8 on a CPU.

    ``errors``: a list; an exception of a blurfast configuration is then appended to it
    (``{case, impl, shape, reason, error}``) and the run goes on without its rows, where
    otherwise it is raised (a baseline's always is). ``on_progress(rows)``: called with
    the rows so far after each configuration, so a run cut short keeps them.
    ``progress``: a progress bar (stderr) over the (batch, configuration) pairs."""
    from tqdm.auto import tqdm
    device = check_device("device", device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    quick, progress = check_bool("quick", quick), check_bool("progress", progress)
    check_step_impls("impls", impls, cuda)
    impls = list(BASELINES) + [i for i in STEP_IMPLS if i in impls and i not in BASELINES]
    preset = preset or ("paper64" if cuda else "small")
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    # Python ints (numpy's taken too): batch and resolution go into the rows' JSON shape
    res = check_resolution((64 if cuda else 32) if resolution is None else resolution,
                           PRESETS[preset]["channel_mult"])
    if batches is None:
        batches = ((16,) if quick else (16, 64)) if cuda else (8,)
    if isinstance(batches, (str, bytes)) or not hasattr(batches, "__iter__"):
        raise ValueError(f"batches: expected a sequence of ints >= 1, got {batches!r}")
    batches = [check_int(f"batches[{k}]", b) for k, b in enumerate(batches)]
    if not batches:
        raise ValueError("batches: expected a sequence of ints >= 1, got an empty one")
    iters = check_int("iters", iters, none_ok=True)
    if iters is None:
        iters = (20 if quick else 50) if cuda else 3
    if errors is not None and not isinstance(errors, list):
        raise TypeError(f"errors: expected a list or None, got {type(errors).__name__}")
    if on_progress is not None and not callable(on_progress):
        raise TypeError(f"on_progress: expected a callable or None, got {on_progress!r}")
    diff = BlurDiffusion(resolution=res)
    rows = []
    bar = tqdm(total=len(batches) * len(impls), desc="model steps", unit="config",
               disable=not progress, leave=False)
    for batch in batches:
        shape = [batch, 3, res, res]
        x_u8 = torch.randint(0, 256, (batch, res, res, 3), dtype=torch.uint8)
        flip = torch.zeros(batch, dtype=torch.bool)
        t = torch.randint(1, diff.num_steps, (batch,))
        x0 = (x_u8.permute(0, 3, 1, 2).float() / 127.5 - 1).contiguous().to(device)
        if cuda:
            x_u8, flip, t = x_u8.pin_memory(), flip.pin_memory(), t.pin_memory()
        inputs = _StepInputs(x_u8, flip, t, x0, torch.full((batch,), 500, device=device),
                             _sampler_coefs(diff, batch, device))
        timed, peaks = {}, {}
        for impl in impls:
            bar.set_postfix_str(f"{impl} batch {batch}")
            try:
                _time_impl(impl, timed, peaks, preset, diff, device, iters, inputs)
            except Exception as e:
                if errors is None or impl in BASELINES:
                    raise
                errors.append({"case": "train_step", "impl": impl, "shape": shape,
                               "reason": f"{type(e).__name__}: {e}"[:500], "error": True})
                print(f"{impl} at batch {batch}: {type(e).__name__}: {e}", file=sys.stderr)
            done = _rows(timed, peaks, preset, shape, cuda)
            if on_progress is not None:
                on_progress(rows + done)
            bar.update(1)
        rows += done
    bar.close()
    return rows


class _StepInputs(NamedTuple):
    """One batch's inputs: the training step's (uint8 images, flips, steps) and the
    sampler step's (float images, steps, DDIM coefficient maps)."""
    x_u8: torch.Tensor
    flip: torch.Tensor
    t: torch.Tensor
    x0: torch.Tensor
    t_dev: torch.Tensor
    coefs: list


def _time_impl(impl, timed, peaks, preset, diff, device, iters, inputs: _StepInputs) -> None:
    """Times configuration ``impl``'s training step (and sampler step) into ``timed``:
    {(case, impl): ms}; on CUDA the training step's peak memory into ``peaks``: {impl:
    bytes}."""
    from .training import _GRAPH_WARMUP, TrainStep
    cuda = device.type == "cuda"
    x_u8, flip, t, x0, t_dev, (ca, ce, cz) = inputs
    batch, res = x0.shape[0], x0.shape[-1]
    if cuda:            # the previous configuration's memory, CUDA graph pools included
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    model = UNet.from_preset(preset, resolution=res, channels=3).to(device)
    model.activation_checkpointing = impl.endswith("_ckpt")
    with backend_flags(impl) if cuda else contextlib.nullcontext():
        if impl in BASELINES:
            train = reference_train_step(model, diff, batch, device)

            def train_fn(train=train):
                train(x0)

            def sample_fn(model=model):
                with torch.no_grad():
                    eps = model(x0, t_dev)
                    R.idct2(ca * R.dct2(x0) + ce * R.dct2(eps)
                            + cz * R.dct2(torch.randn_like(x0)))
        else:
            precision = "fp16" if impl.endswith("fp16") else "bf16" if cuda else "fp32"
            stepper = TrainStep(model, diff, device=device, precision=precision,
                                channels_last=impl.endswith("_cl"), cuda_graphs=cuda,
                                compile="compile" in impl,
                                cast_once=impl.endswith("cast_once"))

            def train_fn(stepper=stepper):
                stepper(x_u8, flip, t, 1, 0)

            from .generate import GraphedModel
            from .models import cast_for_autocast_
            made = []

            def sample_fn():
                from . import ops
                if not made:    # made here, after the training step's peak memory is read
                    # On a GPU as `blurfast sample` runs it: bf16 weights cast once, the
                    # call captured on its first run.
                    made.append(GraphedModel(cast_for_autocast_(copy.deepcopy(model)))
                                if cuda else model)
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                     enabled=cuda):
                    eps = made[0](x0, t_dev)
                ops.spectral(x0, ca, eps.float(), ce, cz, seed=1)
        cases = [("train_step", train_fn), ("sampler_step_model", sample_fn)]
        for case, fn in cases if impl in ("blurfast", *BASELINES) else cases[:1]:
            # A captured step's eager warm-up steps and its capture stay out of the timed
            # loop (they once counted there: the v3 rows).
            graph = cuda and case == "train_step" and impl not in BASELINES
            warmup = _GRAPH_WARMUP + 2 if graph else (3 if cuda else 1)
            r = time_call(fn, [()], device, iters=iters, warmup=warmup)
            timed[(case, impl)] = r["wall_us"] / 1e3
            if cuda and case == "train_step":
                peaks[impl] = torch.cuda.max_memory_allocated(device)


def _rows(timed: dict, peaks: dict, preset: str, shape: list, cuda: bool) -> list:
    """The rows of one batch's {(case, impl): ms}; a speedup is None where its baseline
    has no time (yet)."""
    rows = []
    batch = shape[0]
    for (case, impl), ms in timed.items():
        rows.append({"case": case, "preset": preset, "shape": shape, "impl": impl,
                     "flags": list(BACKEND_FLAGS[impl]) if cuda else None,
                     "ms_per_step": round(ms, 3),
                     "images_per_s": round(batch / (ms / 1e3), 1),
                     "peak_mem_gb": (round(peaks[impl] / 2 ** 30, 3)
                                     if case == "train_step" and impl in peaks else None),
                     **{f"speedup_vs_{b}": (round(timed[(case, b)] / ms, 3)
                                            if (case, b) in timed else None)
                        for b in BASELINES}})
    return rows


def format_steps(rows) -> str:
    hdr = f"{'case':<20}{'model':<9}{'shape':<14}{'impl':<28}{'ms/step':>10}{'img/s':>10}" \
          f"{'vs default':>12}{'vs fp32':>9}{'peak GB':>9}"
    return "\n".join([hdr, "-" * len(hdr)] + [step_line(r) for r in rows])


def step_line(r: dict) -> str:
    """One model-step row as a line of :func:`format_steps`."""
    peak = r.get("peak_mem_gb")
    return (f"{r['case']:<20}{r['preset']:<9}{'x'.join(map(str, r['shape'])):<14}"
            f"{r['impl']:<28}{r['ms_per_step']:>10.2f}{r['images_per_s']:>10.1f}"
            f"{r['speedup_vs_torch_default']:>11.2f}x"
            f"{r['speedup_vs_torch_fp32']:>8.2f}x"
            f"{'' if peak is None else f'{peak:.2f}':>9}".rstrip())
