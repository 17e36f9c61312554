#!/usr/bin/env bash
# The one prepared script for a GPU machine call: install, environment, tests on CUDA, probes, benchmark sweep,
# within a fixed budget: every stage runs under `timeout` at its cap, and the caps of the stages an invocation
# runs, with install, environment and summary, sum to at most BUDGET_S (480 s). The sweep takes what the
# other stages leave (at most 220 s quick / 520 s full; skipped under 60 s). The sum is printed first.
#
# The next GPU session (perf/NOTES.md, Ideas queued #1), two calls of the device tool `run`:
#
#   run(command="bash perf/gpu_check.sh", carry=[".whl"], timeout_s=540)
#       the brief's check: tests on CUDA (180 s) and the quick sweep with Liger rows (165 s); 480 s at most
#   run(command="bash perf/gpu_check.sh --no-tests --no-sweep --fused --host --ab", carry=[".whl"], timeout_s=420)
#       with 8 minutes or more left: the fused step's owed measurement (P17), the host path on the GPU (P23),
#       the row-loop A/B (P16, P17) and the split probe (P18); 345 s at most
#
#   with .whl/ holding liger_kernel-0.8.5-py3-none-any.whl, made here beforehand (it is git-ignored):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl liger-kernel==0.8.5
#   Fetch $OUT (bundle.tar.gz holds every file) into perf/results/<card>-<date>/.
#
#   bash perf/gpu_check.sh              # tests on CUDA (180 s) + `perf.sweep --quick` (165 s): 480 s worst case
#   bash perf/gpu_check.sh --caps ...   # print the stages and caps of an invocation, run nothing
#   --no-tests / --no-sweep             # leave out the CUDA tests / the sweep (the sweep then gets their time)
#   --fused     perf.fused_step.probe: the fused step against the package's step (fused_step.csv)
#   --host      perf.host_overhead: host time of small problems (host_overhead.csv/.md)
#   --ab        perf.loop_ab (the forward's row loop, P16/P17: loop_ab.csv) and perf.split_probe (P18)
#   --rows      perf.rows_probe: the short-row kernels by rows per program (rows_probe.csv)
#   --smooth    the class-index forward and step with and without label smoothing (P21): smooth_0/, smooth_0.1/
#   --tune-quick  perf.tune_tiles --quick (bf16, 2 V), whose tiles.json this run's sweep then uses
#   --tune      perf.tune_tiles (all V and dtypes) instead of the sweep: writes $OUT/tiles.json, the shipped
#               table's other cards kept (commit it as xent_triton/tiles.json); use with --no-tests
#   --linear    perf.linear_bench (the fused linear head) instead of the sweep
#   --full      the default sweep grid (bf16 + fp32, 13 shapes; ~8 min): with BUDGET_S=600 and --no-tests
#
# Environment: OUT (output folder; the device tool sets it; default /tmp/xent_gpu_check), BUDGET_S (480),
#   the caps in seconds: WHEELS_TIMEOUT_S (15), PIP_TIMEOUT_S (30), IMPORT_TIMEOUT_S (15), NVSMI_TIMEOUT_S (10),
#   ENV_TIMEOUT_S (35: versions and the copy bandwidth), PYTEST_TIMEOUT_S (180), FUSED_TIMEOUT_S (60),
#   HOST_TIMEOUT_S (60), AB_TIMEOUT_S (55), SPLIT_TIMEOUT_S (35), ROWS_TIMEOUT_S (45), SMOOTH_TIMEOUT_S (60
#   each), TUNE_TIMEOUT_S (200 quick / 300), LINEAR_TIMEOUT_S (150), SWEEP_TIMEOUT_S (what is left),
#   SUMMARY_TIMEOUT_S (20), BUNDLE_TIMEOUT_S (10); PYTEST_PER_TEST_S (100), PYTEST_WORKERS (12),
#   XENT_HYPOTHESIS_EXAMPLES (12 here), SWEEP_ARGS (extra perf.sweep arguments, e.g. "--dtypes bf16,fp16").
# Every tool writes its CSV row by row, so a stage stopped at its cap keeps what it measured. The copy
# bandwidth is measured once (perf.common.measure_copy_gbps, the sweep's measurement) and exported as
# XENT_COPY_GBPS: the sweep and every probe count % of copy against that one number.
# Writes into $OUT: gpu_check.log (this output), one .log per stage, the tools' files. The device tool returns
# at most 8 files: past 8, everything is packed into $OUT/bundle.tar.gz and only the summaries stay beside it.
# Exit status: 0 all good; bit 1 set when the tests failed (or found none, or timed out); bit 2 set when a
# measuring stage failed or timed out, or the sweep had a FAIL/ERROR row. Later stages run whatever failed.
set -uo pipefail

OUT="${OUT:-/tmp/xent_gpu_check}"
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2   # the repository root

FULL=0; RUN_TESTS=1; RUN_SWEEP=1; TUNE=0; LINEAR=0; HOST=0; ROWS=0; TUNE_QUICK=0; AB=0; SMOOTH=0; FUSED=0; CAPS=0
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
    --fused) FUSED=1 ;;
    --smooth) SMOOTH=1 ;;
    --tune-quick) TUNE_QUICK=1 ;;
    --caps) CAPS=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done

# ---------------------------------------------------------------- the caps (seconds; each a hard limit)
BUDGET_S=${BUDGET_S:-480}
GRACE_S=10   # a stage gets SIGTERM (pytest SIGINT) this long before its cap, SIGKILL at the cap
C_WHEELS=${WHEELS_TIMEOUT_S:-15}; C_PIP=${PIP_TIMEOUT_S:-30}; C_IMPORT=${IMPORT_TIMEOUT_S:-15}
C_NVSMI=${NVSMI_TIMEOUT_S:-10}; C_ENV=${ENV_TIMEOUT_S:-35}
C_PYTEST=${PYTEST_TIMEOUT_S:-180}; C_FUSED=${FUSED_TIMEOUT_S:-60}; C_HOST=${HOST_TIMEOUT_S:-60}
C_AB=${AB_TIMEOUT_S:-55}; C_SPLIT=${SPLIT_TIMEOUT_S:-35}; C_ROWS=${ROWS_TIMEOUT_S:-45}
C_SMOOTH=${SMOOTH_TIMEOUT_S:-60}; C_LINEAR=${LINEAR_TIMEOUT_S:-150}
C_TUNEQ=${TUNE_TIMEOUT_S:-200}; C_TUNE=${TUNE_TIMEOUT_S:-300}
C_SUMMARY=${SUMMARY_TIMEOUT_S:-20}; C_BUNDLE=${BUNDLE_TIMEOUT_S:-10}

PLAN=()   # "cap name" lines, in run order
plan() { PLAN+=("$1 $2"); }
# The wheel install counts whether or not .whl/ holds wheels: the worst case.
plan "$C_WHEELS" "install: carried wheels (.whl/)"; plan "$C_PIP" "install: pip install -e . (offline)"
plan "$C_IMPORT" "install: import check"; plan "$C_NVSMI" "environment: nvidia-smi"
plan "$C_ENV" "environment: versions, copy bandwidth"
[ "$RUN_TESTS" = 1 ] && plan "$C_PYTEST" "pytest on CUDA"
[ "$FUSED" = 1 ] && plan "$C_FUSED" "perf.fused_step.probe"
[ "$HOST" = 1 ] && plan "$C_HOST" "perf.host_overhead"
[ "$ROWS" = 1 ] && plan "$C_ROWS" "perf.rows_probe"
[ "$AB" = 1 ] && { plan "$C_AB" "perf.loop_ab"; plan "$C_SPLIT" "perf.split_probe"; }
[ "$SMOOTH" = 1 ] && { plan "$C_SMOOTH" "perf.sweep, label smoothing 0"; plan "$C_SMOOTH" "perf.sweep, label smoothing 0.1"; }
[ "$TUNE_QUICK" = 1 ] && plan "$C_TUNEQ" "perf.tune_tiles --quick"
[ "$TUNE" = 1 ] && plan "$C_TUNE" "perf.tune_tiles"
[ "$LINEAR" = 1 ] && plan "$C_LINEAR" "perf.linear_bench"
SUM=$((C_SUMMARY + C_BUNDLE)); for p in "${PLAN[@]}"; do SUM=$((SUM + ${p%% *})); done
if [ "$RUN_SWEEP" = 1 ]; then
  if [ "$FULL" = 1 ]; then SMAX=520; else SMAX=220; fi
  C_SWEEP=${SWEEP_TIMEOUT_S:-$(( BUDGET_S - SUM < SMAX ? BUDGET_S - SUM : SMAX ))}
  if [ "$C_SWEEP" -lt 60 ]; then
    SWEEP_SKIPPED="the other stages leave ${C_SWEEP} s of the ${BUDGET_S} s budget (at least 60 needed)"
    RUN_SWEEP=0
  else
    plan "$C_SWEEP" "perf.sweep $([ "$FULL" = 1 ] && echo '(default grid)' || echo --quick)"
    SUM=$((SUM + C_SWEEP))
  fi
fi
plan "$C_SUMMARY" "summary"; plan "$C_BUNDLE" "summary: bundle"
print_caps() {
  echo "stage caps (s), in run order; each stage is stopped at its cap:"
  for p in "${PLAN[@]}"; do printf '  %4d  %s\n' "${p%% *}" "${p#* }"; done
  [ -n "${SWEEP_SKIPPED:-}" ] && echo "  sweep skipped: $SWEEP_SKIPPED"
  echo "cap sum: $SUM s (budget $BUDGET_S s)"
  if [ "$SUM" -gt "$BUDGET_S" ]; then echo "WARNING: the caps exceed the budget by $((SUM - BUDGET_S)) s"; fi
}
if [ "$CAPS" = 1 ]; then print_caps; exit 0; fi

mkdir -p "$OUT"
exec 3>&1 4>&2 > >(tee "$OUT/gpu_check.log") 2>&1
TEE_PID=$!
T0=$(date +%s)
say() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }
say "bash perf/gpu_check.sh $*"
print_caps

# capped CAP CMD...: CMD under `timeout` (SIGTERM at CAP - GRACE_S, SIGKILL at CAP); sets CAPPED_RC.
capped() {
  local cap=$1; shift
  timeout -k "$GRACE_S" "$(( cap > GRACE_S ? cap - GRACE_S : 1 ))" "$@"
  CAPPED_RC=$?
}

# ---------------------------------------------------------------- (a) install (offline)
if compgen -G ".whl/*.whl" > /dev/null; then
  say "installing carried wheels from .whl/ into /tmp/site: $(cd .whl && ls *.whl | tr '\n' ' ')"
  capped "$C_WHEELS" python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  if [ "$CAPPED_RC" = 0 ]; then
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
  else
    say "WARNING: installing the wheels in .whl/ failed (rc $CAPPED_RC); going on without them"
  fi
else
  say "no wheels in .whl/ (carry=[\".whl\"] brings them): the sweep has no Liger rows"
fi

INSTALL=editable
capped "$C_PIP" python3 -m pip install -q --no-index --no-deps --no-build-isolation --root-user-action=ignore -e . \
  > /tmp/xent_pip_install.log 2>&1
if [ "$CAPPED_RC" = 0 ]; then
  say "pip install -e . (offline, no build isolation): ok"
else
  INSTALL=fallback
  say "WARNING: pip install -e . FAILED (rc $CAPPED_RC); last lines:"
  tail -n 15 /tmp/xent_pip_install.log
  # The package maps kernels/ to xent_triton.kernels only through the install (pyproject package-dir).
  # Without it, link the folder into place in this copy of the tree and import from the repo root.
  if [ ! -e xent_triton/kernels ]; then ln -s ../kernels xent_triton/kernels; fi
  export PYTHONPATH="$PWD:${PYTHONPATH:-}"
  say "FALLBACK: xent_triton/kernels -> ../kernels symlink + PYTHONPATH=$PWD (not the installed layout)"
fi
IMPORT_OK=0
capped "$C_IMPORT" python3 -c "import xent_triton, xent_triton.kernels as k; print('import ok:', xent_triton.__file__, k.__file__)"
if [ "$CAPPED_RC" = 0 ]; then IMPORT_OK=1; else say "ERROR: import xent_triton / xent_triton.kernels fails ($INSTALL install)"; fi

# ---------------------------------------------------------------- (b) environment, and the one copy bandwidth
say "environment"
capped "$C_NVSMI" nvidia-smi -L || say "WARNING: nvidia-smi -L failed"
capped "$C_ENV" python3 - > /tmp/xent_env.txt 2>&1 <<'EOF'
import platform, torch, triton
print(f"python {platform.python_version()}, torch {torch.__version__} (cuda {torch.version.cuda}), "
      f"triton {triton.__version__}", flush=True)
print("cuda available:", torch.cuda.is_available(), flush=True)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB, "
          f"capability {torch.cuda.get_device_capability(0)}", flush=True)
    from perf.common import measure_copy_gbps
    print(f"COPY_GBPS={measure_copy_gbps(torch.device('cuda')):.1f}", flush=True)
EOF
ENV_RC=$CAPPED_RC
cat /tmp/xent_env.txt
COPY=$(sed -n 's/^COPY_GBPS=//p' /tmp/xent_env.txt | tail -n 1)
if [ -n "$COPY" ]; then
  export XENT_COPY_GBPS="$COPY"
  say "copy bandwidth $COPY GB/s (bytes read + written; perf.common.measure_copy_gbps): every stage's % of copy"
else
  say "WARNING: no copy bandwidth measured (rc $ENV_RC); each tool measures its own with the same function"
fi

# ---------------------------------------------------------------- (c) tests on CUDA
TEST_RC=-1
if [ "$RUN_TESTS" = 1 ]; then
  say "pytest on CUDA (TRITON_INTERPRET and XENT_TRITON_BACKEND unset), cap ${C_PYTEST}s"
  # Each feature/dtype combination is a separate Triton compile: spread them over processes (pytest-xdist
  # is in the image); worksteal (xdist >= 3.2) starts each worker on a contiguous run of tests, whose
  # neighbouring parametrizations share compiled variants.
  XDIST=()
  if python3 -c "import xdist" 2>/dev/null; then
    XDIST=(-n "${PYTEST_WORKERS:-12}")
    if python3 -c "import sys, xdist; sys.exit(tuple(map(int, xdist.__version__.split('.')[:2])) < (3, 2))" \
         2>/dev/null; then XDIST+=(--dist worksteal); fi
  fi
  # A hung test is reported by name instead of eating the whole budget (pytest-timeout is in the image).
  if python3 -c "import pytest_timeout" 2>/dev/null; then XDIST+=(--timeout "${PYTEST_PER_TEST_S:-100}"); fi
  # SIGINT, not SIGTERM: pytest then still prints the failures so far and its summary line. Fewer hypothesis
  # examples than CI's: on a GPU each new dtype/flag combination an example draws is a compile.
  timeout -s INT -k "$GRACE_S" "$((C_PYTEST - GRACE_S))" env -u TRITON_INTERPRET -u XENT_TRITON_BACKEND \
    XENT_HYPOTHESIS_EXAMPLES="${XENT_HYPOTHESIS_EXAMPLES:-12}" TORCHINDUCTOR_COMPILE_THREADS=1 \
    python3 -m pytest -q -rfEs --maxfail=25 --durations=10 -p no:cacheprovider ${XDIST[@]+"${XDIST[@]}"} tests \
    > "$OUT/pytest.log" 2>&1
  TEST_RC=$?
  tail -n 40 "$OUT/pytest.log"
  case "$TEST_RC" in
    0) say "pytest: passed" ;;
    5) say "pytest: NO TESTS COLLECTED (rc 5)" ;;
    2|124|137) say "pytest: TIMED OUT or INTERRUPTED at its cap of ${C_PYTEST}s (rc $TEST_RC)" ;;
    *) say "pytest: FAILED (rc $TEST_RC)" ;;
  esac
fi

# ---------------------------------------------------------------- the measuring stages
# stage LOG CAP MODULE ARGS...: python3 -m MODULE ARGS on the GPU (the interpreter and backend variables unset),
# its output shown and kept in $OUT/LOG; sets STAGE_RC and adds to BENCH_FAILED when it fails.
BENCH_FAILED=""
stage() {
  local log=$1 cap=$2
  shift 2
  say "python3 -m $* (cap ${cap}s)"
  timeout -k "$GRACE_S" "$((cap - GRACE_S))" env -u TRITON_INTERPRET -u XENT_TRITON_BACKEND python3 -m "$@" 2>&1 \
    | tee "$OUT/$log"
  STAGE_RC=${PIPESTATUS[0]}
  case "$STAGE_RC" in
    0) say "$1: ok" ;;
    124|137) say "$1: STOPPED at its cap of ${cap}s (rc $STAGE_RC); its CSV keeps the rows measured"; BENCH_FAILED+=" $1" ;;
    *) say "$1: rc $STAGE_RC"; BENCH_FAILED+=" $1" ;;
  esac
}

[ "$FUSED" = 1 ] && stage fused.log "$C_FUSED" perf.fused_step.probe --out "$OUT"
[ "$HOST" = 1 ] && stage host.log "$C_HOST" perf.host_overhead --out "$OUT"
[ "$ROWS" = 1 ] && stage rows_probe.log "$C_ROWS" perf.rows_probe --out "$OUT"
if [ "$AB" = 1 ]; then
  stage loop_ab.log "$C_AB" perf.loop_ab --out "$OUT"
  stage split_probe.log "$C_SPLIT" perf.split_probe --out "$OUT"
fi
if [ "$SMOOTH" = 1 ]; then
  for eps in 0 0.1; do
    stage "smooth_$eps.log" "$C_SMOOTH" perf.sweep --points 8192x32000,8192x128256 --labels hard --dtypes bf16 \
      --methods xent_triton --passes forward,step --label-smoothing "$eps" --no-plots \
      --max-minutes "$(awk -v c="$C_SMOOTH" 'BEGIN { g = (c - 30) / 60; printf "%.2f", (g < 0.1 ? 0.1 : g) }')" --out "$OUT/smooth_$eps"
  done
fi
# Tile tuning: the written table keeps the shipped file's other cards (--merge); --tune-quick's is used by this
# run's sweep.
if [ "$TUNE_QUICK" = 1 ]; then
  stage tune.log "$C_TUNEQ" perf.tune_tiles --quick --out "$OUT" --merge xent_triton/tiles.json
  if [ -s "$OUT/tiles.json" ]; then
    cp "$OUT/tiles.json" xent_triton/tiles.json && say "this run's sweep uses the tiles.json just measured"
  fi
fi
[ "$TUNE" = 1 ] && stage tune.log "$C_TUNE" perf.tune_tiles --out "$OUT" --merge xent_triton/tiles.json
[ "$LINEAR" = 1 ] && stage linear.log "$C_LINEAR" perf.linear_bench --out "$OUT"

SWEEP_RC=-1
if [ "$RUN_SWEEP" = 1 ]; then
  if [ "$FULL" = 1 ]; then MODE=(); else MODE=(--quick); fi
  # The sweep's own guard stops adding blocks 35 s before its cap: one block (< 15 s), the markdown and plots.
  GUARD=$(awk -v c="$C_SWEEP" 'BEGIN { g = (c - 35) / 60; printf "%.2f", (g < 0.5 ? 0.5 : g) }')
  # shellcheck disable=SC2086  # SWEEP_ARGS is split on purpose (its --max-minutes, if any, wins)
  stage sweep.log "$C_SWEEP" perf.sweep ${MODE[@]+"${MODE[@]}"} --max-minutes "$GUARD" --out "$OUT" ${SWEEP_ARGS:-}
  SWEEP_RC=$STAGE_RC
fi

# ---------------------------------------------------------------- summary (the tail of the output is what comes back)
echo
echo "======================================== SUMMARY ========================================"
if [ -s "$OUT/sweep.csv" ]; then
  capped "$C_SUMMARY" python3 -m perf.sweep --summary "$OUT/sweep.csv" || say "could not summarize $OUT/sweep.csv"
  grep -h -E "^(STOPPED|skip |OOM |FAIL |ERROR |WARNING|note: liger)" "$OUT/log.txt" 2>/dev/null | head -n 20
fi
if [ -s "$OUT/fused_step.csv" ]; then
  echo "fused step probe (fused_step.csv):"
  cut -d, -f2-12,16 "$OUT/fused_step.csv" | head -n 20
fi
echo "copy bandwidth: ${XENT_COPY_GBPS:-not measured} GB/s"
echo "install: $INSTALL (import ok: $IMPORT_OK)"
if [ "$RUN_TESTS" = 1 ]; then
  echo "pytest: rc $TEST_RC: $(grep -E '([0-9]+ (passed|failed|errors?|skipped)|no tests ran).* in [0-9.]+s' "$OUT/pytest.log" | tail -n 1)"
fi
[ -n "${SWEEP_SKIPPED:-}" ] && echo "sweep skipped: $SWEEP_SKIPPED"
[ "$RUN_SWEEP" = 1 ] && echo "sweep: rc $SWEEP_RC ($([ "$FULL" = 1 ] && echo default grid || echo --quick))"
echo "measuring stages failed or stopped:${BENCH_FAILED:- none}"
echo "elapsed: $(( $(date +%s) - T0 )) s (cap sum $SUM s)"
if [ "$(ls "$OUT" | wc -l)" -gt 8 ]; then
  # The device tool returns 8 files at most: pack them all, keep up to 7 summaries readable beside the pack.
  if timeout -k 2 "$C_BUNDLE" tar czf /tmp/bundle.tar.gz -C "$OUT" . && mv /tmp/bundle.tar.gz "$OUT/bundle.tar.gz"; then
    keep=" bundle.tar.gz "; n=0
    for f in sweep.md fused_step.csv host_overhead.md loop_ab.csv split_probe.csv tiles.json linear.md rows_probe.csv \
             pytest.log gpu_check.log; do
      if [ -e "$OUT/$f" ] && [ "$n" -lt 7 ]; then keep+="$f "; n=$((n + 1)); fi
    done
    for f in "$OUT"/*; do case "$keep" in *" $(basename "$f") "*) ;; *) rm -rf "$f" ;; esac; done
    echo "more than 8 files: all packed into bundle.tar.gz; beside it:$keep"
  else
    echo "WARNING: packing the files failed; the device tool returns 8 of them"
  fi
fi

RC=0
if [ "$RUN_TESTS" = 1 ] && [ "$TEST_RC" != 0 ]; then RC=$((RC | 1)); fi
if [ -n "$BENCH_FAILED" ]; then RC=$((RC | 2)); fi
exec 1>&3 2>&4 3>&- 4>&-   # let tee see the end of its input and finish before the script returns
wait "$TEE_PID" 2>/dev/null
exit "$RC"
