"""FID and KID: clean-fid's resizing and InceptionV3 features, our own loop, statistics
and cache.

Only clean-fid's torchvision-free parts are used (its PIL bicubic "clean" resizer and
the InceptionV3 TorchScript weights it downloads to ``/tmp/inception-2015-12-05.pt``),
so FID works offline once that file is present, and in environments without torchvision.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterable, Optional
from urllib.parse import urlparse

import numpy as np
import torch

from .checks import check_device, check_int, default_precision
from .data import DEFAULT_RESIZE, check_resize
from .fileio import check_writable, save_npz

__all__ = ["INCEPTION_FILE", "default_inception_path", "inception_extractor", "features",
           "statistics", "save_statistics", "frechet_distance", "gaussian_frechet_distance",
           "kernel_distance",
           "check_reference", "reference_statistics", "fid", "FidValue", "load_images",
           "sample_run"]

INCEPTION_FILE = "inception-2015-12-05.pt"


def default_inception_path() -> Path:
    """Where clean-fid keeps its InceptionV3 weights."""
    return Path(tempfile.gettempdir()) / INCEPTION_FILE


def _cleanfid():
    try:
        from cleanfid import downloads_helper, resize
    except ImportError as e:
        raise ImportError("FID needs clean-fid: pip install 'blurfast[fid]' && pip install "
                          "--no-deps clean-fid (--no-deps: its torchvision requirement would "
                          "replace your torch)") from e
    return downloads_helper, resize


def _reachable(url: str, timeout: float = 3.0) -> bool:
    host = urlparse(url).hostname
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def inception_extractor(path=None, device="cpu", download: bool = True) -> Callable:
    """clean-fid's InceptionV3 as ``f(x) -> (B, 2048)`` for float x (B,3,299,299) in [0, 255].

    ``path``: a weights file or a folder holding ``inception-2015-12-05.pt``; default
    clean-fid's own location. A missing file is downloaded (as clean-fid does) only when
    ``download`` is true and the network answers; otherwise this fails at once, naming
    the file and where to put it.
    """
    p = default_inception_path() if path is None else Path(path)
    if p.is_dir():
        p = p / INCEPTION_FILE
    if not p.is_file():
        helper, _ = _cleanfid()
        url = helper.inception_url
        if not (download and _reachable(url)):
            # a path given names the file already: the advice is another path, not a copy
            where = (f"copy it to {p} (clean-fid's place), or give inception (--inception) "
                     f"the path of a copy" if path is None else "give the path of a copy")
            raise FileNotFoundError(
                f"inception: InceptionV3 weights not found at {p}, and "
                f"{'no network access to download them' if download else 'download is off'}"
                f": they are clean-fid's {INCEPTION_FILE} (from {url}); {where} (the file, or "
                f"a folder holding it)")
        p.parent.mkdir(parents=True, exist_ok=True)
        folder = tempfile.mkdtemp(dir=p.parent)
        try:
            os.replace(helper.check_download_inception(fpath=folder), p)
        finally:                     # with the part of a download cut off
            shutil.rmtree(folder, ignore_errors=True)
    try:
        with warnings.catch_warnings():
            # clean-fid's weights exist only as TorchScript; newer torch deprecates loading it
            warnings.filterwarnings("ignore", message=".*torch.jit")
            net = torch.jit.load(str(p), map_location=device).eval()
    except Exception as e:           # torch raises several kinds for a bad file
        raise ValueError(f"inception: {p} cannot be loaded as clean-fid's TorchScript "
                         f"InceptionV3 ({type(e).__name__}: {e})") from None

    @torch.no_grad()
    def extract(x: torch.Tensor) -> torch.Tensor:
        # clean-fid's normalization for the 299x299 input, then the pooled features.
        return net.layers.forward((x - 128) / 128).reshape(x.shape[0], -1)

    extract.name = f"inception:{p.name}"
    return extract


def load_images(path, n: Optional[int] = None) -> Iterable[np.ndarray]:
    """Samples as uint8 (H, W, C) arrays: an .npz (key ``images`` or the first array,
    (N, H, W, C)) or a folder of image files (sorted by name). A ``blurfast sample``
    output (its folder, or the ``samples.npz`` in it) is read as its manifest says: the
    images that run made, none other; an unfinished run, or ``n`` above its count, is
    refused."""
    from .generate import NPZ_NAME, SHEET_NAME
    p = Path(path)
    run = sample_run(p)
    folder = p if p.is_dir() else p.parent
    files = None
    if run is not None:
        if not run["complete"]:
            raise _unfinished("samples", folder)
        if n is not None and n > run["n"]:
            raise ValueError(f"n (--n): expected at most {run['n']}, the images that "
                             f"`blurfast sample` made in {folder}; got {n}")
        if run["format"] == "npz":
            p = folder / NPZ_NAME
        else:
            files = [folder / f"{i:06d}.png" for i in range(run["n"])]
            missing = [f for f in files if not f.is_file()]
            if missing:
                raise ValueError(f"samples: {missing[0]} is missing ({len(missing)} of the "
                                 f"{run['n']} images that `blurfast sample` made in {folder})")
    if p.is_file() and p.suffix == ".npz":
        try:
            with np.load(p) as z:
                arr = z["images"] if "images" in z.files else z[z.files[0]]
        except Exception as e:       # a damaged or empty archive
            raise ValueError(f"samples: {p} is not a readable .npz of images "
                             f"({type(e).__name__}: {e})") from None
        if arr.ndim != 4 or arr.dtype != np.uint8 or arr.shape[3] not in (1, 3):
            raise ValueError(f"samples: expected uint8 (N, H, W, 1 or 3) in {p}, got "
                             f"{arr.dtype} {arr.shape}")
        return list(arr[:n])
    if p.is_dir():
        from PIL import Image
        from .data import eight_bit, image_files, opaque, upright
        if files is None:
            files = image_files(p)
            files = [f for f in files if f.name != SHEET_NAME]
        if not files:
            raise ValueError(f"samples: no images in {p}")

        def decoded():
            for f in files[:n]:
                try:
                    with Image.open(f) as im:     # grayscale kept as (H, W, 1)
                        gray = (im.mode in ("1", "L", "LA", "La", "I", "F")
                                or im.mode.startswith("I;16"))
                        im = opaque(eight_bit(upright(im)))
                        yield (np.asarray(im.convert("L"))[..., None] if gray
                               else np.asarray(im.convert("RGB")))
                except Exception as e:     # Pillow raises several kinds on bad data
                    warnings.warn(f"samples: skipping {f}: cannot be decoded "
                                  f"({type(e).__name__}: {e})", stacklevel=2)
        return decoded()
    raise ValueError(f"samples: expected a folder of images or an .npz file, got {str(path)!r}")


def features(images: Iterable[np.ndarray], extractor: Callable, batch_size: int = 64,
             device="cpu", total: Optional[int] = None, progress: bool = True,
             desc: str = "features", leave: bool = True) -> np.ndarray:
    """Features (N, D) float64 of uint8 (H, W, C) images, resized as clean-fid does;
    ``progress``: a bar over the images (``leave``: kept when done)."""
    from tqdm.auto import tqdm
    batch_size = check_int("batch_size", batch_size, 1)
    _, resize = _cleanfid()
    resizer = resize.build_resizer("clean")
    feats, batch = [], []

    def flush():
        x = torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(device)
        feats.append(extractor(x).double().cpu().numpy())
        batch.clear()

    for img in tqdm(images, total=total, desc=desc, unit="img", disable=not progress,
                    leave=leave):
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        if img.shape[2] == 1:
            img = np.repeat(img, 3, axis=2)
        batch.append(np.asarray(resizer(img), dtype=np.float32))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not feats:
        raise ValueError("images: none given")
    return np.concatenate(feats)


def statistics(feats: np.ndarray):
    """Mean and covariance of features (N, D) of N >= 2 images, float64."""
    feats = np.asarray(feats)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"feats: expected features (N, D) of N >= 2 images, got shape "
                         f"{feats.shape}")
    return feats.mean(0), np.cov(feats, rowvar=False)


def _sqrt_psd(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def _gaussians(args, names):
    """``args`` (mu1, cov1, mu2, cov2) as float64 tensors: finite, each mu (D,) and each
    cov (D, D), one D; else ValueError naming the first that is not (``names``)."""
    out = []
    for i, (a, name) in enumerate(zip(args, names)):
        try:
            t = torch.as_tensor(a, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):     # not numbers
            raise ValueError(f"{name}: expected an array of numbers, got "
                             f"{type(a).__name__}") from None
        if i == 0 and (t.dim() != 1 or len(t) == 0):
            raise ValueError(f"{name}: expected shape (D,), D >= 1, got {tuple(t.shape)}")
        d = len(out[0]) if out else len(t)
        want = (d,) if i % 2 == 0 else (d, d)
        if tuple(t.shape) != want:
            raise ValueError(f"{name}: expected shape {want} ({names[0]} has D = {d}), got "
                             f"{tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name}: expected finite values (statistics of N >= 2 samples: "
                             f"one sample has no covariance)")
        out.append(t)
    return out


def gaussian_frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^{1/2} S2 S1^{1/2})^{1/2})`` in float64 for
    finite mu (D,) and cov (D, D)."""
    return _frechet((mu1, cov1, mu2, cov2), ("mu1", "cov1", "mu2", "cov2"))


def _frechet(args, names) -> float:
    mu1, cov1, mu2, cov2 = _gaussians(args, names)
    s1h = _sqrt_psd(cov1)
    cross = torch.linalg.eigvalsh(s1h @ cov2 @ s1h).clamp(min=0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * cross)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between two Gaussians (the FID formula): finite mu (D,) and
    sigma (D, D), as :func:`statistics` gives."""
    return _frechet((mu1, sigma1, mu2, sigma2), ("mu1", "sigma1", "mu2", "sigma2"))


def _features_matrix(name: str, a) -> np.ndarray:
    """``a`` as an array of features (N, D), N >= 2, of finite numbers, in its own dtype
    (not copied: KID converts only its subsets to float64); else ValueError naming
    ``name``."""
    try:
        t = np.asarray(a)
    except (TypeError, ValueError, RuntimeError):
        t = None
    if t is None or t.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected an array of numbers, got {type(a).__name__}")
    if t.ndim != 2 or t.shape[0] < 2 or t.shape[1] < 1:
        raise ValueError(f"{name}: expected features (N, D) of N >= 2 images, got shape "
                         f"{tuple(t.shape)}")
    if t.dtype.kind == "f" and not np.isfinite(t).all():
        raise ValueError(f"{name}: expected finite values")
    return t


KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000


def kernel_distance(feats1, feats2, subsets: int = KID_SUBSETS,
                    subset_size: int = KID_SUBSET_SIZE,
                    seed: int = 0, device="cpu"):
    """KID (Binkowski et al., 2018): the unbiased estimate of the squared maximum mean
    discrepancy between two sets of features (N1, D) and (N2, D) under the kernel
    ``k(x, y) = (x.y / D + 1)^3``, on ``subsets`` pairs of random subsets of
    ``m = min(subset_size, N1, N2)`` images of each side (drawn without replacement,
    ``seed``). Returns (mean, standard deviation) over the subsets, float64. Unlike the
    FID it is unbiased in the image count, so it compares runs scored on few images."""
    x, y = _features_matrix("feats1", feats1), _features_matrix("feats2", feats2)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"feats2: expected D = {x.shape[1]} features as feats1, got "
                         f"{y.shape[1]}")
    subsets = check_int("subsets", subsets, 1)
    subset_size = check_int("subset_size", subset_size, 2)
    device = check_device("device", device)
    d, m = x.shape[1], min(subset_size, len(x), len(y))
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        # Each subset taken, then widened and moved: (N, D) float64 copies of 50000
        # InceptionV3 features of each side would take 1.6 GB for nothing.
        a, b = (torch.from_numpy(u[torch.randperm(len(u), generator=gen)[:m].numpy()]
                                 .astype(np.float64)).to(device) for u in (x, y))
        kxx, kyy, kxy = ((u @ v.T / d + 1) ** 3 for u, v in ((a, a), (b, b), (a, b)))
        within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum())
        values.append(within / (m * (m - 1)) - 2 * kxy.sum() / m ** 2)
    v = torch.stack(values).cpu()
    return float(v.mean()), float(v.std(correction=0))


def _cache_dir() -> Path:
    root = os.environ.get("BLURFAST_CACHE") or Path.home() / ".cache" / "blurfast"
    return Path(root) / "fid"


def save_statistics(path, mu, sigma, n: Optional[int] = None, features=None) -> None:
    """Writes (mu, sigma), and ``n`` the image count and ``features`` (N, D) when given
    (float32, for KID), as an .npz that ``--ref`` accepts (temp file + rename)."""
    extra = {} if n is None else {"n": np.array(n)}
    if features is not None:
        extra["features"] = np.asarray(features, dtype=np.float32)
    save_npz(path, mu=mu, sigma=sigma, **extra)


def _fingerprint(p: Path) -> str:
    """Size and modification time of a file, or of every file under a folder (a digest):
    the cached statistics of a reference are used only while this is unchanged."""
    if not p.is_dir():
        st = p.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    h = hashlib.sha1()
    from .data import files_under
    for f in files_under(p):       # linked folders too, as an ImageFolder of p reads them
        st = f.stat()
        h.update(f"{f.relative_to(p).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def sample_run(p) -> Optional[dict]:
    """The manifest (``generate.read_manifest``) of the `blurfast sample` output that
    ``p`` (a path) is: its folder, or the samples.npz its last run wrote; else None (also
    for a samples.npz beside a run that wrote PNGs). Readers of samples (fid,
    ``blurfast draw --data``) use it to read a run as its manifest says."""
    from .generate import NPZ_NAME, read_manifest
    p = Path(p)
    folder = p if p.is_dir() else p.parent if p.name == NPZ_NAME else None
    run = read_manifest(folder) if folder is not None else None
    if run is not None and p.is_file() and run["format"] != "npz":
        return None
    return run


def _unfinished(name: str, folder: Path) -> ValueError:
    """The error for an unfinished `blurfast sample` run in ``folder``, naming ``name``."""
    from .generate import MANIFEST_NAME
    return ValueError(f"{name}: {folder} holds an unfinished `blurfast sample` run (its "
                      f"{MANIFEST_NAME} says so): interrupted, or still running; finish it "
                      f"with `blurfast sample --resume` and the same flags")


def check_reference(ref, resolution: int, channels: Optional[int] = None,
                    name: str = "ref", kid: bool = False) -> None:
    """Fails now, naming the argument (``name``), where :func:`reference_statistics` would
    fail after the expensive work: a missing path, a folder without images, a prepared
    array of another size or channel count, or with ``kid`` a STATS .npz without
    features."""
    from .data import ImageFolder, is_lmdb
    p = Path(ref)
    if not p.exists():
        raise ValueError(f"{name}: {str(ref)!r} does not exist")
    run = sample_run(p)
    if kid and p.is_file() and p.suffix == ".npz" and run is None:
        if _read_statistics_named(p, name, features=True)[3] is None:
            raise ValueError(f"{name}: {p} holds statistics without features, and KID needs "
                             f"the reference's features: give its images (folder, lmdb or "
                             f"prepared array) or statistics saved with them (--save-stats "
                             f"with --kid)")
    if run is not None and not run["complete"]:
        raise _unfinished(name, p if p.is_dir() else p.parent)
    if p.is_dir() and not is_lmdb(p) and run is None:
        ImageFolder(p, arg=name)          # it holds images (LSUN's parent folder does not)
    if p.is_file() and p.suffix != ".npz":
        from .data import open_dataset
        try:
            open_dataset(p, resolution=resolution, channels=channels, arg=name)
        except ValueError as e:       # named already where it is about the path itself
            raise ValueError(str(e) if str(e).startswith(f"{name}: ")
                             else f"{name}: {e}") from None


def reference_statistics(ref, resolution: int, resize: str = DEFAULT_RESIZE,
                         n: Optional[int] = None, extractor: Optional[Callable] = None,
                         device="cpu", batch_size: int = 64, cache: bool = True,
                         progress: bool = True, channels: Optional[int] = None):
    """(mu, sigma) of a reference: a STATS .npz (keys mu, sigma), or a dataset that
    :func:`blurfast.data.open_dataset` reads (image folder, LSUN lmdb, prepared array),
    preprocessed as for training (``resolution``, ``resize``, ``channels``: None takes a
    prepared array's own and decodes folders and lmdb as RGB; grayscale images are
    repeated to the 3 channels of InceptionV3, as samples are). Computed once, then cached
    as .npz under ``$BLURFAST_CACHE/fid`` (default ``~/.cache/blurfast/fid``)."""
    device = check_device("device", device)
    return _reference_statistics(ref, resolution, resize, n, extractor, device, batch_size,
                                 cache, progress, channels)[:2]


def _read_statistics(p: Path, features: bool = False):
    """(mu, sigma, n or None, features or None) from a statistics .npz; ValueError naming
    ``p`` and what is wrong. The features are read (and checked) only when asked for:
    without KID they are not needed, and a file's other ``features`` must not fail it."""
    keys = ("mu", "sigma", "n") + (("features",) if features else ())
    try:
        with np.load(p) as z:
            stats = {k: z[k] for k in keys if k in z.files}
    except Exception as e:       # a damaged archive
        raise ValueError(f"{p} is not a readable .npz ({type(e).__name__}: {e})") from None
    if "mu" not in stats or "sigma" not in stats:
        raise ValueError(f"{p} is an .npz without 'mu' and 'sigma'")
    mu, sigma, n, feats = (stats.get(k) for k in ("mu", "sigma", "n", "features"))
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2 or not all(
            a.dtype.kind in "fiu" and np.isfinite(a).all() for a in (mu, sigma)):
        raise ValueError(f"{p} needs finite mu (D,) and sigma (D, D), got shapes "
                         f"{mu.shape} and {sigma.shape}")
    if n is not None and (n.shape != () or n.dtype.kind not in "iu"):
        raise ValueError(f"{p}: n is not an image count ({n.dtype} {n.shape})")
    if feats is not None and (feats.ndim != 2 or feats.shape[1] != mu.shape[0]
                              or (n is not None and len(feats) != n)
                              or feats.dtype.kind not in "fiu"
                              or not np.isfinite(feats).all()):
        raise ValueError(f"{p}: features are not finite (n, {mu.shape[0]}) numbers "
                         f"({feats.dtype} {feats.shape})")
    return mu, sigma, None if n is None else int(n), feats


def _read_statistics_named(p: Path, name: str, features: bool = False):
    """:func:`_read_statistics` with its errors prefixed by the argument's ``name``."""
    try:
        return _read_statistics(p, features)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def _extractor_key(extractor) -> Optional[str]:
    """What names a feature extractor in the statistics cache: its ``name`` (InceptionV3's
    extractor); for a function, its module, name and a hash of its source, so that the key
    is the same in every process and an edited function gets its own; None where there is
    no source to hash (its statistics are not cached)."""
    name = getattr(extractor, "name", None)
    if name is not None:
        return str(name)
    import inspect
    try:
        src = inspect.getsource(extractor)
    except (OSError, TypeError):
        return None
    return (f"{getattr(extractor, '__module__', '?')}."
            f"{getattr(extractor, '__qualname__', type(extractor).__qualname__)} "
            f"{hashlib.sha1(src.encode()).hexdigest()}")


def _reference_statistics(ref, resolution, resize, n, extractor, device, batch_size, cache,
                          progress, channels, want_features=False):
    """:func:`reference_statistics`, the count of images behind them (None where a STATS
    .npz does not record it) and, with ``want_features``, their features as float32 (else
    None)."""
    check_resize(resize)
    batch_size = check_int("batch_size", batch_size, 1)
    # Python ints: they go into the cache key's JSON
    resolution = check_int("resolution", resolution, none_ok=True)
    channels = check_int("channels", channels, 1, 3, none_ok=True)
    p = Path(ref)
    run = sample_run(p)
    if p.is_file() and p.suffix == ".npz" and run is None:
        if want_features:
            check_reference(p, resolution, name="ref", kid=True)
        return _read_statistics_named(p, "ref", features=want_features)
    from .data import UnreadableImage, open_dataset
    extractor = extractor or inception_extractor(device=device)
    if run is not None:
        # another `blurfast sample` run (two models compared): its images as its manifest
        # says, as the samples side reads them (not its contact sheet), at their own size
        count = run["n"] if n is None else min(n, run["n"])
        try:
            ds = load_images(p, count)
        except ValueError as e:
            raise ValueError(f"ref: {str(e).partition(': ')[2]}") from None
        ds_channels, resolution, resize = None, None, None
    else:
        ds = open_dataset(p, resolution=resolution, resize=resize, channels=channels)
        count = len(ds) if n is None else min(n, len(ds))
        ds_channels = ds.channels
    named = _extractor_key(extractor)
    cache = cache and named is not None
    key = json.dumps({"path": str(p.resolve()), "files": _fingerprint(p),
                      "resolution": resolution, "resize": resize, "channels": ds_channels,
                      "n": count, "features": named}, sort_keys=True)
    cached = _cache_dir() / (hashlib.sha1(key.encode()).hexdigest()[:20] + ".npz")
    if cache and cached.is_file():
        try:
            stats = _read_statistics(cached, features=want_features)
        except ValueError as e:
            cached.unlink(missing_ok=True)
            warnings.warn(f"fid: removed a damaged entry of the statistics cache, computing it "
                          f"again: {e}", stacklevel=3)
        else:
            if stats[3] is not None or not want_features:   # else computed again, with them
                return stats

    def imgs():
        if run is not None:
            yield from ds
            return
        for i in range(count):
            try:
                yield np.asarray(ds[i])
            except UnreadableImage as e:
                warnings.warn(f"ref: skipping {e}", stacklevel=3)
    feats = features(imgs(), extractor, batch_size, device, total=count, progress=progress,
                     desc="reference features")
    mu, sigma = statistics(feats)
    feats32 = feats.astype(np.float32) if want_features else None
    if cache:
        try:
            save_npz(cached, mu=mu, sigma=sigma, n=np.array(len(feats)), key=np.array(key),
                     **({} if feats32 is None else {"features": feats32}))
        except OSError as e:          # a read-only home, say: the statistics are still good
            warnings.warn(f"fid: the statistics cache cannot be written, so they are computed "
                          f"again next time ({e}); set BLURFAST_CACHE to a writable folder",
                          stacklevel=3)
    return mu, sigma, len(feats), feats32


class FidValue(float):
    """An FID (a float) with the image counts behind it: ``samples``, and ``ref`` (None
    for reference statistics that do not record theirs); ``channels``: the images';
    ``kid`` and ``kid_std``: the KID's mean and spread over its subsets (None unless
    asked for), ``kid_subset``: the images of each side in one subset."""
    samples: int
    ref: Optional[int]
    channels: int
    kid: Optional[float] = None
    kid_std: Optional[float] = None
    kid_subset: Optional[int] = None


def fid(samples, ref, n: Optional[int] = 10_000, resolution: Optional[int] = None,
        resize: str = DEFAULT_RESIZE, inception=None,
        feature_extractor: Optional[Callable] = None, device="cpu", batch_size: int = 64,
        cache: bool = True, progress: bool = True, channels: Optional[int] = None,
        save_stats=None, kid: bool = False) -> FidValue:
    """FID between generated ``samples`` (folder or .npz) and a reference (see
    :func:`reference_statistics`), on the first ``n`` images of each; a :class:`FidValue`
    (a float with the image counts). ``feature_extractor`` replaces InceptionV3 (a
    callable on float (B,3,299,299) in [0, 255]); ``resolution`` and ``channels`` default
    to the samples' own (a reference of other channels is refused, grayscale samples read
    a folder as grayscale); ``resolution``, ``resize`` and ``channels`` preprocess a
    reference dataset (see :func:`reference_statistics`); ``save_stats``: a path where the
    reference statistics (and image count) are also written, as :func:`save_statistics`;
    ``kid``: also the KID (:func:`kernel_distance` with its defaults, on the features as
    float32, as InceptionV3 gives them), which needs the reference's features (its images,
    or a STATS .npz saved with them: ``save_stats`` with ``kid`` writes them). The
    arguments, the reference path and the ``save_stats`` folder are checked before any
    features are computed. Warns when a side has no more images than features (2048 for
    InceptionV3): its covariance is then singular and the FID biased high."""
    n = check_int("n", n, 2, none_ok=True)
    batch_size = check_int("batch_size", batch_size, 1)
    resolution = check_int("resolution", resolution, none_ok=True)
    channels = check_int("channels", channels, 1, 3, none_ok=True)
    check_resize(resize)
    device = check_device("device", device)
    if save_stats is not None:
        check_writable("save_stats (--save-stats)", save_stats)
    extractor = feature_extractor or inception_extractor(inception, device=device)
    imgs = load_images(samples, n)
    imgs = iter(imgs)
    first = next(imgs, None)
    if first is None:
        raise ValueError(f"samples: no images in {samples}")
    res = resolution or int(first.shape[0])
    own = int(first.shape[2])          # the samples' channels, the reference's too
    if channels is None:
        channels = own
    elif channels != own:
        raise ValueError(f"channels: {channels} differs from the samples' {own} ({samples})")
    check_reference(ref, res, channels, kid=kid)

    def all_imgs():
        yield first
        yield from imgs
    feats = features(all_imgs(), extractor, batch_size, device, progress=progress,
                     desc="sample features")
    mu_s, sig_s = statistics(feats)
    mu_r, sig_r, n_ref, feats_r = _reference_statistics(
        ref, res, resize, n, extractor, device, batch_size, cache, progress, channels,
        want_features=kid)
    if mu_r.shape != mu_s.shape:
        raise ValueError(f"ref: statistics of {mu_r.shape[0]} features, samples give "
                         f"{mu_s.shape[0]}")
    dim = feats.shape[1]
    few = [f"{k} {side}" for k, side in ((len(feats), "samples"), (n_ref, "reference images"))
           if k is not None and k <= dim]
    if few:           # N images give a covariance of rank N - 1 at most
        warnings.warn(f"fid: {' and '.join(few)} for {dim} features: a covariance of no more "
                      f"images than features is singular and the FID biased high; use well "
                      f"over {dim} (10000 is usual)", stacklevel=2)
    value = FidValue(frechet_distance(mu_s, sig_s, mu_r, sig_r))
    value.samples, value.ref, value.channels = len(feats), n_ref, channels
    if kid:
        value.kid, value.kid_std = kernel_distance(feats.astype(np.float32), feats_r,
                                                   device=device)
        value.kid_subset = min(KID_SUBSET_SIZE, len(feats), len(feats_r))
    if save_stats is not None:
        save_statistics(save_stats, mu_r, sig_r, n_ref, feats_r)
    return value


class FidMonitor:
    """FID and KID of a model's samples during training: ``monitor(model, diff)`` gives a
    :class:`FidValue` (its ``kid`` too: at the few images a run scores, 1000 by default,
    the FID is biased high and the KID is not).

    ``n`` images from ``sampler`` with ``steps`` model calls (seed fixed, so successive
    values compare the weights only) against the reference statistics (and features) of
    ``ref``, computed once (``resolution``, ``resize``, ``channels``: the run's
    preprocessing); a STATS .npz without features gives the FID alone (``kid`` nan).
    ``feature_extractor`` replaces InceptionV3 (tests)."""

    def __init__(self, ref, *, resolution: int, resize: str, channels: int,
                 n: int = 1000, steps: int = 100, sampler: str = "ddim", batch: int = 64,
                 pixel_range: str = "-1,1", inception=None,
                 feature_extractor: Optional[Callable] = None, device="cpu"):
        n = check_int("fid_n", n, 2)
        self.ref, self.resolution, self.resize, self.n = ref, resolution, resize, n
        self.channels = channels
        check_reference(ref, resolution, channels, name="fid_ref")
        # KID too where the reference gives features (all but a STATS .npz without them)
        p = Path(ref)
        self.kid = not (p.is_file() and p.suffix == ".npz" and sample_run(p) is None
                        and _read_statistics_named(p, "fid_ref", features=True)[3] is None)
        self.steps, self.sampler, self.batch, self.device = steps, sampler, batch, device
        self.pixel_range = pixel_range
        self.extractor = feature_extractor or inception_extractor(inception, device=device)
        self._ref_stats = None

    def __call__(self, model, diff, progress: bool = False) -> FidValue:
        """The FID of ``model`` (eps) under ``diff``, with its KID (``.kid``, nan where
        ``self.kid`` is False); ``progress``: bars over the reference's features (the
        first call) and the samples (cleared when done)."""
        from .generate import sample_batches
        from .sampling import timesteps
        if self._ref_stats is None:
            self._ref_stats = _reference_statistics(
                self.ref, self.resolution, self.resize, self.n, self.extractor, self.device,
                64, True, progress, self.channels, want_features=self.kid)
        seq = timesteps(diff, min(self.steps, diff.num_steps - 1))
        batches = [(b0, min(self.n, b0 + self.batch)) for b0 in range(0, self.n, self.batch)]
        precision = default_precision(torch.device(self.device))
        imgs = (img for _, b in sample_batches(model, diff, batches, sampler=self.sampler,
                                               seq=seq, eta=0.0, seed=0, device=self.device,
                                               precision=precision,
                                               pixel_range=self.pixel_range) for img in b)
        feats = features(imgs, self.extractor, self.batch, self.device, total=self.n,
                         progress=progress, leave=False, desc=f"FID: sampling {self.n} images")
        mu_r, sigma_r, n_ref, feats_r = self._ref_stats
        value = FidValue(frechet_distance(*statistics(feats), mu_r, sigma_r))
        value.samples, value.ref, value.channels = len(feats), n_ref, self.channels
        value.kid, value.kid_std = (kernel_distance(feats.astype(np.float32), feats_r,
                                                    device=self.device)
                                    if self.kid else (math.nan, math.nan))
        return value
