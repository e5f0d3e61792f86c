"""The ``blurfast`` command line: info, prepare, train, sample, fid, draw, bench, demo.

Each command's options are documented by ``blurfast COMMAND --help``.
"""
from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

from .console import bars_on, plural


def _info(args) -> int:
    """Prints :func:`_print_info`'s lines. Under torchrun each rank prints them, and the
    device it trains and samples on, each line after its rank (``rank 1: ...``): ranks on
    other machines may see other GPUs and builds. ``blurfast info DATA``: a prepared
    array instead (:func:`_info_data`)."""
    if args.data is not None:
        return _info_data(args.data)
    import contextlib
    import io

    from .distributed import env_world_rank, rank_device
    world = env_world_rank()[0]
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        _print_info()
    lines = text.getvalue().splitlines()
    if world > 1:           # the device train and sample take where no --device is given
        try:
            dev = rank_device(None, world)
            lines.append(f"device: {dev} (LOCAL_RANK {dev.index})" if dev.type == "cuda"
                         else "device: cpu (torch sees no GPU)")
        except ValueError as e:
            lines.append(f"device: none: {str(e).removeprefix('device: ')}, or --device cpu "
                         f"(runs on the CPU)")
    prefix = rank_prefix()
    sys.stdout.write("".join(f"{prefix}{line}\n" for line in lines))   # one write per rank
    sys.stdout.flush()
    return 0


def _print_info() -> None:
    import torch

    from . import __version__
    from ._backend import HAS_CUDA_KERNELS, archs_run_on, backend_for, describe_archs

    print(f"blurfast {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    if HAS_CUDA_KERNELS:
        print(f"CUDA kernels: compiled for {describe_archs()}")
        print("  fused, one launch per call: square planes 32, 64, 128 with float32, float16 or\n"
              "  bfloat16 I/O (at 128: 128 KiB of shared memory per block, 192 KiB with x2 or\n"
              "  returned noise); strip passes for sides 32..256, the fused op there in three\n"
              "  passes (row, column with the combine and noise, row); simple kernels otherwise.\n"
              "  BLURFAST_CUDA_KERNELS=dense: the previous (dense) passes; =fast+prefetch or\n"
              "  =fast+noprefetch: prefetch the next plane group in every call or in none;\n"
              "  =fast+wide: every call at 64 x 64 on the fast passes, 256 threads per plane\n"
              "  (the default for float32 fused calls at 64 x 64); =fast+separate: the fused\n"
              "  op at 256 x 256 in six strip passes and a combine kernel; =fast+fill: its three\n"
              "  passes in chunks that fill the GPU rather than half its L2;\n"
              "  =simple: the simple kernels only.")
    else:
        print("CUDA kernels: not compiled (CPU kernels only)")
    from . import _C
    builds = {"avx2": "AVX2 + FMA build (vectors of 8 floats or 4 doubles)",
              "baseline": "baseline x86-64 build (vectors of 4 floats or 2 doubles)",
              "portable": "portable build (vectors of 4 floats or 2 doubles)"}
    print(f"CPU kernels: {builds.get(_C.cpu_build(), _C.cpu_build())}: planes with\n"
          "  power-of-two sides 8..256 on the vector passes, matrix products otherwise;\n"
          "  BLURFAST_CPU_KERNELS=baseline: the baseline build.")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            smem = getattr(torch.cuda.get_device_properties(i), "shared_memory_per_block_optin",
                           None)
            extra = f", {smem // 1024} KiB shared memory per block" if smem else ""
            runs = archs_run_on(cap) if HAS_CUDA_KERNELS else None
            note = {True: "", None: "", False: "; this build has no code for it: rebuild with "
                    f"BLURFAST_CUDA_ARCHS={cap[0]}{cap[1]}"}[runs]
            if cap[0] == 7:      # float16 tensor cores, no bfloat16: fp32 by default
                note += "; no bfloat16: --precision fp16 uses its tensor cores"
            print(f"GPU {i}: {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]}{extra}{note})")
    else:
        print("GPU: none seen by torch")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op in ("dct2", "idct2", "spectral", "gaussian_blur"):
        where = ", ".join(f"{d}: {backend_for(d)}" for d in devices)
        print(f"op {op:<14} {where}")


def _info_data(path) -> int:
    """``blurfast info DATA``: a prepared array's shape and resize mode."""
    from .data import PreparedArray
    ds = PreparedArray(path, arg="DATA")
    how = ds.resize or "not recorded (prepared by an older blurfast, or not by prepare)"
    print(f"{path}: prepared array of {ds.length} images, {ds.resolution}x{ds.resolution}, "
          f"{ds.channels} {plural(ds.channels, 'channel')}, resize {how}")
    return 0


def _add_fid(sub) -> None:
    s = sub.add_parser("fid", help="FID of generated samples against reference data (clean-fid)",
                       description="FID with clean-fid's resizing and InceptionV3. Reference "
                       "statistics are computed once, with the training preprocessing, and "
                       "cached under $BLURFAST_CACHE/fid (default ~/.cache/blurfast/fid). "
                       "Prints the images used from each side, then the FID; warns when a "
                       "side has no more images than InceptionV3 has features (2048): the FID "
                       "is then biased high.")
    s.add_argument("--samples", default=None,
                   help="folder of images or .npz of uint8 (N,H,W,C); required but with --check. "
                        "A folder made by blurfast sample gives the images its samples.json "
                        "lists; an unfinished one is refused")
    s.add_argument("--ref", required=True,
                   help="image folder, LSUN lmdb, prepared .npy array, STATS.npz (mu, sigma), "
                        "or another blurfast sample output (its folder or samples.npz: "
                        "its images alone, at their own size)")
    s.add_argument("--n", type=int, default=10_000,
                   help="images used from each side (default 10000); more than a folder made "
                        "by blurfast sample holds is an error")
    s.add_argument("--resolution", type=positive_int, default=None,
                   help="reference preprocessing resolution (default: the samples')")
    from .data import DEFAULT_RESIZE, RESIZE_MODES
    s.add_argument("--resize", choices=RESIZE_MODES, default=DEFAULT_RESIZE,
                   help=f"reference preprocessing of folders and lmdb, as for training: give "
                        f"the run's (default {DEFAULT_RESIZE}, as train's; a prepared array is "
                        f"used as it is)")
    s.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="image channels (default: the samples' own); a reference folder or "
                        "lmdb is read so, a prepared array must match (a STATS.npz, which "
                        "does not record them, is used as it is)")
    s.add_argument("--inception", default=None,
                   help="clean-fid's inception-2015-12-05.pt (file or folder); default where "
                        "clean-fid keeps it (/tmp)")
    s.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available")
    s.add_argument("--batch", type=positive_int, default=64,
                   help="images per Inception batch (default 64)")
    s.add_argument("--save-stats", default=None, metavar="STATS.npz",
                   help="also write the reference mu/sigma (and image count; with --kid its "
                        "features) here, for --ref; checked before any work")
    s.add_argument("--kid", action="store_true",
                   help="also the KID (kernel inception distance, unbiased in the image count: "
                        "for comparing runs scored on few images): its mean and spread over "
                        "100 random subsets of up to 1000 images of each side. Needs the "
                        "reference's features: its images, or a STATS.npz that --save-stats "
                        "wrote with --kid (the cache keeps them)")
    s.add_argument("--no-cache", action="store_true", help="do not read or write the stats cache")
    s.add_argument("--features", default=None, metavar="MODULE:FUNCTION",
                   help="a custom feature extractor instead of InceptionV3 (a function of float "
                        "images (B,3,299,299) in [0,255] returning (B, D) features)")
    s.add_argument("--check", action="store_true",
                   help="only load the feature extractor (InceptionV3: its weights, found or "
                        "downloaded) and check --ref, then exit: run it before making samples")
    s.add_argument("--no-progress", action="store_true",
                   help="no progress bars over the images (drawn only when stderr is a "
                        "terminal)")
    s.set_defaults(func=_fid)


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    return _int_at_least(text, 1, "a positive int")


def nonnegative_int(text: str) -> int:
    """argparse type: an int >= 0."""
    return _int_at_least(text, 0, "an int >= 0")


def _int_at_least(text: str, lo: int, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = lo - 1
    if v < lo:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def _fid(args) -> int:
    import torch

    from . import evaluation as ev
    from .checks import check_gpu_seen
    from .fileio import check_writable
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        check_gpu_seen("--device")
    if args.n < 2:
        raise ValueError(f"--n: expected an int >= 2, got {args.n}")
    if args.save_stats:
        check_writable("--save-stats", args.save_stats)
    ev.check_reference(args.ref, args.resolution, args.channels, name="--ref", kid=args.kid)
    if args.features:
        import importlib
        mod, _, fn = args.features.partition(":")
        try:
            extractor = getattr(importlib.import_module(mod), fn or "features")
        except (ImportError, AttributeError) as e:
            raise ValueError(f"--features: cannot load {args.features!r} ({e}); give "
                             f"MODULE:FUNCTION with MODULE importable (on PYTHONPATH)") from None
    else:
        extractor = ev.inception_extractor(args.inception, device=device)
    if args.check:
        print(f"ok: features {getattr(extractor, 'name', args.features)} loaded on {device}, "
              f"reference {args.ref} found")
        return 0
    if args.samples is None:
        raise ValueError("--samples: required (a folder of images or .npz), except with --check")
    value = ev.fid(args.samples, args.ref, n=args.n, resolution=args.resolution,
                   resize=args.resize, feature_extractor=extractor, device=device,
                   batch_size=args.batch, cache=not args.no_cache, channels=args.channels,
                   save_stats=args.save_stats or None, kid=args.kid,
                   progress=bars_on(args.no_progress))
    print(f"samples: {value.samples} images from {args.samples}")
    print(f"reference: statistics of {args.ref} (image count not recorded)" if value.ref is None
          else f"reference: {value.ref} images from {args.ref}")
    print(f"FID {value:.4f}")
    if args.kid:
        print(f"KID {value.kid:.6f} (standard deviation {value.kid_std:.6f} over "
              f"{ev.KID_SUBSETS} subsets of {value.kid_subset} images)")
    return 0


def add_reverse_run_flags(p) -> None:
    """The flags of a reverse run of a trained model that `sample` and `draw trajectory`
    share: the checkpoint, the sampler, eta, the spacing, the device and the weights."""
    from .sampling import ETA_SAMPLERS, SAMPLERS
    p.add_argument("--ckpt", required=True,
                   help="run directory or folder of checkpoints (its newest valid checkpoint: "
                        "RUN_DIR/best for the best FID), checkpoint directory, or "
                        ".safetensors file")
    p.add_argument("--sampler", default="ddim", choices=list(SAMPLERS),
                   help="ddim (default), ancestral, reverse_sde (the paper's) or exp2m (second "
                        "order, best at 25-100 steps)")
    p.add_argument("--eta", type=float, default=0.0,
                   help=f"DDIM eta in [0, 1] ({' and '.join(ETA_SAMPLERS)} only; default 0)")
    p.add_argument("--spacing", default="uniform", choices=["uniform", "quadratic"],
                   help="which steps of 1..N the model is called at (default uniform)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda if available")
    p.add_argument("--raw-weights", action="store_true",
                   help="use the raw model weights instead of the EMA weights (of a run "
                        "or checkpoint directory; a .safetensors file is loaded as it is, "
                        "and the flag with one is an error)")


def ema_weights(args) -> bool:
    """The ``ema`` of a loaded model under --raw-weights, which picks one of the two files
    of a run's or checkpoint's directory; refused with a file, which is loaded as it is."""
    if args.raw_weights and Path(args.ckpt).is_file():
        raise ValueError(f"--raw-weights: picks model.safetensors over ema.safetensors in a "
                         f"run or checkpoint directory; the file given ({args.ckpt}) is "
                         f"loaded as it is: give the directory, or model.safetensors without "
                         f"--raw-weights")
    return not args.raw_weights


def out_of_memory_line(e: BaseException, advice: str = "") -> str:
    """The one-line error of a CUDA out-of-memory ``e``; ``advice``: what to try."""
    first = str(e).splitlines()[0] if str(e) else "out of memory"
    return f"the GPU ran out of memory{advice} (torch: {first})"


def _add_sample(sub) -> None:
    s = sub.add_parser("sample", help="sample images from a trained run (EMA weights)",
                       description="Samples images from a checkpoint. Image i's noise depends "
                       "only on (seed, i), so the same command gives the same images on one "
                       "process or several under torchrun (ranks split the batches).")
    add_reverse_run_flags(s)
    # --n is also a prefix of torchrun's --nnodes, --nproc-per-node, ...: torchrun rejects it
    # as ambiguous even after the module name, so the long name comes first.
    s.add_argument("--num-samples", "--n", dest="n", type=int, default=10_000,
                   help="number of images (default 10000); --n is short for it, but torchrun "
                        "refuses --n, so write --num-samples under torchrun")
    from .sampling import ETA_SAMPLERS
    s.add_argument("--steps", type=int, default=None,
                   help="model calls, 0..N-1 (default 100, or the full chain N-1 where the "
                        "run's N-1 < 100; 0 = the full chain N-1..1)")
    eta_samplers = " and ".join(ETA_SAMPLERS)
    s.add_argument("--stochastic-first", type=float, default=0.0, metavar="FRACTION",
                   help=f"eta=1 on this first fraction of the model calls (of all N-1 "
                        f"with --steps 0), then --eta ({eta_samplers} only; 0.3 corrects "
                        "the prior's error, see docs/process.md)")
    s.add_argument("--batch", type=int, default=256, help="images per batch (default 256)")
    s.add_argument("--seed", type=int, default=0,
                   help="with the image index, fixes all of an image's noise (default 0)")
    s.add_argument("--out", required=True,
                   help="output folder; its samples.json, rewritten last, says whether the run "
                        "finished (fid refuses it until then); images of an earlier run "
                        "are removed (with --resume: those numbered --n or above)")
    s.add_argument("--format", dest="fmt", choices=["png", "npz"], default="png",
                   help="one PNG per image, or one .npz of uint8 (N, H, W, C) (default png)")
    s.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                   help="bf16 or fp16 autocast (fp16: for GPUs without bfloat16, such as "
                        "V100 and T4), or fp32 (default: bf16 on GPUs of compute capability "
                        "8.0 or newer, else fp32)")
    s.add_argument("--cuda-graph", action="store_true",
                   help="replay each step's model call from a CUDA graph")
    s.add_argument("--compile", action="store_true",
                   help="run the model under torch.compile: for long runs on a GPU (compiling "
                        "takes a minute or more; on a 2-core CPU, 48 s against 6 s for a "
                        "40-call run of 16 small-model images)")
    s.add_argument("--no-clip", action="store_true",
                   help="do not clamp the model's x0 estimate to the data range")
    s.add_argument("--resume", action="store_true",
                   help="keep the images that an interrupted run with the same flags (--n "
                        "aside) wrote into --out and sample only the rest: the images of an "
                        "uninterrupted run; a folder made with other flags is refused")
    s.add_argument("--no-progress", action="store_true",
                   help="no progress bar (on a terminal: one tick per model call, images "
                        "done beside it; elsewhere a line per finished batch); the closing line "
                        "saying what was written stays")
    s.set_defaults(func=_sample)


def _default_num_steps() -> int:
    """BlurDiffusion's N where a stored config does not name one."""
    import inspect

    from .diffusion import BlurDiffusion
    return inspect.signature(BlurDiffusion).parameters["num_steps"].default


def _sample(args) -> int:
    from .checkpoint import stored_config
    from .generate import check_arguments, generate, resolve_checkpoint
    from .sampling import check_eta, eta_first
    check_eta(args.sampler, args.eta, "--eta")
    if not 0 <= args.stochastic_first <= 1:
        raise ValueError(f"--stochastic-first: expected a fraction in [0, 1], got "
                         f"{args.stochastic_first}")
    check_eta(args.sampler, args.stochastic_first, "--stochastic-first")
    kw = dict(sampler=args.sampler, batch=args.batch, seed=args.seed, fmt=args.fmt,
              precision=args.precision, ema=ema_weights(args), cuda_graph=args.cuda_graph,
              compile=args.compile, clip=not args.no_clip, resume=args.resume,
              progress=not args.no_progress)
    check_arguments(args.n, args.out, eta=args.eta, **kw)    # before the checkpoint is read
    # Resolved once here (generate takes the checkpoint directory as it is): its N bounds
    # --steps, and the full chain's length (N-1 calls) sizes --stochastic-first's etas.
    path = resolve_checkpoint(args.ckpt)
    diffusion = stored_config(path).get("diffusion")
    if not isinstance(diffusion, dict):      # load_model says what is wrong with it
        diffusion = {}
    top = diffusion.get("num_steps", _default_num_steps()) - 1
    steps = min(100, top) if args.steps is None else args.steps     # not given: the default
    if not 0 <= steps <= top:
        raise ValueError(f"--steps: expected an int in [0, {top}] for this run's N = "
                         f"{top + 1} (0 = the full chain), got {steps}")
    eta = args.eta
    if args.stochastic_first:
        eta = [max(e, args.eta) for e in eta_first(steps or top, args.stochastic_first)]
    generate(path, args.n, args.out, steps=None if steps == 0 else steps, eta=eta,
             spacing=args.spacing, device=args.device, **kw)
    from .distributed import env_world_rank
    from .generate import SHEET_NAME
    if env_world_rank()[1] == 0:        # also with --no-progress: what was done, and where
        print(f"wrote {args.n} {plural(args.n, 'image')} to {args.out} ({args.fmt}) and "
              f"{Path(args.out) / SHEET_NAME}")
    return 0


# Commands whose own parser takes the rest of the command line.
_PASSTHROUGH = {
    "bench": ("kernels, a sampler step and a training step against the torch reference",
              "blurfast.bench"),
    "demo": ("train, sample, draw and benchmark on built-in photographs (about 10 min on a CPU)",
             "blurfast.demo"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors, ``PROG: error: MESSAGE (PROG --help lists the
    options)`` (under torchrun with the rank, :func:`rank_prefix`), exit code 2; the
    commands' parsers are of this class too."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {rank_prefix()}{message} ({self.prog} --help "
                     f"lists the options)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    p = _Parser(prog="blurfast", description="Blur diffusion toolkit.")
    p.add_argument("--version", action="version", version=f"blurfast {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("info", help="version, compiled kernels, GPUs and the backend of each "
                                    "op; or, given DATA, what a prepared array holds")
    s.add_argument("data", nargs="?", default=None, metavar="DATA",
                   help="a prepared .npy array: its image count, size, channels and the "
                        "--resize it was prepared with")
    s.set_defaults(func=_info)
    from . import cli_train
    cli_train.register(sub)
    _add_sample(sub)
    _add_fid(sub)
    from . import cli_draw
    cli_draw.register(sub)
    for name, (help_text, _) in _PASSTHROUGH.items():
        sub.add_parser(name, help=help_text, add_help=False)
    p.commands = sub.choices
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning of the command line: ``blurfast: warning: MESSAGE``, one line,
    without the source location."""
    text = " ".join(str(message).splitlines())
    try:
        print(f"blurfast: warning: {text}", file=sys.stderr if file is None else file)
    except OSError:                  # stderr gone (a closed pipe): the warning is lost
        pass


def main(argv=None) -> int:
    """Runs a command. Bad input (ValueError, TypeError) and file-system errors (OSError: a
    missing file, a file where a folder belongs, no permission) are reported in one line
    with exit code 2; BLURFAST_DEBUG=1 shows the traceback instead. Warnings print as
    ``blurfast: warning: MESSAGE`` while the command runs (as before once it returns)."""
    import warnings
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        return _main(argv)


# What shrinks a command's GPU memory, for its out-of-memory error (train has its own).
_OOM_ADVICE = {"sample": "--batch", "fid": "--batch", "draw": "--n"}


def _out_of_memory(command: str, e: BaseException):
    """The one-line error of a CUDA out-of-memory, or None for any other exception."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(e, torch.cuda.OutOfMemoryError):
        return None
    flag = _OOM_ADVICE.get(command)
    return out_of_memory_line(e, f"; try a smaller {flag}" if flag else "")


_lost_peer = False      # set when a command ended on _peer_lost's error (see entry)

# Commands that run as one process: under torchrun every rank would do all their work
# and write the same files (demo: train N times; bench: time one GPU N times at once).
_ONE_PROCESS = ("fid", "draw", "prepare", "demo", "bench")


def rank_prefix() -> str:
    """``"rank R: "`` under torchrun (WORLD_SIZE above 1), else ``""``: each rank prints
    its own error, and the lines of several ranks must say whose they are."""
    from .distributed import env_world_rank
    world, rank = env_world_rank()       # _main checked it first: no error here
    return "" if world < 2 else f"rank {rank}: "


def _peer_lost(e: BaseException):
    """The one-line error of a rank whose process group broke because another rank
    stopped (gloo: "Connection closed by peer"; torch's DistError types), or None. The
    rank that stopped prints its own error; this one's traceback would only bury it."""
    from .distributed import env_world_rank
    torch = sys.modules.get("torch")
    if torch is None or env_world_rank()[0] < 2:
        return None
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(e)
    if not (isinstance(e, dist_error) or "closed by peer" in text or "reset by peer" in text):
        return None
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return (f"another process of the group stopped, so this one cannot go on (the cause "
            f"is in that process's output): {first}")


def _leaf_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The parser of the (sub)command that ``args`` ran: ``draw process``'s, say."""
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        name = getattr(args, subs[0].dest, None) if subs else None
        if name not in (subs[0].choices if subs else {}):
            return parser
        parser = subs[0].choices[name]


def flag_named(parser: argparse.ArgumentParser, message: str) -> str:
    """``message`` with a leading argument name (``sigma: ...``, as the library's checks
    word it) replaced by the command's flag for it (``--sigma: ...``), where ``parser``
    has one; otherwise as it is."""
    name, sep, rest = message.partition(": ")
    if not sep or not name.isidentifier():
        return message
    for a in parser._actions:
        longs = [o for o in a.option_strings if o.startswith("--")]
        if a.dest == name and longs:
            return f"{longs[0]}: {rest}"
    return message


def _main(argv) -> int:
    import os
    argv = list(sys.argv[1:] if argv is None else argv)
    from .distributed import env_world_rank
    try:
        world, rank = env_world_rank()
    except ValueError as e:                         # a malformed WORLD_SIZE or RANK
        print(f"blurfast{' ' + argv[0] if argv else ''}: error: {e}", file=sys.stderr)
        return 2
    if argv and argv[0] in _ONE_PROCESS and world > 1:
        if rank == 0:                               # every rank refuses alike: said once
            print(f"blurfast {argv[0]}: error: runs as one process, not under torchrun "
                  f"(WORLD_SIZE={world}: each process would do all of it and write the same "
                  f"files); run blurfast {argv[0]} without torchrun", file=sys.stderr)
        return 2
    leaf = None
    if argv and argv[0] in _PASSTHROUGH:
        import importlib
        run = lambda: importlib.import_module(_PASSTHROUGH[argv[0]][1]).main(argv[1:])  # noqa: E731
    else:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:                    # named by the command they were given to
            command = parser.commands.get(getattr(args, "command", None), parser)
            command.error(f"unrecognized arguments: {' '.join(extra)}")
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        leaf = _leaf_parser(parser, args)
        run = lambda: args.func(args)  # noqa: E731
    try:
        return run()
    except BrokenPipeError:          # output piped into e.g. `head`, which exited
        sys.stderr.close()           # nothing more can be written; exit quietly
        return 0
    except KeyboardInterrupt:        # Ctrl-C: what was half-written is already removed
        if os.environ.get("BLURFAST_DEBUG"):
            raise
        print(f"blurfast {argv[0]}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, ImportError) as e:   # ImportError: a missing extra
        if os.environ.get("BLURFAST_DEBUG"):
            raise
        message = str(e) if leaf is None else flag_named(leaf, str(e))
        print(f"blurfast {argv[0]}: error: {rank_prefix()}{message}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        lost = _peer_lost(e)
        message = _out_of_memory(argv[0], e) or lost
        if message is None or os.environ.get("BLURFAST_DEBUG"):
            raise
        if lost:
            global _lost_peer
            _lost_peer = True
        print(f"blurfast {argv[0]}: error: {rank_prefix()}{message}", file=sys.stderr)
        return 1


def entry() -> None:
    """The console script and ``python -m blurfast``: :func:`main`, then the exit. A rank
    whose process group broke (its error printed) leaves at once: gloo's threads, still
    bound to the lost peer, could abort the interpreter's teardown ("terminate called
    without an active exception", SIGABRT) after the one-line error."""
    import os
    code = main()
    if _lost_peer:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    entry()
