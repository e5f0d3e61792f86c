"""`blurfast draw`: each picture's tiles against what they claim to show: the images
`blurfast sample` writes, the prior, the dataset's images, q_sample of the run's process."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from blurfast import cli, viz
from blurfast.data import open_dataset, prepare, to_float, to_unit_range
from blurfast.diffusion import BlurDiffusion
from blurfast.generate import generate
from blurfast.sampling import timesteps
from train_helpers import TINY, made_photos, one_thread  # noqa: F401

SIDE = 16


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny run on made photos, trained on [0, 1] pixels (so every picture converts)."""
    from blurfast.training import train
    root = tmp_path_factory.mktemp("draw")
    data = made_photos(root / "photos", 9, size=SIDE)
    train(data=str(data), out=str(root / "run"), preset="small", model=dict(TINY),
          resolution=SIDE, batch_size=3, steps=2, lr=1e-2, ema_decay=0.0, device="cpu",
          pixel_range="0,1", diffusion=dict(num_steps=30, blur_schedule="linear"),
          save_every=2, sample_every=1000, progress=False)
    return root


def tiles(path, rows: int, cols: int) -> np.ndarray:
    """A picture (pad 1) cut into (rows, cols, SIDE, SIDE, C) tiles."""
    pic = np.asarray(Image.open(path))
    pic = pic[..., None] if pic.ndim == 2 else pic
    assert pic.shape[:2] == (rows * (SIDE + 1) - 1, cols * (SIDE + 1) - 1)
    return np.stack([np.stack([pic[r * (SIDE + 1):r * (SIDE + 1) + SIDE,
                                   c * (SIDE + 1):c * (SIDE + 1) + SIDE] for c in range(cols)])
                     for r in range(rows)])


def shown(x: torch.Tensor, pixel_range: str) -> np.ndarray:
    """uint8 tiles (B, H, W, C) of images in a run's pixel range, as pictures show them."""
    return np.stack([viz.to_uint8(t) for t in to_unit_range(x, pixel_range).clamp(-1, 1)])


def test_trajectory_ends_in_the_images_of_sample_and_starts_at_the_prior(run, tmp_path,
                                                                         capsys):
    out = tmp_path / "traj.png"
    argv = ["draw", "trajectory", "--ckpt", str(run / "run"), "--n", "3", "--steps", "6",
            "--columns", "4", "--seed", "5", "--device", "cpu", "--out", str(out)]
    assert cli.main(argv) == 0
    from blurfast import checkpoint as ckpt
    from blurfast.generate import resolve_checkpoint
    _, diff, _ = ckpt.load_model(resolve_checkpoint(run / "run"))
    seq = timesteps(diff, 6)
    cols = [seq[round(k * 5 / 3)] for k in range(4)]
    assert f"ddim at steps {', '.join(map(str, cols))}, then the sample" in capsys.readouterr().out
    t = tiles(out, 6, 5)                          # x_t above x0_hat, per image
    generate(run / "run", 3, tmp_path / "s", steps=6, seed=5, device="cpu", progress=False)
    made = np.stack([np.asarray(Image.open(tmp_path / "s" / f"{i:06d}.png")) for i in range(3)])
    np.testing.assert_array_equal(t[1::2, -1], made)          # the sample, in both rows
    np.testing.assert_array_equal(t[0::2, -1], made)
    prior = diff.prior_sample((3,) + diff.shape, seq[0], seed=5)
    np.testing.assert_array_equal(t[0::2, 0], shown(prior, "0,1"))
    assert not np.array_equal(t[1::2, 0], t[0::2, 0])         # x0_hat is not x_t

    assert cli.main(argv[:-1] + [str(tmp_path / "one.png"), "--show", "x0_hat"]) == 0
    np.testing.assert_array_equal(tiles(tmp_path / "one.png", 3, 5), t[1::2])


def test_process_of_a_run_draws_its_data_through_its_process(run, tmp_path, capsys):
    out = tmp_path / "process.png"
    assert cli.main(["draw", "process", "--ckpt", str(run / "run"), "--n", "3",
                     "--columns", "3", "--seed", "2", "--out", str(out)]) == 0
    assert "(numbers 0, 4, 8), x_i at i = 0, 10, 20, 30 of N = 30" in capsys.readouterr().out
    diff = BlurDiffusion(resolution=SIDE, num_steps=30, blur_schedule="linear")
    ds = open_dataset(run / "photos", resolution=SIDE)
    x0 = to_float(ds.__getitems__([0, 4, 8]), None, "0,1").contiguous()
    t = tiles(out, 3, 4)
    np.testing.assert_array_equal(t[:, 0], ds.__getitems__([0, 4, 8]).numpy())
    for k, i in enumerate([10, 20, 30], start=1):
        xi = diff.q_sample(x0, torch.full((3,), i), seed=2)[0]
        np.testing.assert_array_equal(t[:, k], shown(xi, "0,1"))


def test_variations_of_a_runs_images(run, tmp_path, capsys):
    # Per image a row: the image, x_start's mean (q_sample without noise), then the
    # variations that sampling.variations makes of the batch with each image repeated
    # (its tests check it against the exact model).
    from blurfast import checkpoint as ckpt
    from blurfast.generate import resolve_checkpoint
    from blurfast.sampling import variations
    out = tmp_path / "v.png"
    assert cli.main(["draw", "variations", "--ckpt", str(run / "run"), "--n", "2",
                     "--variations", "3", "--strength", "0.5", "--seed", "4", "--device",
                     "cpu", "--out", str(out), "--no-progress"]) == 0
    assert capsys.readouterr().out.endswith(
        "(numbers 0, 8), each with its mean at step 14 of N = 30, then 3 variations (ddim, "
        "14 model calls)\n")
    model, diff, config = ckpt.load_model(resolve_checkpoint(run / "run"))
    ds = open_dataset(run / "photos", resolution=SIDE)
    x0 = to_float(ds.__getitems__([0, 8]), None, "0,1").contiguous()
    t = tiles(out, 2, 5)
    np.testing.assert_array_equal(t[:, 0], ds.__getitems__([0, 8]).numpy())
    mean = diff.q_sample(x0, torch.full((2,), 14), noise=torch.zeros_like(x0))[0]
    np.testing.assert_array_equal(t[:, 1], shown(mean, "0,1"))
    with torch.no_grad():
        made = variations(diff.eps_model(model, config["target"]), diff,
                          x0.repeat_interleave(3, 0), 14, steps=14, seed=4, clip=(0.0, 1.0),
                          progress=False)
    np.testing.assert_array_equal(t[:, 2:].reshape(6, SIDE, SIDE, 3), shown(made, "0,1"))
    assert not np.array_equal(t[0, 2], t[0, 3])            # each its own noise


def test_process_from_flags_on_a_prepared_array(run, tmp_path):
    npy = tmp_path / "photos.npy"
    prepare(run / "photos", npy, resolution=SIDE, progress=False)
    out = tmp_path / "p.png"
    assert cli.main(["draw", "process", "--data", str(npy), "--num-steps", "8", "--sigma-max",
                     "3", "--n", "2", "--columns", "2", "--out", str(out)]) == 0
    diff = BlurDiffusion(resolution=SIDE, num_steps=8, sigma_max=3.0)   # the array's side
    x0 = to_float(open_dataset(npy).__getitems__([0, 8]), None, "-1,1").contiguous()
    t = tiles(out, 2, 3)
    for k, i in enumerate([4, 8], start=1):
        xi = diff.q_sample(x0, torch.full((2,), i), seed=0)[0]
        np.testing.assert_array_equal(t[:, k], shown(xi, "-1,1"))


@pytest.mark.parametrize("fmt", ["png", "npz"])
def test_process_of_a_sample_run_draws_its_images_not_its_contact_sheet(run, tmp_path, capsys,
                                                                        fmt):
    # --data of a `blurfast sample` folder was read as a plain image folder: its
    # contact_sheet.png became one of the images (the only one of an npz run), at 64 x 64.
    from blurfast.generate import SHEET_NAME
    out = tmp_path / "s"
    generate(run / "run", 3, out, steps=2, fmt=fmt, device="cpu", progress=False)
    assert (out / SHEET_NAME).is_file()
    if fmt == "png":
        made = np.stack([np.asarray(Image.open(out / f"{i:06d}.png")) for i in range(3)])
    else:
        with np.load(out / "samples.npz") as z:
            made = z["images"]
    pic = tmp_path / "p.png"
    assert cli.main(["draw", "process", "--data", str(out), "--n", "3", "--columns", "1",
                     "--out", str(pic)]) == 0
    assert "3 images of" in capsys.readouterr().out
    np.testing.assert_array_equal(tiles(pic, 3, 2)[:, 0], made)    # the run's own size
    # an unfinished run is refused, as fid refuses it
    import json
    manifest = out / "samples.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "complete": False}))
    assert cli.main(["draw", "process", "--data", str(out), "--out", str(pic)]) == 2
    assert capsys.readouterr().err.startswith(f"blurfast draw: error: --data: {out} holds an "
                                              f"unfinished `blurfast sample` run")


@pytest.mark.parametrize("argv, words", [
    (["process", "--ckpt", "{run}", "--sigma", "2", "--resolution", "32"],
     "--resolution, --sigma: the run's own are drawn with --ckpt"),
    (["process"], "--data: required without --ckpt"),
    (["process", "--data", "{photos}", "--resolution", "16", "--num-steps", "5",
      "--columns", "6"], "--columns: expected at most N = 5, got 6"),
    (["process", "--data", "{photos}", "--out", "{photos}"], "--out: "),
    (["process", "--data", "{photos}", "--n", "0"], "--n: expected an int >= 1, got 0"),
    (["trajectory", "--ckpt", "{run}", "--columns", "0"], "--columns: expected an int >= 1"),
    (["trajectory", "--ckpt", "{run}", "--sampler", "ancestral", "--eta", "0.5"], "--eta"),
    (["curves", "{photos}"], "RUN_DIR: no log.csv in"),
    # the flag, not BlurDiffusion's or open_dataset's argument, is named
    (["process", "--data", "{photos}", "--sigma", "-1"], "--sigma: expected a finite number"),
    (["process", "--data", "{photos}", "--num-steps", "1"], "--num-steps: expected an int >= 2"),
    (["process", "--data", "{npy}", "--resolution", "8"], "--resolution: 8 differs from the "
                                                          "prepared array's 16"),
    (["process", "--data", "{photos}", "--seed", str(2 ** 64)], "--seed: expected an int in"),
    (["trajectory", "--ckpt", "{run}", "--seed", str(2 ** 64)], "--seed: expected an int in"),
    (["trajectory", "--ckpt", "{run}", "--steps", "30"],
     "--steps: expected an int in [0, 29] for this run's N = 30"),
    # a --data given is checked as given, not called the run's
    (["process", "--ckpt", "{run}", "--data", "{photos}/missing"], "--data: '"),
    (["process", "--ckpt", "{run}", "--data", "{npy8}"],
     "--data: the run's resolution 16 differs from the prepared array's 8"),
    (["process", "--data", "{photos}", "--out", "{tmp}/x.jpg"],
     "--out: expected a .png file name (the picture is a PNG), got"),
    (["process", "--data", "{photos}/00000.png"], "00000.png' is one image; expected a "
                                                   "prepared .npy array, an LSUN lmdb"),
    (["variations", "--ckpt", "{run}", "--strength", "0"],
     "--strength: expected a number in (0, 1], got 0.0"),
    (["variations", "--ckpt", "{run}", "--strength", "0.2", "--steps", "7"],
     "--steps: expected at most 6, the start that --strength 0.2 gives (N = 30), got 7"),
    (["variations", "--ckpt", "{run}", "--variations", "0"],
     "--variations: expected an int >= 1, got 0"),
    (["variations", "--ckpt", "{run}", "--steps", "0"], "--steps: expected an int >= 1, got 0"),
    # `blurfast sample --format npz`'s file: np.load gives an archive (AttributeError: no
    # dtype), not an array
    (["variations", "--ckpt", "{run}", "--data", "{npz}"],
     "samples.npz' is an .npz archive; expected a prepared .npy array, an LSUN lmdb"),
])
def test_bad_arguments_are_named(run, tmp_path, capsys, argv, words):
    npy, npy8 = tmp_path / "photos.npy", tmp_path / "photos8.npy"
    prepare(run / "photos", npy, resolution=SIDE, progress=False)
    prepare(run / "photos", npy8, resolution=8, progress=False)
    np.savez(tmp_path / "samples.npz", images=np.load(npy))
    argv = [a.format(run=run / "run", photos=run / "photos", npy=npy, npy8=npy8, tmp=tmp_path,
                     npz=tmp_path / "samples.npz") for a in argv]
    assert cli.main(["draw", *argv, *([] if "--out" in argv or argv[0] == "curves"
                                      else ["--out", str(tmp_path / "x.png")])]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_resolution_not_a_number_is_refused_as_an_image_side(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["draw", "process", "--data", str(tmp_path), "--resolution", "x"])
    assert e.value.code == 2
    assert "--resolution: expected an image side >= 8, got 'x'" in capsys.readouterr().err


def test_process_takes_a_safetensors_file_as_ckpt(run, tmp_path, capsys):
    # --help and the docs promise a run directory, checkpoint directory or .safetensors file
    from blurfast.generate import resolve_checkpoint
    step = resolve_checkpoint(run / "run")
    pics = []
    for i, ckpt in enumerate([step, step / "ema.safetensors", step / "model.safetensors"]):
        out = tmp_path / f"p{i}.png"
        assert cli.main(["draw", "process", "--ckpt", str(ckpt), "--n", "2", "--columns", "3",
                         "--out", str(out)]) == 0, capsys.readouterr().err
        pics.append(np.asarray(Image.open(out)))
    np.testing.assert_array_equal(pics[1], pics[0])
    np.testing.assert_array_equal(pics[2], pics[0])


@pytest.mark.parametrize("command", [["sample", "--n", "1"], ["draw", "trajectory", "--n", "1"]])
def test_raw_weights_with_a_safetensors_file_is_refused(run, tmp_path, capsys, command):
    # --raw-weights picks one of a directory's two files; a file given is loaded as it
    # is, so the flag with one would be silently ignored: an error naming it instead.
    from blurfast.generate import resolve_checkpoint
    f = resolve_checkpoint(run / "run") / "ema.safetensors"
    out = tmp_path / ("s" if command[0] == "sample" else "t.png")
    assert cli.main([*command, "--ckpt", str(f), "--raw-weights", "--steps", "2",
                     "--device", "cpu", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--raw-weights: picks model.safetensors over ema.safetensors in a run or " \
           f"checkpoint directory; the file given ({f}) is loaded as it is" in err
    assert not out.exists()


def test_curves(run, tmp_path, capsys):
    out = tmp_path / "c.png"
    assert cli.main(["draw", "curves", str(run / "run"), "--out", str(out)]) == 0
    assert Image.open(out).format == "PNG"
    # A run that has not logged yet: said so, no picture of empty axes.
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "log.csv").write_text("step,loss,grad_norm,lr,images_per_s\n")
    assert cli.main(["draw", "curves", str(tmp_path / "new"), "--out",
                     str(tmp_path / "e.png")]) == 2
    assert "log.csv of" in capsys.readouterr().err and not (tmp_path / "e.png").exists()


def test_flags_are_documented_as_help_gives_them():
    # docs/training.md has a table for each picture: every flag of its --help, with the
    # default --help shows.
    import argparse
    import re
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    pictures = next(a for a in cli.build_parser().commands["draw"]._actions
                    if isinstance(a, argparse._SubParsersAction)).choices
    assert set(pictures) == {"trajectory", "process", "variations", "curves", "bench"}
    for pic, parser in pictures.items():
        table = doc[doc.index(f"`blurfast draw {pic}`:\n"):].split("\n\n")[1]
        rows = {}
        for line in table.splitlines()[2:]:             # below the header
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            for flag in re.findall(r"(--[a-z0-9-]+|`[A-Z_]+`)", cells[0]):
                flag = flag.strip("`")
                rows[flag] = cells[1].replace("`", "")
        actions = [a for a in parser._actions if a.dest != "help"]
        assert set(rows) == {f for a in actions for f in (a.option_strings or [a.metavar])}, pic
        for a in actions:
            if a.default not in (None, False, argparse.SUPPRESS):
                got = rows[a.option_strings[0]]
                assert got == str(a.default), (pic, a.dest, got)


def test_process_without_noise_draws_the_mean(run, tmp_path, capsys):
    # The mean of x_i, computed here in float64: idct2(sqrt(Abar_i) * dct2(x0)), with Abar
    # from the process's own per-frequency formula (scipy's DCT, not the library's).
    import scipy.fft
    out = tmp_path / "mean.png"
    assert cli.main(["draw", "process", "--data", str(run / "photos"), "--resolution",
                     str(SIDE), "--num-steps", "10", "--sigma-max", "2", "--n", "2",
                     "--columns", "2", "--no-noise", "--out", str(out)]) == 0
    assert "the mean of x_i at i = 0, 5, 10" in capsys.readouterr().out
    diff = BlurDiffusion(resolution=SIDE, num_steps=10, sigma_max=2.0)
    ds = open_dataset(run / "photos", resolution=SIDE)
    x0 = to_float(ds.__getitems__([0, 8]), None, "-1,1").double().numpy()
    t = tiles(out, 2, 3)
    for k, i in enumerate([5, 10], start=1):
        abar = np.exp(diff.log_abar(torch.tensor([i])).double().numpy())[0]
        mean = scipy.fft.idctn(np.sqrt(abar) * scipy.fft.dctn(x0, axes=(-2, -1), norm="ortho"),
                               axes=(-2, -1), norm="ortho")
        assert np.abs(mean).max() > 0.1                          # not faded to nothing
        np.testing.assert_allclose(t[:, k].astype(float), np.round(
            (np.clip(mean, -1, 1) + 1) * 127.5).transpose(0, 2, 3, 1), atol=1)


def test_cuda_without_a_gpu_is_named(run, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert cli.main(["draw", "trajectory", "--ckpt", str(run / "run"), "--device", "cuda"]) == 2
    assert capsys.readouterr().err == ("blurfast draw: error: --device: 'cuda' was asked for "
                                       "but torch sees no GPU\n")


def test_errors_name_the_flag_of_the_argument(tmp_path, capsys):
    # cli.flag_named: the library's "name: ..." becomes the command's "--flag: ..." (the
    # first long option where there are several), and stays as it is where no flag has
    # that name.
    parser = cli.build_parser()
    sample, train = parser.commands["sample"], parser.commands["train"]
    assert cli.flag_named(sample, "n: expected an int >= 1, got 0") == \
        "--num-samples: expected an int >= 1, got 0"
    assert cli.flag_named(train, "sigma_max: x") == "--sigma-max: x"
    assert cli.flag_named(train, "model: unknown UNet arguments") == \
        "model: unknown UNet arguments"
    assert cli.flag_named(train, "data (--data): 'x' does not exist") == \
        "data (--data): 'x' does not exist"
    assert cli.main(["sample", "--ckpt", str(tmp_path), "--n", "0", "--out",
                     str(tmp_path / "s")]) == 2
    assert capsys.readouterr().err == ("blurfast sample: error: --num-samples: expected an int "
                                       ">= 1, got 0\n")


@pytest.mark.parametrize("argv, advice", [
    (["sample", "--ckpt", "R", "--out", "S"], "; try a smaller --batch (torch: "),
    (["draw", "trajectory", "--ckpt", "R"], "; try a smaller --n (torch: "),
    (["info"], " (torch: "),
])
def test_out_of_memory_is_one_line_naming_what_shrinks_it(monkeypatch, capsys, argv, advice):
    def oom(args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB\nmore")
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    leaf = cli._leaf_parser(parser, parser.parse_known_args(argv)[0])
    leaf.set_defaults(func=oom)
    monkeypatch.delenv("BLURFAST_DEBUG", raising=False)
    assert cli.main(argv) == 1
    assert capsys.readouterr().err == (f"blurfast {argv[0]}: error: the GPU ran out of memory"
                                       f"{advice}CUDA out of memory. Tried to allocate 9 GiB)\n")
    monkeypatch.setenv("BLURFAST_DEBUG", "1")
    with pytest.raises(torch.cuda.OutOfMemoryError):
        cli.main(argv)


def test_other_runtime_errors_keep_their_traceback(monkeypatch):
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser.commands["info"].set_defaults(func=lambda args: (_ for _ in ()).throw(
        RuntimeError("a bug")))
    monkeypatch.delenv("BLURFAST_DEBUG", raising=False)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main(["info"])


def test_trajectory_default_steps_fit_a_short_chain(run, tmp_path, capsys):
    # N = 30: the default of 100 calls becomes the run's whole chain, 29 calls.
    assert cli.main(["draw", "trajectory", "--ckpt", str(run / "run"), "--n", "1",
                     "--columns", "30", "--device", "cpu", "--no-progress",
                     "--out", str(tmp_path / "t.png")]) == 0
    assert "ddim at steps 29, 28, 27," in capsys.readouterr().out
    assert tiles(tmp_path / "t.png", 2, 30).shape[:2] == (2, 30)


def test_trajectory_animation_is_the_trajectory_at_every_call(run, tmp_path, capsys):
    # viz.trajectory_frames against viz.trajectory with a column per model call (its tiles
    # are checked against `blurfast sample` and the prior above): frame k holds column k,
    # image b's x_t above its x0_hat. Then the command's GIF: a frame per call and the
    # sample, their durations, looping, each frame its picture up to Pillow's palette.
    from PIL import ImageSequence
    from blurfast import checkpoint as ckpt
    from blurfast.generate import resolve_checkpoint
    model, diff, config = ckpt.load_model(resolve_checkpoint(run / "run"))
    net = diff.eps_model(model, config["target"])
    kw = dict(steps=6, seed=5, pixel_range="0,1", clip=(0.0, 1.0))
    with torch.no_grad():
        grid_pic, cols = viz.trajectory(net, diff, (3,) + diff.shape, num=6, show="both",
                                        path=tmp_path / "t.png", **kw)
        frames, steps = viz.trajectory_frames(net, diff, (3,) + diff.shape, **kw)
    assert steps == cols and len(cols) == 7 and steps[-1] == 0
    t = tiles(tmp_path / "t.png", 6, 7)
    for k, f in enumerate(frames):
        assert f.shape == (2 * (SIDE + 1) - 1, 3 * (SIDE + 1) - 1, 3)
        for b in range(3):
            for r in range(2):
                tile = f[r * (SIDE + 1):r * (SIDE + 1) + SIDE,
                         b * (SIDE + 1):b * (SIDE + 1) + SIDE]
                np.testing.assert_array_equal(tile, t[2 * b + r, k])
    with torch.no_grad():
        only, _ = viz.trajectory_frames(net, diff, (3,) + diff.shape, show="x0_hat", **kw)
    np.testing.assert_array_equal(only[2], frames[2][SIDE + 1:])
    # At most `frames` frames: evenly spaced calls, the first and last kept, then the sample
    with torch.no_grad():
        few, few_steps = viz.trajectory_frames(net, diff, (3,) + diff.shape, frames=3, **kw)
    assert few_steps == [cols[0], cols[2], cols[5], 0]
    for f, k in zip(few, (0, 2, 5, 6)):
        np.testing.assert_array_equal(f, frames[k])

    out = tmp_path / "t.gif"
    assert cli.main(["draw", "trajectory", "--ckpt", str(run / "run"), "--n", "3", "--steps",
                     "6", "--seed", "5", "--device", "cpu", "--out", str(out),
                     "--no-progress"]) == 0
    assert capsys.readouterr().out.endswith(
        "ddim, 6 frames of 6 model calls, then the sample held\n")
    gif = Image.open(out)
    assert gif.n_frames == 7 and gif.info["loop"] == 0
    durations = []
    for k, fr in enumerate(ImageSequence.Iterator(gif)):
        durations.append(fr.info["duration"])
        got = np.asarray(fr.convert("RGB")).astype(int)
        # Pillow's 256-colour palette: 3.9 to 4.5 levels off on average here (up to ~110
        # at single pixels of these noisy frames); the prior and the sample, the ends of
        # the run, are further apart than that
        err = np.abs(got - frames[k]).mean()
        assert err < 6, k
        if k in (0, 6):
            assert 2 * err < np.abs(got - frames[6 - k]).mean(), k
    assert durations == [80] * 6 + [2000]
    assert cli.main(["draw", "trajectory", "--ckpt", str(run / "run"), "--n", "1", "--steps",
                     "6", "--frames", "2", "--device", "cpu", "--out", str(out),
                     "--no-progress"]) == 0
    assert capsys.readouterr().out.endswith(
        "ddim, 2 frames of 6 model calls, then the sample held\n")
    assert Image.open(out).n_frames == 3
    assert cli.main(["draw", "trajectory", "--ckpt", str(run / "run"), "--frames", "0",
                     "--out", str(out)]) == 2
    assert "--frames: expected an int >= 1, got 0" in capsys.readouterr().err
    assert cli.main(["draw", "trajectory", "--ckpt", str(run / "run"), "--device", "cpu",
                     "--out", str(tmp_path / "t.jpg")]) == 2
    assert "--out: expected a .png or .gif file name" in capsys.readouterr().err


@pytest.mark.parametrize("picture", ["trajectory", "variations"])
def test_draw_shows_its_bar_on_a_terminal_only(run, tmp_path, capsys, monkeypatch, picture):
    # The bar over the model calls was drawn into a log file too (stderr not a terminal);
    # now only on a terminal, and not with --no-progress.
    import sys
    for tty, flags, drawn in ((False, [], False), (True, [], True),
                              (True, ["--no-progress"], False)):
        monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
        assert cli.main(["draw", picture, "--ckpt", str(run / "run"), "--n", "1",
                         "--steps", "2", "--device", "cpu", "--out",
                         str(tmp_path / "p.png")] + flags) == 0
        err = capsys.readouterr().err
        assert ("ddim:" in err) == drawn, (tty, flags, err)


def test_one_image_is_said_as_number_0(run, tmp_path, capsys):
    # "1 image of ... (numbers 0)": one picked image is said in the singular.
    assert cli.main(["draw", "process", "--ckpt", str(run / "run"), "--n", "1", "--columns",
                     "2", "--out", str(tmp_path / "p.png")]) == 0
    assert f"1 image of {run / 'photos'} (number 0), x_i at i = " in capsys.readouterr().out
    assert cli.main(["draw", "variations", "--ckpt", str(run / "run"), "--n", "1",
                     "--variations", "1", "--strength", "0.1", "--device", "cpu", "--out",
                     str(tmp_path / "v.png"), "--no-progress"]) == 0
    assert " (number 0), each with its mean at step " in capsys.readouterr().out


def test_draw_without_matplotlib_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    # A missing optional package was a traceback from `draw curves`; it is the command's
    # one-line error, exit 2, with the pip command.
    (tmp_path / "log.csv").write_text("step,loss,grad_norm,images_per_s\n10,0.5,1.0,20.0\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)            # import fails
    assert cli.main(["draw", "curves", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("blurfast draw: error: training_curves needs "
                                       "matplotlib: pip install matplotlib\n")
    assert [p.name for p in tmp_path.iterdir()] == ["log.csv"]
