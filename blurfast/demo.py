"""``blurfast demo``: the whole job on an embedded default, in about ten minutes on a CPU.

With no data it trains the ``small`` U-Net on random crops of the CC0 photographs that
scikit-image ships, samples a grid, draws the forward process and a coarse-to-fine
reverse run, and runs the quick kernel benchmark.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .checks import check_gpu_seen, check_number

# RGB photographs bundled in scikit-image's package data (no download).
SKIMAGE_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
                  "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png")


# The demo's model: the small preset, and with --smoke these overrides.
_PRESET = "small"
_SMOKE_MODEL = dict(base_channels=32, channel_mult=(1, 2), num_res_blocks=1)


def _check_args(minutes, resolution, smoke: bool, prefix: str = "", device=None) -> None:
    """Checks what :func:`run` is given before it does any work: ``minutes`` finite and
    > 0, ``resolution`` None or a side the demo's U-Net takes, ``device`` 'cuda' only
    where torch sees a GPU. Errors name ``prefix`` + the argument (``--`` on the command
    line)."""
    from .models import PRESETS, check_resolution
    check_number(prefix + "minutes", minutes, 0, lo_open=True)
    if device == "cuda":
        check_gpu_seen(prefix + "device")
    if resolution is not None:
        levels = (_SMOKE_MODEL if smoke else PRESETS[_PRESET])["channel_mult"]
        check_resolution(resolution, levels, prefix + "resolution")


def skimage_crops(n: int, size: int, seed: int = 0) -> np.ndarray:
    """n random square crops (side 64 to 256 pixels) of scikit-image's photographs,
    resized to ``size``: uint8 (n, size, size, 3)."""
    try:
        import skimage
    except ImportError as e:
        raise ImportError("the demo's default data needs scikit-image: pip install "
                          "scikit-image (or pass --data PATH)") from e
    from PIL import Image
    folder = Path(skimage.__file__).parent / "data"
    photos = [np.asarray(Image.open(folder / f).convert("RGB")) for f in SKIMAGE_PHOTOS
              if (folder / f).is_file()]
    if not photos:
        raise FileNotFoundError(f"no bundled photographs found in {folder}")
    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        img = photos[rng.integers(len(photos))]
        h, w = img.shape[:2]
        side = int(rng.integers(min(64, h, w), min(256, h, w) + 1))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = Image.fromarray(img[y:y + side, x:x + side]).resize((size, size), Image.LANCZOS)
        out[i] = np.asarray(crop)
    return out


def _clear_previous_run(run_dir: Path) -> None:
    """Removes the training run of an earlier demo at ``run_dir`` (a directory holding a
    blurfast config.json), saying so; refuses a non-empty ``run_dir`` that is not one."""
    if not run_dir.exists() or (run_dir.is_dir() and not any(run_dir.iterdir())):
        return
    try:
        ours = "diffusion" in json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError, TypeError):
        ours = False
    if not ours:
        raise ValueError(f"out: {run_dir} exists and is not a blurfast run directory (no "
                         f"readable config.json); remove it or choose another --out")
    print(f"[demo] replacing the previous demo run in {run_dir}")
    shutil.rmtree(run_dir)


def run(out="blurfast-demo", minutes: float = 6.0, data: Optional[str] = None,
        resolution: Optional[int] = None, device: Optional[str] = None, smoke: bool = False,
        bench: bool = True) -> dict:
    """Runs the demo into ``out``; returns the paths it wrote. ``minutes`` is the training
    budget (finite, > 0); ``resolution`` None (the default: a prepared array's side, else
    64 on a GPU, 32 on a CPU) or a side the U-Net takes (divisible by 8, by 2 with
    ``smoke``); a prepared array's channels are the model's. ``smoke`` shrinks everything
    to seconds (for tests)."""
    _check_args(minutes, resolution, smoke, device=device)
    from . import viz
    from .bench import main as bench_main
    from .checkpoint import load_model
    from .data import open_dataset
    from .fileio import atomic_path
    from .generate import resolve_checkpoint
    from .sampling import sample
    from .training import train

    t_start = time.perf_counter()
    out = Path(out)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device == "cuda"
    res = resolution or (16 if smoke else 64 if cuda else 32)
    channels = 3
    if data is not None and not Path(data).exists():      # before anything is written
        raise ValueError(f"data: {str(data)!r} does not exist")
    if data is not None and Path(data).is_file():
        # A prepared array: its side (--resolution, when given, must match) and channels.
        ds = open_dataset(data, resolution=resolution, channels=None, arg="data")
        res, channels = ds.resolution, ds.channels
        _check_args(minutes, res, smoke)
    elif data is not None:          # a folder or lmdb: one with no images stops here too
        ds = open_dataset(data, resolution=res, channels=channels, arg="data")
    out.mkdir(parents=True, exist_ok=True)
    paths = {}

    # 1. Data: the given dataset, or crops of scikit-image's photographs as a prepared array.
    if data is None:
        arr = skimage_crops(64 if smoke else 4096, res)
        data = out / "data" / f"skimage_crops_{res}.npy"
        with atomic_path(data, suffix=".npy") as tmp, open(tmp, "wb") as f:
            np.save(f, arr)
        print(f"[demo] data: {len(arr)} crops of scikit-image's photographs -> {data}")
        ds = open_dataset(data, resolution=res, channels=channels)

    # 2. Train for the time budget: a few steps to time one, then the rest (resumed).
    run_dir = out / "run"
    _clear_previous_run(run_dir)
    n_steps = 40 if smoke else 1000
    kw = dict(data=str(data), out=str(run_dir), preset=_PRESET, resolution=res,
              channels=channels, batch_size=16, lr=2e-4, ema_decay=0.99, device=device,
              diffusion=dict(num_steps=n_steps), save_every=10 ** 6, sample_every=10 ** 6,
              sample_count=16, sample_steps=10 if smoke else 25, log_every=10, keep=1)
    if smoke:
        kw["model"] = dict(_SMOKE_MODEL)
    first = 2 if smoke else 20
    t0 = time.perf_counter()
    print(f"[demo] timing {first} training steps")
    train(steps=first, progress=False, **kw)        # the resumed run prints the config
    # Seconds per step from the run's own log (start-up and the sample grid excluded): the
    # last 10 steps where there are two log rows, leaving out the first steps' warm-up
    # (on a GPU: CUDA graph capture, cuDNN's search).
    elapsed = [float(r.split(",")[-1])
               for r in (run_dir / "log.csv").read_text().splitlines()[1:]]
    if len(elapsed) >= 2 and elapsed[-1] > elapsed[-2]:
        per_step = (elapsed[-1] - elapsed[-2]) / kw["log_every"]
    elif elapsed and elapsed[-1] > 0:
        per_step = elapsed[-1] / first
    else:
        per_step = (time.perf_counter() - t0) / first
    budget = minutes * 60 - (time.perf_counter() - t_start)
    total = first + 1 if smoke else max(first + 1, first + int(budget / per_step))
    print(f"[demo] training to step {total}, {total - first} more (about {per_step:.2f} s "
          f"each) -> {run_dir}")
    train(steps=total, resume="auto", **kw)
    paths["run"] = run_dir

    # 3. Pictures: samples, the forward process, a coarse-to-fine reverse run.
    model, diff, _ = load_model(resolve_checkpoint(run_dir), ema=True, device=device)
    steps = 5 if smoke else 50
    x = sample(model, diff, (16,) + diff.shape, sampler="ddim", steps=steps, seed=0,
               progress=not smoke, device=device, clip=(-1.0, 1.0))
    paths["samples"] = out / "samples.png"
    viz.save_png(viz.grid([list(x[r * 4:(r + 1) * 4]) for r in range(4)]), paths["samples"])
    # Up to 4 rows: --data may hold fewer images.
    photos = torch.from_numpy(np.stack([np.asarray(ds[i]) for i in range(min(4, len(ds)))]))
    x0 = photos.permute(0, 3, 1, 2).float() / 127.5 - 1
    paths["forward"] = out / "forward_strip.png"
    viz.forward_strip(diff, x0, path=paths["forward"])
    paths["trajectory"] = out / "trajectory.png"
    viz.trajectory(model, diff, (4,) + diff.shape, path=paths["trajectory"], steps=steps,
                   device=device, clip=(-1.0, 1.0))
    paths["animation"] = out / "trajectory.gif"       # the same run, a frame per step
    viz.trajectory_frames(model, diff, (4,) + diff.shape, path=paths["animation"],
                          steps=steps, device=device, clip=(-1.0, 1.0))
    paths["variations"] = out / "variations.png"      # the photographs, halfway and back
    viz.variation_grid(model, diff, x0, diff.num_steps // 2, path=paths["variations"],
                       steps=steps, device=device, clip=(-1.0, 1.0))

    # 4. The quick benchmark.
    if bench:
        paths["bench_json"], paths["bench_plot"] = out / "bench.json", out / "bench.png"
        bench_args = ["--quick", "--device", device, "--json", str(paths["bench_json"]),
                      "--plot", str(paths["bench_plot"])]
        if smoke:
            bench_args += ["--cases", "dct2", "--shapes", "2x3x16x16", "--iters", "2",
                           "--warmup", "1", "--no-steps"]
        bench_main(bench_args)

    print(f"\n[demo] done in {(time.perf_counter() - t_start) / 60:.1f} min. Results:")
    for k, v in paths.items():
        print(f"  {k:<11} {v}")
    print(f"[demo] more pictures of this run:\n"
          f"  blurfast draw trajectory --ckpt {run_dir} --show both --out "
          f"{out / 'trajectory_both.png'}\n"
          f"  blurfast draw process --ckpt {run_dir} --no-noise --out {out / 'blur.png'}")
    return paths


def main(argv=None) -> int:
    # The docstring's first paragraph, without its reST quotes.
    from .cli import _Parser, flag_named
    description = " ".join(__doc__.split("\n\n")[0].split()).replace("``", "")
    p = _Parser(prog="blurfast demo", description=description)
    p.add_argument("--out", default="blurfast-demo", help="output folder (default blurfast-demo)")
    p.add_argument("--minutes", type=float, default=6.0,
                   help="training time budget in minutes (default 6)")
    p.add_argument("--data", default=None,
                   help="image folder, LSUN lmdb or prepared .npy (default: scikit-image's photos)")
    p.add_argument("--resolution", type=int, default=None,
                   help="default: a prepared --data array's side, else 64 on a GPU, 32 on a "
                        "CPU; a multiple of 8 (of 2 with --smoke)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available")
    p.add_argument("--no-bench", action="store_true", help="skip the quick benchmark")
    p.add_argument("--smoke", action="store_true", help="tiny everything, seconds (for tests)")
    a = p.parse_args(argv)
    try:
        _check_args(a.minutes, a.resolution, a.smoke, "--", a.device)
    except ValueError as e:
        p.error(str(e))
    try:
        run(a.out, a.minutes, a.data, a.resolution, a.device, a.smoke, not a.no_bench)
    except ValueError as e:          # run() names its argument (data: ...), this its flag
        raise ValueError(flag_named(p, str(e))) from e
    return 0
