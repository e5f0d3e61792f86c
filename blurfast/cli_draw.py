"""``blurfast draw``: the pictures of blur diffusion from the command line.

``draw trajectory`` shows a trained model's coarse-to-fine synthesis, ``draw process`` the
forward process on real images (a run's, or one given by flags before any training),
``draw variations`` a trained model's variations of real images (SDEdit), ``draw curves``
a run's loss, gradient norm, speed and FID, ``draw bench`` a GPU bench result against the
goals of issues 6 and 4.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .checks import check_gpu_seen, check_int
from .console import plural
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
                     "variations of real images, a run's curves",
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
                        "animation instead, a frame per model call up to --frames "
                        "(--columns unused), the sample held last")
    t.add_argument("--n", type=int, default=4, help="images, one or two rows each (default 4)")
    t.add_argument("--columns", type=int, default=10,
                   help="steps shown before the sample (default 10; every call if fewer)")
    t.add_argument("--frames", type=int, default=100,
                   help="with a .gif --out: at most this many frames before the sample, "
                        "evenly spaced model calls (default 100; every call if fewer)")
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
                   help="no progress bar over the model calls (drawn only when stderr is a "
                        "terminal)")
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
    p.add_argument("--ckpt", help="a run directory, folder of checkpoints, checkpoint "
                                  "directory or .safetensors file whose process and data to "
                                  "draw")
    p.add_argument("--data", metavar="PATH",
                   help="prepared .npy array, LSUN lmdb directory, image folder, or a "
                        "blurfast sample output (its images alone, as fid reads it) "
                        "(default: the run's)")
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
                   help="image side (default: a prepared array's or sample run's own, "
                        "else 64)")
    g.add_argument("--channels", type=int, choices=[1, 3],
                   help="image channels (default: a prepared array's or sample run's own, "
                        "else 3)")
    g.add_argument("--resize", choices=RESIZE_MODES,
                   help=f"for image folders and lmdb (default {DEFAULT_RESIZE})")
    g.add_argument("--pixel-range", dest="pixel_range", choices=PIXEL_RANGES,
                   help="pixel values the process acts on (default -1,1)")
    add_diffusion_flags(g)
    _show_defaults(p)
    p.set_defaults(func=_process)

    v = what.add_parser(
        "variations", help="a trained model's variations of real images: each image "
                           "blurred and noised to a step, then run back from there",
        description="Per image of a dataset (the run's, or --data) a row: the image, what "
                    "the run's process keeps of it at step round(strength x (N-1)) (x_i's "
                    "mean: blurred and faded; the reverse run starts from it plus noise), "
                    "then variations of it, each run back from there with its own noise "
                    "(SDEdit). A low --strength keeps the image's coarse layout and colours "
                    "and draws its details anew; 1 keeps little more than a sample from the "
                    "prior does.")
    add_reverse_run_flags(v)
    v.add_argument("--data", default=None, metavar="PATH",
                   help="prepared .npy array, LSUN lmdb directory, image folder, or a "
                        "blurfast sample output (its images alone, as fid reads it) "
                        "(default: the run's)")
    v.add_argument("--out", default="variations.png",
                   help="PNG to write (default variations.png)")
    v.add_argument("--n", type=int, default=4,
                   help="images, evenly spaced through the dataset, one row each (default 4)")
    v.add_argument("--variations", type=int, default=4,
                   help="variations of each image (default 4)")
    v.add_argument("--strength", type=float, default=0.5,
                   help="how far into the process the images go before the run back, in "
                        "(0, 1]: the step round(strength x (N-1)) (default 0.5)")
    v.add_argument("--steps", type=int, default=None,
                   help="model calls from that step down (default: 100, or every step where "
                        "there are fewer)")
    v.add_argument("--seed", type=int, default=0, help="the noise (default 0)")
    v.add_argument("--no-progress", action="store_true",
                   help="no progress bar over the model calls (drawn only when stderr is a "
                        "terminal)")
    v.set_defaults(func=_variations)

    c = what.add_parser(
        "curves", help="a run's loss, gradient norm, images/s and FID against the step",
        description="The curves of a run from its log.csv (and fid.csv): what training "
                    "writes as RUN_DIR/curves.png with each sample grid and at the end, "
                    "drawn now.")
    c.add_argument("run", metavar="RUN_DIR", help="run directory")
    c.add_argument("--out", default=None, help="PNG to write (default RUN_DIR/curves.png)")
    c.set_defaults(func=_curves)

    from .bench_chart import CHART_IMPLS
    b = what.add_parser(
        "bench", help="a GPU bench result against the kernel and training-step goals",
        description="A results JSON of a GPU run (blurfast bench --json, or a merged run "
                    "under benchmarks/results/) against the goals of issues 6 and 4: the "
                    "float32 kernels' share of a device copy's bandwidth, every op's time "
                    "at the paper's batch of 16, and paper64's training step, each goal a "
                    "dashed line.")
    b.add_argument("result", metavar="RESULT", help="results JSON of a GPU run")
    b.add_argument("--out", default=None, help="PNG to write (default: RESULT with .png)")
    b.add_argument("--impl", dest="impls", action="append", default=None, metavar="IMPL",
                   help=f"a kernel implementation to draw, repeatable (default: those of "
                        f"{', '.join(CHART_IMPLS)} that RESULT has)")
    b.set_defaults(func=_bench)


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
    from .console import bars_on
    from .data import data_range
    from .generate import resolve_checkpoint
    from .sampling import check_eta, timesteps

    check_int("--n", args.n, 1)
    check_int("--columns", args.columns, 1)
    check_int("--frames", args.frames, 1)
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
              progress=bars_on(args.no_progress))
    with torch.no_grad():
        if gif:
            _, shown = viz.trajectory_frames(net, diff, (args.n,) + diff.shape,
                                             frames=args.frames, **kw)
        else:
            _, shown = viz.trajectory(net, diff, (args.n,) + diff.shape, num=args.columns,
                                      **kw)
    rows = {"both": "x_t above x0_hat", "x_t": "x_t", "x0_hat": "x0_hat"}[args.show]
    calls = len(timesteps(diff, None if steps == 0 else steps, args.spacing))
    what = (f"{args.sampler}, {len(shown) - 1} frames of {calls} model calls, then the "
            f"sample held" if gif else
            f"{args.sampler} at steps {', '.join(map(str, shown[:-1]))}, then the sample")
    print(f"wrote {out}: {args.n} {plural(args.n, 'image')} ({rows}) from {path}, {what}")
    return 0


def _process(args) -> int:
    from . import viz
    from .cli_train import DIFFUSION_KEYS
    from .data import DEFAULT_RESIZE, to_float
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
        data, ds = _run_data(given.get("data"), config, diff)
        pixel_range = config.get("pixel_range", "-1,1")
    else:
        if "data" not in given:
            raise ValueError("--data: required without --ckpt (or give --ckpt RUN_DIR)")
        data = args.data
        # a prepared array or a `blurfast sample` run knows its own size
        from .evaluation import sample_run
        own = Path(data).is_file() or (Path(data).is_dir() and sample_run(data))
        ds = _open_data(data, resolution=given.get("resolution", None if own else 64),
                        resize=given.get("resize", DEFAULT_RESIZE),
                        channels=given.get("channels", None if own else 3))
        diff = BlurDiffusion(resolution=ds.resolution, channels=ds.channels, **flags)
        pixel_range = given.get("pixel_range", "-1,1")
    if args.columns > diff.num_steps:
        raise ValueError(f"--columns: expected at most N = {diff.num_steps}, got {args.columns}")
    if len(ds) == 0:
        raise ValueError(f"--data: no images in {data}")
    picks = _evenly(ds, args.n)
    n = len(picks)
    x0 = to_float(ds.__getitems__(picks), None, pixel_range).contiguous()
    _, steps = viz.forward_strip(diff, x0, path=out, seed=args.seed, num=args.columns,
                                 pixel_range=pixel_range, noise=not args.no_noise)
    print(f"wrote {out}: {n} {plural(n, 'image')} of {data} ({plural(n, 'number')} "
          f"{', '.join(map(str, picks))}), "
          f"{'the mean of x_i' if args.no_noise else 'x_i'} at i = "
          f"{', '.join(map(str, steps))} of N = {diff.num_steps}")
    return 0


def _open_data(data, resolution, resize: str, channels):
    """``open_dataset(data, ...)`` naming --data; a `blurfast sample` output (its folder
    or its samples.npz) gives the images its manifest lists, as fid reads them
    (evaluation.load_images: never its contact sheet; an unfinished run is refused), at
    ``resolution`` and ``channels`` (None: their own)."""
    from .data import ImageArrays, open_dataset
    from .evaluation import load_images, sample_run
    p = Path(data)
    if not p.exists() or sample_run(p) is None:
        return open_dataset(data, resolution=resolution, resize=resize, channels=channels,
                            arg="--data")
    try:
        images = list(load_images(p))
    except ValueError as e:             # load_images names its argument "samples"
        raise ValueError(f"--data: {str(e).partition(': ')[2]}") from None
    return ImageArrays(images, resolution, resize, channels)


def _run_data(data, config: dict, diff):
    """``(path, dataset)`` of ``--data`` (default: the run's own data, from its
    ``config``), read at the run's size, resize and channels."""
    from .data import DEFAULT_RESIZE
    if data is None:          # open_dataset says what is wrong with one given
        data = config.get("data")
        if not data or not Path(data).exists():
            raise ValueError(f"--data: the run's data {data!r} is not here (a relative "
                             f"path is read from the current folder); give --data PATH")
    ds = _run_set(_open_data, data, resolution=diff.H,
                  resize=config.get("resize", DEFAULT_RESIZE), channels=diff.channels)
    if len(ds) == 0:
        raise ValueError(f"--data: no images in {data}")
    return data, ds


def _evenly(ds, n: int) -> list:
    """The indices of ``n`` images spread evenly through ``ds`` (all, if it has fewer)."""
    n = min(n, len(ds))
    return [round(k * (len(ds) - 1) / max(n - 1, 1)) for k in range(n)]


def _variations(args) -> int:
    import torch

    from . import checkpoint as ckpt
    from . import viz
    from .cli import ema_weights
    from .console import bars_on
    from .data import data_range, to_float
    from .generate import resolve_checkpoint
    from .sampling import check_eta

    check_int("--n", args.n, 1)
    check_int("--variations", args.variations, 1)
    if args.steps is not None:        # not given: the default below
        check_int("--steps", args.steps, 1)
    check_int("--seed", args.seed, 0, _SEED_LIMIT - 1)
    if not 0 < args.strength <= 1:
        raise ValueError(f"--strength: expected a number in (0, 1], got {args.strength}")
    check_eta(args.sampler, args.eta, "--eta")
    out = _check_out(args.out)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        check_gpu_seen("--device")
    path = resolve_checkpoint(args.ckpt)
    model, diff, config = ckpt.load_model(path, ema=ema_weights(args), device=device)
    data, ds = _run_data(args.data, config, diff)
    start = max(1, round(args.strength * (diff.num_steps - 1)))
    steps = min(100, start) if args.steps is None else args.steps
    if steps > start:
        raise ValueError(f"--steps: expected at most {start}, the start that --strength "
                         f"{args.strength} gives (N = {diff.num_steps}), got {steps}")
    pixel_range = config.get("pixel_range", "-1,1")
    picks = _evenly(ds, args.n)
    x0 = to_float(ds.__getitems__(picks), None, pixel_range).contiguous()
    net = diff.eps_model(model, config.get("target", "eps"))
    with torch.no_grad():
        viz.variation_grid(net, diff, x0, start, path=out, count=args.variations,
                           sampler=args.sampler, steps=steps, eta=args.eta,
                           spacing=args.spacing, seed=args.seed, pixel_range=pixel_range,
                           device=device, clip=data_range(pixel_range),
                           progress=bars_on(args.no_progress))
    n = len(picks)
    print(f"wrote {out}: {n} {plural(n, 'image')} of {data} ({plural(n, 'number')} "
          f"{', '.join(map(str, picks))}), each with its mean at step {start} of "
          f"N = {diff.num_steps}, then {args.variations} "
          f"{plural(args.variations, 'variation')} ({args.sampler}, {steps} model calls)")
    return 0


def _curves(args) -> int:
    from . import viz
    run = Path(args.run)
    if not run.is_dir():
        raise ValueError(f"RUN_DIR: {args.run!r} is not a directory")
    out = _check_out(args.out) if args.out is not None else None
    print(f"wrote {viz.training_curves(run, out, arg='RUN_DIR')}")
    return 0


def _bench(args) -> int:
    from .bench import read_result
    from .bench_chart import goals_chart
    result = read_result(args.result, "RESULT")
    out = _check_out(args.out if args.out is not None else
                     Path(args.result).with_suffix(".png"))
    panels = goals_chart(result, out, impls=args.impls, arg="RESULT")
    print(f"wrote {out}: {result['gpu']}, {str(result['date'])[:10]}; "
          + "; ".join(f"{p['title']} ({len(p['groups'])} {plural(len(p['groups']), 'group')})"
                      for p in panels))
    return 0
