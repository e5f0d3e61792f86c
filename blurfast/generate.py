"""``blurfast sample``: many images from a trained run, reproducible across process counts.

Image ``i`` of a run draws all its noise (the prior and every sampler step) at Philox
positions fixed by ``(seed, i)``: its batch starts at ``offset = first_index * C*H*W``.
Batches of ``batch`` consecutive indices are dealt to ranks round-robin, so one process
and N processes under torchrun compute exactly the same batches, and a resumed run
(``resume=True``) computes only the images an interrupted one did not write.
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import re
import time
import warnings
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from . import checkpoint as ckpt
from . import viz
from .checks import (PRECISIONS, autocast_dtype, check_bool, check_int, compile_problem,
                     default_precision)
from .console import on_terminal, plural
from .data import data_range, to_unit_range
from .fileio import atomic_path, leftover_temporaries, save_npz, write_text
from .models import cast_for_autocast_
from .ops import _SEED_LIMIT
from .sampling import SAMPLERS, STEP_OFFSET, check_eta, clip_x0, timesteps

__all__ = ["resolve_checkpoint", "generate", "sample_batches", "GraphedModel",
           "read_manifest"]

SHEET_NAME = "contact_sheet.png"
NPZ_NAME = "samples.npz"
# Written first with "complete": false, rewritten last with true: a folder whose run was
# interrupted (or is still running) says so.
MANIFEST_NAME = "samples.json"
MADE_BY = "blurfast sample"
# Sample i is f"{i:06d}.png": six digits, seven from the millionth on.
_PNG_NAME = re.compile(r"^[0-9]{6,}\.png$")


def _numbered_pngs(out: Path) -> list:
    """The samples' PNG files in ``out`` (NNNNNN.png, six digits or more)."""
    return [f for f in out.glob("*.png") if _PNG_NAME.match(f.name)]
# An npz run writes each finished batch as a chunk file; the last step merges them.
_CHUNK = re.compile(r"\.chunk-(\d+)-(\d+)\.npy")
# What must match for a run to resume another's images (the rest of the manifest: n,
# complete and made_by).
RESUME_KEYS = ("format", "seed", "sampler", "steps", "spacing", "eta", "ema", "clip",
               "precision", "checkpoint")


def resolve_checkpoint(path) -> Path:
    """A run directory (its newest valid checkpoint), a folder of checkpoints (a run's
    ``checkpoints/`` or ``best/``: its newest valid one), a checkpoint directory, or a
    ``.safetensors`` file."""
    p = Path(path)
    folder = p / "checkpoints" if (p / "checkpoints").is_dir() else \
        p if ckpt.list_checkpoints(p) else None
    if folder is not None:
        for _, c in ckpt.list_checkpoints(folder):
            try:
                ckpt.verify(c)
                return c
            except ckpt.CheckpointError as e:
                warnings.warn(f"skipping a damaged checkpoint: {e}", stacklevel=2)
        raise ValueError(f"ckpt: no valid checkpoint under {folder}")
    if not p.exists():
        raise ValueError(f"ckpt: {str(path)!r} does not exist")
    # a folder with no checkpoint file: a run not yet saved, or not a run at all
    if p.is_dir() and not any((p / f).exists() for f in ("manifest.json",) + ckpt.FILES):
        what = ("a run directory with no checkpoint yet" if (p / "config.json").is_file()
                else "not a run directory, folder of checkpoints or checkpoint directory")
        raise ValueError(f"ckpt: {str(path)!r} is {what}; give a run directory with "
                         f"checkpoints/step_*, a checkpoint directory or a .safetensors file")
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
    dtype = autocast_dtype(precision)
    autocast = (torch.autocast(torch.device(device).type, dtype=dtype) if dtype is not None
                else contextlib.nullcontext())
    for b0, b1 in batches:
        offset = b0 * chw
        x = diff.prior_sample((b1 - b0,) + diff.shape, seq[0], seed=seed, offset=offset,
                              device=device)
        with torch.no_grad(), autocast:
            x = SAMPLERS[sampler](model, diff, x, seq, eta=eta, seed=seed, offset=offset,
                                  progress=False)
        bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
        if bad:             # written anyway (NaN drawn mid gray), and named
            hint = ("; float16 overflowed in the model: --precision fp32 or bf16"
                    if precision == "fp16" else "")
            warnings.warn(f"{len(bad)} {plural(len(bad), 'image')} with non-finite "
                          f"values ({plural(len(bad), 'number')} "
                          f"{', '.join(str(b0 + i) for i in bad[:10])}"
                          f"{', ...' if len(bad) > 10 else ''}){hint}", stacklevel=2)
        yield b0, _images_uint8(x.float(), pixel_range)


def check_arguments(n, out, *, sampler, eta, batch, seed, fmt, precision, **switches):
    """The checks of :func:`generate`'s arguments that need no checkpoint, each error
    naming its argument; ``switches``: its bools, by name. Returns ``(n, batch, seed)`` as
    Python ints (numpy's taken too)."""
    n, batch = check_int("n", n), check_int("batch", batch)
    seed = check_int("seed", seed, 0, _SEED_LIMIT - 1)     # as the noise ops take it
    if fmt not in ("png", "npz"):
        raise ValueError(f"fmt: expected 'png' or 'npz', got {fmt!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler: expected one of {tuple(SAMPLERS)}, got {sampler!r}")
    check_eta(sampler, eta)
    for name, v in switches.items():
        check_bool(name, v)
    if precision not in (None, *PRECISIONS):
        raise ValueError(f"precision: expected one of {PRECISIONS} or None, got {precision!r}")
    if Path(out).exists() and not Path(out).is_dir():
        raise ValueError(f"out (--out): {str(out)!r} is a file; expected a folder for the "
                         f"images (made if missing)")
    return n, batch, seed


def generate(ckpt_path, n: int, out, sampler: str = "ddim", steps: Optional[int] = 100,
             eta=0.0, spacing="uniform", batch: int = 256, seed: int = 0,
             fmt: str = "png", device: Optional[str] = None, ema: bool = True,
             precision: Optional[str] = None, cuda_graph: bool = False, compile: bool = False,
             clip: bool = True, resume: bool = False, progress: bool = True) -> Path:
    """Samples ``n`` images into ``out`` (PNG files ``NNNNNN.png`` or ``samples.npz`` with
    uint8 ``images`` (N, H, W, C)) plus ``contact_sheet.png``; returns ``out``.
    ``samples.json``, written before the first image with ``"complete": false`` and
    rewritten last with ``true``, records the count, seed, sampler and checkpoint:
    ``fid`` refuses an unfinished folder, and more images than it holds.

    ``eta``: a number or one per step (ddim and exp2m); ``steps=None`` runs the full
    chain; ``precision`` ``bf16`` (default on GPUs of compute capability 8.0 or newer),
    ``fp16`` (for GPUs without bfloat16) or ``fp32``; ``cuda_graph`` replays the model call of each step from a CUDA graph;
    ``compile`` runs the model under ``torch.compile`` (one compilation per batch size,
    inside the graph when both are set); ``clip`` clamps the model's x0 estimate to the
    data range (default on). ``progress``: a bar when stderr is a terminal, else a line
    per finished batch.
    ``resume``: keep the images an earlier run with the same settings (the manifest's
    :data:`RESUME_KEYS`; ``n`` may differ) wrote into ``out`` and sample only the others,
    which gives the images of an uninterrupted run; a folder of other settings, or of
    samples without a manifest, is refused. Under torchrun every rank computes its share
    and rank 0 writes the sheet and the manifest.
    """
    from tqdm.auto import tqdm

    from .distributed import barrier, from_rank0, setup_processes, teardown_processes

    n, batch, seed = check_arguments(n, out, sampler=sampler, eta=eta, batch=batch, seed=seed,
                                     fmt=fmt, precision=precision, ema=ema,
                                     cuda_graph=cuda_graph, compile=compile, clip=clip,
                                     resume=resume, progress=progress)
    path = resolve_checkpoint(ckpt_path)
    rank, world, dev, owns_group = setup_processes(device)
    finished = False
    try:
        if world > 1:
            # A run directory's newest checkpoint can change while the ranks start (the run
            # saves): every rank samples the one rank 0 found, which the manifest names.
            path = from_rank0(path)
        model, diff, config = ckpt.load_model(path, ema=ema, device=dev)
        pixel_range = config.get("pixel_range", "-1,1")
        chw = diff.channels * diff.H * diff.W
        if n * chw >= STEP_OFFSET:
            raise ValueError(f"n: at most {STEP_OFFSET // chw - 1} images of this size, got {n}")
        if cuda_graph and dev.type != "cuda":
            raise ValueError("cuda_graph: needs device cuda")
        why_not = compile_problem(dev) if compile else None
        if why_not:
            raise ValueError(f"compile (--compile): {why_not}")
        precision = precision or default_precision(dev)
        if precision != "fp32":
            cast_for_autocast_(model, autocast_dtype(precision))  # autocast's numbers, once
        net = torch.compile(model, dynamic=False) if compile else model
        net = GraphedModel(net) if cuda_graph else net
        # Samplers call eps; a std or score model's output is converted after the network
        # (outside its graph or compilation).
        net = diff.eps_model(net, config.get("target", "eps"))
        seq = timesteps(diff, steps if isinstance(spacing, str) else None, spacing)
        check_eta(sampler, eta, steps=len(seq))
        out = Path(out)
        manifest = {"made_by": MADE_BY, "complete": False, "format": fmt, "n": n, "seed": seed,
                    "sampler": sampler, "steps": len(seq),
                    "spacing": spacing if isinstance(spacing, str) else seq,
                    "eta": float(eta) if isinstance(eta, numbers.Real) else [float(e) for e in eta],
                    "ema": ema if path.is_dir() else None,    # a file: loaded as it is
                    "clip": clip, "precision": precision,
                    "checkpoint": str(path.resolve())}
        # Each rank reads the folder before the barrier: rank 0's _start changes only what
        # no rank counts (samples numbered n and above; the manifest, same settings).
        todo = _batches(n, batch, _resumable(out, manifest) if resume else [])
        if rank == 0:
            _start(out, fmt, n, manifest, resume)
            if progress and resume:
                print(f"resuming: {n - sum(b1 - b0 for b0, b1 in todo)} of {n} images are "
                      f"in {out} already")
        if world > 1:
            barrier()                   # the previous run's files are gone
        batches = todo[rank::world]
        mine = sum(b1 - b0 for b0, b1 in batches)
        # progress: on a terminal a bar, one tick per model call (it moves within a batch: a
        # full chain is long); elsewhere (a batch job's log file, where a bar's redraws pile
        # up) a line per finished batch
        lines = progress and rank == 0 and not on_terminal()
        bar = tqdm(total=len(batches) * len(seq), unit="step",
                   disable=not progress or rank != 0 or lines,
                   desc=f"{sampler} {len(seq)} steps x {len(batches)} batches")
        done, t0 = 0, time.perf_counter()
        for b0, imgs in sample_batches(net, diff, batches, sampler=sampler, seq=seq, eta=eta,
                                       seed=seed, device=dev, precision=precision,
                                       pixel_range=pixel_range, clip=clip,
                                       on_step=lambda: bar.update(1)):
            if fmt == "png":
                for i, img in enumerate(imgs):
                    viz.save_png(img, out / f"{b0 + i:06d}.png")
            else:
                _save_chunk(out, b0, imgs)
            done += len(imgs)
            elapsed = time.perf_counter() - t0
            bar.set_postfix(images=f"{done}/{mine}", img_per_s=f"{done / elapsed:.2f}")
            if lines:
                print(f"images {done}/{mine}: {done / elapsed:.2f} images/s, "
                      f"{elapsed:.1f} s", flush=True)
        bar.close()
        if world > 1:
            barrier()                   # every rank's images are written
        if rank == 0:
            if fmt == "npz":
                _merge_chunks(out, n, (diff.H, diff.W, diff.channels))
            _contact_sheet(out, fmt, min(n, 64))
            write_text(out / MANIFEST_NAME, json.dumps({**manifest, "complete": True},
                                                       indent=1) + "\n")
        finished = True
        return out
    finally:
        teardown_processes(owns_group, finished)


def _start(out: Path, fmt: str, n: int, manifest: dict, resume: bool) -> None:
    """Marks ``out`` unfinished (its manifest, written first), then removes what an
    earlier run left that this one does not keep: ``NNNNNN.png`` (when resuming, those
    numbered n or above; without resume all, even those this run writes again: one
    still there when it is interrupted would pass for its own), ``samples.npz`` (an npz
    run writes it again at the end, from the one there when it resumes), an interrupted
    npz run's chunks (when resuming, those at n and above), the sheet, and the temporary
    files of those that a killed run was writing. Samples removed are said in a
    warning."""
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    stale = [f for f in _numbered_pngs(out) if fmt == "npz" or not resume or int(f.stem) >= n]
    old_npz = fmt != "npz" and (out / NPZ_NAME).is_file()
    chunks = [f for b0, _, f in _chunks(out) if not resume or b0 >= n]
    keep_npz = resume and fmt == "npz"
    unfinished = [f for f, name in leftover_temporaries(out) if _PNG_NAME.match(name)
                  or _CHUNK.fullmatch(name) or name in (NPZ_NAME, SHEET_NAME, MANIFEST_NAME)]
    for f in [*stale, *chunks, *unfinished, out / SHEET_NAME,
              *([] if keep_npz else [out / NPZ_NAME])]:
        f.unlink(missing_ok=True)
    gone = ([f"{len(stale)} PNG samples" if fmt == "npz" else
             f"{len(stale)} samples numbered {n} and above" if resume else
             f"{len(stale)} samples"] if stale else []) + ([NPZ_NAME] if old_npz else [])
    if gone:
        warnings.warn(f"out: removed {' and '.join(gone)} that an earlier run left in {out}",
                      stacklevel=3)


def _resumable(out: Path, manifest: dict) -> list:
    """Index ranges ``(i0, i1)`` below n whose images an earlier run with the same
    settings left in ``out`` (none when ``out`` holds no samples); ValueError when its
    samples came from other settings or from no ``blurfast sample`` run."""
    if not out.is_dir():
        return []
    n = manifest["n"]
    pngs = [int(f.stem) for f in _numbered_pngs(out)]
    chunks = _chunks(out)
    npz = out / NPZ_NAME
    old = read_manifest(out)
    if old is None:
        if pngs or chunks or npz.is_file():
            raise ValueError(f"resume (--resume): {out} holds samples but no {MANIFEST_NAME} "
                             f"of `blurfast sample`: the settings that made them are unknown")
        return []
    # eta and spacing as this run's would read back from JSON (lists, floats).
    now = json.loads(json.dumps(manifest))
    differ = [f"{k} {old.get(k)!r} there, {now[k]!r} now" for k in RESUME_KEYS
              if old.get(k) != now[k]]
    if differ:
        raise ValueError(f"resume (--resume): the run in {out} has other settings: "
                         f"{'; '.join(differ)}; sample into another folder, or leave out "
                         f"resume to replace its images")
    if manifest["format"] == "png":
        return [(i, i + 1) for i in pngs if i < n]
    done = [(b0, min(b1, n)) for b0, b1, _ in chunks if b0 < n]
    if npz.is_file():
        done.append((0, min(_npz_count(npz), n)))
    return done


def _batches(n: int, batch: int, done) -> list:
    """Ranges of at most ``batch`` consecutive indices covering [0, n) less the ranges
    ``done``, in order; with none done, ``[0, batch), [batch, 2 batch), ...``."""
    todo = np.ones(n, bool)
    for i0, i1 in done:
        todo[i0:i1] = False
    idx = np.flatnonzero(todo)
    runs = np.split(idx, np.flatnonzero(np.diff(idx) != 1) + 1) if idx.size else []
    return [(b0, min(b0 + batch, int(r[-1]) + 1))
            for r in runs for b0 in range(int(r[0]), int(r[-1]) + 1, batch)]


def _chunks(out: Path) -> list:
    """``(b0, b1, path)`` of the npz chunk files in ``out`` (images b0..b1-1 each)."""
    found = [(_CHUNK.fullmatch(f.name), f) for f in out.glob(".chunk-*.npy")]
    return sorted((int(m[1]), int(m[2]), f) for m, f in found if m)


def _save_chunk(out: Path, b0: int, imgs: np.ndarray) -> None:
    with atomic_path(out / f".chunk-{b0:06d}-{b0 + len(imgs):06d}.npy", ".npy") as tmp, \
            open(tmp, "wb") as f:
        np.save(f, imgs)


def _npz_count(path: Path) -> int:
    """The number of images in a ``samples.npz``, from its array header alone."""
    try:
        with zipfile.ZipFile(path) as zf, zf.open("images.npy") as f:
            version = np.lib.format.read_magic(f)
            header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            return int(header(f)[0][0])
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise ValueError(f"resume (--resume): cannot read the image count of {path}: {e}") \
            from None


def _merge_chunks(out: Path, n: int, shape: tuple) -> None:
    """``samples.npz`` of images 0..n-1 in index order, from the chunks in ``out`` and, in
    a resumed run, the ``samples.npz`` there before; the chunks are removed after."""
    images = np.empty((n, *shape), np.uint8)
    have = np.zeros(n, bool)
    npz = out / NPZ_NAME
    if npz.is_file():                  # only a resumed run keeps one (_start)
        with np.load(npz) as z:
            old = z["images"][:n]
        images[:len(old)], have[:len(old)] = old, True
    chunks = _chunks(out)
    for b0, b1, f in chunks:
        if b0 < n:
            a = np.load(f)
            if a.shape != (b1 - b0, *shape):
                raise ValueError(f"samples: {f} holds an array of shape {a.shape}, expected "
                                 f"{(b1 - b0, *shape)}")
            images[b0:min(b1, n)], have[b0:min(b1, n)] = a[:n - b0], True
    if not have.all():
        raise RuntimeError(f"samples: image {int(np.argmin(have))} is missing from {out}")
    save_npz(npz, images=images)
    for _, _, f in chunks:
        f.unlink()


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
