"""The GPU block programs' synchronisation, checked on the CPU: scripts/racecheck_tsan.sh
runs them with one OS thread per GPU thread, a barrier per phase and a copy thread per
GPU thread for the asynchronous copies, under ThreadSanitizer (docs/kernels.md). The
geometries that serve default calls at 64 x 64 and the column program of 256 x 256
(about 70 s on 2 cores; every group and the planted-hazard self-check: run the script)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tsan_unavailable(tmp_path):
    """Why ThreadSanitizer cannot check here (None when it can): g++ missing, libtsan
    missing, or a TSan program that does not start (some kernels' address-space layouts)."""
    cxx = shutil.which("g++")
    if cxx is None:
        return "g++ not found"
    src, exe = tmp_path / "t.cpp", tmp_path / "t"
    src.write_text("#include <thread>\nint main() { std::thread t([] {}); t.join(); }\n")
    r = subprocess.run([cxx, "-fsanitize=thread", "-pthread", str(src), "-o", str(exe)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        return "g++ cannot link ThreadSanitizer: " + (r.stderr.strip().splitlines() or [""])[-1]
    r = subprocess.run([str(exe)], capture_output=True, text=True)
    if r.returncode != 0:
        return "a ThreadSanitizer program does not run here: " + \
            (r.stderr.strip().splitlines() or [""])[0]
    return None


def test_default_block_programs_have_no_race(tmp_path):
    why = _tsan_unavailable(tmp_path)
    if why:
        pytest.skip(why)
    r = subprocess.run(["bash", str(ROOT / "scripts" / "racecheck_tsan.sh"),
                        "wide", "fast64s2", "fast64", "column"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stdout.count("0 TSan reports, 0 other problems") == 4, r.stdout[-4000:]
