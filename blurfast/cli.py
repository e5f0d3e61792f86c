"""The ``blurfast`` command line. ``blurfast info`` reports the build and the backends."""
from __future__ import annotations

import argparse
import platform
import sys


def _info(args) -> int:
    import torch

    from . import __version__
    from ._backend import HAS_CUDA_KERNELS, backend_for, describe_archs

    print(f"blurfast {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    if HAS_CUDA_KERNELS:
        print(f"CUDA kernels: compiled for {describe_archs()}")
    else:
        print("CUDA kernels: not compiled (CPU kernels only)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            print(f"GPU {i}: {torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    else:
        print("GPU: none seen by torch")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for op in ("dct2", "idct2", "spectral", "gaussian_blur"):
        where = ", ".join(f"{d}: {backend_for(d)}" for d in devices)
        print(f"op {op:<14} {where}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blurfast", description="Blur diffusion toolkit.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("info", help="version, compiled kernels, GPUs and the backend of each op")
    s.set_defaults(func=_info)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
