import pytest
import torch


def cuda_ready() -> bool:
    from blurfast._backend import HAS_CUDA_KERNELS
    return HAS_CUDA_KERNELS and torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if cuda_ready():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and blurfast built with CUDA kernels")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

