#!/usr/bin/env bash
# One GPU session's correctness checks and first measurements, in one go (no network needed):
#   GPU tests (kernel on CUDA == reference, bf16 varlen model vs fp32 reference), a short `base`
#   training run with torch.compile, and the masking and model benchmarks.
# Usage: bash scripts/gpu_check.sh OUT_DIR
set -uo pipefail
OUT=${1:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
# trainer/ installs as mlmtrain, so only an editable install of this checkout makes `import mlmtrain` load it
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
here=$(python3 -c "import mlmtrain, os; print(os.path.dirname(os.path.realpath(mlmtrain.__file__)))" 2>/dev/null)
[ "$here" = "$PWD/trainer" ] || { echo "gpu_check.sh: mlmtrain imports from '$here', not this checkout" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

echo "== GPU tests"
timeout 240 python3 -m pytest -q -x -k "cuda or gpu or varlen or triton" tests/test_mlm_mask.py tests/test_model.py 2>&1 | tail -25 | tee "$OUT/tests.txt"

echo "== short base training run (compile, bf16, 64k tokens)"
W=$(mktemp -d)
python3 -m mlmtrain.cli tokenizer --input trainer/assets/sample_corpus.txt --out "$W/tok" --vocab-size 30000 >/dev/null 2>&1
python3 -m mlmtrain.cli prepare --input trainer/assets/sample_corpus.txt --tokenizer "$W/tok" --out "$W/data" --valid-fraction 0.05 >/dev/null 2>&1
timeout 300 python3 -m mlmtrain.cli train --data "$W/data" --tokenizer "$W/tok" --out "$W/run" --model base \
  --max-steps ${STEPS:-60} --set train.log_every=10 --set train.eval_every=0 --profile-steps 40:45 --profile-memory 2>&1 \
  | grep -v "step/s" | tail -45 | tee "$OUT/train.txt"
cp "$W/run/metrics.jsonl" "$W/run/summary.json" "$OUT/" 2>/dev/null
cp "$W/run/profile/phases.json" "$W/run/profile/categories.json" "$OUT/" 2>/dev/null
ls -la "$W/run/profile" | tee "$OUT/profile_files.txt"  # trace.json, categories.json, phases.json, memory_snapshot.pickle

echo "== benchmarks"
timeout 150 python3 -m mlmtrain.benchmarks.bench_mlm_mask --out "$OUT/bench_mlm_mask.json" 2>&1 | tail -15
timeout 200 python3 -m mlmtrain.benchmarks.bench_model --size base --tokens-per-batch 65536 --compile --out "$OUT/bench_model.json" 2>&1 | tail -15
