#!/usr/bin/env bash
# The whole GPU run in one call: benchmarks, then experiments, each under its own time limit.
#
#   bash benchmarks/gpu_suite.sh DATA_ROOT            (from the repository root; ~9 min on an H200)
#   PARTS=efficiency bash benchmarks/gpu_suite.sh DATA_ROOT
#                                                     (issue 12's figures only: prepare, bench_train_step,
#                                                      bench_memory, bench_compile_cache, bench_end_to_end)
#   PARTS="loss_comparison augmentation" PARALLEL=1 SUITE_SECONDS=200 bash benchmarks/gpu_suite.sh DATA_ROOT
#                                                     (a subset; PARALLEL runs the parts side by side,
#                                                      for experiments whose timings are not the point)
#
# DATA_ROOT is the Oxford-IIIT Pet layout (the sample or the full dataset). Needs python3 with
# torch, torchvision, torchopt, optree, einops, safetensors, numpy, pillow (matplotlib for the
# figures); the package is used from the checkout (PYTHONPATH=$PWD), nothing is installed.
#
# Parts, in order (time measured on an H200 on 2026-11-27, experiments/results/gpu_logs -> hard cap):
#   prepare           decode + cache the 128 px splits                     ~5 s   -> 60 s
#   bench_train_step  b / b-input / b16 / a' (~20 s), a (compile 50-80 s), ~2.3 min -> 200 s
#                     c (compile ~25 s), profile
#   bench_memory      peak memory of a / a' / b / c, one process per row    (not yet run on a GPU) -> 120 s
#   bench_compile_cache  train + eval step: eager, cold, warm (disk), warm (file), (not yet run on a GPU) -> 180 s
#                     one process each
#   bench_ensemble    K=8 small SegNets, vmapped vs sequential (eager)     ~20 s  -> 60 s
#   bench_end_to_end  fseg train, 20 epochs, 3,680 images, eval each epoch, ~1.8 min cold -> 240 s
#                     then again with the warm compile cache (the cold first epoch, with both
#                     compiles, was ~50 s)
#   series_models     5 models, 128 px, 20 epochs (SegFormer ~20 s)        ~70 s  -> 150 s
#   loss_comparison   CE, CE+Dice, a K=4 vmapped CE+w*Dice sweep, 5 more   ~1.5 min -> 120 s
#   augmentation      5 variants                                           ~50 s  -> 70 s
#   best_recipe       only when PARTS names it: the full recipe           (not yet run on a GPU) -> 540 s
# A part's limit is also cut so that every later part in PARTS keeps its minimum share of SUITE_SECONDS
# (default 540); each script gets a --budget a little under its limit, after which it records the
# variants it did not start as "skipped: time budget" and still writes its tables. A part that
# fails or times out does not stop the others (`|| true`).
#
# Output: $OUT/suite.log, $OUT/<part>.log, and $OUT/results.tgz (experiments/results/, refreshed
# after every part). Without OUT set, everything goes to ./gpu_suite_out/.
set -uo pipefail

DATA_ROOT="${1:-${FSEG_DATA:-../shared/data/oxford-pets-sample}}"
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_suite_out}"
mkdir -p "$OUT" experiments/results
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export FSEG_DATA="$DATA_ROOT"
PY="${PYTHON:-python3}"
# EXTRA_ARGS (e.g. "--quick") is appended to every script's arguments: for a dry run of the suite on a CPU.
read -r -a EXTRA <<<"${EXTRA_ARGS:-}"
TOTAL="${SUITE_SECONDS:-540}"
ALL_PARTS="prepare bench_train_step bench_memory bench_compile_cache bench_ensemble bench_end_to_end series_models loss_comparison augmentation best_recipe"
# best_recipe (the long recipe run) only when asked for: PARTS="prepare best_recipe" SUITE_SECONDS=540
DEFAULT_PARTS="${ALL_PARTS% best_recipe}"
PARTS="${PARTS:-$DEFAULT_PARTS}"
[ "$PARTS" = efficiency ] && PARTS="prepare bench_train_step bench_memory bench_compile_cache bench_end_to_end"
PARALLEL="${PARALLEL:-}"
# the minimum share of a 540 s suite each part keeps while earlier parts run
declare -A SHARE=([prepare]=10 [bench_train_step]=120 [bench_memory]=40 [bench_compile_cache]=60 [bench_ensemble]=30
                  [bench_end_to_end]=150
                  [series_models]=80 [loss_comparison]=70 [augmentation]=40 [best_recipe]=300)
START=$SECONDS
LOG="$OUT/suite.log"

say() { echo "[suite +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

pack() {
  local tmp="$OUT/.results.$BASHPID.tgz.tmp"
  tar czf "$tmp" -C experiments results 2>>"$LOG" && mv "$tmp" "$OUT/results.tgz"
}

wanted() { [[ " $PARTS " == *" $1 "* ]]; }

# later_reserve NAME: the shares of the parts in PARTS that run after NAME (0 when PARALLEL)
later_reserve() {
  local sum=0 after=""
  for p in $ALL_PARTS; do
    if [ -n "$after" ] && wanted "$p"; then sum=$((sum + SHARE[$p])); fi
    [ "$p" = "$1" ] && after=1
  done
  [ -n "$PARALLEL" ] && sum=0
  echo "$sum"
}

# part NAME MAX_SECONDS CMD...: run CMD with timeout min(MAX, TOTAL - elapsed - LATER_RESERVE'),
# LATER_RESERVE' being the later parts' shares scaled by TOTAL / 540.
# A literal BUDGET in CMD becomes the script's --budget value (limit minus 15 s for start-up and writing).
part() {
  local name="$1" max="$2"
  shift 2
  wanted "$name" || return 0
  local reserve
  reserve=$(later_reserve "$name")
  # Reserves are sized for the default 540 s and shrink with a smaller SUITE_SECONDS; when even the
  # shrunk reserve leaves this part under 20 s, earlier parts win: it takes what is left and later
  # parts are the ones skipped (a short lease still measures the benchmarks first).
  local remaining=$((TOTAL - (SECONDS - START)))
  local left=$((remaining - reserve * TOTAL / 540))
  [ "$left" -lt 20 ] && left=$remaining
  local limit=$((left < max ? left : max))
  if [ "$limit" -lt 20 ]; then
    say "$name: skipped (only ${limit}s left in the suite's ${TOTAL}s)"
    return 0
  fi
  local budget=$((limit - 15))
  local args=()
  for a in "$@"; do args+=("${a//BUDGET/$budget}"); done
  say "$name: start (limit ${limit}s): ${args[*]}"
  local t0=$SECONDS
  timeout --kill-after=5 "$limit" "${args[@]}" >"$OUT/$name.log" 2>&1
  local rc=$?
  say "$name: exit $rc after $((SECONDS - t0))s$([ $rc -eq 124 ] && echo ' (TIMED OUT)')"
  pack
  return 0
}

say "data: $DATA_ROOT; out: $OUT; total budget ${TOTAL}s"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  "$PY" -c "import torch, torchvision, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available(), \
torch.cuda.get_device_name() if torch.cuda.is_available() else '')" 2>&1
  "$PY" -c "import torchopt, matplotlib; print('torchopt', torchopt.__version__, 'matplotlib', matplotlib.__version__)" 2>&1
  nproc
} >>"$LOG" 2>&1

# run NAME ...: a part, in the background when PARALLEL is set
run() { if [ -n "$PARALLEL" ]; then part "$@" & else part "$@"; fi; }

part prepare 60 "$PY" -c "
import sys, time
from functional_seg.data import prepare
t0 = time.perf_counter()
for split in ('trainval', 'test'):
    d = prepare(sys.argv[1], split, 128)
    print(split, len(d), d.cache_path, f'{time.perf_counter() - t0:.1f} s')
" "$DATA_ROOT"
# prepare's output goes to suite.log rather than an eighth log file
cat "$OUT/prepare.log" >>"$LOG" 2>/dev/null && rm -f "$OUT/prepare.log"

run bench_train_step 200 "$PY" -m benchmarks.bench_train_step --data "$DATA_ROOT" --profile --budget BUDGET "${EXTRA[@]}"
run bench_memory 120 "$PY" -m benchmarks.bench_memory --budget BUDGET "${EXTRA[@]}"
run bench_compile_cache 180 "$PY" -m benchmarks.bench_compile_cache --budget BUDGET "${EXTRA[@]}"
run bench_ensemble 60 "$PY" -m benchmarks.bench_ensemble --data "$DATA_ROOT" --budget BUDGET "${EXTRA[@]}"
run bench_end_to_end 240 "$PY" -m benchmarks.bench_end_to_end --data "$DATA_ROOT" --timeout BUDGET "${EXTRA[@]}"
run series_models 150 "$PY" -m experiments.series_models --data "$DATA_ROOT" --budget BUDGET "${EXTRA[@]}"
run loss_comparison 120 "$PY" -m experiments.loss_comparison --data "$DATA_ROOT" --budget BUDGET "${EXTRA[@]}"
run augmentation 70 "$PY" -m experiments.augmentation --data "$DATA_ROOT" --budget BUDGET "${EXTRA[@]}"
run best_recipe 540 "$PY" -m experiments.best_recipe --data "$DATA_ROOT" --budget BUDGET "${EXTRA[@]}"
wait

say "done in $((SECONDS - START))s"
pack
ls -la "$OUT" >>"$LOG"
exit 0
