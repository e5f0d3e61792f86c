#!/usr/bin/env bash
# A race check of the block programs without a GPU: scripts/racecheck_tsan.cpp runs each
# program with one OS thread per GPU thread, a pthread barrier per phase and a copy-engine
# thread per GPU thread for cp.async, under ThreadSanitizer (see the .cpp's header for
# what it reports). Every geometry of the plane program (float32; the fast geometries in
# bfloat16 too) in dct2, idct2 and each spectral form (x2, g, noise_out on and off, zb
# given), with and without prefetch, on 2 blocks that loop over plane groups with a
# partial last group; the column program at H = 32 .. 256; both strip programs at every
# row length, in2, out2 and the same-layout pass.
#
#   bash scripts/racecheck_tsan.sh [GROUP ...]     # default: every group
#   bash scripts/racecheck_tsan.sh --selfcheck     # planted bugs must be reported
#
# GROUP: wide fast64s2 fast64 fast32 fast128 dense32 dense64 dense64s2 dense128 dense128s2
# bf16 column strip. Builds in a temporary folder from a copy of csrc/ (emu_check given a
# 16- and 8-byte alignment check there; the tree is left alone). g++ with libtsan; on the
# 2-core development machine 20 s to build and about 5 min for every group (--selfcheck:
# 3 min). Exit 0 when no group printed a TSan report, a mismatch, a non-finite output or an
# alignment error.
#
# --selfcheck builds six variants of the programs: five with a planted hazard (the wide
# geometry's map copies waited for after the combine reads them; the prefetched x1
# waited for in the first pass's phase of its group, which reads it (one barrier short); the paired transforms' second half on the first
# half's scratch buffer; a read of another thread's prefetched chunk after this thread's
# own wait, with no barrier between, whose value goes unused (the emulator cannot see
# it); the column program's forward pass and its transposed write in one phase), each
# of which must be reported, and one that must pass (each thread reading only its own
# copied maps after its own wait, no barrier).
set -uo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CXX=${CXX:-g++}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/blurfast-racecheck.XXXXXX")
say() { echo "racecheck_tsan: $*"; }

# A copy of csrc/ whose emu_check also checks the alignment of 16- and 8-byte accesses.
prepare() {   # prepare DIR
  cp -r "$ROOT/csrc" "$1"
  python3 - "$1/line_passes.h" <<'EOF' || return 1
import sys
p = sys.argv[1]
s = open(p).read()
old = "inline void emu_check(const void* p, size_t bytes, bool write) {\n  if (!emu_memory) return;"
new = ("inline void emu_check(const void* p, size_t bytes, bool write) {\n"
       "  if ((bytes == 16 || bytes == 8) && ((uintptr_t)p % bytes) != 0) {\n"
       "    fprintf(stderr, \"MISALIGNED %zu-byte access %p\\n\", bytes, p);\n"
       "    abort();\n"
       "  }\n"
       "  if (!emu_memory) return;")
assert s.count(old) == 1, "emu_check changed: update racecheck_tsan.sh"
s = s.replace(old, new).replace("#include <cstring>", "#include <cstdio>\n#include <cstdlib>\n#include <cstring>", 1)
open(p, "w").write(s)
EOF
}

build() {     # build SRC_DIR EXE
  "$CXX" -std=c++17 -O1 -g -fsanitize=thread -I"$1" -o "$2" "$ROOT/scripts/racecheck_tsan.cpp" \
    -lpthread > "$2.build.log" 2>&1 || { tail -n 30 "$2.build.log"; return 1; }
}

run_group() { # run_group EXE GROUP LOG -> prints "reports problems"
  TSAN_OPTIONS="halt_on_error=0 report_signal_unsafe=0 exitcode=0" "$1" "$2" > "$3" 2>&1
  local rc=$?
  echo "$(grep -c 'WARNING: ThreadSanitizer' "$3") $(grep -cE 'MISMATCH|NON-FINITE|MISALIGNED|never waited' "$3") $rc"
}

prepare "$WORK/csrc" || { say "FAIL: cannot prepare the sources"; exit 2; }

if [ "${1:-}" = "--selfcheck" ]; then
  plant() {   # plant NAME FILE OLD NEW [OLD NEW]: a copy of the sources with the edits
    local d="$WORK/$1" f=$2
    shift 2
    cp -r "$WORK/csrc" "$d"
    python3 - "$d/$f" "$@" <<'EOF'
import sys
p, *edits = sys.argv[1:]
s = open(p).read()
for old, new in zip(edits[::2], edits[1::2]):
    assert s.count(old) == 1, old
    s = s.replace(old, new)
open(p, "w").write(s)
EOF
  }
  WAIT="if (early_maps) ctx.wait_async();      // the maps, before the phase's barrier"
  COMBINE="combine_group<G, true>(job, buf(0), buf(2), p0, tid, noise_at, buf(maps_at));"
  plant maps_wait_late plane_program.h "$WAIT" "" "$COMBINE" "$COMBINE ctx.wait_async();" || exit 2
  plant maps_own_wait plane_program.h "$WAIT" "" "$COMBINE" "ctx.wait_async(); $COMBINE" || exit 2
  plant prefetch_wait_late plane_program.h \
    "          ctx.wait_async();        // this thread's copies into buffer 0 have landed" "" \
    "  auto pass = [&](int src, int dst, auto inverse_) {
    ctx.phase([&](int tid) {" "  bool late_wait = false;
  auto pass = [&](int src, int dst, auto inverse_) {
    ctx.phase([&](int tid) {
      if (late_wait) ctx.wait_async();" \
    "    if (prefetched) {
      const int t = first;" "    late_wait = prefetched;
    if (prefetched) {
      const int t = first;" || exit 2
  plant pair_scratch plane_program.h "second ? (k ? a2 : s2)" "second ? (k ? a2 : s)" || exit 2
  plant read_unbarriered plane_program.h "$WAIT
      }
    });" "$WAIT
      }
      if (prefetched) {   // planted: another thread's chunk, no barrier since its wait
        float v[4];
        ld4(buf(0) + 4 * ((tid + 1) % G::kThreads), v);
        if (v[0] == 12345.f) printf(\"x\");
      }
    });" || exit 2
  plant column_one_phase column_program.h "        fast_forward_row<L, decltype(role_)::value>(B(s), tid % R, keep(tid).h);
      });
    });
    ctx.phase([&](int tid) {                              // X[k][l] at row k, column l - l0
      const int s = tid / (2 * R), role = (tid / R) % 2, q = tid % R;
      if (s == 1 && !two_in) return;" "        fast_forward_row<L, decltype(role_)::value>(B(s), tid % R, keep(tid).h);
      });
      const int role = (tid / R) % 2, q = tid % R;" || exit 2
  pids=()
  for v in maps_wait_late maps_own_wait prefetch_wait_late pair_scratch read_unbarriered column_one_phase; do
    build "$WORK/$v" "$WORK/rc_$v" & pids+=($!)
  done
  for p in "${pids[@]}"; do wait "$p" || { say "FAIL: build"; exit 2; }; done
  bad=0
  check() {   # check VARIANT GROUP EXPECT(report|clean)
    read -r reports problems rc < <(run_group "$WORK/rc_$1" "$2" "$WORK/$1.log")
    local got=clean
    if [ "$reports" -gt 0 ] || [ "$problems" -gt 0 ] || [ "$rc" -ne 0 ]; then got=report; fi
    say "$1 ($2): $reports TSan reports, $problems other problems: $got (want $3)"
    [ "$got" = "$3" ] || bad=1
  }
  check maps_wait_late wide report
  check maps_own_wait wide clean
  check pair_scratch wide report
  check prefetch_wait_late fast64 report
  check read_unbarriered fast64 report
  check column_one_phase column report
  if [ "$bad" = 0 ]; then say "PASS: every planted hazard reported, the clean variant clean"; rm -rf "$WORK"; exit 0; fi
  say "FAIL: see the logs in $WORK"
  exit 1
fi

build "$WORK/csrc" "$WORK/racecheck" || { say "FAIL: build"; exit 2; }
groups=("$@")
if [ ${#groups[@]} -eq 0 ]; then
  groups=(wide fast64s2 fast64 fast32 fast128 dense32 dense64 dense64s2 dense128 dense128s2 bf16
          column strip)
fi
bad=0
for g in "${groups[@]}"; do
  read -r reports problems rc < <(run_group "$WORK/racecheck" "$g" "$WORK/$g.log")
  say "$g: $(grep -c '^done' "$WORK/$g.log") cases, $reports TSan reports, $problems other problems, exit $rc"
  if [ "$reports" -gt 0 ] || [ "$problems" -gt 0 ] || [ "$rc" -ne 0 ]; then bad=1; fi
done
if [ "$bad" = 0 ]; then say "PASS"; rm -rf "$WORK"; exit 0; fi
say "FAIL: logs in $WORK"
exit 1
