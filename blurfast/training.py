"""Training of blur diffusion models: :func:`train` and the step it repeats.

Randomness is a function of the seed and the step alone: the steps ``t``, the flips
and the Philox noise of step ``s`` are seeded by ``(seed, s)``, and its examples are
read on from those consumed before it (``s * B``, B the global batch, unless a resume
changed B) in an endless sequence of permutations seeded by ``(seed, epoch)``. All are
drawn for the whole global batch, and each rank takes its slice (the noise of rank r
starts at Philox offset ``r * b * C*H*W``). So a resumed run retraces an uninterrupted
one exactly, and k processes with per-process batch b draw the same examples, steps and
noise as one process with batch k*b. A captured
step (``cuda_graphs``) draws its noise from torch's generator instead, seeded from
``(seed, step, rank)``: still a function of the step, but other noise than an
uncaptured run's.

:class:`TrainStep` is the complete step (process, forward, backward, gradient
clipping, fused Adam, EMA) with no host synchronization: a non-finite gradient
skips the update on the device (the optimizer's ``found_inf``), and the counters
are read only at log points. With ``cuda_graphs=True`` the whole step is
captured once in a CUDA graph and replayed.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import inspect
import json
import math
import os
import signal
import shutil
import sys
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Optional

try:
    import fcntl
except ImportError:          # not on Windows
    fcntl = None

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from . import data as D
from . import ops
from .console import on_terminal
from .checks import (PRECISIONS, autocast_dtype, check_bool, check_int, check_number,
                     compile_problem, default_precision, is_int)
from .distributed import any_rank, barrier, from_rank0, setup_processes, teardown_processes
from .fileio import write_problem, write_text
from .diffusion import TARGETS, BlurDiffusion, scales
from .models import AUTOCAST_LAYERS, PRESETS, UNet

__all__ = ["train", "TrainStep", "Bf16Weights", "step_draws", "StepBatches", "NonFiniteError"]

_SEED_MASK = 2 ** 62 - 1
_GRAPH_WARMUP = 3          # eager steps (on a side stream) before the capture
# fp16's loss scale (torch's GradScaler's rule): from 2^16, halved at a non-finite
# gradient (the step skipped), doubled after this many finite ones in a row. Not halved
# below _SCALE_MIN (DeepSpeed's and Megatron's floor): a smaller scale shrinks the
# gradients, which float16 flushes to zero (a run that goes on after a stretch of
# non-finite steps would then train on none), and at 0 every step is skipped.
_SCALE_INIT, _SCALE_GROWTH, _SCALE_MIN = 2.0 ** 16, 2000, 1.0
# What train() sets on CUDA unless tf32=False: (matmul TF32, cuDNN TF32, cuDNN autotuning).
BACKEND_FLAGS = (True, True, True)
LOG_FIELDS = ["step", "images", "loss", "grad_norm", "lr", "nonfinite", "images_per_s",
              "elapsed_s"]
FID_FIELDS = ["step", "fid", "kid"]


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def derive_seed(*ints: int) -> int:
    """A 62-bit seed from a tuple of ints in [0, 2**64) (NumPy's SeedSequence hash);
    ValueError naming the first that is not.

    Distinct tuples give distinct seeds only if every int is < 2**32 and the tuples
    differ at a position both have: SeedSequence hashes 32-bit words, an int >= 2**32
    being two of them, and pads fewer than four words with zeros. So (2**32 + 1, 1, 0),
    (1, 1, 1) and (1, 1, 1, 0) give one seed. The callers, (seed, epoch, 0),
    (seed, step, 1 or 2) and (seed, step, 3, rank), differ in their third int while
    seed, step and epoch are < 2**32 (train() refuses a larger seed). Beyond that they
    collide: within a run, (5, 3 * 2**32 + 7, 1) is (5, 7, 3, 1); across runs, seed
    2**32 + 1's epoch 1 permutation would be seed 1's step 1 draws. Outputs are kept as
    they are: changing the hash would change every run's draws.
    """
    for i, v in enumerate(ints):
        if not is_int(v) or not 0 <= v < 2 ** 64:
            raise ValueError(f"ints[{i}]: expected an int in [0, 2**64), got {v!r}")
    a, b = np.random.SeedSequence([int(v) for v in ints]).generate_state(2, np.uint32)
    return ((int(a) << 32) | int(b)) & _SEED_MASK


def step_draws(seed: int, step: int, global_batch: int, num_steps: int, rank: int = 0,
               local_batch: Optional[int] = None):
    """``(t, flip, noise_seed)`` of one step: t uniform on 1..N-1 and flips drawn for
    the whole global batch, this rank's slice returned; the noise seed is shared."""
    g = torch.Generator().manual_seed(derive_seed(seed, step, 1))
    t = torch.randint(1, num_steps, (global_batch,), generator=g)
    flip = torch.randint(0, 2, (global_batch,), generator=g).bool()
    b = global_batch if local_batch is None else local_batch
    sl = slice(rank * b, rank * b + b)
    return t[sl], flip[sl], derive_seed(seed, step, 2)


class StepBatches:
    """Batch sampler: dataset indices of this rank for steps ``start..stop-1``.

    The examples form an endless sequence of epochs, each a permutation seeded by
    ``(seed, epoch)``. Step ``start`` begins at position ``images`` of it, the examples
    the run has consumed before (default ``start * B``), and each step takes the next B
    (the global batch), rank r the r-th slice of size b: so step s takes positions
    ``[s*B, (s+1)*B)`` of a run whose global batch never changed, and a run resumed with
    another global batch goes on where its earlier steps stopped, skipping and repeating
    no example.
    """

    def __init__(self, n: int, global_batch: int, local_batch: int, rank: int, seed: int,
                 start: int, stop: int, images: Optional[int] = None):
        self.n, self.B, self.b, self.rank, self.seed = n, global_batch, local_batch, rank, seed
        self.start, self.stop = start, stop
        self.images = start * global_batch if images is None else images
        self.images = check_int("images", self.images, 0)
        self._perms = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.pop(min(self._perms))
            g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, 0))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, step: int):
        first = self.images + (step - self.start) * self.B
        pos = first + self.rank * self.b + torch.arange(self.b)
        epochs = pos // self.n
        return [int(self._perm(int(e))[int(p)]) for e, p in zip(epochs, pos % self.n)]

    def __iter__(self):
        for s in range(self.start, self.stop):
            yield self.indices(s)

    def __len__(self):
        return self.stop - self.start


def ema_update_(ema_params, params, weight: torch.Tensor) -> None:
    """``ema += weight * (param - ema)`` for every pair, ``weight`` a 0-dim device tensor.

    The weight goes in as a list (the Tensor[] overload of ``_foreach_lerp_``): a single
    tensor would bind to the Scalar overload, which reads it back to the host, a sync
    that CUDA-graph capture forbids. That overload runs one kernel per pair, so
    :class:`TrainStep` passes one flat buffer per side (:func:`flatten_params_`)."""
    torch._foreach_lerp_(ema_params, params, [weight] * len(ema_params))


_FLAT_ALIGN = 128     # elements between parameter starts (512 bytes in float32), as torch's
                      # allocator aligns: vectorized kernels and cuDNN see aligned pointers


def flatten_params_(module: torch.nn.Module) -> Optional[torch.Tensor]:
    """Moves every parameter of ``module`` into one flat buffer and returns it: each
    parameter's data becomes a view of the buffer with its own shape and strides
    (channels_last included), the gaps between them zero. Returns None, moving nothing,
    when the parameters differ in dtype or device or one is neither contiguous nor
    channels_last."""
    ps = list(module.parameters())
    if (not ps or len({(p.dtype, p.device) for p in ps}) != 1
            or not all(p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(
                memory_format=torch.channels_last)) for p in ps)):
        return None
    starts, total = [], 0
    for p in ps:
        starts.append(total)
        total += -(-p.numel() // _FLAT_ALIGN) * _FLAT_ALIGN
    flat = torch.zeros(total, dtype=ps[0].dtype, device=ps[0].device)
    with torch.no_grad():
        for p, start in zip(ps, starts):
            view = flat.as_strided(p.shape, p.stride(), start)
            view.copy_(p)
            p.data = view
    return flat


class Bf16Weights:
    """bfloat16 copies of a model's convolution and linear parameters, refreshed by one
    cast of the flat float32 buffer per step, and a twin of the model that computes with
    them (its other parameters, the norms', are the model's own).

    Autocast casts each such parameter where it is used: inside a CUDA graph, where its
    cast cache is off, one small kernel per parameter forward and one per gradient back
    to float32 (298 each way for paper64, fewer under torch.compile, which merges some).
    Here the forward casts are one kernel, and :meth:`grads_to_float` widens the
    gradients in a few multi-tensor kernels. The numbers are autocast's: the same float32
    values rounded to bfloat16, the same bfloat16 gradients widened
    (tests/test_training.py checks the bits)."""

    def __init__(self, model: torch.nn.Module, flat: torch.Tensor):
        self.flat = flat
        self.flat16 = torch.empty(flat.shape, dtype=torch.bfloat16, device=flat.device)
        self.grad_flat = torch.zeros_like(flat)
        shared = {id(v): v for v in (*model.parameters(), *model.buffers())}
        self.module = copy.deepcopy(model, shared)
        self.masters, self.copies, self.master_grads = [], [], []
        for mod in self.module.modules():
            if not isinstance(mod, AUTOCAST_LAYERS):
                continue
            for name, p in list(mod.named_parameters(recurse=False)):
                where = (p.shape, p.stride(), p.storage_offset())   # p: a view of `flat`
                # frozen as its master: no gradient, so Adam passes over a frozen master
                copy16 = torch.nn.Parameter(self.flat16.as_strided(*where),
                                            requires_grad=p.requires_grad)
                setattr(mod, name, copy16)
                self.masters.append(p)
                self.copies.append(copy16)
                self.master_grads.append(self.grad_flat.as_strided(*where))

    def refresh(self) -> None:
        """Casts the model's current weights (one kernel)."""
        self.flat16.copy_(self.flat)

    def clear_copy_grads(self) -> None:
        """Drops the bfloat16 copies' gradients, which :meth:`grads_to_float` has taken
        over (the shared parameters' gradients add up across rounds, as the model's)."""
        for c in self.copies:
            c.grad = None

    def grads_to_float(self, accumulate: bool = False) -> None:
        """Gives each master parameter its copy's gradient in float32 (None where the
        copy has none, as autocast's master would); with ``accumulate``, adds it to the
        master's gradient, as autograd adds a later round's (TrainStep's grad_accum)."""
        dst, src, add_to, add = [], [], [], []
        for p, c, g in zip(self.masters, self.copies, self.master_grads):
            if c.grad is None:
                if not accumulate:
                    p.grad = None
            elif accumulate and p.grad is not None:
                add_to.append(g)
                add.append(c.grad)
            else:
                p.grad = g
                dst.append(g)
                src.append(c.grad)
        if dst:
            torch._foreach_copy_(dst, src)
        if add_to:
            torch._foreach_add_(add_to, add)


# A module of a live TrainStep's model or EMA -> the _ParamWatch of every live step that
# holds it (several steps may share one model), weakly (a strong reference would keep the
# module alive: a watch holds it): a parameter registered on one
# (load_state_dict(assign=True), setattr) replaces a parameter each of those steps holds.
_WATCHED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_REGISTRATION_HOOK = []


def _param_registered(module, name, param) -> None:
    for watch in _WATCHED.get(module, ()):
        watch.replaced = True


class _ParamWatch:
    """Keeps the parameters of a module (a TrainStep's model or EMA) those its step uses:
    the objects its optimizer and EMA update, each a view of the flat buffer (``flat``,
    when there is one) that the EMA and cast_once read. A parameter replaced since
    (``load_state_dict(assign=True)``, ``setattr``) or given new storage
    (``p.data = ...``) would leave the step with old weights: :meth:`repair` copies its
    values into the step's parameter, put back in its place. Weights changed in place
    (``load_state_dict``, ``p.copy_``) need nothing."""

    def __init__(self, module: torch.nn.Module, flat: Optional[torch.Tensor]):
        self.replaced = False
        self.entries = []           # (module, name, parameter, its view of flat or None)
        for mod in module.modules():
            for name, p in mod.named_parameters(recurse=False):
                view = None if flat is None else flat.as_strided(p.shape, p.stride(),
                                                                 p.storage_offset())
                self.entries.append((mod, name, p, view))
            _WATCHED.setdefault(mod, weakref.WeakSet()).add(self)
        # With a flat buffer, the parameters' data pointers (each its view's) as one tuple:
        # p.data = ... calls no hook; stale() compares them in one map over the parameters.
        self._params = tuple(p for *_, p, _ in self.entries)
        self._ptrs = tuple(map(torch.Tensor.data_ptr, self._params)) if flat is not None else None
        if not _REGISTRATION_HOOK:
            _REGISTRATION_HOOK.append(
                torch.nn.modules.module.register_module_parameter_registration_hook(
                    _param_registered))

    def stale(self) -> bool:
        """Whether a parameter was replaced or given new storage (no device work)."""
        return self.replaced or (self._ptrs is not None and
                                 tuple(map(torch.Tensor.data_ptr, self._params)) != self._ptrs)

    def repair(self, what: str) -> None:
        with torch.no_grad():
            for mod, name, p, view in self.entries:
                cur = mod._parameters.get(name)
                if cur is not p:
                    if cur is None or cur.shape != p.shape:
                        raise ValueError(
                            f"{what}: parameter {name!r} was replaced by "
                            f"{None if cur is None else tuple(cur.shape)}, expected shape "
                            f"{tuple(p.shape)}; load weights of this model's shapes")
                    p.copy_(cur)
                    mod._parameters[name] = p
                if view is not None and p.data_ptr() != view.data_ptr():
                    if p.shape != view.shape:
                        raise ValueError(f"{what}: parameter {name!r} was given shape "
                                         f"{tuple(p.shape)}, expected {tuple(view.shape)}")
                    view.copy_(p.data)
                    p.data = view
        self.replaced = False


def _collate(batch: torch.Tensor) -> torch.Tensor:
    """The datasets' ``__getitems__`` already returns the batch tensor."""
    return batch


def _ignore_stop_signals(worker_id: int) -> None:
    """A loader worker leaves Ctrl-C (SIGINT to the terminal's whole process group) and a
    SIGTERM to the whole group (a batch system's preemption) to the training process,
    which saves and stops; a worker that died of one would fail the batch the process
    still waits for. Workers end with the process. (Forked workers inherit the process's
    handlers; workers started by spawn or forkserver do not.)"""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


class TrainStep:
    """One optimization step, repeated by :func:`train` (and by the benchmarks).

    Call with a uint8 batch (b, H, W, C), flips (b,) bool, steps t (b,) and the
    Philox ``(noise_seed, noise_offset)``. Nothing is read back to the host; see
    :meth:`read_stats`. ``ddp`` (the process group must exist): True wraps the model in
    DistributedDataParallel, whose all-reduces overlap the backward; ``"flat"``
    all-reduces the gradients once after the backward, as one flat buffer that they are
    views of (the parameters flattened; what a captured step of several processes does:
    ``cuda_graphs`` with ``ddp=True`` takes it). ``cuda_graphs``: capture the whole step after
    ``_GRAPH_WARMUP`` eager steps; the noise then comes from torch's generator
    (graph-safe) instead of the Philox stream. ``grad_clip``: the maximum global
    gradient norm, a finite number > 0; None or 0: no clipping. ``cast_once`` (bf16, one
    process): the forward computes with :class:`Bf16Weights`, the same numbers as
    autocast's casts in fewer kernels. ``grad_accum``: the batch goes through the model in
    that many equal rounds whose gradients add up before the one optimizer step (the
    activations of one round in memory at a time); each round's Philox noise is the
    whole batch's at its images, so only the summation order differs from one round, but
    for what is drawn per round: dropout masks (a model with dropout) and, under
    ``cuda_graphs``, the noise from torch's generator.
    """

    def __init__(self, model: UNet, diff: BlurDiffusion, *, device, target: str = "eps",
                 lr: float = 5e-5, optimizer: str = "adam", betas=(0.9, 0.999),
                 weight_decay: float = 0.0, adam_eps: float = 1e-8, grad_clip=1.0,
                 ema_beta: float = 0.9999, precision: str = "fp32",
                 channels_last: bool = False, compile: bool = False,
                 cuda_graphs: bool = False, flip: bool = True, pixel_range: str = "-1,1",
                 ddp: bool = False, cast_once: bool = False, grad_accum: int = 1):
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        if target not in TARGETS:
            raise ValueError(f"target: expected one of {TARGETS}, got {target!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
        if optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer: expected 'adam' or 'adamw', got {optimizer!r}")
        if pixel_range not in D.PIXEL_RANGES:
            raise ValueError(f"pixel_range: expected one of {D.PIXEL_RANGES}, got {pixel_range!r}")
        grad_clip = check_number("grad_clip", grad_clip, 0, none_ok=True)
        self.grad_accum = check_int("grad_accum", grad_accum)
        if cuda_graphs and not cuda:
            raise ValueError("cuda_graphs: needs a CUDA device")
        if ddp not in (False, True, "flat"):
            raise ValueError(f"ddp: expected False, True or 'flat', got {ddp!r}")
        if cuda_graphs and ddp:
            ddp = "flat"          # DDP's bucket hooks are not captured; one all-reduce is
            nccl = torch.cuda.nccl.version()
            if nccl < (2, 9, 6):
                raise ValueError(f"cuda_graphs: several processes need NCCL 2.9.6 or newer "
                                 f"to capture their all-reduce, this torch has "
                                 f"{'.'.join(map(str, nccl))}; train without CUDA graphs")
        if cast_once and (precision != "bf16" or ddp):
            raise ValueError("cast_once: needs precision='bf16' and one process (no ddp)")
        self.target, self.flip, self.pixel_range = target, flip, pixel_range
        self.cuda_graphs = cuda_graphs
        self.amp_dtype = autocast_dtype(precision)
        self._scale = self._good = None
        if precision == "fp16":      # the loss scale and the finite steps since it changed
            self._scale = torch.tensor(_SCALE_INIT, device=self.device)
            self._good = torch.zeros((), device=self.device)
        self.max_norm = float(grad_clip) if grad_clip else math.inf     # None, 0: no clip
        self.ema_w = 1.0 - float(ema_beta)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

        # train mode (dropout): set again by a call that finds the model in eval mode
        self.model = model.to(self.device, memory_format=self.memory_format).train()
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.params = list(self.model.parameters())
        self.ema_params = list(self.ema.parameters())
        # One EMA kernel per step instead of one per parameter (450 for paper64).
        flat, ema_flat = flatten_params_(self.model), flatten_params_(self.ema)
        self._ema_pairs = (([ema_flat], [flat]) if flat is not None and ema_flat is not None
                           else (self.ema_params, self.params))
        self._watches = (_ParamWatch(self.model, flat), _ParamWatch(self.ema, ema_flat))
        self.diff = diff
        self._bf16 = None
        if cast_once:
            if flat is None:
                raise ValueError("cast_once: needs the model's parameters in one dtype and "
                                 "layout (contiguous or channels_last)")
            self._bf16 = Bf16Weights(self.model, flat)

        fwd = self.model if self._bf16 is None else self._bf16.module
        self._ddp = self._grad_flat = None
        if ddp == "flat":
            if flat is None or ema_flat is None:
                raise ValueError("ddp: 'flat' needs the model's parameters in one dtype and "
                                 "layout (contiguous or channels_last)")
            import torch.distributed as dist
            dist.broadcast(flat, 0)          # rank 0's initial weights everywhere, as DDP's
            # Autograd adds each gradient into the view it finds, in place. A frozen
            # parameter keeps no gradient, as with DDP: Adam passes over it (a zero one
            # would move it under weight decay).
            self._grad_flat = torch.zeros_like(flat)
            self._grad_views = [(p, self._grad_flat.as_strided(p.shape, p.stride(),
                                                               p.storage_offset()))
                                for p in self.params if p.requires_grad]
        elif ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP
            fwd = self._ddp = DDP(self.model, device_ids=[self.device.index] if cuda else None,
                                  gradient_as_bucket_view=True)
        if ddp:               # the EMA starts from the weights rank 0 gave every process
            with torch.no_grad():
                torch._foreach_copy_(self.ema_params, self.params)
        self.forward = torch.compile(fwd) if compile else fwd

        # A tensor learning rate lets a captured step see updates of it.
        lr = check_number("lr", lr, 0)
        self._lr = torch.tensor(float(lr), device=self.device) if cuda_graphs else float(lr)
        cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
        self._group_settings = dict(betas=tuple(betas), eps=adam_eps, weight_decay=weight_decay,
                                    capturable=cuda_graphs)
        self.opt = cls(self.params, lr=self._lr, fused=True, **self._group_settings)
        # Adam's update reads it from the group (AdamW sets it True; not a constructor
        # argument of AdamW): a loaded group of the other optimizer's must not keep its own.
        self._group_settings["decoupled_weight_decay"] = optimizer == "adamw"
        # loss sum, finite losses, consecutive skipped steps, all skipped steps,
        # grad-norm sum, applied steps, longest run of consecutive skipped steps since the
        # last read (a run that ends between reads is still seen)
        self._stats = torch.zeros(7, dtype=torch.float64, device=self.device)
        self._graph = None
        self._warm = 0
        self._static = None

    # ------------------------------------------------------------------ the step
    def set_lr(self, lr: float) -> None:
        """The learning rate of the steps from now on (kept by :meth:`load_state_dict`)."""
        lr = float(check_number("lr", lr, 0))
        if isinstance(self._lr, torch.Tensor):
            self._lr.fill_(lr)
        else:
            self._lr = lr
        for g in self.opt.param_groups:
            g["lr"] = self._lr

    def noised(self, x0, t, noise_seed: int = 0, noise_offset: int = 0):
        """``(x_t, target)`` of clean images x0 at steps t (device tensors): x_t =
        ``q_sample(x0, t)`` with the Philox noise at ``(noise_seed, noise_offset)``
        (torch's generator under ``cuda_graphs``), the target per ``self.target``."""
        sa, g64 = scales(self.diff.log_abar_unchecked(t)[:, None])    # float64 maps
        a, g = sa.float(), g64.float()
        if self.cuda_graphs:
            eps = torch.randn_like(x0)
            x_t = ops.spectral(x0, a, eps, g, seed=0)
        else:
            x_t, eps = ops.spectral(x0, a, g=g, seed=noise_seed, offset=noise_offset,
                                    return_noise=True)
        if self.target == "eps":
            return x_t, eps
        # std: idct2(sqrt(1 - Abar) eb); score: -idct2((1 - Abar)^(-1/2) eb)
        m = g if self.target == "std" else (-1 / g64).float()
        return x_t, ops.spectral(eps, m, seed=0)

    def _round(self, x_u8, flip, t, noise_seed: int, noise_offset: int) -> torch.Tensor:
        """Forward and backward of one round of the batch; its mean loss. The gradients
        add to the model's (scaled by 1 / grad_accum: the step's is the batch mean's)."""
        if self._bf16 is not None:
            self._bf16.clear_copy_grads()
        x0 = D.to_float(x_u8, flip if self.flip else None, self.pixel_range)
        x_t, y = self.noised(x0, t, noise_seed, noise_offset)
        x_t = x_t.contiguous(memory_format=self.memory_format)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None,
                            cache_enabled=not self.cuda_graphs):
            pred = self.forward(x_t, t)
        loss = F.mse_loss(pred.float(), y)
        part = loss / self.grad_accum if self.grad_accum > 1 else loss
        (part if self._scale is None else part * self._scale).backward()
        return loss

    def _body(self, x_u8, flip, t, noise_seed: int, noise_offset: int) -> None:
        if self._grad_flat is None:
            self.opt.zero_grad(set_to_none=True)
        else:
            self._grad_flat.zero_()
            for p, view in self._grad_views:   # again where other code replaced or dropped it
                if p.grad is not view:
                    p.grad = view
        if self._bf16 is not None:
            self._bf16.refresh()
        k = self.grad_accum
        if x_u8.shape[0] % k:
            raise ValueError(f"grad_accum: {k} rounds do not divide a batch of "
                             f"{x_u8.shape[0]} images")
        m = x_u8.shape[0] // k
        chw = x_u8[0].numel()
        losses = []
        for r in range(k):
            rows = slice(r * m, (r + 1) * m)
            # DDP all-reduces the gradients in the last round's backward only
            sync = self._ddp.no_sync() if self._ddp is not None and r < k - 1 \
                else contextlib.nullcontext()
            with sync:
                part = self._round(x_u8[rows], flip[rows], t[rows], noise_seed,
                                   noise_offset + r * m * chw)
            losses.append(part.detach())
            if self._bf16 is not None:
                self._bf16.grads_to_float(accumulate=r > 0)
        loss = losses[0] if k == 1 else torch.stack(losses).mean()
        if self._grad_flat is not None:        # the mean over the processes, as DDP's
            import torch.distributed as dist
            dist.all_reduce(self._grad_flat)
            self._grad_flat.div_(dist.get_world_size())
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if self._scale is not None:
            norm = norm / self._scale          # the gradient's own (the scale: a power of 2)
        skip = (~torch.isfinite(norm)).float()
        # Fused Adam takes the clipping (and fp16's loss scale) as the gradient's divisor,
        # applied in its own kernel (which leaves the divided gradients in .grad):
        # clip_grad_norm_'s factor max_norm / (norm + 1e-6), at most 1.
        clip = torch.clamp((norm + 1e-6) / self.max_norm, min=1.0)
        self.opt.grad_scale = clip if self._scale is None else clip * self._scale
        self.opt.found_inf = skip            # fused Adam leaves params and state as they are
        self.opt.step()
        ema_update_(*self._ema_pairs, (1 - skip) * self.ema_w)
        if self._scale is not None:
            bad = skip.bool()
            grow = ~bad & (self._good + 1 >= _SCALE_GROWTH)
            half = torch.clamp(self._scale * 0.5, min=_SCALE_MIN)
            self._scale.copy_(torch.where(bad, half,
                                          torch.where(grow, self._scale * 2.0, self._scale)))
            self._good.copy_(torch.where(bad | grow, 0.0, self._good + 1))
        ok = torch.isfinite(loss)
        s = self._stats
        s[0] += torch.where(ok, loss.detach().double(), 0.0)
        s[1] += ok.double()
        s[2].add_(skip.double()).mul_(skip.double())
        s[3] += skip.double()
        s[4] += torch.where(skip.bool(), 0.0, norm.detach().double())
        s[5] += 1 - skip.double()
        torch.maximum(s[6], s[2], out=s[6])

    def __call__(self, x_u8: torch.Tensor, flip: torch.Tensor, t: torch.Tensor,
                 noise_seed: int = 0, noise_offset: int = 0) -> None:
        nb = self.device.type == "cuda"
        if not self.model.training:        # the caller's model.eval(): dropout on again
            self.model.train()
            if self._bf16 is not None:
                self._bf16.module.train()
        for watch, what in zip(self._watches, ("model", "ema")):
            if watch.stale():
                watch.repair(what)
        if not self.cuda_graphs:
            self._body(x_u8.to(self.device, non_blocking=nb), flip.to(self.device, non_blocking=nb),
                       t.to(self.device, non_blocking=nb), noise_seed, noise_offset)
            return
        if self._static is None:
            self._static = [torch.empty(v.shape, dtype=v.dtype, device=self.device)
                            for v in (x_u8, flip, t)]
        for dst, src in zip(self._static, (x_u8, flip, t)):
            if dst.shape != src.shape:
                raise ValueError(f"x_u8, flip, t: a captured step needs the shapes of its "
                                 f"first call, got {tuple(src.shape)} for {tuple(dst.shape)}")
            dst.copy_(src, non_blocking=True)
        if self._warm < _GRAPH_WARMUP:
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), warnings.catch_warnings():
                # torch's advice to drop capturable=True when a step runs uncaptured:
                # these warm-up steps are meant to run so.
                warnings.filterwarnings("ignore", message=".*capturable=True")
                self._body(*self._static, 0, 0)
            torch.cuda.current_stream(self.device).wait_stream(side)
            self._warm += 1
            return
        if self._graph is None:
            self._graph = torch.cuda.CUDAGraph()
            # thread_local: the DataLoader's pin-memory thread queries CUDA events while
            # it pins the next batch, which the default ("global") mode counts as an
            # illegal call during this capture and invalidates it.
            try:
                with torch.cuda.graph(self._graph, capture_error_mode="thread_local"):
                    self._body(*self._static, 0, 0)
            except RuntimeError as e:
                self._graph = None
                m = self.model
                if getattr(m, "activation_checkpointing", False) and any(
                        isinstance(d, torch.nn.Dropout) and d.p > 0 for d in m.modules()):
                    raise RuntimeError(
                        f"cuda_graphs: the step could not be captured with activation "
                        f"checkpointing and dropout > 0, whose recomputation reads torch's "
                        f"random state, which not every torch allows inside a capture "
                        f"(torch: {e}); train without CUDA graphs (--no-cuda-graphs), or "
                        f"without one of the two") from e
                raise
        self._graph.replay()

    # ------------------------------------------------------------ bookkeeping
    def read_stats(self, all_reduce: bool = False) -> dict:
        """Means since the last read: the loss over finite losses (summed over the
        process group first when ``all_reduce``), the gradient norm over applied
        steps; and the skipped-step counters: ``longest_skipped``, the longest run of
        consecutive skipped steps since the last read. Synchronizes with the device."""
        s = self._stats.clone()
        if all_reduce:
            import torch.distributed as dist
            part = s[:2].contiguous()
            dist.all_reduce(part)
            s[:2] = part
        loss_sum, loss_n, consec, skipped, norm_sum, norm_n, longest = s.tolist()
        self._stats[[0, 1, 4, 5, 6]] = 0
        return {"loss": loss_sum / loss_n if loss_n else float("nan"),
                "grad_norm": norm_sum / norm_n if norm_n else float("nan"),
                "consecutive_skipped": int(consec), "longest_skipped": int(longest),
                "skipped_total": int(skipped)}

    def state_dict(self) -> dict:
        state = {"optimizer": self.opt.state_dict(), "stats": self._stats.cpu()}
        if self._scale is not None:
            state["loss_scale"] = torch.stack([self._scale, self._good]).cpu()
        return state

    def load_state_dict(self, state: dict, model_sd: dict, ema_sd: dict) -> None:
        self.model.load_state_dict(model_sd)
        self.ema.load_state_dict(ema_sd)
        self.opt.load_state_dict(state["optimizer"])
        # load_state_dict restores the checkpoint's group settings; this run's win (a run
        # saved without CUDA graphs resumed with them needs capturable, for one; an AdamW
        # run resumed with Adam must not keep decoupled weight decay), the learning rate
        # (the constructor's or set_lr's) included.
        for g in self.opt.param_groups:
            g.update(self._group_settings)
            g["lr"] = self._lr
        self._stats.zero_()
        self._stats[:len(state["stats"])].copy_(state["stats"])  # 6 entries before the longest
        if self._scale is not None:     # a checkpoint of another precision has none: anew
            scale, good = state.get("loss_scale", torch.tensor([_SCALE_INIT, 0.0])).tolist()
            self._scale.fill_(scale)
            self._good.fill_(good)


# ---------------------------------------------------------------------------- train()

class _Signals:
    """SIGTERM/SIGINT set a flag (checked between steps); a second SIGINT aborts.
    ``announce``: said on stderr at the first signal (a step can take minutes, its first
    compiling: the run shows it heard), None: nothing."""

    def __init__(self, announce: Optional[str] = None):
        self.received = None
        self._old = {}
        self._announce = announce

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        first = self.received is None
        self.received = signal.Signals(signum).name
        if first and self._announce:
            again = "; Ctrl-C again stops at once, unsaved" if signum == signal.SIGINT else ""
            try:           # best effort: the signal may have come inside a write to stderr
                print(f"\n{self.received}: {self._announce}{again}", file=sys.stderr,
                      flush=True)
            except (RuntimeError, OSError, ValueError):     # reentrant, closed
                pass

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


class _RunLock:
    """An exclusive lock on ``RUN_DIR/.lock`` (``fcntl.flock``, released when the process
    ends, however it ends) held while a run writes into RUN_DIR; the file holds the
    holder's pid. Another process training into RUN_DIR gets a ValueError naming it."""

    def __init__(self, out: Path):
        out.mkdir(parents=True, exist_ok=True)
        self._f = open(out / ".lock", "a+")
        self._locked = False
        if fcntl is None:            # no flock on this platform: no lock
            return
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.seek(0)
            holder = self._f.read().strip()
            self._f.close()
            raise ValueError(f"out: {out} is in use by another training process"
                             f"{f' (pid {holder})' if holder.isdigit() else ''}; wait for it "
                             f"to end, or choose another directory") from None
        except OSError as e:         # a file system without locks (ENOLCK): run unlocked
            warnings.warn(f"out: cannot lock {out / '.lock'} ({e}); nothing stops another "
                          f"process from training into {out} at the same time", stacklevel=3)
            return
        self._locked = True
        self._f.seek(0)
        self._f.truncate()
        self._f.write(f"{os.getpid()}\n")
        self._f.flush()

    def release(self) -> None:
        if fcntl is not None and self._locked:
            fcntl.flock(self._f, fcntl.LOCK_UN)
        self._f.close()


def _rows_up_to(path: Path, fields: list, start: int) -> list:
    """The rows (dicts of strings) of the CSV log ``path``, headed by ``fields``, whose step
    is at most ``start``. A row counts only when whole: a crash while it was appended
    leaves it without its newline (it may still parse, cut inside its last number), and
    rows that do not parse as numbers are dropped too. ValueError naming the file when it
    cannot be read or its header is not ``fields``."""
    try:
        lines = path.read_text().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot be read ({e}); move it away to resume") from None
    if lines[0] != ",".join(fields):
        raise ValueError(f"{path}: the header {lines[0]!r} is not {','.join(fields)!r}; the "
                         f"file is damaged or not this run's log: move it away to resume")
    rows = []
    for line in lines[1:-1]:     # lines[-1]: empty after the last newline, else torn
        cells = line.split(",")
        try:
            step, _ = int(cells[0]), [float(c) for c in cells[1:]]
        except ValueError:
            continue
        if len(cells) == len(fields) and step <= start:
            rows.append(dict(zip(fields, cells)))
    return rows


class _Log:
    """log.csv (and TensorBoard when installed) and the curves drawn from it, rank 0 only.
    On resume the rows after the resumed step are dropped (they belong to the lost part
    of the run), and so are rows that a crash left torn."""

    def __init__(self, out: Path, start: int, elapsed: Optional[float] = None):
        self.out = out
        self.path = out / "log.csv"
        self.draw_curves = True
        rows = []
        if start > 0 and self.path.is_file():
            rows = _rows_up_to(self.path, LOG_FIELDS, start)
        # elapsed_s goes on from the time the checkpoint saved (``elapsed``), or from the
        # resumed step's row for a checkpoint saved without it
        self.elapsed0 = float(elapsed) if elapsed is not None else \
            float(rows[-1]["elapsed_s"]) if rows else 0.0
        with open(self.path.with_name(".log.csv.tmp"), "w", newline="") as f:
            w = csv.DictWriter(f, LOG_FIELDS)
            w.writeheader()
            w.writerows(rows)
        os.replace(self.path.with_name(".log.csv.tmp"), self.path)
        self._f = open(self.path, "a", newline="")
        self._w = csv.DictWriter(self._f, LOG_FIELDS)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1)
        except ImportError:
            self.tb = None

    def write(self, row: dict) -> None:
        self._w.writerow(row)
        self._f.flush()
        if self.tb is not None:
            for k in ("loss", "grad_norm", "lr", "images_per_s", "nonfinite"):
                self.tb.add_scalar(k, row[k], row["step"])

    def draw(self) -> None:
        """curves.png from log.csv (and fid.csv); a failure, matplotlib missing among
        them, warns once and never stops the run."""
        if not self.draw_curves:
            return
        from . import viz
        try:
            viz.training_curves(self.out)
        except Exception as e:
            self.draw_curves = False
            warnings.warn(f"curves.png: not drawn ({type(e).__name__}: {e})", stacklevel=2)

    def close(self) -> None:
        self._f.close()
        if self.tb is not None:
            self.tb.close()


def _save_samples(ema, diff, path: Path, count: int, steps: int, pixel_range: str, target: str,
                  device, progress: bool = False, batch: Optional[int] = None):
    """A grid of ``count`` DDIM samples of the EMA weights, written to ``path``; made
    ``batch`` images at a time (None: all at once), the same grid either way (image i's
    noise sits at its own Philox offset); with ``progress``, a bar over the model calls
    (cleared when done)."""
    from tqdm import tqdm

    from . import sampling, viz

    steps = min(steps, diff.num_steps - 1)
    batch = count if batch is None else batch
    chw = diff.channels * diff.H * diff.W
    parts = [(b0, min(count, b0 + batch)) for b0 in range(0, count, batch)]
    bar = tqdm(total=len(sampling.timesteps(diff, steps)) * len(parts), disable=not progress,
               leave=False, desc=f"sample grid {path.name} ({count} images)", unit="call",
               dynamic_ncols=True)
    was_training = ema.training
    ema.eval()
    try:
        x = torch.cat([sampling.sample(diff.eps_model(ema, target), diff,
                                       (b1 - b0,) + diff.shape, sampler="ddim", steps=steps,
                                       seed=0, offset=b0 * chw, progress=False,
                                       callback=lambda *_: bar.update(1), device=device,
                                       clip=D.data_range(pixel_range))
                       for b0, b1 in parts])
    finally:
        bar.close()
        ema.train(was_training)
    ncol = max(1, int(math.sqrt(count)))
    imgs = list(D.to_unit_range(x, pixel_range).float().cpu())
    viz.save_png(viz.grid([imgs[i:i + ncol] for i in range(0, count, ncol)]), path)


def _check_run_dir(out) -> None:
    """ValueError naming ``out`` when the run directory cannot be made or written into,
    with the reason: the run's first file, ``config.json``, is probed."""
    problem = write_problem(Path(out) / "config.json")
    if problem:
        raise ValueError(f"out (--out): cannot create run directory {str(out)!r}: {problem}")


def check_resume_path(resume) -> None:
    """A ``resume`` path (not ``'auto'``) that does not exist: ValueError naming it."""
    if resume is not None and str(resume) != "auto" and not Path(resume).exists():
        raise ValueError(f"resume: {str(resume)!r} does not exist; give 'auto' (the run's "
                         f"newest valid checkpoint) or a checkpoint directory")


def train(*, data, out, preset: str = "small", resolution: int = 64, channels: int = 3,
          model: Optional[dict] = None, diffusion: Optional[dict] = None, target: str = "eps",
          batch_size: int = 16, grad_accum: int = 1, activation_checkpointing: bool = False,
          steps: int = 600_000, lr: float = 5e-5, optimizer: str = "adam",
          betas=(0.9, 0.999), weight_decay: float = 0.0, adam_eps: float = 1e-8,
          warmup: int = 0, grad_clip: Optional[float] = 1.0, ema_decay: Optional[float] = 0.9999,
          ema_halflife_kimg: Optional[float] = None, flip: bool = True,
          pixel_range: str = "-1,1", resize: str = D.DEFAULT_RESIZE, seed: int = 0,
          device: Optional[str] = None, precision: Optional[str] = None,
          channels_last: Optional[bool] = None, tf32: bool = True, compile: Optional[bool] = None,
          cuda_graphs: Optional[bool] = None, num_workers: Optional[int] = None,
          log_every: int = 100,
          save_every: int = 5000, keep: int = 3, sample_every: int = 10_000,
          sample_count: Optional[int] = None, sample_steps: Optional[int] = None,
          resume: Optional[str] = None,
          max_nonfinite: int = 100, fid_every: Optional[int] = None, fid_ref=None,
          fid_n: int = 1000, fid_steps: int = 100, inception: Optional[str] = None,
          progress: bool = True) -> dict:
    """Trains a U-Net on blur diffusion; see docs/training.md for every argument.

    ``data``: a ``.npy`` from :func:`blurfast.data.prepare`, an LSUN lmdb directory
    or an image folder. ``out``: the run directory (``config.json``, ``log.csv``,
    ``checkpoints/``, ``samples/``). ``batch_size`` is per process; under torchrun
    the global batch is ``batch_size * WORLD_SIZE``; ``grad_accum`` (a divisor of it) runs
    each process's batch in that many rounds, the gradients added (see
    :class:`TrainStep`); ``activation_checkpointing`` recomputes each residual level's
    activations in the backward instead of keeping them (:attr:`UNet.activation_checkpointing`:
    less memory, the same numbers). ``steps``: the step to stop at
    (a resumed run continues up to it). ``resume``: None (start fresh; the run
    directory must hold no checkpoint), ``"auto"`` (the newest valid checkpoint of
    ``out``, else start fresh) or a checkpoint directory.

    ``fid_every``: every that many steps (and at the end), FID of ``fid_n`` EMA samples
    (DDIM, ``fid_steps`` calls) against ``fid_ref`` (see :func:`blurfast.evaluation.fid`),
    logged to ``fid.csv``; the best so far is kept as ``RUN_DIR/best/``.

    Returns a dict: ``step``, ``steps_run`` (steps this call trained), ``loss`` (mean of
    the last log interval), ``skipped`` (non-finite steps), ``checkpoint`` (path of the
    last save), ``stopped_by`` (None or the signal's name), ``model`` and ``ema``
    (modules). A run resumed at its final step (``steps`` equal to the checkpoint's)
    trains nothing and says so: ``steps_run`` 0, ``loss`` nan, ``checkpoint`` the one
    resumed, and the modules hold its weights.
    """
    args = dict(locals())
    # ---------------------------------------------------------------- arguments
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    # checked ints (numpy's too) go into args as Python ints: the config is written as JSON
    resolution = args["resolution"] = check_int("resolution", resolution)
    args["channels"] = check_int("channels", channels)
    batch_size = args["batch_size"] = check_int("batch_size", batch_size)
    grad_accum = args["grad_accum"] = check_int("grad_accum", grad_accum)
    if batch_size % grad_accum:
        raise ValueError(f"grad_accum: {grad_accum} rounds do not divide batch_size "
                         f"{batch_size}; give a divisor of it")
    steps = args["steps"] = check_int("steps", steps)
    # check_number returns numpy scalars as Python numbers: the config is written as JSON
    args["lr"] = check_number("lr", lr, 0, lo_open=True)
    if not (isinstance(betas, (list, tuple)) and len(betas) == 2):
        raise ValueError(f"betas: expected two numbers, got {betas!r}")
    args["betas"] = [check_number("betas", b, 0, hi=1, hi_open=True) for b in betas]
    args["weight_decay"] = check_number("weight_decay", weight_decay, 0)
    args["adam_eps"] = check_number("adam_eps", adam_eps, 0, lo_open=True)
    args["warmup"] = check_int("warmup", warmup, 0)
    # TrainStep reads it (None: no clipping); 0, which TrainStep also takes for none, is
    # refused here: a run turns clipping off with None alone (--grad-clip none)
    args["grad_clip"] = check_number("grad_clip", grad_clip, 0, lo_open=True, none_ok=True)
    if (ema_decay is None) == (ema_halflife_kimg is None):
        raise ValueError(f"ema_decay, ema_halflife_kimg: give exactly one, the other None; got "
                         f"{ema_decay!r} and {ema_halflife_kimg!r} (ema_decay is 0.9999 unless "
                         f"given: pass ema_decay=None with ema_halflife_kimg)")
    args["ema_decay"] = check_number("ema_decay", ema_decay, 0, hi=1, hi_open=True,
                                     none_ok=True)
    args["ema_halflife_kimg"] = check_number("ema_halflife_kimg", ema_halflife_kimg, 0,
                                             lo_open=True, none_ok=True)
    for name in ("flip", "tf32", "progress", "activation_checkpointing"):
        check_bool(name, args[name])
    for name in ("channels_last", "cuda_graphs", "compile"):
        if args[name] is not None and not isinstance(args[name], bool):
            raise TypeError(f"{name}: expected a bool or None, got {args[name]!r}")
    if precision not in (None, *PRECISIONS):
        raise ValueError(f"precision: expected one of {PRECISIONS} or None, got {precision!r}")
    if num_workers is not None:
        args["num_workers"] = check_int("num_workers", num_workers, 0)
    for name in ("log_every", "save_every", "keep", "sample_every", "sample_count",
                 "sample_steps", "max_nonfinite"):
        if args[name] is not None or name not in ("sample_count", "sample_steps"):
            args[name] = check_int(name, args[name])
    # < 2**32: derive_seed keeps (seed, step, tag) tuples apart only below it
    seed = args["seed"] = check_int("seed", seed, 0, 2 ** 32 - 1)
    # resize now, whatever the data: a folder fid_ref would read it only at the first FID
    D.check_resize(resize)
    if fid_every is not None:
        args["fid_every"] = check_int("fid_every", fid_every)
        args["fid_n"] = check_int("fid_n", fid_n, 2)
        args["fid_steps"] = check_int("fid_steps", fid_steps)
        if fid_ref is None:
            raise ValueError("fid_ref (--fid-ref): needed with fid_every (--fid-every): "
                             "reference data or STATS.npz")
    elif fid_ref is not None:
        raise ValueError("fid_ref (--fid-ref): given without fid_every (--fid-every), so no "
                         "FID would be scored; give fid_every too, or leave fid_ref out")
    if fid_ref is not None:
        if not isinstance(fid_ref, (str, os.PathLike)):
            raise TypeError(f"fid_ref: expected a path, got {fid_ref!r}")
        if not Path(fid_ref).exists():
            raise ValueError(f"fid_ref (--fid-ref): {str(fid_ref)!r} does not exist")
    for name in ("data", "out"):
        if not isinstance(args[name], (str, os.PathLike)):
            raise TypeError(f"{name}: expected a path, got {args[name]!r}")
    if model is not None and not isinstance(model, dict):
        raise TypeError(f"model: expected a dict of UNet arguments, got {type(model).__name__}")
    if diffusion is not None and not isinstance(diffusion, dict):
        raise TypeError(f"diffusion: expected a dict of BlurDiffusion arguments, got "
                        f"{type(diffusion).__name__}")
    for name, given, cls in (("model", model, UNet), ("diffusion", diffusion, BlurDiffusion)):
        unknown = sorted(set(given or {}) - set(inspect.signature(cls).parameters))
        if unknown:
            raise TypeError(f"{name}: unknown {cls.__name__} arguments {unknown}")
    if resume is not None and not isinstance(resume, (str, os.PathLike)):
        raise TypeError(f"resume: expected None, 'auto' or a path, got {resume!r}")
    check_resume_path(resume)
    _check_run_dir(out)
    # a saved config's model and diffusion hold the image size too: the same, or an error
    size = {"resolution": resolution, "channels": channels}
    for name, given in (("model", model), ("diffusion", diffusion)):
        for k in size:
            if given and k in given and given[k] != size[k]:
                raise ValueError(f"{name}: its {k} {given[k]!r} differs from {k}={size[k]!r}")
    diff = BlurDiffusion(**{**(diffusion or {}), **size})
    torch.manual_seed(seed)                  # the same initial weights on every rank
    net = UNet.from_preset(preset, **{**(model or {}), **size})
    net.activation_checkpointing = activation_checkpointing

    # ---------------------------------------------------------------- devices
    rank, world, dev, owns_group = setup_processes(device)
    cuda = dev.type == "cuda"
    finished = False
    # SIGTERM/SIGINT caught until the process group's end: a signal stops the ranks at a
    # log point (_run) or, after the last one, at their last meeting below; it never kills
    # a rank while its peers wait for it.
    said = None if rank != 0 else ("stopping after this step, which is saved" if world == 1
                                   else "stopping at the next log step, which is saved")
    with _Signals(said) as sig:
        try:
            precision = precision or default_precision(dev)
            # Off by default: on an H100 (paper64, batch 16, bf16, CUDA graph) channels_last
            # took 49.0 ms per step against 41.7 in NCHW (GroupNorm's layout copies);
            # benchmarks/results/logs/2026-11-26-v4-profile_step.txt.
            channels_last = bool(channels_last)
            # On by default on one GPU: on an H100 (paper64, batch 16, bf16, channels_last) a
            # step took 49.0 ms captured against 90.0 eager (the same log). Asked for under
            # torchrun, the gradients are all-reduced in the graph (TrainStep's ddp="flat"):
            # not yet run on several GPUs, so not the default there.
            if cuda_graphs is None:
                cuda_graphs = cuda and world == 1
            # On by default on one GPU: on an H100 (paper64, batch 16, bf16, CUDA graph) a step
            # took 24.2 ms compiled against 38.0 without (benchmarks/results, run v6); compiling
            # takes minutes, once per run. Not timed under torchrun.
            why_not = compile_problem(dev) if compile is not False else None
            if compile and why_not:
                raise ValueError(f"compile: {why_not}; train without it (compile=False, "
                                 f"--no-compile)")
            if compile is None:
                compile = cuda and world == 1 and why_not is None
                if cuda and world == 1 and why_not and rank == 0:
                    print(f"compile: off ({why_not})", flush=True)
            if cuda and tf32:
                b = torch.backends
                b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark = BACKEND_FLAGS
            # The grids' defaults per device, saved as resolved (a resumed run keeps them):
            # on a 2-core CPU one grid of 64 images x 100 steps took over 10 minutes.
            grid = SAMPLE_GRID_CPU if dev.type == "cpu" else SAMPLE_GRID
            for name, default in zip(("sample_count", "sample_steps"), grid):
                if args[name] is None:
                    args[name] = default
            global_batch = batch_size * world
            config = {k: v for k, v in args.items() if k not in ("progress",)}
            config.update(data=str(data), out=str(out),
                          resume=None if resume is None else str(resume),
                          fid_ref=None if fid_ref is None else str(fid_ref),
                          precision=precision, channels_last=channels_last,
                          cuda_graphs=cuda_graphs, compile=compile,
                          model=net.config, diffusion=diff.config, world_size=world,
                          global_batch=global_batch, device=str(dev.type))
            config = json.loads(json.dumps(config))    # plain JSON types, as stored
            result = _run(config, net, diff, rank, world, dev, progress, sig)
            # A signal since the last log point (rank 0 saved and drew the last step while
            # the others waited): the run is saved; every rank ends as a signalled run does.
            # The handler runs once a collective returns: the barrier's wait counts.
            if world > 1:
                barrier()
            signalled = sig.received is not None
            late = any_rank(signalled, dev) if world > 1 else signalled
            if late and result["stopped_by"] is None:
                result["stopped_by"] = sig.received or "signal on another rank"
                if rank == 0:
                    print(f"{result['stopped_by']} after the last step: saved "
                          f"{result['checkpoint']}", flush=True)
            finished = True
            return result
        finally:
            teardown_processes(owns_group, finished)


class _FidLog:
    """``fid.csv`` (step, fid, kid): appended line by line; on resume cut as log.csv is (to
    the resumed step, torn rows dropped), the best FID of the rows kept going on. A log
    of an older run (step, fid) gets the kid column, nan in its rows. A non-finite FID is
    logged but never the best."""

    def __init__(self, path: Path, start: int, best_dir: Optional[Path] = None,
                 ck_dir: Optional[Path] = None):
        # best_dir, ck_dir: the run's best/ and checkpoints/, which _settle_best makes
        # agree with the rows kept; None: the best of the rows alone.
        self.path = path
        rows = []
        if start > 0 and path.is_file():
            old = path.read_text().startswith("step,fid\n")
            rows = _rows_up_to(path, FID_FIELDS[:2] if old else FID_FIELDS, start)
        lines = [",".join(FID_FIELDS)] + [f"{r['step']},{r['fid']},{r.get('kid', 'nan')}"
                                          for r in rows]
        write_text(path, "".join(line + "\n" for line in lines))
        self.best = (min((v for v in (float(r["fid"]) for r in rows) if math.isfinite(v)),
                         default=float("inf")) if best_dir is None
                     else _settle_best(best_dir, ck_dir, rows))

    def add(self, step: int, value: float, kid: Optional[float] = None) -> bool:
        with open(self.path, "a") as f:
            f.write(f"{step},{value:.6g},{math.nan if kid is None else kid:.6g}\n")
        if math.isfinite(value) and value < self.best:
            self.best = value
            return True
        return False


# train()'s default (sample_count, sample_steps) of the sample grids: on a CPU, and elsewhere.
SAMPLE_GRID_CPU = (16, 25)
SAMPLE_GRID = (64, 100)


# What a checkpoint's weights mean: a resumed run may not change these (the image size
# and channels are the model's and the diffusion's entries; pixel_range, the data range
# the model was trained to predict and its samples are read back from).
FIXED_ON_RESUME = ("model", "diffusion", "target", "pixel_range")


def _settle_best(best_dir: Path, ck_dir: Path, rows: list) -> float:
    """Makes ``best_dir`` hold the checkpoint of the lowest finite FID of ``rows`` (the
    fid.csv rows a run starts or resumes with; the earliest step of equal ones, as
    _FidLog.add keeps it) and returns that FID. A checkpoint there of another step (of
    steps a resume cut, or one a later best replaced) is removed; the best step's is
    copied from ``ck_dir`` where ``best_dir`` lacks it (a run killed between the FID's row
    and its save). Where neither holds it, the best is the lowest logged FID of a step
    ``best_dir`` holds, with a warning; inf where there is none (the next FID is the
    best)."""
    fids = {}
    for r in rows:
        v = float(r["fid"])
        if math.isfinite(v) and int(r["step"]) not in fids:
            fids[int(r["step"])] = v
    ranked = sorted(fids, key=lambda s: (fids[s], s))
    held = {}
    for s, p in ckpt.list_checkpoints(best_dir):
        try:
            ckpt.verify(p)
            held[s] = p
        except ckpt.CheckpointError:
            shutil.rmtree(p, ignore_errors=True)          # no use: not loadable
    keep = ranked[0] if ranked and ranked[0] in held else None
    if ranked and keep is None:
        src = dict((s, p) for s, p in ckpt.list_checkpoints(ck_dir)).get(ranked[0])
        try:
            if src is not None:
                held[ranked[0]] = ckpt.copy(src, best_dir)
                keep = ranked[0]
        except ckpt.CheckpointError:
            pass
        if keep is None:
            keep = next((s for s in ranked if s in held), None)
            warnings.warn(f"fid: the checkpoint of the best FID's step {ranked[0]} "
                          f"({fids[ranked[0]]:.6g}) is lost (the run stopped before saving "
                          f"it to {best_dir}); the best is now " +
                          ("none (the next FID)" if keep is None else
                           f"step {keep} ({fids[keep]:.6g}), the best step kept there"),
                          stacklevel=4)
    for s, p in held.items():
        if s != keep:
            shutil.rmtree(p, ignore_errors=True)
    return float("inf") if keep is None else fids[keep]


def _fixed_differences(old: dict, new: dict, defaults: Optional[dict] = None) -> list:
    """``(key, old value, new value)`` for each entry of :data:`FIXED_ON_RESUME` that
    differs between a checkpoint's config ``old`` and a run's ``new``; nested entries as
    ``model.base_channels``. ``defaults``: the values of keys ``old`` lacks (saved by a
    version without them)."""
    found = []
    for k in FIXED_ON_RESUME:
        a, b = old.get(k, (defaults or {}).get(k)), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            found += [(f"{k}.{e}", a.get(e), b.get(e)) for e in sorted(set(a) | set(b))
                      if a.get(e) != b.get(e)]
        elif a != b:
            found.append((k, a, b))
    return found


def sampling_batch(cfg: dict) -> int:
    """Images per batch of what a run samples (its grids, its FID): 4 x a step's round
    (sampling keeps no activations for a backward pass), so --grad-accum shrinks it too.
    Each image's noise is its own (Philox offsets by index): the batch changes no image."""
    return max(1, 4 * cfg["batch_size"] // cfg.get("grad_accum", 1))


def _images_done(state: dict) -> int:
    """The examples a run had consumed by a checkpoint's step: its ``images``; for a
    checkpoint saved before that was stored, the step times its run's global batch
    (right unless an earlier resume changed the global batch)."""
    if "images" in state:
        return int(state["images"])
    return int(state["step"]) * int(state["config"]["global_batch"])


def _run(cfg: dict, net: UNet, diff: BlurDiffusion, rank: int, world: int, dev,
         progress: bool, sig: "_Signals") -> dict:
    cuda = dev.type == "cuda"
    main = rank == 0
    out = Path(cfg["out"])
    ck_dir = out / "checkpoints"

    # ------------------------------------------------------------ resume
    state = None
    if cfg["resume"] is None:
        if ckpt.list_checkpoints(ck_dir):
            raise ValueError(f"out: {out} already holds checkpoints; pass resume='auto' "
                             f"(--resume auto) to continue that run, or choose another "
                             f"directory")
    elif cfg["resume"] == "auto" and world > 1:
        # Rank 0 picks and every rank loads its pick: a run that saved while the ranks
        # started would otherwise give them different weights and steps.
        state = ckpt.latest_valid(ck_dir) if main else None
        found = from_rank0(None if state is None else state["path"])
        if not main and found is not None:
            state = ckpt.load(found)
    elif cfg["resume"] == "auto":
        state = ckpt.latest_valid(ck_dir)
    else:
        state = ckpt.load(cfg["resume"])
    if state is not None:
        old = state["config"]
        # A key the checkpoint's version did not save had its default then.
        defaults = {k: v.default for k, v in inspect.signature(train).parameters.items()}
        fixed = _fixed_differences(old, cfg, defaults)
        if fixed:
            raise ValueError(
                "resume: " + "; ".join(f"{k} {new!r} differs from the checkpoint's {was!r}"
                                       for k, was, new in fixed) +
                f" ({state['path']}); a resumed run keeps the checkpoint's model (its "
                f"resolution and channels), diffusion, target and pixel_range: leave these "
                f"as they were, or train into a new directory")
        was = {k: old.get(k, defaults.get(k)) for k in cfg}
        changed = sorted(k for k in cfg if k not in ("resume", "steps", "out") and
                         was[k] != cfg[k])
        if changed and main:
            warnings.warn("resume: settings changed since the checkpoint: " +
                          ", ".join(f"{k} {was[k]!r} -> {cfg[k]!r}" for k in changed),
                          stacklevel=3)
    start = 0 if state is None else int(state["step"])
    # Examples consumed before step `start`: the data order and log.csv's images go on
    # from it (a resume may change the global batch).
    images0 = 0 if state is None else _images_done(state)
    if start > cfg["steps"]:
        raise ValueError(f"steps: {cfg['steps']} is below the resumed step {start} "
                         f"({state['path']}); give {start} or more")
    if start == cfg["steps"]:
        if main:
            print(f"{out}: already at its final step {start} ({state['path']}); nothing to "
                  f"train (raise steps, --steps, to go on)", flush=True)
        net.load_state_dict(state["model"])
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        ema.load_state_dict(state["ema"])
        return {"step": start, "steps_run": 0, "loss": float("nan"),
                "skipped": int(state["stats"][3]), "checkpoint": str(state["path"]),
                "stopped_by": None, "model": net.to(dev), "ema": ema.to(dev)}
    dataset = D.open_dataset(cfg["data"], cfg["resolution"], cfg["resize"], cfg["channels"],
                             progress=main and progress, arg="data (--data)")
    prepared = dataset.resize if isinstance(dataset, D.PreparedArray) else None
    if main and prepared not in (None, cfg["resize"]):
        warnings.warn(f"resize: {cfg['data']} was prepared with --resize {prepared}, this run "
                      f"has {cfg['resize']}, with which fid_ref (--fid-ref) and `blurfast draw` "
                      f"read folders and lmdb; give resize (--resize) {prepared}", stacklevel=2)

    if cfg["ema_decay"] is not None:
        ema_beta = cfg["ema_decay"]
    else:
        ema_beta = 0.5 ** (cfg["global_batch"] / (cfg["ema_halflife_kimg"] * 1000))
    stepper = TrainStep(net, diff, device=dev, target=cfg["target"], lr=cfg["lr"],
                        optimizer=cfg["optimizer"], betas=cfg["betas"],
                        weight_decay=cfg["weight_decay"], adam_eps=cfg["adam_eps"],
                        grad_clip=cfg["grad_clip"], ema_beta=ema_beta,
                        precision=cfg["precision"], channels_last=cfg["channels_last"],
                        compile=cfg["compile"], cuda_graphs=cfg["cuda_graphs"],
                        flip=cfg["flip"], pixel_range=cfg["pixel_range"], ddp=world > 1,
                        grad_accum=cfg.get("grad_accum", 1))
    if state is not None:
        stepper.load_state_dict(state, state["model"], state["ema"])
        if main:
            print(f"resuming from {state['path']} (step {start})", flush=True)

    fid = None          # set up before anything is written: a failure leaves no run behind
    if main and cfg.get("fid_every"):
        from .evaluation import FidMonitor
        fid = FidMonitor(cfg["fid_ref"], resolution=cfg["resolution"], resize=cfg["resize"],
                         channels=cfg["channels"],
                         n=cfg["fid_n"], steps=cfg["fid_steps"], batch=sampling_batch(cfg),
                         pixel_range=cfg["pixel_range"], inception=cfg["inception"], device=dev)

    workers = cfg["num_workers"]
    if workers is None:
        workers = min(4, os.cpu_count() or 1) if cuda else 0
    sampler = StepBatches(len(dataset), cfg["global_batch"], cfg["batch_size"], rank,
                          cfg["seed"], start, cfg["steps"], images=images0)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers,
                                         collate_fn=_collate, pin_memory=cuda,
                                         worker_init_fn=_ignore_stop_signals if workers else None,
                                         prefetch_factor=4 if workers else None)
    noise_offset = rank * cfg["batch_size"] * int(np.prod(diff.shape))

    def lr_at(step):
        return cfg["lr"] * min(1.0, (step + 1) / cfg["warmup"]) if cfg["warmup"] else cfg["lr"]

    def images_at(step):
        return images0 + (step - start) * cfg["global_batch"]

    def state_at(step):
        # No generator states: every random stream is a function of (config seed, step)
        # and the data order of the examples consumed. elapsed_s: the wall time so far (rank
        # 0 saves), for a run stopped between log rows to go on from it.
        extra = {} if log is None else {"elapsed_s": log.elapsed0 + time.perf_counter() - t0}
        return {**stepper.state_dict(), "images": images_at(step), **extra}

    def save(step):
        return ckpt.save(ck_dir, step, stepper.model, stepper.ema, state_at(step), cfg,
                         keep=cfg["keep"])

    lock = _RunLock(out) if main else None      # before the first write into RUN_DIR
    bar = log = None
    try:
        if main:
            (out / "samples").mkdir(parents=True, exist_ok=True)
            ck_dir.mkdir(parents=True, exist_ok=True)
            text = json.dumps(cfg, indent=2)
            write_text(out / "config.json", text + "\n")
            if progress:
                print(f"config (saved to {out / 'config.json'}):\n{text}", flush=True)
                if cfg["compile"] and start < cfg["steps"]:
                    print("compile: the first steps compile the model (minutes for paper64 "
                          "on a GPU); the bar moves once that is done", flush=True)
            log = _Log(out, start, None if state is None else state.get("elapsed_s"))
        if fid is not None:
            fid_log = _FidLog(out / "fid.csv", start, out / "best", ck_dir)
        # progress: a bar on a terminal; elsewhere (a batch job's log file, where a bar's
        # redraws pile up) a line per log row
        lines = main and progress and not on_terminal()
        if main and progress and not lines:
            from tqdm import tqdm
            bar = tqdm(total=cfg["steps"], initial=start, desc="train", unit="step",
                       dynamic_ncols=True)
        step, last_path, last = start, None, {"loss": float("nan"), "skipped_total": 0}
        t_log, step_log = time.perf_counter(), start
        t0 = t_log
        paused = 0.0         # seconds of FID and sample grids since the last log row
        stopped_by = None
        for batch in loader:
            t, flip, noise_seed = step_draws(cfg["seed"], step, cfg["global_batch"],
                                             diff.num_steps, rank, cfg["batch_size"])
            torch.manual_seed(derive_seed(cfg["seed"], step, 3, rank))   # dropout
            stepper.set_lr(lr_at(step))
            try:
                stepper(batch, flip, t, noise_seed, noise_offset)
            except torch.cuda.OutOfMemoryError as e:
                e.in_train_step = True     # blurfast train's advice: --grad-accum
                raise
            step += 1
            if bar is not None:
                bar.update(1)
            at_log = step % cfg["log_every"] == 0 or step == cfg["steps"]
            stop_now = False
            if at_log:
                last = stepper.read_stats(all_reduce=world > 1)
                now = time.perf_counter()
                ips = ((step - step_log) * cfg["global_batch"] /
                       max(now - t_log - paused, 1e-9))       # training alone
                t_log, step_log, paused = now, step, 0.0
                if main:
                    row = {"step": step, "images": images_at(step),
                           "loss": f"{last['loss']:.6g}",
                           "grad_norm": f"{last['grad_norm']:.6g}",
                           "lr": f"{lr_at(step - 1):.6g}",
                           "nonfinite": last["skipped_total"],
                           "images_per_s": f"{ips:.1f}",
                           "elapsed_s": f"{log.elapsed0 + now - t0:.1f}"}
                    log.write(row)
                    if bar is not None:       # the log's rate (was rounded to 0 below 0.5)
                        bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=row["images_per_s"],
                                        skipped=last["skipped_total"])
                    elif lines:
                        print(f"step {step}/{cfg['steps']}: loss {last['loss']:.4f}, "
                              f"{row['images_per_s']} images/s, skipped "
                              f"{last['skipped_total']}, {row['elapsed_s']} s", flush=True)
                if last["longest_skipped"] >= cfg["max_nonfinite"]:
                    raise NonFiniteError(
                        f"the loss or gradient was non-finite in "
                        f"{last['longest_skipped']} consecutive steps (by step {step}); "
                        f"stopping. Lower lr, check the data, or resume from an earlier "
                        f"checkpoint in {ck_dir}")
            if world > 1:
                if at_log:           # every rank stops at the same step
                    stop_now = any_rank(sig.received is not None, dev)
            else:
                stop_now = sig.received is not None
            if main and (step % cfg["save_every"] == 0 or step == cfg["steps"] or stop_now):
                last_path = save(step)
            at_fid = fid is not None and (step % cfg["fid_every"] == 0 or
                                          step == cfg["steps"])
            at_grid = main and (step % cfg["sample_every"] == 0 or step == cfg["steps"])
            at_draw = at_grid or (main and stop_now)
            t_eval = time.perf_counter()
            if at_fid:
                value = fid(diff.eps_model(stepper.ema, cfg["target"]), diff,
                            progress=bar is not None)
                kid = getattr(value, "kid", None)
                if fid_log.add(step, value, kid):          # the best FID so far
                    ckpt.save(out / "best", step, stepper.model, stepper.ema,
                              state_at(step), cfg, keep=1)
                if bar is not None or lines:
                    said = "" if kid is None or math.isnan(kid) else f", KID {kid:.5f}"
                    (bar.write if bar is not None else print)(
                        f"step {step}: FID {value:.3f} (best {fid_log.best:.3f}){said}")
            if at_grid:
                _save_samples(stepper.ema, diff, out / "samples" / f"step_{step:09d}.png",
                              cfg["sample_count"], cfg["sample_steps"], cfg["pixel_range"],
                              cfg["target"], dev, progress=bar is not None,
                              batch=sampling_batch(cfg))
            if at_draw:
                log.draw()
            if at_fid or at_draw:
                paused += time.perf_counter() - t_eval
                if bar is not None:
                    bar.unpause()     # the step bar's rate: training steps alone
            if stop_now:
                stopped_by = sig.received or "signal on another rank"
                if main:
                    print(f"\n{stopped_by}: saved {last_path}; continue with "
                          f"resume='auto' (blurfast train --out {out} --resume auto)",
                          flush=True)
                break
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        if lock is not None:
            lock.release()
    return {"step": step, "steps_run": step - start, "loss": last["loss"],
            "skipped": last["skipped_total"],
            "checkpoint": None if last_path is None else str(last_path),
            "stopped_by": stopped_by, "model": stepper.model, "ema": stepper.ema}
