"""The ``blurfast train`` and ``blurfast prepare`` subcommands (see docs/training.md).

``train`` takes flags and/or a YAML/JSON config file whose keys are the keyword
arguments of :func:`blurfast.training.train` (``model`` and ``diffusion`` as
nested mappings), or a run's saved ``config.json``; flags given on the command line
override the file. With ``--resume``, the saved run's arguments come first and both
override them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .data import DEFAULT_RESIZE, PIXEL_RANGES, RESIZE_MODES
from .checks import is_int
from .console import plural
from .diffusion import TARGETS
from .distributed import env_world_rank
from .models import PRESETS
from .schedules import BLUR_SCHEDULES, KERNELS, NOISE_SCHEDULES

__all__ = ["register", "load_config", "saved_config", "train_kwargs", "is_saved_config",
           "MACHINE_KEYS", "DERIVED_KEYS"]

_S = argparse.SUPPRESS

# Flags that go into train()'s nested `model` and `diffusion` dicts.
_MODEL_KEYS = ("base_channels", "channel_mult", "num_res_blocks", "attention_resolutions",
               "num_heads", "dropout", "freq_input")
DIFFUSION_KEYS = ("num_steps", "noise_schedule", "beta_min", "beta_max", "blur_schedule",
                   "sigma", "sigma_min", "sigma_max", "kernel", "coarse_to_fine")


def _none_or(kind):
    def parse(s):
        return None if s.lower() == "none" else kind(s)
    parse.__name__ = kind.__name__
    return parse


def add_diffusion_flags(g) -> None:
    """The flags of :data:`DIFFUSION_KEYS` (BlurDiffusion's arguments but the image size),
    on the argument group ``g`` (its parser's default should be SUPPRESS: only the flags
    given are set)."""
    g.add_argument("--num-steps", dest="num_steps", type=int, help="N, the diffusion steps")
    g.add_argument("--noise-schedule", dest="noise_schedule", choices=NOISE_SCHEDULES,
                   help="beta_i")
    g.add_argument("--beta-min", dest="beta_min", type=float, help="first beta (linear)")
    g.add_argument("--beta-max", dest="beta_max", type=float, help="last beta (linear)")
    g.add_argument("--blur-schedule", dest="blur_schedule", choices=BLUR_SCHEDULES,
                   help="f(i), the blur added at step i")
    g.add_argument("--sigma", type=float, help="blur kernel width in pixels")
    g.add_argument("--sigma-min", dest="sigma_min", type=float,
                   help="blur width of step 1 in pixels: f(1) = (sigma_min / sigma)^2")
    g.add_argument("--sigma-max", dest="sigma_max", type=float,
                   help="blur width of step N in pixels: f(N) = (sigma_max / sigma)^2")
    g.add_argument("--kernel", choices=KERNELS,
                   help="sampled Gaussian (as scipy's gaussian_filter) or the heat equation")
    g.add_argument("--coarse-to-fine", dest="coarse_to_fine",
                   action=argparse.BooleanOptionalAction,
                   help="off: the paper's fine-to-coarse ablation")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train a U-Net on blur diffusion (one GPU, CPU, or torchrun + DDP)",
        description="Train a blur diffusion model. Flags override the --config file; with "
                    "--resume, both override the saved run's arguments (so `blurfast train "
                    "--out RUN_DIR --resume auto` continues a run). The resolved config is "
                    "printed and saved as RUN_DIR/config.json.",
        argument_default=_S)
    p.add_argument("--config", metavar="FILE",
                   help="YAML or JSON file of train() arguments, or a run's saved "
                        "config.json (its derived and machine keys dropped; give --out)")
    g = p.add_argument_group("data and run")
    g.add_argument("--data", metavar="PATH",
                   help="prepared .npy array, LSUN lmdb directory or image folder")
    g.add_argument("--out", metavar="RUN_DIR", help="run directory")
    g.add_argument("--resume", metavar="auto|CKPT",
                   help="'auto': newest valid checkpoint of RUN_DIR; or a checkpoint "
                        "directory. The saved run's arguments are the base (all but "
                        "--device, --precision, --compile, --cuda-graphs, --num-workers); what "
                        "is given here overrides them, except what the weights mean (model, "
                        "resolution, channels, diffusion, target, pixel range): changing "
                        "those is an error")
    g.add_argument("--resolution", type=int, help="image side; must match a prepared array")
    g.add_argument("--channels", type=int, help="image channels")
    g.add_argument("--resize", choices=RESIZE_MODES,
                   help="for image folders and lmdb read directly")
    g.add_argument("--pixel-range", dest="pixel_range", choices=PIXEL_RANGES,
                   help="pixel values the model sees; the paper's code used 0,1")
    g.add_argument("--flip", action=argparse.BooleanOptionalAction,
                   help="random horizontal flips")
    g.add_argument("--num-workers", dest="num_workers", type=int,
                   help="DataLoader processes (default: min(4, CPUs) on CUDA, 0 on CPU)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", choices=sorted(PRESETS),
                   help="named U-Net configuration; the flags below override its entries")
    g.add_argument("--base-channels", dest="base_channels", type=int,
                   help="channels of the first level (a multiple of 32)")
    g.add_argument("--channel-mult", dest="channel_mult", type=int, nargs="+", metavar="M",
                   help="width of each level in base channels; one level per entry")
    g.add_argument("--num-res-blocks", dest="num_res_blocks", type=int,
                   help="residual blocks per level")
    g.add_argument("--attention-resolutions", dest="attention_resolutions", type=int,
                   nargs="*", metavar="R",
                   help="feature-map sides with self-attention (none: only the middle)")
    g.add_argument("--num-heads", dest="num_heads", type=int, help="attention heads")
    g.add_argument("--dropout", type=float, help="dropout in the residual blocks")
    g.add_argument("--freq-input", dest="freq_input", action=argparse.BooleanOptionalAction,
                   help="also feed dct2(x_t) to the model")
    g = p.add_argument_group("diffusion (BlurDiffusion arguments)")
    add_diffusion_flags(g)
    g.add_argument("--target", choices=TARGETS, help="training target (docs/process.md section 5)")
    g = p.add_argument_group("optimization")
    g.add_argument("--batch-size", dest="batch_size", type=int,
                   help="per process; the global batch is this times the processes")
    g.add_argument("--grad-accum", dest="grad_accum", type=int, metavar="K",
                   help="the batch in K equal rounds, gradients added before each step: a "
                        "K-th of the activation memory, the same step (but for dropout "
                        "masks)")
    g.add_argument("--activation-checkpointing", dest="activation_checkpointing",
                   action=argparse.BooleanOptionalAction,
                   help="recompute each residual level's activations in the backward "
                        "instead of keeping them: less memory, one more forward's compute, "
                        "the same step (default: off)")
    g.add_argument("--steps", type=int,
                   help="step to stop at (a resumed run goes on to it; one there already "
                        "says so and exits 0)")
    g.add_argument("--lr", type=float, help="learning rate")
    g.add_argument("--optimizer", choices=["adam", "adamw"], help="fused implementation")
    g.add_argument("--betas", type=float, nargs=2, metavar=("B1", "B2"), help="Adam betas")
    g.add_argument("--weight-decay", dest="weight_decay", type=float, help="weight decay")
    g.add_argument("--adam-eps", dest="adam_eps", type=float, help="Adam epsilon")
    g.add_argument("--warmup", type=int, help="linear learning-rate warmup steps")
    g.add_argument("--grad-clip", dest="grad_clip", type=_none_or(float),
                   help="max gradient norm (> 0), or 'none' for no clipping")
    g.add_argument("--ema-decay", dest="ema_decay", type=float, help="EMA decay per step")
    g.add_argument("--ema-halflife-kimg", dest="ema_halflife_kimg", type=float,
                   help="EMA half-life in thousands of images (instead of --ema-decay)")
    g.add_argument("--seed", type=int, help="all randomness derives from it")
    g.add_argument("--max-nonfinite", dest="max_nonfinite", type=int,
                   help="stop after this many non-finite losses in a row")
    g = p.add_argument_group("speed")
    g.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when present")
    g.add_argument("--precision", choices=["bf16", "fp16", "fp32"],
                   help="bf16 autocast, fp16 autocast with a dynamic loss scale (for GPUs "
                        "without bfloat16: V100, T4, RTX 20xx), or fp32 (default: bf16 on "
                        "GPUs of compute capability 8.0 or newer, else fp32)")
    g.add_argument("--channels-last", dest="channels_last",
                   action=argparse.BooleanOptionalAction,
                   help="channels_last memory format (default off: NCHW measured faster)")
    g.add_argument("--tf32", action=argparse.BooleanOptionalAction,
                   help="TF32 for fp32 matrix products and convolutions")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction,
                   help="torch.compile the model (default: on with one GPU that Triton "
                        "supports, off on CPU and under torchrun; compiling takes minutes)")
    g.add_argument("--cuda-graphs", dest="cuda_graphs", action=argparse.BooleanOptionalAction,
                   help="capture the whole step in a CUDA graph (default: on with one GPU, "
                        "off on CPU and under torchrun, where it all-reduces the gradients "
                        "inside the graph)")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--log-every", dest="log_every", type=int, help="steps between log rows")
    g.add_argument("--save-every", dest="save_every", type=int,
                   help="steps between checkpoints (also at the end and on SIGTERM/SIGINT)")
    g.add_argument("--keep", type=int, help="checkpoints kept")
    g.add_argument("--sample-every", dest="sample_every", type=int,
                   help="steps between sample grids of the EMA weights")
    g.add_argument("--sample-count", dest="sample_count", type=int,
                   help="images per grid (default 64, 16 on a CPU)")
    g.add_argument("--sample-steps", dest="sample_steps", type=int,
                   help="DDIM steps of the grids (default 100, 25 on a CPU)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction,
                   help="progress bars (training steps, each sample grid and FID point) "
                        "and the printed config; off a terminal a line per log row instead "
                        "of the bars")
    g = p.add_argument_group("FID during training")
    g.add_argument("--fid-every", dest="fid_every", type=int,
                   help="FID and KID every that many steps (and at the end), in "
                        "RUN_DIR/fid.csv; keeps the best FID's checkpoint in RUN_DIR/best/")
    g.add_argument("--fid-ref", dest="fid_ref", metavar="PATH",
                   help="reference: image folder, lmdb, prepared .npy or STATS.npz")
    g.add_argument("--fid-n", dest="fid_n", type=int, help="samples per FID")
    g.add_argument("--fid-steps", dest="fid_steps", type=int,
                   help="DDIM model calls per sample")
    g.add_argument("--inception", metavar="PATH",
                   help="clean-fid's inception-2015-12-05.pt (default: clean-fid's location)")
    _show_defaults(p)
    p.set_defaults(func=_train_main)


def _show_defaults(parser) -> None:
    """Appends "(default: X)" to each flag's help, X read off train(), BlurDiffusion and
    UNet, so that the help cannot disagree with them."""
    import inspect

    from .diffusion import BlurDiffusion
    from .models import UNet
    from .training import train

    def defaults(fn, keys=None):
        return {k: v.default for k, v in inspect.signature(fn).parameters.items()
                if v.default is not inspect.Parameter.empty and (keys is None or k in keys)}
    known = {**defaults(train), **defaults(BlurDiffusion, DIFFUSION_KEYS)}
    in_presets = set().union(*PRESETS.values())
    for k, v in defaults(UNet, _MODEL_KEYS).items():
        known[k] = "the preset's" if k in in_presets else v
    for a in parser._actions:
        v = known.get(a.dest)
        if v is None or not a.help or "default" in a.help:
            continue
        if isinstance(v, bool):
            v = "on" if v else "off"
        elif isinstance(v, (tuple, list)):
            v = " ".join(map(str, v))
        a.help += f" (default: {v})"


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare", help="decode an image folder, LSUN lmdb or image archive into a uint8 "
                        ".npy array",
        description="Decode every image of SRC once into OUT, a memory-mappable uint8 array "
                    "(N, R, R, C). Unreadable images are skipped and reported. An existing "
                    "OUT is kept unless --overwrite is given.")
    p.add_argument("src", metavar="SRC",
                   help="image folder, LSUN <category>_<split>_lmdb, or an archive of "
                        "images: .zip, .tar, .tar.gz/.tgz, .tar.bz2/.tbz2, .tar.xz/.txz "
                        "(read front to back, in the archive's order)")
    p.add_argument("out", metavar="OUT", help="output .npy file")
    p.add_argument("--resolution", type=int, default=64, help="side of the square images (default 64)")
    p.add_argument("--resize", choices=RESIZE_MODES, default=DEFAULT_RESIZE,
                   help=f"squash: the paper's preprocessing; center-crop: the usual one "
                        f"(default {DEFAULT_RESIZE}, as train and fid)")
    p.add_argument("--channels", type=int, choices=[1, 3], default=3,
                   help="1: grayscale, 3: RGB (default 3)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes (default min(8, CPUs)); 0 decodes in the main "
                        "process")
    p.add_argument("--match", metavar="GLOB", default=None,
                   help="only the images of a folder or archive whose path (relative to the "
                        "folder; the member's name, less a leading ./) matches this "
                        "shell-style pattern, '*' crossing folders: 'train/*' is everything "
                        "under train/")
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar (drawn only when stderr is a terminal)")
    p.set_defaults(func=_prepare_main)


def register(subparsers) -> None:
    """Adds ``train`` and ``prepare`` to an argparse subparsers object."""
    _add_train(subparsers)
    _add_prepare(subparsers)



def _yaml_load(text: str):
    """yaml.safe_load, except that numbers like 1e-4 and 5E+3 are floats: YAML 1.1 (what
    PyYAML reads) wants a dot and a signed exponent, so a config's ``lr: 1e-4`` would
    otherwise be the string '1e-4'."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass
    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."))
    return yaml.load(text, Loader=Loader)


def _parse_error(e: Exception) -> str:
    """A YAML or JSON parser's error in one line: the problem and where (line, column)."""
    if isinstance(e, json.JSONDecodeError):
        return f"{e.msg} (line {e.lineno}, column {e.colno})"
    mark = getattr(e, "problem_mark", None)             # yaml's MarkedYAMLError
    if mark is None:
        return " ".join(str(e).split())
    text = f"{e.problem} (line {mark.line + 1}, column {mark.column + 1}"
    if e.context and e.context_mark is not None:
        text += (f"; {e.context} at line {e.context_mark.line + 1}, column "
                 f"{e.context_mark.column + 1}")
    return text + ")"


def load_config(path) -> dict:
    """A mapping of train() arguments from a .yaml/.yml/.json file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ValueError(f"config: cannot read {str(path)!r} ({e.strerror})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            cfg = _yaml_load(text)
        else:
            cfg = json.loads(text)
    except Exception as e:      # yaml and json raise their own error types
        raise ValueError(f"config: {str(path)!r} does not parse: {_parse_error(e)}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"config: {str(path)!r} must hold a mapping of train() arguments")
    return cfg


# train() arguments that describe the machine rather than the run: a resumed run, and a
# run started from a saved config.json, defaults them anew instead of taking the saved ones
# (saved as resolved there: compile on from one GPU would be an error on a GPU without
# triton, and compiles on a CPU).
MACHINE_KEYS = ("device", "precision", "compile", "cuda_graphs", "num_workers")

# Keys of a saved run config (RUN_DIR/config.json, a checkpoint's) that are not train()
# arguments but what train() derived from them and the machine. Every saved config holds
# them; they tell a saved config from a hand-written one.
DERIVED_KEYS = ("world_size", "global_batch")


def is_saved_config(cfg) -> bool:
    """Whether the mapping ``cfg`` is a run config that train() saved (it holds every one
    of :data:`DERIVED_KEYS`) rather than a hand-written one."""
    return isinstance(cfg, dict) and all(k in cfg for k in DERIVED_KEYS)


def _run_arguments(cfg: dict) -> dict:
    """The train() arguments of a saved run config (as :func:`checkpoint.read_config`
    reads it) that a new or resumed run takes over: all but ``out``, ``resume``,
    :data:`MACHINE_KEYS`, the derived keys and sample grid sizes equal to their default on
    the saved run's device, and the model and diffusion entries less their resolution and
    channels (the top-level ones hold them)."""
    import inspect

    from .training import SAMPLE_GRID, SAMPLE_GRID_CPU, train

    allowed = set(inspect.signature(train).parameters) - {"out", "resume", *MACHINE_KEYS}
    base = {k: v for k, v in cfg.items() if k in allowed}
    # The sample grids' sizes as train() defaults them on the saved run's device are
    # defaulted anew for this one, as the machine keys are: a CPU trial's config reused on
    # a GPU draws the GPU's grids (a size given equal to that default is taken alike).
    if cfg.get("device") in ("cpu", "cuda"):
        grid = SAMPLE_GRID_CPU if cfg["device"] == "cpu" else SAMPLE_GRID
        for k, default in zip(("sample_count", "sample_steps"), grid):
            if base.get(k) == default:
                del base[k]
    for group in ("model", "diffusion"):
        if isinstance(base.get(group), dict):
            base[group] = {k: v for k, v in base[group].items()
                           if k not in ("resolution", "channels")}
    return base


def saved_config(resume, out) -> dict:
    """The train() arguments a resumed run starts from: those in RUN_DIR/config.json for
    ``resume='auto'`` (none when the file is absent), those stored in the checkpoint
    otherwise; less ``out``, ``resume`` and :data:`MACHINE_KEYS`, and less the resolution
    and channels of the model and diffusion entries (the top-level ones hold them)."""
    from . import checkpoint as ckpt

    if str(resume) == "auto":
        path = Path(out) / "config.json"
        if not path.is_file():
            return {}
        try:
            cfg = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"resume: cannot read the run's saved arguments {str(path)!r} "
                             f"({e})") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"resume: {str(path)!r} does not hold a mapping of arguments")
        cfg = ckpt.read_config(cfg)
    else:
        from .training import check_resume_path
        check_resume_path(resume)
        cfg = ckpt.stored_config(resume)
    return _run_arguments(cfg)


def _train_default(name: str):
    import inspect

    from .training import train
    return inspect.signature(train).parameters[name].default


def _saved_file_arguments(cfg: dict, path) -> dict:
    """The train() arguments of a saved run config given as ``--config`` (see
    :func:`_run_arguments`), after checking that its derived keys agree with the
    arguments they derive from: the resolution and channels of its model and diffusion
    entries with its own top-level ones, its global_batch with its batch_size x
    world_size. A key that is neither a train() argument nor derived is refused, as in
    any config file."""
    import inspect

    from . import checkpoint as ckpt
    from .training import train

    cfg = ckpt.read_config(cfg)          # one saved before newer keys: as resume reads it
    where = f"config: {str(path)!r}"
    unknown = sorted(set(cfg) - set(inspect.signature(train).parameters) - set(DERIVED_KEYS))
    if unknown:
        raise ValueError(f"config: unknown keys {unknown}; expected train() arguments (a "
                         f"saved config.json may also hold {', '.join(DERIVED_KEYS)})")
    groups = {g: cfg[g] for g in ("model", "diffusion") if isinstance(cfg.get(g), dict)}
    for k in ("resolution", "channels"):
        own = {g: e[k] for g, e in groups.items() if k in e}
        if k in cfg or not own:
            continue
        # an edited file without the top-level key: the groups' value stands for it
        # (train()'s default would replace the groups', which are dropped)
        values = list(own.values())
        if any(v != values[0] for v in values):
            raise ValueError(f"{where}: " + " and ".join(f"{g}.{k} {v!r}" for g, v in
                                                          own.items()) +
                             f" differ, and the file has no top-level {k}: give it (or "
                             f"--{k})")
        cfg[k] = values[0]
    for group, entries in groups.items():     # train() names a group of the wrong type
        for k in ("resolution", "channels"):
            top = cfg.get(k, _train_default(k))
            if k in entries and entries[k] != top:
                raise ValueError(f"{where}: {group}.{k} {entries[k]!r} differs from {k} "
                                 f"{top!r} of the same file; the {group} takes the "
                                 f"top-level {k} (or --{k}): make them agree, or drop "
                                 f"{group}.{k}")
    batch = cfg.get("batch_size", _train_default("batch_size"))
    world, total = cfg["world_size"], cfg["global_batch"]
    if not all(is_int(v) for v in (batch, world, total)) \
            or total != batch * world:
        raise ValueError(f"{where}: global_batch {total!r} differs from its batch_size "
                         f"{batch!r} x world_size {world!r}; global_batch is derived "
                         f"(batch_size per process x the processes), not read: make them "
                         f"agree, or leave the file as saved and give --batch-size")
    return _run_arguments(cfg)


def _is_path(v) -> bool:
    return isinstance(v, (str, os.PathLike))


def _is_run(out) -> bool:
    """Whether the directory ``out`` holds a run: its config.json or a checkpoint."""
    from . import checkpoint as ckpt

    out = Path(out)
    return (out / "config.json").is_file() or bool(ckpt.list_checkpoints(out / "checkpoints"))


def _saved_out(path, out: str) -> str:
    """The run directory that the ``out`` of the saved config file ``path`` names from
    here: the directory holding the file, when it holds checkpoints (the file is that
    run's config.json) and ``out`` does not name it from the current directory (``out``
    relative to the directory the run was started from, or the run directory moved
    since); else ``out``."""
    from . import checkpoint as ckpt

    here = Path(path).parent
    if Path(out).resolve() != here.resolve() and ckpt.list_checkpoints(here / "checkpoints"):
        return str(here)
    return out


def _layer(kw: dict, layer: dict) -> None:
    """Puts ``layer``'s arguments over ``kw``: ``model`` and ``diffusion`` merged entry by
    entry (one that is not a dict replaces the lower one, for train() to refuse); one of
    ema_decay and ema_halflife_kimg replaces the other of a lower layer."""
    for group in ("model", "diffusion"):
        if isinstance(layer.get(group), dict):
            kw[group] = {**(kw.get(group) or {}), **layer[group]}
        elif layer.get(group) is not None:
            kw[group] = layer[group]
    kw.update({k: v for k, v in layer.items() if k not in ("model", "diffusion")})
    for one, other in (("ema_decay", "ema_halflife_kimg"), ("ema_halflife_kimg", "ema_decay")):
        if layer.get(one) is not None and other not in layer:
            kw[other] = None


def train_kwargs(args: argparse.Namespace) -> dict:
    """The keyword arguments of train(): the saved run's (with --resume, see
    :func:`saved_config`), then the config file's, then the flags given (argparse keeps
    only those: the parser's default is SUPPRESS).

    A config file that train() saved (a RUN_DIR/config.json, :func:`is_saved_config`)
    gives its run's arguments as :func:`_saved_file_arguments` checks them: less its
    derived keys, its machine keys (:data:`MACHINE_KEYS`, defaulted anew for this machine
    unless given as flags), ``resume`` and ``out``. ``--out`` names the new run; without
    it the file's ``out`` is taken only with ``--resume`` or when no run is there (a run
    is never written into by accident). A global batch that differs from the file's
    because the number of processes does (not because --batch-size is given) warns."""
    import inspect

    from .training import train

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config")}
    file_cfg = load_config(args.config) if getattr(args, "config", None) else {}
    saved_file = is_saved_config(file_cfg)
    if saved_file:
        file_out, file_total = file_cfg.get("out"), file_cfg["global_batch"]
        file_cfg = _saved_file_arguments(file_cfg, args.config)
    else:
        allowed = set(inspect.signature(train).parameters)
        unknown = sorted(set(file_cfg) - allowed)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; expected train() arguments")
    flags = {k: v for k, v in given.items() if k not in _MODEL_KEYS + DIFFUSION_KEYS}
    for group, keys in (("model", _MODEL_KEYS), ("diffusion", DIFFUSION_KEYS)):
        sub = {k: given[k] for k in keys if k in given}
        if sub:
            flags[group] = sub
    if saved_file:
        if "preset" in flags:     # a preset given anew defines the model anew, as on resume
            file_cfg.pop("model", None)
        if "out" not in flags and file_out is not None:
            file_out = _saved_out(args.config, file_out) if _is_path(file_out) else file_out
            if flags.get("resume") is None and _is_path(file_out) and _is_run(file_out):
                raise ValueError(
                    f"config: {str(args.config)!r} is the saved config of the run "
                    f"{file_out!r}, which exists; give --out NEW_DIR to train a new run "
                    f"with its settings, or --resume auto to continue that run")
            file_cfg["out"] = file_out
    explicit = {**file_cfg, **flags}
    base = {}
    # paths only: train() names an argument of another type
    if _is_path(explicit.get("resume")) and _is_path(explicit.get("out")):
        base = saved_config(explicit["resume"], explicit["out"])
        if "preset" in explicit:          # a preset given anew defines the model anew,
            model = base.pop("model", None)
            if isinstance(model, dict) and "emb_act" in model:
                # but for emb_act: the checkpoint's version of the model, which no flag gives
                base["model"] = {"emb_act": model["emb_act"]}
    kw = {}
    for layer in (base, file_cfg, flags):
        _layer(kw, layer)
    # A half-life given anywhere replaces train()'s default decay.
    if kw.get("ema_halflife_kimg") is not None and "ema_decay" not in kw:
        kw["ema_decay"] = None
    for k in ("channel_mult", "attention_resolutions"):
        if isinstance(kw.get("model"), dict) and isinstance(kw["model"].get(k), list):
            kw["model"][k] = tuple(kw["model"][k])
    missing = [k for k in ("data", "out") if k not in kw]
    if missing == ["data"] and str(kw.get("resume")) == "auto" and not base:
        # --resume auto takes data from OUT/config.json: none there (a mistyped run name?)
        raise ValueError(f"data: required (as --data or in --config): resume 'auto' found "
                         f"no run to continue in {str(kw['out'])!r} (no config.json); give "
                         f"the run's directory as --out, or --data to start a new run")
    if missing:
        raise ValueError(f"{', '.join(missing)}: required (as --{missing[0]} or in --config)")
    if saved_file and "batch_size" not in flags:
        batch = kw.get("batch_size", _train_default("batch_size"))
        world, rank = env_world_rank()
        if batch * world != file_total and rank == 0:
            import warnings
            warnings.warn(
                f"config: the global batch is {batch} x {world} process"
                f"{'es' if world > 1 else ''} = {batch * world}, where the saved run of "
                f"{str(args.config)!r} had {file_total}; give --batch-size "
                f"{file_total // world if file_total % world == 0 else 'B'} for its global "
                f"batch (--steps and --warmup count steps, not images)",
                stacklevel=2)
    return kw


def _train_main(args) -> int:
    import torch

    from .cli import out_of_memory_line, rank_prefix
    from .training import NonFiniteError, sampling_batch, train

    kw = {}
    try:
        kw = train_kwargs(args)
        result = train(**kw)
    except NonFiniteError as e:
        print(f"blurfast train: {rank_prefix()}{e}", file=sys.stderr)
        return 1
    except torch.cuda.OutOfMemoryError as e:
        if os.environ.get("BLURFAST_DEBUG"):
            raise
        batch = kw.get("batch_size", _train_default("batch_size"))
        rounds = kw.get("grad_accum", _train_default("grad_accum"))
        if not getattr(e, "in_train_step", False):
            # sample grids, FID, the model itself: the step's advice would not fit
            where = (f" outside a training step (its sample grids and FID sample 4 x "
                     f"--batch-size / --grad-accum = "
                     f"{sampling_batch({'batch_size': batch, 'grad_accum': rounds})} images at "
                     f"a time)")
            print(f"blurfast train: error: {rank_prefix()}{out_of_memory_line(e, where)}",
                  file=sys.stderr)
            return 1
        more = [k for k in range(rounds + 1, batch + 1) if batch % k == 0][:1]
        advice = (f"--grad-accum {more[0]} (the same step in {more[0]} rounds of "
                  f"{batch // more[0]} images, a smaller share of the memory) or "
                  if more else "")
        if not kw.get("activation_checkpointing",
                      _train_default("activation_checkpointing")):
            advice = ("--activation-checkpointing (the same step, keeping a fraction of its "
                      "activations)" + (", " if advice else " or ") + advice)
        step = (f" with --batch-size {batch} in {rounds} {plural(rounds, 'round')}: "
                f"try {advice}a smaller --batch-size")
        print(f"blurfast train: error: {rank_prefix()}{out_of_memory_line(e, step)}",
              file=sys.stderr)
        return 1
    except (ValueError, TypeError) as e:       # CheckpointError included
        if os.environ.get("BLURFAST_DEBUG"):
            raise
        # train()'s argument names are also the --config file's keys: kept as they are
        print(f"blurfast train: error: {rank_prefix()}{e}", file=sys.stderr)
        return 2
    if result["stopped_by"] == "SIGINT":
        return 130
    if result["stopped_by"] is not None:
        return 143
    if result["steps_run"] == 0:         # already at its final step; train() said so
        return 0
    if env_world_rank()[1] == 0:                  # torchrun's other ranks stay quiet
        print(f"done: step {result['step']}, loss {result['loss']:.4f}, "
              f"checkpoint {result['checkpoint']}")
    return 0


def _prepare_main(args) -> int:
    import signal
    import warnings

    from .console import bars_on
    from .data import WorkerDied, prepare

    def terminate(signum, frame):      # as Ctrl-C: prepare removes its temporary file
        raise SystemExit(128 + signum)
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        with warnings.catch_warnings():     # the report below says it all
            warnings.filterwarnings("ignore", "prepare: skipped", UserWarning)
            # bad input: blurfast's handler prints it, naming the flag (cli.flag_named)
            r = prepare(args.src, args.out, resolution=args.resolution, resize=args.resize,
                        channels=args.channels, workers=args.workers,
                        progress=bars_on(not args.progress),
                        limit=args.limit, overwrite=args.overwrite, match=args.match)
    except WorkerDied as e:            # one line, as bad input is (cli.main)
        if os.environ.get("BLURFAST_DEBUG"):
            raise
        print(f"blurfast prepare: error: {e}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"wrote {r['path']}: {r['written']} images of shape {r['shape'][1:]} "
          f"(--resize {args.resize}), {r['skipped']} unreadable skipped")
    for line in r["bad"]:
        print(f"  unreadable: {line}")
    return 0
