"""`blurfast demo` (shortened) and `blurfast bench --quick` end to end on the CPU."""
import json

import numpy as np
import pytest
from PIL import Image

from blurfast import cli


def _png(path):
    img = np.asarray(Image.open(path).convert("RGB"))
    assert img.ndim == 3 and img.shape[2] == 3 and img.std() > 0, path
    return img


def test_bench_quick_writes_json_and_png(tmp_path):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    assert cli.main(["bench", "--quick", "--device", "cpu", "--cases", "dct2", "q_sample",
                     "--shapes", "2x3x32x32", "--iters", "2", "--warmup", "1",
                     "--json", str(js), "--plot", str(png), "--no-steps"]) == 0
    res = json.loads(js.read_text())
    assert {"gpu", "driver", "torch", "date", "copy_gbps", "rows"} <= set(res)
    got = {(r["case"], r["impl"]) for r in res["rows"]}
    assert {("dct2", "blurfast"), ("dct2", "torch_fp32"), ("q_sample", "blurfast")} <= got
    for r in res["rows"]:
        assert r["median_us"] > 0 and r["shape"] == [2, 3, 32, 32]
    _png(png)


def test_model_steps_against_the_baseline():
    from blurfast.bench_steps import run_steps
    rows = run_steps("cpu", batches=(2,), resolution=16, iters=1)
    assert {(r["case"], r["impl"]) for r in rows} == {
        (c, i) for c in ("train_step", "sampler_step_model")
        for i in ("torch_default", "torch_fp32", "blurfast")}
    for r in rows:
        assert r["ms_per_step"] > 0 and r["shape"] == [2, 3, 16, 16]
        assert r["images_per_s"] == pytest.approx(2 / (r["ms_per_step"] / 1e3), rel=1e-3, abs=0.051)  # rounded to 0.1
    with pytest.raises(ValueError, match="impls"):
        run_steps("cpu", batches=(2,), resolution=16, iters=1, impls=("blurfast_eager",))


def test_demo_smoke(tmp_path):
    pytest.importorskip("skimage")
    out = tmp_path / "demo"
    assert cli.main(["demo", "--smoke", "--out", str(out)]) == 0
    for name in ("samples.png", "forward_strip.png", "trajectory.png", "bench.png"):
        _png(out / name)
    assert json.loads((out / "bench.json").read_text())["rows"]
    assert list((out / "run" / "checkpoints").iterdir())
    strip = _png(out / "forward_strip.png")
    assert strip.shape[0] >= 4 * 16                   # one row per photograph
