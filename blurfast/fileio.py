"""Atomic file writes: a temporary file in the same folder, then a rename."""
from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

import numpy as np

__all__ = ["atomic_path", "check_writable", "save_npz", "write_text"]


@contextlib.contextmanager
def atomic_path(path, suffix: str = ".tmp"):
    """Yields a temporary path beside ``path``; renamed onto ``path`` if the block succeeds,
    removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created as open() creates files (0o666 less the umask; mkstemp would make it 0o600),
    # under a name no other writer uses.
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{suffix}"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path, name: str) -> None:
    """Fails now, naming ``name``, where writing the file ``path`` later would: a folder
    at ``path``, or a parent that cannot be made or written (a file in the way, no
    permission). Creates nothing."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{name}: {str(path)!r} is a folder; expected a file path")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:   # the nearest that exists
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"{name}: cannot write {str(path)!r}: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{name}: cannot write {str(path)!r}: no permission in {str(parent)!r}")


def save_npz(path, **arrays) -> None:
    """``np.savez`` to ``path`` atomically (the name is kept as given)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def write_text(path, text: str) -> None:
    """``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
