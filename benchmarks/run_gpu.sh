#!/usr/bin/env bash
# GPU session: every headline figure in priority order, in ONE device call of at most 8 minutes, each stage in a
# hard time box (benchmarks/gpu_session.py has the plan, the time boxes and the outputs).
#
#   here:   bash benchmarks/fetch_gpu_wheels.sh && python3 benchmarks/preflight_gpu.py
#           (the wheels the GPU image lacks + the commit -> .whl/; then every import and case list checked from
#           .whl/ and the repo alone; it prints the call below)
#   there:  run(command="bash benchmarks/run_gpu.sh", carry=[".whl"], timeout_s=480)
#   here:   tar -xzf FILES_AT/gpu-results.tar.gz -C benchmarks/results      # -> benchmarks/results/<date>/
#
# A second call re-runs what was cut or failed: summary.md ends with the exact call, e.g.
#   run(command="GPU_BUDGET_S=240 bash benchmarks/run_gpu.sh attention model", carry=[".whl"], timeout_s=300)
# (or copy the first summary.json to .whl/ and use `bash benchmarks/run_gpu.sh --rerun-failed .whl/summary.json`).
#
# Usage: bash benchmarks/run_gpu.sh [--dry-run] [--rerun-failed SUMMARY_JSON] [STAGE ...]
#   STAGE: tests attention prune model calibration train ops rest (default: all, in that order)
# GPU_BUDGET_S (default 420) bounds the whole script, this setup included.
set -uo pipefail
export PYTHONUNBUFFERED=1
export GPU_T0="${GPU_T0:-$(date +%s.%N)}"
cd "$(dirname "$0")/.."

if [ -n "${OUT:-}" ]; then
  exec > >(tee -a "$OUT/run.log") 2>&1
fi
WHL="${GPU_WHEELS_DIR:-.whl}"
if ls "$WHL"/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
    || echo "warning: installing the carried wheels failed; their imports will fail (the preflight lists them)"
fi
# The repository runs from its root (python3 -m gtpt, benchmarks/*.py): no install needed.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 benchmarks/gpu_session.py "$@"
rc=$?
if [ -n "${OUT:-}" ]; then
  exec >&- 2>&-  # end of input for tee: it writes the rest of run.log and exits
  wait
fi
exit $rc
