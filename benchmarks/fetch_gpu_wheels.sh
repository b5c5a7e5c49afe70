#!/usr/bin/env bash
# Fetch, on this (networked) machine, the wheels the GPU image lacks, into .whl/ (git-ignored), for the device
# tool to carry: `run(command="bash benchmarks/run_gpu.sh", carry=[".whl"])`. The GPU image (torch 2.11,
# triton 3.6, CPython 3.12, x86-64; see .library/device/KINDS.md) has numpy, matplotlib, pytest,
# pytest-benchmark, portalocker and tabulate, but not fvcore and its helpers or pycocotools.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# Binary wheels for CPython 3.12 (pycocotools has compiled code; the others are pure Python).
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" \
  -d .whl "pycocotools==2.0.11" "yacs==0.1.8" "termcolor==3.3.0"
# fvcore and iopath publish only sdists: build pure-Python wheels here (no compiled parts, any platform).
python3 -m pip wheel -q --no-deps -w .whl "fvcore==0.1.5.post20221221" "iopath==0.1.10"
# The calibration stage (static estimate vs measured kernel time) reads .whl/static_cost.json when carried, which
# saves compiling every config there: STATIC_JSON=path, else the newest committed static report (benchmarks/
# results/static/<date>/<run>/; sorted by path, so an 'after' run beats 'before'). Without one, the stage runs
# benchmarks/static_cost.py there if it exists, else skips.
static="${STATIC_JSON:-$(ls benchmarks/results/static/*/*/static_cost.json benchmarks/results/static/*/static_cost.json \
  2>/dev/null | sort | tail -1)}"
if [ -n "$static" ] && [ -f "$static" ]; then
  cp "$static" .whl/static_cost.json && echo "$static" > .whl/static_cost.source
fi
# The device machine's copy of the tree has no .git: record the commit the results will belong to.
echo "$(git rev-parse HEAD)$(git diff --quiet HEAD -- . ':!.whl' || echo ' (+ local changes)')" > .whl/commit.txt
ls -l .whl
du -sh .whl
