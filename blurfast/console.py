"""What the package prints for people: whether stderr is a terminal (progress bars there,
a line per row in a log file), and plural wording."""
from __future__ import annotations

import sys
from typing import Optional

__all__ = ["on_terminal", "bars_on", "plural"]


def on_terminal() -> bool:
    """Whether stderr is a terminal. A bar's redraws pile up in a batch job's log file, so
    progress off a terminal is one line per finished row or batch instead."""
    return sys.stderr.isatty()


def bars_on(no_progress: bool) -> bool:
    """Whether a command draws its progress bars: unless --no-progress, and only on a
    terminal."""
    return not no_progress and on_terminal()


def plural(n: int, word: str, many: Optional[str] = None) -> str:
    """``word`` for a count of ``n``: as given for 1, else ``many`` (default ``word + "s"``).
    ``plural(2, "image")`` is ``"images"``; the count itself is the caller's to print."""
    return word if n == 1 else (many if many is not None else word + "s")
