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
import time

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


def sgemm_gflops(threads: int, size: int = 1024, seconds: float = 1.0) -> float:
    """This machine's fp32 matrix-product rate at ``threads`` threads (GFLOP/s): the best of three ~1 s runs of a
    ``size``-cube ``torch.mm`` (MKL / oneDNN, the library every fp32 runtime here ends up in)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        torch.mm(a, b)
        best = 0.0
        for _ in range(3):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / 3:
                torch.mm(a, b)
                n += 1
            best = max(best, 2 * size ** 3 * n / (time.perf_counter() - t0) / 1e9)
        return best
    finally:
        torch.set_num_threads(old)


def compute_floor(result, threads) -> dict:
    """Per configuration: the forward's fp32 work (every multiply-accumulate, fvcore's count incl. attention and
    pruning scores, ``gtpt flops --convention full``) at this machine's measured matrix-product rate. No fp32
    runtime can beat that time, so ``official / floor`` bounds the speedup any of them can show. An estimate: it
    prices depthwise convolutions, softmax and copies at GEMM speed (they are slower), so the bound is generous."""
    from gtpt.flops import count_flops

    rate = {t: sgemm_gflops(t) for t in threads}
    macs = {}
    out = {}
    for c in result["configs"]:
        v, b, t = c["variant"], c["batch_size"], c["threads"]
        if v not in macs:
            macs[v] = count_flops(v, "full").total
        floor_ms = 2 * macs[v] * b / (rate[t] * 1e9) * 1e3
        off = c["runtimes"].get("official", {}).get("median_ms")
        out[f"{v} B={b} threads={t}"] = {"gmacs": round(macs[v] * b / 1e9, 3), "sgemm_gflops": round(rate[t], 1),
                                         "floor_ms": round(floor_ms, 1),
                                         "official_over_floor": round(off / floor_ms, 3) if off else None}
    return out


def floor_markdown(floor: dict) -> str:
    lines = ["", "fp32 compute floor (an estimate: every multiply-accumulate at the measured `torch.mm` rate; no fp32 "
             "runtime can be faster, so **official / floor** bounds any runtime's speedup):", "",
             "| configuration | GMAC | sgemm GFLOP/s | floor ms | official / floor |", "|---|---|---|---|---|"]
    for k, v in floor.items():
        ratio = f"{v['official_over_floor']:.2f}x" if v["official_over_floor"] else "-"
        lines.append(f"| {k} | {v['gmacs']} | {v['sgemm_gflops']} | {v['floor_ms']} | {ratio} |")
    return "\n".join(lines)


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
    floor = compute_floor(result, args.threads)
    env = environment(load_before)
    md = runtimes_markdown(result) + "\n" + floor_markdown(floor)
    with open(os.path.join(args.out_dir, "environment.txt"), "w") as f:
        f.write(env)
    with open(os.path.join(args.out_dir, "results.md"), "w") as f:
        f.write("# CPU inference: the official forward vs our runtimes\n\n" + env.replace("\n", "  \n") + "\n" + md + "\n")
    with open(os.path.join(args.out_dir, "results.json"), "w") as f:
        json.dump({"environment": env, "ratios": ratios(result), "compute_floor": floor, **result}, f, indent=1)
    shutil.rmtree(workdir, ignore_errors=True)  # exported models are not results
    print(env)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
