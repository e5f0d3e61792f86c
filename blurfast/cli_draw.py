"""``blurfast draw``: the pictures of blur diffusion from the command line.

``draw trajectory`` shows a trained model's coarse-to-fine synthesis, ``draw process`` the
forward process on real images (a run's, or one given by flags before any training),
``draw curves`` a run's loss, gradient norm, speed and FID.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .checks import check_gpu_seen, check_int
from .ops import _SEED_LIMIT                    # seeds the noise ops take: below it

_S = argparse.SUPPRESS


def _run_set(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with keyword arguments a run's config set: a ValueError
    about one of them is --data's (the run's value does not fit the data given), not the
    flag's that the command line would otherwise name (cli.flag_named)."""
    try:
        return fn(*args, **kwargs)
    except ValueError as e:
        name, sep, rest = str(e).partition(": ")
        if sep and name in kwargs and name != "arg":
            raise ValueError(f"--data: the run's {name} {rest}") from None
        raise


def _pixels(text: str) -> int:
    """argparse type: an image side of at least 8 pixels."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an image side >= 8, got {text!r}") from None
    if v < 8:
        raise argparse.ArgumentTypeError(f"expected an image side >= 8, got {v}")
    return v


def register(sub) -> None:
    from .data import DEFAULT_RESIZE, PIXEL_RANGES, RESIZE_MODES
    from .cli import add_reverse_run_flags
    from .cli_train import _show_defaults, add_diffusion_flags
    from .viz import TRAJECTORY_ROWS

    d = sub.add_parser(
        "draw", help="pictures: a model's coarse-to-fine synthesis, the forward process, "
                     "a run's curves",
        description="Draws one picture as PNG (written whole, or not at all) and prints "
                    "what its columns show.")
    what = d.add_subparsers(dest="picture", metavar="PICTURE", required=True)

    t = what.add_parser(
        "trajectory", help="a trained model's reverse run: the state and the model's "
                           "estimate of x0 at evenly spaced steps, then the sample",
        description="One reverse run of a trained model, drawn at evenly spaced model "
                    "calls: per image a row of x_t (noise and blur giving way) and a row of "
                    "the model's x0 estimate (the image appearing coarse to fine), the "
                    "sample last. The last column is the image `blurfast sample` makes "
                    "with the same sampler, steps and seed in fp32.")
    add_reverse_run_flags(t)
    t.add_argument("--out", default="trajectory.png",
                   help="PNG to write (default trajectory.png); a .gif name writes an "
                        "animation instead, a frame per model call (--columns unused), the "
                        "sample held last")
    t.add_argument("--n", type=int, default=4, help="images, one or two rows each (default 4)")
    t.add_argument("--columns", type=int, default=10,
                   help="steps shown before the sample (default 10; every call if fewer)")
    t.add_argument("--show", choices=TRAJECTORY_ROWS, default="both",
                   help="rows per image: the estimate x0_hat, the state x_t, or both "
                        "(default both)")
    t.add_argument("--steps", type=int, default=None,
                   help="model calls (default 100, or N-1 where the run's chain is shorter; "
                        "0 = the full chain N-1..1)")
    t.add_argument("--seed", type=int, default=0,
                   help="the images of blurfast sample's indices 0..n-1 with this seed "
                        "(default 0)")
    t.add_argument("--no-progress", action="store_true",
                   help="no progress bar over the model calls")
    t.set_defaults(func=_trajectory)

    p = what.add_parser(
        "process", argument_default=_S,
        help="the forward process on real images: x_i at i = 0, N/10, ..., N",
        description="The forward process x_i = q_sample(x_0, i) on images of a dataset, "
                    "one row per image, all columns with the same noise: how much blur and "
                    "noise each step adds. With --ckpt, the run's process and training "
                    "data (--data overrides it); without, the process the flags below "
                    "define (BlurDiffusion's defaults: the paper's), to choose one before "
                    "training.")
    p.add_argument("--ckpt", help="a run directory, checkpoint directory or .safetensors "
                                  "file whose process and data to draw")
    p.add_argument("--data", metavar="PATH",
                   help="prepared .npy array, LSUN lmdb directory or image folder (default: "
                        "the run's)")
    p.add_argument("--out", default="process.png", help="PNG to write (default process.png)")
    p.add_argument("--n", type=int, default=4,
                   help="images, evenly spaced through the dataset (default 4)")
    p.add_argument("--columns", type=int, default=10,
                   help="steps after x_0: i = k N / columns (default 10)")
    p.add_argument("--seed", type=int, default=0, help="the noise (default 0)")
    p.add_argument("--no-noise", action="store_true", default=False,
                   help="x_i's mean instead: the blur and the fading of the signal without "
                        "the noise that hides them at most steps")
    g = p.add_argument_group("without --ckpt")
    g.add_argument("--resolution", type=_pixels,
                   help="image side (default: a prepared array's own, else 64)")
    g.add_argument("--channels", type=int, choices=[1, 3],
                   help="image channels (default: a prepared array's own, else 3)")
    g.add_argument("--resize", choices=RESIZE_MODES,
                   help=f"for image folders and lmdb (default {DEFAULT_RESIZE})")
    g.add_argument("--pixel-range", dest="pixel_range", choices=PIXEL_RANGES,
                   help="pixel values the process acts on (default -1,1)")
    add_diffusion_flags(g)
    _show_defaults(p)
    p.set_defaults(func=_process)

    c = what.add_parser(
        "curves", help="a run's loss, gradient norm, images/s and FID against the step",
        description="The curves of a run from its log.csv (and fid.csv): what training "
                    "writes as RUN_DIR/curves.png at each checkpoint, drawn now.")
    c.add_argument("run", metavar="RUN_DIR", help="run directory")
    c.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/curves.png)")
    c.set_defaults(func=_curves)


def _check_out(out, gif: bool = False) -> Path:
    from .fileio import check_writable
    if Path(out).suffix.lower() not in ((".png", ".gif") if gif else (".png",)):
        what = "a .png or .gif file name (a picture or an animation)" if gif else \
            "a .png file name (the picture is a PNG)"
        raise ValueError(f"--out: expected {what}, got {str(out)!r}")
    check_writable("--out", out)
    return Path(out)


def _trajectory(args) -> int:
    import torch

    from . import checkpoint as ckpt
    from . import viz
    from .cli import ema_weights
    from .data import data_range
    from .generate import resolve_checkpoint
    from .sampling import check_eta

    check_int("--n", args.n, 1)
    check_int("--columns", args.columns, 1)
    check_int("--steps", args.steps, 0, none_ok=True)
    check_int("--seed", args.seed, 0, _SEED_LIMIT - 1)
    check_eta(args.sampler, args.eta, "--eta")
    out = _check_out(args.out, gif=True)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        check_gpu_seen("--device")
    path = resolve_checkpoint(args.ckpt)
    model, diff, config = ckpt.load_model(path, ema=ema_weights(args), device=device)
    pixel_range = config.get("pixel_range", "-1,1")
    steps = min(100, diff.num_steps - 1) if args.steps is None else args.steps
    if steps > diff.num_steps - 1:
        raise ValueError(f"--steps: expected an int in [0, {diff.num_steps - 1}] for this "
                         f"run's N = {diff.num_steps} (0 = the full chain), got {steps}")
    net = diff.eps_model(model, config.get("target", "eps"))
    gif = out.suffix.lower() == ".gif"
    kw = dict(path=out, sampler=args.sampler, steps=None if steps == 0 else steps,
              seed=args.seed, eta=args.eta, spacing=args.spacing, show=args.show,
              pixel_range=pixel_range, device=device, clip=data_range(pixel_range),
              progress=not args.no_progress)
    with torch.no_grad():
        if gif:
            _, shown = viz.trajectory_frames(net, diff, (args.n,) + diff.shape, **kw)
        else:
            _, shown = viz.trajectory(net, diff, (args.n,) + diff.shape, num=args.columns,
                                      **kw)
    rows = {"both": "x_t above x0_hat", "x_t": "x_t", "x0_hat": "x0_hat"}[args.show]
    what = (f"{args.sampler}, a frame per model call ({len(shown) - 1}), then the sample "
            f"held" if gif else
            f"{args.sampler} at steps {', '.join(map(str, shown[:-1]))}, then the sample")
    print(f"wrote {out}: {args.n} image{'s' if args.n != 1 else ''} ({rows}) from {path}, "
          f"{what}")
    return 0


def _process(args) -> int:
    import torch

    from . import viz
    from .cli_train import DIFFUSION_KEYS
    from .data import DEFAULT_RESIZE, open_dataset, to_float
    from .diffusion import BlurDiffusion

    check_int("--n", args.n, 1)
    check_int("--columns", args.columns, 1)
    check_int("--seed", args.seed, 0, _SEED_LIMIT - 1)
    given = vars(args)
    out = _check_out(args.out)
    flags = {k: given[k] for k in DIFFUSION_KEYS if k in given}
    image = ("resolution", "channels", "resize", "pixel_range")
    if "ckpt" in given:
        from . import checkpoint as ckpt
        from .generate import resolve_checkpoint
        loose = [f"--{k.replace('_', '-')}" for k in (*image, *flags) if k in given]
        if loose:
            raise ValueError(f"{', '.join(loose)}: the run's own are drawn with --ckpt; "
                             f"leave them out, or leave out --ckpt")
        path = resolve_checkpoint(args.ckpt)
        config = ckpt.stored_config(path)
        diff = BlurDiffusion(**config["diffusion"])
        data = given.get("data")        # open_dataset says what is wrong with one given
        if data is None:
            data = config.get("data")
            if not data or not Path(data).exists():
                raise ValueError(f"--data: the run's data {data!r} is not here (a relative "
                                 f"path is read from the current folder); give --data PATH")
        ds = _run_set(open_dataset, data, resolution=diff.H,
                      resize=config.get("resize", DEFAULT_RESIZE), channels=diff.channels,
                      arg="--data")
        pixel_range = config.get("pixel_range", "-1,1")
    else:
        if "data" not in given:
            raise ValueError("--data: required without --ckpt (or give --ckpt RUN_DIR)")
        data = args.data
        prepared = Path(data).is_file()       # a prepared array knows its own size
        ds = open_dataset(data, resolution=given.get("resolution", None if prepared else 64),
                          resize=given.get("resize", DEFAULT_RESIZE),
                          channels=given.get("channels", None if prepared else 3), arg="--data")
        diff = BlurDiffusion(resolution=ds.resolution, channels=ds.channels, **flags)
        pixel_range = given.get("pixel_range", "-1,1")
    if args.columns > diff.num_steps:
        raise ValueError(f"--columns: expected at most N = {diff.num_steps}, got {args.columns}")
    if len(ds) == 0:
        raise ValueError(f"--data: no images in {data}")
    n = min(args.n, len(ds))
    picks = [round(k * (len(ds) - 1) / max(n - 1, 1)) for k in range(n)]
    x0 = to_float(ds.__getitems__(picks), None, pixel_range).contiguous()
    _, steps = viz.forward_strip(diff, x0, path=out, seed=args.seed, num=args.columns,
                                 pixel_range=pixel_range, noise=not args.no_noise)
    print(f"wrote {out}: {n} image{'s' if n != 1 else ''} of {data} (numbers "
          f"{', '.join(map(str, picks))}), {'the mean of x_i' if args.no_noise else 'x_i'} at "
          f"i = {', '.join(map(str, steps))} of N = {diff.num_steps}")
    return 0


def _curves(args) -> int:
    from . import viz
    run = Path(args.run)
    if not run.is_dir():
        raise ValueError(f"RUN_DIR: {args.run!r} is not a directory")
    if not (run / "log.csv").is_file():
        raise ValueError(f"RUN_DIR: no log.csv in {args.run!r}")
    if not viz._read_columns(run / "log.csv", ["step"])["step"]:
        raise ValueError(f"RUN_DIR: the log.csv of {args.run!r} has no rows yet (training "
                         f"writes one every --log-every steps)")
    out = _check_out(args.out) if args.out is not None else None
    print(f"wrote {viz.training_curves(run, out)}")
    return 0
