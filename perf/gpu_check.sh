#!/usr/bin/env bash
# The one prepared script for a GPU machine call: install, environment, tests on CUDA, benchmark sweep.
#
#   bash perf/gpu_check.sh              # tests + `python3 -m perf.sweep --quick`  (~9.5 min at most: fits one 600 s call)
#   bash perf/gpu_check.sh --full       # tests + the default sweep (the sweep alone takes < 8 min: add --no-tests
#                                       # to fit one 600 s call)
#   bash perf/gpu_check.sh --no-tests   # sweep only;   --no-sweep: tests only
#   bash perf/gpu_check.sh --tune --no-tests   # time the kernel tiles (perf/tune_tiles.py, ~3-5 min) instead of
#                                       # the sweep: writes $OUT/tiles.json (commit it as xent_triton/tiles.json)
#   bash perf/gpu_check.sh --linear     # tests + perf/linear_bench.py (the fused linear head, ~1 min) instead
#                                       # of the sweep: writes $OUT/linear.csv, linear.md, linear_log.txt
#   bash perf/gpu_check.sh --host --tune-quick   # tests, perf/host_overhead.py (~30 s; --rows adds
#                                       # perf/rows_probe.py, ~40 s), perf.tune_tiles --quick
#                                       # (~3-5 min) whose tiles.json this run then uses, and the quick sweep
#   bash perf/gpu_check.sh --ab --host --no-sweep   # also perf/loop_ab.py (~1-2 min): the forward's row loop
#                                       # before and after perf/NOTES.md P16, and pipelined (P17), in one run
#                                       # (writes loop_ab.csv), and perf/split_probe.py (~30 s): the few-row
#                                       # forward split or one pipelined program per row (P18, split_probe.csv)
#   bash perf/gpu_check.sh --smooth ...   # also the class-index forward and step with and without label
#                                       # smoothing (perf/NOTES.md P21; ~1 min): $OUT/smooth_0/, smooth_0.1/
#
# Environment: OUT (output folder; the device tool sets it; default /tmp/xent_gpu_check),
#   PYTEST_TIMEOUT_S (default 270), PYTEST_PER_TEST_S (150), PYTEST_WORKERS (12),
#   XENT_HYPOTHESIS_EXAMPLES (12 here), SWEEP_TIMEOUT_S (default 220 quick / 520 full),
#   SWEEP_ARGS (extra arguments for perf.sweep, e.g. "--dtypes bf16,fp16"), LINEAR_TIMEOUT_S (220),
#   HOST_TIMEOUT_S (120), ROWS_TIMEOUT_S (90), AB_TIMEOUT_S (200), SPLIT_TIMEOUT_S (90), SMOOTH_TIMEOUT_S (90),
#   TUNE_TIMEOUT_S (520; 320 with --tune-quick).
# Writes into $OUT: pytest.log, sweep.log, and from the sweep sweep.csv, sweep.md, log.txt, pct_of_copy.png,
# speedup_vs_compile.png (and the other stages' files). The device tool returns at most 8 files: past 8,
# everything is packed into $OUT/bundle.tar.gz and only the summaries stay beside it.
# Exit status: 0 all good; bit 1 set when the tests failed (or found none, or timed out); bit 2 set when the
# sweep, linear_bench, host_overhead, loop_ab, split_probe, the smoothing sweeps or the quick tuning failed, or the
# sweep had a FAIL/ERROR row. The sweep runs even when the tests fail.
set -uo pipefail

OUT="${OUT:-/tmp/xent_gpu_check}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2   # the repository root

FULL=0; RUN_TESTS=1; RUN_SWEEP=1; TUNE=0; LINEAR=0; HOST=0; ROWS=0; TUNE_QUICK=0; AB=0; SMOOTH=0
for a in "$@"; do
  case "$a" in
    --full) FULL=1 ;;
    --no-tests) RUN_TESTS=0 ;;
    --no-sweep) RUN_SWEEP=0 ;;
    --tune) TUNE=1; RUN_SWEEP=0 ;;
    --linear) LINEAR=1; RUN_SWEEP=0 ;;
    --host) HOST=1 ;;
    --rows) ROWS=1 ;;
    --ab) AB=1 ;;
    --smooth) SMOOTH=1 ;;
    --tune-quick) TUNE_QUICK=1 ;;
    -h|--help) sed -n '2,33p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done

T0=$(date +%s)
say() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }

# ---------------------------------------------------------------- (a) install (offline)
if compgen -G ".whl/*.whl" > /dev/null; then
  say "installing carried wheels from .whl/ into /tmp/site"
  if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  else
    say "WARNING: installing the wheels in .whl/ failed; going on without them"
  fi
fi

INSTALL=editable
if python3 -m pip install -q --no-index --no-deps --no-build-isolation --root-user-action=ignore -e . \
     > /tmp/xent_pip_install.log 2>&1; then
  say "pip install -e . (offline, no build isolation): ok"
else
  INSTALL=fallback
  say "WARNING: pip install -e . FAILED; last lines:"
  tail -n 15 /tmp/xent_pip_install.log
  # The package maps kernels/ to xent_triton.kernels only through the install (pyproject package-dir).
  # Without it, link the folder into place in this copy of the tree and import from the repo root.
  if [ ! -e xent_triton/kernels ]; then ln -s ../kernels xent_triton/kernels; fi
  export PYTHONPATH="$PWD:${PYTHONPATH:-}"
  say "FALLBACK: xent_triton/kernels -> ../kernels symlink + PYTHONPATH=$PWD (not the installed layout)"
fi
if python3 -c "import xent_triton, xent_triton.kernels as k; print('import ok:', xent_triton.__file__, k.__file__)"; then
  IMPORT_OK=1
else
  IMPORT_OK=0
  say "ERROR: import xent_triton / xent_triton.kernels fails ($INSTALL install)"
fi

# ---------------------------------------------------------------- (b) environment
say "environment"
nvidia-smi -L || say "WARNING: nvidia-smi -L failed"
python3 - <<'EOF' || say "WARNING: torch/triton version query failed"
import platform, torch, triton
print(f"python {platform.python_version()}, torch {torch.__version__} (cuda {torch.version.cuda}), "
      f"triton {triton.__version__}")
print("cuda available:", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
EOF

# ---------------------------------------------------------------- (c) tests on CUDA
TEST_RC=-1
if [ "$RUN_TESTS" = 1 ]; then
  say "pytest on CUDA (TRITON_INTERPRET and XENT_TRITON_BACKEND unset), timeout ${PYTEST_TIMEOUT_S:-270}s"
  if ! compgen -G "tests/*.py" > /dev/null && ! compgen -G "tests/**/*.py" > /dev/null; then
    say "WARNING: tests/ holds no .py files"
  fi
  # Each feature/dtype combination is a separate Triton compile: spread them over processes when
  # pytest-xdist is there (the device image has it), so the suite fits the time limit: the CPU run
  # launches ~660 distinct compiled variants (2026-11-26: 460 by constexprs and dtypes, times Triton's
  # specialization of integer arguments equal to 1 or divisible by 16 and of 16-byte-aligned pointers),
  # each a compile of ~1-3 s on a GPU machine.
  # worksteal (pytest-xdist >= 3.2): each worker starts on a contiguous run of tests, whose neighbouring
  # parametrizations share compiled variants (the default round-robin start has every worker compile
  # the same variant at once), and idle workers take half of the longest queue.
  XDIST=()
  if python3 -c "import xdist" 2>/dev/null; then
    XDIST=(-n "${PYTEST_WORKERS:-12}")
    if python3 -c "import sys, xdist; sys.exit(tuple(map(int, xdist.__version__.split('.')[:2])) < (3, 2))" \
         2>/dev/null; then XDIST+=(--dist worksteal); fi
  fi
  # A hung test is reported by name instead of eating the whole budget (pytest-timeout is in the image).
  if python3 -c "import pytest_timeout" 2>/dev/null; then XDIST+=(--timeout "${PYTEST_PER_TEST_S:-150}"); fi
  # SIGINT, not SIGTERM: pytest then still prints the failures so far and its summary line.
  # Property tests: fewer hypothesis examples than CI's 100, since on a GPU each new dtype/flag
  # combination an example draws is a compile; CI runs the full count under the interpreter.
  # Inductor's compile pool would put ~16 processes per worker next to 12 workers' Triton compiles.
  timeout -s INT -k 20 "${PYTEST_TIMEOUT_S:-270}" env -u TRITON_INTERPRET -u XENT_TRITON_BACKEND \
    XENT_HYPOTHESIS_EXAMPLES="${XENT_HYPOTHESIS_EXAMPLES:-12}" TORCHINDUCTOR_COMPILE_THREADS=1 \
    python3 -m pytest -q -rfEs --maxfail=25 --durations=10 -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} tests 2>&1 | tee "$OUT/pytest.log"
  TEST_RC=${PIPESTATUS[0]}
  case "$TEST_RC" in
    0) say "pytest: passed" ;;
    5) say "pytest: NO TESTS COLLECTED (rc 5)" ;;
    2|124|137) say "pytest: TIMED OUT or INTERRUPTED after ${PYTEST_TIMEOUT_S:-270}s (rc $TEST_RC)" ;;
    *) say "pytest: FAILED (rc $TEST_RC)" ;;
  esac
fi

# ---------------------------------------------------------------- the benchmark stages
# stage LOG TIMEOUT_S MODULE ARGS...: python3 -m MODULE ARGS on the GPU (the interpreter and backend variables
# unset), its output shown and kept in $OUT/LOG; sets STAGE_RC. SIGTERM at the timeout (30 s later SIGKILL):
# the sweep and the tuner write what they have on SIGTERM.
stage() {
  local log=$1 limit=$2
  shift 2
  say "python3 -m $* (timeout ${limit}s)"
  timeout -k 30 "$limit" env -u TRITON_INTERPRET -u XENT_TRITON_BACKEND python3 -m "$@" 2>&1 | tee "$OUT/$log"
  STAGE_RC=${PIPESTATUS[0]}
  say "$1: rc $STAGE_RC"
}

# (c') host time of small problems; device time of the short-row kernels
HOST_RC=-1; ROWS_RC=-1; AB_RC=-1; SPLIT_RC=-1; TUNEQ_RC=-1; LINEAR_RC=-1; SWEEP_RC=-1; SMOOTH_RC=-1
if [ "$HOST" = 1 ]; then stage host.log "${HOST_TIMEOUT_S:-120}" perf.host_overhead --out "$OUT"; HOST_RC=$STAGE_RC; fi
if [ "$ROWS" = 1 ]; then stage rows_probe.log "${ROWS_TIMEOUT_S:-90}" perf.rows_probe --out "$OUT"; ROWS_RC=$STAGE_RC; fi
if [ "$AB" = 1 ]; then
  stage loop_ab.log "${AB_TIMEOUT_S:-200}" perf.loop_ab --out "$OUT"; AB_RC=$STAGE_RC
  stage split_probe.log "${SPLIT_TIMEOUT_S:-90}" perf.split_probe --out "$OUT"; SPLIT_RC=$STAGE_RC
fi
if [ "$SMOOTH" = 1 ]; then
  # The class-index loop with label smoothing (perf/NOTES.md P21) against the same rows without it.
  SMOOTH_RC=0
  for eps in 0 0.1; do
    stage "smooth_$eps.log" "${SMOOTH_TIMEOUT_S:-90}" perf.sweep --points 8192x32000,8192x128256 --labels hard \
      --dtypes bf16 --methods xent_triton --passes forward,step --label-smoothing "$eps" --no-plots \
      --out "$OUT/smooth_$eps"
    [ "$STAGE_RC" = 0 ] || SMOOTH_RC=$STAGE_RC
  done
fi

# (c'') quick tile tuning, whose table this run's sweep then uses
if [ "$TUNE_QUICK" = 1 ]; then
  stage tune.log "${TUNE_TIMEOUT_S:-320}" perf.tune_tiles --quick --out "$OUT"; TUNEQ_RC=$STAGE_RC
  if [ -s "$OUT/tiles.json" ]; then
    cp "$OUT/tiles.json" xent_triton/tiles.json && say "this run's sweep uses the tiles.json just measured"
  fi
fi

# (d') tile tuning, and (d'') the fused linear head: each instead of the sweep
if [ "$TUNE" = 1 ]; then stage tune.log "${TUNE_TIMEOUT_S:-520}" perf.tune_tiles --out "$OUT"; fi
if [ "$LINEAR" = 1 ]; then
  stage linear.log "${LINEAR_TIMEOUT_S:-220}" perf.linear_bench --out "$OUT"; LINEAR_RC=$STAGE_RC
fi

# (d) sweep
if [ "$RUN_SWEEP" = 1 ]; then
  if [ "$FULL" = 1 ]; then MODE=(); STO="${SWEEP_TIMEOUT_S:-520}"; else MODE=(--quick); STO="${SWEEP_TIMEOUT_S:-220}"; fi
  # shellcheck disable=SC2086  # SWEEP_ARGS is split on purpose
  stage sweep.log "$STO" perf.sweep ${MODE[@]+"${MODE[@]}"} --out "$OUT" ${SWEEP_ARGS:-}; SWEEP_RC=$STAGE_RC
fi

# ---------------------------------------------------------------- summary (the tail of the output is what comes back)
echo
echo "======================================== SUMMARY ========================================"
if [ -s "$OUT/sweep.csv" ]; then
  python3 -m perf.sweep --summary "$OUT/sweep.csv" || say "could not summarize $OUT/sweep.csv"
  grep -h -E "^(STOPPED|skip |OOM |FAIL |ERROR |WARNING|note: liger)" "$OUT/log.txt" 2>/dev/null | head -n 20
  grep -h -E "copy" "$OUT/log.txt" 2>/dev/null | head -n 3
fi
echo "install: $INSTALL (import ok: $IMPORT_OK)"
if [ "$RUN_TESTS" = 1 ]; then
  echo "pytest: rc $TEST_RC: $(grep -E '([0-9]+ (passed|failed|errors?|skipped)|no tests ran).* in [0-9.]+s' "$OUT/pytest.log" | tail -n 1)"
fi
[ "$RUN_SWEEP" = 1 ] && echo "sweep: rc $SWEEP_RC ($([ "$FULL" = 1 ] && echo default grid || echo --quick))"
[ "$LINEAR" = 1 ] && echo "linear_bench: rc $LINEAR_RC"
[ "$HOST" = 1 ] && echo "host_overhead: rc $HOST_RC"
[ "$ROWS" = 1 ] && echo "rows_probe: rc $ROWS_RC"
[ "$AB" = 1 ] && echo "loop_ab: rc $AB_RC; split_probe: rc $SPLIT_RC"
[ "$SMOOTH" = 1 ] && echo "label smoothing sweeps: rc $SMOOTH_RC"
[ "$TUNE_QUICK" = 1 ] && echo "tune --quick: rc $TUNEQ_RC"
if [ "$(ls "$OUT" | wc -l)" -gt 8 ]; then
  # The device tool returns 8 files at most: pack them all, keep the summaries readable beside the pack.
  tar czf /tmp/bundle.tar.gz -C "$OUT" . && mv /tmp/bundle.tar.gz "$OUT/bundle.tar.gz"
  for f in "$OUT"/*; do
    case "$(basename "$f")" in
      bundle.tar.gz|sweep.md|host_overhead.md|tiles.json|linear.md|pytest.log|rows_probe.csv|loop_ab.csv) ;;
      *) rm -f "$f" ;;
    esac
  done
  echo "more than 8 files: packed into bundle.tar.gz"
fi
echo "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
echo "elapsed: $(( $(date +%s) - T0 )) s"

RC=0
if [ "$RUN_TESTS" = 1 ] && [ "$TEST_RC" != 0 ]; then RC=$((RC | 1)); fi
if [ "$RUN_SWEEP" = 1 ] && [ "$SWEEP_RC" != 0 ]; then RC=$((RC | 2)); fi
if [ "$LINEAR" = 1 ] && [ "$LINEAR_RC" != 0 ]; then RC=$((RC | 2)); fi
if [ "$HOST" = 1 ] && [ "$HOST_RC" != 0 ]; then RC=$((RC | 2)); fi
if [ "$ROWS" = 1 ] && [ "$ROWS_RC" != 0 ]; then RC=$((RC | 2)); fi
if [ "$AB" = 1 ] && { [ "$AB_RC" != 0 ] || [ "$SPLIT_RC" != 0 ]; }; then RC=$((RC | 2)); fi
if [ "$TUNE_QUICK" = 1 ] && [ "$TUNEQ_RC" != 0 ]; then RC=$((RC | 2)); fi
if [ "$SMOOTH" = 1 ] && [ "$SMOOTH_RC" != 0 ]; then RC=$((RC | 2)); fi
exit "$RC"
