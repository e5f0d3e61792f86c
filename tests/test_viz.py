"""Pictures: the forward strip and the reverse trajectory, and coarse-to-fine synthesis."""
import numpy as np
import pytest
import scipy.fft
import torch
from PIL import Image

from blurfast import viz
from blurfast.diffusion import BlurDiffusion
from blurfast.sampling import sample
from blurfast.testing import example_oracle


@pytest.fixture(scope="module")
def diff():
    return BlurDiffusion(resolution=16, channels=3, num_steps=1000)


def tile(pic, r, c, h=16, w=16, pad=1):
    return pic[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w]


def test_to_uint8():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.999, 1.0]).view(1, 1, 5)
    np.testing.assert_array_equal(viz.to_uint8(x)[0, :, 0], [0, 0, 128, 255, 255])
    with pytest.raises(ValueError, match="x"):
        viz.to_uint8(torch.zeros(2, 4, 4))


def test_forward_strip(diff, tmp_path):
    x0 = example_oracle(diff).sample(2, seed=0).float().clamp(-1, 1)
    path = tmp_path / "forward.png"
    pic, steps = viz.forward_strip(diff, x0, path=path, seed=4)
    assert steps == list(range(0, 1001, 100))
    assert pic.shape == (2 * 17 - 1, 11 * 17 - 1, 3) and pic.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(Image.open(path)), pic)
    for b in range(2):
        np.testing.assert_array_equal(tile(pic, b, 0), viz.to_uint8(x0[b]))
        for col, i in enumerate(steps[1:], start=1):
            xt = diff.q_sample(x0, torch.full((2,), i), seed=4)[0]
            np.testing.assert_array_equal(tile(pic, b, col), viz.to_uint8(xt[b]))
    assert not (tmp_path / "forward.png.tmp").exists()


def test_trajectory(diff, tmp_path):
    o = example_oracle(diff)
    path = tmp_path / "traj.png"
    pic, shown = viz.trajectory(o, diff, (2,) + diff.shape, path=path, steps=20, num=5, seed=1)
    assert len(shown) == 6 and all(a > b for a, b in zip(shown, shown[1:]))
    assert shown[0] == 999 and shown[-2] == 1 and shown[-1] == 0
    assert pic.shape == (2 * 17 - 1, 6 * 17 - 1, 3)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), pic)
    final = sample(o, diff, (2,) + diff.shape, steps=20, seed=1, progress=False)
    for b in range(2):
        np.testing.assert_array_equal(tile(pic, b, 5), viz.to_uint8(final[b]))


def test_reverse_run_is_coarse_to_fine(diff):
    # x0_hat fixes low frequencies before high ones: half-way through a run, the low-band
    # part of x0_hat is already closer to the final sample than the high-band part.
    o = example_oracle(diff)
    hats = {}
    out = sample(o, diff, (200,) + diff.shape, sampler="ddim", steps=20, seed=2, progress=False,
                 callback=lambda i, x, x0: hats.__setitem__(i, x0.clone()))
    k = np.add.outer(np.arange(16), np.arange(16))
    low, high = k < 4, k >= 12

    def rel_err(i, band):
        a = scipy.fft.dctn(hats[i].double().numpy(), axes=(-2, -1), norm="ortho")[..., band]
        b = scipy.fft.dctn(out.double().numpy(), axes=(-2, -1), norm="ortho")[..., band]
        return np.sum((a - b) ** 2) / np.sum(b ** 2)

    mid = sorted(hats)[len(hats) // 2]
    assert rel_err(mid, low) < 0.1 < 0.5 < rel_err(mid, high)
