"""Pictures of the process: the forward strip and a reverse run's x0_hat over time.

Images are (C, H, W) or (B, C, H, W) tensors with values in [-1, 1] (C = 1 or 3);
a picture is a uint8 (H', W', C) array, written as PNG through Pillow.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .diffusion import BlurDiffusion

__all__ = ["to_uint8", "grid", "save_png", "forward_strip", "trajectory"]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [-1, 1] -> (H, W, C) uint8, ``round((x + 1) * 127.5)`` clipped."""
    if x.dim() != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"x: expected (C, H, W) with C in (1, 3), got {tuple(x.shape)}")
    a = torch.round((x.detach().to(torch.float64).cpu() + 1) * 127.5).clamp(0, 255)
    return a.to(torch.uint8).permute(1, 2, 0).numpy()


def grid(rows: Sequence[Sequence[torch.Tensor]], pad: int = 1) -> np.ndarray:
    """Tiles ``rows[r][c]`` (each (C, H, W), same shape) into one uint8 picture,
    ``pad`` white pixels between tiles."""
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
    import os
    from PIL import Image
    pic = picture[..., 0] if picture.shape[-1] == 1 else picture
    tmp = f"{os.fspath(path)}.tmp"
    Image.fromarray(pic).save(tmp, format="PNG")
    os.replace(tmp, path)


def _batch(x0: torch.Tensor, diff: BlurDiffusion) -> torch.Tensor:
    x0 = x0[None] if x0.dim() == 3 else x0
    diff.check_x(x0, "x0")
    return x0


def forward_strip(diff: BlurDiffusion, x0: torch.Tensor, path=None, seed: int = 0,
                  num: int = 10, pad: int = 1):
    """x_i at i = 0, N/num, 2N/num, ..., N (the paper's forward-process figure).

    One row per image of ``x0`` ((C, H, W) or (B, C, H, W), values in [-1, 1]);
    all columns share the noise of ``seed``, as x_i = q_sample(x0, i, seed=seed).
    Returns ``(picture, steps)``; writes PNG to ``path`` when given.
    """
    x0 = _batch(x0, diff)
    n = diff.num_steps
    steps = [round(k * n / num) for k in range(num + 1)]
    cols = [x0]
    for i in steps[1:]:
        t = torch.full((x0.shape[0],), i, dtype=torch.int64, device=x0.device)
        cols.append(diff.q_sample(x0, t, seed=seed)[0])
    pic = grid([[c[b] for c in cols] for b in range(x0.shape[0])], pad)
    if path is not None:
        save_png(pic, path)
    return pic, steps


def trajectory(model, diff: BlurDiffusion, shape, path=None, sampler: str = "ddim",
               steps: Optional[int] = 100, num: int = 10, seed: int = 0, eta=0.0,
               spacing="uniform", pad: int = 1, **kw):
    """A reverse run's x0_hat at ``num`` evenly spaced model calls, then the sample.

    One row per sample of ``shape`` (B, C, H, W); x0_hat shows the coarse-to-fine
    synthesis (clamped to [-1, 1] for display only). Returns ``(picture, steps)``
    with the steps of the shown columns (0 for the final sample); PNG to ``path``.
    """
    from .sampling import sample, timesteps

    seq = timesteps(diff, steps if isinstance(spacing, str) else None, spacing)
    take = set(seq[round(k * (len(seq) - 1) / max(num - 1, 1))] for k in range(num))
    shown, cols = [], []

    def keep(i, x_t, x0_hat):
        if i in take:
            shown.append(i)
            cols.append(x0_hat.clamp(-1, 1))

    out = sample(model, diff, shape, sampler=sampler, steps=steps, eta=eta, spacing=spacing,
                 seed=seed, callback=keep, progress=False, **kw)
    shown.append(0)
    cols.append(out)
    pic = grid([[c[b] for c in cols] for b in range(out.shape[0])], pad)
    if path is not None:
        save_png(pic, path)
    return pic, shown
