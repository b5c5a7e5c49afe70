#!/usr/bin/env bash
# GPU session script: correctness on the GPU, then every benchmark, in ONE device call that fits the session's
# device time (15 minutes in all, machine start included; 10 minutes per command), with every figure and the
# device, date and torch/triton versions written down.
#
#   bash benchmarks/fetch_gpu_wheels.sh      # here, after the last commit: the wheels the GPU image lacks and
#                                            # the commit (.whl/commit.txt; the device copy has no .git) -> .whl/
#   run(command="bash benchmarks/run_gpu.sh", carry=[".whl"], timeout_s=480)
#
#   then, here:  mkdir -p benchmarks/results/DATE && tar -xzf FILES_AT/gpu-results.tar.gz -C benchmarks/results/DATE
#   and commit that folder (run.log too).
#
# Usage: bash benchmarks/run_gpu.sh [STAGE ...]   STAGE: tests attention prune model suite (default: the first four)
#
# Time: GPU_BUDGET_S (default 390 s) bounds the whole script, setup included. Each stage owns a share of it (tests
# 28%, attention 34%, prune 13%, model 25%) plus whatever earlier stages left unused (stage k ends at the sum of the
# shares 1..k; a stage left under 20 s is skipped); at its end a stage gets SIGTERM (then SIGKILL 20 s later). The benchmark scripts stop starting cases before that, run the cheap implementations over
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
  RES=$(mktemp -d /tmp/gpu-results.XXXXXX)  # fresh per call: a rerun on a warm machine bundles only its own files
  BUNDLE="$OUT/gpu-results.tar.gz"
  exec > >(tee -a "$OUT/run.log") 2>&1
else
  RES="benchmarks/results/$(date -u +%Y-%m-%d)"
  BUNDLE=""
fi
mkdir -p "$RES"
# write then rename: a call killed mid-bundle still leaves the previous complete bundle
bundle() { if [ -n "$BUNDLE" ]; then tar -czf "$BUNDLE.part" -C "$RES" . && mv -f "$BUNDLE.part" "$BUNDLE"; fi; }

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The scripts run from the repository root either way; the install only adds the `gtpt` entry point.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -m pip install -q --no-deps --no-build-isolation -e . || echo "warning: pip install -e . failed; using PYTHONPATH"
# The device machine gets a copy of the working tree without .git: the commit comes from GTPT_COMMIT, else git,
# else .whl/commit.txt (written by fetch_gpu_wheels.sh next to the wheels, which the call carries).
if [ -n "${GTPT_COMMIT:-}" ]; then
  COMMIT="$GTPT_COMMIT"
elif COMMIT=$(git rev-parse HEAD 2>/dev/null); then
  git diff --quiet 2>/dev/null || COMMIT="$COMMIT (+ local changes)"
elif [ -f .whl/commit.txt ]; then
  COMMIT="$(cat .whl/commit.txt) (from .whl/commit.txt)"
else
  COMMIT=unknown
fi
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  echo "commit: $COMMIT"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | sed 's/^/device: /'
  python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda)"
  python3 -c "import fvcore, pycocotools; print('fvcore + pycocotools importable')" 2>&1 | tail -1
  echo "stages: ${STAGES[*]} | budget: ${BUDGET} s"
} | tee "$RES/environment.txt"
bundle

# Stage shares (percent of the budget left after setup); unused time flows to the stages after.
declare -A SHARE=([tests]=28 [attention]=34 [prune]=13 [model]=25 [suite]=30)
total=0; for s in "${STAGES[@]}"; do total=$((total + SHARE[$s])); done
SETUP_END=$(date +%s)
LEFT=$((BUDGET - (SETUP_END - T0)))
# Stage k ends at SETUP_END + LEFT * (shares of stages 1..k) / total. The running sum lives in this shell (the
# loop below adds to it): a function called as $(...) would run in a subshell and lose it.
cum=0
seconds_until() { echo $(($1 - $(date +%s))); }
MIN_STAGE_S=20  # less than this cannot even import torch and write a table: the stage is skipped
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
  # The pruned path only (the model's output; the op breakdown above has the unpruned one), so the eager configs
  # leave time for the compiled ones.
  run_for "$t" python3 -m gtpt profile --device cuda --variants gtpt-s --batch-sizes 128 32 --dtypes bf16 fp32 \
    --backends triton reference cudagraph cudagraph-reference compile-reduce-overhead compile-triton-reduce-overhead \
    --modes inference --paths pruned --no-flops --repeats 20 --warmup 3 --budget-s $((t > 60 ? t - 45 : t / 2)) \
    --out-dir "$RES/profile" 2>&1 | tee "$RES/profile.txt"
}
stage_suite() {
  local t=$1
  run_for "$t" "${PYTEST[@]}" benchmarks -q -p no:cacheprovider --benchmark-json "$RES/pytest-benchmark.json" \
    2>&1 | tee "$RES/benchmarks.txt"
}

for s in "${STAGES[@]}"; do
  cum=$((cum + SHARE[$s]))
  t=$(seconds_until $((SETUP_END + LEFT * cum / total)))
  if [ "$t" -lt "$MIN_STAGE_S" ]; then
    echo "=== stage $s: skipped, only $t s of the budget left (elapsed $(( $(date +%s) - T0 )) s) ===" \
      | tee -a "$RES/skipped-stages.txt"
    continue
  fi
  echo "=== stage $s: up to $t s (elapsed $(( $(date +%s) - T0 )) s) ==="
  "stage_$s" "$t"
  echo "=== stage $s done (elapsed $(( $(date +%s) - T0 )) s) ==="
  bundle
done
echo "total: $(( $(date +%s) - T0 )) s"
bundle
