"""`blurfast demo` (shortened) and `blurfast bench --quick` end to end on the CPU."""
import json
import re

import numpy as np
import pytest
from PIL import Image
import torch

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


def test_model_steps_against_the_baseline(capsys):
    from blurfast.bench_steps import run_steps
    rows = run_steps("cpu", batches=(2,), resolution=16, iters=1, progress=True)
    bar = capsys.readouterr().err                    # one count per configuration
    assert "model steps:" in bar and "/3 [" in bar and "torch_fp32 batch 2" in bar, bar
    assert {(r["case"], r["impl"]) for r in rows} == {
        (c, i) for c in ("train_step", "sampler_step_model")
        for i in ("torch_default", "torch_fp32", "blurfast")}
    for r in rows:
        assert r["ms_per_step"] > 0 and r["shape"] == [2, 3, 16, 16]
        assert r["peak_mem_gb"] is None                  # measured on CUDA only
        assert r["images_per_s"] == pytest.approx(2 / (r["ms_per_step"] / 1e3), rel=1e-3, abs=0.051)  # rounded to 0.1
    with pytest.raises(ValueError, match="impls"):
        run_steps("cpu", batches=(2,), resolution=16, iters=1, impls=("blurfast_eager",))
    for impl in ("blurfast_cast_once", "blurfast_fp16"):
        with pytest.raises(ValueError, match=f"{impl} is a 16-bit .*needs a CUDA device"):
            run_steps("cpu", batches=(2,), resolution=16, iters=1, impls=(impl,))


def test_model_steps_check_their_arguments():
    # numpy's integers are taken as Python ints: the rows' shape goes into the JSON
    from blurfast.bench_steps import run_steps
    rows = run_steps("cpu", batches=(np.int64(2),), resolution=np.int64(16),
                     iters=np.int32(1))
    assert rows and all(r["shape"] == [2, 3, 16, 16] for r in rows)
    assert all(type(s) is int for r in json.loads(json.dumps(rows)) for s in r["shape"])
    ok = dict(batches=(2,), resolution=16, iters=1)
    for bad, match in [(dict(batches=(0,)), r"batches\[0\]: expected an int >= 1"),
                       (dict(batches=(2, 1.5)), r"batches\[1\]: expected an int >= 1"),
                       (dict(batches=2), "batches: expected a sequence"),
                       (dict(batches=()), "batches: expected a sequence .* empty"),
                       (dict(resolution=0), "resolution: expected an int >= 1"),
                       (dict(resolution=20), r"resolution: 20 is not divisible by 2\^3"),
                       (dict(iters=0), "iters: expected an int >= 1"),
                       (dict(iters=1.5), "iters: expected an int >= 1"),
                       (dict(preset="huge"), "preset: expected one of"),
                       (dict(device="tpu"), "device: expected a device")]:
        with pytest.raises(ValueError, match=match):
            run_steps("cpu" if "device" not in bad else bad["device"],
                      **{**ok, **{k: v for k, v in bad.items() if k != "device"}})
    with pytest.raises(TypeError, match="quick: expected a bool"):
        run_steps("cpu", quick=1, **ok)
    with pytest.raises(TypeError, match="errors: expected a list"):
        run_steps("cpu", errors=(), **ok)


def test_model_steps_go_on_past_a_failing_configuration(monkeypatch):
    # A configuration that raises (a compile or capture failure on a GPU) is recorded and
    # the baselines' rows are kept; every finished configuration is handed on at once.
    from blurfast import training
    from blurfast.bench_steps import run_steps

    def broken(*args, **kwargs):
        raise RuntimeError("capture failed")
    monkeypatch.setattr(training, "TrainStep", broken)
    errors, seen = [], []
    rows = run_steps("cpu", batches=(2,), resolution=16, iters=1, errors=errors,
                     on_progress=lambda r: seen.append([(x["impl"], x["speedup_vs_torch_fp32"])
                                                        for x in r]))
    assert {r["impl"] for r in rows} == {"torch_default", "torch_fp32"}
    assert [(e["impl"], e["shape"]) for e in errors] == [("blurfast", [2, 3, 16, 16])]
    assert "capture failed" in errors[0]["reason"]
    assert [len(s) for s in seen] == [2, 4, 4]
    assert seen[0][0] == ("torch_default", None)          # its baseline not timed yet
    with pytest.raises(RuntimeError, match="capture failed"):
        run_steps("cpu", batches=(2,), resolution=16, iters=1)


def test_steps_json_of_a_cut_run_names_the_failed_configurations(tmp_path, monkeypatch):
    # The steps JSON written after each configuration (a time limit may end the run there)
    # holds the errors of the configurations that failed so far, not only at the end.
    from blurfast import bench, bench_steps

    class Cut(Exception):
        pass

    def run_steps(*args, errors, on_progress, **kwargs):
        errors.append({"case": "train_step", "impl": "blurfast_compile_cl",
                       "shape": [2, 3, 16, 16], "reason": "RuntimeError: no", "error": True})
        on_progress([{"case": "train_step", "preset": "small", "shape": [2, 3, 16, 16],
                      "impl": "torch_default", "ms_per_step": 5.0, "images_per_s": 400.0,
                      "speedup_vs_torch_default": 1.0, "speedup_vs_torch_fp32": 1.0}])
        raise Cut()                       # the step's timeout, before the final write
    monkeypatch.setattr(bench_steps, "run_steps", run_steps)
    js = tmp_path / "steps.json"
    with pytest.raises(Cut):
        bench.main(["--device", "cpu", "--quick", "--no-kernels", "--steps",
                    "--json", str(js)])
    got = json.loads(js.read_text())
    assert got["partial"] is True and [r["impl"] for r in got["model_steps"]] == ["torch_default"]
    assert [s["impl"] for s in got["skipped"]] == ["blurfast_compile_cl"]
    assert got["quick"] is True           # --no-kernels: the header says --quick too


def test_model_step_configurations_reach_trainstep(monkeypatch):
    # Each blurfast configuration of the bench is TrainStep with its own settings: compile
    # and channels_last per the name, activation checkpointing for _ckpt (a stand-in
    # TrainStep records them; nothing compiles).
    from blurfast import training
    from blurfast.bench_steps import run_steps
    seen = {}

    class Recorder:
        def __init__(self, model, diff, **kw):
            seen.setdefault(len(seen), {**kw, "ckpt": model.activation_checkpointing})

        def __call__(self, *args):
            pass
    monkeypatch.setattr(training, "TrainStep", Recorder)
    for impl in ("blurfast", "blurfast_ckpt", "blurfast_compile", "blurfast_compile_cl"):
        seen.clear()
        rows = run_steps("cpu", batches=(2,), resolution=16, iters=1, impls=(impl,))
        assert (seen[0]["compile"], seen[0]["channels_last"], seen[0]["ckpt"]) == {
            "blurfast": (False, False, False), "blurfast_ckpt": (False, False, True),
            "blurfast_compile": (True, False, False),
            "blurfast_compile_cl": (True, True, False)}[impl]
        assert ("train_step", impl) in {(r["case"], r["impl"]) for r in rows}


def test_merge_results_of_two_device_calls(tmp_path):
    # gpu_check.sh's files of a first call (kernels, batch-16 steps cut short) and of a
    # second (batch 64) in one folder: one results file, every row once, step rows tagged
    # with their run, and the cut marked.
    import runpy
    from pathlib import Path
    merge = runpy.run_path(str(Path(__file__).parents[1] / "scripts" / "merge_results.py"),
                           run_name="merge")["main"]
    head = {"gpu": "NVIDIA H100 80GB HBM3", "driver": "580", "torch": "2.11",
            "date": "2026-11-26T20:00:00+00:00", "device": "cuda", "copy_gbps": 2960.0}
    row = {"case": "dct2", "shape": [2, 3, 64, 64], "impl": "torch_fp32", "median_us": 5.0,
           "gbps": 1.0, "copy_fraction": 0.001, "speedup_vs_torch_fp32": 1.0}
    step = {"case": "train_step", "preset": "paper64", "impl": "torch_fp32",
            "ms_per_step": 100.0, "images_per_s": 160.0, "speedup_vs_torch_default": 0.8,
            "speedup_vs_torch_fp32": 1.0}
    files = {"bench.json": dict(head, rows=[row], skipped=[]),
             "bench_variants.json": dict(head, rows=[dict(row, impl="blurfast_wide")],
                                         skipped=[{"impl": "x", "error": False}]),
             "steps.json": dict(head, rows=[], skipped=[], partial=True,
                                model_steps=[dict(step, shape=[16, 3, 64, 64])]),
             "steps64.json": dict(head, rows=[], skipped=[],
                                  model_steps=[dict(step, shape=[64, 3, 64, 64])])}
    for name, d in files.items():
        (tmp_path / name).write_text(json.dumps(d))
    name = merge(str(tmp_path))
    assert name == "nvidia-h100-80gb-hbm3-2026-11-26.json"
    got = json.loads((tmp_path / "results" / name).read_text())
    assert [r["impl"] for r in got["rows"]] == ["torch_fp32", "blurfast_wide"]
    # Kernel rows name their run too (bench_variants times blurfast and torch_fp32 again,
    # against its own copy measurement).
    assert [r["run"] for r in got["rows"]] == ["bench", "bench_variants"]
    assert [s["run"] for s in got["skipped"]] == ["bench_variants"]
    assert got["runs"]["bench_variants"] == {"copy_gbps": 2960.0}
    assert [(r["run"], r["shape"][0]) for r in got["model_steps"]] == [("steps", 16),
                                                                       ("steps64", 64)]
    assert got["partial"] is True and len(got["skipped"]) == 1 and got["driver"] == "580"
    assert got["runs"]["steps"] == {"copy_gbps": 2960.0, "partial": True}


def test_kernel_names_in_bench_rows_are_short():
    # Each CUDA row lists the kernels a call launched, so a variant's row shows which
    # geometry actually served it (a tie in the plan once timed another one).
    from blurfast.bench_timing import short_kernel_name
    assert short_kernel_name(
        "void blurfast::plane::gpu::plane_kernel<blurfast::plane::Geom<64, 4, true>, "
        "float>(blurfast::plane::Job)") == "plane_kernel<Geom<64, 4, true>, float>"
    assert short_kernel_name("void at::native::elementwise_kernel<128, 2, at::native::"
                             "Functor<float> >(int, at::native::Functor<float>)") == \
        "elementwise_kernel<128, 2, Functor<float> >"
    assert short_kernel_name("sm90_xmma_gemm_f32f32_nn") == "sm90_xmma_gemm_f32f32_nn"


def test_demo_smoke(tmp_path, capsys):
    pytest.importorskip("skimage")
    out = tmp_path / "demo"
    assert cli.main(["demo", "--smoke", "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("config (saved to") == 1
    for name in ("samples.png", "forward_strip.png", "trajectory.png", "variations.png",
                 "bench.png"):
        _png(out / name)
    assert json.loads((out / "bench.json").read_text())["rows"]
    from PIL import Image
    assert Image.open(out / "trajectory.gif").n_frames == 6       # 5 steps, the sample
    assert list((out / "run" / "checkpoints").iterdir())
    strip = _png(out / "forward_strip.png")
    assert strip.shape[0] >= 4 * 16                   # one row per photograph


def test_demo_again_replaces_its_own_run_only(tmp_path, capsys):
    # A second demo into the same --out replaces the first one's run directory and says
    # so; a run directory that is not blurfast's is left alone, with an error.
    pytest.importorskip("skimage")
    out = tmp_path / "demo"
    argv = ["demo", "--smoke", "--no-bench", "--out", str(out)]
    assert cli.main(argv) == 0
    (out / "run" / "checkpoints" / "marker").write_text("from the first demo")
    capsys.readouterr()
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert f"[demo] replacing the previous demo run in {out / 'run'}" in text
    assert text.count("config (saved to") == 1
    assert not (out / "run" / "checkpoints" / "marker").exists()
    assert [p.name for p in (out / "run" / "checkpoints").iterdir()] == ["step_000000003"]
    other = tmp_path / "other"
    (other / "run").mkdir(parents=True)
    (other / "run" / "notes.txt").write_text("mine")
    assert cli.main(["demo", "--smoke", "--no-bench", "--out", str(other)]) == 2
    assert "not a blurfast run directory" in capsys.readouterr().err
    assert (other / "run" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("command", ["info", "train", "prepare", "sample", "fid", "bench", "demo"])
def test_every_flag_of_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text, f"blurfast {command} --help shows reST quotes"
    lines = text.split("options:", 1)[1].splitlines()
    for i, line in enumerate(lines):
        if not line.startswith("  -"):
            continue
        flag, _, rest = line.strip().partition("  ")      # argparse puts help 2+ spaces on
        described = rest.strip() or (i + 1 < len(lines) and lines[i + 1].startswith(" " * 6)
                                     and not lines[i + 1].lstrip().startswith("-"))
        assert described, f"blurfast {command}: {flag} has no help"


def test_info_names_the_cpu_build_and_each_ops_backend(capsys, monkeypatch):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "blurfast " in text and "op spectral" in text and "cpu: C++ CPU kernels" in text
    from blurfast import _C
    if _C.cpu_build() == "portable":
        return                                   # not x86-64: one build only
    assert ("AVX2 + FMA build" in text) == (_C.cpu_build() == "avx2")
    monkeypatch.setenv("BLURFAST_CPU_KERNELS", "baseline")
    assert cli.main(["info"]) == 0
    assert "CPU kernels: baseline x86-64 build" in capsys.readouterr().out


@pytest.mark.parametrize("argv, prefix", [
    (["sample", "--ckpt", "r", "--out", "x", "--bogus"],
     "blurfast sample: error: unrecognized arguments: --bogus"),
    (["train", "--out", "r", "--bogus", "1"], "blurfast train: error: unrecognized arguments"),
    (["sample", "--ckpt", "r", "--sampler", "foo"],
     "blurfast sample: error: argument --sampler: invalid choice: 'foo'"),
    (["nosuch"], "blurfast: error: argument COMMAND: invalid choice: 'nosuch'"),
    (["bench", "--bogus"], "blurfast bench: error: unrecognized arguments: --bogus"),
    (["bench", "--iters", "0"], "blurfast bench: error: argument --iters: expected a positive"),
    (["demo", "--bogus"], "blurfast demo: error: unrecognized arguments: --bogus"),
    (["demo", "--minutes", "x"], "blurfast demo: error: argument --minutes: invalid float"),
])
def test_argument_errors_are_one_line_naming_the_command(argv, prefix, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(prefix) and err.count("\n") == 1, err
    assert err.rstrip().endswith("--help lists the options)")


@pytest.mark.parametrize("args, words", [
    # nan passed the <= 0 check and failed after training, inf overflowed
    (["--minutes", "nan"], "--minutes: expected a finite number > 0, got nan"),
    (["--minutes", "inf"], "--minutes: expected a finite number > 0, got inf"),
    (["--minutes", "0"], "--minutes: expected a finite number > 0, got 0.0"),
    # -1 was a numpy error; 15 was rejected by the U-Net after the crops were written
    (["--smoke", "--resolution", "-1"], "--resolution: expected an int >= 1, got -1"),
    (["--smoke", "--resolution", "15"], "--resolution: 15 is not divisible by 2^1 (2 levels)"),
    (["--resolution", "36"], "--resolution: 36 is not divisible by 2^3 (4 levels)"),
])
def test_demo_checks_its_numbers_before_any_work(args, words, tmp_path, capsys):
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err == f"blurfast demo: error: {words} (blurfast demo " \
                                        f"--help lists the options)\n", err
    assert not out.exists()
    from blurfast import demo
    with pytest.raises(ValueError, match="^" + words[2:].split(":")[0] + ":"):
        demo.run(out, *([float(args[1])] if args[0] == "--minutes" else
                        [6.0, None, int(args[-1])]), smoke="--smoke" in args)
    assert not out.exists()


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_demo_checks_its_data_before_any_work(kind, tmp_path):
    # A --data that is not there, or not a readable array, named as data, with nothing
    # written (the --out folder was made first, and an empty file was named "path").
    from blurfast import demo
    data, out = tmp_path / "d.npy", tmp_path / "demo"
    if kind == "empty":
        data.write_bytes(b"")
    words = "does not exist" if kind == "missing" else "is not a readable .npy array"
    with pytest.raises(ValueError, match=rf"^data: '{re.escape(str(data))}' {words}"):
        demo.run(out, data=str(data), smoke=True, bench=False)
    assert not out.exists()


def test_demo_names_its_flags_on_the_command_line(tmp_path, capsys):
    # run() names its argument (data: ...); the command line names the flag, as the
    # other commands do, with nothing written.
    data, out = tmp_path / "d.npy", tmp_path / "demo"
    assert cli.main(["demo", "--smoke", "--no-bench", "--out", str(out),
                     "--data", str(data)]) == 2
    assert capsys.readouterr().err == \
        f"blurfast demo: error: --data: {str(data)!r} does not exist\n"
    assert not out.exists()


def test_demo_data_folder_with_no_images_is_refused_naming_data_before_writing(tmp_path,
                                                                               capsys):
    # A --data folder with no images was opened after --out was made, and refused as
    # "root: no .jpg/... files under ...", naming no argument of the demo.
    data, out = tmp_path / "photos", tmp_path / "demo"
    data.mkdir()
    (data / "notes.txt").write_text("no images here\n")
    assert cli.main(["demo", "--smoke", "--no-bench", "--out", str(out),
                     "--data", str(data)]) == 2
    assert capsys.readouterr().err == (f"blurfast demo: error: --data: no .jpg/.jpeg/.png/"
                                       f".webp/.bmp files under {str(data)!r}\n")
    assert not out.exists()


def test_version(capsys):
    import blurfast
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out == f"blurfast {blurfast.__version__}\n"


def test_info_names_a_gpu_this_build_cannot_run_on(capsys, monkeypatch):
    import types
    import blurfast._backend as backend
    monkeypatch.setattr(backend, "HAS_CUDA_KERNELS", True)
    monkeypatch.setattr(backend, "CUDA_ARCHS", ["80-real", "90"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(7, 5), (9, 0)][i])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: ["Tesla T4", "H100"][i])
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace())
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    assert "GPU 0: Tesla T4 (sm_75; this build has no code for it: rebuild with " \
           "BLURFAST_CUDA_ARCHS=75; no bfloat16: --precision fp16 uses its tensor cores)" in text
    assert "GPU 1: H100 (sm_90)\n" in text


@pytest.mark.parametrize("local, seen, last", [
    ("1", 2, "device: cuda:1 (LOCAL_RANK 1)"),
    ("2", 2, "device: none: this process is LOCAL_RANK 2 of a machine where torch sees 2 "
             "GPUs; start at most 2 processes per machine (torchrun --nproc_per_node=2), or "
             "--device cpu (runs on the CPU)"),
    ("0", 0, "device: cpu (torch sees no GPU)")])
def test_info_under_torchrun_names_the_rank_and_its_device(local, seen, last, capsys,
                                                           monkeypatch):
    # Each rank's lines after its rank; the last one, the device it trains and samples
    # on: LOCAL_RANK's GPU (setup_processes's), the CPU where torch sees none.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: seen > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: seen)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: "H100")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: object())
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", local)
    assert cli.main(["info"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("rank 2: blurfast ") and lines[-1] == "rank 2: " + last
    assert all(line.startswith("rank 2: ") for line in lines)
    assert ("rank 2: GPU 1: H100 (sm_90)" in lines) == (seen == 2)


@pytest.mark.parametrize("args, words", [
    (["--iters", "0"], "argument --iters: expected a positive int, got '0'"),
    (["--threads", "-1"], "argument --threads: expected a positive int"),
    (["--step-batches", "-2"], "argument --step-batches: expected a positive int"),
    (["--warmup", "-1"], "argument --warmup: expected an int >= 0"),
])
def test_bench_rejects_bad_numbers(args, words, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--device", "cpu"] + args)
    assert e.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--json", "--plot"])
@pytest.mark.parametrize("where", ["under_a_file", "a_folder"])
def test_bench_checks_where_results_go_before_timing(flag, where, tmp_path, capsys,
                                                     monkeypatch):
    # The path was used only after the whole benchmark (minutes on a GPU) had run.
    from blurfast import bench
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("timed before the check"))
    (tmp_path / "f").write_text("a file")
    path = {"under_a_file": tmp_path / "f" / "b.out", "a_folder": tmp_path}[where]
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--device", "cpu", "--no-steps", flag, str(path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(f"blurfast bench: error: {flag}: "), err
    assert err.count("\n") == 1 and err.rstrip().endswith("--help lists the options)")


def test_bench_needs_matplotlib_for_plot_before_timing(tmp_path, capsys, monkeypatch):
    import sys
    from blurfast import bench
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("timed before the check"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)            # import fails
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--device", "cpu", "--no-steps", "--plot", str(tmp_path / "b.png")])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith(
        "blurfast bench: error: --plot needs matplotlib: pip install matplotlib (")


@pytest.mark.parametrize("tty, flags, shown", [(True, [], True), (True, ["--no-progress"], False),
                                               (False, [], False)])
def test_bench_progress_bar_on_a_terminal(tty, flags, shown, capsys, monkeypatch):
    import sys
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    assert cli.main(["bench", "--device", "cpu", "--no-steps", "--cases", "dct2", "--shapes",
                     "2x3x8x8", "--impls", "blurfast", "torch_fp32", "--iters", "1",
                     "--warmup", "0", *flags]) == 0
    err = capsys.readouterr().err
    assert ("bench:" in err and "/2 [" in err and "dct2 2x3x8x8 torch_fp32 float32" in err) \
        == shown, err


@pytest.mark.parametrize("impl", ["blurfast_fp16", "blurfast_cast_once"])
def test_bench_checks_step_impls_on_a_cpu_before_timing(impl, capsys, monkeypatch):
    # Refused by run_steps only after the kernel rows were timed, as "impls: ...".
    from blurfast import bench
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("timed before the check"))
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--device", "cpu", "--step-impls", "blurfast", impl])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(
        f"blurfast bench: error: --step-impls: {impl} is a 16-bit configuration"), err


def test_bench_refuses_plot_without_kernel_rows(tmp_path, capsys, monkeypatch):
    # --no-kernels --plot drew an empty chart (and matplotlib's "No artists" warning).
    from blurfast import bench_steps
    monkeypatch.setattr(bench_steps, "run_steps",
                        lambda *a, **k: pytest.fail("timed before the check"))
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--device", "cpu", "--no-kernels", "--plot",
                  str(tmp_path / "b.png")])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("blurfast bench: error: --plot: ")
    assert not (tmp_path / "b.png").exists()


def test_bench_refuses_json_and_plot_on_one_path_before_timing(tmp_path, capsys, monkeypatch):
    # The chart overwrote the JSON (a PNG left under the .json name).
    from blurfast import bench
    monkeypatch.setattr(bench, "run", lambda *a, **k: pytest.fail("timed before the check"))
    (tmp_path / "sub").mkdir()
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--device", "cpu", "--no-steps", "--json", str(tmp_path / "r.out"),
                  "--plot", str(tmp_path / "sub" / ".." / "r.out")])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith("blurfast bench: error: --json, --plot: both "
                                              "name ")
    assert not (tmp_path / "r.out").exists()


def test_bench_writes_no_empty_plot_when_every_row_is_skipped(tmp_path, capsys):
    # cupy rows on a CPU are all skipped ("CUDA only"): an empty chart was written.
    from blurfast import bench_chart
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    assert cli.main(["bench", "--device", "cpu", "--no-steps", "--cases", "dct2", "--shapes",
                     "2x3x8x8", "--impls", "cupy", "--iters", "1", "--warmup", "0",
                     "--json", str(js), "--plot", str(png), "--no-progress"]) == 0
    res = json.loads(js.read_text())
    assert res["rows"] == [] and [s["impl"] for s in res["skipped"]] == ["cupy"]
    assert not png.exists()
    assert f"blurfast: warning: --plot: nothing written to {png}: every kernel row was " \
           f"skipped" in capsys.readouterr().err
    with pytest.raises(ValueError, match="^result: no timed rows to plot"):
        bench_chart.plot(res, png)
    assert not png.exists()


def test_bench_json_stays_partial_until_the_steps_are_done(tmp_path, monkeypatch):
    # The kernel rows were written as a finished file before the model steps began: a run
    # cut in its first step configuration left a file that did not say it was cut.
    from blurfast import bench_steps

    class Cut(Exception):
        pass

    def run_steps(*args, **kwargs):
        raise Cut()                       # the time limit, before any configuration ended
    monkeypatch.setattr(bench_steps, "run_steps", run_steps)
    js = tmp_path / "bench.json"
    with pytest.raises(Cut):
        cli.main(["bench", "--device", "cpu", "--cases", "dct2", "--shapes", "1x3x8x8",
                  "--impls", "blurfast", "--iters", "1", "--warmup", "0", "--json", str(js)])
    got = json.loads(js.read_text())
    assert got["partial"] is True and [r["impl"] for r in got["rows"]] == ["blurfast"]
    assert got["model_steps"] == []


def test_bench_names_a_bad_shape(capsys):
    assert cli.main(["bench", "--device", "cpu", "--no-steps", "--shapes", "axbxcxd"]) == 2
    err = capsys.readouterr().err                  # the flag, before anything is timed
    assert "error: --shapes: expected four positive sizes B,C,H,W, got 'axbxcxd'" in err


@pytest.mark.parametrize("how", [["benchmarks/run.py"], ["-m", "blurfast.bench"]])
def test_bench_scripts_report_a_missing_gpu_in_one_line(how, tmp_path):
    # As `blurfast bench --device cuda` does; CUDA hidden, so also on a GPU machine.
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, *(str(root / h) if h.endswith(".py") else h for h in how),
           "--device", "cuda", "--quick"]
    env = {k: v for k, v in os.environ.items() if k != "BLURFAST_DEBUG"}
    p = subprocess.run(cmd, env={**env, "CUDA_VISIBLE_DEVICES": ""}, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert (p.returncode, p.stdout, p.stderr) == (
        2, "", "blurfast bench: error: --device: 'cuda' was asked for but torch sees no GPU\n")


def test_demo_on_data_of_fewer_images_than_the_strip_has_rows(tmp_path, capsys):
    # --data with 3 images: the forward strip draws the 3 (it indexed 4 after training:
    # IndexError).
    data = tmp_path / "few"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(data / f"{i}.png")
    out = tmp_path / "demo"
    assert cli.main(["demo", "--smoke", "--no-bench", "--data", str(data), "--resolution", "8",
                     "--out", str(out)]) == 0
    strip = _png(out / "forward_strip.png")
    assert strip.shape[0] == 3 * 8 + 2                # 3 rows of 8 pixels, 1-pixel gaps
    _png(out / "samples.png")


def test_demo_takes_the_side_and_channels_of_a_prepared_array(tmp_path, capsys):
    # --data of a prepared grayscale 8 x 8 array without --resolution: the demo trains at
    # 8 x 8 on 1 channel (it asked for the default side and 3 channels, and advised to
    # prepare the array again).
    rng = np.random.default_rng(0)
    data = tmp_path / "gray8.npy"
    np.save(data, rng.integers(0, 256, (32, 8, 8, 1), dtype=np.uint8))
    out = tmp_path / "demo"
    assert cli.main(["demo", "--smoke", "--no-bench", "--data", str(data),
                     "--out", str(out)]) == 0
    config = json.loads((out / "run" / "config.json").read_text())
    assert (config["resolution"], config["channels"]) == (8, 1)
    assert np.asarray(Image.open(out / "forward_strip.png")).shape[0] == 4 * 8 + 3
    assert cli.main(["demo", "--smoke", "--no-bench", "--data", str(data), "--resolution", "16",
                     "--out", str(tmp_path / "other")]) == 2
    assert "resolution: 16 differs from the prepared array's 8" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_demo_checks_the_device_before_any_work(tmp_path, capsys):
    # --device cuda without a GPU: refused before the crops are made (it failed in train()
    # after writing them).
    out = tmp_path / "demo"
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--smoke", "--device", "cuda", "--out", str(out)])
    assert e.value.code == 2
    assert capsys.readouterr().err.startswith(
        "blurfast demo: error: --device: 'cuda' was asked for but torch sees no GPU")
    assert not out.exists()
    from blurfast import demo
    with pytest.raises(ValueError, match="^device: 'cuda' was asked for"):
        demo.run(out, smoke=True, device="cuda")
    assert not out.exists()


@pytest.mark.parametrize("flags, lines", [([], True), (["--no-progress"], False)])
def test_bench_off_a_terminal_logs_its_rows_unless_no_progress(flags, lines, capsys,
                                                              monkeypatch):
    import sys
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert cli.main(["bench", "--device", "cpu", "--no-steps", "--cases", "dct2", "--shapes",
                     "2x3x8x8", "--impls", "torch_fp32", "--iters", "1", "--warmup", "0",
                     *flags]) == 0
    err = capsys.readouterr().err.splitlines()
    rows = [ln for ln in err if ln.split()[:4] == ["dct2", "2x3x8x8", "torch_fp32", "float32"]]
    assert len(rows) == (1 if lines else 0), err


def test_bench_row_log_has_each_row_and_each_skip_once():
    # row_log: a line per timed row (its line of the table) and per skipped one, each
    # once, as its case and shape finish (cupy on a CPU: skipped, "CUDA only").
    import io

    from blurfast import bench
    log = io.StringIO()
    res = bench.run(device="cpu", cases=["dct2"], impls=["torch_fp32", "cupy"],
                    shapes=["1x1x8x8", "1x1x16x16"], iters=1, warmup=0, print_table=False,
                    row_log=log)
    assert [r["impl"] for r in res["rows"]] == ["torch_fp32"] * 2
    assert log.getvalue().splitlines() == [
        line for r, s in zip(res["rows"], res["skipped"])
        for line in (bench.row_line(r), f"skipped dct2 {'x'.join(map(str, s['shape']))} "
                                        f"cupy {s['dtype']}: {s['reason']}")]


def test_bench_run_with_numpy_ints_writes_its_json(tmp_path):
    # iters and warmup as numpy integers (taken wherever ints are): the result's iters
    # went into the JSON as np.int64, a TypeError of json.dumps after the first case.
    from blurfast import bench
    js = tmp_path / "b.json"
    res = bench.run(device="cpu", cases=["dct2"], impls=["blurfast"], shapes=["1x1x8x8"],
                    iters=np.int64(2), warmup=np.int64(0), json_path=str(js),
                    print_table=False, progress=False)
    assert type(res["iters"]) is int and json.loads(js.read_text())["iters"] == 2
