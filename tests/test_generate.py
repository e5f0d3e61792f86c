"""The commands people run: train -> sample -> fid end to end, and sampling that gives the
same images on one process and on two gloo processes."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from blurfast import cli
from blurfast.generate import SHEET_NAME, generate
from bfutil import free_port
from train_helpers import TINY, made_photos

pytest.importorskip("cleanfid")


def mean_features(x: torch.Tensor) -> torch.Tensor:
    """Per-channel means (3 features): full-rank covariances from a handful of images, so
    that the test's own FID below (scipy's matrix square root) is well conditioned."""
    return x.mean(dim=(2, 3))


def folder_images(folder, n: int) -> list:
    """The first n images of a folder, uint8 (H, W, 3)."""
    files = sorted(f for f in folder.rglob("*")
                   if f.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"})[:n]
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def independent_features(imgs) -> np.ndarray:
    """mean_features of uint8 (H, W, 1 or 3) images, computed here: grayscale as Pillow
    converts it to RGB, clean-fid's resizer, numpy's float64 means."""
    from cleanfid.resize import build_resizer
    rs = build_resizer("clean")

    def rgb(i):
        return np.asarray(Image.fromarray(i[:, :, 0]).convert("RGB")) if i.shape[2] == 1 else i
    return np.stack([np.asarray(rs(rgb(i)), dtype=np.float64).mean(axis=(0, 1)) for i in imgs])


def independent_fid(samples, refs) -> float:
    """FID of mean_features between two lists of images (see independent_features), numpy
    statistics, scipy's sqrtm."""
    import scipy.linalg
    f1, f2 = independent_features(samples), independent_features(refs)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((f1.mean(0) - f2.mean(0)) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run trained for a few steps through the CLI, on images the test makes."""
    root = tmp_path_factory.mktemp("cli")
    data = made_photos(root / "photos", 24, size=16)
    out = root / "run"
    argv = ["train", "--data", str(data), "--out", str(out), "--preset", "small",
            "--resolution", "16", "--batch-size", "4", "--steps", "3", "--device", "cpu",
            "--num-steps", "40", "--save-every", "3", "--sample-every", "1000",
            "--sample-steps", "4", "--no-progress",
            # A model whose output matters: lr 1e-2 moves the zero-initialized output conv
            # away from zero in 3 steps, and with EMA decay 0 the EMA weights are the model's.
            "--lr", "1e-2", "--ema-decay", "0"]
    for k, v in TINY.items():
        argv += [f"--{k.replace('_', '-')}", *(map(str, v) if isinstance(v, tuple) else [str(v)])]
    assert cli.main(argv) == 0
    return root


def _read_pngs(folder, n):
    return np.stack([np.asarray(Image.open(folder / f"{i:06d}.png")) for i in range(n)])


def _zero_model_images(run_dir, out, monkeypatch, **kw):
    """The images of the same command with a model that predicts eps = 0: what a test
    compares against to show that the model's output reached the images."""
    from blurfast.models import UNet
    with monkeypatch.context() as m:
        m.setattr(UNet, "forward", lambda self, x, t: torch.zeros_like(x))
        generate(run_dir / "run", out=out, **kw)
    return _read_pngs(out, kw["n"]).astype(int)


def test_cli_train_sample_fid(run_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BLURFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    out = tmp_path / "samples"
    assert cli.main(["sample", "--ckpt", str(run_dir / "run"), "--n", "12", "--steps", "3",
                     "--batch", "5", "--seed", "3", "--out", str(out), "--no-progress"]) == 0
    imgs = _read_pngs(out, 12)
    assert imgs.shape == (12, 16, 16, 3) and imgs.std() > 0
    assert (out / SHEET_NAME).is_file()
    assert cli.main(["sample", "--ckpt", str(run_dir / "run"), "--n", "12", "--steps", "3",
                     "--batch", "4", "--seed", "3", "--format", "npz", "--out",
                     str(tmp_path / "npz"), "--no-progress"]) == 0
    with np.load(tmp_path / "npz" / "samples.npz") as z:
        # Other batch size, other format: the same images (noise is per image index).
        np.testing.assert_array_equal(z["images"], imgs)
    capsys.readouterr()
    assert cli.main(["fid", "--samples", str(out), "--ref", str(run_dir / "photos"),
                     "--n", "12", "--features", "test_generate:mean_features",
                     "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("FID ")
    assert float(line.split()[1]) == pytest.approx(
        independent_fid(imgs, folder_images(run_dir / "photos", 12)), rel=1e-4)


def _generate_in_two_gloo_processes(ckpt, out, kw, before: str = "") -> None:
    """generate(ckpt, out=out, **kw) as two ranks of a gloo process group; ``before``:
    code each rank runs first (its rank in ``rank``)."""
    script = textwrap.dedent("""
        import os, torch
        torch.set_num_threads(1)
        from blurfast.generate import generate
        rank = int(os.environ["RANK"])
    """) + textwrap.dedent(before) + textwrap.dedent(f"""
        generate({str(ckpt)!r}, out={str(out)!r}, **{kw!r})
    """)
    port = str(free_port())
    procs = []
    for r in range(2):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "WORLD_SIZE": "2", "RANK": str(r), "LOCAL_RANK": str(r)}
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env,
                                      cwd=os.path.dirname(__file__),   # not the source tree
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        log, _ = p.communicate(timeout=300)
        assert p.returncode == 0, log


def test_two_gloo_processes_give_the_same_images(run_dir, tmp_path):
    kw = dict(n=7, steps=3, batch=2, seed=11, sampler="ancestral", progress=False, device="cpu")
    # One thread, as each rank has: the CPU convolutions' last bits may depend on the
    # thread count, and a pixel then on which side of a rounding boundary it falls.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate(run_dir / "run", out=tmp_path / "one", **kw)
    finally:
        torch.set_num_threads(threads)
    _generate_in_two_gloo_processes(run_dir / "run", tmp_path / "two", kw)
    np.testing.assert_array_equal(_read_pngs(tmp_path / "two", 7), _read_pngs(tmp_path / "one", 7))
    assert (tmp_path / "two" / SHEET_NAME).is_file()


def test_two_gloo_processes_sample_the_checkpoint_rank_0_found(run_dir, tmp_path):
    # A run that saves while the ranks start: rank 0 found step 3 as the run's newest
    # checkpoint, rank 1 (later) step 5. Both sample step 3's weights, as one process
    # given step 3 does, and the manifest names it.
    import json
    import shutil
    run = tmp_path / "run"
    shutil.copytree(run_dir / "run", run)
    assert cli.main(["train", "--out", str(run), "--resume", "auto", "--steps", "5",
                     "--save-every", "5", "--sample-count", "1", "--no-progress"]) == 0
    step3 = run / "checkpoints" / "step_000000003"
    kw = dict(n=4, steps=2, batch=1, seed=5, progress=False, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate(step3, out=tmp_path / "one", **kw)
        generate(run, out=tmp_path / "newest", **kw)
    finally:
        torch.set_num_threads(threads)
    want = _read_pngs(tmp_path / "one", 4)
    assert (want != _read_pngs(tmp_path / "newest", 4)).any()     # the two steps differ
    _generate_in_two_gloo_processes(run, tmp_path / "two", kw, before=f"""
        import blurfast.generate as G
        from pathlib import Path
        if rank == 0:
            G.resolve_checkpoint = lambda p: Path({str(step3)!r})
    """)
    np.testing.assert_array_equal(_read_pngs(tmp_path / "two", 4), want)
    manifest = json.loads((tmp_path / "two" / "samples.json").read_text())
    assert manifest["checkpoint"] == str(step3.resolve())


def test_an_npz_run_merges_only_its_own_chunks(run_dir, tmp_path):
    # A crashed run left a chunk of image 1 (zeros here); a run that does not resume
    # removes it at its start, so its merge does not lay it over its own images 0-1.
    kw = dict(n=2, steps=2, batch=2, seed=3, fmt="npz", progress=False, device="cpu")
    generate(run_dir / "run", out=tmp_path / "one", **kw)
    out = tmp_path / "two"
    out.mkdir()
    np.save(out / ".chunk-000001-000002.npy", np.zeros((1, 16, 16, 3), np.uint8))
    generate(run_dir / "run", out=out, **kw)
    with np.load(out / "samples.npz") as two, np.load(tmp_path / "one" / "samples.npz") as one:
        np.testing.assert_array_equal(two["images"], one["images"])
    assert not list(out.glob(".chunk-*"))


def test_compiled_model_gives_the_same_images(run_dir, tmp_path, monkeypatch):
    # Batches of 3 and 2: two compilations (one per shape). Inductor's CPU code may round
    # differently from eager, so a pixel may move by one level, no more.
    kw = dict(n=5, steps=3, batch=3, seed=5, sampler="ddim", progress=False, device="cpu")
    generate(run_dir / "run", out=tmp_path / "eager", **kw)
    generate(run_dir / "run", out=tmp_path / "compiled", compile=True, **kw)
    eager = _read_pngs(tmp_path / "eager", 5).astype(int)
    compiled = _read_pngs(tmp_path / "compiled", 5).astype(int)
    assert np.abs(compiled - eager).max() <= 1
    assert (compiled != eager).mean() < 0.01
    zero = _zero_model_images(run_dir, tmp_path / "zero", monkeypatch, **kw)
    assert np.abs(eager - zero).mean() > 5          # the model's output is in the images


def test_compile_that_cannot_run_is_refused(run_dir, tmp_path, monkeypatch):
    from blurfast import generate as G
    monkeypatch.setattr(G, "compile_problem", lambda dev: "no triton here")
    with pytest.raises(ValueError, match=r"^compile \(--compile\): no triton here$"):
        generate(run_dir / "run", out=tmp_path / "c", n=2, steps=2, batch=2, compile=True,
                 progress=False, device="cpu")
    assert not list((tmp_path / "c").glob("*.png"))


def test_a_std_model_is_sampled_through_its_eps(run_dir, tmp_path, monkeypatch):
    # A run trained on target "std" predicts idct2(sqrt(1 - Abar) eb); generate must turn
    # that into eps before a sampler sees it. The same function f, as the eps prediction of
    # the eps run and as the std prediction of a std run with the same process: the same
    # images.
    from blurfast import training
    from blurfast.diffusion import BlurDiffusion
    from blurfast.models import UNet
    training.train(data=str(run_dir / "photos"), out=str(tmp_path / "std"), preset="small",
                   resolution=16, model=TINY, diffusion=dict(num_steps=40), target="std",
                   batch_size=4, steps=1, device="cpu", save_every=1, sample_every=100,
                   sample_steps=2, progress=False)
    diff = BlurDiffusion(resolution=16, num_steps=40)

    def f(x, t):
        return 0.3 * x + 0.1

    kw = dict(n=3, steps=4, seed=2, sampler="ddim", fmt="npz", device="cpu", progress=False)
    monkeypatch.setattr(UNet, "forward", lambda self, x, t: f(x, t))
    generate(run_dir / "run", out=tmp_path / "as_eps", **kw)
    monkeypatch.setattr(UNet, "forward", lambda self, x, t: diff.eps_to_std(f(x, t), t))
    generate(tmp_path / "std", out=tmp_path / "as_std", **kw)
    a, b = (np.load(tmp_path / d / "samples.npz")["images"].astype(int)
            for d in ("as_eps", "as_std"))
    assert np.abs(a - b).max() <= 1


def test_a_smaller_run_into_the_same_folder_removes_the_stale_samples(run_dir, tmp_path):
    kw = dict(steps=2, seed=1, progress=False, device="cpu")
    generate(run_dir / "run", 4, tmp_path, **kw)
    (tmp_path / "notes.png").write_bytes(b"kept")
    with pytest.warns(UserWarning, match="removed 4 samples that an earlier run left"):
        generate(run_dir / "run", 2, tmp_path, **kw)
    assert sorted(p.name for p in tmp_path.glob("*.png")) == \
        ["000000.png", "000001.png", SHEET_NAME, "notes.png"]


def test_a_run_of_the_other_format_removes_the_earlier_runs_samples(run_dir, tmp_path):
    # A png run over an npz run left samples.npz, which `fid --samples DIR/samples.npz`
    # then scored as a plain npz; an npz run over a png run left the PNGs.
    from blurfast import evaluation as ev
    kw = dict(steps=2, seed=1, progress=False, device="cpu")
    generate(run_dir / "run", 3, tmp_path, fmt="npz", **kw)
    with pytest.warns(UserWarning, match=r"^out: removed samples.npz that an earlier run left"):
        generate(run_dir / "run", 2, tmp_path, **kw)
    assert not (tmp_path / "samples.npz").exists()
    with pytest.raises(ValueError, match="samples.npz"):
        list(ev.load_images(tmp_path / "samples.npz"))
    with pytest.warns(UserWarning, match=r"^out: removed 2 PNG samples that an earlier run"):
        generate(run_dir / "run", 3, tmp_path, fmt="npz", **kw)
    assert sorted(p.name for p in tmp_path.iterdir()) == [SHEET_NAME, "samples.json",
                                                           "samples.npz"]


def test_a_sample_folder_is_complete_only_with_its_manifest(run_dir, tmp_path, monkeypatch,
                                                             capsys):
    # An interrupted run over an older one of as many images left new images 0-1 beside
    # the old 2-5: fid scored that mix as a complete set. The run now removes the old
    # images at its start, and fid refuses the unfinished folder; a finished run is
    # scored on its own images only, and more is an error naming --n.
    from blurfast import evaluation as ev
    from blurfast.models import UNet
    monkeypatch.setenv("BLURFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    out, photos = tmp_path / "s", run_dir / "photos"
    kw = dict(steps=2, batch=2, progress=False, device="cpu")
    generate(run_dir / "run", 6, out, seed=1, **kw)
    real, calls = UNet.forward, []

    def interrupted(self, x, t):
        calls.append(1)
        if len(calls) > 2:                     # in the second batch (2 calls a batch)
            raise KeyboardInterrupt
        return real(self, x, t)
    with monkeypatch.context() as m:
        m.setattr(UNet, "forward", interrupted)
        with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning, match="removed 6"):
            generate(run_dir / "run", 6, out, seed=2, **kw)
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{i:06d}.png" for i in range(2)]
    fid_kw = dict(feature_extractor=mean_features, progress=False)
    with pytest.raises(ValueError, match=r"^samples: .*s holds an unfinished `blurfast sample` "
                                         r"run \(its samples.json says so\)"):
        ev.fid(out, photos, n=6, **fid_kw)
    # Finished, with 4 images: --n 6 is refused in one line; the run's 4 images are scored,
    # not an image of the user's beside them.
    with pytest.warns(UserWarning, match="removed 2 samples that an earlier run left"):
        generate(run_dir / "run", 4, out, seed=2, **kw)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(out / "notes.png")
    fid = ["fid", "--samples", str(out), "--ref", str(photos), "--features",
           "test_generate:mean_features", "--device", "cpu"]
    capsys.readouterr()
    assert cli.main(fid + ["--n", "6"]) == 2
    assert capsys.readouterr().err == (f"blurfast fid: error: n (--n): expected at most 4, the "
                                       f"images that `blurfast sample` made in {out}; got 6\n")
    want = independent_fid(_read_pngs(out, 4), folder_images(photos, 24))
    assert ev.fid(out, photos, n=None, **fid_kw) == pytest.approx(want, rel=1e-4)
    # A plain folder of the same images reads as before: every image, --n above them
    # allowed, a samples.json of its own no manifest.
    plain = tmp_path / "plain"
    plain.mkdir()
    for i, img in enumerate(_read_pngs(out, 4)):
        Image.fromarray(img).save(plain / f"{i}.png")
    (plain / "samples.json").write_text('{"labels": [1, 2]}')
    assert ev.fid(plain, photos, n=100, **fid_kw) == ev.fid(out, photos, n=None, **fid_kw)
    # An npz run: its folder reads as its samples.npz.
    generate(run_dir / "run", 4, tmp_path / "z", seed=2, fmt="npz", **kw)
    from_png = ev.fid(out, photos, n=4, **fid_kw)
    assert ev.fid(tmp_path / "z", photos, n=4, **fid_kw) == from_png
    assert ev.fid(tmp_path / "z" / "samples.npz", photos, n=4, **fid_kw) == from_png
    with pytest.raises(ValueError, match=r"^n \(--n\): expected at most 4"):
        ev.fid(tmp_path / "z" / "samples.npz", photos, n=5, **fid_kw)


def test_cli_reports_file_system_errors_in_one_line(run_dir, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    assert cli.main(["sample", "--ckpt", str(run_dir / "run"), "--n", "1", "--steps", "1",
                     "--out", str(tmp_path / "a_file"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("blurfast sample: error:") and "a_file" in err[0]


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16),
                                              ("fp16", torch.float16)])
def test_bf16_and_fp16_on_the_cpu_are_what_they_say(run_dir, tmp_path, monkeypatch, precision,
                                                    dtype):
    # --precision bf16 (fp16) on a CPU runs the model under CPU autocast to that dtype (it
    # ran under CUDA's, which a CPU ignores with a warning), its convolution weights cast
    # once: the model sees bf16 (fp16) convolutions.
    import warnings
    kw = dict(n=2, steps=2, seed=4, fmt="npz", device="cpu", progress=False)
    seen = []
    import blurfast.models as M
    real = M.UNet.forward

    def spy(self, x, t):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
                     self.input.weight.dtype))
        return real(self, x, t)
    monkeypatch.setattr(M.UNet, "forward", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(run_dir / "run", out=tmp_path / precision, precision=precision, **kw)
    assert seen and set(seen) == {(True, dtype, dtype)}
    generate(run_dir / "run", out=tmp_path / "fp32", precision="fp32", **kw)
    assert seen[-1][0] is False
    a, b = (np.load(tmp_path / d / "samples.npz")["images"].astype(int)
            for d in (precision, "fp32"))
    assert np.abs(a - b).mean() < 8        # rounding, not another image


def test_bf16_sampling_casts_the_weights_once_with_autocasts_numbers(run_dir, tmp_path,
                                                                     monkeypatch):
    # generate() casts the convolution and linear weights to bf16 once (norms stay
    # float32) instead of letting autocast cast them at every model call: the same
    # images, byte for byte, as with autocast's own casts.
    import blurfast.generate as G
    import blurfast.models as M
    kw = dict(n=3, steps=3, seed=6, fmt="npz", device="cpu", precision="bf16", progress=False)
    dtypes = []
    real = M.UNet.forward

    def spy(self, x, t):
        dtypes.append((self.input.weight.dtype, self.out[0].weight.dtype))
        return real(self, x, t)
    monkeypatch.setattr(M.UNet, "forward", spy)
    generate(run_dir / "run", out=tmp_path / "once", **kw)
    assert set(dtypes) == {(torch.bfloat16, torch.float32)}     # conv cast, GroupNorm not
    monkeypatch.setattr(G, "cast_for_autocast_", lambda model, dtype=None: model)
    generate(run_dir / "run", out=tmp_path / "per_call", **kw)
    assert dtypes[-1] == (torch.float32, torch.float32)
    a, b = (np.load(tmp_path / d / "samples.npz")["images"] for d in ("once", "per_call"))
    np.testing.assert_array_equal(a, b)


def test_cast_for_autocast_keeps_autocasts_forward_bits():
    from blurfast.models import UNet, cast_for_autocast_
    torch.manual_seed(0)
    model = UNet(resolution=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=1)
    for p in model.parameters():                       # the zero-initialized convs too
        torch.nn.init.normal_(p, std=0.05)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([3, 700])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want = model(x, t)
        got = cast_for_autocast_(model)(x, t)
    assert torch.equal(got, want)
    kinds = {type(m).__name__: {p.dtype for p in m.parameters(recurse=False)}
             for m in model.modules() if list(m.parameters(recurse=False))}
    assert kinds == {"Conv2d": {torch.bfloat16}, "Linear": {torch.bfloat16},
                     "GroupNorm": {torch.float32}}


def test_sample_rejects_bad_arguments(run_dir, tmp_path):
    with pytest.raises(ValueError, match="n:"):
        generate(run_dir / "run", 0, tmp_path)
    with pytest.raises(ValueError, match="sampler:"):
        generate(run_dir / "run", 2, tmp_path, sampler="euler")
    with pytest.raises(ValueError, match="ckpt:"):
        generate(tmp_path / "missing", 2, tmp_path)
    (tmp_path / "a.npy").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^out \(--out\): '.*a\.npy' is a file; expected a "
                                         r"folder"):
        generate(run_dir / "run", 2, tmp_path / "a.npy")


def test_eta_and_the_switches_are_checked_before_the_checkpoint_is_read(tmp_path, capsys):
    # An eta out of [0, 1] failed inside the sampler, after the checkpoint was loaded and
    # --out made, naming eta, not --eta; a string for a bool was taken as true.
    missing = tmp_path / "no_run"
    for eta in (1.5, float("nan"), [0.5, 2.0]):
        with pytest.raises(ValueError, match=r"^eta: expected a number in \[0, 1\]"):
            generate(missing, 2, tmp_path / "o", eta=eta)
    for name in ("ema", "clip", "cuda_graph", "compile", "progress"):
        with pytest.raises(TypeError, match=f"^{name}: expected a bool, got 'x'"):
            generate(missing, 2, tmp_path / "o", **{name: "x"})
    for value in ("1.5", "nan"):
        assert cli.main(["sample", "--ckpt", str(missing), "--out", str(tmp_path / "o"),
                         "--eta", value]) == 2
        assert capsys.readouterr().err == (f"blurfast sample: error: --eta: expected a number "
                                           f"in [0, 1], got {float(value)}\n")
    assert not (tmp_path / "o").exists()


def test_steps_out_of_range_is_refused_naming_the_runs_range_with_0(run_dir, tmp_path, capsys):
    # The message said "expected an int in [1, 39]" (timesteps' own check), hiding that
    # 0, the full chain, is accepted too.
    for steps in ("-1", "40"):
        assert cli.main(["sample", "--ckpt", str(run_dir / "run"), "--n", "2", "--steps",
                         steps, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
        assert capsys.readouterr().err == (
            f"blurfast sample: error: --steps: expected an int in [0, 39] for this run's "
            f"N = 40 (0 = the full chain), got {steps}\n")
    assert not (tmp_path / "o").exists()


def _two_sampled_images(run, out, *flags):
    """The two images (seed 3, npz, CPU) that `blurfast sample` with ``flags`` writes."""
    assert cli.main(["sample", "--ckpt", str(run), "--n", "2", "--format", "npz", "--seed",
                     "3", "--device", "cpu", "--out", str(out), "--no-progress", *flags]) == 0
    with np.load(out / "samples.npz") as z:
        return z["images"]


def test_sample_defaults_to_100_steps_or_the_full_chain_of_a_shorter_run(run_dir, tmp_path,
                                                                         monkeypatch):
    # The default --steps 100 was refused on this run (N = 40); it is now the full chain of
    # N-1 = 39 calls, the images of --steps 39.
    def images(name, *flags):
        return _two_sampled_images(run_dir / "run", tmp_path / name, *flags)
    np.testing.assert_array_equal(images("default"), images("explicit", "--steps", "39"))
    # A run of N = 101 or more: 100 calls.
    import blurfast.checkpoint
    import blurfast.generate
    asked = []
    monkeypatch.setattr(blurfast.generate, "generate", lambda *a, **k: asked.append(k["steps"]))
    for n, want in ((101, 100), (100, 99), (1000, 100)):
        monkeypatch.setattr(blurfast.checkpoint, "stored_config",
                            lambda path, n=n: {"diffusion": {"num_steps": n}})
        assert cli.main(["sample", "--ckpt", str(run_dir / "run"), "--n", "2", "--out",
                         str(tmp_path / "o"), "--no-progress"]) == 0
        assert asked.pop() == want, n


def test_stochastic_first_with_the_full_chain_takes_its_fraction_of_n_minus_1_calls(
        run_dir, tmp_path):
    # --steps 0 --stochastic-first was refused ("needs --steps > 0"); the full chain is
    # the N-1 = 39 calls 39..1, which --steps 39 (uniform spacing) names explicitly.
    def images(name, *flags):
        return _two_sampled_images(run_dir / "run", tmp_path / name, *flags)
    full = images("full", "--steps", "0", "--stochastic-first", "0.5")
    np.testing.assert_array_equal(full, images("explicit", "--steps", "39",
                                               "--stochastic-first", "0.5"))
    assert (full != images("ode", "--steps", "0")).any()       # the etas reached the chain


def test_a_seed_the_noise_cannot_take_is_refused_before_the_folder_is_touched(run_dir, tmp_path,
                                                                             capsys):
    # --seed 2**63 passed generate's check (an int >= 0) and failed in the first batch's
    # noise draw, after the start had removed the earlier run's images from --out.
    out = tmp_path / "s"
    generate(run_dir / "run", 2, out, steps=2, seed=1, progress=False, device="cpu")
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    assert cli.main(["sample", "--ckpt", str(run_dir / "run"), "--n", "2", "--steps", "2",
                     "--seed", str(2 ** 63), "--out", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err == (f"blurfast sample: error: --seed: expected an int in "
                                       f"[0, {2 ** 63 - 1}], got {2 ** 63}\n")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


def test_the_bar_moves_with_every_model_call(run_dir, tmp_path, monkeypatch):
    # The full chain (--steps 0) on a CPU: the bar counted finished batches, so it sat at 0
    # through the whole first batch. It now ticks once a model call, images in the postfix.
    import tqdm.auto
    from blurfast.models import UNet
    bars, seen = [], []

    class Bar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(self)
    real = UNet.forward

    def spy(self, x, t):
        seen.append(bars[0].n)                  # generate's bar, made before the first batch
        return real(self, x, t)
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    monkeypatch.setattr(UNet, "forward", spy)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)      # the bar: on a terminal only
    generate(run_dir / "run", 3, tmp_path, steps=None, batch=2, fmt="npz", device="cpu")
    assert seen == list(range(2 * 39))          # 2 batches of N - 1 = 39 model calls
    assert bars[0].n == bars[0].total == 2 * 39
    assert "images=3/3" in str(bars[0].postfix)


def test_sample_and_fid_flags_are_documented_as_help_gives_them():
    # docs/training.md has a table for each command: every flag of its --help, with the
    # default --help shows.
    import re
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    parser = cli.build_parser()
    for cmd in ("sample", "fid"):
        section = doc[doc.index(f"### `blurfast {cmd}`"):]
        section = section[:re.search(r"\n#{2,3} ", section).start()]     # to the next heading
        rows = {}
        for line in section.splitlines():
            if line.startswith("| `-"):
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                for flag in re.findall(r"`(--[a-z0-9-]+)", cells[0]):
                    rows[flag] = cells[1].replace("`", "")
        actions = [a for a in parser.commands[cmd]._actions if a.dest != "help"]
        assert set(rows) == {f for a in actions for f in a.option_strings}, cmd
        for a in actions:
            if a.default not in (None, False):
                got = rows[a.option_strings[0]]
                assert got == str(a.default) or float(got) == a.default, (cmd, a.dest, got)


def test_training_fid_every_keeps_the_best(run_dir, tmp_path, monkeypatch):
    from blurfast import checkpoint, evaluation, training
    monkeypatch.setenv("BLURFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(evaluation, "inception_extractor",
                        lambda path=None, device="cpu", download=True: mean_features)
    out = tmp_path / "run"
    training.train(data=str(run_dir / "photos"), out=str(out), preset="small", resolution=16,
                   model=TINY, diffusion=dict(num_steps=40), batch_size=4, steps=4,
                   device="cpu", save_every=100, sample_every=100, sample_steps=2,
                   fid_every=2, fid_ref=str(run_dir / "photos"), fid_n=6, fid_steps=2,
                   progress=False)
    rows = [r.split(",") for r in (out / "fid.csv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == [2, 4]
    values = [float(r[1]) for r in rows]
    best = checkpoint.list_checkpoints(out / "best")
    assert len(best) == 1 and best[0][0] == [2, 4][values.index(min(values))]
    # The logged value of the best step, recomputed from its checkpoint: the same 6 images
    # (DDIM, 2 calls, seed 0, as the monitor samples), scored here.
    generate(best[0][1], 6, tmp_path / "again", steps=2, seed=0, fmt="npz", device="cpu",
             progress=False)
    with np.load(tmp_path / "again" / "samples.npz") as z:
        again = list(z["images"])
    assert min(values) == pytest.approx(independent_fid(again, folder_images(run_dir / "photos", 6)), rel=1e-4)
    # Its KID too: subsets of all 6 images of each side, so the whole samples' unbiased
    # squared MMD under (x.y / 3 + 1)^3, written out here in float64.
    x = independent_features(again)
    y = independent_features(folder_images(run_dir / "photos", 6))
    kxx, kyy, kxy = ((a @ b.T / 3 + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
    want = ((kxx.sum() - np.trace(kxx)) / 30 + (kyy.sum() - np.trace(kyy)) / 30
            - 2 * kxy.mean())
    kids = [float(r[2]) for r in rows]
    assert kids[values.index(min(values))] == pytest.approx(want, rel=1e-4)


def test_clip_x0_clamps_only_out_of_range_estimates():
    from blurfast.diffusion import BlurDiffusion
    from blurfast.sampling import clip_x0
    diff = BlurDiffusion(resolution=8, num_steps=100)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(4, 3, 8, 8, generator=g) * 2 - 1) * 0.99    # inside [-1, 1], near it
    t = torch.tensor([5, 30, 60, 99])
    x_t, eps = diff.q_sample(x0, t, seed=1)
    exact = clip_x0(lambda x, tt: eps, diff)
    # float32 round trip through x0: measured 4.8e-6 at most
    torch.testing.assert_close(exact(x_t, t), eps, rtol=0, atol=2e-5)
    wrong = clip_x0(lambda x, tt: eps * 3 + 1, diff)
    x0_hat = diff.eps_to_x0(x_t, wrong(x_t, t), t)
    assert x0_hat.abs().max() <= 1 + 1e-5                          # clamped (measured 1 + 1.3e-6)
    assert diff.eps_to_x0(x_t, eps * 3 + 1, t).abs().max() > 2     # which was out of range


@pytest.mark.parametrize("pixel_range, lo", [("0,1", 0.0), ("-1,1", -1.0)])
def test_sample_batches_clamp_to_the_runs_range_and_write_its_pixels(pixel_range, lo,
                                                                     monkeypatch):
    # A model whose x0 estimate is a fixed image c, out of range in places: sample's
    # batches clamp it to the run's data range, [0, 1] for "0,1" and [-1, 1] for "-1,1"
    # (clip_x0's arguments), and DDIM's last step returns that clamped x0, written as
    # uint8 level k where c is level k of the range (c = k / 255, or 2k / 255 - 1).
    from blurfast import generate as G
    from blurfast.diffusion import BlurDiffusion
    diff = BlurDiffusion(resolution=16, num_steps=40)
    k = torch.arange(3 * 16 * 16).reshape(1, 3, 16, 16) % 300 - 20       # levels -20 .. 279
    c = (k / 255 if pixel_range == "0,1" else 2 * k / 255 - 1).double()

    def model(x, t):
        return diff.x0_to_eps(x.double(), c.expand(x.shape[0], -1, -1, -1), t).to(x.dtype)
    ranges, real = [], G.clip_x0
    monkeypatch.setattr(G, "clip_x0", lambda m, d, *r: (ranges.append(r), real(m, d, *r))[1])
    seq = G.timesteps(diff, 4)
    [(b0, imgs)] = G.sample_batches(model, diff, [(0, 2)], sampler="ddim", seq=seq, eta=0.0,
                                    seed=1, device="cpu", precision="fp32",
                                    pixel_range=pixel_range)
    assert ranges == [(lo, 1.0)]
    # The float32 steps leave x within 5.1e-7 of the clamped c (measured): 1.3e-4 of a
    # level, far inside the half level that rounding allows.
    want = k.clamp(0, 255).permute(0, 2, 3, 1).numpy().astype(np.uint8)
    assert b0 == 0 and imgs.dtype == np.uint8
    np.testing.assert_array_equal(imgs, np.broadcast_to(want, (2, 16, 16, 3)))


def test_a_grayscale_run_scores_against_its_grayscale_reference(run_dir, tmp_path, monkeypatch,
                                                                capsys):
    # prepare --channels 1, train --channels 1 --fid-every, sample, fid: the reference is
    # read with its one channel (it failed as "channels: 3 differs from ... 1").
    from blurfast import checkpoint, data, evaluation, training
    monkeypatch.setenv("BLURFAST_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    monkeypatch.setattr(evaluation, "inception_extractor",
                        lambda path=None, device="cpu", download=True: mean_features)
    gray, rgb = tmp_path / "gray16.npy", tmp_path / "rgb16.npy"
    for path, channels in ((gray, 1), (rgb, 3)):
        data.prepare(run_dir / "photos", path, resolution=16, channels=channels, workers=0,
                     progress=False)
    kw = dict(preset="small", resolution=16, channels=1, model=TINY,
              diffusion=dict(num_steps=40), batch_size=4, steps=2, device="cpu",
              save_every=100, sample_every=100, sample_steps=2, fid_every=2, fid_n=6,
              fid_steps=2, progress=False)
    # An RGB reference for a grayscale run: refused before the first step.
    with pytest.raises(ValueError, match=r"^fid_ref: channels: 1 differs from the prepared "
                                         r"array's 3"):
        training.train(data=str(gray), out=str(tmp_path / "rgb_ref"), fid_ref=str(rgb), **kw)
    assert not list((tmp_path / "rgb_ref").rglob("*.safetensors"))
    out = tmp_path / "run"
    training.train(data=str(gray), out=str(out), fid_ref=str(gray), **kw)
    logged = float((out / "fid.csv").read_text().splitlines()[1].split(",")[1])
    [(step, best)] = checkpoint.list_checkpoints(out / "best")
    generate(best, 6, tmp_path / "s", steps=2, seed=0, fmt="npz", device="cpu",
             progress=False)
    with np.load(tmp_path / "s" / "samples.npz") as z:
        imgs = list(z["images"])
    assert step == 2 and imgs[0].shape == (16, 16, 1)
    want = independent_fid(imgs, list(np.load(gray)[:6]))
    assert logged == pytest.approx(want, rel=1e-4)
    capsys.readouterr()
    assert cli.main(["fid", "--samples", str(tmp_path / "s" / "samples.npz"), "--ref",
                     str(gray), "--n", "6", "--features", "test_generate:mean_features",
                     "--device", "cpu"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert float(line.split()[1]) == pytest.approx(want, rel=1e-4)


def test_stochastic_samples_do_not_depend_on_the_batch_size(run_dir, tmp_path):
    # Image i draws the prior and every step's noise at Philox positions fixed by
    # (seed, i) (generate's docstring): ancestral sampling (noise at every step but the
    # last) in batches of 2 and of 5 gives the same 5 images. Each batch's step noise
    # drawn at offset 0 gave images 2-4 other noise in batches of 2.
    kw = dict(n=5, steps=3, seed=7, sampler="ancestral", progress=False, device="cpu")
    generate(run_dir / "run", out=tmp_path / "b2", batch=2, **kw)
    generate(run_dir / "run", out=tmp_path / "b5", batch=5, **kw)
    b2, b5 = _read_pngs(tmp_path / "b2", 5), _read_pngs(tmp_path / "b5", 5)
    np.testing.assert_array_equal(b2, b5)
    assert all((b5[i] != b5[0]).any() for i in range(1, 5))       # five different images


def test_an_npz_run_in_two_gloo_processes_is_the_one_process_npz(run_dir, tmp_path):
    # 7 images in batches of 2: rank 0 gets batches 0 and 2 (images 0-1, 4-5), rank 1
    # batches 1 and 3 (2-3, 6). samples.npz holds the 7 images once each, in index order:
    # the one-process npz, whose images are the PNGs of a png run.
    kw = dict(n=7, steps=2, batch=2, seed=5, fmt="npz", progress=False, device="cpu")
    generate(run_dir / "run", out=tmp_path / "png", **{**kw, "fmt": "png"})
    generate(run_dir / "run", out=tmp_path / "one", **kw)
    _generate_in_two_gloo_processes(run_dir / "run", tmp_path / "two", kw)
    pngs = _read_pngs(tmp_path / "png", 7)
    with np.load(tmp_path / "one" / "samples.npz") as one, \
            np.load(tmp_path / "two" / "samples.npz") as two:
        np.testing.assert_array_equal(one["images"], pngs)
        assert two["images"].shape == (7, 16, 16, 3)
        np.testing.assert_array_equal(two["images"], pngs)
    assert not list((tmp_path / "two").glob(".chunk-*"))


def test_the_contact_sheet_tiles_the_first_images_in_order(run_dir, tmp_path):
    # 5 images: ceil(sqrt(5)) = 3 columns, 2 rows, 1 white pixel between tiles (viz.grid);
    # tile (r, c) is image r * 3 + c, pixel for pixel; the sixth tile's place is white.
    generate(run_dir / "run", 5, tmp_path, steps=2, seed=2, progress=False, device="cpu")
    imgs = _read_pngs(tmp_path, 5)
    sheet = np.asarray(Image.open(tmp_path / SHEET_NAME))
    assert sheet.shape == (2 * 17 - 1, 3 * 17 - 1, 3)
    white = np.ones(sheet.shape[:2], bool)
    for i in range(5):
        r, c = divmod(i, 3)
        np.testing.assert_array_equal(sheet[r * 17:r * 17 + 16, c * 17:c * 17 + 16], imgs[i])
        white[r * 17:r * 17 + 16, c * 17:c * 17 + 16] = False
    assert (sheet[white] == 255).all()


def test_the_manifest_records_the_model_calls_of_the_full_chain(run_dir, tmp_path,
                                                                 monkeypatch):
    # steps=None runs the full chain; the manifest's "steps" is the number of model calls
    # made for the one batch (counted here), N - 1 = 39 for N = 40, not None.
    import json
    from blurfast.models import UNet
    calls, real = [], UNet.forward
    monkeypatch.setattr(UNet, "forward", lambda self, x, t: (calls.append(1), real(self, x, t))[1])
    generate(run_dir / "run", 1, tmp_path, steps=None, seed=3, fmt="npz", progress=False,
             device="cpu")
    assert len(calls) == 39
    ckpt = (run_dir / "run" / "checkpoints" / "step_000000003").resolve()
    assert json.loads((tmp_path / "samples.json").read_text()) == {
        "made_by": "blurfast sample", "complete": True, "format": "npz", "n": 1, "seed": 3,
        "sampler": "ddim", "steps": 39, "spacing": "uniform", "eta": 0.0, "ema": True,
        "clip": True, "precision": "fp32", "checkpoint": str(ckpt)}


def test_the_manifest_of_a_safetensors_file_claims_no_weights_it_did_not_pick(run_dir, tmp_path):
    # A .safetensors file is loaded as it is: its samples.json said "ema": true for
    # model.safetensors (the raw weights), and "ema": false for ema.safetensors with
    # ema=False. It says null (the file as it is); a checkpoint directory's says which.
    import json
    from blurfast.generate import read_manifest, resolve_checkpoint
    step = resolve_checkpoint(run_dir / "run")
    kw = dict(steps=2, seed=1, progress=False, device="cpu")
    for f, ema in (("model.safetensors", True), ("ema.safetensors", False)):
        generate(step / f, 2, tmp_path / f, ema=ema, **kw)
        assert read_manifest(tmp_path / f)["ema"] is None
    generate(step, 2, tmp_path / "dir", ema=False, **kw)
    assert json.loads((tmp_path / "dir" / "samples.json").read_text())["ema"] is False
    # evaluation.sample_run (public) reads the same manifest given the folder as a str
    from blurfast.evaluation import sample_run
    assert sample_run(str(tmp_path / "dir")) == read_manifest(tmp_path / "dir") is not None
    assert sample_run(str(tmp_path)) is None                 # no run


def _interrupted(run_dir, out, monkeypatch, calls_before: int, **kw):
    """generate(...) stopped by a KeyboardInterrupt in model call ``calls_before + 1``."""
    from blurfast.models import UNet
    real, calls = UNet.forward, []

    def forward(self, x, t):
        calls.append(1)
        if len(calls) > calls_before:
            raise KeyboardInterrupt
        return real(self, x, t)
    with monkeypatch.context() as m:
        m.setattr(UNet, "forward", forward)
        with pytest.raises(KeyboardInterrupt):
            generate(run_dir / "run", out=out, **kw)


def _spy_batches(monkeypatch) -> list:
    """The index ranges each later generate() samples, in order."""
    from blurfast import generate as gen
    seen, real = [], gen.sample_batches

    def spy(model, diff, batches, **kw):
        seen.extend(batches)
        return real(model, diff, batches, **kw)
    monkeypatch.setattr(gen, "sample_batches", spy)
    return seen


def test_a_resumed_png_run_samples_only_the_missing_images(run_dir, tmp_path, monkeypatch,
                                                          capsys):
    # Ancestral sampling draws noise at every step: a resumed image with the wrong noise
    # offset would differ. The interrupted run wrote images 0-2 (its first batch of 3);
    # one of them is lost too. The resume, in batches of 2, samples 1, 3-4 and 5-6 only,
    # and the folder then holds the uninterrupted run's images and reads as finished.
    from blurfast import evaluation as ev
    kw = dict(n=7, steps=2, seed=4, sampler="ancestral", progress=False, device="cpu")
    generate(run_dir / "run", out=tmp_path / "whole", batch=3, **kw)
    out = tmp_path / "resumed"
    _interrupted(run_dir, out, monkeypatch, 3, batch=3, **kw)      # 2 calls a batch
    assert sorted(f.name for f in out.glob("0*.png")) == ["000000.png", "000001.png",
                                                          "000002.png"]
    (out / "000001.png").unlink()
    seen = _spy_batches(monkeypatch)
    assert cli.main(["sample", "--ckpt", str(run_dir / "run"), "--n", "7", "--steps", "2",
                     "--seed", "4", "--sampler", "ancestral", "--batch", "2", "--device",
                     "cpu", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert seen == [(1, 2), (3, 5), (5, 7)]
    np.testing.assert_array_equal(_read_pngs(out, 7), _read_pngs(tmp_path / "whole", 7))
    assert len(list(ev.load_images(out))) == 7
    # Resuming a finished run samples nothing; into a folder with nothing, everything.
    seen.clear()
    generate(run_dir / "run", out=out, batch=2, resume=True, **kw)
    assert seen == []
    generate(run_dir / "run", out=tmp_path / "new", batch=5, resume=True, **kw)
    assert seen == [(0, 5), (5, 7)]


def test_a_resumed_npz_run_merges_its_chunks_and_grows(run_dir, tmp_path, monkeypatch):
    # Interrupted in its third batch, an npz run leaves chunks of images 0-1 and 2-3. The
    # resume (batches of 3) samples 4-6 and merges all into the uninterrupted run's
    # samples.npz, chunks gone. Resumed again with n = 9, it keeps samples.npz's 7 images
    # and samples 7-8.
    kw = dict(steps=2, seed=6, sampler="ancestral", progress=False, device="cpu")
    generate(run_dir / "run", 9, tmp_path / "whole", batch=4, **kw)
    want = _read_pngs(tmp_path / "whole", 9)
    out = tmp_path / "z"
    _interrupted(run_dir, out, monkeypatch, 4, n=7, batch=2, fmt="npz", **kw)
    assert sorted(f.name for f in out.glob(".chunk-*")) == [".chunk-000000-000002.npy",
                                                           ".chunk-000002-000004.npy"]
    assert not (out / "samples.npz").exists()
    seen = _spy_batches(monkeypatch)
    generate(run_dir / "run", 7, out, batch=3, fmt="npz", resume=True, **kw)
    assert seen == [(4, 7)]
    with np.load(out / "samples.npz") as z:
        np.testing.assert_array_equal(z["images"], want[:7])
    assert not list(out.glob(".chunk-*"))
    seen.clear()
    generate(run_dir / "run", 9, out, batch=3, fmt="npz", resume=True, **kw)
    assert seen == [(7, 9)]
    with np.load(out / "samples.npz") as z:
        np.testing.assert_array_equal(z["images"], want)


def test_the_file_a_killed_run_was_writing_is_removed_by_the_next_run(run_dir, tmp_path):
    # Killed (SIGKILL: a preempted job) while it wrote samples.npz, a run left the
    # temporary file of that write, as large as samples.npz, and no later run removed it.
    import signal
    out = tmp_path / "z"
    script = textwrap.dedent(f"""
        import os, signal
        import numpy as np
        real = np.savez

        def killed(f, **arrays):
            real(f, **arrays)
            os.kill(os.getpid(), signal.SIGKILL)
        np.savez = killed
        from blurfast.generate import generate
        generate({str(run_dir / "run")!r}, 4, {str(out)!r}, steps=2, batch=2, fmt="npz",
                 progress=False, device="cpu")
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=os.path.dirname(__file__),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert len(list(out.glob(".samples.npz.*"))) == 1
    (out / ".notes.txt").write_text("not the run's")
    generate(run_dir / "run", 4, out, steps=2, batch=2, fmt="npz", resume=True,
             progress=False, device="cpu")
    assert sorted(f.name for f in out.iterdir()) == [".notes.txt", SHEET_NAME, "samples.json",
                                                     "samples.npz"]


def test_a_resume_counts_each_image_it_keeps_once(run_dir, tmp_path, monkeypatch, capsys):
    # An npz run killed after its merge wrote samples.npz, before it removed the chunks:
    # the resume kept 4 images and said "resuming: 8 of 4 images" (each counted in
    # samples.npz and in its chunk).
    from blurfast import generate as G
    kw = dict(steps=2, seed=3, batch=2, fmt="npz", device="cpu")
    out = tmp_path / "z"
    merge = G._merge_chunks

    def merged_not_cleared(out, n, shape):
        chunks = {f: f.read_bytes() for _, _, f in G._chunks(out)}
        merge(out, n, shape)
        for f, data in chunks.items():
            f.write_bytes(data)
    with monkeypatch.context() as m:
        m.setattr(G, "_merge_chunks", merged_not_cleared)
        generate(run_dir / "run", 4, out, progress=False, **kw)
    assert len(G._chunks(out)) == 2 and (out / "samples.npz").is_file()
    capsys.readouterr()
    generate(run_dir / "run", 4, out, resume=True, **kw)
    assert capsys.readouterr().out.splitlines()[0] == f"resuming: 4 of 4 images are in {out} " \
                                                      f"already"


def test_resume_refuses_a_folder_of_other_settings_and_leaves_it_alone(run_dir, tmp_path):
    kw = dict(n=2, steps=2, batch=2, progress=False, device="cpu")
    out = tmp_path / "s"
    generate(run_dir / "run", out=out, seed=1, **kw)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(ValueError, match=r"^resume \(--resume\): the run in .* has other "
                                         r"settings: seed 1 there, 2 now; sample into"):
        generate(run_dir / "run", out=out, seed=2, resume=True, **kw)
    with pytest.raises(ValueError, match=r"format 'png' there, 'npz' now; eta 0.0 there, "
                                         r"0.5 now"):
        generate(run_dir / "run", out=out, seed=1, resume=True, fmt="npz", eta=0.5, **kw)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    (out / "samples.json").unlink()
    with pytest.raises(ValueError, match=r"holds samples but no samples.json of `blurfast "
                                         r"sample`"):
        generate(run_dir / "run", out=out, seed=1, resume=True, **kw)


def test_a_run_interrupted_on_one_process_resumes_on_two(run_dir, tmp_path, monkeypatch):
    # Both ranks count the chunks before rank 0 rewrites the manifest, deal the missing
    # batches round-robin and write their own chunks; rank 0 merges all of them. The
    # interrupted run's chunk (images 0-1) is marked (zeroed) to show it is kept, not
    # sampled again.
    kw = dict(n=7, steps=2, seed=8, sampler="ancestral", progress=False, device="cpu")
    generate(run_dir / "run", out=tmp_path / "whole", batch=3, **kw)
    want = _read_pngs(tmp_path / "whole", 7)
    out = tmp_path / "z"
    _interrupted(run_dir, out, monkeypatch, 2, batch=2, fmt="npz", **kw)
    chunk = out / ".chunk-000000-000002.npy"
    np.testing.assert_array_equal(np.load(chunk), want[:2])
    np.save(chunk, np.zeros_like(want[:2]))
    _generate_in_two_gloo_processes(run_dir / "run", out,
                                    {**kw, "batch": 2, "fmt": "npz", "resume": True})
    with np.load(out / "samples.npz") as z:
        assert (z["images"][:2] == 0).all()
        np.testing.assert_array_equal(z["images"][2:], want[2:])
    assert not list(out.glob(".chunk-*"))


def test_a_resumed_run_over_an_earlier_runs_folder_keeps_none_of_its_images(run_dir, tmp_path,
                                                                            monkeypatch):
    # A run with new settings (seed 2) into a folder of 4 earlier images (seed 1) is
    # interrupted after its first batch (images 0-1). Its --resume kept the earlier run's
    # images 2-3 as its own: a folder that read as finished, half of it another run's.
    kw = dict(n=4, steps=2, batch=2, progress=False, device="cpu")
    generate(run_dir / "run", out=tmp_path / "whole", seed=2, **kw)
    out = tmp_path / "s"
    generate(run_dir / "run", out=out, seed=1, **kw)
    with pytest.warns(UserWarning, match="removed 4 samples that an earlier run left"):
        _interrupted(run_dir, out, monkeypatch, 2, seed=2, **kw)      # 2 calls a batch
    assert sorted(f.name for f in out.glob("0*.png")) == ["000000.png", "000001.png"]
    generate(run_dir / "run", out=out, seed=2, resume=True, **kw)
    np.testing.assert_array_equal(_read_pngs(out, 4), _read_pngs(tmp_path / "whole", 4))
    # Resumed with a smaller n, the images below it are kept, those above it removed.
    with pytest.warns(UserWarning, match="removed 1 samples numbered 3 and above"):
        generate(run_dir / "run", out=out, seed=2, resume=True, **{**kw, "n": 3})
    np.testing.assert_array_equal(_read_pngs(out, 3), _read_pngs(tmp_path / "whole", 3))


def test_a_numpy_eta_is_a_number(run_dir, tmp_path):
    # check_eta takes numpy's scalars as numbers; the manifest then tried to iterate one:
    # TypeError: 'numpy.float32' object is not iterable, after the checkpoint was loaded.
    import json
    kw = dict(steps=2, seed=1, progress=False, device="cpu")
    generate(run_dir / "run", 2, tmp_path / "py", eta=0.5, **kw)
    generate(run_dir / "run", 2, tmp_path / "np", eta=np.float32(0.5), **kw)
    np.testing.assert_array_equal(_read_pngs(tmp_path / "np", 2), _read_pngs(tmp_path / "py", 2))
    assert json.loads((tmp_path / "np" / "samples.json").read_text())["eta"] == 0.5


def test_samples_from_the_millionth_on_count_as_samples(tmp_path):
    # Sample i is written as f"{i:06d}.png": seven digits from i = 1,000,000. The files were
    # found by a six-digit glob, so a resumed run did not see those it had made (it made
    # them again), and a new run into the folder left them there.
    from blurfast import generate as G
    out = tmp_path / "s"
    out.mkdir()
    names = ["000001.png", "999999.png", "1000000.png", "1234567.png"]
    for name in names + ["12345.png", SHEET_NAME, "1000000.jpg"]:
        (out / name).write_bytes(b"")
    assert sorted(f.name for f in G._numbered_pngs(out)) == sorted(names)
    with pytest.warns(UserWarning, match="removed 4 samples"):
        G._start(out, "png", 5, {"n": 5}, resume=False)
    assert sorted(f.name for f in out.iterdir()) == sorted(
        ["12345.png", "1000000.jpg", G.MANIFEST_NAME])


def test_non_finite_samples_are_named_in_a_warning():
    # A model whose float16 overflowed gives NaN for some images: they are written (NaN
    # drawn mid gray, 128) and a warning names their numbers and, in fp16, what to do.
    from blurfast.diffusion import BlurDiffusion
    from blurfast.generate import sample_batches
    from blurfast.sampling import timesteps
    diff = BlurDiffusion(resolution=8, num_steps=10)

    def model(x, t):
        eps = torch.zeros_like(x)
        eps[1::2] = float("nan")             # the odd images of each batch
        return eps
    kw = dict(sampler="ddim", seq=timesteps(diff, 3), eta=0.0, seed=0, device="cpu",
              pixel_range="-1,1")
    with pytest.warns(UserWarning) as seen:            # one warning per batch
        got = dict(sample_batches(model, diff, [(2, 4), (4, 6)], precision="fp16", **kw))
    assert [str(w.message) for w in seen] == [
        f"1 image with non-finite values (number {i}); float16 overflowed in the model: "
        f"--precision fp32 or bf16" for i in (3, 5)]
    assert (got[2][1] == 128).all() and (got[4][1] == 128).all()
    assert (got[2][0] != 128).any()                    # the others are images
    with pytest.warns(UserWarning, match=r"^1 image with non-finite values \(number 1\)$"):
        list(sample_batches(model, diff, [(0, 2)], precision="fp32", **kw))



def test_a_folder_of_checkpoints_resolves_to_its_newest_valid_one(run_dir, tmp_path):
    # A run's best/ (and checkpoints/ itself) hold step_* checkpoints: --ckpt takes the
    # folder as it takes the run, its newest valid checkpoint, a damaged one skipped.
    import shutil
    from blurfast.generate import resolve_checkpoint
    step = resolve_checkpoint(run_dir / "run")
    assert resolve_checkpoint(run_dir / "run" / "checkpoints") == step
    best = tmp_path / "best"
    shutil.copytree(step, best / "step_000000002")
    shutil.copytree(step, best / "step_000000009")
    assert resolve_checkpoint(best) == best / "step_000000009"
    (best / "step_000000009" / "ema.safetensors").write_bytes(b"cut")
    with pytest.warns(UserWarning, match="skipping a damaged checkpoint"):
        assert resolve_checkpoint(best) == best / "step_000000002"
    (best / "step_000000002" / "ema.safetensors").write_bytes(b"cut")
    with pytest.warns(UserWarning), pytest.raises(ValueError,
                                                  match=f"^ckpt: no valid checkpoint under "
                                                        f"{best}$"):
        resolve_checkpoint(best)


def test_another_sample_run_as_the_reference_is_read_as_its_manifest_says(run_dir, tmp_path,
                                                                          monkeypatch):
    # Two models' samples compared: a `blurfast sample` output as --ref was read as a plain
    # folder, its contact sheet an image among them (for an npz run the only one), and its
    # samples.npz as statistics. Both formats now give their run's images alone: the FID of
    # the images themselves, computed independently; an unfinished run is refused first.
    from blurfast import evaluation as ev
    monkeypatch.setenv("BLURFAST_CACHE", str(tmp_path / "cache"))
    kw = dict(steps=2, batch=3, progress=False, device="cpu")
    generate(run_dir / "run", 6, tmp_path / "a", seed=1, **kw)
    generate(run_dir / "run", 5, tmp_path / "b", seed=2, **kw)
    generate(run_dir / "run", 5, tmp_path / "c", seed=2, fmt="npz", **kw)
    assert (tmp_path / "b" / SHEET_NAME).is_file()
    want = independent_fid(_read_pngs(tmp_path / "a", 6), list(_read_pngs(tmp_path / "b", 5)))
    fid_kw = dict(n=None, feature_extractor=mean_features, progress=False)
    for ref in (tmp_path / "b", tmp_path / "c", tmp_path / "c" / "samples.npz"):
        got = ev.fid(tmp_path / "a", ref, **fid_kw)
        assert got == pytest.approx(want, rel=1e-4) and got.ref == 5, ref
    assert ev.fid(tmp_path / "a", tmp_path / "b", kid=True, **fid_kw).kid == pytest.approx(
        ev.kernel_distance(independent_features(_read_pngs(tmp_path / "a", 6)),
                           independent_features(list(_read_pngs(tmp_path / "b", 5))))[0],
        rel=1e-4, abs=1e-9)
    manifest = tmp_path / "b" / "samples.json"
    manifest.write_text(manifest.read_text().replace('"complete": true', '"complete": false'))
    with pytest.raises(ValueError, match=r"^ref: .*b holds an unfinished `blurfast sample` "
                                         r"run"):
        ev.fid(tmp_path / "a", tmp_path / "b", **fid_kw)


@pytest.mark.parametrize("command", [["sample", "--out", "S"], ["draw", "trajectory"],
                                     ["draw", "process"], ["draw", "variations"]])
def test_ckpt_folder_with_no_checkpoint_is_refused_naming_ckpt(tmp_path, capsys, command,
                                                                monkeypatch):
    # An empty folder, or a run that has saved no checkpoint yet, was reported as
    # "checkpoint DIR: not a checkpoint directory (none of manifest.json, ...)", naming
    # neither --ckpt nor what a run directory is.
    monkeypatch.chdir(tmp_path)
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    fresh = tmp_path / "fresh_run"
    fresh.mkdir()
    (fresh / "config.json").write_text("{}\n")
    for folder, what in ((empty, "is not a run directory, folder of checkpoints or "
                                 "checkpoint directory"),
                         (fresh, "is a run directory with no checkpoint yet")):
        assert cli.main(command + ["--ckpt", str(folder)]) == 2
        assert capsys.readouterr().err == (
            f"blurfast {command[0]}: error: --ckpt: {str(folder)!r} {what}; give a run "
            f"directory with checkpoints/step_*, a checkpoint directory or a .safetensors "
            f"file\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh_run", "not_a_run"]


def test_a_checkpoint_directory_with_only_its_manifest_goes_on_to_the_checkpoint_check(
        tmp_path):
    # manifest.json alone marks a checkpoint directory (its weights lost or never written):
    # resolve_checkpoint hands it on, for the checkpoint loader to name what is missing,
    # instead of calling it no checkpoint directory at all.
    from blurfast.generate import resolve_checkpoint
    step = tmp_path / "step_000000002"
    step.mkdir()
    (step / "manifest.json").write_text("{}\n")
    assert resolve_checkpoint(step) == step


def test_off_a_terminal_sample_prints_a_line_per_batch_not_a_bar(run_dir, tmp_path, capsys,
                                                                 monkeypatch):
    # A batch job's log file got every redraw of the bar; it gets one line per finished
    # batch (batches of 2, 2 and 1 here) and the closing summary. On a terminal: the bar.
    import re
    out = tmp_path / "o"
    argv = ["sample", "--ckpt", str(run_dir / "run"), "--n", "5", "--steps", "2", "--batch",
            "2", "--device", "cpu", "--out", str(out)]
    assert cli.main(argv) == 0
    got = capsys.readouterr()
    assert "\r" not in got.err and "steps x" not in got.err         # no bar
    said = got.out.splitlines()
    assert [re.sub(r"[0-9.]+ images/s, [0-9.]+ s$", "R", s) for s in said[:-1]] == [
        "images 2/5: R", "images 4/5: R", "images 5/5: R"]
    assert said[-1].startswith(f"wrote 5 images to {out}")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert cli.main(argv) == 0
    got = capsys.readouterr()
    assert "ddim 2 steps x 3 batches" in got.err                     # the bar
    assert [s for s in got.out.splitlines() if not s.startswith("wrote ")] == []


def test_sample_no_progress_still_says_what_it_wrote(run_dir, tmp_path, capsys):
    # --no-progress hid the closing summary too: a script's log had no word of where the
    # images went. It hides the bar and the per-batch lines only.
    out = tmp_path / "o"
    assert cli.main(["sample", "--ckpt", str(run_dir / "run"), "--n", "1", "--steps", "2",
                     "--device", "cpu", "--format", "npz", "--out", str(out),
                     "--no-progress"]) == 0
    got = capsys.readouterr()
    assert got.out == f"wrote 1 image to {out} (npz) and {out / 'contact_sheet.png'}\n"
    assert got.err == ""
