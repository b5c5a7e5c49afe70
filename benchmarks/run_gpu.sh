#!/usr/bin/env bash
# GPU session script: correctness on the GPU, then every benchmark, everything written under
# "${OUT:-benchmarks/results/<date>}" (device, date, torch/triton versions, every figure).
#
#   bash benchmarks/run_gpu.sh STAGE      STAGE: tests | attention | prune | model | suite | all
#
# The device tool allows 10 minutes per command and about 30 minutes per session, machine start included, so a
# session runs the stages as separate calls, in this order of priority, each bounded well under 10 minutes (the
# benchmark scripts stop starting new cases at their --budget-s and still write their tables):
#
#   bash benchmarks/fetch_gpu_wheels.sh                 # here, once: wheels the GPU image lacks -> .whl/
#   run(command="bash benchmarks/run_gpu.sh tests",     carry=[".whl"])   # ~5 min: GPU correctness suite
#   run(command="bash benchmarks/run_gpu.sh attention", carry=[".whl"])   # <= 8 min: MHGA vs baselines
#   run(command="bash benchmarks/run_gpu.sh prune",     carry=[".whl"])   # <= 5 min: token pruning per site
#   run(command="bash benchmarks/run_gpu.sh model",     carry=[".whl"])   # <= 8 min: GTPT-S end to end
#   (suite: the pytest-benchmark suite, if time is left; all: every stage in one go, for a machine without the
#   10-minute limit)
#
# then copy the returned files into benchmarks/results/<date>/ and commit them.
set -uo pipefail
export PYTHONUNBUFFERED=1
STAGE="${1:-all}"
OUT="${OUT:-benchmarks/results/$(date +%Y-%m-%d)}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | sed 's/^/device: /'
  python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda)"
  echo "stage: $STAGE"
} | tee -a "$OUT/environment.txt"

stage_tests() {
  # Correctness on the GPU (no interpreter): bf16 and gpu-marked cases included. The sm_90 AOT compile test is
  # the CPU machines' stand-in for a GPU and is skipped here.
  # The GPU image has pytest-xdist: 4 workers overlap the kernels' JIT compiles (CPU-bound) on its 16 cores.
  local xdist=""
  python3 -c "import xdist" 2>/dev/null && xdist="-n 4"
  GTPT_NO_INTERPRET=1 timeout 540 python3 -m pytest tests -q -p no:cacheprovider -rs $xdist \
    --ignore=tests/test_kernels_compile.py 2>&1 | tee "$OUT/tests.txt"
}
stage_attention() {
  timeout 560 python3 benchmarks/run_group_attention.py --out-dir "$OUT" --batch 32 128 --dtype bf16 fp32 \
    --budget-s 420 2>&1 | tee "$OUT/group_attention.txt"
}
stage_prune() {
  timeout 400 python3 benchmarks/run_token_prune.py --out-dir "$OUT" --batch 32 128 --dtype bf16 fp32 \
    --budget-s 280 2>&1 | tee "$OUT/token_prune.txt"
}
stage_model() {
  # Issue 5's target: GTPT-S inference at B = 32 / 128, fused kernels + CUDA graphs vs the eager reference and
  # torch.compile(mode="reduce-overhead") of it. Compile configs run last (see gtpt/profiler.py).
  timeout 560 python3 -m gtpt profile --device cuda --variants gtpt-s --batch-sizes 32 128 --dtypes bf16 fp32 \
    --backends reference triton cudagraph cudagraph-reference compile-reduce-overhead compile \
    --modes inference --repeats 30 --warmup 5 --budget-s 420 --out-dir "$OUT/profile" 2>&1 | tee "$OUT/profile.txt"
}
stage_suite() {
  timeout 560 python3 -m pytest benchmarks -q -p no:cacheprovider --benchmark-json "$OUT/pytest-benchmark.json" \
    2>&1 | tee "$OUT/benchmarks.txt"
}

case "$STAGE" in
  tests) stage_tests ;;
  attention) stage_attention ;;
  prune) stage_prune ;;
  model) stage_model ;;
  suite) stage_suite ;;
  all) stage_tests; stage_attention; stage_prune; stage_model; stage_suite ;;
  *) echo "unknown stage '$STAGE' (tests | attention | prune | model | suite | all)" >&2; exit 2 ;;
esac
