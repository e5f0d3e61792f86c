"""Photographs and tiny-model settings shared by the model, data and training tests."""
from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

# The CIFAR-10 JPEG archive of the tests that use real photographs. Its folder is
# $BLURFAST_TEST_DATA when set, else shared/data beside the checkout (../shared/data from
# the repository root); without the file those tests skip, saying where they looked.
CIFAR_NAME = "cifar10-32-jpeg.tar.gz"
TEST_DATA_ENV = "BLURFAST_TEST_DATA"


def cifar_archive() -> Path:
    """Where the CIFAR-10 archive is looked for."""
    folder = os.environ.get(TEST_DATA_ENV) or \
        Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(folder).expanduser() / CIFAR_NAME


CIFAR = cifar_archive()
CIFAR_SKIP = (f"CIFAR-10 archive not found at {CIFAR} (set {TEST_DATA_ENV} to the folder "
              f"that holds {CIFAR_NAME})")

# A U-Net small enough for CPU tests (0.7 M parameters at 16x16).
TINY = dict(base_channels=32, channel_mult=(1, 2), num_res_blocks=1)


def cifar_photos(dest: Path, n: int) -> Path:
    """The first n training JPEGs of the CIFAR-10 archive, extracted under dest."""
    dest.mkdir(parents=True, exist_ok=True)
    got = 0
    with tarfile.open(CIFAR, "r:gz") as tar:
        for m in tar:
            if m.isfile() and m.name.startswith("train/") and m.name.endswith(".jpg"):
                (dest / f"{got:05d}.jpg").write_bytes(tar.extractfile(m).read())
                got += 1
                if got == n:
                    break
    return dest


def made_photos(dest: Path, n: int, size: int = 32, seed: int = 0) -> Path:
    """n smooth synthetic 'photos' (random low-frequency colour fields with a disc),
    written as JPEG and PNG, for when the CIFAR archive is absent."""
    from PIL import Image

    dest.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        img = np.zeros((size, size, 3))
        for c in range(3):
            fx, fy, ph = rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0), rng.uniform(0, 6.3)
            img[..., c] = 0.5 + 0.3 * np.sin(2 * np.pi * (fx * xx + fy * yy) + ph)
        cx, cy, r = rng.uniform(0.3, 0.7, 2).tolist() + [rng.uniform(0.1, 0.3)]
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2
        img[disc] = rng.uniform(0, 1, 3)
        pic = Image.fromarray((img * 255).clip(0, 255).astype(np.uint8))
        pic.save(dest / (f"{i:05d}.jpg" if i % 2 else f"{i:05d}.png"))
    return dest


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread for a test module (imported by the modules that want it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
