"""CPU inference benchmark (not a test): the official GTPT forward against our runtimes, side by side.

Runs :func:`gtpt.runtimes.compare_runtimes` (see that module for the contenders and how they are timed: interleaved
rounds in one process, same weights, same input; median and p20 / p80) over GTPT-T and GTPT-S, B = 1 and 8, fp32,
1 and 2 threads, and writes to ``--out-dir``:

* ``results.md`` - the table (median [p20, p80] ms, speedup over the official forward, the fastest runtime);
* ``results.json`` - every timing, the ratios ``official / runtime`` per configuration, skipped runtimes and why;
* ``environment.txt`` - machine, date, versions, git commit, load average before and after.

The committed run: ``flock /work/measure.lock nice -n -10 python benchmarks/bench_cpu_inference.py --out-dir
benchmarks/results/cpu/2026-12-01``. ``--repeats 1 --warmup 1 --variants gtpt-t --batch-sizes 1 --threads 1``
is the smoke test the test suite runs.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from gtpt.runtimes import RUNTIMES, compare_runtimes, runtimes_markdown  # noqa: E402


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(load_before) -> str:
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("onnxruntime", "onnx", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = "not installed"
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
    lines = [f"date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
             f"machine: {platform.node()} {platform.machine()}, {_cpu_name()}, {os.cpu_count()} logical CPUs",
             f"platform: {platform.platform()}",
             "versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
             f"git commit: {_git_commit()}",
             f"command: {' '.join(sys.argv)}",
             f"load average (1/5/15 min) before: {load_before}, after: {load_after}"]
    return "\n".join(lines) + "\n"


def ratios(result) -> dict:
    """``{"variant B=.. threads=..": {runtime: official median / runtime median}}`` and the winner per config."""
    out = {}
    for c in result["configs"]:
        r = {name: round(v["speedup_vs_official"], 3) for name, v in c["runtimes"].items()
             if "speedup_vs_official" in v and name != "official"}
        fastest = min(c["runtimes"].items(), key=lambda kv: kv[1]["median_ms"])[0]
        out[f"{c['variant']} B={c['batch_size']} threads={c['threads']}"] = {"speedup_vs_official": r,
                                                                            "fastest": fastest}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["gtpt-t", "gtpt-s"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compiled-threads", nargs="+", type=int, default=None,
                   help="thread counts at which compile and pt2 run (default: all of --threads); each is a "
                        "separate minutes-long compile per variant and batch size (compile) or variant (pt2)")
    p.add_argument("--freezing", action="store_true",
                   help="torch.compile with Inductor freezing (weights as constants, prepacked convolutions)")
    p.add_argument("--out-dir", default="benchmarks/results/cpu/latest")
    args = p.parse_args(argv)
    if min(args.batch_sizes) < 1 or min(args.threads) < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--batch-sizes, --threads and --repeats must be >= 1, --warmup >= 0")
    if args.compiled_threads is not None and not set(args.compiled_threads) <= set(args.threads):
        p.error("--compiled-threads must be a subset of --threads")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        print(f"error: --out-dir {args.out_dir!r}: {e.strerror or e}", file=sys.stderr)
        return 2
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    workdir = os.path.join(args.out_dir, "_exports")
    os.makedirs(workdir, exist_ok=True)
    result = compare_runtimes(args.variants, args.batch_sizes, args.threads, args.runtimes, repeats=args.repeats,
                              warmup=args.warmup, workdir=workdir, compiled_threads=args.compiled_threads,
                              compile_configs={"freezing": True} if args.freezing else None)
    env = environment(load_before)
    md = runtimes_markdown(result)
    with open(os.path.join(args.out_dir, "environment.txt"), "w") as f:
        f.write(env)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write("# CPU inference: the official forward vs our runtimes\n\n" + env.replace("\n", "  \n") + "\n" + md + "\n")
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({"environment": env, "ratios": ratios(result), **result}, f, indent=1)
    shutil.rmtree(workdir, ignore_errors=True)  # exported models are not results
    print(env)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
