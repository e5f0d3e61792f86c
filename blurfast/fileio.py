"""Atomic file writes: a temporary file in the same folder, then a rename."""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["atomic_path", "leftover_temporaries", "save_npz", "write_text", "check_writable",
           "write_problem"]

# atomic_path's temporary file for NAME: .NAME.PID.HEX, then its suffix.
_TEMPORARY = re.compile(r"\.(.+)\.[0-9]+\.[0-9a-f]{8}(\.[A-Za-z0-9]+)?")


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


def leftover_temporaries(folder) -> list:
    """``(path, name)`` of each temporary file of :func:`atomic_path` in ``folder``, with
    the name of the file it was for: a process killed before its rename leaves one."""
    found = [(_TEMPORARY.fullmatch(f.name), f) for f in Path(folder).glob(".*")]
    return [(f, m[1]) for m, f in found if m and f.is_file()]


def write_problem(path):
    """Why a file at ``path`` could not be made, or None: its nearest existing ancestor
    must be a folder that takes a new file (tried: a file made there and removed; the
    missing folders between are not made)."""
    folder = Path(path).absolute().parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"{str(folder)!r} is not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".blurfast-", suffix=".probe"):
            pass
    except OSError as e:
        return f"{e.strerror or e}: {str(folder)!r}"
    return None


def check_writable(name: str, path) -> None:
    """ValueError naming ``name`` unless :func:`atomic_path` can write ``path``: it is no
    folder, and :func:`write_problem` finds none."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{name}: {str(path)!r} is a folder, expected a file path")
    problem = write_problem(path)
    if problem:
        raise ValueError(f"{name}: cannot write {str(path)!r}: {problem}")


def save_npz(path, **arrays) -> None:
    """``np.savez`` to ``path`` atomically (the name is kept as given)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def write_text(path, text: str) -> None:
    """``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
