#!/usr/bin/env bash
# GPU check for blurfast, for a machine with an NVIDIA GPU and no network.
#
#   bash scripts/gpu_check.sh            # results in ./gpu_results
#   OUT=/some/dir bash scripts/gpu_check.sh
#
# Steps (each with its own timeout, all within GPU_CHECK_BUDGET seconds; a
# failing step is logged and the next one runs, but when ext fails the steps after
# info are not started: they would all fail for want of the extension):
#   env        nvidia-smi, driver, python/torch/CUDA/tool versions, date
#   build      BLURFAST_CUDA=1 pip install --no-build-isolation --no-deps -v .
#   ext        make the source tree import the built blurfast._C (tests run from here),
#              and run each op once on the GPU against blurfast.reference
#              (scripts/sanitizer_case.py --quick: a kernel built for another GPU fails here)
#   info       python -m blurfast info
#   tests      pytest tests -m cuda, but test_gpu_paths.py's (log, one line per test,
#              + junit xml)
#   bench      kernel table of issue 6 (3 shapes, float32 + bfloat16, every impl):
#              benchmarks/run.py --device cuda --quick --no-steps --strict -> bench.json
#              (--strict, in every bench step: fails when blurfast or a torch peer raised,
#              or any row's output failed the check against a float64 truth made before
#              timing it; the JSON is rewritten after every case and shape, so a timeout
#              keeps finished rows, which are also in the step's log, a line each)
#   bench_variants  the fast kernel prefetching in every call or in none, and its wide
#              geometry for every call at 64 x 64 (BLURFAST_CUDA_KERNELS=fast+prefetch,
#              fast+noprefetch, fast+wide) beside blurfast, blurfast_dense and torch_fp32,
#              float32 and bfloat16 (wide is the default for float32 fused calls at 64
#              only), and the fused cases with the noise given (blurfast_given_noise: the
#              in-kernel noise's cost), the plane-kernel shapes -> bench_variants.json
#   bench_columns  the fused op at 256 x 256 in three passes (the default since version 8)
#              against version 5's six passes and combine kernel (fast+separate), and
#              in chunks that fill the GPU instead of half its L2 (fast+fill), float32
#              and bfloat16 -> bench_columns.json
#   bench_extra  32x32 and 128x128 rows (blurfast, blurfast_dense, blurfast_simple, torch_fp32)
#   steps      issue 4's goal: the whole training step of paper64 at batch 16 against the
#              paper-style fp32 baselines, blurfast with and without torch.compile inside
#              the CUDA graph; compiled also in channels_last (_cl) and with the bf16
#              weights cast once per step (_cast_once) (each compile takes minutes, so the
#              configurations run in that order; every finished one is in steps.json at
#              once, and one that fails is recorded and skipped)
#   ncu        Nsight Compute (clocks left alone): speed of light, occupancy, stall reasons
#              and their source lines for the kernels of scripts/ncu_case.py, one ncu run
#              per case -> ncu.log, ncu-<case>.ncu-rep
#   memcheck   compute-sanitizer --tool memcheck  python scripts/sanitizer_case.py
#   --- the steps below rarely fit in the first 600 s call: run them in a second one
#   tests_paths  tests/test_gpu_paths.py: train() end to end (CUDA graphs, bf16, and its
#              defaults: compiled model in the graph), cast_once against autocast, the
#              sampler's graphed model, grad_accum and activation checkpointing in a
#              captured step, and a captured step's in-graph NCCL all-reduce (one process)
#   steps64    the training and sampler steps at batch 64, baselines and blurfast, and
#              blurfast_ckpt (activation checkpointing: its time and peak memory)
#              -> steps64.json
#   racecheck  compute-sanitizer --tool racecheck python scripts/sanitizer_case.py
#   profile    training step of paper64 at batch 16 in its compiled configurations
#              (Inductor's cache warm from steps), and the kernels taking the most GPU
#              time in the fastest (scripts/profile_step.py) -> profile_step.txt
# Output in $OUT: <step>.log for each step, gpu_check.log (the running log),
# summary.txt (PASS/FAIL per step), junit-cuda.xml, bench*.json, steps.json, and
# results/<card>-<date>.json: all rows and model steps in one file (commit it to
# benchmarks/results/).
# Exit code 0 only when every step that ran passed (GPU_CHECK_SKIP skips steps) and the
# merge, where it ran, wrote its file; 2 for a knob it cannot read.
#
# Environment knobs:
#   OUT                    output folder (default gpu_results)
#   PYTHON                 interpreter (default: python, else python3)
#   GPU_CHECK_BUDGET       seconds for the whole script (default 560: one device call of
#                          at most 600 s; on an H100 the v4 run spent 149 s building,
#                          66 s testing, 32 s in the benches and 29 s profiling)
#   GPU_CHECK_SKIP         space-separated step names to skip, e.g. "build racecheck"
#                          (here and in GPU_CHECK_ONLY, a name that is no step exits 2
#                          before anything runs)
#   GPU_CHECK_ONLY         space-separated step names to run, the others skipped: a second
#                          call on the machine where the first one built, e.g.
#                          "ext ncu memcheck racecheck" (benchmarks/NOTES.md has the order
#                          of the next run; every step together takes longer than one
#                          600 s device call)
#   PYTHONPATH=<repo> with GPU_CHECK_SKIP=build: test an extension built on another machine
#                          for this Python and GPU (scripts/prebuild_gpu_ext.sh; the
#                          blurfast/_C.cpython-*.so it prints carried along)
#   BLURFAST_CUDA_ARCHS    passed to the build; when unset, this script builds only
#                          for the GPU present (e.g. "90" on an H100) to save time;
#                          GPU_CHECK_ALL_ARCHS=1 keeps the package's default list.
set -euo pipefail

# Every step, in the order the script runs them: what GPU_CHECK_ONLY and GPU_CHECK_SKIP
# may name. A name outside it is refused before anything runs (a typo would otherwise
# skip a step, or run every other one, unnoticed until the GPU time is spent).
STEPS="env build ext info tests bench bench_variants bench_columns bench_extra steps ncu \
memcheck tests_paths steps64 racecheck profile"
for var in GPU_CHECK_ONLY GPU_CHECK_SKIP; do
  read -ra names <<< "${!var:-}"
  for name in "${names[@]}"; do
    if [[ " $STEPS " != *" $name "* ]]; then
      echo "gpu_check.sh: $var: unknown step '$name'; expected names from: $STEPS" >&2
      exit 2
    fi
  done
  printf -v "$var" '%s' "${names[*]}"    # the names single-spaced, "" when only blanks
done
if [[ ! ${GPU_CHECK_BUDGET:-560} =~ ^[0-9]+$ ]]; then
  echo "gpu_check.sh: GPU_CHECK_BUDGET: expected whole seconds, got '$GPU_CHECK_BUDGET'" >&2
  exit 2
fi

OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PY=${PYTHON:-$(command -v python || command -v python3 || echo python3)}
BUDGET=${GPU_CHECK_BUDGET:-560}
SKIP=${GPU_CHECK_SKIP:-}
ONLY=${GPU_CHECK_ONLY:-}
START=$SECONDS
FAILED=0
EXT_FAILED=0    # 1 once ext failed: the steps after info then have no extension to run
LOG=$OUT/gpu_check.log
SUMMARY=$OUT/summary.txt
: > "$LOG"
: > "$SUMMARY"
export PY OUT ROOT
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
# nvcc and compute-sanitizer where CUDA installs them, if they are not on PATH.
CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
for d in "$CUDA_HOME/bin" "$CUDA_HOME/compute-sanitizer"; do
  if [[ -d "$d" && ":$PATH:" != *":$d:"* ]]; then PATH="$PATH:$d"; fi
done
# ncu: Nsight Compute's own folder when it is not on PATH, the newest version where
# several are installed (by version, not name: 2025.10 after 2025.3).
if ! command -v ncu > /dev/null; then
  ncu_dir=$(for d in /opt/nvidia/nsight-compute/* "$CUDA_HOME"/nsight-compute*; do
              if [[ -x "$d/ncu" ]]; then
                v=${d##*/}; v=${v#nsight-compute}; printf '%s\t%s\n' "${v#-}" "$d"
              fi
            done | sort -t $'\t' -k1,1V | tail -n 1 | cut -f 2)
  if [[ -n "$ncu_dir" ]]; then PATH="$PATH:$ncu_dir"; fi
fi
export PATH

log() { echo "[gpu_check $(date -u +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

# selected NAME: whether step NAME runs (GPU_CHECK_SKIP, GPU_CHECK_ONLY).
selected() {
  [[ " $SKIP " != *" $1 "* && ( -z "$ONLY" || " $ONLY " == *" $1 "* ) ]]
}

# step NAME TIMEOUT_S CMD [ARGS...]: run CMD with stdout+stderr to $OUT/NAME.log.
step() {
  local name=$1 limit=$2
  shift 2
  if [[ " $STEPS " != *" $name "* ]]; then
    echo "gpu_check.sh: step $name is not in STEPS" >&2
    exit 2
  fi
  if ! selected "$name"; then
    log "SKIP $name (GPU_CHECK_SKIP / GPU_CHECK_ONLY)"
    echo "$name SKIPPED" >> "$SUMMARY"
    return 0
  fi
  local left=$((BUDGET - (SECONDS - START) - 3))
  if [[ $left -lt $limit ]]; then limit=$left; fi
  if [[ $limit -lt 10 ]]; then
    log "FAIL $name: not started, the ${BUDGET}s budget is spent"
    echo "$name FAIL not started (budget spent)" >> "$SUMMARY"
    FAILED=1
    return 0
  fi
  if [[ $EXT_FAILED -eq 1 && " env build ext info " != *" $name "* ]]; then
    log "FAIL $name: not started, ext failed (no blurfast._C with CUDA kernels; ext.log)"
    echo "$name FAIL not started (ext failed)" >> "$SUMMARY"
    FAILED=1
    return 0
  fi
  log "RUN  $name (timeout ${limit}s): $*"
  local t0=$SECONDS rc=0
  timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
  local dt=$((SECONDS - t0))
  if [[ $rc -eq 0 ]]; then
    log "PASS $name (${dt}s)"
    echo "$name PASS ${dt}s" >> "$SUMMARY"
  else
    local why="exit code $rc"
    if [[ $rc -eq 124 || $rc -eq 137 ]]; then why="timed out after ${limit}s"; fi
    log "FAIL $name: $why (${dt}s); last lines of $name.log:"
    tail -n 20 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$LOG"
    echo "$name FAIL $why ${dt}s" >> "$SUMMARY"
    FAILED=1
    if [[ $name == ext ]]; then EXT_FAILED=1; fi
  fi
}

env_info() {
  set +e
  echo "date (UTC): $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "host: $(hostname)"
  echo "repo: $ROOT"
  if command -v git > /dev/null && git -C "$ROOT" rev-parse HEAD > /dev/null 2>&1; then
    echo "commit: $(git -C "$ROOT" rev-parse HEAD) $(git -C "$ROOT" status --porcelain | wc -l) changed files"
  fi
  echo "== nvidia-smi"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm,clocks.max.mem --format=csv
  nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
  echo "== python: $PY"
  "$PY" -c "
import sys, platform, torch
print('python', sys.version.split()[0], platform.platform())
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print('device', torch.cuda.get_device_name(0), 'cc', '%d.%d' % (p.major, p.minor),
          'mem GiB %.1f' % (p.total_memory / 2**30), 'SMs', p.multi_processor_count,
          'L2 MiB', getattr(p, 'L2_cache_size', 0) / 2**20)
"
  for mod in numpy scipy pybind11 cupy pytest pytest_benchmark; do
    "$PY" -c "import $mod; print('$mod', getattr($mod, '__version__', '?'))" 2>&1 | tail -n 1
  done
  echo "== tools"
  for t in nvcc cmake ninja compute-sanitizer ncu gcc; do
    if command -v "$t" > /dev/null; then
      echo "$t: $("$t" --version 2>&1 | grep -m1 -iE 'release|version|[0-9]+\.[0-9]+')"
    else echo "$t: not found"; fi
  done
  return 0
}
export -f env_info

build() {
  set -euo pipefail
  local archs=${BLURFAST_CUDA_ARCHS:-}
  if [[ -z "$archs" && "${GPU_CHECK_ALL_ARCHS:-0}" != 1 ]]; then
    archs=$("$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.major}{p.minor}')" 2>/dev/null || true)
  fi
  echo "BLURFAST_CUDA=1 BLURFAST_CUDA_ARCHS=${archs:-<package default>}"
  # The machine has no network: no build isolation, no dependency resolution.
  # PIP_BREAK_SYSTEM_PACKAGES lets pip install into a distro-managed Python.
  env BLURFAST_CUDA=1 ${archs:+BLURFAST_CUDA_ARCHS=$archs} PIP_BREAK_SYSTEM_PACKAGES=1 \
    CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    "$PY" -m pip install --no-build-isolation --no-deps -v .
}
export -f build

# After a non-editable install the compiled module is in site-packages, but
# python run from the repository root imports the source tree first; copy the
# built extension next to the sources (the copy is git-ignored).
ext() {
  set -euo pipefail
  local so
  so=$(cd / && "$PY" -c "import blurfast._C as c; print(c.__file__)" || true)
  echo "installed extension: ${so:-none (a source tree built elsewhere: PYTHONPATH=$ROOT, GPU_CHECK_SKIP=build)}"
  if [[ -n "$so" && "$(dirname "$so")" != "$ROOT/blurfast" ]]; then
    cp -f "$so" "$ROOT/blurfast/"
    echo "copied to $ROOT/blurfast/"
  fi
  "$PY" -c "import blurfast, blurfast._C as c; print('source tree imports', blurfast.__file__, c.__file__)"
  # Without a GPU or without CUDA kernels the CUDA tests would all skip and pass.
  "$PY" -c "
import torch, blurfast._C as c
assert torch.cuda.is_available(), 'torch sees no CUDA device'
assert getattr(c, 'has_cuda', True), 'blurfast._C was built without CUDA kernels'
print('CUDA kernels:', getattr(c, 'cuda_archs', '?'), 'GPU:', torch.cuda.get_device_name())
"
  # Importing runs no kernel: an extension built for another architecture, or a broken
  # CUDA build, fails here and not in every later step. Each op once, float32 and
  # bfloat16, fast kernels (64 x 64) and simple ones (7 x 12), against blurfast.reference;
  # only an op that raises fails the step (a wrong result is printed, and the benches
  # skip its rows).
  if ! "$PY" scripts/sanitizer_case.py --quick; then
    echo "ext: an op of blurfast's CUDA kernels does not run on this GPU (lines above)"
    return 1
  fi
}
export -f ext

# One ncu run per case of scripts/ncu_case.py, each with its own report (ncu-<k>.ncu-rep),
# so a time limit loses only the cases it cuts; the text goes to ncu.log.
ncu_cases() {
  set -uo pipefail
  local k rc=0 names=()
  # Listed once: each listing starts Python and imports torch, seconds of the step's limit.
  mapfile -t names < <("$PY" scripts/ncu_case.py --list)
  if [[ ${#names[@]} -eq 0 ]]; then
    echo "scripts/ncu_case.py --list printed no case: nothing profiled"
    return 1
  fi
  for ((k = 0; k < ${#names[@]}; k++)); do
    echo "== case $k: ${names[k]}"
    ncu --profile-from-start off --clock-control none --nvtx \
      --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
      --section SourceCounters --export "$OUT/ncu-$k" --force-overwrite \
      "$PY" scripts/ncu_case.py --case "$k" || rc=1
    # The report as text here, and its raw metrics as CSV (no ncu on the development
    # machine to open the report).
    if [[ -f "$OUT/ncu-$k.ncu-rep" ]]; then
      ncu --import "$OUT/ncu-$k.ncu-rep" --page details || true
      ncu --import "$OUT/ncu-$k.ncu-rep" --page raw --csv > "$OUT/ncu-$k.csv" || true
    else        # ncu can exit 0 with the program's status when it could not profile
      echo "no report ncu-$k.ncu-rep: case $k was not profiled"
      rc=1
    fi
  done
  return $rc
}
export -f ncu_cases

log "blurfast GPU check: repo $ROOT, output $OUT, budget ${BUDGET}s, python $PY"

step env 40 bash -c env_info
step build 170 bash -c build
step ext 60 bash -c ext
step info 40 "$PY" -m blurfast info
# A stale file of a step that runs now is removed; a second call with GPU_CHECK_ONLY into
# the same folder keeps the first call's (bench.json among them, for merge_results.py).
if selected tests; then rm -f "$OUT/junit-cuda.xml"; fi
if selected tests_paths; then rm -f "$OUT/junit-paths.xml"; fi
for s in bench bench_variants bench_columns bench_extra steps steps64; do
  if selected "$s"; then rm -f "$OUT/$s.json"; fi
done
# junit_counts NAME: the counts of $OUT/junit-NAME.xml into the log and the summary.
junit_counts() {
  [[ -f "$OUT/junit-$1.xml" ]] || return 0
  local counts
  counts=$("$PY" - "$OUT/junit-$1.xml" <<'EOF' || true
import sys, xml.etree.ElementTree as ET
r = ET.parse(sys.argv[1]).getroot()
s = r if r.tag == "testsuite" else r.find("testsuite")
print(" ".join(f"{k}={s.get(k)}" for k in ("tests", "failures", "errors", "skipped")))
EOF
  )
  log "$1 junit: $counts"
  echo "$1 junit: $counts" >> "$SUMMARY"
}
# -v: a step cut by its timeout writes no junit file, but its log names each test's outcome.
step tests 130 "$PY" -m pytest tests -m cuda -k "not test_gpu_paths" \
  -p no:cacheprovider -v -rs --durations=10 --junitxml="$OUT/junit-cuda.xml"
if selected tests; then junit_counts cuda; fi
step bench 90 "$PY" benchmarks/run.py --device cuda --quick --no-steps --strict \
  --json "$OUT/bench.json"
step bench_variants 50 "$PY" benchmarks/run.py --device cuda --quick --no-steps --strict \
  --shapes 256x3x64x64 16x3x64x64 256x3x32x32 64x3x128x128 --dtypes float32 bfloat16 \
  --impls blurfast blurfast_prefetch blurfast_noprefetch blurfast_wide blurfast_dense \
  blurfast_given_noise torch_fp32 \
  --json "$OUT/bench_variants.json"
step bench_columns 25 "$PY" benchmarks/run.py --device cuda --quick --no-steps --strict \
  --shapes 64x3x256x256 --cases q_sample sampler_step --dtypes float32 bfloat16 \
  --impls blurfast blurfast_separate blurfast_fill torch_fp32 --json "$OUT/bench_columns.json"
step bench_extra 40 "$PY" benchmarks/run.py --device cuda --quick --no-steps --strict \
  --shapes 256x3x32x32 64x3x128x128 --impls blurfast blurfast_dense blurfast_simple torch_fp32 \
  --json "$OUT/bench_extra.json"
# 400 s: run v6 took 208 s with one compiled configuration; the second (_cl) needs about as
# much again as the first's compile. The budget caps it as every step.
step steps 400 "$PY" benchmarks/run.py --device cuda --quick --no-kernels --steps --strict \
  --step-batches 16 --step-impls blurfast blurfast_fp16 blurfast_compile blurfast_compile_cl \
  blurfast_compile_cast_once --json "$OUT/steps.json"
step ncu 90 bash -c ncu_cases
step memcheck 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck \
  --error-exitcode 3 --print-limit 50 "$PY" scripts/sanitizer_case.py
step tests_paths 180 "$PY" -m pytest tests -m cuda -k test_gpu_paths -p no:cacheprovider -v \
  -rs --durations=10 --junitxml="$OUT/junit-paths.xml"
if selected tests_paths; then junit_counts paths; fi
step steps64 120 "$PY" benchmarks/run.py --device cuda --quick --no-kernels --steps --strict \
  --step-batches 64 --step-impls blurfast blurfast_ckpt blurfast_fp16 --json "$OUT/steps64.json"
step racecheck 110 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool racecheck \
  --error-exitcode 3 --print-limit 50 "$PY" scripts/sanitizer_case.py
step profile 300 "$PY" scripts/profile_step.py --batch 16 --compile --compiled-only \
  --out "$OUT/profile_step.txt"


# One results file: the kernel rows of the bench runs and the model steps (of a second
# call too, when its files are copied into the first call's folder and this is rerun:
# python scripts/merge_results.py FOLDER).
# Its messages (a partial run, or why it refused) go to merge.log and the running log; a
# refusal fails the script. Within the budget like every step (the device call's time
# past the budget is for the tar of $OUT); once it is spent the merge is left for later.
left=$((BUDGET - (SECONDS - START) - 2))
if ! compgen -G "$OUT/bench*.json" > /dev/null && ! compgen -G "$OUT/steps*.json" > /dev/null; then
  :
elif [[ $left -lt 10 ]]; then
  log "merge not run: the ${BUDGET}s budget is spent (later: python scripts/merge_results.py FOLDER)"
else
  if name=$(timeout -k 2 "$left" "$PY" scripts/merge_results.py "$OUT" 2> "$OUT/merge.log"); then
    log "results: $OUT/results/$name (commit it under benchmarks/results/)"
    sed 's/^/    /' "$OUT/merge.log" | tee -a "$LOG"
  else
    log "FAIL merge: python scripts/merge_results.py $OUT wrote no results file:"
    tail -n 20 "$OUT/merge.log" | sed 's/^/    /' | tee -a "$LOG"
    echo "merge FAIL" >> "$SUMMARY"
    FAILED=1
  fi
fi

log "done in $((SECONDS - START))s; summary:"
sed 's/^/    /' "$SUMMARY" | tee -a "$LOG"
if [[ $FAILED -ne 0 ]]; then
  log "RESULT: FAIL"
  exit 1
fi
log "RESULT: PASS"
exit 0
