#!/usr/bin/env bash
# One call on a lent GPU machine: the whole correctness suite on the GPU, then every benchmark, with everything
# written to "${OUT:-benchmarks/results/<date>}" (device, date, torch/triton versions, every figure).
#
# On the device tool: carry `.whl` (fvcore, iopath, yacs, termcolor, pycocotools, portalocker, tabulate wheels for
# cp312 manylinux x86_64, fetched here with `pip download --no-deps --only-binary=:all: ...`, see
# .library/device/README.md) and run `bash benchmarks/run_gpu.sh`. Not yet run on a GPU.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-benchmarks/results/$(date +%Y-%m-%d)}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . || exit 1
{
  date -u +"date: %Y-%m-%dT%H:%M:%SZ"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/device: /'
  python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__, '| cuda', torch.version.cuda)"
} | tee "$OUT/environment.txt"
# 1. correctness on the GPU (no interpreter), bf16 and gpu-marked cases included
GTPT_NO_INTERPRET=1 timeout 900 python3 -m pytest tests -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/tests.txt"
# 2. kernel benchmarks side by side, then the model suite and the profiler
timeout 600 python3 benchmarks/run_group_attention.py --out-dir "$OUT" --batch 32 128 --dtype fp32 bf16 2>&1 | tee "$OUT/group_attention.txt"
timeout 300 python3 benchmarks/run_token_prune.py --out-dir "$OUT" --batch 32 128 --dtype fp32 bf16 2>&1 | tee "$OUT/token_prune.txt"
timeout 600 python3 -m pytest benchmarks -q -p no:cacheprovider --benchmark-json "$OUT/pytest-benchmark.json" 2>&1 | tee "$OUT/benchmarks.txt"
timeout 600 python3 -m gtpt profile --device cuda --variants gtpt-s --batch-sizes 1 32 128 --dtypes fp32 bf16 \
  --backends reference triton compile cudagraph --modes inference train --out-dir "$OUT/profile" 2>&1 | tee "$OUT/profile.txt"
