"""Training checkpoints: one directory per saved step, written atomically.

``RUN_DIR/checkpoints/step_000005000/`` holds

- ``model.safetensors`` and ``ema.safetensors``: the weights (the run's config as
  JSON in the metadata, so either file alone rebuilds the model);
- ``state.pt``: optimizer state, step, counters (the examples consumed, ``images``,
  among them) and config, a plain torch file that loads with ``weights_only=True``;
- ``manifest.json``, written last: size and SHA-256 of the three files.

A checkpoint is written into a hidden temporary directory, synced, and renamed;
a reader therefore sees whole checkpoints only, and checks every file against the
manifest before using it. Damage gives :class:`CheckpointError` naming the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .checks import check_int

__all__ = ["CheckpointError", "save", "copy", "load", "list_checkpoints", "latest_valid",
           "verify", "load_model", "stored_config", "read_config"]

FORMAT = 1
_NAME = re.compile(r"^step_(\d{9})$")
_TMP_PREFIX = ".tmp-"
FILES = ("model.safetensors", "ema.safetensors", "state.pt")


class CheckpointError(ValueError):
    """A checkpoint that is incomplete, damaged or not a blurfast checkpoint."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _cpu_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    # A copy always: parameters are views of one buffer in training (safetensors refuses
    # tensors that share storage).
    return {k: v.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
            for k, v in module.state_dict().items()}


def save(ckpt_dir, step: int, model: torch.nn.Module, ema: torch.nn.Module,
         state: dict, config: dict, keep: Optional[int] = None) -> Path:
    """Writes checkpoint ``step`` under ``ckpt_dir``; then, given ``keep``, deletes the
    checkpoints of later steps and all but the newest ``keep`` (this one included) of the
    others (None: deletes nothing). Returns the checkpoint's directory."""
    from safetensors.torch import save_file

    step = check_int("step", step, 0, 10 ** 9 - 1)      # step_NNNNNNNNN: nine digits
    keep = check_int("keep", keep, none_ok=True)
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for stale in ckpt_dir.glob(_TMP_PREFIX + "*"):       # left by a save that was killed
        shutil.rmtree(stale, ignore_errors=True)
    final = ckpt_dir / f"step_{step:09d}"
    tmp = ckpt_dir / f"{_TMP_PREFIX}step_{step:09d}-{os.getpid()}"
    tmp.mkdir()
    try:
        meta = {"format": str(FORMAT), "step": str(step), "config": json.dumps(config)}
        save_file(_cpu_state(model), str(tmp / "model.safetensors"), metadata=meta)
        save_file(_cpu_state(ema), str(tmp / "ema.safetensors"), metadata=meta)
        torch.save({"format": FORMAT, "step": step, "config": config, **state}, tmp / "state.pt")
        manifest = {"format": FORMAT, "step": step,
                    "files": {n: {"bytes": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)}
                              for n in FILES}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep is not None:
        # A later step's checkpoint is one that resume skipped as damaged, or one of the
        # part of a run left when it was resumed from an earlier step: counted among the
        # newest, it would push out the one just written, and resume='auto' would take it.
        found = list_checkpoints(ckpt_dir)
        later = [p for s, p in found if s > step]
        for p in later + [p for s, p in found if s <= step][keep:]:
            shutil.rmtree(p, ignore_errors=True)
    return final


def _publish(tmp: Path, final: Path) -> None:
    """The checkpoint written whole in the folder ``tmp`` made ``final`` (its sibling):
    its files synced, ``tmp`` renamed (replacing a checkpoint of that step), the folder
    synced."""
    for n in FILES + ("manifest.json",):
        _fsync(tmp / n)
    if final.exists():                                 # same step saved again
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(final.parent)


def copy(src, ckpt_dir) -> Path:
    """A copy of the checkpoint directory ``src`` (verified first) under ``ckpt_dir``, by
    the same name, written as :func:`save` writes: into a temporary directory, synced,
    renamed (replacing a checkpoint of that step there). Returns the copy's directory."""
    src, ckpt_dir = Path(src), Path(ckpt_dir)
    verify(src)
    if not _NAME.match(src.name):
        raise CheckpointError(f"checkpoint {src}: not named step_NNNNNNNNN")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    final = ckpt_dir / src.name
    tmp = ckpt_dir / f"{_TMP_PREFIX}{src.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        shutil.copytree(src, tmp)
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def list_checkpoints(ckpt_dir) -> List[Tuple[int, Path]]:
    """(step, directory) of every checkpoint under ``ckpt_dir``, newest first (unverified)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = []
    for p in ckpt_dir.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def verify(path) -> dict:
    """The manifest of the checkpoint at ``path`` after checking every file's size and
    SHA-256 against it; CheckpointError saying what is wrong otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: not a directory")
    mf = path / "manifest.json"
    if not mf.is_file():
        if (path / "checkpoints").is_dir():
            raise CheckpointError(f"checkpoint {path}: is a run directory; name one of the "
                                  f"step_* folders under {path / 'checkpoints'}, or continue "
                                  f"that run with resume='auto' (--resume auto)")
        if not any((path / f).exists() for f in FILES):
            raise CheckpointError(f"checkpoint {path}: not a checkpoint directory (none of "
                                  f"manifest.json, {', '.join(FILES)})")
        raise CheckpointError(f"checkpoint {path}: incomplete (no manifest.json); the save "
                              f"was probably interrupted")
    try:
        manifest = json.loads(mf.read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or set(files) != set(FILES):
            raise KeyError("format")
        expected = {n: (files[n]["bytes"], files[n]["sha256"]) for n in FILES}
        for n, (size, digest) in expected.items():
            if type(size) is not int or not isinstance(digest, str):
                raise TypeError(f"{n}: expected an int 'bytes' and a string 'sha256'")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path}: manifest.json is damaged or of an unknown "
                              f"format ({e})") from None
    for n in FILES:
        f = path / n
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path}: {n} is missing")
        size = f.stat().st_size
        if size != expected[n][0]:
            raise CheckpointError(f"checkpoint {path}: {n} is damaged (size {size} bytes, "
                                  f"expected {expected[n][0]}); it was truncated or replaced")
        if _sha256(f) != expected[n][1]:
            raise CheckpointError(f"checkpoint {path}: {n} is damaged (SHA-256 does not match "
                                  f"the manifest)")
    return manifest


def read_config(config):
    """A stored run config as this version reads it: its model entry upgraded
    (models.upgrade_config)."""
    from .models import upgrade_config

    if isinstance(config, dict) and "model" in config:
        return {**config, "model": upgrade_config(config["model"])}
    return config


def _load_weights(path: Path) -> Tuple[Dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = json.loads(meta["config"])
    except Exception as e:        # safetensors raises its own error types; re-raised clearly
        raise CheckpointError(f"{path}: cannot read the weights ({type(e).__name__}: {e})") \
            from None
    return tensors, read_config(config)


def stored_config(path) -> dict:
    """The run config stored in the checkpoint directory ``path`` (or the ``.safetensors``
    file ``path``), read from the metadata of its ``model.safetensors`` (no weights
    loaded, no file checked against the manifest); CheckpointError saying what is wrong
    otherwise."""
    from safetensors import safe_open

    path = Path(path)
    f = path if path.is_file() else path / "model.safetensors"
    if not f.is_file():
        verify(path)            # says why: a run directory, no checkpoint, incomplete
        raise CheckpointError(f"checkpoint {path}: model.safetensors is missing")
    try:
        with safe_open(str(f), framework="pt", device="cpu") as sf:
            config = json.loads((sf.metadata() or {})["config"])
    except Exception as e:        # safetensors raises its own error types; re-raised clearly
        raise CheckpointError(f"{f}: cannot read the stored config ({type(e).__name__}: "
                              f"{e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{f}: the stored config is not a mapping")
    return read_config(config)


def load(path) -> dict:
    """A verified checkpoint: dict with ``model`` and ``ema`` (state dicts), ``step``,
    ``config`` and the rest of ``state.pt``. CheckpointError if it is damaged."""
    path = Path(path)
    verify(path)
    model, _ = _load_weights(path / "model.safetensors")
    ema, _ = _load_weights(path / "ema.safetensors")
    try:
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as e:       # torch raises several types for a bad file; re-raised clearly
        raise CheckpointError(f"checkpoint {path}: state.pt cannot be loaded "
                              f"({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path}: state.pt is not a blurfast checkpoint")
    return {**state, "config": read_config(state.get("config")), "model": model, "ema": ema,
            "path": str(path)}


def latest_valid(ckpt_dir) -> Optional[dict]:
    """The newest checkpoint under ``ckpt_dir`` that loads; damaged ones are skipped
    with a warning. None when there is none."""
    for step, p in list_checkpoints(ckpt_dir):
        try:
            return load(p)
        except CheckpointError as e:
            warnings.warn(f"skipping a damaged checkpoint: {e}", stacklevel=2)
    return None


def load_model(path, ema: bool = True, device="cpu"):
    """``(model, diffusion, config)`` from a checkpoint directory or one of its
    ``.safetensors`` files; the EMA weights by default. For sampling."""
    from .diffusion import BlurDiffusion
    from .models import UNet

    path = Path(path)
    if path.is_dir():
        verify(path)
        path = path / ("ema.safetensors" if ema else "model.safetensors")
    elif not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    tensors, config = _load_weights(path)
    try:
        model = UNet(**config["model"])
        model.load_state_dict(tensors)
        diff = BlurDiffusion(**config["diffusion"])
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path}: weights do not match the stored config ({e})") from None
    return model.to(device).eval(), diff, config
