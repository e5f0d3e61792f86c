"""Pictures: the forward strip and the reverse trajectory, coarse-to-fine synthesis, and a
run's curves."""
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


X0 = torch.zeros(2, 3, 16, 16)


@pytest.mark.parametrize("call, words", [
    (lambda d, m: viz.forward_strip(d, X0, num=0), "num: expected an int in [1, 1000], got 0"),
    (lambda d, m: viz.forward_strip(d, X0, num=-2), "num: expected an int in [1, 1000]"),
    (lambda d, m: viz.forward_strip(d, X0, num=1001), "num: expected an int in [1, 1000]"),
    (lambda d, m: viz.forward_strip(d, X0, num=2.5), "num: expected an int in [1, 1000]"),
    (lambda d, m: viz.forward_strip(d, X0, num=2, pad=-3), "pad: expected an int >= 0, got -3"),
    (lambda d, m: viz.trajectory(m, d, (2, 3, 16, 16), steps=20, num=0),
     "num: expected an int >= 1, got 0"),
    (lambda d, m: viz.trajectory(m, d, (2, 3, 16, 16), steps=20, num=-1),
     "num: expected an int >= 1, got -1"),
    (lambda d, m: viz.trajectory(m, d, (2, 3, 16, 16), steps=20, pad=-1),
     "pad: expected an int >= 0, got -1"),
    (lambda d, m: viz.grid([[X0[0], X0[1]]], pad=-3), "pad: expected an int >= 0, got -3"),
    (lambda d, m: viz.grid([[X0[0]]], pad=1.5), "pad: expected an int >= 0, got 1.5"),
])
def test_bad_num_and_pad_are_named_before_any_work(diff, call, words):
    calls = []

    def model(x, t):
        calls.append(t)
        return torch.zeros_like(x)
    with pytest.raises(ValueError) as e:
        call(diff, model)
    assert str(e.value).startswith(words), e.value
    assert not calls                                  # trajectory: before sampling


def test_extreme_num_and_pad():
    d = BlurDiffusion(resolution=16, channels=3, num_steps=4)
    pic, steps = viz.forward_strip(d, X0, num=4, pad=0)       # every step, tiles abutting
    assert steps == [0, 1, 2, 3, 4] and pic.shape == (32, 5 * 16, 3)
    pic, steps = viz.forward_strip(d, X0, num=1)
    assert steps == [0, 4] and pic.shape == (33, 33, 3)
    model = example_oracle(d)
    pic, shown = viz.trajectory(model, d, (1, 3, 16, 16), steps=3, num=10)   # every call
    assert shown == [3, 2, 1, 0] and pic.shape == (16, 4 * 17 - 1, 3)
    pic, shown = viz.trajectory(model, d, (1, 3, 16, 16), steps=3, num=1)
    assert shown == [3, 0]


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


def test_smooth_has_the_half_life_and_skips_non_finite_values():
    # A step from 0 to 1: halfway after one half-life, 3/4 after two (exact EMA).
    values = [0.0] * 200 + [1.0] * 20
    out = viz._smooth(values, 5)
    np.testing.assert_allclose([out[204], out[209]], [0.5, 0.75], rtol=1e-12)
    # A nan row changes nothing: the average just before it is carried over.
    out = viz._smooth([2.0, float("nan"), 2.0], 3)
    np.testing.assert_allclose(out, [2.0, 2.0, 2.0], rtol=1e-12)
    assert np.isnan(viz._smooth([float("nan")], 3)[0])


@pytest.mark.parametrize("with_fid", [False, True, "kid"])
def test_training_curves(tmp_path, with_fid):
    pytest.importorskip("matplotlib")
    rows = ["step,images,loss,grad_norm,lr,nonfinite,images_per_s,elapsed_s"]
    for s in range(1, 41):
        loss = "nan" if s == 7 else f"{1.0 / s:.6g}"
        rows.append(f"{s},{4 * s},{loss},{0.5 + 0.01 * s},1e-3,{int(s >= 7)},{100 + s},{s}")
    (tmp_path / "log.csv").write_text("\n".join(rows) + "\n")
    if with_fid == "kid":        # a log of this version: KID too (nan in a resumed old row)
        (tmp_path / "fid.csv").write_text("step,fid,kid\n20,80.5,nan\n40,61.25,0.0312\n"
                                          "60,50.5,0.0201\n")
    elif with_fid:               # an older run's log: no KID
        (tmp_path / "fid.csv").write_text("step,fid\n20,80.5\n40,61.25\n")
    path = viz.training_curves(tmp_path)
    assert path == tmp_path / "curves.png"
    panels = 3 + (with_fid is not False) + (with_fid == "kid")
    with Image.open(path) as im:
        # One panel per curve, 2.2 inches each at 100 dpi: FID adds the fourth, KID a fifth.
        assert im.size == (700, 220 * panels)
        pic = np.asarray(im.convert("RGB")).astype(int)
    # Each panel has its curve drawn: pixels of matplotlib's first colour (C0, the log's
    # curves) in the first three panels, of C1 (FID, KID) in the others.
    bands = np.array_split(pic, panels, axis=0)
    colours = [(31, 119, 180)] * 3 + [(255, 127, 14)] * 2
    for band, c in zip(bands, colours):
        assert (np.abs(band - np.array(c)).sum(-1) < 40).sum() > 100
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_training_curves_of_a_single_log_row_show_its_point(tmp_path):
    # One log row (and one FID row): each panel shows its point, pixels of its colour.
    pytest.importorskip("matplotlib")
    (tmp_path / "log.csv").write_text("step,images,loss,grad_norm,lr,nonfinite,images_per_s,"
                                      "elapsed_s\n20,80,0.9,0.7,1e-3,0,12.5,8.0\n")
    (tmp_path / "fid.csv").write_text("step,fid\n20,300.5\n")
    with Image.open(viz.training_curves(tmp_path)) as im:
        pic = np.asarray(im.convert("RGB")).astype(int)
    colours = [(31, 119, 180)] * 3 + [(255, 127, 14)]
    for band, c in zip(np.array_split(pic, 4, axis=0), colours):
        assert (np.abs(band - np.array(c)).sum(-1) < 40).sum() > 10


def test_training_curves_needs_a_log_with_rows(tmp_path):
    with pytest.raises(ValueError, match="run_dir: no log.csv"):
        viz.training_curves(tmp_path)
    # a run that has not logged yet: an empty plot was written
    (tmp_path / "log.csv").write_text("step,loss,grad_norm,images_per_s\n")
    with pytest.raises(ValueError, match="^RUN_DIR: the log.csv of .* has no rows yet"):
        viz.training_curves(tmp_path, arg="RUN_DIR")
    assert not (tmp_path / "curves.png").exists()


def test_pictures_are_written_whole_with_the_usual_permissions(tmp_path):
    import os
    viz.save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "a.png")
    (tmp_path / "plain").write_bytes(b"")
    assert os.stat(tmp_path / "a.png").st_mode == os.stat(tmp_path / "plain").st_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "plain"]   # no temp left
    with pytest.raises(TypeError):
        viz.save_png(np.zeros((4, 4, 5), np.uint8), tmp_path / "b.png")    # Pillow refuses
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "plain"]


def test_grid_separators_and_missing_tiles_are_white():
    # grid's docstring: `pad` white pixels between tiles. Black tiles (x = -1 -> 0), rows
    # of 2 and 1 tiles, pad 2: every pixel outside a tile, the missing tile's place
    # included, is 255.
    black = -torch.ones(3, 4, 5)
    pic = viz.grid([[black, black], [black]], pad=2)
    assert pic.shape == (2 * 4 + 2, 2 * 5 + 2, 3)
    in_tile = np.zeros(pic.shape[:2], bool)
    for r, c in ((0, 0), (0, 1), (1, 0)):
        in_tile[r * 6:r * 6 + 4, c * 7:c * 7 + 5] = True
    assert (pic[in_tile] == 0).all()
    assert (pic[~in_tile] == 255).all() and (~in_tile).sum() == 12 * 10 - 3 * 20


def test_grid_is_as_wide_as_its_longest_row_wherever_that_row_is():
    # Rows of 1 then 3 tiles, pad 1: 3 columns wide, each tile at (r (h + 1), c (w + 1)),
    # the two places the first row lacks white. Tiles of distinct grey levels show where
    # each one went.
    tiles = [torch.full((3, 2, 3), v) for v in (-1.0, -0.5, 0.0, 0.5)]
    pic = viz.grid([[tiles[0]], tiles[1:]], pad=1)
    want = np.full((2 * 2 + 1, 3 * 3 + 2, 3), 255, np.uint8)
    for (r, c), t in zip(((0, 0), (1, 0), (1, 1), (1, 2)), tiles):
        want[r * 3:r * 3 + 2, c * 4:c * 4 + 3] = viz.to_uint8(t)
    np.testing.assert_array_equal(pic, want)


def test_forward_strip_steps_round_to_the_nearest_step(diff):
    # Columns at i = k N / num, rounded: N = 1000, num = 3 gives 333.3 -> 333 and
    # 666.7 -> 667 (the other strips have N / num an integer).
    x0 = torch.linspace(-1, 1, 3 * 16 * 16).reshape(1, 3, 16, 16)
    pic, steps = viz.forward_strip(diff, x0, num=3, seed=2)
    assert steps == [0, 333, 667, 1000]
    xt = diff.q_sample(x0, torch.tensor([667]), seed=2)[0]
    np.testing.assert_array_equal(tile(pic, 0, 2), viz.to_uint8(xt[0]))


def test_save_gif_keeps_every_frame_and_its_duration(tmp_path):
    # Pillow's save(save_all=True) dropped a frame equal to the one before it and added its
    # duration to that one: [a, a, a, b, b] came back as 2 frames of 240 and 2080 ms. Read
    # back: every frame, its duration, its pixels (<= 256 colours: exact), looping.
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (12, 16, 3), dtype=np.uint8) for _ in range(2))
    for frames in ([a, a, a, b, b], [a[..., :1], a[..., :1], b[..., :1]]):
        durations = [80, 120, 30, 50, 2000][:len(frames) - 1] + [2000]
        path = tmp_path / "t.gif"
        viz.save_gif(frames, path, durations)
        with Image.open(path) as gif:
            assert gif.n_frames == len(frames) and gif.info["loop"] == 0
            for k in range(gif.n_frames):
                gif.seek(k)
                assert gif.info["duration"] == durations[k], k
                want = np.repeat(frames[k], 3, -1) if frames[k].shape[-1] == 1 else frames[k]
                np.testing.assert_array_equal(np.asarray(gif.convert("RGB")), want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.gif"]     # no temp file left
    with pytest.raises(ValueError, match="^durations_ms: expected one per frame"):
        viz.save_gif([a, b], tmp_path / "u.gif", [80])


def test_save_gif_names_the_argument_that_is_wrong(tmp_path):
    # No frames was said of durations_ms; a fractional or negative duration was int()'d or
    # handed to Pillow unchecked.
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="^frames: expected at least one picture, got none"):
        viz.save_gif([], tmp_path / "e.gif", [])
    for bad in (80.5, -10, 0):
        with pytest.raises(ValueError, match=r"^durations_ms\[1\]: expected an int >= 1"):
            viz.save_gif([a, a], tmp_path / "d.gif", [80, bad])
    assert list(tmp_path.iterdir()) == []
