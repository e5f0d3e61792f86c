"""scripts/gpu_check.sh, read on the CPU: a GPU session has 15 minutes, so a mistyped flag,
an impl name the bench does not know or a pytest selection that picks nothing must fail
here, not there. Each Python command of the script is parsed by its own argument parser."""
import argparse
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from blurfast.bench import _parse_shape

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _steps():
    """(name, words) of every `step NAME TIMEOUT CMD...` line, continuations joined."""
    text = re.sub(r"\\\n\s*", " ", SCRIPT.read_text())
    out = []
    for line in text.splitlines():
        m = re.match(r"step (\w+) \d+ (.*)$", line.strip())
        if m:
            out.append((m.group(1), shlex.split(m.group(2))))
    return out


def _script_steps():
    """The names of the script's STEPS, what GPU_CHECK_ONLY and GPU_CHECK_SKIP may name."""
    text = re.sub(r"\\\n", "", SCRIPT.read_text())
    return re.search(r'^STEPS="([^"]*)"', text, re.M).group(1).split()


def test_steps_names_every_step_in_order():
    assert _script_steps() == [n for n, _ in _steps()]


@pytest.mark.parametrize("var, value, bad", [
    ("GPU_CHECK_ONLY", "ext ncu memcheck racechek", "racechek"),    # a typo
    ("GPU_CHECK_SKIP", "biuld", "biuld"),
    ("GPU_CHECK_ONLY", "ext *", "*"),                               # not globbed
    ("GPU_CHECK_BUDGET", "572s", None),     # it failed in the first step's arithmetic
])
def test_an_unknown_step_name_is_refused_before_anything_runs(tmp_path, var, value, bad):
    # Without the check a typo in GPU_CHECK_ONLY ran the other steps and skipped the
    # mistyped one (or, in GPU_CHECK_SKIP, ran the step meant to be skipped): found only
    # after the GPU time was spent.
    out = tmp_path / "gc"
    r = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHON": sys.executable, "OUT": str(out),
                            "GPU_CHECK_BUDGET": "60", var: value})
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    if bad is None:
        assert f"{var}: expected whole seconds, got '{value}'" in r.stderr
    else:
        assert f"{var}: unknown step '{bad}'" in r.stderr and "racecheck profile" in r.stderr
    assert not out.exists() and r.stdout == ""


def _ext_fails(tmp_path, fake_python: str):
    """gpu_check.sh's ext, info, bench and memcheck with a fake python whose script is
    ``fake_python`` (each call logged): (summary lines, ext.log, the logged calls)."""
    calls = tmp_path / "calls.log"
    py = _fake_tool(tmp_path / "py", f'echo "py $*" >> {calls}\n' + fake_python)
    out = tmp_path / "gc"
    r = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHON": str(py), "OUT": str(out),
                            "GPU_CHECK_ONLY": "ext info bench memcheck",
                            "GPU_CHECK_BUDGET": "120"})
    assert r.returncode == 1
    summary = (out / "summary.txt").read_text().splitlines()
    assert "bench FAIL not started (ext failed)" in summary
    assert "memcheck FAIL not started (ext failed)" in summary
    return summary, (out / "ext.log").read_text(), calls.read_text()


def test_a_failed_ext_starts_no_later_step(tmp_path):
    # ext fails (the extension does not import, or torch sees no GPU): info still runs
    # (it says what is installed), the steps after it are failed without starting, so
    # the budget is not spent on a dozen imports that fail.
    summary, _, ran = _ext_fails(tmp_path, "exit 1\n")
    assert summary[2].startswith("ext FAIL") and summary[3].startswith("info FAIL exit code")
    assert "-m blurfast info" in ran and "benchmarks/run.py" not in ran
    assert "sanitizer_case" not in ran


def test_a_failing_kernel_check_fails_ext_and_starts_no_later_step(tmp_path):
    # ext only imported the extension and read has_cuda: one built for another GPU's
    # architecture passed, and every later step failed. Here everything imports, and
    # only the kernel check (sanitizer_case.py --quick) fails.
    summary, ext_log, ran = _ext_fails(
        tmp_path, 'if [[ "$*" == *"sanitizer_case.py --quick"* ]]; then\n'
                  '  echo "FAIL dct2 2x3x64x64: exception"; exit 1\nfi\n')
    assert summary[2].startswith("ext FAIL exit code 1") and summary[3].startswith("info PASS")
    assert "FAIL dct2 2x3x64x64" in ext_log and "does not run on this GPU" in ext_log
    assert "benchmarks/run.py" not in ran and ran.count("sanitizer_case") == 1


def test_the_quick_kernel_check_names_wrong_results_and_fails_on_an_op_that_raises(
        monkeypatch, capsys):
    # ext's check, on the CPU kernels: passes as they are; names an op off by a relative
    # 1e-4 (ten times its float32 bound, within bfloat16's) but goes on (the benches skip
    # such rows); fails when an op raises, as one without a kernel image for the GPU does.
    import blurfast
    main = runpy.run_path(str(ROOT / "scripts" / "sanitizer_case.py"), run_name="t")["main"]
    assert main(["--quick", "--device", "cpu"]) == 0
    right = blurfast.idct2
    monkeypatch.setattr(blurfast, "idct2", lambda x: right(x) * (1 + 1e-4))
    assert main(["--quick", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "FAIL idct2 2x3x64x64:" in out and "ok   dct2 2x3x64x64:" in out
    assert "FAIL idct2 2x1x7x12:" in out and "ok   idct2 2x1x7x12 bfloat16:" in out
    assert "\n2 failure(s)\nwrong results but every op ran" in out

    def no_image(x):
        raise RuntimeError("CUDA error: no kernel image is available for execution")
    monkeypatch.setattr(blurfast, "idct2", no_image)
    assert main(["--quick", "--device", "cpu"]) == 1
    assert "FAIL idct2 2x3x64x64: exception" in capsys.readouterr().out


def test_ncu_off_path_is_the_newest_installed_version(tmp_path):
    # Without ncu on PATH the script took the first Nsight Compute folder by name:
    # nsight-compute-2025.1.0 before 2025.3.1 and 2025.10.0.
    cuda = tmp_path / "cuda"
    for v in ("2025.1.0", "2025.10.0", "2025.3.1"):
        (cuda / f"nsight-compute-{v}").mkdir(parents=True)
        _fake_tool(cuda / f"nsight-compute-{v}" / "ncu", f'echo "Version {v} (build 1)"\n')
    path = os.pathsep.join(d for d in os.environ["PATH"].split(os.pathsep)
                           if not os.access(os.path.join(d, "ncu"), os.X_OK))
    py = _fake_tool(tmp_path / "py", "exit 0\n")
    out = tmp_path / "gc"
    subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True,
                   env={**os.environ, "PATH": path, "CUDA_HOME": str(cuda),
                        "PYTHON": str(py), "OUT": str(out), "GPU_CHECK_ONLY": "env",
                        "GPU_CHECK_BUDGET": "60"})
    assert "ncu: Version 2025.10.0 (build 1)" in (out / "env.log").read_text()


_SLOW_BENCH = """import json, os, runpy, sys, time
import blurfast.bench as bench
json_path = sys.argv[sys.argv.index("--json") + 1]
timed = bench._time_impls

def slow(case, shape, *args):     # the second shape hangs until the step's time limit
    if shape[0] == 4:
        time.sleep(120)
    return timed(case, shape, *args)
bench._time_impls = slow
main = runpy.run_path(os.path.join(os.environ["ROOT"], "benchmarks", "run.py"))["main"]
sys.exit(main(["--device", "cpu", "--quick", "--no-steps", "--cases", "dct2", "--shapes",
               "2x3x8x8", "4x3x8x8", "--impls", "blurfast", "torch_fp32", "--iters", "2",
               "--warmup", "0", "--json", json_path]))
"""


def test_a_bench_step_cut_by_its_limit_keeps_the_finished_rows_in_its_log(tmp_path):
    # The bench printed its table only at the end (and its bar only on a terminal): a
    # step killed by its limit left an empty bench.log though bench.json had its rows.
    # Here `bench` runs the CPU bench, whose second shape hangs past the budget (40 s:
    # the first rows are in long before, on a busy machine too).
    import json
    driver = tmp_path / "slow_bench.py"
    driver.write_text(_SLOW_BENCH)
    py = _fake_tool(tmp_path / "py", f'exec {shlex.quote(sys.executable)} {driver} "$@"\n')
    out = tmp_path / "gc"
    # the installed package (in CI the source tree has no compiled extension)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True,
                   env={**env, "PYTHON": str(py), "OUT": str(out), "GPU_CHECK_ONLY": "bench",
                        "GPU_CHECK_BUDGET": "40"})
    assert "bench FAIL timed out" in (out / "summary.txt").read_text(), \
        (out / "bench.log").read_text()[-2000:]
    rows = json.loads((out / "bench.json").read_text())["rows"]
    assert json.loads((out / "bench.json").read_text())["partial"] is True
    log = (out / "bench.log").read_text().splitlines()
    assert sorted(r["impl"] for r in rows) == ["blurfast", "torch_fp32"]
    for r in rows:                  # each finished row as its line of the table
        assert [ln for ln in log if ln.split()[:4] == ["dct2", "2x3x8x8", r["impl"], "float32"]]


def test_the_bench_logs_each_finished_model_step_once(monkeypatch, capsys, tmp_path):
    # The model steps too (steps64 was cut with an empty log in run v6): each row once,
    # as it is finished, on stderr when it is no terminal.
    import blurfast.bench as bench
    import blurfast.bench_steps as bench_steps
    rows = [dict(_STEP, impl=i, speedup_vs_torch_default=1.0) for i in ("torch_default",
                                                                        "blurfast")]

    def run_steps(device, quick, on_progress, **kw):
        on_progress(rows[:1])
        on_progress(rows)
        raise KeyboardInterrupt                   # stands for the time limit's signal
    monkeypatch.setattr(bench_steps, "run_steps", run_steps)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--device", "cpu", "--no-kernels", "--steps", "--json",
                    str(tmp_path / "s.json")])
    err = capsys.readouterr().err.splitlines()
    assert err == [bench_steps.step_line(r) for r in rows]
    assert err[1].split()[:4] == ["train_step", "paper64", "16x3x64x64", "blurfast"]


def _python_args(words, out_dir):
    """The words after `"$PY"`, with $OUT replaced; None for a command not run by Python."""
    if "$PY" not in words:
        return None
    args = words[words.index("$PY") + 1:]
    return [w.replace("$OUT", str(out_dir)) for w in args]


class _Parsed(Exception):
    def __init__(self, ns):
        super().__init__()
        self.ns = ns


def _parse_only(monkeypatch):
    """Make every argparse parser stop right after a successful parse."""
    original = argparse.ArgumentParser.parse_args

    def parse(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse)


def test_every_step_is_listed_and_every_selection_names_steps():
    names = [n for n, _ in _steps()]
    assert len(names) == len(set(names)) and len(names) >= 15, names
    header = SCRIPT.read_text().split("set -euo pipefail")[0]
    for n in names:                               # the header documents every step
        assert re.search(rf"^#\s+{n}\s", header, re.M), f"step {n} missing from the header"
    # The second call's GPU_CHECK_ONLY examples (header and NOTES) name real steps.
    notes = (ROOT / "benchmarks" / "NOTES.md").read_text()
    selections = re.findall(r'"((?:[a-z0-9_]+ )+[a-z0-9_]+)"', header + notes)
    only = [s for s in selections if s.startswith("env ")]
    assert only, "no GPU_CHECK_ONLY example found"
    for s in only:
        assert set(s.split()) <= set(names), s
        # A first call on a fresh machine: the command's GPU_CHECK_SKIP=build skips the
        # build when the carried extension imports, and its `else` needs the build to run.
        assert "build" in s.split(), f"{s}: without build, a carried extension that does " \
            "not import leaves every later step without one"


def test_python_commands_parse(monkeypatch, tmp_path):
    _parse_only(monkeypatch)
    parsed = []
    for name, words in _steps():
        args = _python_args(words, tmp_path)
        if args is None or args[0] == "-m":
            continue
        path = ROOT / args[0]
        assert path.is_file(), f"step {name}: {args[0]} does not exist"
        main = runpy.run_path(str(path), run_name="gpu_check_test")["main"]
        try:
            main(args[1:])
        except SystemExit as e:                   # argparse's error exit
            pytest.fail(f"step {name}: {shlex.join(args)} does not parse ({e})")
        except _Parsed as p:
            parsed.append(name)
            for shape in getattr(p.ns, "shapes", None) or ():
                _parse_shape(shape)
        else:
            pytest.fail(f"step {name}: main returned without parsing its arguments")
    assert {"bench", "bench_variants", "bench_columns", "steps", "steps64", "memcheck",
            "racecheck", "profile", "bench_extra"} <= set(parsed)


def test_ncu_cases_list():
    # The ncu step counts the cases from --list and profiles each with --case K.
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "ncu_case.py"), "--list"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) >= 5 and all(out)


def test_pytest_selections_split_the_cuda_tests():
    # `tests` and `tests_paths` together run every CUDA test, each once.
    names = ("tests", "tests_paths")
    sel = {n: w for n, w in _steps() if n in names}
    assert set(sel) == set(names)

    def collected(words):
        args = words[words.index("-m") + 2:]             # after "-m pytest"
        args = [str(ROOT / a) if a == "tests" else a for a in args
                if a not in ("-q", "-v") and not a.startswith(("--junitxml", "--durations"))]
        # From tests/: `python -m pytest` puts its folder first on sys.path, and the
        # repository root would shadow an installed (non-editable) blurfast.
        r = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", *args],
                           cwd=ROOT / "tests", capture_output=True, text=True)
        ids = {ln for ln in r.stdout.splitlines() if "::" in ln}
        assert r.returncode == 0 and ids, r.stdout[-2000:] + r.stderr[-2000:]
        return ids

    parts = [collected(sel[n]) for n in names]
    all_cuda = collected(["-m", "pytest", "tests", "-m", "cuda", "-p", "no:cacheprovider"])
    assert sum(map(len, parts)) == len(all_cuda) and set().union(*parts) == all_cuda


@pytest.mark.parametrize("env, says", [
    ({"PYTHON": "/no/such/python3.12"}, "PYTHON: no Python 3.12 found"),
    ({"PYTHON": sys.executable, "CUDA_HOME": "/no/such/cuda"}, "CUDA_HOME: no bin/nvcc"),
])
def test_prebuild_script_names_what_is_missing(env, says, tmp_path):
    # scripts/prebuild_gpu_ext.sh stops before making a venv or building when the
    # interpreter or nvcc is missing, and says which.
    r = subprocess.run(["bash", str(ROOT / "scripts" / "prebuild_gpu_ext.sh")],
                       env={**os.environ, "VENV": str(tmp_path / "venv"), **env},
                       capture_output=True, text=True)
    assert r.returncode == 2 and says in r.stderr
    assert not (tmp_path / "venv").exists()


def test_prebuild_completes_a_venv_whose_install_failed(tmp_path):
    # The venv was made once, when it had no bin/python: a pip install that failed
    # (no network) left a venv without pybind11 that every later run used as it was.
    calls, fail = tmp_path / "calls.log", tmp_path / "pip_fails"
    py = _fake_tool(tmp_path / "py", f"""[[ $1 == -m && $2 == venv ]] || exit 0
mkdir -p "$3/bin"
printf '#!/usr/bin/env bash\\nexit 0\\n' > "$3/bin/python"
printf '#!/usr/bin/env bash\\necho pip >> {calls}\\n[[ ! -e {fail} ]]\\n' > "$3/bin/pip"
chmod +x "$3/bin/python" "$3/bin/pip"
""")
    (tmp_path / "cuda" / "bin").mkdir(parents=True)
    _fake_tool(tmp_path / "cuda" / "bin" / "nvcc", "exit 0\n")
    env = {**os.environ, "PYTHON": str(py), "VENV": str(tmp_path / "venv"),
           "CUDA_HOME": str(tmp_path / "cuda")}
    script = ["bash", str(ROOT / "scripts" / "prebuild_gpu_ext.sh")]
    fail.touch()
    assert subprocess.run(script, env=env, capture_output=True).returncode != 0
    fail.unlink()
    r = subprocess.run(script, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert calls.read_text().split() == ["pip", "pip"]       # installed again, then used
    assert subprocess.run(script, env=env, capture_output=True).returncode == 0
    assert calls.read_text().split() == ["pip", "pip"]


def test_profile_step_sums_the_gpu_activities_per_step():
    # profile_step.py's line that says whether the profiled step keeps the GPU busy: its
    # device events (kernels, copies) counted and summed per step, CPU events left out.
    from types import SimpleNamespace as NS
    busy = runpy.run_path(str(ROOT / "scripts" / "profile_step.py"))["gpu_busy"]

    def event(kind, us):
        return NS(device_type=f"DeviceType.{kind}", time_range=NS(elapsed_us=lambda: us))
    prof = NS(events=lambda: [event("CUDA", 1500.0)] * 6 + [event("CPU", 9e6)] * 4)
    assert busy(prof, steps=3, wall_ms=12.0) == (
        "GPU activities (kernels, copies) per step: 2, their summed time 3.00 ms per step "
        "against 12.00 ms of wall-clock time (25%)")
    assert busy(prof, steps=3, wall_ms=None).endswith("3.00 ms per step")
    assert busy(NS(events=None), steps=3, wall_ms=None).startswith("GPU busy time: not available")


def test_a_second_call_keeps_the_first_calls_results(tmp_path):
    # A second call into the same folder (GPU_CHECK_ONLY without the benches and tests)
    # leaves the first call's bench.json and junit files alone, and its merge keeps the rows.
    import json
    out = tmp_path / "gc"
    out.mkdir()
    row = {"case": "dct2", "shape": [16, 3, 64, 64], "impl": "torch_fp32", "dtype": "float32",
           "median_us": 10.0, "gbps": 1.0, "copy_fraction": 0.5, "speedup_vs_torch_fp32": 1.0}
    (out / "bench.json").write_text(json.dumps(
        {"gpu": "Test GPU", "driver": "1", "torch": "2", "date": "2026-01-02T00:00:00+00:00",
         "copy_gbps": 2.0, "device": "cuda", "rows": [row], "skipped": []}))
    (out / "junit-cuda.xml").write_text('<testsuite tests="1" failures="0" errors="0" '
                                        'skipped="0"/>')
    # No step runs; the merge imports the installed package (no PYTHONPATH: a source tree
    # without its built extension would shadow it).
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out),
           "GPU_CHECK_SKIP": " ".join(n for n, _ in _steps()), "GPU_CHECK_BUDGET": "120"}
    r = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (out / "bench.json").exists() and (out / "junit-cuda.xml").exists()
    assert "junit" not in (out / "summary.txt").read_text()    # tests did not run here
    merged = json.loads((out / "results" / "test-gpu-2026-01-02.json").read_text())
    assert [r["impl"] for r in merged["rows"]] == ["torch_fp32"]


def test_a_step_that_runs_again_leaves_no_stale_results(tmp_path):
    # Only bench.json was removed before its step ran: a bench_extra or steps step that
    # ran again and failed before writing left the earlier file, merged as this run's.
    import json
    # every step that writes a JSON of its own, bench's kept as not selected
    kernels = ("bench_variants", "bench_columns", "bench_extra")
    out = _write_results(tmp_path / "gc", bench=dict(_HEADER, rows=[_ROW], skipped=[]),
                         **{s: dict(_HEADER, rows=[_ROW], skipped=[]) for s in kernels},
                         **{s: dict(_HEADER, rows=[], skipped=[], model_steps=[_STEP])
                            for s in ("steps", "steps64")})
    py = _fake_tool(tmp_path / "py", '[[ "$*" == *merge_results* ]] && exec '
                    f'{shlex.quote(sys.executable)} "$@"\nexit 1\n')
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True,
                       env={**env, "PYTHON": str(py), "OUT": str(out),
                            "GPU_CHECK_ONLY": " ".join(kernels + ("steps", "steps64")),
                            "GPU_CHECK_BUDGET": "120"})
    assert r.returncode == 1
    assert sorted(p.name for p in out.glob("*.json")) == ["bench.json"]
    (merged,) = (out / "results").iterdir()          # the first call's bench.json only
    assert list(json.loads(merged.read_text())["runs"]) == ["bench"]


def _fake_tool(path, body):
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


# A stand-in ncu's report: the file --export names, as ncu writes it (.ncu-rep added).
_NCU_EXPORT = ('while [[ $# -gt 0 ]]; do [[ $1 == --export ]] && : > "$2.ncu-rep"; shift; '
               'done\n')


def test_ncu_step_fails_when_ncu_writes_no_report(tmp_path):
    # ncu that cannot read the counters (seen on one runtime of the GPU machines) may run
    # the program and exit 0: the step passed with nothing profiled.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_tool(bin_dir / "ncu", 'echo "==ERROR== Failed to initialize the profiler"\n')
    out = tmp_path / "gc"
    subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True,
                   env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                        "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "OUT": str(out),
                        "GPU_CHECK_ONLY": "ncu", "GPU_CHECK_BUDGET": "120"})
    assert "ncu FAIL exit code 1" in (out / "summary.txt").read_text()
    assert "no report ncu-0.ncu-rep: case 0 was not profiled" in (out / "ncu.log").read_text()


@pytest.mark.parametrize("lists", [True, False])
def test_ncu_step_lists_the_cases_once_and_profiles_each(tmp_path, lists):
    # The ncu step (with a stand-in ncu that records its arguments): ncu_case.py --list runs
    # once (each run imports torch), then one ncu run per case with --case K; a --list that
    # prints nothing fails the step instead of passing with nothing profiled.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.log"
    _fake_tool(bin_dir / "ncu", f'echo "ncu $*" >> {calls}\n' + _NCU_EXPORT)
    py = _fake_tool(tmp_path / "py", f'echo "py $*" >> {calls}\n'
                    + (f'exec {sys.executable} "$@"\n' if lists else "exit 1\n"))
    out = tmp_path / "gc"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(py),
           "PYTHONPATH": str(ROOT), "OUT": str(out), "GPU_CHECK_ONLY": "ncu",
           "GPU_CHECK_BUDGET": "120"}
    subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)
    log = calls.read_text().splitlines()
    assert [ln for ln in log if ln.endswith("--list")] == ["py scripts/ncu_case.py --list"]
    summary = (out / "summary.txt").read_text()
    if not lists:
        assert "ncu FAIL" in summary and not [ln for ln in log if ln.startswith("ncu")]
        return
    names = subprocess.run([sys.executable, str(ROOT / "scripts" / "ncu_case.py"), "--list"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    runs = [ln for ln in log if ln.startswith("ncu --profile-from-start off")]
    assert [r.split("--case ")[-1] for r in runs] == [str(k) for k in range(len(names))]
    assert all(f"--export {out}/ncu-{k} " in r for k, r in enumerate(runs))
    assert "ncu PASS" in summary


_HEADER = {"gpu": "NVIDIA H200", "driver": "580.1", "torch": "2.13.0",
           "date": "2026-11-28T10:00:00+00:00", "copy_gbps": 4000.0, "device": "cuda"}
_ROW = {"case": "q_sample", "shape": [256, 3, 64, 64], "impl": "blurfast", "dtype": "float32",
        "median_us": 20.0, "gbps": 1887.4, "copy_fraction": 0.4719,
        "speedup_vs_torch_fp32": 10.5, "wall_us": 25.0, "launches": 1}
_STEP = {"case": "train_step", "preset": "paper64", "shape": [16, 3, 64, 64],
         "impl": "blurfast", "ms_per_step": 20.0, "images_per_s": 800.0,
         "speedup_vs_torch_default": 5.5, "speedup_vs_torch_fp32": 6.0}


def _tree_with_extension(dest: Path) -> Path:
    """``dest`` holding copies of the repository's blurfast/ and scripts/, with the
    compiled extension in blurfast/ (CI installs the package, so its source tree has none;
    the GPU machine's tree has one after the `ext` step)."""
    import shutil

    import blurfast._C
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "blurfast", dest / "blurfast", ignore=skip)
    shutil.copytree(ROOT / "scripts", dest / "scripts", ignore=skip)
    if not list((dest / "blurfast").glob("_C.*")):
        shutil.copy2(blurfast._C.__file__, dest / "blurfast")
    return dest


def _write_results(folder, **files):
    import json
    folder.mkdir(exist_ok=True)
    for name, d in files.items():
        (folder / f"{name}.json").write_text(d if isinstance(d, str) else json.dumps(d))
    return folder


def _merge():
    return runpy.run_path(str(ROOT / "scripts" / "merge_results.py"), run_name="test")["main"]


def test_merge_keeps_the_shape_and_names_the_partial_run(tmp_path, capsys):
    import json
    out = _write_results(
        tmp_path / "gc",
        bench=dict(_HEADER, partial=True, rows=[_ROW], skipped=[]),    # cut by its limit
        bench_extra=dict(_HEADER, copy_gbps=3900.0,
                         rows=[dict(_ROW, shape=[256, 3, 32, 32])], skipped=[]),
        steps=dict(_HEADER, rows=[], skipped=[], model_steps=[_STEP]))
    name = _merge()(str(out))
    assert name == "nvidia-h200-2026-11-28.json"
    m = json.loads((out / "results" / name).read_text())
    assert {k: m[k] for k in _HEADER} == _HEADER                  # the first file's header
    assert [(r["run"], r["shape"][-1]) for r in m["rows"]] == [("bench", 64), ("bench_extra", 32)]
    assert all(set(_ROW) <= set(r) for r in m["rows"])
    assert m["model_steps"] == [dict(_STEP, run="steps")]
    # Which run was cut is kept (each run's rows are compared within that run's copy).
    assert m["partial"] is True
    assert m["runs"] == {"bench": {"copy_gbps": 4000.0, "partial": True},
                         "bench_extra": {"copy_gbps": 3900.0}, "steps": {"copy_gbps": 4000.0}}
    assert "partial: bench.json" in capsys.readouterr().err
    assert [t["met"] for t in m["targets"]] == [False, True]       # 47% of copy; 6.0x


def test_merge_that_cannot_rename_leaves_no_temporary_file(tmp_path):
    # The merged file was written to a fixed NAME.json.tmp and renamed without a cleanup:
    # a rename that failed (here a folder of that name) left the .tmp in results/.
    out = _write_results(tmp_path / "gc", bench=dict(_HEADER, rows=[_ROW], skipped=[]))
    (out / "results" / "nvidia-h200-2026-11-28.json").mkdir(parents=True)
    with pytest.raises(OSError):
        _merge()(str(out))
    assert [p.name for p in (out / "results").iterdir()] == ["nvidia-h200-2026-11-28.json"]


@pytest.mark.parametrize("files, says", [
    ({"bench": '{"gpu": "NVIDIA H200", "rows": ['}, "bench.json: not readable as JSON"),
    ({"bench": {**_HEADER, "rows": [{k: v for k, v in _ROW.items() if k != "median_us"}]}},
     "bench.json: rows[0] is not a row with the keys"),
    ({"bench": {k: v for k, v in _HEADER.items() if k != "copy_gbps"} | {"rows": []}},
     "bench.json: no copy_gbps"),
    ({"steps": {**_HEADER, "rows": []}}, "steps.json: no model_steps"),
    ({"steps": {**_HEADER, "rows": [], "model_steps": [{"case": "train_step"}]}},
     "steps.json: model_steps[0] is not a row"),
    # A stale file of another machine or torch in the folder of this run.
    ({"bench": {**_HEADER, "rows": [_ROW]},
      "bench_extra": {**_HEADER, "gpu": "NVIDIA H100 80GB HBM3", "rows": [_ROW]}},
     "bench_extra.json has gpu 'NVIDIA H100 80GB HBM3', bench.json 'NVIDIA H200'"),
    ({"bench": {**_HEADER, "rows": [_ROW]},
      "steps": {**_HEADER, "torch": "2.11.0", "rows": [], "model_steps": []}},
     "steps.json has torch '2.11.0', bench.json '2.13.0'"),
])
def test_merge_refuses_input_not_of_the_benchs_shape(tmp_path, files, says):
    out = _write_results(tmp_path / "gc", **files)
    with pytest.raises(SystemExit) as e:
        _merge()(str(out))
    assert says in str(e.value)
    assert not (out / "results").exists()


@pytest.mark.parametrize("args", [[], ["a", "b"], ["no/such/folder"]])
def test_merge_names_its_argument_when_not_given_one_folder(args, tmp_path):
    # No argument was an IndexError traceback; a folder that is not there said only
    # "no results in ...".
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "merge_results.py"), *args],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == (f"FOLDER: expected one folder (gpu_check.sh's OUT), got {args}; "
                        "usage: python scripts/merge_results.py FOLDER\n")


def test_a_refused_merge_fails_the_script_and_says_why(tmp_path):
    # The script ran the merge with `|| true` and its stderr outside the logs: a refused
    # merge left no results file, and the run still said PASS.
    out = _write_results(tmp_path / "gc", bench='{"gpu": "NVIDIA H200", "rows": [')
    # the merge imports the installed blurfast (this source tree has no extension in CI)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True,
                       env={**env, "PYTHON": sys.executable, "OUT": str(out),
                            "GPU_CHECK_BUDGET": "120",
                            "GPU_CHECK_SKIP": " ".join(_script_steps())})
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "merge FAIL" in (out / "summary.txt").read_text().splitlines()
    log = (out / "gpu_check.log").read_text()
    assert "FAIL merge" in log and "bench.json: not readable as JSON" in log
    assert "RESULT: FAIL" in log and not (out / "results").exists()


@pytest.mark.parametrize("script, args", [
    ("sanitizer_case.py", ["--device", "cpu", "--max-hw", "8"]),
    ("ncu_case.py", ["--list"]),
])
def test_the_scripts_the_steps_run_import_their_own_tree(tmp_path, script, args):
    # memcheck and racecheck run `python scripts/sanitizer_case.py`: Python puts scripts/
    # first on the path, so without PYTHONPATH it imported another installed blurfast (or
    # none: ModuleNotFoundError under the sanitizer) instead of the tree being checked.
    # The tree: a copy with its extension, as the GPU machine's after `ext` (so it is not
    # the package this Python has installed).
    tree = _tree_with_extension(tmp_path / "tree")
    code = ("import runpy, sys; sys.argv = [sys.argv[1], *sys.argv[2:]]\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            "import blurfast; print(blurfast.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-c", code, str(tree / "scripts" / script), *args],
                       cwd=tmp_path, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert r.stdout.splitlines()[-1] == str(tree / "blurfast" / "__init__.py")


def test_the_script_ends_within_its_budget_when_the_merge_would_not(tmp_path):
    # The merge ran after the steps with no limit: a last step cut by the budget, then the
    # merge's imports, ran past GPU_CHECK_BUDGET into the device call's margin for the tar
    # of $OUT (a call killed there returns nothing). Here every Python call hangs.
    import time
    py = _fake_tool(tmp_path / "py", "sleep 60\n")
    out = _write_results(tmp_path / "gc", bench=dict(_HEADER, rows=[_ROW], skipped=[]))
    t0 = time.monotonic()
    r = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHON": str(py), "OUT": str(out),
                            "GPU_CHECK_ONLY": "info", "GPU_CHECK_BUDGET": "16"})
    took = time.monotonic() - t0
    assert r.returncode == 1 and took < 16 + 3, (took, r.stdout[-2000:])
    log = (out / "gpu_check.log").read_text()
    # the step's limit is what the budget has left when it starts (13 s on an idle
    # machine, less where the script's start took longer)
    assert re.search(r"FAIL info: timed out after 1[0-3]s", log) and "merge not run" in log
    assert (out / "bench.json").exists() and not (out / "results").exists()


def test_a_wrong_output_fails_every_bench_step(monkeypatch, tmp_path):
    # A row whose output fails the float64 check is not timed but listed in `skipped`;
    # bench_variants, bench_columns and bench_extra (the wide geometry in bfloat16 and the
    # 256 x 256 passes, on trial) ran without --strict and passed with such a row.
    import blurfast.bench as bench
    wrong = {"case": "q_sample", "shape": [16, 3, 64, 64], "impl": "blurfast_wide",
             "dtype": "bfloat16", "reason": "WrongOutput: x_t ...", "error": True,
             "wrong_output": True}

    def fake_run(device, quick, **kw):            # the bench's result, one row wrong
        return dict(_HEADER, rows=[_ROW], skipped=[wrong])
    monkeypatch.setattr(bench, "run", fake_run)
    monkeypatch.setattr(bench, "check_gpu_seen", lambda name: None)
    benches = {n: w for n, w in _steps() if "benchmarks/run.py" in w and "--no-steps" in w}
    assert {"bench", "bench_variants", "bench_columns", "bench_extra"} <= set(benches)
    for name, words in benches.items():
        args = _python_args(words, tmp_path)
        main = runpy.run_path(str(ROOT / args[0]), run_name="gpu_check_test")["main"]
        assert main(args[1:]) == 1, f"step {name} passes with a wrong output"


def _profile_step_on_the_cpu(monkeypatch, steps):
    """scripts/profile_step.py as a module whose CUDA calls are the CPU's, and whose
    make_step(preset, res, batch, **kw) gives steps(kw): a step function, or raises."""
    import importlib.util
    import torch
    spec = importlib.util.spec_from_file_location("profile_step_test",
                                                  ROOT / "scripts" / "profile_step.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, value in (("is_available", lambda: True), ("get_device_name", lambda: "Fake"),
                        ("synchronize", lambda: None), ("empty_cache", lambda: None)):
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(mod, "make_step", lambda preset, res, batch, **kw: steps(kw))
    return mod


def test_profile_step_goes_on_past_a_failed_configuration(monkeypatch, tmp_path):
    # A compile that raised in one configuration (channels_last, new) ended the script:
    # no profile of the compiled step, the step's 300 s spent for nothing.
    import torch
    from blurfast.bench_steps import backend_flags

    def steps(kw):
        if kw.get("channels_last"):
            raise RuntimeError("Inductor: a compile error")
        a = torch.randn(64, 64)
        return lambda: a @ a
    mod = _profile_step_on_the_cpu(monkeypatch, steps)
    out = tmp_path / "profile_step.txt"
    with backend_flags("torch_default"):          # restores the flags main() sets
        rc = mod.main(["--compile", "--compiled-only", "--iters", "2", "--out", str(out)])
    assert rc == 1
    text = out.read_text()
    assert "bf16 + compile + graph + channels_last failed: RuntimeError: Inductor: a compile " \
        "error" in text.splitlines()
    assert text.count(" ms/step ") == 2 and "the fastest compiled step, by GPU time" in text


def test_profile_step_keeps_the_lines_of_a_run_cut_short(monkeypatch, tmp_path):
    # --out was written only at the end: a run killed by its time limit (three compiles
    # in 300 s) left no file.
    import torch
    from blurfast.bench_steps import backend_flags

    def steps(kw):
        if kw.get("channels_last"):
            raise KeyboardInterrupt                # stands for the time limit's signal
        a = torch.randn(64, 64)
        return lambda: a @ a
    mod = _profile_step_on_the_cpu(monkeypatch, steps)
    out = tmp_path / "profile_step.txt"
    with backend_flags("torch_default"), pytest.raises(KeyboardInterrupt):
        mod.main(["--compile", "--compiled-only", "--iters", "2", "--out", str(out)])
    lines = out.read_text().splitlines()
    assert lines[0].startswith("Fake | torch") and len(lines) == 3
    assert lines[1].startswith("bf16 + compile + graph ") and " ms/step " in lines[2]
