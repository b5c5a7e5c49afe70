#!/usr/bin/env bash
# GPU session script: correctness on the GPU, then every benchmark, in ONE device call that fits the session's
# device time (15 minutes in all, machine start included; 10 minutes per command), with every figure and the
# device, date and torch/triton versions written down.
#
#   bash benchmarks/fetch_gpu_wheels.sh      # here, once: the wheels the GPU image lacks -> .whl/ (git-ignored)
#   run(command="bash benchmarks/run_gpu.sh", carry=[".whl"], timeout_s=480)
#
#   then, here:  mkdir -p benchmarks/results/DATE && tar -xzf FILES_AT/gpu-results.tar.gz -C benchmarks/results/DATE
#   and commit that folder (run.log too).
#
# Usage: bash benchmarks/run_gpu.sh [STAGE ...]   STAGE: tests attention prune model suite (default: the first four)
#
# Time: GPU_BUDGET_S (default 390 s) bounds the whole script, setup included. Each stage owns a share of it (tests
# 30%, attention 35%, prune 13%, model 22%) plus whatever earlier stages left unused; at its end a stage gets SIGTERM
# (then SIGKILL 20 s later). The benchmark scripts stop starting cases before that, run the cheap implementations over
# every case before any compiled baseline (most important cases first), and on SIGTERM still write their tables;
# pytest prints its summary (and -v has logged every test's outcome as it finished). So a run measures as much as
# its time allows and always returns what it measured, leaving the session enough device time (about 6 of its 15
# minutes) to rerun a stage, e.g. `GPU_BUDGET_S=200 bash benchmarks/run_gpu.sh attention`.
#
# Output: on the device machine ($OUT set) everything is bundled into $OUT/gpu-results.tar.gz after every stage
# (the device tool returns at most 8 files), with the full log in $OUT/run.log. Without $OUT (a GPU machine of
# your own) the files go to benchmarks/results/<date>/.
set -uo pipefail
export PYTHONUNBUFFERED=1
T0=$(date +%s)
BUDGET="${GPU_BUDGET_S:-390}"
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(tests attention prune model)
for s in "${STAGES[@]}"; do
  case "$s" in tests|attention|prune|model|suite) ;; *)
    echo "unknown stage '$s' (tests attention prune model suite)" >&2; exit 2 ;;
  esac
done

if [ -n "${OUT:-}" ]; then
  RES=/tmp/gpu-results
  BUNDLE="$OUT/gpu-results.tar.gz"
  exec > >(tee -a "$OUT/run.log") 2>&1
else
  RES="benchmarks/results/$(date -u +%Y-%m-%d)"
  BUNDLE=""
fi
mkdir -p "$RES"
bundle() { if [ -n "$BUNDLE" ]; then tar -czf "$BUNDLE" -C "$RES" .; fi; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ local changes)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | sed 's/^/device: /'
  python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda)"
  python3 -c "import fvcore, pycocotools; print('fvcore + pycocotools importable')" 2>&1 | tail -1
  echo "stages: ${STAGES[*]} | budget: ${BUDGET} s"
} | tee "$RES/environment.txt"
bundle

# Stage shares (percent of the budget left after setup); unused time flows to the stages after.
declare -A SHARE=([tests]=30 [attention]=35 [prune]=13 [model]=22 [suite]=30)
total=0; for s in "${STAGES[@]}"; do total=$((total + SHARE[$s])); done
SETUP_END=$(date +%s)
LEFT=$((BUDGET - (SETUP_END - T0)))
cum=0
stage_end() { cum=$((cum + SHARE[$1])); echo $((SETUP_END + LEFT * cum / total)); }
seconds_until() { local s=$(($1 - $(date +%s))); [ $s -lt 5 ] && s=5; echo $s; }
# run_for SECONDS CMD...: SIGTERM at the end, SIGKILL 20 s later. The Python entry points turn SIGTERM (and SIGINT,
# which a shell without job control starts background jobs ignoring) into KeyboardInterrupt: the scripts write their
# tables (gtpt.profiler.interrupt_on_stop_signals), pytest its summary (PYTEST below).
run_for() { local t=$1; shift; timeout -k 20 "$t" "$@"; }
PYTEST=(python3 -c "import signal, sys, pytest
signal.signal(signal.SIGINT, signal.default_int_handler); signal.signal(signal.SIGTERM, signal.default_int_handler)
sys.exit(pytest.main(sys.argv[1:]))")

stage_tests() {
  # Correctness on the GPU (no interpreter): bf16 and gpu-marked cases included. The sm_90 AOT compile test is
  # the CPU machines' stand-in for a GPU and is skipped here. pytest-xdist (in the GPU image) overlaps the
  # kernels' JIT compiles, which are CPU-bound, on the machine's 16 cores.
  local t=$1 xdist=""
  python3 -c "import xdist" 2>/dev/null && xdist="-n 8"
  # A hung test (a kernel that never returns) must not eat the stage: pytest-timeout is in the GPU image too.
  python3 -c "import pytest_timeout" 2>/dev/null && xdist="$xdist --timeout=120"
  GTPT_NO_INTERPRET=1 run_for "$t" "${PYTEST[@]}" tests -v -p no:cacheprovider -rs $xdist --durations=15 \
    --junitxml="$RES/tests-junit.xml" --ignore=tests/test_kernels_compile.py 2>&1 | tee "$RES/tests.txt"
}
stage_attention() {
  local t=$1
  run_for "$t" python3 benchmarks/run_group_attention.py --out-dir "$RES" --batch 32 128 --dtype bf16 fp32 \
    --budget-s $((t > 60 ? t - 40 : t / 2)) 2>&1 | tee "$RES/group_attention.txt"
}
stage_prune() {
  local t=$1
  run_for "$t" python3 benchmarks/run_token_prune.py --out-dir "$RES" --batch 32 128 --dtype bf16 fp32 \
    --budget-s $((t > 40 ? t - 25 : t / 2)) 2>&1 | tee "$RES/token_prune.txt"
}
stage_model() {
  # Issue 5's comparison: GTPT-S inference, fused kernels (+ CUDA graphs) vs the eager reference and
  # torch.compile(mode="reduce-overhead") of it, and of the model on our kernels (Inductor fuses the norms,
  # activations and adds around them). Compiled configs run last (gtpt/profiler.py). First, a short op breakdown
  # (torch.profiler kernel time by category) of eager bf16 B=128, inference and one training step (both passes,
  # forward + backward): where the time goes once attention and pruning are fused, i.e. which further fusion
  # would pay, and the training-step time on the kernels vs the reference.
  local t=$1
  local t_ops=$((t / 5 > 25 ? t / 5 : 25))
  if [ "$t" -ge 60 ]; then  # a short stage keeps its time for the latency sweep
    run_for "$t_ops" python3 -m gtpt profile --device cuda --variants gtpt-s --batch-sizes 128 --dtypes bf16 \
      --backends triton reference --modes inference train --repeats 5 --warmup 2 --no-flops --no-stages --op-breakdown \
      --out-dir "$RES/ops" 2>&1 | tee "$RES/ops.txt"
    t=$((t - t_ops))
  fi
  run_for "$t" python3 -m gtpt profile --device cuda --variants gtpt-s --batch-sizes 128 32 --dtypes bf16 fp32 \
    --backends triton reference cudagraph cudagraph-reference compile-reduce-overhead compile-triton-reduce-overhead \
    --modes inference --repeats 20 --warmup 3 --budget-s $((t > 60 ? t - 45 : t / 2)) --out-dir "$RES/profile" \
    2>&1 | tee "$RES/profile.txt"
}
stage_suite() {
  local t=$1
  run_for "$t" "${PYTEST[@]}" benchmarks -q -p no:cacheprovider --benchmark-json "$RES/pytest-benchmark.json" \
    2>&1 | tee "$RES/benchmarks.txt"
}

for s in "${STAGES[@]}"; do
  t=$(seconds_until "$(stage_end "$s")")
  echo "=== stage $s: up to $t s (elapsed $(( $(date +%s) - T0 )) s) ==="
  "stage_$s" "$t"
  echo "=== stage $s done (elapsed $(( $(date +%s) - T0 )) s) ==="
  bundle
done
echo "total: $(( $(date +%s) - T0 )) s"
bundle
