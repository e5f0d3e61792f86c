"""The benchmark peers compute the right thing (so speedups compare correct code).

Peers live in blurfast.bench (re-exported by benchmarks/peers.py): torch matmul
DCT, torch.fft DCT (Makhoul reorder + FFT + twiddle), the torch reference
compositions of q_sample and the sampler step, and cupyx.scipy.fft on CUDA.
"""
import json
import math
import time

import numpy as np
import pytest
import torch

import bfutil
from blurfast import bench, reference
from blurfast.ops import normal_like

SIZES = [(1, 1), (2, 2), (7, 12), (8, 8), (33, 20), (16, 16), (64, 64), (5, 128)]


def _x(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _scipy_dct2(x):
    return torch.from_numpy(bfutil.dct2(x.double().numpy()))


def _scipy_idct2(X):
    return torch.from_numpy(bfutil.idct2(X.double().numpy()))


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("peer", ["matmul", "fft"])
def test_peer_dct_float64_matches_scipy(peer, hw):
    dct2 = {"matmul": bench.matmul_dct2, "fft": bench.fft_dct2}[peer]
    idct2 = {"matmul": bench.matmul_idct2, "fft": bench.fft_idct2}[peer]
    x = _x((2, 3) + hw)
    X = dct2(x)
    assert X.dtype == torch.float64 and X.shape == x.shape
    torch.testing.assert_close(X, _scipy_dct2(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(idct2(x), _scipy_idct2(x), rtol=0, atol=1e-12)
    torch.testing.assert_close(idct2(X), x, rtol=0, atol=1e-12)


@pytest.mark.parametrize("hw", [(8, 8), (33, 20), (64, 64), (256, 256)])
@pytest.mark.parametrize("peer", ["matmul", "fft"])
def test_peer_dct_float32_matches_scipy(peer, hw):
    dct2 = {"matmul": bench.matmul_dct2, "fft": bench.fft_dct2}[peer]
    idct2 = {"matmul": bench.matmul_idct2, "fft": bench.fft_idct2}[peer]
    x = _x((2, 3) + hw, torch.float32)
    X = dct2(x)
    assert X.dtype == torch.float32
    ref = _scipy_dct2(x)
    scale = ref.abs().max().item()
    assert (X.double() - ref).abs().max().item() <= 2e-6 * scale
    ref_i = _scipy_idct2(x)
    assert (idct2(x).double() - ref_i).abs().max().item() <= 2e-6 * ref_i.abs().max().item()


def test_peer_dct_noncontiguous_and_rank():
    x = _x((3, 2, 16, 8)).transpose(-1, -2)          # non-contiguous, (3, 2, 8, 16)
    for f in (bench.matmul_dct2, bench.fft_dct2):
        torch.testing.assert_close(f(x), _scipy_dct2(x), rtol=0, atol=1e-12)
    x2 = _x((12, 20))                                # rank 2
    for f in (bench.matmul_dct2, bench.fft_dct2):
        torch.testing.assert_close(f(x2), _scipy_dct2(x2), rtol=0, atol=1e-12)


def test_ref_q_sample_matches_reference_spectral():
    b, c, h, w = 2, 3, 16, 12
    x0 = _x((b, c, h, w), seed=1)
    a = torch.rand(b, 1, h, w, dtype=torch.float64)
    g = torch.sqrt(1 - a * a)
    zb = _x((b, c, h, w), seed=2)
    for dct2, idct2 in ((bench.matmul_dct2, bench.matmul_idct2),
                        (bench.fft_dct2, bench.fft_idct2)):
        xt, eps = bench.ref_q_sample(x0, a, g, dct2=dct2, idct2=idct2, noise=zb)
        xt_r, eps_r = reference.spectral(x0, a, g=g, noise=zb, return_noise=True)
        torch.testing.assert_close(xt, xt_r, rtol=0, atol=1e-12)
        torch.testing.assert_close(eps, eps_r, rtol=0, atol=1e-12)
    # pixel noise is the orthonormal inverse of unit normals: unit variance
    xt, eps = bench.ref_q_sample(torch.zeros(4, 3, 32, 32), torch.ones(4, 1, 32, 32),
                                 torch.zeros(4, 1, 32, 32))
    assert abs(eps.std().item() - 1.0) < 0.05


def test_ref_sampler_step_matches_reference_spectral():
    b, c, h, w = 2, 3, 8, 16
    xt, eps, zb = _x((b, c, h, w), seed=3), _x((b, c, h, w), seed=4), _x((b, c, h, w), seed=5)
    c1 = 1 + 0.1 * torch.rand(b, 1, h, w, dtype=torch.float64)
    c2 = -0.1 * torch.rand(b, 1, h, w, dtype=torch.float64)
    sig = 0.2 * torch.rand(1, 1, h, w, dtype=torch.float64)
    want = reference.spectral(xt, c1, eps, c2, g=sig, noise=zb)
    for dct2, idct2 in ((bench.matmul_dct2, bench.matmul_idct2),
                        (bench.fft_dct2, bench.fft_idct2)):
        got = bench.ref_sampler_step(xt, eps, c1, c2, sig, dct2=dct2, idct2=idct2, noise=zb)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


# --- every implementation the bench times on a CPU, every case, against float64 scipy ---

def _cpu_impls():
    """The impls the bench can time on a CPU (TF32 and the blurfast_* variants other than
    blurfast_given_noise are CUDA only, cupy needs CUDA): each is checked below."""
    return [i for i in bench.IMPLS + bench.VARIANT_IMPLS if bench.get_impl(i).available("cpu")[0]]


def _call_with_known_noise(impl, case, args):
    """``(outputs, zb)``: the impl's outputs (a tuple) on ``args`` and, for the noisy cases,
    the frequency-space noise ``zb`` it drew (None for the DCTs), obtained apart from the
    impl's call: the blurfast impls draw Philox normals from the bench's fixed seed; the
    torch peers draw ``torch.randn_like``
    from torch's global generator first thing, so reseeding it and drawing again gives the
    same numbers. (``normal_like`` in float64 is that Philox stream, which
    tests/test_cuda.py checks against ``reference.philox_normal``, a slow pure-torch
    version.)"""
    fn = bench.impl_function(impl, case)
    if case in ("dct2", "idct2"):
        return (fn(*args),), None
    if impl == "blurfast_given_noise":
        return fn(*args) if case == "q_sample" else (fn(*args),), \
            bench.given_noise(args[0].shape, "cpu").double().numpy()
    if impl.startswith("blurfast"):
        out = fn(*args)
        zb = normal_like(args[0].double(), seed=bench._SEED)
    else:
        with torch.random.fork_rng():
            torch.manual_seed(1234)
            out = fn(*args)
            torch.manual_seed(1234)
            zb = torch.randn(args[0].shape, dtype=torch.float32).double()
    return (out if isinstance(out, tuple) else (out,)), zb.numpy()


def _truth(case, args, zb):
    """The float64 truth of ``case`` (scipy's orthonormal DCT and the case's formula), a
    tuple of arrays like the impl's outputs."""
    f = [a.double().numpy() for a in args]
    dct2, idct2 = bfutil.dct2, bfutil.idct2
    if case == "dct2":
        return (dct2(f[0]),)
    if case == "idct2":
        return (idct2(f[0]),)
    if case == "q_sample":
        x0, a, g = f
        noise = idct2(zb)                     # the pixel-space noise, returned as eps
        return idct2(a * dct2(x0) + g * dct2(noise)), noise
    x, eps, c1, c2, sig = f
    return (idct2(c1 * dct2(x) + c2 * dct2(eps) + sig * zb),)


# float32 bound, max |out - truth| / max |truth|: float32 rounding. The torch float32 peer
# (IEEE float32 matmuls, K-term dot products twice per transform) reaches at most 5e-7
# (8.4 units of 2**-24) on these shapes, and the test asserts it stays within half the
# bound, so the bound is at least twice the peer's own error; 2e-6 is also the bound
# tests/test_cuda.py holds the CUDA kernels to. A dropped or wrong term (e.g. the sampler
# step without its eps term) is off by ~1e-1.
TOL_F32 = 2e-6


@pytest.mark.parametrize("shape", [(1, 3, 33, 20), (2, 3, 64, 64),
                                   (1, 1, 256, 256)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", bench.CASES)
def test_every_cpu_impl_computes_each_case(case, shape):
    impls = _cpu_impls()
    assert {"blurfast", "torch_fp32", "torch_fft"} <= set(impls)
    args = bench.make_inputs(case, shape, "cpu")
    errs = {}
    for impl in impls:
        if bench.impl_function(impl, case) is None:      # a variant of the fused cases only
            continue
        outs, zb = _call_with_known_noise(impl, case, args)
        want = _truth(case, args, zb)
        assert len(outs) == len(want), impl
        assert all(o.shape == shape and o.dtype == torch.float32 for o in outs), impl
        errs[impl] = max(np.abs(o.double().numpy() - w).max() / np.abs(w).max()
                         for o, w in zip(outs, want))
    assert errs["torch_fp32"] <= TOL_F32 / 2, errs
    assert max(errs.values()) <= TOL_F32, errs


# --- the bench's own one-time check (blurfast/bench_check.py) ---

def _planted(name):
    """Wrong versions of blurfast's bench functions, each one plausible bug."""
    import blurfast as bf
    s = bench._SEED
    good = bench.get_impl("blurfast").functions()
    return {
        "sampler_step without its eps term": ("sampler_step",
            lambda x, e, c1, c2, sig: bf.spectral(x, c1, g=sig, seed=s)),
        "sampler_step without its noise": ("sampler_step",
            lambda x, e, c1, c2, sig: bf.spectral(x, c1, e, c2)),
        "sampler_step with twice the noise": ("sampler_step",
            lambda x, e, c1, c2, sig: bf.spectral(x, c1, e, c2, g=2 * sig, seed=s)),
        "sampler_step with c1 and c2 swapped": ("sampler_step",
            lambda x, e, c1, c2, sig: bf.spectral(x, c2, e, c1, g=sig, seed=s)),
        "q_sample returning other noise than it used": ("q_sample",
            lambda x0, a, g: (good["q_sample"](x0, a, g)[0],
                              bf.spectral(x0, a, g=g, seed=s + 1, return_noise=True)[1])),
        "q_sample with a and g swapped": ("q_sample",
            lambda x0, a, g: bf.spectral(x0, g, g=a, seed=s, return_noise=True)),
        "q_sample without noise": ("q_sample",
            lambda x0, a, g: (bf.spectral(x0, a), torch.zeros_like(x0))),
        "dct2 computing idct2": ("dct2", bf.idct2),
        "idct2 off by a scale": ("idct2", lambda X: 1.001 * bf.idct2(X)),
    }[name]


PLANTS = ["sampler_step without its eps term", "sampler_step without its noise",
          "sampler_step with twice the noise", "sampler_step with c1 and c2 swapped",
          "q_sample returning other noise than it used", "q_sample with a and g swapped",
          "q_sample without noise", "dct2 computing idct2", "idct2 off by a scale"]


@pytest.mark.parametrize("plant", PLANTS)
def test_bench_check_refuses_a_planted_bug(plant):
    case, fn = _planted(plant)
    args = bench.make_inputs(case, (2, 3, 16, 16), "cpu")
    with pytest.raises(bench.WrongOutput, match=f"{case} 2x3x16x16 float32 blurfast"):
        bench.check_impl("blurfast", case, fn, args, "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", bench.CASES)
def test_bench_check_passes_the_cpu_impls(case, dtype):
    # float32 dct2 and q_sample: checked in every run, test_run_cpu_writes_issue6_json_shape
    if dtype == torch.float32 and case in ("dct2", "q_sample"):
        return
    for impl in _cpu_impls():
        if str(dtype).replace("torch.", "") not in bench.get_impl(impl).dtypes or \
                bench.impl_function(impl, case) is None:
            continue
        args = bench.make_inputs(case, (2, 3, 32, 32), "cpu", dtype=dtype)
        bench.check_impl(impl, case, bench.impl_function(impl, case), args, "cpu")


@pytest.mark.parametrize("case", ["dct2", "idct2"])
def test_bench_check_truth_is_float64(case):
    # The float32 output that is scipy's float64 truth correctly rounded is off by at most
    # one float32 rounding (2**-24 of max |truth|), so it passes a bound of two (2**-23).
    # A truth computed in float32 is itself off by 2.3e-7..2.9e-7 at 64 x 64 (measured),
    # about twice that bound, and would refuse it.
    from blurfast.bench_check import check_output
    (x,) = bench.make_inputs(case, (2, 3, 64, 64), "cpu")
    exact = (_scipy_dct2 if case == "dct2" else _scipy_idct2)(x)
    assert check_output(case, lambda t: exact.float(), (x,), 2 ** -23) is None
    assert check_output(case, lambda t: (exact * (1 + 2 ** -20)).float(), (x,), 2 ** -23)


@pytest.mark.parametrize("case", bench.CASES)
def test_bench_check_builds_the_truth_in_float64_for_bfloat16_io(case, monkeypatch):
    # bfloat16 rows: every transform of the truth gets float64 data (the module doc), not the
    # row's bfloat16 (whose rounding, 2**-8, is a quarter of the bfloat16 bound itself).
    from types import SimpleNamespace
    from blurfast import bench_check
    seen = []

    def spy(f):
        return lambda t: seen.append(t.dtype) or f(t)
    monkeypatch.setattr(bench_check, "R", SimpleNamespace(dct2=spy(reference.dct2),
                                                          idct2=spy(reference.idct2)))
    args = bench.make_inputs(case, (2, 3, 16, 16), "cpu", dtype=torch.bfloat16)
    bench.check_impl("blurfast", case, bench.impl_function("blurfast", case), args, "cpu")
    assert seen and set(seen) == {torch.float64}, seen


def test_time_call_cpu_reports_the_median_over_rotated_input_sets():
    # fn sleeps 90 ms on input set 2 of 3 and returns at once otherwise: of the 4 timed calls
    # (sets 0, 1, 2, 0) one is slow, so the median is a fast call (microseconds; 10 ms
    # leaves room for a loaded machine) while the mean is at least 90 / 4 = 22.5 ms.
    from blurfast.bench_timing import time_call
    order = []

    def fn(i):
        order.append(i)
        if i == 2:
            time.sleep(0.09)
    res = time_call(fn, [(0,), (1,), (2,)], "cpu", iters=4, warmup=2)
    assert order == [0, 1] + [0, 1, 2, 0]               # warmup, then the calls i % 3
    assert res["iters"] == 4
    assert res["median_us"] < 10_000, res
    assert res["wall_us"] >= 90_000 / 4, res


def test_bench_run_does_not_time_a_wrong_impl_and_strict_fails(monkeypatch, capsys):
    import dataclasses
    case, fn = _planted("sampler_step without its eps term")
    spec = bench.get_impl("blurfast")
    good = spec.functions

    def planted():
        return dict(good(), sampler_step=fn)

    monkeypatch.setitem(bench._IMPLS, "blurfast", dataclasses.replace(spec, functions=planted))
    monkeypatch.setattr(bench, "measure_copy_gbps", lambda device: 1.0)   # not under test
    res = bench.run("cpu", quick=True, cases=["sampler_step"], impls=["blurfast", "torch_fp32"],
                    shapes=["1x3x16x16"], iters=1, warmup=0, print_table=False)
    assert [r["impl"] for r in res["rows"]] == ["torch_fp32"]        # the peer is timed
    (s,) = res["skipped"]
    assert s["impl"] == "blurfast" and s["case"] == "sampler_step" and s["error"]
    assert s["wrong_output"] and "wrong output" in s["reason"] and "sig = 0" in s["reason"]
    argv = ["--device", "cpu", "--cases", "sampler_step", "--impls", "blurfast",
            "--shapes", "1x3x16x16", "--iters", "1", "--warmup", "0", "--no-steps"]
    assert bench.main(argv + ["--strict"]) == 1
    assert "sampler_step 1x3x16x16 float32 blurfast: wrong output" in capsys.readouterr().err
    assert bench.main(argv) == 0           # reported, but only --strict fails on it


@pytest.mark.parametrize("kwargs, words", [
    (dict(iters=0), "iters: expected an int >= 1 or None, got 0"),
    (dict(warmup=-1), "warmup: expected an int >= 0 or None, got -1"),
    (dict(shapes=["1x3x8"]), "shapes: expected four positive sizes B,C,H,W, got '1x3x8'"),
    (dict(impls=["torch_fp64"]), "impls: unknown impl 'torch_fp64'"),
    (dict(device="tpu"), "device: expected a device such as 'cpu' or 'cuda', got 'tpu'"),
])
def test_bench_run_names_a_bad_argument_before_timing(kwargs, words, monkeypatch):
    # iters=0 timed every row and listed each as an impl's error (StatisticsError: no median
    # for empty data), which --strict failed on; the others named no argument of run().
    monkeypatch.setattr(bench, "measure_copy_gbps",
                        lambda device: pytest.fail("timed before the check"))
    with pytest.raises(ValueError) as e:
        bench.run(**{"device": "cpu", "cases": ["dct2"], "impls": ["blurfast"],
                     "shapes": ["1x3x8x8"], **kwargs})
    assert str(e.value).startswith(words), e.value


def test_bench_run_takes_one_name_alone():
    # cases="dct2" was read as its letters ("unknown case 'd'")
    res = bench.run("cpu", quick=True, cases="dct2", impls="blurfast", shapes="1x3x8x8",
                    dtypes="float32", iters=2, warmup=0, print_table=False)
    assert [(r["case"], r["impl"], r["shape"]) for r in res["rows"]] == \
        [("dct2", "blurfast", [1, 3, 8, 8])]


def test_traffic_bytes():
    n = 256 * 3 * 64 * 64 * 4
    assert bench.traffic_bytes("dct2", (256, 3, 64, 64)) == 2 * n
    assert bench.traffic_bytes("q_sample", (256, 3, 64, 64)) == 3 * n
    assert bench.traffic_bytes("sampler_step", (256, 3, 64, 64)) == 3 * n
    # benchmarks/NOTES.md, "Floors": dct2 floor 8.5 us and q_sample floor 12.7 us at 2960 GB/s
    assert math.isclose(bench.traffic_bytes("dct2", (256, 3, 64, 64)) / 2960e9 * 1e6, 8.5,
                        abs_tol=0.05)
    assert math.isclose(bench.traffic_bytes("q_sample", (256, 3, 64, 64)) / 2960e9 * 1e6,
                        12.75, abs_tol=0.05)


def test_run_leaves_finished_rows_when_cut_short(tmp_path, monkeypatch):
    # gpu_check.sh runs the bench under a time limit: every finished (case, shape) group
    # is already on disk, marked partial, when a later one is cut off.
    path = tmp_path / "bench.json"
    real, calls = bench._time_impls, []

    def cut_after_first(*args, **kwargs):
        calls.append(args[0])
        if len(calls) > 1:
            raise KeyboardInterrupt          # what a timeout's signal looks like here
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "_time_impls", cut_after_first)
    with pytest.raises(KeyboardInterrupt):
        bench.run("cpu", quick=True, cases=["dct2", "idct2"], impls=["blurfast", "torch_fp32"],
                  shapes=["1x3x8x8"], iters=2, warmup=1, json_path=str(path),
                  print_table=False)
    on_disk = json.loads(path.read_text())
    assert on_disk["partial"] is True
    assert {(r["case"], r["impl"]) for r in on_disk["rows"]} == {
        ("dct2", "blurfast"), ("dct2", "torch_fp32")}


def test_run_cpu_writes_issue6_json_shape(tmp_path):
    path = tmp_path / "bench.json"
    res = bench.run("cpu", quick=True, cases=["dct2", "q_sample"],
                    impls=["blurfast", "torch_fp32", "torch_fft", "torch_tf32", "cupy"],
                    shapes=["1x3x8x8"], iters=2, warmup=1, json_path=str(path),
                    print_table=False)
    on_disk = json.loads(path.read_text())
    assert on_disk == json.loads(json.dumps(res))
    for key in ("gpu", "driver", "torch", "date", "copy_gbps", "rows"):
        assert key in on_disk
    assert on_disk["copy_gbps"] > 0
    rows = on_disk["rows"]
    assert {(r["case"], r["impl"]) for r in rows} == {
        (c, i) for c in ("dct2", "q_sample") for i in ("blurfast", "torch_fp32", "torch_fft")}
    for r in rows:
        assert set(r) >= {"case", "shape", "impl", "median_us", "gbps", "copy_fraction",
                          "speedup_vs_torch_fp32"}
        assert r["shape"] == [1, 3, 8, 8]
        assert r["median_us"] > 0
        # bytes moved per second, and that as a share of the run's copy bandwidth. The
        # file rounds median_us and gbps to 2 decimals, copy_gbps to 1 and copy_fraction
        # to 4: the tolerances are those roundings' relative errors (a CPU copy of a few
        # GB/s on a loaded machine makes copy_gbps's 0.05 half a percent).
        gbps = r["bytes"] / r["median_us"] / 1e3
        rel_us, rel_copy = 0.005 / r["median_us"], 0.05 / on_disk["copy_gbps"]
        # the two roundings add up (approx takes the larger of rel and abs, not the sum)
        assert abs(r["gbps"] - gbps) <= 0.005 + 1.01 * rel_us * gbps
        frac = gbps / on_disk["copy_gbps"]
        assert abs(r["copy_fraction"] - frac) <= 5e-5 + 1.01 * (rel_us + rel_copy) * frac
        if r["impl"] == "torch_fp32":
            assert r["speedup_vs_torch_fp32"] == 1.0
    skipped = {(s["impl"], s["reason"]) for s in on_disk["skipped"]}
    assert ("torch_tf32", "CUDA only") in skipped and ("cupy", "CUDA only") in skipped
    assert not [s for s in on_disk["skipped"] if s["error"]]
    assert "median_us" in bench.format_table(res)


def test_targets_judge_issue6_goals_from_rows():
    def row(case, shape, impl="blurfast", us=10.0, frac=0.8, speed=6.0, launches=1,
            dtype="float32"):
        return {"case": case, "shape": list(shape), "impl": impl, "dtype": dtype,
                "median_us": us, "copy_fraction": frac, "speedup_vs_torch_fp32": speed,
                "launches": launches}
    res = {"device": "cuda", "rows": [
        row("dct2", (256, 3, 64, 64)),                                   # met
        row("q_sample", (256, 3, 64, 64), frac=0.72, speed=9.5),          # speedup short
        row("q_sample", (256, 3, 64, 64), impl="torch_fp32"),            # not judged
        row("dct2", (64, 3, 256, 256), dtype="bfloat16"),                # not judged
        row("sampler_step", (16, 3, 64, 64), us=11.0),                   # met
        row("q_sample", (16, 3, 64, 64), us=9.0, launches=3),            # three launches
        row("dct2", (8, 3, 64, 64)),                                     # no goal
    ]}
    got = {(t["case"], tuple(t["shape"])): t["met"] for t in bench.targets(res)}
    assert got == {("dct2", (256, 3, 64, 64)): True, ("q_sample", (256, 3, 64, 64)): False,
                   ("sampler_step", (16, 3, 64, 64)): True,
                   ("q_sample", (16, 3, 64, 64)): False}
    assert "MISS q_sample" in bench.format_table({**res, "gpu": "g", "torch": "t",
                                                  "driver": "d", "date": "x",
                                                  "copy_gbps": 1.0, "skipped": [],
                                                  "rows": [dict(r, gbps=1.0, wall_us=1.0)
                                                           for r in res["rows"]]})
    assert bench.targets({**res, "device": "cpu"}) == []
    steps = [{"case": "train_step", "preset": "paper64", "shape": [16, 3, 64, 64],
              "impl": "blurfast", "speedup_vs_torch_fp32": 7.0,
              "speedup_vs_torch_default": 5.4, "images_per_s": 700.0},
             {"case": "train_step", "preset": "paper64", "shape": [64, 3, 64, 64],
              "impl": "blurfast", "speedup_vs_torch_fp32": 2.0, "images_per_s": 900.0},
             {"case": "train_step", "preset": "paper64", "shape": [16, 3, 64, 64],
              "impl": "blurfast_compile", "speedup_vs_torch_fp32": 6.5,
              "speedup_vs_torch_default": 4.9, "images_per_s": 650.0},
             {"case": "train_step", "preset": "paper64", "shape": [16, 3, 64, 64],
              "impl": "torch_fp32", "speedup_vs_torch_fp32": 1.0, "images_per_s": 130.0}]
    judged = bench.targets({"device": "cuda", "rows": [], "model_steps": steps})
    assert [(t["impl"], t["shape"][0], t["met"]) for t in judged] == [
        ("blurfast", 16, True), ("blurfast_compile", 16, False)]
    # A row of a run before the torch_default baseline existed: judged against torch_fp32.
    old = [dict(steps[0], speedup_vs_torch_fp32=4.0)]
    del old[0]["speedup_vs_torch_default"]
    judged = bench.targets({"device": "cuda", "rows": [], "model_steps": old})
    assert [(t["met"], "torch_fp32" in t["goal"]) for t in judged] == [(False, True)]


def test_num_input_sets_rotates_past_l2(monkeypatch):
    from blurfast import bench_timing
    monkeypatch.setattr(bench_timing, "_l2_bytes", lambda device: 50 * 2**20)
    k = bench_timing.num_input_sets(12 * 2**20, "cuda")
    assert k * 12 * 2**20 >= 2 * 50 * 2**20
    assert bench_timing.num_input_sets(200 * 2**20, "cuda") == 2
    assert bench_timing.num_input_sets(1000, "cuda") == 256


def _cuda():
    return torch.cuda.is_available()


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda(), reason="no CUDA device")
@pytest.mark.parametrize("hw", [(64, 64), (256, 256), (33, 20)])
def test_cuda_peers_match_scipy(hw):
    x = _x((2, 3) + hw, torch.float32)
    ref = _scipy_dct2(x)
    tol = 1e-5 * ref.abs().max().item()      # peers: float32 rounding (cuBLAS, cuFFT)
    xc = x.cuda()
    with bench.tf32_matmul(False):
        assert (bench.matmul_dct2(xc).cpu().double() - ref).abs().max().item() <= tol
    assert (bench.fft_dct2(xc).cpu().double() - ref).abs().max().item() <= tol
    with bench.tf32_matmul(True):   # TF32: ~1e-3 relative
        assert (bench.matmul_dct2(xc).cpu().double() - ref).abs().max().item() <= 1e-2 * \
            ref.abs().max().item()


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda(), reason="no CUDA device")
@pytest.mark.parametrize("hw", [(64, 64), (256, 256), (33, 20)])
def test_cuda_cupy_peer_matches_scipy(hw):
    impl = bench.get_impl("cupy")
    ok, why = impl.available("cuda")
    if not ok:
        pytest.skip(why)
    x = _x((2, 3) + hw, torch.float32)
    ref, ref_i = _scipy_dct2(x), _scipy_idct2(x)
    with impl.context(torch.device("cuda")):
        (xcp,) = impl.convert((x.cuda(),))
        got = torch.from_dlpack(bench.impl_function("cupy", "dct2")(xcp)).cpu().double()
        got_i = torch.from_dlpack(bench.impl_function("cupy", "idct2")(xcp)).cpu().double()
    assert (got - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()
    assert (got_i - ref_i).abs().max().item() <= 1e-5 * ref_i.abs().max().item()


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda(), reason="no CUDA device")
@pytest.mark.parametrize("shape", [(16, 3, 64, 64), (2, 3, 256, 256)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("case", bench.CASES)
def test_cuda_every_impl_passes_the_bench_check(case, shape):
    # every impl the GPU bench can time, variants on trial included, in each I/O type
    device = torch.device("cuda", torch.cuda.current_device())
    checked = []
    for impl in bench.IMPLS + bench.VARIANT_IMPLS:
        spec = bench.get_impl(impl)
        fn = spec.functions().get(case) if spec.available(device)[0] else None
        if fn is None:
            continue
        for dtype in spec.dtypes:
            args = bench.make_inputs(case, shape, device, dtype=getattr(torch, dtype))
            try:
                bench.check_impl(impl, case, fn, args, device)
            except bench.WrongOutput:
                raise
            except Exception:                # a variant this card cannot run (the bench
                if impl in bench.VARIANT_IMPLS:  # reports it): nothing to check
                    continue
                raise
            checked.append((impl, dtype))
    assert {("blurfast", "float32"), ("blurfast", "bfloat16"), ("torch_fp32", "float32"),
            ("torch_tf32", "float32"), ("torch_fft", "float32")} <= set(checked)


@pytest.mark.cuda
@pytest.mark.skipif(not _cuda(), reason="no CUDA device")
def test_cuda_bench_run_smoke(tmp_path):
    res = bench.run("cuda", quick=True, cases=["dct2", "q_sample"], shapes=["4x3x64x64"],
                    iters=3, warmup=1, json_path=str(tmp_path / "b.json"), print_table=False)
    assert res["gpu"] == torch.cuda.get_device_name()
    assert res["copy_gbps"] > 0
    impls = {r["impl"] for r in res["rows"]}
    assert {"blurfast", "torch_fp32", "torch_tf32", "torch_fft"} <= impls
    assert not [s for s in res["skipped"] if s["error"] and s["impl"] != "cupy"], res["skipped"]
