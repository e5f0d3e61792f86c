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
                     "--json", str(js), "--plot", str(png)]) == 0
    res = json.loads(js.read_text())
    assert {"gpu", "driver", "torch", "date", "copy_gbps", "rows"} <= set(res)
    got = {(r["case"], r["impl"]) for r in res["rows"]}
    assert {("dct2", "blurfast"), ("dct2", "torch_fp32"), ("q_sample", "blurfast")} <= got
    for r in res["rows"]:
        assert r["median_us"] > 0 and r["shape"] == [2, 3, 32, 32]
    _png(png)


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
