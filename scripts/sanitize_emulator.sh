#!/usr/bin/env bash
# The CPU code of blurfast._C under AddressSanitizer and UndefinedBehaviorSanitizer: the
# block programs as the emulator runs them (tests/test_emulated_kernels.py, with the
# emulator's own checks: tests/test_emulator_selfcheck.py) and the CPU kernels
# (tests/test_ops.py). The emulator's own checks (emu_check) cover only ld4, st4
# and store1; ASan also sees plain indexing past the end of a block's shared memory (an
# exact-size std::vector) and of the call's tensors, and
# out-of-bounds accesses to a thread's local arrays; UBSan sees shifts, signed overflow,
# misaligned accesses and the like.
#
#   bash scripts/sanitize_emulator.sh [PYTEST ARGS...]      # e.g. -k strip
#
# Builds a sanitized copy of the extension (CMake, BLURFAST_SANITIZE=address,undefined,
# CUDA off, -O0) into a temporary folder, leaving the source tree and any installed
# blurfast alone, and runs the two test files against it with the sanitizer runtimes
# preloaded (Python and torch are not instrumented). Any sanitizer report stops the
# tests (pytest leaves C-level stderr alone, so the report is in the log). Exit status 0
# only when the tests pass and no report was printed; 1 otherwise, 2 when it cannot run.
# GCC 12, 2 cores: about 1.5 min to build and 3 to 4.5 min of tests (docs/kernels.md).
#
# Environment: PYTHON (default python, else python3), SANITIZE_DIR (build folder, kept;
# default a fresh temporary one, removed on success), CMAKE_BUILD_PARALLEL_LEVEL.
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$(command -v python || command -v python3)}
if [ -n "${SANITIZE_DIR:-}" ]; then
  WORK=$SANITIZE_DIR
  KEEP=1
else
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/blurfast-sanitize.XXXXXX")
  KEEP=0
fi
BUILD=$WORK/build
PKG=$WORK/pkg
mkdir -p "$BUILD" "$PKG/blurfast"
cp "$ROOT"/blurfast/*.py "$PKG/blurfast/"

say() { echo "sanitize_emulator: $*"; }
t0=$(date +%s)

# --- build
command -v cmake >/dev/null || { say "FAIL: no cmake (pip install cmake ninja pybind11)"; exit 2; }
PYBIND11_DIR=$("$PY" -m pybind11 --cmakedir) || { say "FAIL: no pybind11 for $PY"; exit 2; }
gen=()
if command -v ninja >/dev/null 2>&1; then gen=(-G Ninja); fi
if ! cmake -S "$ROOT" -B "$BUILD" "${gen[@]}" -DCMAKE_BUILD_TYPE=Debug -DBLURFAST_CUDA=OFF \
      -DBLURFAST_SANITIZE=address,undefined -DPython_EXECUTABLE="$PY" \
      -Dpybind11_DIR="$PYBIND11_DIR" -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PKG/blurfast" \
      > "$WORK/build.log" 2>&1 ||
   ! cmake --build "$BUILD" >> "$WORK/build.log" 2>&1; then
  tail -n 40 "$WORK/build.log"
  say "FAIL: build (log: $WORK/build.log)"
  exit 2
fi
t1=$(date +%s)
SO=$(ls "$PKG"/blurfast/_C*.so)
# The runtimes the library was linked with (libasan, libubsan), preloaded ahead of Python.
PRELOAD=$(ldd "$SO" | awk '/libasan|libclang_rt\.asan/ {a = a ":" $3}
                           /libubsan|libclang_rt\.ubsan/ {u = u ":" $3}
                           END {print substr(a u, 2)}')
if [ -z "$PRELOAD" ]; then say "FAIL: no sanitizer runtime linked into $SO"; exit 2; fi
say "built in $((t1 - t0)) s: $SO (preloading $PRELOAD)"

# --- tests, from $WORK so that `import blurfast` finds the sanitized copy, not the tree's
export LD_PRELOAD=$PRELOAD PYTHONPATH=$PKG${PYTHONPATH:+:$PYTHONPATH}
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1     # Python keeps memory at exit
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
export PYTHONUNBUFFERED=1    # a report ends the process: the log still names the test
cd "$WORK" || exit 2
got=$("$PY" -c 'import blurfast._C as c; print(c.__file__)' 2>&1)
if [ "$got" != "$SO" ]; then
  echo "$got"
  say "FAIL: import blurfast._C gave the line above, not $SO"
  exit 2
fi
"$PY" -m pytest -v --capture=sys -p no:cacheprovider --rootdir "$ROOT" \
  "$ROOT/tests/test_emulated_kernels.py" "$ROOT/tests/test_emulator_selfcheck.py" \
  "$ROOT/tests/test_ops.py" "$@" 2>&1 |
  tee "$WORK/pytest.log"
rc=${PIPESTATUS[0]}
t2=$(date +%s)

# --- summary
# One line per report: ASan's "==PID==ERROR: ...", UBSan's "file:line:col: runtime error: ...".
n=$(grep -cE '^==[0-9]+==ERROR: |: runtime error: ' "$WORK/pytest.log")
grep -E '^==[0-9]+==ERROR: |: runtime error: |^SUMMARY: [A-Za-z]+Sanitizer' "$WORK/pytest.log"
say "build $((t1 - t0)) s, tests $((t2 - t1)) s, pytest exit $rc, sanitizer reports: $n"
if [ "$n" -gt 0 ]; then
  say "running when stopped: $(grep -o '^[^ ]*tests/[^ ]*::[^ ]*' "$WORK/pytest.log" | tail -n 1)"
  say "FAIL: sanitizer report above (whole, with stacks: $WORK/pytest.log)"
  exit 1
fi
if [ "$rc" -ne 0 ]; then
  say "FAIL: the tests failed (pytest exit $rc; log $WORK/pytest.log)"
  exit 1
fi
say "PASS: $(tail -n 1 "$WORK/pytest.log")"
if [ "$KEEP" = 0 ]; then rm -rf "$WORK"; fi
exit 0
