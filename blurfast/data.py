"""Training data: image folders, LSUN lmdb databases and prepared uint8 arrays.

Every dataset yields images as uint8 arrays (H, W, C) at the training resolution;
``__getitems__`` returns a batch as one uint8 tensor (B, H, W, C). Pixels are
scaled to floats (and flipped) on the training device, see :func:`to_float`.

``prepare`` decodes a source once into a ``.npy`` file of shape (N, H, W, C),
which :class:`PreparedArray` memory-maps: an epoch then costs no image decoding.
"""
from __future__ import annotations

import io
import json
import math
import multiprocessing
import os
import posixpath
import re
import signal
import struct
import sys
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from .checks import check_bool, check_int, is_int
from .fileio import atomic_path, check_writable, leftover_temporaries, write_text

__all__ = ["IMAGE_EXTENSIONS", "ARCHIVE_SUFFIXES", "ImageArchive", "RESIZE_MODES", "DEFAULT_RESIZE", "PIXEL_RANGES", "ImageFolder",
           "LSUNLmdb", "PreparedArray", "open_dataset", "prepare", "to_float", "PrepareReport",
           "UnreadableImage", "WorkerDied", "data_range", "to_unit_range", "check_resize",
           "decode", "decode_array", "prepared_meta_path"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
RESIZE_MODES = ("squash", "center-crop")
# How training (and FID, unless told the run's) reads image folders and lmdb.
DEFAULT_RESIZE = "center-crop"
PIXEL_RANGES = ("-1,1", "0,1")


class UnreadableImage(ValueError):
    """An image of a dataset that Pillow cannot decode; the message names it."""


def check_resize(resize, name: str = "resize") -> str:
    """``resize`` when it is one of :data:`RESIZE_MODES`; else ValueError naming ``name``."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"{name}: expected one of {RESIZE_MODES}, got {resize!r}")
    return resize


def eight_bit(im):
    """A Pillow image with 8-bit channels: 16-bit grayscale (modes I;16*, and I, as which
    Pillow may open it) scaled by 255 / 65535 and rounded to mode L, where Pillow's own
    convert would clip it at 255; other images as they are. A 16-bit level marked
    transparent (a PNG's tRNS) becomes an alpha channel (mode LA): its pixels are
    transparent, not the 8-bit level it rounds to, which is shared with opaque ones."""
    from PIL import Image

    if im.mode != "I" and not im.mode.startswith("I;16"):
        return im
    a = np.asarray(im).astype(np.float64)
    lum = np.clip(np.rint(a / 257), 0, 255).astype(np.uint8)
    key = im.info.get("transparency")
    if not is_int(key):               # a level; Pillow gives a tuple or bytes in other modes
        return Image.fromarray(lum, "L")
    alpha = np.where(a == key, 0, 255).astype(np.uint8)
    return Image.fromarray(np.dstack([lum, alpha]), "LA")


def upright(im):
    """A Pillow image as viewers show it: its EXIF orientation applied (a camera's
    portrait photo is stored on its side); as stored where there is none, or where the
    EXIF block cannot be read."""
    from PIL import ImageOps

    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:                  # a damaged EXIF block: the pixels as stored
        return im
    return im if orientation == 1 else ImageOps.exif_transpose(im)


def opaque(im):
    """A Pillow image as viewers show it on white: one with transparency (an alpha
    channel, or a palette or color marked transparent) composited over white, where
    dropping the alpha would show the colors stored under transparent pixels (often
    black); other images as they are."""
    from PIL import Image

    if im.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in im.info:
        return im
    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)


def decode(data: bytes, resolution: int, resize: str, channels: int = 3) -> np.ndarray:
    """Encoded image bytes -> uint8 (resolution, resolution, channels).

    ``squash`` resizes the whole image to a square (the paper's preprocessing);
    ``center-crop`` takes the central square first. Bicubic, antialiased (Pillow). The
    image is read upright (:func:`upright`), with 8-bit channels (:func:`eight_bit`) and
    transparency over white (:func:`opaque`).
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return _conform(opaque(eight_bit(upright(im))), resolution, resize, channels)


def decode_array(a: np.ndarray, resolution: int, resize: str, channels: int = 3) -> np.ndarray:
    """A uint8 (H, W, 1 or 3) image array -> uint8 (resolution, resolution, channels), as
    :func:`decode` reads the same pixels from a file (its resize and channel conversion);
    ValueError naming ``a`` for another dtype or shape."""
    if not isinstance(a, np.ndarray) or a.dtype != np.uint8 or a.ndim != 3 \
            or a.shape[2] not in (1, 3):
        raise ValueError(f"a: expected a uint8 array (H, W, 1 or 3), got "
                         f"{getattr(a, 'dtype', type(a).__name__)} "
                         f"{tuple(getattr(a, 'shape', ()))}")
    from PIL import Image
    return _conform(Image.fromarray(a[:, :, 0] if a.shape[2] == 1 else a), resolution,
                    resize, channels)


def _conform(im, resolution: int, resize: str, channels: int) -> np.ndarray:
    """A Pillow image (8-bit, opaque) -> uint8 (resolution, resolution, channels): the
    :func:`decode` conversion, resize and crop."""
    from PIL import Image

    im = im.convert("RGB" if channels == 3 else "L")
    if resize == "center-crop":
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        im = im.crop((left, top, left + s, top + s))
    if im.size != (resolution, resolution):
        im = im.resize((resolution, resolution), Image.BICUBIC)
    a = np.asarray(im, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def decode_named(name: str, data: bytes, resolution: int, resize: str,
                 channels: int = 3) -> np.ndarray:
    """:func:`decode`, its failures raised as :class:`UnreadableImage` naming ``name``."""
    try:
        return decode(data, resolution, resize, channels)
    except Exception as e:             # Pillow raises several kinds on bad data
        # Pillow names the in-memory buffer it read from; name the image instead.
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", repr(name), str(e))
        raise UnreadableImage(f"{name}: cannot be decoded "
                              f"({type(e).__name__}: {detail})") from None


class _Decoded(torch.utils.data.Dataset):
    """Base of the sources that decode images on the fly."""

    def __init__(self, resolution: int, resize: str, channels: int):
        self.resolution = check_int("resolution", resolution)
        self.resize = check_resize(resize)
        if channels not in (1, 3):
            raise ValueError(f"channels: expected 1 or 3, got {channels!r}")
        self.channels = channels

    def raw(self, i: int) -> bytes:
        raise NotImplementedError

    def name(self, i: int) -> str:
        raise NotImplementedError

    def __getitem__(self, i: int) -> np.ndarray:
        """Image i; :class:`UnreadableImage` when it cannot be decoded."""
        return decode_named(self.name(i), self.raw(i), self.resolution, self.resize,
                            self.channels)

    def items(self, n: int):
        """``(name, encoded bytes)`` of images 0 .. n-1 in order; an exception in place of
        the bytes of one that cannot be read."""
        for i in range(n):
            try:
                yield self.name(i), self.raw(i)
            except Exception as e:         # a file gone or unreadable, a vanished key
                yield self.name(i), e

    def readable(self, i: int) -> np.ndarray:
        """Image i, or where it cannot be decoded the next one that can (the same one
        every time, so runs stay reproducible), with a warning naming the skipped file."""
        for k in range(len(self)):
            try:
                return self[(i + k) % len(self)]
            except UnreadableImage as e:
                warnings.warn(f"data: skipping {e}; `blurfast prepare` leaves such images "
                              f"out once and for all", stacklevel=2)
        raise ValueError("data: not one image of the dataset can be decoded")

    def __getitems__(self, indices: Sequence[int]) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.readable(int(i)) for i in indices]))


def files_under(root) -> List[Path]:
    """Every file under the folder ``root``, recursively, symlinked folders followed as
    their links show them (a link to a folder it is in is not: a cycle), sorted by path.
    Folders that cannot be listed are passed over, as ``Path.rglob`` does."""
    found = []

    def walk(folder: Path, ancestors: frozenset) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for e in entries:
            try:
                is_dir, is_file = e.is_dir(), e.is_file()      # through a symlink too
            except OSError:
                continue
            if is_dir:
                real = os.path.realpath(e.path)
                if real not in ancestors:
                    walk(Path(e.path), ancestors | {real})
            elif is_file:
                found.append(Path(e.path))
    walk(Path(root), frozenset([os.path.realpath(root)]))
    return sorted(found)


def image_files(root) -> List[Path]:
    """The files of :func:`files_under` ``root`` whose suffix, in any letter case, is one of
    :data:`IMAGE_EXTENSIONS`."""
    return [p for p in files_under(root) if p.suffix.lower() in IMAGE_EXTENSIONS]


class ImageFolder(_Decoded):
    """All .jpg/.jpeg/.png/.webp/.bmp files under ``root`` (recursive, sorted paths)."""

    def __init__(self, root, resolution: int = 64, resize: str = DEFAULT_RESIZE,
                 channels: int = 3, *, arg: str = "root", match: Optional[str] = None):
        # arg: the argument its errors name (a caller's own, e.g. "data (--data)");
        # match: see _matching
        super().__init__(resolution, resize, channels)
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"{arg}: {str(root)!r} is not a directory")
        files = image_files(self.root)
        keep = set(_matching([p.relative_to(self.root).as_posix() for p in files], match))
        self.files = [p for p in files if p.relative_to(self.root).as_posix() in keep]
        if not self.files:
            raise ValueError(f"{arg}: no {'/'.join(IMAGE_EXTENSIONS)} files "
                             f"{_matched(match)}under {str(root)!r}{lmdb_hint(root)}")

    def __len__(self):
        return len(self.files)

    def raw(self, i):
        return self.files[i].read_bytes()

    def name(self, i):
        return str(self.files[i])


class ImageArrays(_Decoded):
    """uint8 (H, W, 1 or 3) images held in memory (a `blurfast sample` run's), read as a
    folder's files are (:func:`decode_array`) at ``resolution`` and ``channels`` (None:
    the first image's)."""

    def __init__(self, images, resolution: Optional[int] = None,
                 resize: str = DEFAULT_RESIZE, channels: Optional[int] = None):
        self.images = list(images)
        if not self.images:
            raise ValueError("images: expected at least one image, got none")
        h, _, c = self.images[0].shape
        super().__init__(resolution or h, resize, channels or c)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i: int) -> np.ndarray:
        return decode_array(self.images[i], self.resolution, self.resize, self.channels)

    def name(self, i):
        return f"image {i}"


def _matching(names: List[str], match: Optional[str]) -> List[str]:
    """``names`` (paths relative to a folder, or archive members) that the shell-style
    pattern ``match`` matches whole (``*`` crosses folders: ``train/*`` is everything under
    ``train/``); all of them for None."""
    import fnmatch
    return names if match is None else [n for n in names if fnmatch.fnmatchcase(n, match)]


def _matched(match: Optional[str]) -> str:
    return "" if match is None else f"matching {match!r} "


# Archives prepare reads: zip, and tar uncompressed or compressed as tarfile reads them.
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def is_archive(path) -> bool:
    p = Path(path)
    return p.is_file() and p.name.lower().endswith(ARCHIVE_SUFFIXES)


class ImageArchive:
    """The image files (:data:`IMAGE_EXTENSIONS`) of a zip or tar archive, in the
    archive's order, for :func:`prepare`. A compressed tar has no random access, so the
    images are read front to back (:meth:`items`): one pass to list them, one to read.
    A tar's hardlinks and symlinks read as the regular member they point to."""

    def __init__(self, path, *, arg: str = "src", match: Optional[str] = None):
        import lzma
        import tarfile
        import zipfile
        import zlib

        self.path = Path(path)
        self.zip = self.path.name.lower().endswith(".zip")
        try:
            if self.zip:
                with zipfile.ZipFile(self.path) as z:
                    names = [i.filename for i in z.infolist() if not i.is_dir()]
            else:
                with _open_tar(self.path) as t:
                    names, self._links, self._ahead = _tar_listing(t)
                    _check_tar_end(t)
            # a name stored twice is read once, as its first copy
            images = list(dict.fromkeys(
                m for m in names if Path(m).suffix.lower() in IMAGE_EXTENSIONS))
            # `tar -C DIR -cf A .` names members ./PATH: matched as PATH, as under DIR
            keep = set(_matching([m.removeprefix("./") for m in images], match))
            self.members = [m for m in images if m.removeprefix("./") in keep]
            if not self.zip:        # bytes read ahead for the links match left out
                targets = {self._links.get(m) for m in self.members}
                self._ahead = {k: v for k, v in self._ahead.items() if k in targets}
        except (OSError, EOFError, zipfile.BadZipFile, tarfile.TarError, zlib.error,
                lzma.LZMAError) as e:
            # tarfile's "not a bzip2 file" is also a truncated one: its cause says which
            why = "; ".join(f"{type(x).__name__}: {x}" for x in (e, e.__cause__) if x)
            raise ValueError(f"{arg}: {str(path)!r} cannot be read as a "
                             f"{'zip' if self.zip else 'tar'} archive ({why})") from None
        if not self.members:
            if any(Path(m).name == "data.mdb" for m in names):     # LSUN's zips hold lmdb
                raise ValueError(f"{arg}: the archive {str(path)!r} holds an lmdb database "
                                 f"(as LSUN distributes them); unpack it and give its "
                                 f"directory, the one with data.mdb")
            raise ValueError(f"{arg}: no {'/'.join(IMAGE_EXTENSIONS)} files "
                             f"{_matched(match)}in the archive {str(path)!r}")

    def __len__(self):
        return len(self.members)

    def items(self, n: int):
        """``(name, encoded bytes)`` of the first ``n`` images; an exception in place of
        the bytes of one that cannot be read. Names are ``ARCHIVE:MEMBER``."""
        import tarfile
        import zipfile

        want = self.members[:n]
        if self.zip:
            with zipfile.ZipFile(self.path) as z:
                first = {}                 # a name stored twice: its first copy (zipfile's
                for i in z.infolist():     # read(name) gives the last)
                    first.setdefault(i.filename, i)
                for m in want:
                    # by name where it is stored once: zipfile's errors then name the member
                    at = m if z.getinfo(m) is first[m] else first[m]
                    try:
                        yield f"{self.path}:{m}", z.read(at)
                    except Exception as e:   # a bad CRC, an encrypted member (RuntimeError)
                        yield f"{self.path}:{m}", e
            return
        links, cache = self._links, dict(self._ahead)
        # the links to come to each target: its bytes are kept until the last is read
        left = Counter(links[m] for m in want if isinstance(links.get(m), str))
        wanted = set(want)
        with _open_tar(self.path) as t:
            def read(info):
                try:
                    return t.extractfile(info).read()
                except (OSError, EOFError, tarfile.TarError) as e:
                    return e
            for info in t:
                if not wanted:
                    break
                key = posixpath.normpath(info.name)
                if info.isfile() and left[key] and key not in cache:
                    cache[key] = read(info)
                if info.name not in wanted or not (info.isfile() or info.islnk()
                                                   or info.issym()):
                    continue
                wanted.discard(info.name)
                target = links.get(info.name)
                if target is None:
                    data = cache[key] if key in cache else read(info)
                elif isinstance(target, str):
                    data = cache[target]
                    left[target] -= 1
                    if not left[target]:
                        del cache[target]
                else:                   # a LookupError: why the link has no target
                    data = target
                yield f"{self.path}:{info.name}", data


def _tar_listing(t):
    """The names of the regular and link members of the tar ``t``, read front to back;
    each link's target (the normalized name of a regular member, else a LookupError
    saying why there is none); and the bytes of the targets stored after a link to them,
    read as they pass (a compressed tar is not read back). A name stored twice is its
    first copy, and so is a target."""
    names, links, files, later, ahead = {}, {}, set(), set(), {}
    for m in t:
        if m.isfile():
            key = posixpath.normpath(m.name)
            if key in later and key not in files:
                ahead[key] = t.extractfile(m).read()
            files.add(key)
        elif not (m.islnk() or m.issym()):
            continue
        elif m.name not in names:
            # a hardlink names a member; a symlink, a path from its folder
            target = posixpath.normpath(m.linkname if m.islnk() else posixpath.join(
                posixpath.dirname(m.name), m.linkname))
            links[m.name] = target, m
            later.add(target)
        names.setdefault(m.name)
    for name, (target, m) in links.items():
        what = f"a {'hard' if m.islnk() else 'sym'}link to"
        if target in files:
            links[name] = target
        elif target == ".." or target.startswith(("/", "../")):
            links[name] = LookupError(f"{what} {m.linkname!r}, outside the archive")
        else:
            links[name] = LookupError(f"{what} {target!r}, not a regular file of the archive")
    return list(names), links, ahead


def _open_tar(path):
    """tarfile.open of the tar at ``path``, compressed or not whatever its name (a .tar.gz
    a browser unpacked is a plain tar); where none opens it, the error (one line) of the
    compression its name says, not tarfile's list of them all."""
    import tarfile
    try:
        return tarfile.open(path, "r:*")
    except tarfile.ReadError:
        name = path.name.lower()
        how = next((c for c, ends in (("gz", (".gz", ".tgz")), ("bz2", (".bz2", ".tbz2")),
                                      ("xz", (".xz", ".txz"))) if name.endswith(ends)), "")
        return tarfile.open(path, f"r:{how}")


def _check_tar_end(t) -> None:
    """tarfile.ReadError where the tar ``t``, listed, stopped at a damaged header rather
    than at its end (tarfile ends a listing there quietly); the rest of a compressed stream
    is read, which checks it."""
    import tarfile
    t.fileobj.seek(t.offset)
    if t.fileobj.read(tarfile.BLOCKSIZE).strip(b"\0"):
        raise tarfile.ReadError(f"a damaged header at byte {t.offset}, after "
                                f"{len(t.members)} members")
    while t.fileobj.read(1 << 20):
        pass


_LMDB_ENVS = {}      # (path, pid) -> read-only environment opened by that process


def _close_inherited_envs() -> None:
    """In a forked child: close the parent's environments so the child may open its
    own (lmdb refuses a second open of the same files in one process). They were
    opened with lock=False, so closing them touches no lock state shared with the
    parent."""
    for key in [k for k in _LMDB_ENVS if k[1] != os.getpid()]:
        _LMDB_ENVS.pop(key).close()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_envs)


def is_lmdb(path) -> bool:
    return (Path(path) / "data.mdb").is_file()


def lmdb_hint(path) -> str:
    """Where ``path`` is an lmdb database's data.mdb, or a folder of lmdb databases (LSUN's
    downloads unpacked side by side): a clause naming what to give instead; else ""."""
    p = Path(path)
    if p.name == "data.mdb" and p.is_file():
        return f"; it is an lmdb database's data file: give its folder {str(p.parent)!r}"
    try:
        found = sorted(str(d) for d in p.iterdir() if is_lmdb(d)) if p.is_dir() else []
    except OSError:
        found = []
    if not found:
        return ""
    more = f" and {len(found) - 2} more" if len(found) > 2 else ""
    return f"; it holds lmdb databases ({', '.join(map(repr, found[:2]))}{more}): give one"


class LSUNLmdb(_Decoded):
    """An LSUN database as distributed (``<category>_<split>_lmdb``: keys are image
    ids, values encoded images). The environment is opened per process, read-only."""

    def __init__(self, path, resolution: int = 64, resize: str = DEFAULT_RESIZE,
                 channels: int = 3, progress: bool = False, *, arg: str = "path"):
        # arg: the argument its errors name (a caller's own, e.g. "data (--data)")
        super().__init__(resolution, resize, channels)
        self.path = str(path)
        if not is_lmdb(path):
            raise ValueError(f"{arg}: {self.path!r} is not an lmdb database (no data.mdb)")
        import lmdb
        try:
            with self.env().begin() as txn:
                n = txn.stat()["entries"]
                keys = txn.cursor().iternext(keys=True, values=False)
                if progress:
                    from tqdm import tqdm
                    keys = tqdm(keys, total=n, desc="lmdb keys", unit="key")
                self.keys = list(keys)
        except lmdb.Error as e:
            raise ValueError(f"{arg}: {self.path!r} cannot be read as an lmdb database "
                             f"({type(e).__name__}: {e})") from None
        if not self.keys:
            raise ValueError(f"{arg}: the lmdb database {self.path!r} is empty")

    def env(self):
        # lmdb allows one open environment per path and process: share it.
        key = (os.path.realpath(self.path), os.getpid())
        if key not in _LMDB_ENVS:
            import lmdb
            _LMDB_ENVS[key] = lmdb.open(self.path, readonly=True, lock=False,
                                        readahead=False, meminit=False, max_readers=256)
        return _LMDB_ENVS[key]

    def __len__(self):
        return len(self.keys)

    def raw(self, i):
        with self.env().begin() as txn:
            v = txn.get(self.keys[i])
        if v is None:
            raise KeyError(f"key {self.keys[i]!r} vanished from {self.path}")
        return v

    def name(self, i):
        return f"{self.path}:{self.keys[i].decode(errors='replace')}"


def prepared_meta_path(path) -> Path:
    """Where :func:`prepare` records how it made the array at ``path``: ``OUT.npy.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


def _prepared_resize(path, shape) -> Optional[str]:
    """The resize mode :func:`prepare` recorded for the array at ``path`` of ``shape``;
    None where nothing is recorded (an array of an older blurfast, or of another program),
    or the record is unreadable or of another shape (not this array's)."""
    try:
        meta = json.loads(prepared_meta_path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("shape") != list(shape) \
            or meta.get("resize") not in RESIZE_MODES:
        return None
    return meta["resize"]


class PreparedArray(torch.utils.data.Dataset):
    """A ``.npy`` uint8 array (N, H, W, C) written by :func:`prepare`, memory-mapped
    (opened lazily in each process, so DataLoader workers share the page cache).
    ``resize``: the mode it was prepared with (:func:`prepared_meta_path`), None where
    that is not recorded."""

    def __init__(self, path, *, arg: str = "path"):
        # arg: the argument its errors name (a caller's own, e.g. "data (--data)")
        self.path = str(path)
        if lmdb_hint(path):
            raise ValueError(f"{arg}: {self.path!r} is no prepared .npy array{lmdb_hint(path)}")
        if Path(path).suffix.lower() in IMAGE_EXTENSIONS:
            raise ValueError(f"{arg}: {self.path!r} is one image; expected a prepared .npy "
                             f"array, an LSUN lmdb directory or a folder of images")
        try:
            a = np.load(self.path, mmap_mode="r")
        except (OSError, ValueError, EOFError) as e:      # EOFError: an empty file
            raise ValueError(f"{arg}: {self.path!r} is not a readable .npy array ({e})") from None
        if isinstance(a, np.lib.npyio.NpzFile):              # np.savez's, not np.save's
            a.close()
            raise ValueError(f"{arg}: {self.path!r} is an .npz archive; expected a prepared "
                             f".npy array, an LSUN lmdb directory or a folder of images")
        if a.dtype != np.uint8 or a.ndim != 4 or a.shape[1] != a.shape[2] \
                or a.shape[3] not in (1, 3) or a.shape[0] == 0:
            raise ValueError(f"{arg}: expected a non-empty uint8 array (N, R, R, 1 or 3), got "
                             f"{a.dtype} {a.shape} in {self.path!r}")
        self.length, self.resolution, _, self.channels = a.shape
        self.resize = _prepared_resize(path, a.shape)
        self._a, self._pid = a, os.getpid()

    def array(self) -> np.ndarray:
        if self._a is None or self._pid != os.getpid():
            self._a, self._pid = np.load(self.path, mmap_mode="r"), os.getpid()
        return self._a

    def __getstate__(self):
        return {**self.__dict__, "_a": None, "_pid": None}

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return np.asarray(self.array()[int(i)])

    def __getitems__(self, indices: Sequence[int]) -> torch.Tensor:
        idx = np.asarray(indices, dtype=np.int64)
        order = np.argsort(idx, kind="stable")     # read the file front to back
        out = np.empty((len(idx),) + self.array().shape[1:], dtype=np.uint8)
        out[order] = self.array()[idx[order]]
        return torch.from_numpy(out)


def open_dataset(path, resolution: Optional[int] = None, resize: str = DEFAULT_RESIZE,
                 channels: Optional[int] = 3, progress: bool = False, *,
                 arg: Optional[str] = None):
    """The dataset at ``path``: a ``.npy`` file from :func:`prepare`, an lmdb
    directory, or an image folder. For a prepared array ``resolution`` and
    ``channels`` must match the file (None: take the file's); folders and lmdb are
    decoded to ``channels`` (None: 3). ``arg``: the argument that errors about ``path``
    name (default: "data", and the dataset classes' own)."""
    p = Path(path)
    named = {} if arg is None else {"arg": arg}
    if not p.exists():
        raise ValueError(f"{arg or 'data'}: {str(path)!r} does not exist")
    if is_archive(p):
        raise ValueError(f"{arg or 'data'}: {str(path)!r} is an archive, which datasets do "
                         f"not read (no random access); decode it once with `blurfast "
                         f"prepare {path} OUT.npy --resolution R` and give OUT.npy")
    if p.is_file():
        ds = PreparedArray(p, **named)
        if resolution is not None and resolution != ds.resolution:
            raise ValueError(f"resolution: {resolution} differs from the prepared array's "
                             f"{ds.resolution} ({p}); give {ds.resolution}, or "
                             f"prepare it again at {resolution}")
        if channels is not None and channels != ds.channels:
            raise ValueError(f"channels: {channels} differs from the prepared array's "
                             f"{ds.channels} ({p})")
        return ds
    if resolution is None:
        raise ValueError("resolution: needed for an image folder or lmdb source")
    channels = 3 if channels is None else channels
    if is_lmdb(p):
        return LSUNLmdb(p, resolution, resize, channels, progress=progress, **named)
    return ImageFolder(p, resolution, resize, channels, **named)


def to_float(batch: torch.Tensor, flip: Optional[torch.Tensor] = None,
             pixel_range: str = "-1,1") -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) in channels_last layout, scaled to
    [-1, 1] or [0, 1]; images where ``flip`` (B,) bool is True are mirrored left-right.
    Shapes and dtypes are checked, no values (no host synchronization)."""
    _check_pixel_range(pixel_range)
    if not isinstance(batch, torch.Tensor) or batch.dtype != torch.uint8 or batch.dim() != 4:
        raise ValueError(f"batch: expected a uint8 tensor (B, H, W, C), got "
                         f"{getattr(batch, 'dtype', type(batch).__name__)} "
                         f"{tuple(getattr(batch, 'shape', ()))}")
    if flip is not None and (not isinstance(flip, torch.Tensor) or flip.dtype != torch.bool
                             or flip.shape != batch.shape[:1]):
        raise ValueError(f"flip: expected None or a bool tensor ({batch.shape[0]},), got "
                         f"{getattr(flip, 'dtype', type(flip).__name__)} "
                         f"{tuple(getattr(flip, 'shape', ()))}")
    x = batch.permute(0, 3, 1, 2).float()
    if flip is not None:
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x / 127.5 - 1 if pixel_range == "-1,1" else x / 255


def _check_pixel_range(pixel_range) -> None:
    if pixel_range not in PIXEL_RANGES:
        raise ValueError(f"pixel_range: expected one of {PIXEL_RANGES}, got {pixel_range!r}")


def data_range(pixel_range: str):
    """(lo, hi) of a run's pixel range: what :func:`blurfast.sampling.clip_x0` clamps to."""
    _check_pixel_range(pixel_range)
    return (0.0, 1.0) if pixel_range == "0,1" else (-1.0, 1.0)


def to_unit_range(x: torch.Tensor, pixel_range: str) -> torch.Tensor:
    """Images in a run's pixel range -> [-1, 1], where pictures are drawn."""
    _check_pixel_range(pixel_range)
    return x * 2 - 1 if pixel_range == "0,1" else x


# ---------------------------------------------------------------------------- prepare

class PrepareReport(dict):
    """What :func:`prepare` did: ``written``, ``skipped`` (count), ``bad`` (names and
    errors of the first unreadable images), ``shape``, ``path``."""


_worker_args = None       # (resolution, resize, channels) of prepare's decoding processes


class WorkerDied(BrokenProcessPool):
    """A decoding process of :func:`prepare` ended abruptly (killed: the OOM killer, a
    signal); the message says how, in one line."""


def _death(processes) -> str:
    """How one of the ended ``processes`` of a broken pool died: the pool sends SIGTERM to
    the others, so another exit code is the cause where there is one."""
    import time
    from multiprocessing.connection import wait
    # A process's sentinel is ready while it exits, a moment before its exit code is, and
    # the pool's thread may be reaping it at the same time (then our own look finds none
    # until that thread has stored it): the ended ones are waited for, a second at most.
    ended = set(wait([p.sentinel for p in processes], timeout=1.0)) if processes else set()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and any(
            p.sentinel in ended and p.exitcode is None for p in processes):
        time.sleep(0.01)
    codes = [p.exitcode for p in processes if p.exitcode]
    code = next((c for c in codes if c != -signal.SIGTERM), codes[0] if codes else None)
    if code is None:
        return "ended abruptly"
    if code > 0:
        return f"exited with code {code}"
    oom = ", SIGKILL: out of memory?" if code == -signal.SIGKILL else ""
    return f"killed by signal {-code}{oom}"


def _init_worker(args):
    global _worker_args
    _worker_args = args


def _init_pool_worker(args):
    """:func:`_init_worker` in a decoding process: Ctrl-C is prepare's process's to handle
    (it lets the workers finish what they run), and a SIGTERM ends a worker wherever it is
    (a Python handler inherited from the CLI may never run in one blocked on a lock)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_worker(args)


def _decode_item(item):
    """``(image, None)`` of a ``(name, encoded bytes)`` item, or ``(None, why)`` for an
    image that cannot be read (its bytes an exception, or undecodable)."""
    name, data = item
    if isinstance(data, BaseException):
        return None, f"{name}: {type(data).__name__}: {data}"
    try:
        return decode_named(name, data, *_worker_args), None
    except UnreadableImage as e:      # names the image already
        return None, str(e)
    except Exception as e:            # any unreadable image is skipped and reported
        return None, f"{name}: {type(e).__name__}: {e}"


def _decode_items(items) -> list:
    return [_decode_item(x) for x in items]


def _finished(future, workers: list):
    """The result of ``future``, waited for in steps of a second; BrokenProcessPool as
    soon as one of the pool's ``workers`` has ended. The pool itself notices a dead
    worker, but not one killed while it handed a result back: then its reader waits for
    the rest of the message for ever (Python 3.11), and so would this."""
    from concurrent.futures import TimeoutError as Waited
    while True:
        try:
            return future.result(timeout=1.0)
        except Waited:
            if any(p.exitcode is not None for p in workers):
                raise BrokenProcessPool("a decoding process ended") from None


def _decoded(items, pool, window: int, workers: Optional[list] = None):
    """``_decode_item`` of each item, in order; with a pool (a ProcessPoolExecutor),
    ``window`` items at a time in tasks of 16, the next window read while the workers
    decode the last (so at most two windows of encoded bytes are held, however large the
    source). ``workers``: a list that gets the pool's processes as tasks start them (the
    pool drops its own list when it breaks; their exit codes then say how one died)."""
    if pool is None:
        yield from map(_decode_item, items)
        return
    workers = [] if workers is None else workers
    pending = None
    while True:
        chunk = [x for _, x in zip(range(window), items)]
        job = [pool.submit(_decode_items, chunk[i:i + 16]) for i in range(0, len(chunk), 16)]
        # the pool's private list (without it, a cut message is noticed no sooner)
        workers.extend(p for p in (getattr(pool, "_processes", None) or {}).values()
                       if p not in workers)
        if pending is not None:
            for future in pending:
                yield from _finished(future, workers)
        if not job:
            return
        pending = job


def _npy_header(shape, length: Optional[int] = None) -> bytes:
    """The .npy (version 1.0) header of a uint8 C-order array of ``shape``, padded
    with spaces to ``length`` bytes when given."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
              "fortran_order": False, "shape": tuple(shape)})
    h = buf.getvalue()
    if length is None or length == len(h):
        return h
    if length < len(h):
        raise ValueError(f"length: the header needs {len(h)} bytes, got {length}")
    # magic (6) + version (2) + little-endian uint16 length (2) + dict, '\n'-terminated
    body = h[10:-1] + b" " * (length - len(h)) + b"\n"
    return h[:8] + struct.pack("<H", len(body)) + body


def _shrink_npy(path: Path, n_alloc: int, n: int, shape) -> None:
    """Keeps the first n of the n_alloc rows of the .npy at ``path``: a new header of
    the old length, then truncation."""
    old = len(_npy_header((n_alloc,) + shape))
    with open(path, "r+b") as f:
        f.write(_npy_header((n,) + shape, old))
        f.truncate(old + n * int(np.prod(shape)))


def _check_space(out: Path, n: int, shape) -> None:
    """ValueError naming ``out`` unless its filesystem has room for the .npy array of ``n``
    images of ``shape``: the header and the pixels (a memory-mapped write to a full disk
    would end the process with SIGBUS)."""
    import shutil
    need = len(_npy_header((n,) + shape)) + n * math.prod(shape)
    folder = out.absolute().parent
    while not folder.exists():            # atomic_path makes the missing folders
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if need > free:
        raise ValueError(f"out: {str(out)!r} needs {need} bytes ({n} images of "
                         f"{'x'.join(map(str, shape))}), and its filesystem has {free} bytes "
                         f"free")


def prepare(src, out, resolution: int = 64, resize: str = DEFAULT_RESIZE, channels: int = 3,
            workers: Optional[int] = None, progress: bool = True, max_reported: int = 20,
            limit: Optional[int] = None, overwrite: bool = False,
            match: Optional[str] = None) -> PrepareReport:
    """Decodes every image of ``src`` (image folder, LSUN lmdb, or a zip or tar archive of
    images, :data:`ARCHIVE_SUFFIXES`) into ``out``, a ``.npy`` uint8 array (N,
    resolution, resolution, channels), in source order (sorted paths in a folder, keys in
    an lmdb, the archive's order in an archive). This process reads the encoded images;
    ``workers`` processes decode them.

    Unreadable images are skipped and counted (never a crash); the names of the first
    ``max_reported`` are returned. The array is written to a temporary file of this run
    beside ``out`` (:func:`blurfast.fileio.atomic_path`) and renamed when complete.
    ``match``, a shell-style pattern, keeps the images of a folder or archive whose path
    (relative to the folder; the member's name, less a leading ``./``) it matches whole:
    ``"train/*"`` takes everything under ``train/``. ``limit`` keeps only the first ``limit``
    images. An existing ``out`` is an error unless ``overwrite``.
    """
    out = Path(out)
    if out.suffix != ".npy":
        raise ValueError(f"out: expected a path ending in .npy, got {str(out)!r}")
    check_bool("overwrite", overwrite)
    if out.is_dir():                 # overwrite replaces a file, never a folder
        raise ValueError(f"out: {str(out)!r} is a directory; give a file path ending in .npy")
    if out.exists() and not overwrite:
        raise ValueError(f"out: {str(out)!r} exists; pass overwrite=True (--overwrite) to "
                         f"replace it")
    check_writable("out", out)
    workers = check_int("workers", workers, 0, none_ok=True)
    limit = check_int("limit", limit, none_ok=True)
    resolution = check_int("resolution", resolution)
    max_reported = check_int("max_reported", max_reported, 0)
    check_resize(resize)
    if match is not None and not isinstance(match, str):
        raise TypeError(f"match: expected a pattern (str) or None, got {match!r}")
    p = Path(src)
    if match is not None and is_lmdb(p):
        raise ValueError("match: an lmdb database's keys are not paths; give match only "
                         "with an image folder or archive")
    if is_archive(p):
        if channels not in (1, 3):
            raise ValueError(f"channels: expected 1 or 3, got {channels!r}")
        source = ImageArchive(p, arg="src", match=match)
    elif not p.is_dir():
        raise ValueError(f"src: {str(src)!r} is neither a directory (image folder or lmdb) "
                         f"nor an archive ({', '.join(ARCHIVE_SUFFIXES)}){lmdb_hint(p)}")
    else:
        source = (LSUNLmdb(p, resolution, resize, channels, progress=progress, arg="src")
                  if is_lmdb(p) else ImageFolder(p, resolution, resize, channels, arg="src",
                                                 match=match))
    n_alloc = len(source) if limit is None else min(limit, len(source))
    shape = (resolution, resolution, channels)
    _check_space(out, n_alloc, shape)
    workers = min(8, os.cpu_count() or 1) if workers is None else workers
    bad: List[str] = []
    skipped = written = 0
    bar = None
    left = leftover_temporaries(out.parent) if out.parent.is_dir() else []
    for f in [f for f, name in left if name == out.name]:
        warnings.warn(f"prepare: {str(f)!r} is the unfinished array of a prepare of "
                      f"{str(out)!r} that was killed (or that runs now); remove it "
                      f"unless that one runs", stacklevel=2)
    # A temporary file of its own (two runs for one OUT write two), renamed when complete.
    with atomic_path(out) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                        shape=(n_alloc,) + shape)
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=n_alloc, desc=f"prepare {p.name}", unit="img")
        try:
            args = (resolution, resize, channels)
            if workers > 0:
                ctx = multiprocessing.get_context("fork" if sys.platform == "linux"
                                                  else "spawn")
                # not multiprocessing.Pool: its terminate() hangs where it kills a worker
                # holding a queue's lock, and a worker that dies loses its task (prepare
                # waited forever)
                pool = ProcessPoolExecutor(workers, mp_context=ctx,
                                           initializer=_init_pool_worker, initargs=(args,))
            else:
                _init_worker(args)
                pool = None
            started: list = []           # the pool's processes (as _decoded saw them)
            try:
                for a, err in _decoded(source.items(n_alloc), pool, 256 * workers, started):
                    if err is None:
                        arr[written] = a
                        written += 1
                    else:
                        skipped += 1
                        if len(bad) < max_reported:
                            bad.append(err)
                    if bar is not None:
                        bar.update(1)
                        if skipped:
                            bar.set_postfix(skipped=skipped, refresh=False)
            except BrokenProcessPool as e:      # a worker killed; its exit code, once joined
                how = _death(started)
                # A reader stuck on a cut message is freed when every write end of the result
                # pipe has closed: the other workers' (killed; every child, in case a worker
                # escaped the list) and this process's own.
                for proc in {*started, *multiprocessing.active_children()}:
                    proc.kill()
                writer = getattr(getattr(pool, "_result_queue", None), "_writer", None)
                if writer is not None:
                    writer.close()
                pool.shutdown()
                raise WorkerDied(f"a decoding process died ({how}); nothing was written") from e
            finally:
                if pool is not None:       # on Ctrl-C, after the tasks running (16 images each)
                    pool.shutdown(cancel_futures=True)
            if written == 0:
                raise ValueError(f"src: none of the {n_alloc} images of {str(src)!r} could be "
                                 f"read (first: {bad[0] if bad else '-'})")
            arr.flush()
            del arr
            if written < n_alloc:
                _shrink_npy(tmp, n_alloc, written, shape)
            # the old array's record goes before the new array takes its name
            prepared_meta_path(out).unlink(missing_ok=True)
        finally:
            if bar is not None:
                bar.close()
    write_text(prepared_meta_path(out), json.dumps(
        {"made_by": "blurfast prepare", "shape": [written, *shape], "resolution": resolution,
         "channels": channels, "resize": resize}, indent=1) + "\n")
    if skipped:
        first = f"; first: {bad[0]}" if bad else ""      # none kept with max_reported=0
        warnings.warn(f"prepare: skipped {skipped} unreadable image(s) of {n_alloc}{first}",
                      stacklevel=2)
    return PrepareReport(path=str(out), written=written, skipped=skipped, bad=bad,
                         shape=(written,) + shape)
