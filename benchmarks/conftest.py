"""pytest-benchmark configuration for the kernel benchmarks.

Run from the repository root, after ``pip install .``, with plain ``pytest`` (``python -m``
would import the source tree, which has no compiled ``_C``)::

    pytest benchmarks                      # CUDA when available, else CPU
    pytest benchmarks --bench-device cpu --bench-rounds 3
    pytest benchmarks -k "dct2 and 64x3x256x256" --benchmark-json out.json

The normal test run (``pytest tests``) never collects this directory.
"""
import os
import sys

import pytest

try:
    import blurfast  # noqa: F401
except ImportError:      # running from a source checkout without install
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from blurfast import bench  # noqa: E402


def pytest_addoption(parser):
    g = parser.getgroup("blurfast-bench")
    g.addoption("--bench-device", choices=["cpu", "cuda"], default=None,
                help="device to benchmark on (default: cuda when available, else cpu)")
    g.addoption("--bench-rounds", type=int, default=None,
                help="timed rounds per case (default: 50 on CUDA, 5 on CPU)")
    g.addoption("--bench-shapes", nargs="+", default=None, metavar="BxCxHxW",
                help="override the shapes, e.g. 16x3x64x64")


def _device(config):
    d = config.getoption("--bench-device")
    if d is None:
        d = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(d)


def _shapes(config):
    s = config.getoption("--bench-shapes")
    if s:
        return [bench._parse_shape(v) for v in s]
    return list(bench.CUDA_SHAPES if _device(config).type == "cuda" else bench.CPU_SHAPES)


def pytest_generate_tests(metafunc):
    names = metafunc.fixturenames
    if "case" in names:
        metafunc.parametrize("case", bench.CASES)
    if "shape" in names:
        shapes = _shapes(metafunc.config)
        metafunc.parametrize("shape", shapes, ids=["x".join(map(str, s)) for s in shapes])
    if "impl" in names:
        metafunc.parametrize("impl", bench.IMPLS)


@pytest.fixture(scope="session")
def bench_device(pytestconfig):
    d = _device(pytestconfig)
    if d.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda but no CUDA device")
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


@pytest.fixture(scope="session")
def bench_rounds(pytestconfig, bench_device):
    r = pytestconfig.getoption("--bench-rounds")
    return r if r else (50 if bench_device.type == "cuda" else 5)


@pytest.fixture(scope="session")
def copy_gbps(bench_device):
    """Device-to-device copy bandwidth (read + write bytes) measured in this session."""
    return bench.measure_copy_gbps(bench_device)
