"""`blurfast draw bench`: a GPU bench result against the goals of issues 6 and 4."""
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from blurfast import bench, bench_chart, cli

RESULTS = Path(__file__).parents[1] / "benchmarks" / "results"
V6 = RESULTS / "nvidia-h100-80gb-hbm3-2026-11-27-v6.json"
V3 = RESULTS / "nvidia-h100-80gb-hbm3-2026-11-26-v3.json"


def _row(case, shape, impl, us, frac, dtype="float32"):
    return {"case": case, "shape": list(shape), "impl": impl, "dtype": dtype, "median_us": us,
            "gbps": 1.0, "copy_fraction": frac, "speedup_vs_torch_fp32": 1.0}


def _step(batch, impl, ms):
    return {"case": "train_step", "preset": "paper64", "shape": [batch, 3, 64, 64],
            "impl": impl, "ms_per_step": ms, "images_per_s": batch / ms * 1e3,
            "speedup_vs_torch_fp32": None}


def _result(rows, steps=()):
    return {"gpu": "Card X", "driver": "1", "torch": "2.x", "date": "2026-11-28T00:00:00",
            "copy_gbps": 3000.0, "device": "cuda", "rows": rows, "model_steps": list(steps),
            "skipped": []}


def test_goal_panels_take_each_goals_first_float32_row_and_the_step_baseline():
    big, small = (256, 3, 64, 64), (16, 3, 64, 64)
    rows = [_row("dct2", big, "blurfast", 13.0, 0.62),
            _row("dct2", big, "torch_fp32", 40.0, 0.21),
            _row("dct2", big, "blurfast", 99.0, 0.11),                # a second run: not it
            _row("dct2", big, "cupy", 99.0, 0.05, dtype="bfloat16"),   # not float32
            _row("dct2", (8, 3, 64, 64), "blurfast", 3.0, 0.3),         # no goal at this shape
            _row("q_sample", small, "blurfast", 16.5, 0.1),
            _row("q_sample", small, "torch_fft", 200.0, 0.01)]
    steps = [_step(16, "torch_default", 100.0), _step(16, "torch_fp32", 150.0),
             _step(16, "blurfast", 30.0), _step(64, "torch_default", 160.0),
             _step(64, "blurfast", 90.0), _step(16, "blurfast", 1.0)]   # a second run
    share, batch16, train = bench_chart.goal_panels(_result(rows, steps))
    # Issue 6's table: dct2 at 256x3x64x64 is to reach 75% of a copy.
    assert share["groups"] == ["dct2\n256x3x64x64"] and share["goals"] == [0.75]
    assert share["series"] == {"blurfast": [0.62], "torch_fp32": [0.21], "torch_fft": [None],
                               "cupy": [None]}
    # Every op at the paper's batch: within 12 µs; only q_sample was timed here.
    assert batch16["groups"] == ["q_sample\n16x3x64x64"] and batch16["goals"] == [12.0]
    assert batch16["series"]["blurfast"] == [16.5] and batch16["log"]
    assert batch16["series"]["torch_fft"] == [200.0]
    # Issue 4: 5x the paper-style step's images/s at batch 16, a fifth of its time.
    assert train["groups"] == ["batch 16", "batch 64"]
    assert train["series"] == {"torch_default": [100.0, 160.0], "torch_fp32": [150.0, None],
                               "blurfast": [30.0, 90.0]}
    assert train["goals"] == [pytest.approx(20.0), None]


def test_goal_panels_of_run_v6_are_its_rows_and_an_older_run_falls_back_to_fp32():
    # The numbers benchmarks/NOTES.md quotes from run v6.
    share, batch16, train = bench_chart.goal_panels(bench.read_result(V6, "RESULT"))
    k = share["groups"].index("dct2\n256x3x64x64")
    assert share["series"]["blurfast"][k] == 0.6265
    assert share["goals"] == [0.75, 0.60, 0.70, 0.55, 0.60, 0.60]
    assert batch16["series"]["blurfast"][:2] == [6.72, 6.75]                  # dct2, idct2
    assert train["series"]["torch_default"][0] == 104.842
    assert train["series"]["blurfast_compile"] == [24.245, None]
    assert train["goals"] == [pytest.approx(104.842 / 5), None]
    # Run v3 had no torch_default row: its goal is a fifth of the IEEE fp32 step.
    *_, old = bench_chart.goal_panels(bench.read_result(V3, "RESULT"))
    assert old["goals"] == [pytest.approx(147.46 / 5), None]


def test_goal_panels_refuse_a_cpu_run_a_run_without_goal_rows_and_an_absent_impl():
    cpu = dict(_result([_row("dct2", (256, 3, 64, 64), "blurfast", 1.0, 0.1)]), device="cpu")
    with pytest.raises(ValueError, match=r"^RESULT: a run on 'cpu'; the goals are for GPU"):
        bench_chart.goal_panels(cpu, arg="RESULT")
    with pytest.raises(ValueError, match=r"^RESULT: no rows of the goals' cases"):
        bench_chart.goal_panels(_result([_row("dct2", (8, 3, 8, 8), "blurfast", 1.0, 0.1)]),
                                arg="RESULT")
    one = _result([_row("dct2", (256, 3, 64, 64), "blurfast", 1.0, 0.1)])
    with pytest.raises(ValueError, match=r"^impls: no rows of \['cupy'\] in RESULT; it has "
                                         r"\['blurfast'\]$"):
        bench_chart.goal_panels(one, ["blurfast", "cupy"], arg="RESULT")
    # The default set takes the peers the result has.
    assert list(bench_chart.goal_panels(one)[0]["series"]) == ["blurfast"]


def test_read_result_names_the_argument_and_what_is_wrong(tmp_path):
    bad = tmp_path / "r.json"
    for text, words in [("[", "not readable as JSON"), ("[]", "expected a JSON object, got list"),
                        (json.dumps({"gpu": "x"}), "no driver, torch, date, copy_gbps, device, "
                                                   "rows; expected the keys"),
                        (json.dumps(dict(_result([{"case": "dct2"}]))),
                         "rows[0] is not a row with the keys")]:
        bad.write_text(text)
        with pytest.raises(ValueError, match=f"^RESULT: {re.escape(words)}"):
            bench.read_result(bad, "RESULT")
    bad.write_text(json.dumps(_result([])))
    bench.read_result(bad, "RESULT")
    r = _result([])
    del r["model_steps"]
    bad.write_text(json.dumps(r))
    with pytest.raises(ValueError, match="^RESULT: no model_steps"):
        bench.read_result(bad, "RESULT", steps=True)


def test_draw_bench_writes_the_chart_beside_the_result(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image
    result = tmp_path / "v6.json"
    shutil.copy(V6, result)
    assert cli.main(["draw", "bench", str(result)]) == 0
    out = tmp_path / "v6.png"
    assert capsys.readouterr().out == (
        f"wrote {out}: NVIDIA H100 80GB HBM3, 2026-11-27; issue 6: share of a device copy's "
        f"bandwidth (float32) (6 groups); issue 6: every op at the paper's batch 16x3x64x64 "
        f"(4 groups); issue 4: the training step, paper64 at 64 x 64 (2 groups)\n")
    with Image.open(out) as im:
        pic = np.asarray(im.convert("RGB")).astype(int)
    assert pic.shape[1] > pic.shape[0] > 300                    # three panels side by side
    # blurfast's bars (matplotlib's C0) in every panel, goals (black dashes) drawn
    for band in np.array_split(pic, 3, axis=1):
        assert (np.abs(band - np.array([31, 119, 180])).sum(-1) < 40).sum() > 200
    assert (pic.sum(-1) < 60).sum() > 500
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v6.json", "v6.png"]


def test_draw_bench_refuses_bad_input_before_writing(tmp_path, capsys, monkeypatch):
    result = tmp_path / "v6.json"
    shutil.copy(V6, result)
    for extra, words in [(["--out", str(tmp_path / "c.jpg")], "--out: expected a .png file"),
                         (["--impl", "nope"], "--impl: no rows of ['nope'] in RESULT; it has "
                                              "['blurfast', ")]:
        assert cli.main(["draw", "bench", str(result), *extra]) == 2
        assert capsys.readouterr().err.startswith(f"blurfast draw: error: {words}")
    assert cli.main(["draw", "bench", str(tmp_path / "none.json")]) == 2
    assert capsys.readouterr().err.startswith("blurfast draw: error: RESULT: not readable as "
                                              "JSON")
    monkeypatch.setitem(sys.modules, "matplotlib", None)            # import fails
    assert cli.main(["draw", "bench", str(result)]) == 2
    assert capsys.readouterr().err.startswith("blurfast draw: error: draw bench needs "
                                              "matplotlib: pip install matplotlib")
    assert [p.name for p in tmp_path.iterdir()] == ["v6.json"]
