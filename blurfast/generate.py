"""``blurfast sample``: many images from a trained run, reproducible across process counts.

Image ``i`` of a run draws all its noise (the prior and every sampler step) at Philox
positions fixed by ``(seed, i)``: its batch starts at ``offset = first_index * C*H*W``.
Batches of ``batch`` consecutive indices are dealt to ranks round-robin, so one process
and N processes under torchrun compute exactly the same batches.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import checkpoint as ckpt
from . import viz
from .checks import check_bool, check_int
from .data import data_range, to_unit_range
from .fileio import save_npz, write_text
from .sampling import SAMPLERS, STEP_OFFSET, check_eta, clip_x0, timesteps

__all__ = ["resolve_checkpoint", "generate", "sample_batches", "GraphedModel",
           "read_manifest"]

SHEET_NAME = "contact_sheet.png"
NPZ_NAME = "samples.npz"
# Written first with "complete": false, rewritten last with true: a folder whose run was
# interrupted (or is still running) says so.
MANIFEST_NAME = "samples.json"
MADE_BY = "blurfast sample"


def resolve_checkpoint(path) -> Path:
    """A run directory (its newest valid checkpoint), a checkpoint directory, or a
    ``.safetensors`` file."""
    p = Path(path)
    if (p / "checkpoints").is_dir():
        for _, c in ckpt.list_checkpoints(p / "checkpoints"):
            try:
                ckpt.verify(c)
                return c
            except ckpt.CheckpointError as e:
                warnings.warn(f"skipping a damaged checkpoint: {e}", stacklevel=2)
        raise ValueError(f"ckpt: no valid checkpoint under {p / 'checkpoints'}")
    if not p.exists():
        raise ValueError(f"ckpt: {str(path)!r} does not exist")
    return p


class GraphedModel:
    """``model(x, t)`` replayed from a CUDA graph captured on the first call of each shape
    (and dtype, device, autocast and grad mode).

    Under autocast the warm-up and the capture run with autocast's weight cache off, so
    the graph casts the weights itself: a cached cast would belong to the caller's
    autocast region, whose end frees it while the graph still reads it."""

    def __init__(self, model):
        self.model = model
        self.graphs = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.cuda.device(x.device):       # capture and replay on x's GPU
            return self._call(x, t)

    def _call(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dev = x.device.type
        amp = torch.is_autocast_enabled(dev)
        amp_dtype = torch.get_autocast_dtype(dev) if amp else None
        key = (tuple(x.shape), x.dtype, x.device, amp_dtype, torch.is_grad_enabled())
        if key not in self.graphs:
            sx, st = x.clone(), t.clone()
            def uncached():
                return (torch.autocast(dev, dtype=amp_dtype, cache_enabled=False) if amp
                        else contextlib.nullcontext())
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), uncached():
                for _ in range(2):                      # warm-up outside the graph
                    self.model(sx, st)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, capture_error_mode="thread_local"), uncached():
                out = self.model(sx, st)
            self.graphs[key] = (g, sx, st, out)
        g, sx, st, out = self.graphs[key]
        sx.copy_(x)
        st.copy_(t)
        g.replay()
        return out.clone()


def _images_uint8(x: torch.Tensor, pixel_range: str) -> np.ndarray:
    return np.stack([viz.to_uint8(xi) for xi in to_unit_range(x, pixel_range)])


def sample_batches(model, diff, batches, *, sampler: str, seq, eta, seed: int, device,
                   precision: str, pixel_range: str, clip: bool = True, on_step=None):
    """Yields ``(first_index, uint8 images (b, H, W, C))`` for each index range
    ``(b0, b1)`` of ``batches``; image i's noise sits at Philox offset ``i * C*H*W``.
    ``clip``: clamp the model's x0 estimate to the data range; ``on_step()``: called
    after each model call (one per sampler step)."""
    if clip:
        model = clip_x0(model, diff, *data_range(pixel_range))
    if on_step is not None:
        inner = model

        def model(x, t):
            out = inner(x, t)
            on_step()
            return out
    chw = diff.channels * diff.H * diff.W
    autocast = (torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
                if precision == "bf16"
                else contextlib.nullcontext())
    for b0, b1 in batches:
        offset = b0 * chw
        x = diff.prior_sample((b1 - b0,) + diff.shape, seq[0], seed=seed, offset=offset,
                              device=device)
        with torch.no_grad(), autocast:
            x = SAMPLERS[sampler](model, diff, x, seq, eta=eta, seed=seed, offset=offset,
                                  progress=False)
        yield b0, _images_uint8(x.float(), pixel_range)


def generate(ckpt_path, n: int, out, sampler: str = "ddim", steps: Optional[int] = 100,
             eta=0.0, spacing="uniform", batch: int = 256, seed: int = 0,
             fmt: str = "png", device: Optional[str] = None, ema: bool = True,
             precision: Optional[str] = None, cuda_graph: bool = False, compile: bool = False,
             clip: bool = True, progress: bool = True) -> Path:
    """Samples ``n`` images into ``out`` (PNG files ``NNNNNN.png`` or ``samples.npz`` with
    uint8 ``images`` (N, H, W, C)) plus ``contact_sheet.png``; returns ``out``.
    ``samples.json``, written before the first image with ``"complete": false`` and
    rewritten last with ``true``, records the count, seed, sampler and checkpoint:
    ``fid`` refuses an unfinished folder, and more images than it holds.

    ``eta``: a number or one per step (ddim and exp2m); ``steps=None`` runs the full
    chain; ``precision`` ``bf16`` (default on CUDA) or ``fp32``; ``cuda_graph`` replays
    the model call of each step from a CUDA graph; ``compile`` runs the model under
    ``torch.compile`` (one compilation per batch size, inside the graph when both are
    set); ``clip`` clamps the model's x0 estimate to the data range (default on).
    Under torchrun every rank computes its share and rank 0 writes the sheet and the
    manifest.
    """
    from tqdm.auto import tqdm

    from .distributed import barrier, setup_processes, teardown_processes

    for name, v, lo in (("n", n, 1), ("batch", batch, 1), ("seed", seed, 0)):
        check_int(name, v, lo)
    if fmt not in ("png", "npz"):
        raise ValueError(f"fmt: expected 'png' or 'npz', got {fmt!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {tuple(SAMPLERS)}, got {sampler!r}")
    check_eta(sampler, eta)
    for name, v in (("ema", ema), ("cuda_graph", cuda_graph), ("compile", compile),
                    ("clip", clip), ("progress", progress)):
        check_bool(name, v)
    if precision not in (None, "bf16", "fp32"):
        raise ValueError(f"precision: expected 'bf16', 'fp32' or None, got {precision!r}")
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"out (--out): {str(out)!r} is a file; expected a folder for the "
                         f"images (made if missing)")
    path = resolve_checkpoint(ckpt_path)
    rank, world, dev, owns_group = setup_processes(device)
    finished = False
    try:
        model, diff, config = ckpt.load_model(path, ema=ema, device=dev)
        pixel_range = config.get("pixel_range", "-1,1")
        chw = diff.channels * diff.H * diff.W
        if n * chw >= STEP_OFFSET:
            raise ValueError(f"n: at most {STEP_OFFSET // chw - 1} images of this size, got {n}")
        if cuda_graph and dev.type != "cuda":
            raise ValueError("cuda_graph: needs device cuda")
        precision = precision or ("bf16" if dev.type == "cuda" else "fp32")
        net = torch.compile(model, dynamic=False) if compile else model
        net = GraphedModel(net) if cuda_graph else net
        # Samplers call eps; a std or score model's output is converted after the network
        # (outside its graph or compilation).
        net = diff.eps_model(net, config.get("target", "eps"))
        seq = timesteps(diff, steps if isinstance(spacing, str) else None, spacing)
        check_eta(sampler, eta, steps=len(seq))
        out = Path(out)
        all_batches = [(b0, min(n, b0 + batch)) for b0 in range(0, n, batch)]
        manifest = {"made_by": MADE_BY, "complete": False, "format": fmt, "n": n, "seed": seed,
                    "sampler": sampler, "steps": len(seq), "checkpoint": str(path.resolve())}
        if rank == 0:
            _start(out, fmt, n, manifest)
        if world > 1:
            barrier()                   # the previous run's files are gone
        batches = all_batches[rank::world]
        mine = sum(b1 - b0 for b0, b1 in batches)
        kept = []
        # One tick per model call: the bar moves within a batch (a full chain is long).
        bar = tqdm(total=len(batches) * len(seq), unit="step", disable=not progress
                   or rank != 0, desc=f"{sampler} {len(seq)} steps x {len(batches)} batches")
        done, t0 = 0, time.perf_counter()
        for b0, imgs in sample_batches(net, diff, batches, sampler=sampler, seq=seq, eta=eta,
                                       seed=seed, device=dev, precision=precision,
                                       pixel_range=pixel_range, clip=clip,
                                       on_step=lambda: bar.update(1)):
            if fmt == "png":
                for i, img in enumerate(imgs):
                    viz.save_png(img, out / f"{b0 + i:06d}.png")
            else:
                kept.append((b0, imgs))
            done += len(imgs)
            bar.set_postfix(images=f"{done}/{mine}",
                            img_per_s=f"{done / (time.perf_counter() - t0):.2f}")
        bar.close()
        if fmt == "npz":
            _save_parts(out, kept, rank, world, min(world, len(all_batches)))
        if world > 1:
            barrier()
        if rank == 0:
            _contact_sheet(out, fmt, min(n, 64))
            write_text(out / MANIFEST_NAME, json.dumps({**manifest, "complete": True},
                                                       indent=1) + "\n")
            if progress:
                print(f"wrote {n} images to {out} ({fmt}) and {out / SHEET_NAME}")
        finished = True
        return out
    finally:
        teardown_processes(owns_group, finished)


def _start(out: Path, fmt: str, n: int, manifest: dict) -> None:
    """Marks ``out`` unfinished (its manifest, written first), then removes what an
    earlier run left that this one would not replace: ``NNNNNN.png`` numbered n or above
    (all of them when this run writes an npz), ``samples.npz`` (an npz run writes it
    again at the end), an interrupted run's ``.part-R.npz`` and the sheet. Samples
    removed that this run does not write again are said in a warning."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    stale = [f for f in out.glob("[0-9]" * 6 + ".png") if fmt == "npz" or int(f.stem) >= n]
    old_npz = fmt != "npz" and (out / NPZ_NAME).is_file()
    for f in [*stale, *out.glob(".part-*.npz"), out / SHEET_NAME, out / NPZ_NAME]:
        f.unlink(missing_ok=True)
    gone = ([f"{len(stale)} samples numbered {n} and above" if fmt != "npz" else
             f"{len(stale)} PNG samples"] if stale else []) + ([NPZ_NAME] if old_npz else [])
    if gone:
        warnings.warn(f"out: removed {' and '.join(gone)} that an earlier run left in {out}",
                      stacklevel=3)


def read_manifest(folder) -> Optional[dict]:
    """The manifest of a ``blurfast sample`` output folder (see :func:`generate`); None
    where there is none (a ``samples.json`` that blurfast did not write is none: blurfast
    writes its own whole, as JSON). ValueError naming it when it is blurfast's but lacks
    what blurfast writes."""
    p = Path(folder) / MANIFEST_NAME
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
    except ValueError:                 # not JSON, or not UTF-8
        return None
    if not isinstance(m, dict) or m.get("made_by") != MADE_BY:
        return None
    if not (isinstance(m.get("complete"), bool) and m.get("format") in ("png", "npz")
            and type(m.get("n")) is int):
        raise ValueError(f"samples: {p} lacks what blurfast sample writes (complete, format, "
                         f"n); delete it to read the folder as plain images")
    return m


def _save_parts(out: Path, kept, rank: int, world: int, writers: int) -> None:
    """One ``samples.npz`` in index order; under torchrun each rank writes a part and
    rank 0 merges those of the ``writers`` ranks that had batches (ranks 0..writers-1)."""
    idx = np.concatenate([np.arange(b0, b0 + len(imgs)) for b0, imgs in kept]) if kept else \
        np.zeros(0, np.int64)
    arr = np.concatenate([imgs for _, imgs in kept]) if kept else None
    if world == 1:
        save_npz(out / NPZ_NAME, images=arr)
        return
    from .distributed import barrier
    part = out / f".part-{rank}.npz"
    if arr is not None:
        save_npz(part, images=arr, index=idx)
    barrier()
    if rank == 0:
        parts = [out / f".part-{r}.npz" for r in range(writers)]
        loaded = [np.load(p) for p in parts]
        images = np.concatenate([z["images"] for z in loaded])
        order = np.argsort(np.concatenate([z["index"] for z in loaded]))
        save_npz(out / NPZ_NAME, images=images[order])
        for z in loaded:
            z.close()
        for p in parts:
            p.unlink()


def _contact_sheet(out: Path, fmt: str, count: int) -> None:
    if fmt == "png":
        from PIL import Image
        imgs = [np.asarray(Image.open(out / f"{i:06d}.png")) for i in range(count)]
    else:
        with np.load(out / NPZ_NAME) as z:
            imgs = list(z["images"][:count])
    imgs = [i[..., None] if i.ndim == 2 else i for i in imgs]
    cols = math.ceil(math.sqrt(count))
    tiles = [torch.tensor(i).permute(2, 0, 1).float() / 127.5 - 1 for i in imgs]
    rows = [tiles[r:r + cols] for r in range(0, count, cols)]
    viz.save_png(viz.grid(rows), out / SHEET_NAME)
