#!/usr/bin/env bash
# The GPU benchmark report in one command, offline, inside 9 minutes on one H100/H200-class GPU:
#   hardware ceilings -> masking kernel -> ours vs the HF Trainer baseline (base, seq 128, same tokens)
#   -> model forward+backward (base, large) -> sweep of tokens per batch x sequence caps
# written to OUT_DIR as results.json, report.md and PNG charts (`mlmtrain bench`, benchmarks/suite.py).
#
# Usage:  bash scripts/bench_gpu.sh OUT_DIR [extra `mlmtrain bench` flags]
#   Sweep points that do not fit the time budget are recorded as skipped; measure them in a second call
#   that keeps the first call's sections:  bash scripts/bench_gpu.sh OUT_DIR --sections sweep --merge
# Environment: BENCH_TIME_LIMIT (seconds in which new work may start, default 450), BENCH_HARD_LIMIT (kill
# after, default 520), BENCH_SECTIONS (which sections, in run order).
# Nothing is downloaded: the package is imported from this checkout (editable install without deps);
# torch, triton, transformers and matplotlib must be installed; accelerate and psutil are installed from
# .whl/ (git-ignored; `pip download --no-deps accelerate psutil -d .whl`) when missing.
set -uo pipefail
OUT=${1:?usage: bash scripts/bench_gpu.sh OUT_DIR [extra mlmtrain bench flags]}
shift
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# mlmtrain must import from this checkout (trainer/ installs as mlmtrain, see pyproject.toml)
here=$(python3 -c "import mlmtrain, os; print(os.path.dirname(os.path.realpath(mlmtrain.__file__)))" 2>/dev/null)
if [ "$here" != "$PWD/trainer" ]; then
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 \
    || echo "bench_gpu.sh: editable install failed; mlmtrain must already be importable" >&2
fi
# the recipe's transformers.Trainer needs accelerate (and psutil); without network, install them from
# wheels carried in .whl/ if there are any
if ! python3 -c "import accelerate" 2>/dev/null; then
  ls .whl/accelerate-*.whl >/dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps .whl/accelerate-*.whl \
    $(ls .whl/psutil-*.whl 2>/dev/null) >/dev/null 2>&1
fi

# OUT_DIR is the report's (new, empty, or an earlier call's), or refused, before anything is written in it
python3 -m mlmtrain.benchmarks.report "$OUT" --claim || exit 2
LOG="$OUT/bench.log"
for arg in "$@"; do [ "$arg" = "--merge" ] && LOG="$OUT/bench_merge.log"; done  # the first call's log is kept
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

SECTIONS=${BENCH_SECTIONS:-ceilings,mask,train,model,sweep}  # the headline sections first
if ! python3 -c "import accelerate" 2>/dev/null; then  # `mlmtrain bench` refuses the train section without it
  SECTIONS=$(echo ",$SECTIONS," | sed 's/,train,/,/; s/^,//; s/,$//')
  echo "bench_gpu.sh: accelerate is not installed: the train section (ours against the HF Trainer) is left out" >&2
fi
# --time-limit stops new work from starting; `timeout` is the hard stop under a 10-minute command limit
# (results.json is rewritten after every section, so what finished is kept)
timeout -k 10 "${BENCH_HARD_LIMIT:-520}" python3 -m mlmtrain.cli bench --out "$OUT" --device cuda \
  --sections "$SECTIONS" --time-limit "${BENCH_TIME_LIMIT:-450}" "$@" 2>&1 | grep -v "step/s" | tee "$LOG"
rc=${PIPESTATUS[0]}
echo "bench_gpu.sh: report in $OUT/report.md (exit $rc)"
if grep -q "skipped: the time budget" "$OUT/results.json" 2>/dev/null; then
  echo "bench_gpu.sh: some points were skipped for time; continue with: bash scripts/bench_gpu.sh $OUT --sections sweep --merge"
fi
exit "$rc"
