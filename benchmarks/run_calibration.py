#!/usr/bin/env python
"""Calibration of the static cost report: each kernel config's estimate beside its measured GPU time (issue 12,
item 3). ``python benchmarks/run_calibration.py --out-dir DIR [--static-json FILE] [--budget-s S]``.

The static estimates come from ``static_cost.json`` written by ``benchmarks/static_cost.py`` (records with ``op``
("mhga" / "prune"), ``kernel``, ``shape``, ``variant``, ``batch``, ``dtype``, ``estimate_us``, ``floor_us_h100``,
``ratio``, ...): taken from ``--static-json``, else ``.whl/static_cost.json`` (carried with the call;
``fetch_gpu_wheels.sh`` copies the newest committed report there), else made here by running ``benchmarks/static_cost.py --out DIR/static`` (compiled by this machine's Triton, i.e. the same
compiler as the measured kernels) in at most half the budget. Without any of them the stage writes that it was
skipped and exits 0.

Measurement: for each (op, shape, batch, dtype) of the records, the fused op (MHGA forward + backward, or the
pruning kernel) runs under ``torch.profiler`` and every Triton kernel's device time is read by kernel name, the
median over the iterations: once with the inputs L2-warm (back to back) and once with L2 flushed before every
iteration (a 256 MB buffer zeroed). A record is matched to the measured kernel by name (``kernel``), else by role
(forward / dq / dk-dv / prune). MHGA shapes come from the record's launch geometry (``problem``: G, N, S;
``constexprs``: PAD_TOKEN, HEAD_DIM), else by name from ``run_group_attention.SHAPES``; pruning sites by name from
``run_token_prune.SITES``; a record without a benchmark counterpart is listed as not measured. Writes
``calibration.json`` and ``calibration.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

# static-report shape names -> benchmark cases (lower case, '-' and ' ' as '_')
MHGA_SHAPES = {"fine": "coco_fine", "coco_fine": "coco_fine", "fine_early": "coco_fine",
               "late_fine": "coco_fine_late", "fine_late": "coco_fine_late", "coco_fine_late": "coco_fine_late",
               "teacher": "teacher", "wholebody": "wholebody_fine", "wholebody_fine": "wholebody_fine",
               "coarse": "coarse"}
PRUNE_SITES = {"fine_l3": "fine_L3", "fine_entry": "fine_entry", "coarse_l3": "coarse_L3",
               "fine_l3_wholebody": "fine_L3_wholebody", "wholebody_fine_l3": "fine_L3_wholebody"}
DTYPE_NAMES = {"bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16", "fp32": "fp32", "float32": "fp32",
               "torch.float32": "fp32", "fp16": "fp16", "float16": "fp16", "torch.float16": "fp16"}


def _norm(x) -> str:
    return re.sub(r"[\s\-]+", "_", str(x).strip().lower())


def bench_case(rec: dict):
    """(benchmark case, why not) for a static record: an MHGA record with its launch geometry (``problem``: G, N,
    S; ``constexprs``: PAD_TOKEN, HEAD_DIM) gives ("mhga_shape", G, N, S, pad, heads, dim); otherwise the case is
    found by shape name (a ``run_group_attention.SHAPES`` / ``run_token_prune.SITES`` key)."""
    op, shape, variant = _norm(rec.get("op", "")), _norm(rec.get("shape", "")), _norm(rec.get("variant", ""))
    prob, consts = rec.get("problem") or {}, rec.get("constexprs") or {}
    if op == "mhga" and all(isinstance(prob.get(k), int) for k in ("G", "N", "S")):
        heads = 8  # every GTPT variant (gtpt/config.py)
        dim = heads * int(consts.get("HEAD_DIM", 24))
        return ("mhga_shape", prob["G"], prob["N"], prob["S"], bool(consts.get("PAD_TOKEN", False)), heads, dim), ""
    if op == "mhga":
        if "wholebody" in variant and shape == "fine":
            return "wholebody_fine", ""
        if "wholebody" in variant and shape not in ("coarse", "wholebody", "wholebody_fine"):
            return None, f"no benchmark shape for {rec.get('variant')} {rec.get('shape')}"
        name = MHGA_SHAPES.get(shape)
    elif op == "prune":
        name = "fine_L3_wholebody" if "wholebody" in variant and shape == "fine_l3" else PRUNE_SITES.get(shape)
        if name is None:
            return None, f"no benchmark site for {rec.get('variant')} {rec.get('shape')}"
        # the benchmark site must be the launch the record describes (WholeBody keeps other counts, for one)
        import run_token_prune as tp
        site = tp.SITES[name]
        want = {"N": site.N, "K": site.keep, "G": site.G}
        got = {k: prob[k] for k in want if isinstance(prob.get(k), int)}
        if any(got[k] != want[k] for k in got):
            return None, f"benchmark site {name} is {want}, the record's launch {got}"
    else:
        return None, f"unknown op {rec.get('op')!r}"
    return (name, "") if name else (None, f"no benchmark case for shape {rec.get('shape')!r}")


def kernel_role(name: str) -> Optional[str]:
    n = _norm(name)
    if "dkdv" in n or "dk_dv" in n or re.search(r"(^|_)dk($|_)", n):
        return "dkdv"
    if re.search(r"(^|_)dq($|_)", n) or "bwd_dq" in n:
        return "dq"
    if "prune" in n or "pool" in n:
        return "prune"
    if "fwd" in n or "forward" in n:
        return "fwd"
    return None


def match_kernel(kernel: str, measured: Dict[str, dict]) -> Optional[str]:
    """The measured kernel name a record's ``kernel`` refers to: by name (one contains the other, ignoring case,
    underscores and a ``kernel`` suffix), else the single measured kernel of the same role."""
    strip = lambda s: re.sub(r"(^_+|_?kernel$)", "", _norm(s)).replace("_", "")  # noqa: E731
    k = strip(kernel)
    by_name = [m for m in measured if k and (k in strip(m) or strip(m) in k)]
    if len(by_name) == 1:
        return by_name[0]
    role = kernel_role(kernel)
    same = [m for m in (by_name or measured) if role and kernel_role(m) == role]
    return same[0] if len(same) == 1 else None


def load_records(path: str) -> List[dict]:
    with open(path) as f:
        data = json.load(f)
    recs = data.get("records", data) if isinstance(data, dict) else data
    if not isinstance(recs, list) or not all(isinstance(r, dict) for r in recs):
        raise ValueError(f"{path}: expected a list of records (or {{'records': [...]}})")
    return recs


def groups_in_order(records: List[dict]) -> List[tuple]:
    """Distinct (op, case, batch, dtype) to measure, bf16 before fp32, larger batches first."""
    keys = []
    for r in records:
        case, _ = bench_case(r)
        dt = DTYPE_NAMES.get(_norm(r.get("dtype", "")))
        if case and dt and isinstance(r.get("batch"), int):
            k = (_norm(r["op"]), case, r["batch"], dt)
            if k not in keys:
                keys.append(k)
    return sorted(keys, key=lambda k: (["bf16", "fp16", "fp32"].index(k[3]), -k[2], k[0] != "mhga", str(k[1])))


# ------------------------------------------------------------------------------------------------------------
# Measurement (CUDA)

def _step(op: str, case: str, B: int, dtype: str):
    if op == "mhga":
        import run_group_attention as ga
        if isinstance(case, tuple):
            _, G, N, S, pad, heads, dim = case
            shape = ga.Shape(f"G{G}_N{N}_S{S}", G, N, S, pad, heads, dim)
        else:
            shape = ga.SHAPES[case]
        qkv, grad = ga.make_inputs(shape, B, ga.DTYPES[dtype], "cuda", requires_grad=True)
        return ga.make_step(ga.make_callable("fused", shape, B, ga.DTYPES[dtype], "cuda"), "fwd+bwd", qkv, grad)
    import run_token_prune as tp
    inputs = tp.make_inputs(tp.SITES[case], B, tp.DTYPES[dtype], "cuda")
    return tp.make_callables(inputs, None, which=("fused",))["fused"]


def measure(op: str, case: str, B: int, dtype: str, iters: int = 20) -> Dict[str, dict]:
    """{kernel name: {"warm_us", "flushed_us", "calls"}} of the Triton kernels one step launches."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    step = _step(op, case, B, dtype)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    flush = torch.empty(256 * 2 ** 20, dtype=torch.uint8, device="cuda")
    out: Dict[str, dict] = {}
    for mode in ("warm", "flushed"):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(iters):
                if mode == "flushed":
                    flush.zero_()
                step()
            torch.cuda.synchronize()
        times: Dict[str, List[float]] = {}
        for e in prof.events():
            if e.device_type != torch.autograd.DeviceType.CUDA:
                continue
            name = e.name
            low = name.lower()
            if "memset" in low or "memcpy" in low or "fill" in low or kernel_role(name) is None:
                continue
            us = float(getattr(e, "self_device_time_total", 0.0) or 0.0) or float(e.time_range.elapsed_us())
            times.setdefault(name, []).append(us)
        for name, ts in times.items():
            out.setdefault(name, {})[f"{mode}_us"] = statistics.median(ts)
            out[name]["calls"] = len(ts) / iters
    del flush
    return out


# ------------------------------------------------------------------------------------------------------------

def obtain_static(args, out_dir: str, budget_s: Optional[float]) -> Tuple[Optional[str], str]:
    """(path of static_cost.json, how it was obtained / why there is none)."""
    if args.static_json:
        return args.static_json, "given with --static-json"
    carried = os.path.join(ROOT, ".whl", "static_cost.json")
    if os.path.exists(carried):
        src = os.path.join(ROOT, ".whl", "static_cost.source")
        origin = open(src).read().strip() if os.path.exists(src) else "?"
        return carried, (f"carried in .whl/static_cost.json (from {origin}, compiled on the machine that ran "
                         "fetch_gpu_wheels.sh, with its Triton)")
    script = os.path.join(HERE, "static_cost.py")
    if not os.path.exists(script):
        return None, "benchmarks/static_cost.py is not in this checkout and no static_cost.json was carried"
    dest = os.path.join(out_dir, "static")
    limit = None if budget_s is None else max(5.0, budget_s / 2)
    t0 = time.time()
    with open(os.path.join(out_dir, "static_cost.log"), "wb") as log:
        workers = str(max(1, min(14, (os.cpu_count() or 2) - 2)))  # its compiles are CPU-bound: 16 cores there
        proc = subprocess.Popen([sys.executable, script, "--out", dest, "--workers", workers], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    path = os.path.join(dest, "static_cost.json")
    if os.path.exists(path):
        return path, f"made here by benchmarks/static_cost.py in {time.time() - t0:.0f} s"
    return None, (f"benchmarks/static_cost.py wrote no static_cost.json (exit {proc.returncode}, "
                  f"{time.time() - t0:.0f} s; see static_cost.log)")


def build_rows(records: List[dict], measured: Dict[tuple, dict], notes: Dict[tuple, str]) -> List[dict]:
    rows = []
    for r in records:
        case, why = bench_case(r)
        dt = DTYPE_NAMES.get(_norm(r.get("dtype", "")))
        key = (_norm(r.get("op", "")), case, r.get("batch"), dt)
        row = {k: r.get(k) for k in ("op", "kernel", "shape", "variant", "batch", "dtype", "estimate_us",
                                     "floor_us_h100", "ratio")}
        row["config"] = r.get("config") or (f"{r.get('op')} {r.get('kernel')} {r.get('shape')} {r.get('variant')} "
                                            f"B={r.get('batch')} {r.get('dtype')}")
        row["measured_us"] = None
        if case is None or dt is None:
            row["note"] = why or f"unknown dtype {r.get('dtype')!r}"
        elif key not in measured:
            row["note"] = notes.get(key, "not measured")
        else:
            name = match_kernel(str(r.get("kernel", "")), measured[key])
            if name is None:
                row["note"] = f"no measured kernel matches {r.get('kernel')!r} (measured: {sorted(measured[key])})"
            else:
                m = measured[key][name]
                row.update(measured_kernel=name, measured_us=m.get("warm_us"), measured_flushed_us=m.get("flushed_us"),
                           bench_case=case if isinstance(case, str) else list(case))
                est, floor = r.get("estimate_us"), r.get("floor_us_h100")
                if est and row["measured_us"]:
                    row["measured_over_estimate"] = row["measured_us"] / est
                if floor and row["measured_us"]:
                    row["measured_over_floor_h100"] = row["measured_us"] / floor
        rows.append(row)
    return rows


def to_markdown(rows: List[dict], env: dict, source: str) -> str:
    f = lambda v, spec=".1f": "-" if v is None else format(v, spec)  # noqa: E731
    L = ["# Static cost estimate vs measured kernel time", "",
         f"Environment: {json.dumps(env)}", f"Static estimates: {source}", "",
         "Measured: median device time per launch from torch.profiler, L2-warm (back to back) and L2-flushed; "
         "estimates and floors are the static report's (estimates from compiled code, H100 floor at 3.35 TB/s). "
         "`meas/est` > 1: slower than estimated.", "",
         "| op | kernel | shape | variant | B | dtype | estimate us | floor us (H100) | measured us (warm) | "
         "measured us (flushed) | meas/est | meas/floor | note |", "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        L.append(f"| {r['op']} | {r['kernel']} | {r['shape']} | {r['variant']} | {r['batch']} | {r['dtype']} | "
                 f"{f(r.get('estimate_us'))} | {f(r.get('floor_us_h100'))} | {f(r.get('measured_us'))} | "
                 f"{f(r.get('measured_flushed_us'))} | {f(r.get('measured_over_estimate'), '.2f')} | "
                 f"{f(r.get('measured_over_floor_h100'), '.2f')} | {r.get('note', '')} |")
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--static-json", default=None, help="static_cost.json to calibrate (default: see above)")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new measurement after this many seconds")
    ap.add_argument("--iters", type=int, default=20, help="profiled iterations per measurement (default 20)")
    ap.add_argument("--list-cases", action="store_true",
                    help="print the measurements the static records call for and exit (no GPU needed; 0 also when "
                         "there is no static report, the stage then skips)")
    args = ap.parse_args(argv)
    if args.static_json and not os.path.isfile(args.static_json):
        print(f"--static-json {args.static_json}: no such file", file=sys.stderr)
        return 2
    if args.list_cases:
        path = args.static_json or next((p for p in (os.path.join(ROOT, ".whl", "static_cost.json"),)
                                         if os.path.exists(p)), None)
        if path is None:
            made = os.path.exists(os.path.join(HERE, "static_cost.py"))
            print("static_cost.json will be made there by benchmarks/static_cost.py" if made else
                  "no static report: the calibration stage will skip")
            return 0
        try:
            keys = groups_in_order(load_records(path))
        except (OSError, ValueError) as e:
            print(f"{path}: {e}", file=sys.stderr)
            return 1
        for k in keys:
            print(" ".join(map(str, k)))
        return 0 if keys else 1
    os.makedirs(args.out_dir, exist_ok=True)
    t0 = time.time()
    from gtpt.profiler import interrupt_on_stop_signals
    result: dict = {"records": []}
    with interrupt_on_stop_signals():
        try:
            path, source = obtain_static(args, args.out_dir, args.budget_s)
        except KeyboardInterrupt:
            path, source = None, "interrupted while making static_cost.json"
        result["static_source"] = source
        if path is None:
            result["skipped"] = source
            print(f"calibration skipped: {source}")
        else:
            try:
                records = load_records(path)
            except (OSError, ValueError) as e:
                print(f"{path}: {e}", file=sys.stderr)
                records, result["skipped"] = [], f"unreadable static_cost.json: {e}"
            import torch
            env = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
            if torch.cuda.is_available():
                env["gpu"] = torch.cuda.get_device_name()
            result["environment"] = env
            measured, notes = {}, {}
            stop = None
            for key in groups_in_order(records):
                if stop is None and args.budget_s is not None and time.time() - t0 > args.budget_s:
                    stop = f"not run: time budget of {args.budget_s:.0f} s spent"
                if stop is None and not torch.cuda.is_available():
                    stop = "not run: no CUDA device"
                if stop is not None:
                    notes[key] = stop
                    continue
                try:
                    measured[key] = measure(*key, iters=args.iters)
                    print(f"  {' '.join(map(str, key))}: " + ", ".join(
                        f"{n} {v.get('warm_us', 0):.1f}/{v.get('flushed_us', 0):.1f} us" for n, v in
                        measured[key].items()), flush=True)
                except KeyboardInterrupt:
                    stop = "not run: interrupted"
                    notes[key] = "interrupted"
                except Exception as e:  # one config failing is reported, not fatal
                    notes[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            result["records"] = build_rows(records, measured, notes)
    env = result.get("environment", {})
    with open(os.path.join(args.out_dir, "calibration.json"), "w") as f:
        json.dump(result, f, indent=1)
    md = (to_markdown(result["records"], env, result["static_source"]) if "skipped" not in result else
          f"# Static cost estimate vs measured kernel time\n\nSkipped: {result['skipped']}\n")
    with open(os.path.join(args.out_dir, "calibration.md"), "w") as f:
        f.write(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
