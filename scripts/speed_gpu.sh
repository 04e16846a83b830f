#!/usr/bin/env bash
# The speed report of one GPU in one call, offline, inside ~8 minutes on an H100/H200-class GPU:
#   GPU checks of the new paths (the Triton kernels against their references, compiled FlexAttention forward and
#   backward against the fp32 reference, flash varlen) -> attention alone (benchmarks/bench_attention.py: the
#   segment kernel, FlexAttention, SDPA, flash varlen and cuDNN's ragged attention on one layer of BERT-base
#   rows) -> the residual LayerNorm kernels alone (bench_residual_layer_norm --sweep at C = 768) -> the bias+GELU
#   kernels alone (bench_bias_gelu --sweep at C = 3072) -> attention alone at BERT-large's document rows of 512
#   -> hardware ceilings -> the speed ablation at
#   vocab 30,000 (BERT-base, seq 128, sentence packing: today, +row attention, +bf16 residual, +fused kernels,
#   +CUDA graphs, +fp8 tensorwise / rowwise / tensorwise with torch ops / rowwise with bf16 weight gradients and
#   torch ops, +async log reads, +packer process,
#   +segment attention kernel, +autotune (inductor's max_autotune; with the Triton kernels and with torch ops),
#   dropout off; each row with real tokens/s, MFU, % of the measured matmul
#   ceiling, peak memory, the traced step's phases or kernel categories, and validation loss at equal real
#   tokens) -> BERT-large, seq 512, document packing, today, the fastest configuration (with rows and flat) and
#   it with fp8 -> ~200-step loss curves of the fastest configuration against today's (and
#   today's at another seed: the noise)
# written to OUT_DIR as results.json and report.md (`mlmtrain bench --sections ceilings,ablation`).
#
# Usage:  bash scripts/speed_gpu.sh OUT_DIR [extra `mlmtrain bench` flags]
#         bash scripts/speed_gpu.sh OUT_DIR --merge    # a second call: only the rows the first could not finish
#                                                      # (reads OUT_DIR/results.json of the first)
#         bash scripts/speed_gpu.sh OUT_DIR --quick    # the same path on a CPU (tiny model): what the tests run
# Every row that does not fit the budget is recorded as skipped, with the reason, and the script prints the
# command that measures the rest. Environment: SPEED_BUDGET (seconds for the whole call, default 470),
# SPEED_RESERVE (of them, kept for the bench's rows: default 240), CHECKS=1
# (a --merge call runs the GPU checks too, into gpu_tests.txt), CHECKS_LIMIT (their seconds, default 300),
# CHECKS_WORKERS (pytest-xdist workers when it is installed or in .whl/, default 8), PYTHON
# (default python3). Nothing is downloaded: the package is imported from this checkout; torchao (fp8),
# accelerate and psutil, pytest-xdist and execnet are installed from .whl/ into /tmp/site when missing
# (git-ignored; docs/BENCHMARKS.md, "The GPU command", says how to fetch them and how to call this on a lent
# machine).
# OUT_DIR gets gpu.txt, gpu_tests.txt, kernels.tar.gz (the kernel benches' tables, rows and logs:
# attention.md/.json/.log, attention_large.*, layernorm.*, gelu.*), bench.log, results.json, report.md and the
# bench's .mlmtrain.json: 7 files, as a lent machine gives back at most 8 (a --merge call: gpu.txt,
# bench_merge.log, results.json, report.md, and kernels.tar.gz with the benches its OUT_DIR's archive lacked
# added, so copying the first call's archive into OUT_DIR keeps both calls' kernel files).
set -uo pipefail
OUT=${1:?usage: bash scripts/speed_gpu.sh OUT_DIR [--merge | --quick] [extra mlmtrain bench flags]}
shift
OUT=$(mkdir -p "$OUT" && cd "$OUT" && pwd) || exit 2  # absolute: the script works from the checkout's root
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
BUDGET=${SPEED_BUDGET:-470}
# seconds of the budget kept for the bench's rows: the checks and kernel benches before it start only, and run
# only as long, as leaves this much (less than 30 s for one of them: it is left to a later call, exit 1)
RESERVE=${SPEED_RESERVE:-240}
share() { local l=$((BUDGET - SECONDS - RESERVE - 10)); echo $((l < $1 ? l : $1)); }  # 10: timeout's kill grace
LEFT_OVER=""
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

QUICK=0 MERGE=0
for arg in "$@"; do
  [ "$arg" = "--quick" ] && QUICK=1
  [ "$arg" = "--merge" ] && MERGE=1
done

if [ "$QUICK" = 1 ]; then  # a CPU smoke run of the same sections: no installs, no GPU checks
  exec "$PY" -m mlmtrain.cli bench --out "$OUT" --device cpu --sections ceilings,ablation "$@"
fi

# mlmtrain must import from this checkout (trainer/ installs as mlmtrain, see pyproject.toml)
here=$("$PY" -c "import mlmtrain, os; print(os.path.dirname(os.path.realpath(mlmtrain.__file__)))" 2>/dev/null)
if [ "$here" != "$PWD/trainer" ]; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || echo "speed_gpu.sh: editable install failed; mlmtrain must already be importable" >&2
fi
# fp8 rows need torchao; the HF Trainer baseline needs accelerate (and it psutil). Installed beside the
# interpreter's own packages (/tmp/site on PYTHONPATH), so a read-only environment is no obstacle.
export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
for pkg in torchao accelerate xdist; do
  if ! "$PY" -c "import $pkg" 2>/dev/null; then
    wheels=$(ls .whl/$pkg-*.whl 2>/dev/null; [ "$pkg" = accelerate ] && ls .whl/psutil-*.whl 2>/dev/null
             [ "$pkg" = xdist ] && ls .whl/pytest_xdist-*.whl .whl/execnet-*.whl 2>/dev/null)
    [ -n "$wheels" ] && "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $wheels \
      >/dev/null 2>&1
    why="its rows will say so"; [ "$pkg" = xdist ] && why="the GPU checks run in one process"
    "$PY" -c "import $pkg" 2>/dev/null || echo "speed_gpu.sh: $pkg is not installed: $why" >&2
  fi
done

# OUT_DIR is the report's (new, empty, or an earlier call's), or refused, before anything is written in it
"$PY" -m mlmtrain.benchmarks.report "$OUT" --claim || exit 2
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"

SECTIONS=ceilings,ablation LOG="$OUT/bench.log"
[ "$MERGE" = 1 ] && SECTIONS=ablation LOG="$OUT/bench_merge.log"  # the first call's ceilings and log are kept
if [ "$MERGE" != 1 ] || [ "${CHECKS:-0}" = 1 ]; then  # CHECKS=1: a --merge call runs the GPU checks again too
  # the kernels' test files run whole on CUDA (every kernel against its reference, CUDA-graph replay, inductor);
  # of the model files, the compiled bf16 paths against the fp32 reference; then the GPU-only options' loss
  # curves against the compiled default. SIGINT at the limit: pytest still prints what ran and what failed.
  # The whole output goes to gpu_tests.txt (a tail lost the failures' names once: a KeyboardInterrupt traceback
  # from pytest's cleanup at the limit filled it); the console gets the short summary.
  echo "== GPU checks of the new paths" | tee "$OUT/gpu_tests.txt"
  # the newest first (a limit cuts the last); the options' curves (compiled runs) last. With pytest-xdist, 8
  # workers (the checks are mostly compiling, on the CPU; each worker compiles inductor's kernels on 2 threads)
  workers=""  # CHECKS_WORKERS=0: one process; xdist 3.8 needs pytest >= 7
  xdist_ok="import xdist, pytest; assert int(pytest.__version__.split('.')[0]) >= 7"
  [ "${CHECKS_WORKERS:-8}" != 0 ] && "$PY" -c "$xdist_ok" 2>/dev/null && workers="-n ${CHECKS_WORKERS:-8}"
  lim=$(share "${CHECKS_LIMIT:-300}")
  if [ "$lim" -lt 30 ]; then
    echo "speed_gpu.sh: no time for the GPU checks (the budget keeps $RESERVE s for the rows): a later call runs" \
      "them (CHECKS=1 ... --merge)" | tee -a "$OUT/gpu_tests.txt"
    LEFT_OVER="$LEFT_OVER checks"
  else
    TORCHINDUCTOR_COMPILE_THREADS=2 timeout -s INT -k 10 "$lim" "$PY" -m pytest -q -rfEs \
      --durations=8 -p no:cacheprovider $workers \
      tests/test_segment_attention.py tests/test_philox.py tests/test_residual_layer_norm.py \
      tests/test_bias_gelu.py tests/test_mlm_mask.py \
      tests/test_rows.py::test_compiled_flex_matches_fp32_reference_on_gpu \
      tests/test_model.py::test_varlen_matches_fp32_reference_on_gpu \
      tests/test_model.py::test_auto_picks_varlen_under_autocast_on_gpu \
      tests/test_host_syncs.py::test_the_loop_syncs_only_where_marked_on_gpu \
      tests/test_speed_options.py::test_gpu_options_train_within_tolerance_of_the_compiled_default \
      >>"$OUT/gpu_tests.txt" 2>&1
    grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/gpu_tests.txt" | head -40
  fi
fi

# The kernel benches alone, each once per OUT_DIR: their files go into one archive, kernels.tar.gz, as each ends
# (a lent machine gives back at most 8 files); a bench whose table the archive holds already, or OUT_DIR holds
# loose (a --merge call given the first call's archive, or its unpacked files), is not run again: its files go
# into the archive as they are.
KERNELS="$OUT/kernels.tar.gz"
in_archive() {  # the listing read whole first: grep -q stopping early would SIGPIPE tar, failing the pipeline
  local names; names=$([ -s "$KERNELS" ] && tar -tzf "$KERNELS" 2>/dev/null) && grep -qx -- "$1" <<<"$names"
}
archive() {  # FILE...: into the archive beside what it holds, then out of OUT_DIR
  local tmp; tmp=$(mktemp -d)
  [ -s "$KERNELS" ] && tar -xzf "$KERNELS" -C "$tmp"
  (cd "$OUT" && cp -- "$@" "$tmp"/ 2>/dev/null)
  (cd "$tmp" && tar -czf "$KERNELS.part" -- *) && mv "$KERNELS.part" "$KERNELS" && (cd "$OUT" && rm -f -- "$@")
  rm -rf "$tmp"
}
kernel_bench() {  # NAME SECONDS SHOWN_LINES MODULE ARGS...: OUT_DIR/NAME.md (table), .json (rows), .log (stderr)
  local name=$1 limit=$2 lines=$3; shift 3
  if [ -s "$OUT/$name.md" ]; then  # copied in unpacked
    archive $(cd "$OUT" && ls -- "$name.md" "$name.json" "$name.log" 2>/dev/null)
    return
  fi
  in_archive "$name.md" && return
  limit=$(share "$limit")
  if [ "$limit" -lt 30 ]; then
    echo "speed_gpu.sh: no time for $name (the budget keeps $RESERVE s for the rows): a later call runs it"
    LEFT_OVER="$LEFT_OVER $name"
    return
  fi
  if timeout -k 10 "$limit" "$PY" -m "$@" --out "$OUT/$name.json" >"$OUT/$name.md" 2>"$OUT/$name.log"; then
    tail -"$lines" "$OUT/$name.md"
    archive "$name.md" "$name.json" "$name.log"
  else  # only its log is kept: a later call runs it again, and this one's exit code says so
    echo "speed_gpu.sh: $name failed (its log: $name.log in $KERNELS); a later call runs it again"
    tail -"$lines" "$OUT/$name.log"
    rm -f "$OUT/$name.md" "$OUT/$name.json"
    archive "$name.log"
    KERNELS_FAILED="$KERNELS_FAILED $name"
  fi
}
KERNELS_FAILED=""
# attention alone at BERT-base's rows (one layer, ~20 s): the segment kernel against compiled FlexAttention, the
# dense-mask SDPA, and flash varlen and cuDNN's ragged attention on the same segments laid flat
kernel_bench attention 90 20 mlmtrain.benchmarks.bench_attention --device cuda
# the residual LayerNorm kernels alone at BERT-base's shape (~30 s): against the copy ceiling, and other tiles
# (--sweep): what the next tuning of them starts from
kernel_bench layernorm 60 12 mlmtrain.benchmarks.bench_residual_layer_norm --device cuda --hidden 768 --no-compile \
  --sweep
# the bias+GELU kernels alone at BERT-base's intermediate size (~40 s: 15 launches to compile): against the copy
# ceiling, and other launches (--sweep: tiles, programs per SM, pipelined loads, an erf with one reciprocal)
kernel_bench gelu 90 12 mlmtrain.benchmarks.bench_bias_gelu --device cuda --hidden 3072 --no-compile --sweep
# attention alone at BERT-large's target rows (~30 s): document chunks in rows of 512, 16 heads; FlexAttention
# against flash varlen and cuDNN's ragged attention laid flat (the large model's flat layout runs flash varlen)
kernel_bench attention_large 90 20 mlmtrain.benchmarks.bench_attention --device cuda --rows 128 --row-len 512 \
  --heads 16 --documents

# --time-limit: no row starts whose expected end (the longest row so far) is past it; `timeout` is the hard stop
# (results.json is rewritten after every section and every row is kept, so what finished is in the report)
left=$((BUDGET - SECONDS)); left=$((left < 1 ? 1 : left))  # timeout takes no 0 (no limit) or negative budget
limit() { local l=$(($1 - 25)); echo $((l < 1 ? 1 : l)); }  # seconds new work may start in (0 would be no limit)
timeout -k 10 "$left" "$PY" -m mlmtrain.cli bench --out "$OUT" --device cuda --sections "$SECTIONS" \
  --time-limit "$(limit "$left")" "$@" 2>&1 | grep -v "step/s" | tee "$LOG"
rc=${PIPESTATUS[0]}
# a row that broke the device (a sticky CUDA error) leaves the rows after it to a fresh process: run them with
# what the budget has left (each pass gets past at least one row, so this ends), keeping every row measured so
# far: the flags without --remeasure (a remeasured row that broke the device would otherwise run again)
kept=() skip=0
for arg in "$@"; do
  if [ "$skip" = 1 ]; then skip=0; continue; fi
  if [ "$arg" = "--remeasure" ]; then skip=1; continue; fi
  kept+=("$arg")
done
set -- ${kept[@]+"${kept[@]}"}  # (the guard: an empty array under set -u in old bash)
while grep -q "not run: the device failed" "$OUT/results.json" 2>/dev/null && [ $((BUDGET - SECONDS)) -gt 90 ]; do
  left=$((BUDGET - SECONDS))
  echo "speed_gpu.sh: a row broke the device; the rows after it in a fresh process ($left s left)" \
    | tee -a "$LOG"
  timeout -k 10 "$left" "$PY" -m mlmtrain.cli bench --out "$OUT" --device cuda --sections ablation --merge \
    --time-limit "$(limit "$left")" "$@" 2>&1 | grep -v "step/s" | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
done
if [ -n "$KERNELS_FAILED" ] && [ "$rc" = 0 ]; then  # the report is complete, the kernel tables are not
  echo "speed_gpu.sh: kernel benches that failed:$KERNELS_FAILED; a --merge call runs them again"
  rc=1
fi
if [ -n "$LEFT_OVER" ] && [ "$rc" = 0 ]; then
  echo "speed_gpu.sh: left to a later call for want of time:$LEFT_OVER"
  rc=1
fi
echo "speed_gpu.sh: report in $OUT/report.md (exit $rc, $SECONDS s)"
if [ "$rc" = 124 ] || [ "$rc" = 137 ] || grep -q '"skipped: ' "$OUT/results.json" 2>/dev/null; then
  echo "speed_gpu.sh: some rows did not fit the budget; measure them with: bash scripts/speed_gpu.sh $OUT --merge"
fi
exit "$rc"
