"""FID: the statistics and distance against independent numpy/scipy computations."""
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from blurfast import evaluation as ev

pytest.importorskip("cleanfid")


def _pool_features(x: torch.Tensor) -> torch.Tensor:
    """A small fixed feature extractor: 4x4 average-pooled pixels (48 features)."""
    return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


def _write_images(folder, arrays):
    folder.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(folder / f"{i:05d}.png")


def _scipy_fid(f1, f2):
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_scipy_formula():
    rng = np.random.default_rng(0)
    f1 = rng.normal(size=(500, 16))
    f2 = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.3
    got = ev.frechet_distance(*ev.statistics(f1), *ev.statistics(f2))
    # float64 throughout (scipy's sqrtm of S1 S2 against the code's eigendecompositions):
    # measured 2.4e-15 relative; 3e-14 is ~12x. Statistics in float32 would be ~1e-7 off.
    assert got == pytest.approx(_scipy_fid(f1, f2), rel=3e-14, abs=0)


def test_fid_folders_with_custom_extractor(tmp_path, monkeypatch):
    monkeypatch.setenv("BLURFAST_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, size=(120, 16, 16, 3), dtype=np.uint8)   # > 48 features: full-rank covariances
    b = np.clip(a.astype(int) // 2 + 60, 0, 255).astype(np.uint8)   # darker, lower contrast
    _write_images(tmp_path / "a", a)
    _write_images(tmp_path / "b", b)
    np.savez(tmp_path / "a.npz", images=a)
    ext = _pool_features

    same = ev.fid(tmp_path / "a", tmp_path / "a", feature_extractor=ext, progress=False)
    scale = np.trace(ev.reference_statistics(tmp_path / "a", 16, n=None, extractor=ext,
                                             progress=False)[1])
    assert abs(same) < 1e-13 * scale     # zero up to float64 rounding of the matrix roots (2.4e-16)
    # The folder, the npz and an independent computation of the same features agree.
    d_dir = ev.fid(tmp_path / "a", tmp_path / "b", feature_extractor=ext, progress=False)
    d_npz = ev.fid(tmp_path / "a.npz", tmp_path / "b", feature_extractor=ext, progress=False)
    from cleanfid.resize import build_resizer
    rs = build_resizer("clean")

    def feats(imgs):
        x = torch.from_numpy(np.stack([rs(i) for i in imgs])).permute(0, 3, 1, 2)
        return _pool_features(x).double().numpy()
    # The same features, statistics and distance in float64: measured 4.9e-15 relative;
    # 5e-14 is ~10x.
    assert d_dir == pytest.approx(_scipy_fid(feats(a), feats(b)), rel=5e-14, abs=0)
    assert d_npz == d_dir                # the same features by another path: the same bits
    assert d_dir > 100
    # The reference statistics were cached once and are reused.
    cached = list((tmp_path / "cache" / "fid").glob("*.npz"))
    assert len(cached) == 2          # refs a and b
    mu, sigma = ev.reference_statistics(tmp_path / "b", 16, n=None, extractor=ext, progress=False)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    assert ev.fid(tmp_path / "a", tmp_path / "stats.npz", feature_extractor=ext,
                  progress=False) == d_dir
    # An image of the reference overwritten in place (the folder's own mtime stays): the
    # cache no longer serves the old statistics.
    with open(tmp_path / "b" / "00003.png", "r+b") as f:
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(f, format="PNG")
    mu2, _ = ev.reference_statistics(tmp_path / "b", 16, n=None, extractor=ext, progress=False)
    assert len(list((tmp_path / "cache" / "fid").glob("*.npz"))) == 3
    assert not np.allclose(mu2, mu)


def test_a_custom_extractor_has_one_cache_key_in_every_process(tmp_path, monkeypatch):
    # The cache keyed a function by its repr, which holds its address: every process (each
    # `blurfast fid --features` run) missed the cache and added an entry. A copy of the
    # function (another object, another address; the same module, name and source) stands
    # in for the next process.
    import types
    f = _pool_features
    g = types.FunctionType(f.__code__, f.__globals__, f.__name__)
    g.__qualname__ = f.__qualname__
    assert repr(f) != repr(g)
    assert ev._extractor_key(f) == ev._extractor_key(g)
    assert "0x" not in ev._extractor_key(f)
    monkeypatch.setenv("BLURFAST_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(3)
    _write_images(tmp_path / "ref", rng.integers(0, 256, size=(8, 16, 16, 3), dtype=np.uint8))
    for ext in (f, g):
        ev.reference_statistics(tmp_path / "ref", 16, n=None, extractor=ext, progress=False)
    assert len(list((tmp_path / "cache" / "fid").glob("*.npz"))) == 1
    # A function with no source to hash (made by eval) is not cached at all.
    h = eval("lambda x: _pool_features(x)", f.__globals__)
    assert ev._extractor_key(h) is None
    ev.reference_statistics(tmp_path / "ref", 16, n=None, extractor=h, progress=False)
    assert len(list((tmp_path / "cache" / "fid").glob("*.npz"))) == 1


def test_numpy_ints_for_the_reference_size_give_the_fid_of_python_ints(tmp_path, monkeypatch):
    # resolution and channels went into the statistics cache's JSON key as given: a numpy
    # int (np.int64(16)) raised "Object of type int64 is not JSON serializable".
    monkeypatch.setenv("BLURFAST_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(4)
    _write_images(tmp_path / "ref", rng.integers(0, 256, size=(60, 20, 20, 3), dtype=np.uint8))
    np.savez(tmp_path / "s.npz", images=rng.integers(0, 256, size=(60, 16, 16, 3),
                                                      dtype=np.uint8))
    kw = dict(n=None, feature_extractor=_pool_features, progress=False)
    want = ev.fid(tmp_path / "s.npz", tmp_path / "ref", resolution=16, channels=3, **kw)
    got = ev.fid(tmp_path / "s.npz", tmp_path / "ref", resolution=np.int64(16),
                 channels=np.int64(3), **kw)
    assert float(got) == float(want)
    assert type(got.channels) is int and got.channels == 3    # as given by a Python int
    with pytest.raises(ValueError, match=r"^channels: expected an int in \[1, 3\] or None, "
                                         r"got 4$"):
        ev.fid(tmp_path / "s.npz", tmp_path / "ref", resolution=16, channels=4, **kw)
    mu, _ = ev.reference_statistics(tmp_path / "ref", np.int32(16), n=None,
                                    extractor=_pool_features, progress=False,
                                    channels=np.int64(3))[:2]
    np.testing.assert_array_equal(mu, ev.reference_statistics(
        tmp_path / "ref", 16, n=None, extractor=_pool_features, progress=False)[0])
    assert len(list((tmp_path / "cache" / "fid").glob("*.npz"))) == 1   # one key


def test_missing_inception_offline_names_file_and_path(tmp_path, monkeypatch):
    monkeypatch.setattr(ev, "_reachable", lambda url, timeout=3.0: False)
    where = tmp_path / "weights"
    where.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        ev.inception_extractor(where)
    msg = str(e.value)
    assert ev.INCEPTION_FILE in msg and str(where / ev.INCEPTION_FILE) in msg


def test_missing_inception_advice_fits_the_path_given_or_the_default(tmp_path, monkeypatch,
                                                                     capsys):
    # `fid --inception /missing.pt` advised "copy ... to /missing.pt, or pass --inception
    # PATH": the flag given already. A path given asks for another path; the default place
    # (no path given) is where a copy goes.
    from blurfast import cli
    monkeypatch.setattr(ev, "_reachable", lambda url, timeout=3.0: False)
    np.save(tmp_path / "ref.npy", np.zeros((2, 8, 8, 3), np.uint8))
    missing = tmp_path / "missing.pt"
    assert cli.main(["fid", "--check", "--inception", str(missing), "--ref",
                     str(tmp_path / "ref.npy"), "--device", "cpu"]) == 2
    url = ev._cleanfid()[0].inception_url
    assert capsys.readouterr().err == (
        f"blurfast fid: error: --inception: InceptionV3 weights not found at {missing}, and "
        f"no network access to download them: they are clean-fid's {ev.INCEPTION_FILE} "
        f"(from {url}); give the path of a copy (the file, or a folder holding it)\n")
    default = tmp_path / "tmp" / ev.INCEPTION_FILE
    monkeypatch.setattr(ev, "default_inception_path", lambda: default)
    with pytest.raises(FileNotFoundError) as e:
        ev.inception_extractor(download=False)
    assert str(e.value) == (
        f"inception: InceptionV3 weights not found at {default}, and download is off: they "
        f"are clean-fid's {ev.INCEPTION_FILE} (from {url}); copy it to {default} (clean-fid's "
        f"place), or give inception (--inception) the path of a copy (the file, or a folder "
        f"holding it)")


def test_an_interrupted_inception_download_leaves_nothing_behind(tmp_path, monkeypatch):
    # clean-fid downloads into a temporary folder beside the weights' place; a download
    # cut off (the network, Ctrl-C) left that folder and the part of the file in it.
    from cleanfid import downloads_helper

    def cut_off(fpath):
        (Path(fpath) / ev.INCEPTION_FILE).write_bytes(b"part of the weights")
        raise ConnectionResetError("connection reset by peer")
    monkeypatch.setattr(ev, "_reachable", lambda url, timeout=3.0: True)
    monkeypatch.setattr(downloads_helper, "check_download_inception", cut_off)
    where = tmp_path / "weights"
    where.mkdir()
    with pytest.raises(ConnectionResetError):
        ev.inception_extractor(where)
    assert not list(where.iterdir())


def test_inception_input_is_normalized_as_clean_fid_does(tmp_path, monkeypatch):
    # clean-fid (cleanfid/inception_torchscript.py, InceptionV3W.forward, resize_inside
    # False) feeds the TorchScript network's layers (x - 128) / 128 of pixels x in
    # [0, 255]. With a stand-in network whose layers return their input's first 2048
    # values, blurfast's extractor gives what clean-fid's own wrapper gives, and both
    # equal (x - 128) / 128 (exact in float32: integers minus 128, over a power of two).
    from cleanfid.inception_torchscript import InceptionV3W

    class Layers(torch.nn.Module):
        def forward(self, z):
            return z.flatten(1)[:, :2048]

    class StandIn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = Layers()
    (tmp_path / ev.INCEPTION_FILE).write_bytes(b"stand-in")
    monkeypatch.setattr(torch.jit, "load", lambda path, map_location=None: StandIn())
    x = (torch.arange(2 * 3 * 299 * 299) % 256).reshape(2, 3, 299, 299).float()
    got = ev.inception_extractor(tmp_path, download=False)(x)
    with torch.no_grad():
        clean = InceptionV3W(str(tmp_path), download=False)(x)
    assert got.shape == (2, 2048) and torch.equal(got, clean)
    assert torch.equal(got.double(), (x.double().flatten(1)[:, :2048] - 128) / 128)


def test_bad_samples_path(tmp_path):
    with pytest.raises(ValueError, match="samples:"):
        list(ev.load_images(tmp_path / "nope"))
    with pytest.raises(ValueError, match=r"^n: expected an int >= 2 or None, got -1"):
        ev.fid(tmp_path, tmp_path, n=-1)


def test_unreadable_images_are_skipped_with_a_warning(tmp_path):
    # One broken file among the samples and one among the reference images: the FID is
    # that of the two folders without them, and each skip is named in a warning.
    rng = np.random.default_rng(2)
    a = rng.integers(0, 256, size=(60, 16, 16, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) // 2 + 60, 0, 255).astype(np.uint8)
    _write_images(tmp_path / "a", a)
    _write_images(tmp_path / "b", b)
    _write_images(tmp_path / "a_clean", np.delete(a, 7, axis=0))
    _write_images(tmp_path / "b_clean", np.delete(b, 30, axis=0))
    (tmp_path / "a" / "00007.png").write_bytes(b"not an image")
    (tmp_path / "b" / "00030.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")

    def mean_features(x):
        return x.mean(dim=(2, 3))
    kw = dict(n=None, feature_extractor=mean_features, cache=False, progress=False)
    with pytest.warns(UserWarning) as got:
        d = ev.fid(tmp_path / "a", tmp_path / "b", **kw)
    text = " ".join(str(w.message) for w in got)
    assert "samples: skipping" in text and "00007.png" in text
    assert "ref: skipping" in text and "00030.png" in text
    assert d == ev.fid(tmp_path / "a_clean", tmp_path / "b_clean", **kw)   # the same images


def test_damaged_inputs_name_themselves(tmp_path):
    (tmp_path / "cut.npz").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError, match="samples: .*cut.npz is not a readable .npz"):
        list(ev.load_images(tmp_path / "cut.npz"))
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(ValueError, match="samples: .*empty.npz is not a readable .npz"):
        list(ev.load_images(tmp_path / "empty.npz"))
    np.savez(tmp_path / "two.npz", images=np.zeros((4, 8, 8, 2), np.uint8))
    with pytest.raises(ValueError, match=r"samples: expected uint8 \(N, H, W, 1 or 3\)"):
        list(ev.load_images(tmp_path / "two.npz"))
    np.savez(tmp_path / "nan.npz", mu=np.full(3, np.nan), sigma=np.eye(3))
    with pytest.raises(ValueError, match="ref: .*needs finite mu"):
        ev.reference_statistics(tmp_path / "nan.npz", 16)
    (tmp_path / "bad.pt").write_bytes(b"not torchscript")
    with pytest.raises(ValueError, match="inception: .*bad.pt cannot be loaded"):
        ev.inception_extractor(tmp_path / "bad.pt")


def test_cli_fid_bad_options(tmp_path, capsys):
    from blurfast import cli
    _write_images(tmp_path, np.zeros((2, 16, 16, 3), np.uint8))
    args = ["fid", "--samples", str(tmp_path), "--ref", str(tmp_path)]
    assert cli.main(args + ["--features", "no_such_module:f", "--device", "cpu"]) == 2
    assert "--features: cannot load 'no_such_module:f'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(args + ["--batch", "0"])
    assert "expected a positive int, got '0'" in capsys.readouterr().err


def test_cli_fid_check_loads_the_features_and_finds_the_reference(tmp_path, monkeypatch,
                                                                  capsys):
    # `blurfast fid --check`: what eval_fid10k.sh runs before making samples. It fails,
    # in one line, where the FID after sampling would.
    import os
    from blurfast import cli
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    monkeypatch.setattr(ev, "_reachable", lambda url, timeout=3.0: False)
    np.save(tmp_path / "ref16.npy", np.zeros((4, 16, 16, 1), np.uint8))
    ref = ["--ref", str(tmp_path / "ref16.npy"), "--device", "cpu"]
    weights = tmp_path / "weights"
    weights.mkdir()
    assert cli.main(["fid", "--check", "--inception", str(weights)] + ref) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("blurfast fid: error: --inception: ")
    assert str(weights / ev.INCEPTION_FILE) in err[0]
    assert not list(weights.iterdir())
    features = ["--features", "test_evaluation:_pool_features"]
    assert cli.main(["fid", "--check"] + features + ref) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    for extra, words in [
            (["--ref", str(tmp_path / "nope.npy")], f"--ref: {str(tmp_path / 'nope.npy')!r} "
                                                    f"does not exist"),
            (["--resolution", "32"], "--ref: resolution: 32 differs from the prepared "
                                     "array's 16"),
            (["--channels", "3"], "--ref: channels: 3 differs from the prepared array's 1")]:
        assert cli.main(["fid", "--check"] + features + ref + extra) == 2
        assert capsys.readouterr().err.startswith(f"blurfast fid: error: {words}")
    assert cli.main(["fid"] + features + ref) == 2
    assert capsys.readouterr().err == ("blurfast fid: error: --samples: required (a folder of "
                                       "images or .npz), except with --check\n")


def _mean_features(x: torch.Tensor) -> torch.Tensor:
    """Per-channel means: 3 features."""
    return x.mean(dim=(2, 3))


def _never(x: torch.Tensor) -> torch.Tensor:
    raise AssertionError("features computed")


def test_cli_fid_prints_the_image_counts_and_warns_on_too_few(tmp_path, monkeypatch, capsys):
    import os
    from blurfast import cli
    from cleanfid.resize import build_resizer
    monkeypatch.setenv("BLURFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, size=(30, 16, 16, 3), dtype=np.uint8)
    b = rng.integers(0, 200, size=(40, 16, 16, 3), dtype=np.uint8)
    _write_images(tmp_path / "a", a)
    _write_images(tmp_path / "b", b)
    rs = build_resizer("clean")

    def feats(imgs, fn):
        x = torch.from_numpy(np.stack([rs(i) for i in imgs])).permute(0, 3, 1, 2)
        return fn(x).double().numpy()
    samples, ref, stats = str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "b.npz")
    base = ["fid", "--samples", samples, "--device", "cpu", "--n", "100"]
    pool = ["--features", "test_evaluation:_pool_features"]
    # 48 features from 30 and 40 images: singular covariances, one warning line.
    want = _scipy_fid(feats(a, _pool_features), feats(b, _pool_features))
    for where, ref_line in ((["--ref", ref, "--save-stats", stats],
                             f"reference: 40 images from {ref}"),
                            (["--ref", stats], f"reference: 40 images from {stats}")):
        assert cli.main(base + pool + where) == 0
        out, err = capsys.readouterr()
        assert out.splitlines()[-3:-1] == [f"samples: 30 images from {samples}", ref_line]
        assert float(out.splitlines()[-1].split()[1]) == pytest.approx(want, rel=1e-6)
        assert [line for line in err.splitlines() if "warning" in line] == [
            "blurfast: warning: fid: 30 samples and 40 reference images for 48 "
            "features: a covariance of no more images than features is singular and the "
            "FID biased high; use well over 48 (10000 is usual)"]
    # 3 features: enough images, no warning. Statistics without a count say so.
    assert cli.main(base + ["--ref", ref, "--features", "test_evaluation:_mean_features"]) == 0
    out, err = capsys.readouterr()
    assert "warning" not in err and out.splitlines()[-3] == f"samples: 30 images from {samples}"
    np.savez(tmp_path / "bare.npz", **{k: v for k, v in np.load(stats).items() if k != "n"})
    assert cli.main(base + pool + ["--ref", str(tmp_path / "bare.npz")]) == 0
    assert capsys.readouterr().out.splitlines()[-2] == \
        f"reference: statistics of {tmp_path / 'bare.npz'} (image count not recorded)"
    # Bad input: one line, exit 2, before any features are computed.
    never = ["--features", "test_evaluation:_never"]
    nope = str(tmp_path / "nope.npy")
    for args, line in ((["--n", "1", "--ref", ref], "--n: expected an int >= 2, got 1"),
                       (["--ref", nope], f"--ref: {nope!r} does not exist")):
        assert cli.main(base + never + args) == 2
        assert capsys.readouterr().err == f"blurfast fid: error: {line}\n"
    with pytest.raises(ValueError, match=f"^ref: {nope!r} does not exist"):
        ev.fid(samples, nope, feature_extractor=_never, progress=False)


def test_fid_reads_a_reference_folder_as_training_does_by_default(tmp_path, monkeypatch,
                                                                  capsys):
    # Wide 24x16 reference images at resolution 16: training's default center crop is the
    # middle 16 columns, no resampling; the fid default was squash (a bicubic resize).
    import inspect
    import os
    from blurfast import cli, training
    monkeypatch.setenv("BLURFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    rng = np.random.default_rng(4)
    wide = rng.integers(0, 256, size=(12, 16, 24, 3), dtype=np.uint8)
    wide[:, :, :4] = wide[:, :, 20:] = 255        # white side bands, which a crop drops
    a = rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    _write_images(tmp_path / "ref", wide)
    np.savez(tmp_path / "a.npz", images=a)

    def mean_feats(imgs):
        from cleanfid.resize import build_resizer
        rs = build_resizer("clean")
        return np.stack([np.asarray(rs(i), dtype=np.float64).mean(axis=(0, 1)) for i in imgs])
    cropped = _scipy_fid(mean_feats(a), mean_feats(wide[:, :, 4:20]))
    kw = dict(feature_extractor=_mean_features, progress=False)
    assert ev.fid(tmp_path / "a.npz", tmp_path / "ref", **kw) == pytest.approx(cropped, rel=1e-6)
    squashed = ev.fid(tmp_path / "a.npz", tmp_path / "ref", resize="squash", **kw)
    assert abs(squashed - cropped) > 0.1 * cropped
    assert cli.main(["fid", "--samples", str(tmp_path / "a.npz"), "--ref", str(tmp_path / "ref"),
                     "--device", "cpu", "--features", "test_evaluation:_mean_features"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert float(line.split()[1]) == pytest.approx(cropped, abs=1e-4)     # printed to 4 places
    assert inspect.signature(training.train).parameters["resize"].default == "center-crop"


def test_fid_monitor_shows_its_work_when_asked(tmp_path, monkeypatch, capsys):
    # Training's FID points (fid_n samples, then their features) show bars when the run
    # shows progress, and nothing otherwise.
    from blurfast import BlurDiffusion
    monkeypatch.setenv("BLURFAST_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(5)
    _write_images(tmp_path / "ref", rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8))
    diff = BlurDiffusion(resolution=8, num_steps=10)
    mon = ev.FidMonitor(tmp_path / "ref", resolution=8, resize="center-crop", channels=3, n=4,
                        steps=2, batch=2, feature_extractor=_mean_features)
    zero = lambda x, t: torch.zeros_like(x)           # noqa: E731
    quiet = mon(zero, diff)
    assert capsys.readouterr().err == ""
    assert mon(zero, diff, progress=True) == quiet     # the bars change nothing else
    assert "FID: sampling 4 images" in capsys.readouterr().err
    monkeypatch.setenv("BLURFAST_CACHE", str(tmp_path / "cache2"))    # not cached yet
    fresh = ev.FidMonitor(tmp_path / "ref", resolution=8, resize="center-crop", channels=3, n=4,
                          steps=2, batch=2, feature_extractor=_mean_features)
    fresh(zero, diff, progress=True)
    assert "reference features" in capsys.readouterr().err


def test_fid_reads_the_reference_with_the_samples_channels(tmp_path, monkeypatch):
    # Gray samples against an RGB folder: the folder is read as gray (the same FID as
    # against gray copies of it); against an RGB prepared array: refused, naming channels.
    from blurfast import data
    monkeypatch.setenv("BLURFAST_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(6)
    rgb = rng.integers(0, 256, size=(10, 8, 8, 3), dtype=np.uint8)
    _write_images(tmp_path / "rgb", rgb)
    for i, a in enumerate(rgb):
        (tmp_path / "gray").mkdir(exist_ok=True)
        Image.fromarray(a).convert("L").save(tmp_path / "gray" / f"{i:05d}.png")
    samples = tmp_path / "s"
    samples.mkdir()
    for i, a in enumerate(rng.integers(0, 256, size=(9, 8, 8), dtype=np.uint8)):
        Image.fromarray(a, mode="L").save(samples / f"{i:06d}.png")
    kw = dict(feature_extractor=_pool_features, progress=False, cache=False)
    value = ev.fid(samples, tmp_path / "rgb", **kw)
    assert value.channels == 1
    assert value == float(ev.fid(samples, tmp_path / "gray", **kw))
    data.prepare(tmp_path / "rgb", tmp_path / "rgb.npy", resolution=8, workers=0,
                 progress=False)
    with pytest.raises(ValueError, match="^ref: channels: 1 differs from the prepared"):
        ev.fid(samples, tmp_path / "rgb.npy", **kw)
    with pytest.raises(ValueError, match="^channels: 3 differs from the samples' 1"):
        ev.fid(samples, tmp_path / "rgb", channels=3, **kw)


def test_frechet_distance_names_what_is_not_two_gaussians():
    # Shapes that do not fit, NaN, a vector for a covariance, one sample per side: torch
    # errors (RuntimeError, LinAlgError) or a NaN distance, naming nothing.
    from blurfast import testing
    mu, eye = np.zeros(3), np.eye(3)
    for args, words in [
            ((mu, eye, np.zeros(4), np.eye(4)), r"mu2: expected shape \(3,\) \(mu1 has D = 3\), "
                                                r"got \(4,\)"),
            ((mu, np.full((3, 3), np.nan), mu, eye), r"sigma1: expected finite values"),
            ((mu, np.ones(3), mu, eye), r"sigma1: expected shape \(3, 3\) \(mu1 has D = 3\), "
                                        r"got \(3,\)"),
            ((eye, eye, mu, eye), r"mu1: expected shape \(D,\), D >= 1, got \(3, 3\)"),
            ((mu, eye, mu, "eye"), r"sigma2: expected an array of numbers, got str")]:
        with pytest.raises(ValueError, match=f"^{words}"):
            ev.frechet_distance(*args)
    with pytest.raises(ValueError, match=r"^cov2: expected shape \(3, 3\)"):
        ev.gaussian_frechet_distance(mu, eye, mu, np.eye(2))
    one = np.ones((1, 3))
    with pytest.raises(ValueError, match=r"^feats: expected features \(N, D\) of N >= 2 images, "
                                         r"got shape \(1, 3\)"):
        ev.statistics(one)
    with pytest.warns(RuntimeWarning):                   # numpy: no degrees of freedom
        cov = np.cov(one, rowvar=False)
    with pytest.raises(ValueError, match="^sigma2: expected finite values .*N >= 2 samples"):
        ev.frechet_distance(mu, eye, one[0], cov)
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"^y: expected a tensor \(B, ...\) of B >= 2 samples, "
                                         r"got \(1, 3\)"):
        testing.frechet_distance(x, x[:1])
    with pytest.raises(ValueError, match="^x: expected finite values"):
        testing.frechet_distance(x / 0 * 0, x)


def _samples_and_prepared_ref(tmp_path):
    _write_images(tmp_path / "s", np.zeros((4, 16, 16, 3), np.uint8))
    np.save(tmp_path / "ref16.npy", np.zeros((4, 16, 16, 3), np.uint8))
    return tmp_path / "s", tmp_path / "ref16.npy"


def test_fid_checks_resize_at_once(tmp_path):
    # A prepared array does not use resize: 'bogus' was accepted.
    s, ref = _samples_and_prepared_ref(tmp_path)
    with pytest.raises(ValueError, match=r"^resize: expected one of \('squash', 'center-crop'\), "
                                         r"got 'bogus'"):
        ev.fid(s, ref, resize="bogus", feature_extractor=_never, progress=False, cache=False)
    with pytest.raises(ValueError, match="^resize: "):
        ev.reference_statistics(ref, 16, resize="bogus", extractor=_never, cache=False)


def test_a_reference_folder_without_images_is_refused_before_any_work(tmp_path, monkeypatch,
                                                                      capsys):
    # LSUN's parent folder (its lmdb databases in subfolders, no image files) as --ref:
    # `fid --check` said ok, so eval_fid10k.sh went on to sample; fid() computed the
    # samples' features, then failed naming 'root'. Both now fail at once, naming --ref.
    import os
    from blurfast import cli
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    s, _ = _samples_and_prepared_ref(tmp_path)
    lsun = tmp_path / "lsun"
    (lsun / "church_outdoor_train_lmdb").mkdir(parents=True)
    (lsun / "church_outdoor_train_lmdb" / "data.mdb").write_bytes(b"")
    words = (f"no .jpg/.jpeg/.png/.webp/.bmp files under {str(lsun)!r}; it holds lmdb "
             f"databases ({str(lsun / 'church_outdoor_train_lmdb')!r}): give one")
    assert cli.main(["fid", "--check", "--ref", str(lsun), "--features",
                     "test_evaluation:_never", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"blurfast fid: error: --ref: {words}\n"
    with pytest.raises(ValueError, match=f"^ref: {re.escape(words)}$"):
        ev.fid(s, lsun, feature_extractor=_never, progress=False, cache=False)


def test_batch_size_and_the_features_of_statistics_are_checked(tmp_path):
    # batch_size 0 and -3 were accepted (0: one batch of everything); statistics of a
    # vector returned scalars.
    s, ref = _samples_and_prepared_ref(tmp_path)
    kw = dict(feature_extractor=_never, progress=False, cache=False)
    for bad in (0, -3, 2.0):
        with pytest.raises(ValueError, match=f"^batch_size: expected an int >= 1, got {bad}"):
            ev.fid(s, ref, batch_size=bad, **kw)
    with pytest.raises(ValueError, match="^batch_size: expected an int >= 1, got 0"):
        ev.features([np.zeros((8, 8, 3), np.uint8)], _mean_features, batch_size=0,
                    progress=False)
    with pytest.raises(ValueError, match=r"^feats: expected features \(N, D\) of N >= 2 "
                                         r"images, got shape \(5,\)"):
        ev.statistics(np.zeros(5))


def test_a_damaged_cache_entry_is_named_removed_and_computed_again(tmp_path, monkeypatch):
    # A damaged file in the statistics cache failed every FID against that reference
    # (BadZipFile, or "contains pickled (object) data"), naming no file.
    import re
    monkeypatch.setenv("BLURFAST_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(7)
    _write_images(tmp_path / "b", rng.integers(0, 256, size=(10, 16, 16, 3), dtype=np.uint8))
    kw = dict(n=None, extractor=_mean_features, progress=False)
    mu, sigma = ev.reference_statistics(tmp_path / "b", 16, **kw)
    [entry] = (tmp_path / "cache" / "fid").glob("*.npz")
    for damage in ("cut", "object"):
        if damage == "cut":
            entry.write_bytes(entry.read_bytes()[:100])
        else:
            np.savez(entry, mu=np.array([None], dtype=object), sigma=np.eye(1))
        with pytest.warns(UserWarning, match=f"^fid: removed a damaged entry of the statistics "
                                             f"cache, computing it again: {re.escape(str(entry))}"):
            again = ev.reference_statistics(tmp_path / "b", 16, **kw)
        np.testing.assert_array_equal(again[0], mu)
        np.testing.assert_array_equal(again[1], sigma)
        with np.load(entry) as z:                      # written anew
            np.testing.assert_array_equal(z["mu"], mu)


_fed = []


def _counted_features(x: torch.Tensor) -> torch.Tensor:
    """Per-channel means, the images of each call counted in _fed."""
    _fed.append(x.shape[0])
    return x.mean(dim=(2, 3))


def test_a_cache_that_cannot_be_written_costs_the_cache_not_the_fid(tmp_path, monkeypatch):
    # A read-only home (its ~/.cache): the FID was computed, then lost to the OSError of
    # the cache's write (training's --fid-every stopped the run there).
    s, ref = _samples_and_prepared_ref(tmp_path)
    _write_images(s, np.random.default_rng(8).integers(0, 256, size=(4, 16, 16, 3),
                                                         dtype=np.uint8))
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("BLURFAST_CACHE", str(tmp_path / "a_file"))
    kw = dict(feature_extractor=_mean_features, progress=False)
    with pytest.warns(UserWarning, match=r"^fid: the statistics cache cannot be written, "
                                         r"so they are computed again next time \("):
        value = ev.fid(s, ref, **kw)
    assert value == ev.fid(s, ref, cache=False, **kw)


def test_cli_fid_save_stats_is_checked_first_and_the_statistics_are_reused(tmp_path,
                                                                          monkeypatch, capsys):
    # --save-stats somewhere unwritable failed after every feature was computed; with
    # --no-cache the reference features were computed a second time (without a bar).
    import os
    from blurfast import cli
    monkeypatch.setenv("BLURFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    rng = np.random.default_rng(8)
    _write_images(tmp_path / "a", rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8))
    _write_images(tmp_path / "b", rng.integers(0, 256, size=(15, 16, 16, 3), dtype=np.uint8))
    (tmp_path / "afile").write_text("")
    bad, stats = tmp_path / "afile" / "st.npz", tmp_path / "st.npz"
    base = ["fid", "--samples", str(tmp_path / "a"), "--ref", str(tmp_path / "b"), "--device",
            "cpu", "--no-cache"]
    assert cli.main(base + ["--features", "test_evaluation:_never", "--save-stats", str(bad)]) == 2
    assert capsys.readouterr().err == (f"blurfast fid: error: --save-stats: cannot write "
                                       f"{str(bad)!r}: {str(tmp_path / 'afile')!r} is not a "
                                       f"folder\n")
    with pytest.raises(ValueError, match=r"^save_stats \(--save-stats\): cannot write"):
        ev.fid(tmp_path / "a", tmp_path / "b", feature_extractor=_never, save_stats=bad)
    _fed.clear()
    assert cli.main(base + ["--features", "test_evaluation:_counted_features",
                            "--save-stats", str(stats)]) == 0
    assert sum(_fed) == 12 + 15                    # each image once
    mu, sigma = ev.reference_statistics(tmp_path / "b", 16, extractor=_mean_features,
                                        cache=False, progress=False)
    with np.load(stats) as z:
        np.testing.assert_array_equal(z["mu"], mu)
        np.testing.assert_array_equal(z["sigma"], sigma)
        assert int(z["n"]) == 15
    assert not list(tmp_path.glob("cache/fid/*"))


def test_cached_statistics_of_fewer_images_are_not_served_for_all(tmp_path, monkeypatch):
    # The cache key holds the image count: statistics of the first 6 of 24 images, cached,
    # are not the answer for n=None (all 24). Truth: clean-fid's resizer, per-channel means
    # (_mean_features) in float64, numpy's mean and cov.
    from cleanfid.resize import build_resizer
    monkeypatch.setenv("BLURFAST_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(11)
    a = rng.integers(0, 256, size=(24, 16, 16, 3), dtype=np.uint8)
    _write_images(tmp_path / "b", a)
    rs = build_resizer("clean")
    f = np.stack([np.asarray(rs(i), dtype=np.float64).mean(axis=(0, 1)) for i in a])
    kw = dict(extractor=_mean_features, progress=False)
    for n, k in ((6, 6), (None, 24)):
        mu, sigma = ev.reference_statistics(tmp_path / "b", 16, n=n, **kw)
        # float32 means of 299x299 pixels against float64: measured 2.0e-8 relative in mu
        # and 2.1e-5 absolute in sigma (entries up to 29); ~10x margins. Statistics of the
        # other count differ by more than 0.8 in every entry.
        np.testing.assert_allclose(mu, f[:k].mean(0), rtol=2e-7)
        np.testing.assert_allclose(sigma, np.cov(f[:k], rowvar=False), rtol=0, atol=2e-4)
    assert len(list((tmp_path / "cache" / "fid").glob("*.npz"))) == 2


def test_as_many_images_as_features_warn(tmp_path):
    # N images give a covariance of rank N - 1: D images for D features is singular (the
    # warning's condition is N <= D). 3 per-channel means, n images of each side: n = 3
    # warns for both, n = 4 for neither.
    import warnings
    rng = np.random.default_rng(12)
    _write_images(tmp_path / "ref", rng.integers(0, 256, size=(10, 16, 16, 3), dtype=np.uint8))
    a = rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=a)
    kw = dict(feature_extractor=_mean_features, cache=False, progress=False)
    with pytest.warns(UserWarning, match=r"^fid: 3 samples and 3 reference images for 3 "
                                         r"features: a covariance"):
        ev.fid(tmp_path / "a.npz", tmp_path / "ref", n=3, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ev.fid(tmp_path / "a.npz", tmp_path / "ref", n=4, **kw)


def _mmd2_written_out(x, y, d):
    """The unbiased squared MMD of two whole samples under (x.y / d + 1)^3, pair by pair in
    Python floats (math.fsum): within each side over i != j, across over every pair."""
    import math

    def k(u, v):
        return (math.fsum(float(a) * float(b) for a, b in zip(u, v)) / d + 1) ** 3
    n, m = len(x), len(y)
    kxx = math.fsum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j)
    kyy = math.fsum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j)
    kxy = math.fsum(k(a, b) for a in x for b in y)
    return kxx / (n * (n - 1)) + kyy / (m * (m - 1)) - 2 * kxy / (n * m)


def test_kernel_distance_is_the_unbiased_mmd_written_out():
    # Subsets as large as both sides are the whole samples (reordered): every subset gives
    # the written-out estimate. float64 sums of ~1e2 terms against fsum: measured 1.1e-16
    # absolute on values ~0.5; 1e-13.
    rng = np.random.default_rng(20)
    x = rng.normal(size=(8, 5))
    y = rng.normal(size=(8, 5)) * 1.3 + 0.4
    mean, std = ev.kernel_distance(x, y, subsets=3, subset_size=50)
    want = _mmd2_written_out(x, y, 5)
    assert want > 0.1
    assert mean == pytest.approx(want, rel=0, abs=1e-13) and std < 1e-13
    # Smaller subsets of unequal sides: the estimate is a U-statistic, so its mean over
    # random subsets is the whole samples' estimate (sides of 7 and 11, subsets of 4).
    # 4000 subsets: the mean within 4 standard errors of it.
    x, y = x[:7], np.concatenate([y, rng.normal(size=(3, 5))])
    mean, std = ev.kernel_distance(x, y, subsets=4000, subset_size=4, seed=1)
    assert abs(mean - _mmd2_written_out(x, y, 5)) < 4 * std / np.sqrt(4000)
    assert std > 0.05                                 # the subsets do differ
    # The seed fixes the subsets.
    assert ev.kernel_distance(x, y, 20, 4, seed=2) == ev.kernel_distance(x, y, 20, 4, seed=2)
    assert ev.kernel_distance(x, y, 20, 4, seed=2) != ev.kernel_distance(x, y, 20, 4, seed=3)


def test_kernel_distance_subsets_take_the_size_of_the_smaller_side_either_way():
    # subset_size above both sides: m = min(N1, N2) = 6, all of the 6-image side and 6 of
    # the 11-image one, whichever is feats1. The estimate is a U-statistic, so its mean over
    # random subsets is the whole samples' estimate: 2000 subsets, within 4 standard errors.
    # (Subsets of 11 of the larger side would pair unequal sides over the wrong counts.)
    rng = np.random.default_rng(21)
    x = rng.normal(size=(11, 5))
    y = rng.normal(size=(6, 5)) * 1.3 + 0.4
    want = _mmd2_written_out(x, y, 5)
    for a, b in ((x, y), (y, x)):
        mean, std = ev.kernel_distance(a, b, subsets=2000, subset_size=50, seed=4)
        assert 0 < std and abs(mean - want) < 4 * std / np.sqrt(2000)


def test_kernel_distance_names_bad_arguments():
    x = np.zeros((4, 3))
    for args, msg in (((np.zeros(3), x), r"^feats1: expected features \(N, D\) of N >= 2 "
                                         r"images, got shape \(3,\)"),
                      ((x, np.zeros((1, 3))), r"^feats2: expected features \(N, D\) of N >= 2"),
                      ((x, np.zeros((4, 2))), r"^feats2: expected D = 3 features as feats1, "
                                              r"got 2"),
                      ((x, np.full((4, 3), np.nan)), r"^feats2: expected finite values"),
                      ((x, "abc"), r"^feats2: expected an array of numbers, got str"),
                      ((x, x, 0), r"^subsets: expected"),
                      ((x, x, 5, 1), r"^subset_size: expected")):
        with pytest.raises(ValueError, match=msg):
            ev.kernel_distance(*args)
    with pytest.raises(ValueError, match=r"^device: expected a device such as 'cpu' or "
                                         r"'cuda', got 'gpu'"):
        ev.kernel_distance(x, x, device="gpu")
    if not torch.cuda.is_available():
        for call in (lambda: ev.kernel_distance(x, x, device="cuda"),
                     lambda: ev.fid("nowhere", "nowhere", device="cuda"),
                     lambda: ev.reference_statistics("nowhere", 16, device="cuda")):
            with pytest.raises(ValueError, match=r"^device: 'cuda' was asked for but torch "
                                                 r"sees no GPU"):
                call()


def test_fid_with_kid_uses_each_sides_features_cached_and_saved(tmp_path, monkeypatch, capsys):
    # KID through fid() and the command: the kernel distance of the features computed
    # here independently (clean-fid's resizer, 4x4 pooling, float32); the reference's
    # features come back from the cache and from a STATS.npz written with them; statistics
    # without features are refused before any feature is computed.
    import os
    from blurfast import cli
    from cleanfid.resize import build_resizer
    monkeypatch.setenv("BLURFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    rng = np.random.default_rng(21)
    a = rng.integers(0, 256, size=(30, 16, 16, 3), dtype=np.uint8)
    b = np.clip(rng.integers(0, 256, size=(26, 16, 16, 3)) * 0.7 + 40, 0, 255).astype(np.uint8)
    _write_images(tmp_path / "a", a)
    _write_images(tmp_path / "b", b)
    rs = build_resizer("clean")

    def feats(imgs):
        x = torch.from_numpy(np.stack([rs(i) for i in imgs])).permute(0, 3, 1, 2)
        return _pool_features(x).numpy().astype(np.float32)
    want = ev.kernel_distance(feats(a), feats(b))
    assert want[0] > want[1] > 0            # the sides differ; subsets of all 26 of b, 26 of 30 of a
    kw = dict(feature_extractor=_pool_features, progress=False)
    first = ev.fid(tmp_path / "a", tmp_path / "b", kid=True, **kw)
    assert (first.kid, first.kid_std, first.kid_subset) == (*want, 26)
    again = ev.fid(tmp_path / "a", tmp_path / "b", kid=True,
                   save_stats=tmp_path / "st.npz", **{**kw, "feature_extractor": _pool_features})
    assert (again.kid, again.kid_std) == want and float(again) == float(first)
    with np.load(tmp_path / "st.npz") as z:
        np.testing.assert_array_equal(z["features"], feats(b))
    no_kid = ev.fid(tmp_path / "a", tmp_path / "b", **kw)
    assert no_kid.kid is None and float(no_kid) == float(first)
    # The command, with the saved statistics as the reference.
    base = ["fid", "--samples", str(tmp_path / "a"), "--device", "cpu", "--kid"]
    assert cli.main(base + ["--ref", str(tmp_path / "st.npz"),
                            "--features", "test_evaluation:_pool_features"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"KID {want[0]:.6f} (standard deviation {want[1]:.6f} over 100 subsets of 26 images)")
    # Statistics without features: an error naming the reference, before any features.
    np.savez(tmp_path / "bare.npz", mu=np.zeros(48), sigma=np.eye(48))
    assert cli.main(base + ["--ref", str(tmp_path / "bare.npz"),
                            "--features", "test_evaluation:_never"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"blurfast fid: error: --ref: {tmp_path / 'bare.npz'} holds "
                          f"statistics without features, and KID needs") and err.count("\n") == 1
    with pytest.raises(ValueError, match="^ref: .* holds statistics without features"):
        ev.fid(tmp_path / "a", tmp_path / "bare.npz", kid=True, feature_extractor=_never)
    # A cache entry made without features is computed again with them, not served.
    monkeypatch.setenv("BLURFAST_CACHE", str(tmp_path / "cache2"))
    ev.fid(tmp_path / "a", tmp_path / "b", **kw)
    assert ev.fid(tmp_path / "a", tmp_path / "b", kid=True, **kw).kid == want[0]


def test_fid_without_kid_leaves_the_features_alone(tmp_path, monkeypatch):
    # Without kid the reference's features are neither read nor written: --save-stats
    # writes the same keys whatever the cache holds (a KID run before it cached them),
    # and a STATS.npz whose own 'features' entry is something else scores as without it.
    # With kid, integer features in a STATS.npz are features (kernel_distance's number).
    monkeypatch.setenv("BLURFAST_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(22)
    a = rng.integers(0, 256, size=(12, 16, 16, 3), dtype=np.uint8)
    b = rng.integers(0, 256, size=(10, 16, 16, 3), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=a)
    _write_images(tmp_path / "b", b)
    kw = dict(feature_extractor=_pool_features, progress=False)
    fresh = ev.fid(tmp_path / "a.npz", tmp_path / "b", cache=False,
                   save_stats=tmp_path / "fresh.npz", **kw)
    ev.fid(tmp_path / "a.npz", tmp_path / "b", kid=True, **kw)       # caches the features
    after = ev.fid(tmp_path / "a.npz", tmp_path / "b", save_stats=tmp_path / "after.npz", **kw)
    assert float(after) == float(fresh)
    with np.load(tmp_path / "fresh.npz") as f, np.load(tmp_path / "after.npz") as g:
        assert sorted(g.files) == sorted(f.files) == ["mu", "n", "sigma"]
    with np.load(tmp_path / "fresh.npz") as z:
        mu, sigma = z["mu"], z["sigma"]
    np.savez(tmp_path / "other.npz", mu=mu, sigma=sigma, features=np.zeros((5, 10)))
    assert float(ev.fid(tmp_path / "a.npz", tmp_path / "other.npz", **kw)) == float(fresh)
    with pytest.raises(ValueError, match=r"^ref: .*other\.npz: features are not"):
        ev.fid(tmp_path / "a.npz", tmp_path / "other.npz", kid=True, **kw)
    ints = rng.integers(0, 256, size=(10, 48))
    np.savez(tmp_path / "ints.npz", mu=mu, sigma=sigma, features=ints)
    got = ev.fid(tmp_path / "a.npz", tmp_path / "ints.npz", kid=True, **kw)
    from cleanfid.resize import build_resizer
    rs = build_resizer("clean")
    x = torch.from_numpy(np.stack([rs(i) for i in a])).permute(0, 3, 1, 2)
    want = ev.kernel_distance(_pool_features(x).numpy().astype(np.float32), ints)
    assert (got.kid, got.kid_std) == pytest.approx(want, rel=1e-12)


def test_kernel_distance_does_not_copy_all_the_features():
    # Subsets of 1000 of 20000 x 2048 float32 features of each side (164 MB each): the
    # peak memory grows by far less than a float64 copy of one side (328 MB), and the
    # numbers are those of the subsets widened one by one, written out here. A child
    # process: its peak is its own.
    import subprocess
    import sys
    import textwrap
    from pathlib import Path
    script = textwrap.dedent("""
        import resource, numpy as np, torch
        torch.set_num_threads(1)
        from blurfast import evaluation as ev
        rng = np.random.default_rng(23)
        x = rng.random((20000, 2048), dtype=np.float32)
        y = rng.random((20000, 2048), dtype=np.float32) * 1.01
        ev.kernel_distance(x[:10], y[:10], subsets=1)       # torch's own allocations first
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        mean, std = ev.kernel_distance(x, y, subsets=2)
        grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        gen, want = torch.Generator().manual_seed(0), []
        for _ in range(2):
            a = x[torch.randperm(20000, generator=gen)[:1000].numpy()].astype(np.float64)
            b = y[torch.randperm(20000, generator=gen)[:1000].numpy()].astype(np.float64)
            k = [(u @ v.T / 2048 + 1) ** 3 for u, v in ((a, a), (b, b), (a, b))]
            want.append((k[0].sum() - np.trace(k[0]) + k[1].sum() - np.trace(k[1]))
                        / (1000 * 999) - 2 * k[2].sum() / 1000 ** 2)
        print(grown, abs(mean - np.mean(want)), abs(std - np.std(want)), np.mean(want))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=Path(__file__).parent, timeout=300)
    assert out.returncode == 0, out.stderr
    grown, dmean, dstd, want = map(float, out.stdout.split())
    # float64 sums in numpy's order against torch's: measured 4e-16 on 2e-4; 1e-9 relative.
    assert abs(want) > 1e-6 and dmean < 1e-9 * abs(want) and dstd < 1e-9 * abs(want)
    assert grown < 164, grown                  # measured 0 (the arrays' own peak is before)


def test_fid_monitor_gives_the_kid_where_the_reference_has_features(tmp_path, monkeypatch):
    # Training's FID points carry the KID: from a reference folder, and from statistics
    # saved with their features (the same numbers); statistics without them give nan.
    import math
    from blurfast import BlurDiffusion
    monkeypatch.setenv("BLURFAST_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(6)
    _write_images(tmp_path / "ref", rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8))
    _write_images(tmp_path / "s", rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8))
    ev.fid(tmp_path / "s", tmp_path / "ref", kid=True, feature_extractor=_mean_features,
           save_stats=tmp_path / "with.npz", progress=False)
    ev.fid(tmp_path / "s", tmp_path / "ref", feature_extractor=_mean_features,
           save_stats=tmp_path / "bare.npz", progress=False, cache=False)
    diff = BlurDiffusion(resolution=8, num_steps=10)
    zero = lambda x, t: torch.zeros_like(x)           # noqa: E731
    got = {}
    for name in ("ref", "with.npz", "bare.npz"):
        mon = ev.FidMonitor(tmp_path / name, resolution=8, resize="center-crop", channels=3,
                            n=6, steps=2, batch=3, feature_extractor=_mean_features)
        got[name] = mon(zero, diff)
    assert math.isfinite(got["ref"].kid) and got["ref"].kid == got["with.npz"].kid
    assert math.isnan(got["bare.npz"].kid)
    assert float(got["bare.npz"]) == float(got["ref"])


def test_cli_fid_shows_its_bars_on_a_terminal_only(tmp_path, monkeypatch, capsys):
    # The feature bars were drawn into a log file too, and fid had no --no-progress: now
    # only on a terminal, and not with --no-progress.
    import os
    import sys
    from blurfast import cli
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    rng = np.random.default_rng(0)
    np.save(tmp_path / "ref.npy", rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    np.savez(tmp_path / "s.npz", rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8))
    argv = ["fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npy"),
            "--features", "test_evaluation:_mean_features", "--device", "cpu", "--no-cache",
            "--n", "6"]
    fids = set()
    for tty, flags, drawn in ((False, [], False), (True, [], True),
                              (True, ["--no-progress"], False)):
        monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
        assert cli.main(argv + flags) == 0
        out, err = capsys.readouterr()
        assert ("sample features:" in err and "reference features:" in err) == drawn, \
            (tty, flags, err)
        fids.add(out.splitlines()[-1])
    assert len(fids) == 1 and next(iter(fids)).startswith("FID ")
