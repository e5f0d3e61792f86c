#!/usr/bin/env python
"""Plain benchmark runner (no pytest): times every case with CUDA events and writes JSON.

    python benchmarks/run.py --device cuda --quick --json benchmarks/results/h100.json
    python benchmarks/run.py --device cpu --quick

A thin wrapper of :func:`blurfast.bench.run`, run as ``blurfast bench`` (also
``python -m blurfast.bench``): bad input is one line and exit code 2 (BLURFAST_DEBUG=1
shows the traceback); see benchmarks/README.md for what each column means.
"""
import os
import sys

try:
    import blurfast  # noqa: F401  (the installed package, when there is one)
except ImportError:   # a source checkout: import the package next to this folder
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from blurfast.bench import run  # noqa: E402,F401
from blurfast.cli import main as cli_main  # noqa: E402


def main(argv=None) -> int:
    """``blurfast bench`` with ``argv`` (default: this script's arguments)."""
    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
