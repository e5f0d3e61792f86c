"""Pictures: the forward strip, a reverse run over time (a grid or an animation), a
run's curves.

Images are (C, H, W) or (B, C, H, W) tensors with values in [-1, 1] (C = 1 or 3; the
process pictures also take a run's [0, 1] range);
a picture is a uint8 (H', W', C) array, written as PNG (an animation as GIF) through
Pillow. The curves
(:func:`training_curves`) are drawn with matplotlib.
"""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .checks import check_bool, check_int
from .diffusion import BlurDiffusion

__all__ = ["to_uint8", "grid", "save_png", "save_gif", "forward_strip", "trajectory",
           "trajectory_frames", "variation_grid", "TRAJECTORY_ROWS", "training_curves"]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W, C) uint8, ``round((x + 1) * 127.5)`` clipped; NaN
    as 0 (mid gray), infinities as the range's ends."""
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"x: expected (C, H, W) with C in (1, 3), got {tuple(x.shape)}")
    a = torch.nan_to_num(x.detach().to(torch.float64).cpu(), nan=0.0)
    a = torch.round((a + 1) * 127.5).clamp(0, 255)
    return a.to(torch.uint8).permute(1, 2, 0).numpy()


def grid(rows: Sequence[Sequence[torch.Tensor]], pad: int = 1) -> np.ndarray:
    """Tiles ``rows[r][c]`` (each (C, H, W), same shape) into one uint8 picture,
    ``pad`` (>= 0) white pixels between tiles."""
    pad = check_int("pad", pad, 0)
    if not rows or not rows[0]:
        raise ValueError("rows: expected at least one row of one image")
    tiles = [[to_uint8(t) for t in row] for row in rows]
    h, w, c = tiles[0][0].shape
    ncol = max(len(r) for r in tiles)
    out = np.full((len(tiles) * (h + pad) - pad, ncol * (w + pad) - pad, c), 255, np.uint8)
    for r, row in enumerate(tiles):
        for col, t in enumerate(row):
            if t.shape != (h, w, c):
                raise ValueError(f"rows: tile ({r}, {col}) has shape {t.shape}, expected {(h, w, c)}")
            out[r * (h + pad):r * (h + pad) + h, col * (w + pad):col * (w + pad) + w] = t
    return out


def save_png(picture: np.ndarray, path) -> None:
    """Writes a (H, W, 1 or 3) uint8 picture as PNG (temp file + rename)."""
    from PIL import Image

    from .fileio import atomic_path
    pic = picture[..., 0] if picture.shape[-1] == 1 else picture
    with atomic_path(path, suffix=".png") as tmp:
        Image.fromarray(pic).save(tmp, format="PNG")


def _batch(x0: torch.Tensor, diff: BlurDiffusion) -> torch.Tensor:
    x0 = x0[None] if x0.dim() == 3 else x0
    diff.check_x(x0, "x0")
    return x0


def forward_strip(diff: BlurDiffusion, x0: torch.Tensor, path=None, seed: int = 0,
                  num: int = 10, pad: int = 1, pixel_range: str = "-1,1", noise: bool = True):
    """x_i at i = 0, N/num, 2N/num, ..., N (the paper's forward-process figure); ``num``
    in [1, N].

    One row per image of ``x0`` ((C, H, W) or (B, C, H, W), values in ``pixel_range``,
    the range the process was trained on: "-1,1" or "0,1"); all columns share the noise
    of ``seed``, as x_i = q_sample(x0, i, seed=seed). ``noise=False`` draws x_i's mean
    instead (q_sample with zero noise: the blur and the fading of the signal alone).
    Returns ``(picture, steps)``; writes PNG to ``path`` when given.
    """
    from .data import to_unit_range
    x0 = _batch(x0, diff)
    n = diff.num_steps
    num = check_int("num", num, 1, n)
    pad = check_int("pad", pad, 0)
    check_bool("noise", noise)
    to_unit_range(x0[:0], pixel_range)              # checks pixel_range first
    steps = [round(k * n / num) for k in range(num + 1)]
    cols = [x0]
    for i in steps[1:]:
        t = torch.full((x0.shape[0],), i, dtype=torch.int64, device=x0.device)
        zero = None if noise else torch.zeros_like(x0)
        cols.append(diff.q_sample(x0, t, noise=zero, seed=None if zero is not None else seed)[0])
    cols = [to_unit_range(c, pixel_range).clamp(-1, 1) for c in cols]
    pic = grid([[c[b] for c in cols] for b in range(x0.shape[0])], pad)
    if path is not None:
        save_png(pic, path)
    return pic, steps


TRAJECTORY_ROWS = ("x0_hat", "x_t", "both")


def _reverse_run(model, diff, shape, take, on_state, sampler, steps, seed, eta, spacing,
                 pixel_range, progress, kw) -> None:
    """One reverse run: ``on_state(i, x_t, x0_hat)`` at each step i in ``take(seq)`` (a
    set of the run's steps), the images on the CPU in [-1, 1] for display; then
    ``on_state(0, sample, sample)``."""
    from .data import to_unit_range
    from .sampling import sample, timesteps

    seq = timesteps(diff, steps if isinstance(spacing, str) else None, spacing)
    wanted = take(seq)
    to_unit_range(torch.zeros(0), pixel_range)      # checks pixel_range before sampling

    def display(x):
        return to_unit_range(x.float(), pixel_range).clamp(-1, 1).cpu()

    def keep(i, x_t, x0_hat):
        if i in wanted:
            on_state(i, display(x_t), display(x0_hat))

    out = display(sample(model, diff, shape, sampler=sampler, steps=steps, eta=eta,
                         spacing=spacing, seed=seed, callback=keep, progress=progress, **kw))
    on_state(0, out, out)


def _evenly_spaced(num: int):
    """``take`` for :func:`_reverse_run`: ``num`` evenly spaced steps of a run, the first
    and last included (every step where there are no more)."""
    def take(seq):
        return {seq[round(k * (len(seq) - 1) / max(num - 1, 1))] for k in range(num)}
    return take


def _check_show(show: str) -> None:
    if show not in TRAJECTORY_ROWS:
        raise ValueError(f"show: expected one of {TRAJECTORY_ROWS}, got {show!r}")


def trajectory(model, diff: BlurDiffusion, shape, path=None, sampler: str = "ddim",
               steps: Optional[int] = 100, num: int = 10, seed: int = 0, eta=0.0,
               spacing="uniform", pad: int = 1, show: str = "x0_hat",
               pixel_range: str = "-1,1", progress: bool = False, **kw):
    """A reverse run at ``num`` (>= 1) evenly spaced model calls (every call where there
    are no more than ``num``), then the sample.

    ``show``: per sample of ``shape`` (B, C, H, W) a row of the model's estimate
    ``"x0_hat"`` (the coarse-to-fine synthesis), of the state ``"x_t"`` it was made
    from (noise and blur giving way), or ``"both"`` (x_t above x0_hat). Images are in
    the model's ``pixel_range`` and clamped to it for display only. ``kw`` goes to
    :func:`blurfast.sampling.sample` (``device``, ``clip``, ...); ``progress``: its bar
    over the model calls. Returns
    ``(picture, steps)`` with the steps of the shown columns (0 for the final sample);
    PNG to ``path``.
    """
    num = check_int("num", num, 1)
    pad = check_int("pad", pad, 0)
    _check_show(show)

    shown, states, estimates = [], [], []

    def on_state(i, x_t, x0_hat):
        shown.append(i)
        states.append(x_t)
        estimates.append(x0_hat)
    _reverse_run(model, diff, shape, _evenly_spaced(num), on_state, sampler, steps, seed, eta,
                 spacing, pixel_range, progress, kw)
    rows = []
    for b in range(len(states[0])):
        if show in ("x_t", "both"):
            rows.append([c[b] for c in states])
        if show in ("x0_hat", "both"):
            rows.append([c[b] for c in estimates])
    pic = grid(rows, pad)
    if path is not None:
        save_png(pic, path)
    return pic, shown


def trajectory_frames(model, diff: BlurDiffusion, shape, path=None, sampler: str = "ddim",
                      steps: Optional[int] = 100, seed: int = 0, eta=0.0, spacing="uniform",
                      pad: int = 1, show: str = "both", pixel_range: str = "-1,1",
                      progress: bool = False, frame_ms: int = 80, hold_ms: int = 2000,
                      frames: Optional[int] = 100, **kw):
    """The reverse run of :func:`trajectory` as an animation: a frame per model call (at
    most ``frames`` evenly spaced ones, the first and last included; None: every call),
    the sample last. A frame holds the images of ``shape`` side by side, each a column of
    x_t above x0_hat (``show="both"``) or one of them. Returns ``(frames, steps)``, uint8
    pictures and the step of each (0 for the sample); with ``path``, writes them as a
    looping GIF (``frame_ms`` per frame, the sample held ``hold_ms``; Pillow reduces each
    frame to 256 colours)."""
    pad = check_int("pad", pad, 0)
    frame_ms = check_int("frame_ms", frame_ms, 1)
    hold_ms = check_int("hold_ms", hold_ms, 1)
    frames = check_int("frames", frames, 1, none_ok=True)
    _check_show(show)
    pictures, shown = [], []

    def on_state(i, x_t, x0_hat):           # each frame made at once: uint8 kept only
        rows = {"x_t": [x_t], "x0_hat": [x0_hat], "both": [x_t, x0_hat]}[show]
        pictures.append(grid([list(r) for r in rows], pad))
        shown.append(i)
    take = set if frames is None else _evenly_spaced(frames)     # set: every step
    _reverse_run(model, diff, shape, take, on_state, sampler, steps, seed, eta, spacing,
                 pixel_range, progress, kw)
    if path is not None:
        save_gif(pictures, path, [frame_ms] * (len(pictures) - 1) + [hold_ms])
    return pictures, shown


def variation_grid(model, diff: BlurDiffusion, x0: torch.Tensor, start: int, path=None,
                   count: int = 4, sampler: str = "ddim", steps: Optional[int] = None,
                   eta=0.0, spacing: str = "uniform", seed: int = 0, pad: int = 1,
                   pixel_range: str = "-1,1", progress: bool = False, **kw):
    """Per image of ``x0`` (B, C, H, W), in the model's ``pixel_range``, a row: the image,
    what the process keeps of it at step ``start`` (the mean of x_start: blurred and
    faded; the reverse run begins from it plus noise), then ``count`` (>= 1) variations
    (:func:`blurfast.sampling.variations`; each its own noise, the image's copy k of the
    batch of B x count). ``kw`` goes to ``variations`` (``clip``); ``device``: where to
    run. Returns the picture; PNG to ``path``."""
    from .data import to_unit_range
    from .sampling import variations

    count = check_int("count", count, 1)
    pad = check_int("pad", pad, 0)
    to_unit_range(torch.zeros(0), pixel_range)      # checks pixel_range before sampling
    x0 = _batch(x0, diff)
    device = kw.pop("device", x0.device)
    x0 = x0.to(device)
    out = variations(model, diff, x0.repeat_interleave(count, 0), start, sampler=sampler,
                     steps=steps, eta=eta, spacing=spacing, seed=seed, progress=progress,
                     **kw)
    t = torch.full((len(x0),), start, dtype=torch.int64, device=device)
    kept = diff.q_sample(x0, t, noise=torch.zeros_like(x0))[0]

    def display(v):
        return to_unit_range(v.float().cpu(), pixel_range).clamp(-1, 1)
    shown, kept, made = display(x0), display(kept), display(out)
    pic = grid([[shown[b], kept[b], *made[b * count:(b + 1) * count]]
                for b in range(len(x0))], pad)
    if path is not None:
        save_png(pic, path)
    return pic


def save_gif(frames: Sequence[np.ndarray], path, durations_ms: Sequence[int]) -> None:
    """Writes (H, W, 1 or 3) uint8 pictures as a looping GIF, ``durations_ms[k]`` for
    frame k (temp file + rename), every frame kept: Pillow's ``save(save_all=True)`` drops
    a frame identical to the one before (adding its duration to it), with no option to
    keep it, so the file is put together from Pillow's header and frame writers. Each
    frame carries its own palette (256 colours at most, as Pillow's save gives it)."""
    from PIL import GifImagePlugin, Image

    from .fileio import atomic_path
    if not frames:
        raise ValueError("frames: expected at least one picture, got none")
    if len(durations_ms) != len(frames):
        raise ValueError(f"durations_ms: expected one per frame ({len(frames)}), got "
                         f"{len(durations_ms)}")
    durations_ms = [check_int(f"durations_ms[{k}]", ms, 1) for k, ms in enumerate(durations_ms)]
    images = [Image.fromarray(f[..., 0]) if f.shape[-1] == 1 else
              Image.fromarray(f).convert("P", palette=Image.Palette.ADAPTIVE) for f in frames]
    header, _ = GifImagePlugin.getheader(images[0], info={"loop": 0})
    with atomic_path(path, suffix=".gif") as tmp, open(tmp, "wb") as f:
        f.writelines(header)
        for im, ms in zip(images, durations_ms):
            f.writelines(GifImagePlugin.getdata(im, duration=ms, include_color_table=True))
        f.write(b";")                  # the GIF trailer


def _read_columns(path: Path, names: Sequence[str]) -> dict:
    """Columns ``names`` of a CSV file as float lists (a cell that is not a number: nan)."""
    cols = {n: [] for n in names}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for n in names:
                try:
                    cols[n].append(float(row.get(n) or "nan"))
                except ValueError:
                    cols[n].append(math.nan)
    return cols


def _smooth(values: Sequence[float], rows: int) -> list:
    """Exponential moving average with a half-life of ``rows`` rows; non-finite values
    are left out of it."""
    w = 0.5 ** (1.0 / max(rows, 1e-9))
    out, acc, norm = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            acc, norm = w * acc + (1 - w) * v, w * norm + (1 - w)
        out.append(acc / norm if norm else math.nan)
    return out


_MARKED_ROWS = 20       # log rows up to which the curves mark each point


def figure_class(what: str):
    """matplotlib's ``Figure`` (a figure of its own: no pyplot state, no backend switch in
    the caller); ImportError saying that ``what`` needs matplotlib."""
    import importlib
    try:
        importlib.import_module("matplotlib")    # the package first: where it is absent
        from matplotlib.figure import Figure       # (or stubbed out) this says so
    except ImportError as e:
        raise ImportError(f"{what} needs matplotlib: pip install matplotlib") from e
    return Figure


def training_curves(run_dir, path=None, *, arg: str = "run_dir") -> Path:
    """``RUN_DIR/curves.png`` (or ``path``): loss (log scale, with a moving average),
    gradient norm and images/s against the step, from ``log.csv``, and FID and KID from
    ``fid.csv`` when the run scores itself. Needs matplotlib; returns the path. A run
    without log.csv or without rows in it: ValueError naming ``arg`` (a caller's own)."""
    run_dir = Path(run_dir)
    log_path = run_dir / "log.csv"
    if not log_path.is_file():
        raise ValueError(f"{arg}: no log.csv in {str(run_dir)!r}")
    log = _read_columns(log_path, ["step", "loss", "grad_norm", "images_per_s"])
    if not log["step"]:
        raise ValueError(f"{arg}: the log.csv of {str(run_dir)!r} has no rows yet (training "
                         f"writes one every log_every steps)")
    Figure = figure_class("training_curves")
    from .fileio import atomic_path

    fid_path = run_dir / "fid.csv"
    fid = _read_columns(fid_path, ["step", "fid", "kid"]) if fid_path.is_file() else None
    panels = [("loss", "loss (log scale)"), ("grad_norm", "gradient norm (before clipping)"),
              ("images_per_s", "images/s")]
    scores = [k for k in ("fid", "kid") if fid and any(math.isfinite(v) for v in fid[k])]
    n = len(panels) + len(scores)
    fig = Figure(figsize=(7, 2.2 * n))
    axes = fig.subplots(n, 1, sharex=True, squeeze=False)[:, 0]
    half_life = max(1, len(log["step"]) // 50)
    # Points marked while there are few: a line through one point draws nothing.
    dots = dict(marker="o", ms=4) if len(log["step"]) <= _MARKED_ROWS else {}
    for ax, (key, title) in zip(axes, panels):
        if key == "images_per_s":       # already a mean over each log interval
            ax.plot(log["step"], log[key], lw=1.2, color="C0", **dots)
        else:
            ax.plot(log["step"], log[key], lw=0.6, alpha=0.4, color="C0")
            ax.plot(log["step"], _smooth(log[key], half_life), lw=1.4, color="C0", **dots)
        if key == "loss" and any(v > 0 for v in log[key] if math.isfinite(v)):
            ax.set_yscale("log")
        ax.set_ylabel(title, fontsize=8)
        ax.grid(alpha=0.3)
    for ax, k in zip(axes[len(panels):], scores):
        ax.plot(fid["step"], fid[k], "o-", ms=3, color="C1")
        ax.set_ylabel(k.upper(), fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("step")
    rows = len(log["step"])
    fig.suptitle(f"{run_dir.resolve().name}: {rows} log row{'s' if rows != 1 else ''}",
                 fontsize=9)
    fig.tight_layout()
    path = Path(path) if path is not None else run_dir / "curves.png"
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
