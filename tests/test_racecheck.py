"""The GPU block programs' synchronisation, checked on the CPU: scripts/racecheck_tsan.sh
runs them with one OS thread per GPU thread, a barrier per phase and a copy thread per
GPU thread for the asynchronous copies, under ThreadSanitizer (docs/kernels.md). The
geometries that serve default calls at 64 x 64 and the column program of 256 x 256
(about 45 s on 2 cores; every group and the planted-hazard self-check: run the script)."""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tsan_links(tmp_path) -> bool:
    cxx = shutil.which("g++")
    if cxx is None:
        return False
    src = tmp_path / "t.cpp"
    src.write_text("int main() { return 0; }\n")
    r = subprocess.run([cxx, "-fsanitize=thread", str(src), "-o", str(tmp_path / "t")],
                       capture_output=True)
    return r.returncode == 0


def test_default_block_programs_have_no_race(tmp_path):
    if not _tsan_links(tmp_path):
        pytest.skip("g++ with ThreadSanitizer not available")
    r = subprocess.run(["bash", str(ROOT / "scripts" / "racecheck_tsan.sh"),
                        "wide", "fast64s2", "fast64", "column"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert r.stdout.count("0 TSan reports, 0 other problems") == 4, r.stdout[-4000:]
