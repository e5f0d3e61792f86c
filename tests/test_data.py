import io
import json
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blurfast import data as D
from blurfast.fileio import leftover_temporaries
from blurfast.training import StepBatches

from train_helpers import CIFAR, CIFAR_SKIP, cifar_photos, made_photos


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _webp(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="WEBP", lossless=True)
    return buf.getvalue()


def test_decode_squash_and_center_crop():
    # 8 x 24 image: left third red, middle green, right third blue.
    a = np.zeros((8, 24, 3), np.uint8)
    a[:, :8, 0] = a[:, 8:16, 1] = a[:, 16:, 2] = 255
    crop = D.decode(_png(a), 8, "center-crop")
    assert crop.shape == (8, 8, 3)
    assert (crop[..., 1] == 255).all() and (crop[..., [0, 2]] == 0).all()   # the middle only
    sq = D.decode(_png(a), 6, "squash")
    assert sq.shape == (6, 6, 3)
    assert sq[:, 0, 0].min() > 200 and sq[:, 3, 1].min() > 200 and sq[:, 5, 2].min() > 200
    gray = D.decode(_png(a), 8, "squash", channels=1)
    assert gray.shape == (8, 8, 1)


@pytest.mark.parametrize("channels", [3, 1])
def test_decode_resamples_as_pillows_bicubic(channels):
    # The documented resampling (docs/training.md, decode's docstring): Pillow's bicubic,
    # antialiased, of the whole image (squash) or of its central square (center-crop).
    # On a non-smooth image other filters give other pixels (bilinear: up to 17 levels off
    # at 8 x 8, 30 at 17 x 17). Pillow resizes the same pixels the same way: equal to the bit.
    a = np.random.default_rng(5).integers(0, 256, (20, 13, 3), dtype=np.uint8)
    mode = "RGB" if channels == 3 else "L"
    img = Image.fromarray(a).convert(mode)

    def pil(im, r):
        b = np.asarray(im.resize((r, r), Image.BICUBIC))
        return b[:, :, None] if b.ndim == 2 else b
    for r in (8, 17):                                  # downscaled and upscaled
        np.testing.assert_array_equal(D.decode(_png(a), r, "squash", channels), pil(img, r))
        # the central 13 x 13 square: rows (20 - 13) // 2 = 3 to 16
        crop = Image.fromarray(a[3:16]).convert(mode)
        np.testing.assert_array_equal(D.decode(_png(a), r, "center-crop", channels),
                                      pil(crop, r))


def test_image_arrays_read_the_arrays_pixels_without_encoding_them(monkeypatch):
    # `blurfast draw --data` on a sample run: the in-memory images are resized from their
    # own pixels (no PNG written and read back). At the image's own short side nothing
    # is resampled: the central square to the bit, and to_float's [-1, 1] of it is
    # pixel / 127.5 - 1.
    def no_encoding(*a, **k):
        raise AssertionError("an in-memory image was encoded")
    monkeypatch.setattr(Image.Image, "save", no_encoding)
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (20, 13, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (20, 13, 1), dtype=np.uint8)
    ds = D.ImageArrays([rgb, gray], 13, "center-crop", None)
    assert ds.channels == 3
    np.testing.assert_array_equal(ds[0], rgb[3:16])
    x = D.to_float(ds.__getitems__([0]))
    want = rgb[3:16].transpose(2, 0, 1).astype(np.float64) / 127.5 - 1
    np.testing.assert_allclose(x[0].numpy(), want, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(D.ImageArrays([gray], 13, "center-crop")[0], gray[3:16])
    # resampled, an array reads as the same pixels in an image file do
    monkeypatch.undo()
    for resize in ("squash", "center-crop"):
        for c in (1, 3):
            np.testing.assert_array_equal(D.ImageArrays([rgb], 8, resize, c)[0],
                                          D.decode(_png(rgb), 8, resize, c))
    with pytest.raises(ValueError, match=r"^a: expected a uint8 array"):
        D.decode_array(rgb.astype(np.float32), 8, "squash")
    # another shape: RGBA (its alpha would be dropped unseen), two channels, a plane
    for bad in (np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 2), np.uint8),
                np.zeros((8, 8), np.uint8)):
        with pytest.raises(ValueError, match=rf"^a: expected a uint8 array \(H, W, 1 or 3\), "
                                             rf"got uint8 {re.escape(str(bad.shape))}$"):
            D.decode_array(bad, 8, "squash")


def test_center_crop_of_a_wide_image_takes_its_central_columns():
    # A wide image is cut in its columns. With an odd margin the left one is rounded down:
    # 20 wide, 13 high, the central square is columns (20 - 13) // 2 = 3 to 15 (the wide
    # image of test_decode_squash_and_center_crop has an even margin, 16). At 13 x 13
    # nothing is resampled: decode gives that slice to the bit.
    a = np.random.default_rng(6).integers(0, 256, (13, 20, 3), dtype=np.uint8)
    np.testing.assert_array_equal(D.decode(_png(a), 13, "center-crop"), a[:, 3:16])
    want = np.asarray(Image.fromarray(a[:, 3:16]).resize((8, 8), Image.BICUBIC))
    np.testing.assert_array_equal(D.decode(_png(a), 8, "center-crop"), want)


def test_pixel_ranges_and_their_conversions():
    # "0,1": data in [0, 1], clamped there by clip_x0, drawn as 2x - 1 in [-1, 1];
    # "-1,1": data, clamp range and drawing all [-1, 1].
    assert D.data_range("0,1") == (0.0, 1.0)
    assert D.data_range("-1,1") == (-1.0, 1.0)
    x = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(0))
    # 2x is exact and 2x - 1 one rounding: the float64 value rounded once to float32.
    assert torch.equal(D.to_unit_range(x, "0,1"), (2 * x.double() - 1).float())
    assert torch.equal(D.to_unit_range(x * 2 - 1, "-1,1"), x * 2 - 1)
    # A "0,1" image drawn: pixel value c / 255 becomes 2c / 255 - 1 (float64 here), within
    # float32 rounding (u8 / 255, then - 1: measured 6.0e-8; 2.4e-7 is 2 ulps of 1).
    u8 = torch.arange(256, dtype=torch.uint8).reshape(1, 16, 16, 1)
    got = D.to_unit_range(D.to_float(u8, pixel_range="0,1"), "0,1")
    want = 2 * u8.permute(0, 3, 1, 2).double() / 255 - 1
    torch.testing.assert_close(got.double(), want, rtol=0, atol=2.4e-7)


def test_image_folder_is_recursive_and_sorted(tmp_path):
    made_photos(tmp_path / "a" / "b", 3, size=20)
    made_photos(tmp_path / "c", 2, size=20, seed=1)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = D.ImageFolder(tmp_path, resolution=16)
    assert len(ds) == 5
    assert [p.relative_to(tmp_path).as_posix() for p in ds.files][:2] == \
        ["a/b/00000.png", "a/b/00001.jpg"]
    batch = ds.__getitems__([4, 0])
    assert batch.dtype == torch.uint8 and batch.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(batch[1].numpy(), ds[0])
    with pytest.raises(ValueError, match="root"):
        D.ImageFolder(tmp_path / "missing", 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="root"):
        D.ImageFolder(tmp_path / "empty", 16)


def test_image_folder_follows_symlinked_folders(tmp_path):
    # A dataset assembled from links to folders (train/ -> /mnt/...): pathlib's rglob does
    # not enter a symlinked folder, so its images were left out without a word, while a
    # symlinked file was read. Truth: the images os.walk(followlinks=True) lists. A link
    # back to a folder it is in (a cycle) is not followed, and fid's sample folders read
    # the same files.
    import os
    from blurfast import evaluation as ev
    made_photos(tmp_path / "elsewhere", 2, size=12)
    made_photos(tmp_path / "root" / "own", 1, size=12, seed=1)
    (tmp_path / "root" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere" / "loop").symlink_to(tmp_path / "root", target_is_directory=True)
    want = []
    for folder, dirs, names in os.walk(tmp_path / "root", followlinks=True):
        dirs[:] = [d for d in dirs if d != "loop"]
        want += [os.path.relpath(os.path.join(folder, n), tmp_path / "root") for n in names]
    assert len(want) == 3
    ds = D.ImageFolder(tmp_path / "root", 12)
    assert [p.relative_to(tmp_path / "root").as_posix() for p in ds.files] == sorted(want)
    np.testing.assert_array_equal(ds[0], D.decode(
        (tmp_path / "elsewhere" / ds.files[0].name).read_bytes(), 12, D.DEFAULT_RESIZE))
    assert len(list(ev.load_images(tmp_path / "root"))) == 3
    # a reference's cached statistics are dropped when a linked image changes
    before = ev._fingerprint(tmp_path / "root")
    (tmp_path / "elsewhere" / ds.files[0].name).write_bytes(_png(ds[1]))
    assert ev._fingerprint(tmp_path / "root") != before


def _build_lmdb(path, images, corrupt_at=None):
    import lmdb

    env = lmdb.open(str(path), map_size=1 << 26)
    keys = []
    with env.begin(write=True) as txn:
        for i, a in enumerate(images):
            key = f"{i * 7919:040x}".encode()      # LSUN keys: hex image ids
            txn.put(key, b"not an image" if i == corrupt_at else _webp(a))
            keys.append(key)
    env.close()
    return sorted(keys)


def test_lsun_lmdb_reader(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 24, 3), dtype=np.uint8) for _ in range(5)]
    db = tmp_path / "church_outdoor_train_lmdb"
    keys = _build_lmdb(db, images)
    ds = D.LSUNLmdb(db, resolution=16, resize="center-crop")
    assert len(ds) == 5 and ds.keys == keys
    by_key = {f"{i * 7919:040x}".encode(): a for i, a in enumerate(images)}
    for i, k in enumerate(ds.keys):
        want = by_key[k][:, 4:20]                 # the central 16x16 square, no resampling
        np.testing.assert_array_equal(ds[i], want)
    # Pickled (as for DataLoader workers) it still reads: the environment is not pickled.
    ds2 = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(ds2.__getitems__([3]).numpy()[0], ds[3])
    # Forked DataLoader workers open their own environment (lmdb forbids sharing one).
    loader = torch.utils.data.DataLoader(ds, batch_sampler=[[4, 0], [2, 1, 3]], num_workers=2,
                                         collate_fn=lambda b: b)
    got = torch.cat(list(loader))
    np.testing.assert_array_equal(got.numpy(), np.stack([ds[i] for i in (4, 0, 2, 1, 3)]))
    assert isinstance(D.open_dataset(db, 16), D.LSUNLmdb)
    bad = tmp_path / "bad_lmdb"
    bad.mkdir()
    (bad / "data.mdb").write_bytes(b"not an lmdb file" * 512)
    with pytest.raises(ValueError, match="cannot be read as an lmdb database"):
        D.LSUNLmdb(bad, resolution=16)


def test_an_lmdb_given_by_its_data_file_or_its_parent_folder_is_named(tmp_path):
    # LSUN's downloads unpack to <category>_<split>_lmdb/data.mdb. Its data.mdb as --data
    # was "not a readable .npy array (This file contains pickled (object) data ...)", and
    # for prepare neither a folder nor an archive; the folder of the lmdb folders had "no
    # .jpg/... files". Each now names the folder to give instead.
    from blurfast import cli
    rng = np.random.default_rng(2)
    db = tmp_path / "lsun" / "church_outdoor_train_lmdb"
    db.parent.mkdir()
    _build_lmdb(db, [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)])
    mdb = db / "data.mdb"
    data_file = rf"; it is an lmdb database's data file: give its folder '{re.escape(str(db))}'$"
    parent = rf"; it holds lmdb databases \('{re.escape(str(db))}'\): give one$"
    for call in (lambda p: D.open_dataset(p, 8, arg="data (--data)"),
                 lambda p: D.prepare(p, tmp_path / "o.npy", resolution=8, progress=False)):
        with pytest.raises(ValueError, match=data_file):
            call(mdb)
        with pytest.raises(ValueError, match=parent):
            call(tmp_path / "lsun")
    assert cli.main(["prepare", str(db), str(tmp_path / "o.npy"), "--resolution", "8",
                     "--workers", "0", "--no-progress"]) == 0      # the folder itself reads


def test_prepare_from_lmdb_skips_a_corrupt_value(tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) for _ in range(4)]
    db = tmp_path / "bedroom_train_lmdb"
    _build_lmdb(db, images, corrupt_at=2)
    with pytest.warns(UserWarning, match="skipped 1"):
        r = D.prepare(db, tmp_path / "bed.npy", resolution=12, workers=2, progress=False)
    assert r["written"] == 3 and r["skipped"] == 1
    assert f"{2 * 7919:040x}" in r["bad"][0]
    arr = np.load(tmp_path / "bed.npy")
    ds = D.LSUNLmdb(db, 12)
    good = [ds[i] for i in range(4) if ds.keys[i] != f"{2 * 7919:040x}".encode()]
    np.testing.assert_array_equal(arr, np.stack(good))


def _photo_name(i):
    """made_photos' name for photo i."""
    return f"{i:05d}.{'jpg' if i % 2 else 'png'}"


def _prepare_one_bad_photo(tmp_path, n, size, bad, junk, resolution, workers):
    """made_photos(n, size) in tmp_path/src with photo number `bad` overwritten by `junk`,
    prepared (squash) to tmp_path/out.npy, which must warn of the one skip. Returns the
    report and the array out.npy should hold: the other photos decoded, in order."""
    src = made_photos(tmp_path / "src", n, size=size)
    (src / _photo_name(bad)).write_bytes(junk)
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        r = D.prepare(src, tmp_path / "out.npy", resolution=resolution, resize="squash",
                      workers=workers, progress=False)
    want = [D.decode((src / _photo_name(i)).read_bytes(), resolution, "squash")
            for i in range(n) if i != bad]
    return r, np.stack(want)


def test_prepare_folder_with_one_corrupt_file(tmp_path):
    r, want = _prepare_one_bad_photo(tmp_path, 6, size=24, bad=3,
                                     junk=b"\xff\xd8\xff\xe0 truncated jpeg",
                                     resolution=16, workers=2)
    assert r["written"] == 5 and r["skipped"] == 1 and r["shape"] == (5, 16, 16, 3)
    assert "00003.jpg" in r["bad"][0]
    arr = np.load(tmp_path / "out.npy", mmap_mode="r")
    np.testing.assert_array_equal(arr, want)
    # no temp left; the record of how the array was made beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npy", "out.npy.json", "src"]
    ds = D.open_dataset(tmp_path / "out.npy")
    assert isinstance(ds, D.PreparedArray) and len(ds) == 5 and ds.resolution == 16


def test_prepare_records_its_resize_and_an_array_without_the_record_still_reads(tmp_path):
    # The resize mode was recorded nowhere (the .npy header holds the shape alone): it is
    # now beside the array, OUT.npy.json, and a PreparedArray gives it; --overwrite
    # replaces it with the new array's.
    src = made_photos(tmp_path / "src", 3, size=20)
    out = tmp_path / "out.npy"
    for resize in ("squash", "center-crop"):
        D.prepare(src, out, resolution=8, resize=resize, workers=0, progress=False,
                  overwrite=True)
        ds = D.PreparedArray(out)
        assert ds.resize == resize
        assert json.loads((tmp_path / "out.npy.json").read_text()) == {
            "made_by": "blurfast prepare", "shape": [3, 8, 8, 3], "resolution": 8,
            "channels": 3, "resize": resize}
    pixels = np.load(out)
    # a record of another array (another shape) is not this array's
    np.save(out, pixels[:2])
    assert D.PreparedArray(out).resize is None
    # a record of no known resize mode (edited by hand, a newer blurfast's) is not read
    record = json.loads((tmp_path / "out.npy.json").read_text())
    (tmp_path / "out.npy.json").write_text(json.dumps(dict(record, shape=[2, 8, 8, 3],
                                                           resize="stretch")))
    assert D.PreparedArray(out).resize is None
    (tmp_path / "out.npy.json").write_text(json.dumps(record))
    # an array of an older blurfast (no record) reads as before, its resize unknown
    np.save(out, pixels)
    assert D.PreparedArray(out).resize == "center-crop"
    (tmp_path / "out.npy.json").unlink()
    ds = D.open_dataset(out)
    assert ds.resize is None and len(ds) == 3
    np.testing.assert_array_equal(ds.__getitems__([0, 1, 2]).numpy(), pixels)


def test_an_overwrite_cut_before_its_record_leaves_no_record_of_the_old_array(tmp_path,
                                                                            monkeypatch):
    # --overwrite of an array of the same shape, another resize, stopped after the new
    # array took its name but before its record was written: the old array's record
    # (same shape, so it would pass as this array's) must be gone, the resize unknown.
    src = made_photos(tmp_path / "src", 3, size=20)
    out = tmp_path / "out.npy"
    D.prepare(src, out, resolution=8, resize="squash", workers=0, progress=False)
    assert D.PreparedArray(out).resize == "squash"

    def cut(*a, **k):
        raise KeyboardInterrupt                   # stands for Ctrl-C or a kill
    monkeypatch.setattr(D, "write_text", cut)
    with pytest.raises(KeyboardInterrupt):
        D.prepare(src, out, resolution=8, resize="center-crop", workers=0, progress=False,
                  overwrite=True)
    assert not D.prepared_meta_path(out).exists()
    assert D.PreparedArray(out).resize is None


def test_prepare_and_info_show_the_resize_of_a_prepared_array(tmp_path, capsys):
    from blurfast import cli
    src = made_photos(tmp_path / "src", 2, size=20)
    out = tmp_path / "o.npy"
    assert cli.main(["prepare", str(src), str(out), "--resolution", "8", "--resize", "squash",
                     "--workers", "0", "--no-progress"]) == 0
    assert f"wrote {out}: 2 images of shape (8, 8, 3) (--resize squash)" \
        in capsys.readouterr().out
    assert cli.main(["info", str(out)]) == 0
    assert capsys.readouterr().out == (f"{out}: prepared array of 2 images, 8x8, 3 channels, "
                                       f"resize squash\n")
    D.prepared_meta_path(out).unlink()
    assert cli.main(["info", str(out)]) == 0
    assert "resize not recorded" in capsys.readouterr().out
    assert cli.main(["info", str(src)]) == 2
    assert "DATA: " in capsys.readouterr().err


def test_prepare_refuses_an_out_whose_filesystem_lacks_the_room(tmp_path, monkeypatch):
    # The array's size, as np.save writes it (header and pixels), against the free space
    # of OUT's filesystem (asked for the nearest existing folder: OUT's own is made later).
    import shutil
    src = made_photos(tmp_path / "src", 3, size=20)
    buf = io.BytesIO()
    np.save(buf, np.zeros((3, 8, 8, 3), np.uint8))
    need = len(buf.getvalue())
    asked = []

    def usage(free):
        def disk_usage(path):
            asked.append(Path(path))
            return shutil._ntuple_diskusage(10 ** 12, 10 ** 12 - free, free)
        return disk_usage
    out = tmp_path / "new" / "out.npy"
    monkeypatch.setattr(shutil, "disk_usage", usage(need - 1))
    with pytest.raises(ValueError, match=rf"^out: .*out\.npy' needs {need} bytes .*has "
                                         rf"{need - 1} bytes free"):
        D.prepare(src, out, resolution=8, workers=0, progress=False)
    assert asked == [tmp_path] and not out.parent.exists()
    monkeypatch.setattr(shutil, "disk_usage", usage(need))
    D.prepare(src, out, resolution=8, workers=0, progress=False)
    assert out.stat().st_size == need


def test_a_folder_with_unreadable_images_trains_on_the_others(tmp_path):
    # Read directly (not prepared), an image Pillow cannot decode raises an error naming
    # it; a batch takes the next readable image in its place, the same one every time,
    # and warns.
    src = made_photos(tmp_path / "src", 5, size=16)
    (src / "00001.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    (src / "00002.png").write_bytes(b"not an image")
    ds = D.ImageFolder(src, resolution=16)
    with pytest.raises(D.UnreadableImage, match="00001.jpg: cannot be decoded"):
        ds[1]
    with pytest.warns(UserWarning, match="data: skipping .*00002.png") as got:
        batch = ds.__getitems__([0, 1, 2, 4])
    assert sum("00001.jpg" in str(w.message) for w in got) >= 1
    want = np.stack([ds[0], ds[3], ds[3], ds[4]])          # 1 and 2 -> 3
    np.testing.assert_array_equal(batch.numpy(), want)
    for name in ("00000.png", "00003.jpg", "00004.png"):
        (src / name).write_bytes(b"broken too")
    with pytest.raises(ValueError, match="not one image"), pytest.warns(UserWarning):
        ds.__getitems__([0])


@pytest.mark.skipif(not CIFAR.exists(), reason=CIFAR_SKIP)
def test_prepare_real_photos(tmp_path):
    src = cifar_photos(tmp_path / "cifar", 40)
    r = D.prepare(src, tmp_path / "c.npy", resolution=32, workers=0, progress=False)
    assert r["written"] == 40 and r["skipped"] == 0
    arr = np.load(tmp_path / "c.npy")
    with Image.open(src / "00007.jpg") as im:
        np.testing.assert_array_equal(arr[7], np.asarray(im.convert("RGB")))   # 32 -> 32: as is


def test_prepare_refuses_an_out_under_a_file_naming_out(capsys, tmp_path):
    # OUT whose folder is a file: the error was "[Errno 17] File exists: 'x.txt'", naming
    # no argument. Now out is named, before any image is decoded.
    from blurfast import cli
    src = made_photos(tmp_path / "src", 2, size=8)
    (tmp_path / "x.txt").write_text("a file")
    for out in (tmp_path / "x.txt" / "o.npy", tmp_path / "x.txt" / "sub" / "o.npy"):
        assert cli.main(["prepare", str(src), str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err == (f"blurfast prepare: error: out: cannot write {str(out)!r}: "
                       f"{str(tmp_path / 'x.txt')!r} is not a folder\n"), err


def test_npy_header_padding_loads(tmp_path):
    a = np.arange(2 * 3 * 3 * 1, dtype=np.uint8).reshape(2, 3, 3, 1)
    h = D._npy_header(a.shape)
    for length in (len(h), len(h) + 64, len(h) + 5):
        (tmp_path / "p.npy").write_bytes(D._npy_header(a.shape, length) + a.tobytes())
        np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), a)
    with pytest.raises(ValueError, match="length"):
        D._npy_header(a.shape, len(h) - 1)


def test_prepare_bad_arguments(tmp_path):
    src = made_photos(tmp_path / "src", 2, size=8)
    with pytest.raises(ValueError, match="out"):
        D.prepare(src, tmp_path / "o.bin", progress=False)
    with pytest.raises(ValueError, match="resize"):
        D.prepare(src, tmp_path / "o.npy", resize="stretch", progress=False)
    with pytest.raises(ValueError, match="resolution"):
        D.prepare(src, tmp_path / "o.npy", resolution=0, progress=False)
    with pytest.raises(ValueError, match="src"):
        D.prepare(tmp_path / "none", tmp_path / "o.npy", progress=False)
    (tmp_path / "there.npy").write_bytes(b"keep")
    with pytest.raises(ValueError, match=r"^out: .*there\.npy' exists; pass overwrite=True"):
        D.prepare(src, tmp_path / "there.npy", workers=0, progress=False)
    assert (tmp_path / "there.npy").read_bytes() == b"keep"
    with pytest.raises(TypeError, match="^overwrite: expected a bool"):
        D.prepare(src, tmp_path / "there.npy", workers=0, progress=False, overwrite=1)
    # A folder named like the array: refused before any image is decoded (with overwrite
    # it failed at the final rename, after all the work).
    (tmp_path / "dir.npy").mkdir()
    with pytest.raises(ValueError, match=r"^out: .*dir\.npy' is a directory"):
        D.prepare(tmp_path / "none", tmp_path / "dir.npy", progress=False, overwrite=True)
    for f in src.iterdir():
        f.write_bytes(b"junk")
    with pytest.raises(ValueError, match="none of the 2 images"):
        D.prepare(src, tmp_path / "o.npy", workers=0, progress=False)
    assert not (tmp_path / "o.npy").exists() and not leftover_temporaries(tmp_path)


def test_two_prepares_of_one_out_each_write_a_whole_array(tmp_path, monkeypatch):
    # Both wrote OUT.tmp: the second truncated the first's file and renamed it away, so
    # the first's remaining images went into OUT under the second's header and its own
    # rename failed (FileNotFoundError). Each now writes a temporary file of its own:
    # OUT is the whole array of the run that ends last. Truth: decode of each image.
    src_a = made_photos(tmp_path / "a", 3, size=10)
    src_b = made_photos(tmp_path / "b", 2, size=10, seed=1)
    out = tmp_path / "o.npy"

    def truth(src):
        return np.stack([D.decode(f.read_bytes(), 8, D.DEFAULT_RESIZE)
                         for f in sorted(src.iterdir())])
    decode, calls = D.decode_named, []

    def first_lets_b_run(name, data, *args):       # A's first image: B runs to its end
        calls.append(name)
        if len(calls) == 1:
            with pytest.warns(UserWarning, match=r"o\.npy' that was killed \(or that runs"):
                D.prepare(src_b, out, resolution=8, workers=0, progress=False)
            np.testing.assert_array_equal(np.load(out), truth(src_b))
        return decode(name, data, *args)
    monkeypatch.setattr(D, "decode_named", first_lets_b_run)
    D.prepare(src_a, out, resolution=8, workers=0, progress=False, overwrite=True)
    np.testing.assert_array_equal(np.load(out), truth(src_a))
    assert len(calls) == 5 and not leftover_temporaries(tmp_path)


@pytest.mark.parametrize("max_reported", [-1, 1.5, None])
def test_prepare_checks_max_reported_first(tmp_path, max_reported):
    src = made_photos(tmp_path / "src", 2, size=8)
    with pytest.raises(ValueError, match=r"^max_reported: expected an int >= 0, got "):
        D.prepare(src, tmp_path / "o.npy", workers=0, progress=False,
                  max_reported=max_reported)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]     # nothing written


def test_prepare_with_max_reported_zero_names_no_image(tmp_path):
    # The warning took bad[0] of an empty list: an IndexError after out.npy was written.
    src = made_photos(tmp_path / "src", 3, size=8)
    (src / "00001.jpg").write_bytes(b"junk")
    with pytest.warns(UserWarning) as got:
        r = D.prepare(src, tmp_path / "o.npy", resolution=8, workers=0, progress=False,
                      max_reported=0)
    assert [str(w.message) for w in got] == ["prepare: skipped 1 unreadable image(s) of 3"]
    assert r["written"] == 2 and r["skipped"] == 1 and r["bad"] == []


@pytest.mark.parametrize("call, words", [
    (lambda: D.data_range("bogus"), "pixel_range: expected one of ('-1,1', '0,1'), got 'bogus'"),
    (lambda: D.to_unit_range(torch.zeros(1), "0,255"), "pixel_range: expected one of"),
    (lambda: D.to_float(torch.zeros(2, 3, 3, dtype=torch.uint8)),
     "batch: expected a uint8 tensor (B, H, W, C), got torch.uint8 (2, 3, 3)"),
    (lambda: D.to_float(torch.zeros(1, 2, 2, 3)), "batch: expected a uint8 tensor"),
    (lambda: D.to_float(np.zeros((1, 2, 2, 3), np.uint8)), "batch: expected a uint8 tensor"),
    (lambda: D.to_float(torch.zeros(2, 2, 2, 3, dtype=torch.uint8), torch.tensor([1, 0])),
     "flip: expected None or a bool tensor (2,)"),
    (lambda: D.to_float(torch.zeros(2, 2, 2, 3, dtype=torch.uint8), torch.tensor([True])),
     "flip: expected None or a bool tensor (2,)"),
])
def test_pixel_conversions_name_bad_arguments(call, words):
    with pytest.raises(ValueError) as e:
        call()
    assert str(e.value).startswith(words), e.value


def test_prepared_array_batches_and_checks(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (7, 4, 4, 3), dtype=np.uint8)
    np.save(tmp_path / "a.npy", a)
    ds = D.PreparedArray(tmp_path / "a.npy")
    np.testing.assert_array_equal(ds.__getitems__([5, 1, 5, 0]).numpy(), a[[5, 1, 5, 0]])
    ds2 = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(ds2[6], a[6])
    with pytest.raises(ValueError, match=r"^resolution: 8 differs from the prepared array's 4 "
                                         r".*; give 4, or prepare it again at 8$"):
        D.open_dataset(tmp_path / "a.npy", resolution=8)
    np.save(tmp_path / "f.npy", a.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        D.PreparedArray(tmp_path / "f.npy")
    (tmp_path / "bad.npy").write_bytes(b"nope")
    with pytest.raises(ValueError, match="path"):
        D.PreparedArray(tmp_path / "bad.npy")
    with pytest.raises(ValueError, match="data"):
        D.open_dataset(tmp_path / "missing.npy")


def test_to_float_scales_and_flips():
    b = torch.arange(2 * 2 * 3 * 3, dtype=torch.uint8).reshape(2, 2, 3, 3)   # B, H, W, C
    x = D.to_float(b, torch.tensor([False, True]))
    assert x.shape == (2, 3, 2, 3) and x.is_contiguous(memory_format=torch.channels_last)
    ref = b.permute(0, 3, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(x[0], ref[0])
    torch.testing.assert_close(x[1], ref[1].flip(-1))
    torch.testing.assert_close(D.to_float(b, pixel_range="0,1"), b.permute(0, 3, 1, 2) / 255)
    assert D.to_float(torch.full((1, 1, 1, 1), 255, dtype=torch.uint8)).item() == 1.0
    with pytest.raises(ValueError, match="pixel_range"):
        D.to_float(b, pixel_range="0,255")


def test_step_batches_cover_each_epoch_and_split_the_global_batch():
    n, B = 10, 4
    one = StepBatches(n, B, B, 0, seed=3, start=0, stop=5)
    flat = [i for batch in one for i in batch]           # 20 positions = 2 epochs
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:]) == list(range(10))
    assert flat[:10] != flat[10:]                        # a new permutation per epoch
    r0 = StepBatches(n, B, 2, 0, seed=3, start=0, stop=5)
    r1 = StepBatches(n, B, 2, 1, seed=3, start=0, stop=5)
    for s, (a, b) in enumerate(zip(r0, r1)):
        assert a + b == one.indices(s)
    assert list(StepBatches(n, B, B, 0, seed=3, start=3, stop=5)) == list(one)[3:]
    assert StepBatches(n, B, B, 0, seed=4, start=0, stop=1).indices(0) != one.indices(0)


def test_step_batches_read_on_from_the_images_consumed():
    # A run resumed with another global batch starts at the examples consumed (`images`):
    # its steps read on in the sequence of permutations, across epochs, as if one example
    # had been taken at a time; the default is start x B, a batch that never changed.
    n = 10
    whole = [i for b in StepBatches(n, 1, 1, 0, seed=3, start=0, stop=30) for i in b]
    first = list(StepBatches(n, 4, 4, 0, seed=3, start=0, stop=3))            # 12 images
    ranks = [StepBatches(n, 3, 1, r, seed=3, start=3, stop=6, images=12) for r in range(3)]
    then = [a + b + c for a, b, c in zip(*ranks)]
    assert [i for b in first + then for i in b] == whole[:21]
    assert list(StepBatches(n, 4, 4, 0, seed=3, start=2, stop=4)) == \
        list(StepBatches(n, 4, 4, 0, seed=3, start=2, stop=4, images=8))
    with pytest.raises(ValueError, match="images"):
        StepBatches(n, 4, 4, 0, seed=3, start=2, stop=4, images=-1)


def test_image_extensions_match_in_any_case(tmp_path):
    # IMAGE_EXTENSIONS are matched case-insensitively: A.JPG and b.PNG are images, for the
    # folder reader (training, prepare, fid's reference) and for fid's samples alike.
    from blurfast import evaluation as ev
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "A.JPG", format="JPEG", quality=95)
    (tmp_path / "b.PNG").write_bytes(_png(b))
    ds = D.ImageFolder(tmp_path, resolution=16)
    assert [p.name for p in ds.files] == ["A.JPG", "b.PNG"]
    np.testing.assert_array_equal(ds[1], b)                  # PNG: lossless, 16 -> 16
    jpg = np.asarray(Image.open(tmp_path / "A.JPG").convert("RGB"))
    np.testing.assert_array_equal(ds[0], jpg)
    got = list(ev.load_images(tmp_path))
    assert len(got) == 2
    np.testing.assert_array_equal(got[0], jpg)
    np.testing.assert_array_equal(got[1], b)


def test_prepare_that_skips_an_image_leaves_no_bytes_past_the_array(tmp_path):
    # The .npy holds exactly its header and written * R * R * C bytes: the space taken for
    # the skipped image is cut off (numpy loads an over-long file without complaint).
    r, want = _prepare_one_bad_photo(tmp_path, 5, size=16, bad=1, junk=b"not a jpeg",
                                     resolution=8, workers=0)
    assert r["written"] == 4
    with open(tmp_path / "out.npy", "rb") as f:
        version = np.lib.format.read_magic(f)
        assert version == (1, 0)
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        header = f.tell()
    assert (shape, fortran, dtype) == ((4, 8, 8, 3), False, np.uint8)
    assert (tmp_path / "out.npy").stat().st_size == header + 4 * 8 * 8 * 3
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), want)


def test_16_bit_grayscale_reads_as_its_8_bit_values(tmp_path):
    # Pillow opens a 16-bit grayscale PNG in mode I;16 and its convert("L"/"RGB") clips
    # at 255: every pixel above 255 of 65535 (all but the darkest) came out white. A 16-bit
    # image of levels v * 257 is the 8-bit image of levels v, for training, prepare and
    # fid's samples alike.
    from blurfast import evaluation as ev
    v = np.random.default_rng(9).integers(0, 256, size=(12, 12), dtype=np.uint8)
    (tmp_path / "a16.png").write_bytes(_png(v.astype(np.uint16) * 257))
    assert Image.open(tmp_path / "a16.png").mode.startswith("I")
    for channels in (1, 3):
        want = np.repeat(v[:, :, None], channels, axis=2)
        np.testing.assert_array_equal(D.ImageFolder(tmp_path, 12, channels=channels)[0], want)
    np.testing.assert_array_equal(list(ev.load_images(tmp_path))[0], v[:, :, None])


def test_16_bit_grayscale_transparent_level_is_read_over_white(tmp_path):
    # A 16-bit grayscale PNG whose tRNS chunk marks one level transparent: its pixels came
    # out as that level's 8-bit value (black for level 0), as if opaque, where an 8-bit
    # one's are white. Truth: white where the 16-bit value is the key, round(v / 257)
    # elsewhere; 257 is opaque, though it rounds to the key's 8-bit level too.
    from blurfast import evaluation as ev
    key = 300
    v = np.random.default_rng(5).integers(0, 65536, size=(6, 6)).astype(np.uint16)
    v[0, :3] = key
    v[1, :3] = 257
    Image.fromarray(v).save(tmp_path / "t16.png", transparency=key)
    with Image.open(tmp_path / "t16.png") as im:
        assert im.mode.startswith("I") and im.info["transparency"] == key
    want = np.where(v == key, 255, np.rint(v / 257)).astype(np.uint8)
    assert (want[1, :3] == 1).all()
    for channels in (1, 3):
        np.testing.assert_array_equal(D.ImageFolder(tmp_path, 6, "squash", channels)[0],
                                      np.repeat(want[:, :, None], channels, axis=2))
    np.testing.assert_array_equal(list(ev.load_images(tmp_path))[0], want[:, :, None])


def test_16_bit_transparent_level_given_as_a_numpy_integer_is_the_same_key():
    # eight_bit read the key as a level only when it was a Python int: np.uint16(300) set
    # on the image was dropped (mode L, the key's pixels opaque); now checks.is_int's.
    key = 300
    v = np.random.default_rng(6).integers(0, 65536, size=(4, 5)).astype(np.uint16)
    v[0, :2] = key
    want_alpha = np.where(v == key, 0, 255).astype(np.uint8)
    for k in (key, np.uint16(key), np.int64(key)):
        im = Image.fromarray(v)
        im.info["transparency"] = k
        out = D.eight_bit(im)
        assert out.mode == "LA", k
        np.testing.assert_array_equal(np.asarray(out)[:, :, 1], want_alpha)
        np.testing.assert_array_equal(np.asarray(out)[:, :, 0], np.rint(v / 257))
    im = Image.fromarray(v)
    im.info["transparency"] = (key, key, key)          # not a level: no alpha
    assert D.eight_bit(im).mode == "L"


def test_exif_orientation_is_applied(tmp_path):
    # A camera stores a portrait photo as landscape pixels with EXIF orientation 6 (rotate
    # 90 degrees clockwise to show): every viewer shows it upright, the reader trained on
    # it lying on its side. Its pixels are now those Pillow's exif_transpose shows, for
    # training, prepare and fid's samples alike.
    from PIL import ImageOps
    from blurfast import evaluation as ev
    a = np.random.default_rng(3).integers(0, 256, size=(8, 16, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(a).save(tmp_path / "p.png", exif=exif)
    with Image.open(tmp_path / "p.png") as im:
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    # rotated clockwise: the stored left column is the top row, read right to left
    np.testing.assert_array_equal(upright, np.rot90(a, -1))
    np.testing.assert_array_equal(D.ImageFolder(tmp_path, 8, "center-crop")[0],
                                  D.decode(_png(upright[4:12]), 8, "squash"))
    np.testing.assert_array_equal(list(ev.load_images(tmp_path))[0], upright)


def test_transparent_pixels_are_read_over_white(tmp_path):
    # An RGBA image (an alpha channel) and a palette image with a transparent entry: a
    # viewer shows them on white, where dropping the alpha showed the colors stored under
    # transparent pixels (black here). Truth: a c + (1 - a) 255 per channel in float64,
    # a = alpha / 255 (Pillow's integer compositing: within 1 of it). Training, prepare
    # and fid's samples read them alike.
    from blurfast import evaluation as ev
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    alpha = rng.choice(np.array([0, 64, 200, 255], np.uint8), size=(8, 8))
    rgb[alpha == 0] = 0
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "a.png")
    a = alpha[..., None] / 255.0
    want = a * rgb + (1 - a) * 255
    got = D.ImageFolder(tmp_path, 8, "squash")[0].astype(float)
    assert np.abs(got - want).max() <= 1
    assert (got[alpha == 0] == 255).all()
    assert np.abs(np.asarray(list(ev.load_images(tmp_path))[0], float) - want).max() <= 1
    gray = D.ImageFolder(tmp_path, 8, "squash", channels=1)[0][..., 0].astype(float)
    lum = (want * [0.299, 0.587, 0.114]).sum(-1)         # Pillow's L: ITU-R 601-2 luma
    assert np.abs(gray - lum).max() <= 1.5
    # A palette image whose entry 0 is transparent.
    (tmp_path / "a.png").unlink()
    idx = rng.integers(0, 3, size=(8, 8), dtype=np.uint8)
    pal = Image.fromarray(idx, "P")
    pal.putpalette([10, 20, 30, 200, 0, 0, 0, 200, 0] + [0] * 759)
    pal.save(tmp_path / "p.png", transparency=0)
    colors = np.array([[255, 255, 255], [200, 0, 0], [0, 200, 0]])
    np.testing.assert_array_equal(D.ImageFolder(tmp_path, 8, "squash")[0], colors[idx])


def test_a_grayscale_sample_with_alpha_is_read_as_grayscale_over_white(tmp_path):
    # fid's sample folders: a grayscale PNG with an alpha channel (mode LA) is grayscale,
    # (H, W, 1) as an L image is, composited over white; it was read as RGB, 3 channels,
    # which a grayscale run's reference then refused.
    from blurfast import evaluation as ev
    rng = np.random.default_rng(3)
    lum = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
    alpha = rng.choice(np.array([0, 100, 255], np.uint8), size=(8, 8))
    Image.fromarray(np.dstack([lum, alpha]), "LA").save(tmp_path / "g.png")
    got = list(ev.load_images(tmp_path))[0]
    a = alpha / 255.0
    assert got.shape == (8, 8, 1)
    assert np.abs(got[..., 0] - (a * lum + (1 - a) * 255)).max() <= 1


def test_an_empty_file_as_data_is_one_line_naming_it(tmp_path):
    # An empty file (a download cut short, a placeholder) raised numpy's EOFError, a
    # traceback on the command line, where other unreadable files are a ValueError.
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"^data \(--data\): '.*empty\.npy' is not a "
                                         r"readable \.npy array"):
        D.open_dataset(empty, arg="data (--data)")


# ------------------------------------------------------------------ archives

def _archive(path, files, kind):
    """An archive at ``path`` of ``files`` [(member name, bytes)], in that order."""
    import tarfile
    import zipfile
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            for name, data in files:
                z.writestr(name, data)
        return path
    mode = {"tar": "w", "tar.gz": "w:gz", "tar.bz2": "w:bz2", "tar.xz": "w:xz"}[kind]
    with tarfile.open(path, mode) as t:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


@pytest.mark.parametrize("kind", ["zip", "tar", "tar.gz", "tar.xz"])
@pytest.mark.parametrize("workers", [0, 2])
def test_prepare_from_an_archive_reads_its_images_in_order(tmp_path, kind, workers):
    # The archive's images in its order, each decoded as from a file (Pillow on the
    # member's bytes); other members (text, folders) left out, a corrupt image skipped
    # and named ARCHIVE:MEMBER. The order is not the folder's sorted one: members are
    # stored shuffled.
    src = made_photos(tmp_path / "src", 7, size=20)
    photos = sorted(src.iterdir())
    order = [4, 0, 6, 2, 5, 1, 3]
    files = [(f"imgs/{photos[i].name}", photos[i].read_bytes()) for i in order]
    files.insert(2, ("imgs/README.txt", b"not an image"))
    files.insert(5, ("imgs/broken.jpg", b"\xff\xd8\xff\xe0 truncated jpeg"))
    arc = _archive(tmp_path / f"a.{kind}", files, kind)
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        r = D.prepare(arc, tmp_path / "o.npy", resolution=16, resize="squash",
                      workers=workers, progress=False)
    want = np.stack([np.asarray(Image.open(photos[i]).convert("RGB")
                                .resize((16, 16), Image.BICUBIC)) for i in order])
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy"), want)
    assert r["written"] == 7 and r["skipped"] == 1
    assert r["bad"][0].startswith(f"{arc}:imgs/broken.jpg: cannot be decoded")
    r = D.prepare(arc, tmp_path / "l.npy", resolution=16, resize="squash", workers=workers,
                  progress=False, limit=2)
    np.testing.assert_array_equal(np.load(tmp_path / "l.npy"), want[:2])


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_archive_members_stored_twice_are_read_once(tmp_path, kind):
    # tar and zip append: a name stored twice is listed once and read as its first copy
    # (zipfile reads a name's last copy: a zip gave it).
    src = made_photos(tmp_path / "src", 2, size=16)
    a, b = (p.read_bytes() for p in sorted(src.iterdir()))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Duplicate name", UserWarning)   # zipfile's
        arc = _archive(tmp_path / f"d.{kind}", [("x.png", a), ("y.jpg", b), ("x.png", b)],
                       kind)
    assert D.ImageArchive(arc).members == ["x.png", "y.jpg"]
    D.prepare(arc, tmp_path / "o.npy", resolution=16, workers=0, progress=False)
    got = np.load(tmp_path / "o.npy")
    np.testing.assert_array_equal(got[0], D.decode(a, 16, "center-crop"))
    np.testing.assert_array_equal(got[1], D.decode(b, 16, "center-crop"))


@pytest.mark.parametrize("kind", ["tar", "tar.gz"])
def test_tar_links_read_as_the_file_they_point_to(tmp_path, capsys, kind):
    # Hardlinks and symlinks were left out silently, where an extracted folder has their
    # images. A link to a regular member reads as it, in the link's place (a symlink
    # stored before its target too: the archive is still read front to back); a dangling
    # one, or one pointing outside the archive, is skipped and reported.
    import tarfile
    from blurfast import cli
    src = made_photos(tmp_path / "src", 2, size=12)
    a, b = (p.read_bytes() for p in sorted(src.iterdir()))
    arc = tmp_path / f"l.{kind}"
    with tarfile.open(arc, {"tar": "w", "tar.gz": "w:gz"}[kind]) as t:
        sym, hard = tarfile.SYMTYPE, tarfile.LNKTYPE
        for name, kind_, what in [("imgs/ahead.png", sym, "a.png"),      # before its target
                                  ("imgs/a.png", tarfile.REGTYPE, a),
                                  ("imgs/hard.png", hard, "imgs/a.png"),
                                  ("imgs/sym.png", sym, "a.png"),
                                  ("imgs/b.jpg", tarfile.REGTYPE, b),
                                  ("imgs/dangling.png", sym, "missing.png"),
                                  ("imgs/out.png", sym, "../../x.png"),
                                  ("imgs/up.jpg", sym, "../imgs/b.jpg")]:
            info = tarfile.TarInfo(name)
            info.type = kind_
            if kind_ == tarfile.REGTYPE:
                info.size = len(what)
                t.addfile(info, io.BytesIO(what))
            else:
                info.linkname = what
                t.addfile(info)
    assert cli.main(["prepare", str(arc), str(tmp_path / "o.npy"), "--resolution", "12",
                     "--workers", "0", "--no-progress"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("6 images of shape (12, 12, 3) (--resize center-crop), "
                           "2 unreadable skipped")
    assert out[1:] == [f"  unreadable: {arc}:imgs/dangling.png: LookupError: a symlink to "
                       f"'imgs/missing.png', not a regular file of the archive",
                       f"  unreadable: {arc}:imgs/out.png: LookupError: a symlink to "
                       f"'../../x.png', outside the archive"]
    got = np.load(tmp_path / "o.npy")
    want = [D.decode(x, 12, "center-crop") for x in (a, a, a, a, b, b)]
    np.testing.assert_array_equal(got, np.stack(want))


def test_decoding_in_windows_keeps_the_order():
    # prepare's workers decode a window of items while the next is read: every item once,
    # in order, whatever the window.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    png = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 30)).save(png, format="PNG")
    src = [(f"n{i}", b"junk" if i % 3 else png.getvalue()) for i in range(10)]
    D._init_worker((8, "squash", 3))
    want = [D._decode_item(x) for x in src]
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork"),
                             initializer=D._init_worker, initargs=((8, "squash", 3),)) as pool:
        for window in (1, 3, 10, 64):
            got = list(D._decoded(iter(src), pool, window))
            assert [e for _, e in got] == [e for _, e in want]
            assert all(a is None if b is None else np.array_equal(a, b)
                       for (a, _), (b, _) in zip(got, want))
    assert [w[1] is None for w in want] == [i % 3 == 0 for i in range(10)]
    assert [w[1].split(":")[0] for w in want if w[1]] == [f"n{i}" for i in range(10) if i % 3]


def test_archive_errors_name_src_and_train_asks_for_prepare(tmp_path):
    (tmp_path / "bad.zip").write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match=r"^src: .*bad.zip' cannot be read as a zip archive"):
        D.prepare(tmp_path / "bad.zip", tmp_path / "o.npy", progress=False)
    (tmp_path / "bad.tar.gz").write_bytes(b"\x1f\x8b not gzip")
    with pytest.raises(ValueError, match=r"^src: .*bad.tar.gz' cannot be read as a tar"):
        D.prepare(tmp_path / "bad.tar.gz", tmp_path / "o.npy", progress=False)
    arc = _archive(tmp_path / "text.tar", [("a.txt", b"hello")], "tar")
    with pytest.raises(ValueError, match=r"^src: no .jpg/.jpeg/.png/.webp/.bmp files in the "
                                         r"archive"):
        D.prepare(arc, tmp_path / "o.npy", progress=False)
    lsun = _archive(tmp_path / "church_outdoor_train_lmdb.zip",
                    [("church_outdoor_train_lmdb/data.mdb", b"\0" * 64),
                     ("church_outdoor_train_lmdb/lock.mdb", b"\0" * 8)], "zip")
    with pytest.raises(ValueError, match=r"^src: the archive .* holds an lmdb database \(as "
                                         r"LSUN distributes them\); unpack it"):
        D.prepare(lsun, tmp_path / "o.npy", progress=False)
    (tmp_path / "plain.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"^src: .*plain.bin' is neither a directory \(image "
                                         r"folder or lmdb\) nor an archive \(.zip, .tar"):
        D.prepare(tmp_path / "plain.bin", tmp_path / "o.npy", progress=False)
    with pytest.raises(ValueError, match=r"^data \(--data\): .*text.tar' is an archive, which "
                                         r"datasets do not read \(no random access\); decode "
                                         r"it once with `blurfast prepare"):
        D.open_dataset(arc, 16, arg="data (--data)")
    from blurfast.evaluation import check_reference
    with pytest.raises(ValueError, match=r"^ref: .*text.tar' is an archive"):
        check_reference(arc, 16)
    assert not (tmp_path / "o.npy").exists() and not leftover_temporaries(tmp_path)


@pytest.mark.skipif(not CIFAR.exists(), reason=CIFAR_SKIP)
def test_prepare_reads_the_cifar_archive_as_it_is(tmp_path):
    # The shared CIFAR-10 tar.gz prepared directly (its first 300 images, 32 -> 32: the
    # pixels as Pillow decodes them) against the same members read with tarfile.
    import tarfile
    from blurfast import cli
    assert cli.main(["prepare", str(CIFAR), str(tmp_path / "c.npy"), "--resolution", "32",
                     "--limit", "300", "--workers", "2", "--no-progress"]) == 0
    got = np.load(tmp_path / "c.npy")
    want = []
    with tarfile.open(CIFAR, "r:gz") as t:
        for m in t:
            if m.isfile() and m.name.endswith(".jpg"):
                want.append(np.asarray(Image.open(t.extractfile(m)).convert("RGB")))
                if len(want) == 300:
                    break
    np.testing.assert_array_equal(got, np.stack(want))


def test_prepare_match_keeps_the_paths_a_pattern_matches(tmp_path, capsys):
    # --match: a shell-style pattern on the whole relative path (folder) or member name
    # (archive), '*' crossing folders; the same images either way, in each source's order.
    from blurfast import cli
    made = made_photos(tmp_path / "made", 6, size=12)
    photos = sorted(made.iterdir())
    root = tmp_path / "src"
    for i, p in enumerate(photos):
        d = root / ("train" if i % 2 else "test") / ("a" if i < 3 else "b")
        d.mkdir(parents=True, exist_ok=True)
        (d / p.name).write_bytes(p.read_bytes())
    files = sorted(x.relative_to(root).as_posix() for x in root.rglob("*.*"))
    arc = _archive(tmp_path / "s.tar.gz", [(f, (root / f).read_bytes()) for f in files],
                   "tar.gz")
    want = np.stack([D.decode(p.read_bytes(), 12, "squash") for p in photos[1::2]])
    for src in (root, arc):
        assert cli.main(["prepare", str(src), str(tmp_path / "o.npy"), "--resolution", "12",
                         "--resize", "squash", "--match", "train/*", "--workers", "0",
                         "--no-progress", "--overwrite"]) == 0
        np.testing.assert_array_equal(np.load(tmp_path / "o.npy"), want)
        assert "3 images" in capsys.readouterr().out
    r = D.prepare(root, tmp_path / "b.npy", resolution=12, match="*/b/*.png", workers=0,
                  progress=False)
    assert r["written"] == len([p for p in photos[3:] if p.suffix == ".png"])
    for src in (root, arc):
        assert cli.main(["prepare", str(src), str(tmp_path / "n.npy"), "--match", "val/*",
                         "--no-progress"]) == 2
        assert "files matching 'val/*' " in capsys.readouterr().err
    db = tmp_path / "db_lmdb"
    db.mkdir()
    (db / "data.mdb").write_bytes(b"")
    assert cli.main(["prepare", str(db), str(tmp_path / "l.npy"), "--match", "x*",
                     "--no-progress"]) == 2
    assert capsys.readouterr().err.startswith("blurfast prepare: error: --match: an lmdb "
                                              "database's keys are not paths")


def test_prepare_workers_leave_ctrl_c_and_sigterm_to_prepare(tmp_path, monkeypatch):
    # The workers ignore Ctrl-C (prepare's process handles it, and lets them finish the
    # images they decode) and keep SIGTERM's default: with the CLI's Python handler, a
    # worker blocked on a lock could miss the SIGTERM that multiprocessing.Pool.terminate
    # sent it (`blurfast prepare --workers 2` hung about one run in 40 at its end).
    import signal

    def dispositions(name, data, resolution, resize, channels=3):   # in the workers
        ign = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        dfl = signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        return np.full((resolution, resolution, channels), 1 + ign + 2 * dfl, np.uint8)
    src = made_photos(tmp_path / "src", 4, size=8)
    int_before = signal.getsignal(signal.SIGINT)    # SIG_IGN where pytest runs in background
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)   # as the CLI's
    try:
        monkeypatch.setattr(D, "decode_named", dispositions)
        D.prepare(src, tmp_path / "o.npy", resolution=4, workers=2, progress=False)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (np.load(tmp_path / "o.npy") == 4).all()
    assert signal.getsignal(signal.SIGINT) == int_before        # this process's, unchanged


_DIED = ("blurfast prepare: error: a decoding process died (killed by signal 9, SIGKILL: "
         "out of memory?); nothing was written\n")


def _prepare_in_a_child(tmp_path, patch: str, hung: str, debug: str = ""):
    """`blurfast prepare` of 40 made photos with 2 workers in a child process, after the
    Python lines ``patch`` (which import os, signal, struct, sys and ``D``, blurfast.data);
    ``hung``: the failure when it runs past 60 s. Checks that no output is left behind;
    returns the finished process."""
    import os
    import subprocess
    import sys
    src = made_photos(tmp_path / "src", 40, size=8)
    script = ("import os, signal, struct, sys\n"
              "from blurfast import cli, data as D\n" + patch +
              "sys.exit(cli.main(['prepare', sys.argv[1], sys.argv[2], '--resolution', '4',\n"
              "                   '--workers', '2', '--no-progress']))\n")
    try:
        # cwd: not the repository root, whose blurfast/ (unbuilt in CI) would shadow the
        # installed package
        r = subprocess.run([sys.executable, "-c", script, str(src), str(tmp_path / "o.npy")],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path,
                           env={**os.environ, "BLURFAST_DEBUG": debug})
    except subprocess.TimeoutExpired:
        pytest.fail(hung)
    assert not (tmp_path / "o.npy").exists() and not leftover_temporaries(tmp_path)
    return r


def test_prepare_with_a_worker_killed_ends_and_leaves_no_file(tmp_path):
    # A decoding process killed midway (the OOM killer; `timeout` signals the whole process
    # group): prepare ends with an error and removes OUT.tmp. multiprocessing.Pool lost the
    # worker's task and waited for it forever; Ctrl-C at that point hung too. The command
    # says so in one line (it printed BrokenProcessPool's traceback); BLURFAST_DEBUG=1 shows
    # the traceback.
    patch = ("decode = D.decode_named\n"
             "def dies(name, *a):\n"
             "    if name.endswith('00021.png') or name.endswith('00021.jpg'):\n"
             "        os.kill(os.getpid(), signal.SIGKILL)\n"
             "    return decode(name, *a)\n"
             "D.decode_named = dies\n")
    for debug in ("", "1"):
        r = _prepare_in_a_child(tmp_path, patch, "prepare hung when a decoding process was "
                                                 "killed", debug)
        if debug:
            assert r.returncode != 0 and "Traceback" in r.stderr and "WorkerDied" in r.stderr
        else:
            assert r.returncode == 1 and "Traceback" not in r.stderr
            assert r.stderr == _DIED


def test_prepare_with_a_worker_killed_while_handing_back_ends_too(tmp_path):
    # A worker killed while it writes its results leaves a cut message in the result pipe:
    # the pool's reader waits for the rest for ever, and never notices the death (Python
    # 3.11; one run in 8 of a random SIGKILL hung so). Here a worker writes such a message
    # (a length of 10000, then 10 bytes) and kills itself; prepare sees the dead worker
    # within its second of waiting, ends the others (which frees the reader) and fails
    # in one line.
    patch = ("from concurrent.futures import ProcessPoolExecutor\n"
             "made = []\n"
             "class Recorded(ProcessPoolExecutor):\n"
             "    def __init__(self, *a, **k):\n"
             "        super().__init__(*a, **k)\n"
             "        made.append(self)\n"
             "D.ProcessPoolExecutor = Recorded\n"
             "def cut(items):\n"
             "    fd = made[0]._result_queue._writer.fileno()\n"
             "    os.write(fd, struct.pack('!i', 10000) + b'x' * 10)\n"
             "    os.kill(os.getpid(), signal.SIGKILL)\n"
             "D._decode_items = cut\n")
    r = _prepare_in_a_child(tmp_path, patch, "prepare hung on a cut message of a killed "
                                             "decoding process")
    assert r.returncode == 1, r.stderr
    assert r.stderr == _DIED


def test_prepare_skips_the_zip_members_it_cannot_read(tmp_path):
    # An encrypted member (zipfile: RuntimeError) is skipped and named, as one with a bad
    # CRC is; it was a traceback.
    src = made_photos(tmp_path / "src", 3, size=12)
    a, b, c = (p.read_bytes() for p in sorted(src.iterdir()))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in (("a.png", a), ("b.jpg", b), ("c.png", c)):
            z.writestr(name, data)
    raw = bytearray(buf.getvalue())
    k = raw.index(b"PK\x01\x02", raw.index(b"PK\x01\x02") + 4)   # b.jpg's central record
    raw[k + 8] |= 0x1                                              # 'encrypted'
    (tmp_path / "e.zip").write_bytes(raw)
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        r = D.prepare(tmp_path / "e.zip", tmp_path / "o.npy", resolution=12, workers=0,
                      progress=False)
    assert r["written"] == 2
    assert r["bad"] == [f"{tmp_path / 'e.zip'}:b.jpg: RuntimeError: File 'b.jpg' is "
                        f"encrypted, password required for extraction"]


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "tar.xz"])
def test_prepare_refuses_a_tar_damaged_midway(tmp_path, kind):
    # tarfile ends its listing quietly at a damaged header: the images before it were
    # prepared as the whole archive (20 of 40, no word), and a damaged .tar.xz was an
    # LZMAError traceback. Now an error naming src, and no OUT.
    import tarfile
    src = made_photos(tmp_path / "src", 40, size=12)
    files = [(p.name, p.read_bytes()) for p in sorted(src.iterdir())]
    plain = _archive(tmp_path / "p.tar", files, "tar")
    with tarfile.open(plain) as t:
        offset = t.getmembers()[20].offset
    raw = bytearray(plain.read_bytes())
    raw[offset:offset + 100] = b"garbage!" * 12 + b"gar!"             # member 20's header
    arc = tmp_path / f"d.{kind}"
    if kind == "tar":
        arc.write_bytes(raw)
    else:                       # the stream itself damaged halfway
        good = _archive(tmp_path / f"g.{kind}", files, kind).read_bytes()
        raw = bytearray(good)
        raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)
        arc.write_bytes(raw)
    with pytest.raises(ValueError, match=rf"^src: .*d\.{re.escape(kind)}' cannot be read as "
                                         rf"a tar archive"):
        D.prepare(arc, tmp_path / "o.npy", resolution=12, workers=0, progress=False)
    assert not (tmp_path / "o.npy").exists() and not leftover_temporaries(tmp_path)


@pytest.mark.parametrize("kind", ["tar.bz2", "tar.gz", "tar.xz"])
def test_a_corrupt_compressed_tar_is_one_line_naming_it(tmp_path, capsys, kind):
    # tarfile tries each compression on a file it cannot open: its error listed them all,
    # one line each. Now one line, the failure of the compression the name says (a garbage
    # file; a truncated .tar.bz2 fails there too, its cause said); EOFError for a stream cut
    # short that opens.
    from blurfast import cli
    src = made_photos(tmp_path / "src", 4, size=12)
    good = _archive(tmp_path / f"g.{kind}", [(p.name, p.read_bytes())
                                             for p in sorted(src.iterdir())], kind).read_bytes()
    (tmp_path / f"garbage.{kind}").write_bytes(b"not an archive at all " * 20)
    (tmp_path / f"cut.{kind}").write_bytes(good[:len(good) // 2])
    wrong = {"tar.bz2": "not a bzip2 file", "tar.gz": "not a gzip file",
             "tar.xz": "not an lzma file"}[kind]
    for name, why in (("garbage", wrong),
                      ("cut", "Compressed file ended before the end-of-stream marker")):
        assert cli.main(["prepare", str(tmp_path / f"{name}.{kind}"), str(tmp_path / "o.npy"),
                         "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert re.match(rf"blurfast prepare: error: src: '.*{name}\.{re.escape(kind)}' "
                        rf"cannot be read as a tar archive \(.*{why}.*\)$", err), err
    assert not (tmp_path / "o.npy").exists() and not leftover_temporaries(tmp_path)


def test_prepare_match_reads_member_names_without_a_leading_dot_slash(tmp_path):
    # `tar -C DIR -czf A .` names its members ./train/...: --match 'train/*' takes the same
    # images as from DIR (it matched none: 'no ... files matching').
    src = made_photos(tmp_path / "src", 4, size=12)
    photos = sorted(src.iterdir())
    files = [(f"./{'train' if i % 2 else 'test'}/{p.name}", p.read_bytes())
             for i, p in enumerate(photos)]
    arc = _archive(tmp_path / "dot.tar.gz", files, "tar.gz")
    r = D.prepare(arc, tmp_path / "o.npy", resolution=12, resize="squash", workers=0,
                  progress=False, match="train/*")
    assert r["written"] == 2
    np.testing.assert_array_equal(np.load(tmp_path / "o.npy"),
                                  np.stack([D.decode(photos[i].read_bytes(), 12, "squash")
                                            for i in (1, 3)]))
    assert D.ImageArchive(arc).members[0] == "./test/00000.png"    # read by its own name


def test_prepare_draws_its_bar_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    # The bar was drawn whatever stderr was: a log file of `blurfast prepare ... 2>log`
    # got every redraw of it. Now, as bench's: only on a terminal, and not with
    # --no-progress.
    import sys

    from blurfast import cli
    from train_helpers import made_photos
    src = made_photos(tmp_path / "photos", 4, size=8)
    for tty, flags, drawn in ((False, [], False), (True, [], True),
                              (True, ["--no-progress"], False)):
        monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
        out = tmp_path / f"o{tty}{len(flags)}.npy"
        assert cli.main(["prepare", str(src), str(out), "--resolution", "8",
                         "--workers", "0"] + flags) == 0
        err = capsys.readouterr().err
        assert ("prepare photos: 100%" in err) == drawn, (tty, flags, err)
        assert np.load(out).shape == (4, 8, 8, 3)


def test_a_prepared_arrays_other_resolution_is_refused_in_the_words_of_the_cli(tmp_path,
                                                                             capsys):
    # The CLI names the flag (--resolution): the advice "give resolution 4" named the
    # Python argument beside it; it gives the value alone.
    from blurfast import cli
    np.save(tmp_path / "a.npy", np.zeros((3, 4, 4, 3), np.uint8))
    assert cli.main(["draw", "process", "--data", str(tmp_path / "a.npy"), "--resolution", "8",
                     "--out", str(tmp_path / "p.png")]) == 2
    assert capsys.readouterr().err == (
        f"blurfast draw: error: --resolution: 8 differs from the prepared array's 4 "
        f"({tmp_path / 'a.npy'}); give 4, or prepare it again at 8\n")
    assert not (tmp_path / "p.png").exists()
