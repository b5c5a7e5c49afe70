#!/usr/bin/env python
"""Side-by-side timing of the fused pruning kernel (score + top-k + gather + gate) at the GTPT pruning sites
(the three COCO sites and WholeBody's fine layer 3, which the fused op prunes in one launch).

Implementations (same inputs, same dtype; q / k are strided views of packed ``to_qkv`` outputs as in the model):

* ``fused``    - :func:`gtpt_kernels.token_prune` with ``backend="triton"`` (one launch).
* ``eager``    - the official code's sequence (``Transformer.softmax_pool`` + the prune blocks): logits einsum,
  scale, masked dummy row (``-finfo.max``), softmax pooling over heads x rows, ``topk``, the index repeated to
  ``(B, G, K, C)``, ``torch.gather`` of x and pos; at the fine entry the channel mask's Sigmoid and the gate
  multiply run over all N tokens and their PE before the gather, as the official code does (the fused op takes
  the mask logits and applies both to the kept rows only).
* ``compiled`` - ``torch.compile`` of ``eager`` (mode from ``--compile-mode``).

Prints a table of microseconds per call, the fused kernel's speed-up over each baseline and the number of GPU
kernel launches per call (``torch.profiler``), and writes ``token_prune.json`` / ``token_prune.md`` under
``--out-dir``. Needs a CUDA GPU; ``--cpu-smoke`` runs one tiny case on CPU (fused only under
``TRITON_INTERPRET=1``) to check the pipeline and output files. ``bench_token_prune.py`` (pytest-benchmark)
imports the cases and callables from here, so both measure the same code.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
if __name__ == "__main__" and "--cpu-smoke" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first triton import

from gtpt.profiler import interrupt_on_stop_signals  # noqa: E402
from gtpt_kernels import token_prune  # noqa: E402
from gtpt_kernels.reference import split_qkv  # noqa: E402

SCALE = 192 ** -0.5  # GTPT-S/B: dim ** -0.5


@dataclass(frozen=True)
class Site:
    name: str
    G: int
    R: int           # query rows per group (incl. the padded dummy row at the fine sites)
    N: int           # candidate visual tokens
    keep: int
    k_groups: int    # 1: the keys (and tokens / pos) are shared by the groups (broadcast)
    dummy_row: bool  # row 0 of group 0 is GTPT's padded dummy row (excluded)
    gate: bool       # channel gate (fine entry)
    H: int = 8
    D: int = 24
    C: int = 192
    # WholeBody fine L3: per group (leading rows = 6 sparse + its dense tokens, keep); the fused op prunes the three
    # groups in one launch (rows padded to the longest lead, columns from the shortest, both masked).
    wholebody: Optional[tuple] = None


SITES = {
    "coarse_L3": Site("coarse_L3", G=1, R=1, N=256, keep=179, k_groups=1, dummy_row=False, gate=False),
    "fine_entry": Site("fine_entry", G=3, R=6, N=179, keep=76, k_groups=1, dummy_row=True, gate=True),
    "fine_L3": Site("fine_L3", G=3, R=6, N=76, keep=25, k_groups=3, dummy_row=True, gate=False),
    # GTPT-S WholeBody: 6 + 128 tokens per group at fine L3; leads 74 / 48 / 12, keeps 8 / 34 / 70.
    "fine_L3_wholebody": Site("fine_L3_wholebody", G=3, R=74, N=122, keep=70, k_groups=3, dummy_row=True,
                              gate=False, wholebody=((74, 8), (48, 34), (12, 70))),
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(site: Site, B: int, dtype: torch.dtype, device: str, seed: int = 0) -> dict:
    """Model-like inputs: q / k strided views into packed ``(B, G, tokens, 3C)`` qkv buffers (q the site's
    query rows, k its visual rows), tokens / pos ``(B, G or 1, N, C)``, gate ``(B, G, N, C)``."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    H, D, C = site.H, site.D, site.C

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)

    qkv_q = rnd(B, site.G, site.R, 3 * H * D)
    qkv_k = rnd(B, site.k_groups, site.N, 3 * H * D)
    q = split_qkv(qkv_q, H)[0]
    k = split_qkv(qkv_k, H)[1]
    tokens = rnd(B, site.k_groups, site.N, C)
    pos = rnd(B, site.k_groups, site.N, C)
    gate = rnd(B, site.G, site.N, C) if site.gate else None  # channel-mask logits (the sigmoid is part of the op)
    row_mask = col_mask = None
    if site.dummy_row:
        row_mask = torch.ones(site.G, site.R, dtype=torch.bool, device=device)
        row_mask[0, 0] = False
    if site.wholebody:
        # Model layout: (B, 3, 6 + 128, C) sequences; q = the first 74 rows, candidates = tokens 12.. of each group.
        leads = [lead for lead, _ in site.wholebody]
        first = min(leads)
        qkv = rnd(B, site.G, first + site.N, 3 * H * D)
        q, k, _ = split_qkv(qkv, H)
        q, k = q[:, :, :, :site.R], k[:, :, :, first:]
        tokens = rnd(B, site.G, first + site.N, C)[:, :, first:]
        pos = rnd(B, site.G, first - 6 + site.N, C)[:, :, first - 6:]
        row_mask = torch.zeros(site.G, site.R, dtype=torch.bool, device=device)
        col_mask = torch.zeros(site.G, site.N, dtype=torch.bool, device=device)
        for g, lead in enumerate(leads):
            row_mask[g, :lead] = True
            col_mask[g, lead - first:] = True
        row_mask[0, 0] = False
    return dict(q=q, k=k, tokens=tokens, pos=pos, gate=gate, row_mask=row_mask, col_mask=col_mask, keep=site.keep,
                scale=SCALE, wholebody=site.wholebody)


def official_eager(q, k, tokens, pos, keep, scale, row_mask=None, gate=None):
    """The official GTPT sequence for one pruning site (what the fused kernel replaces). ``gate``: the channel
    mask's logits; the official mask MLP ends in a Sigmoid over all N tokens, which the fused op takes over (for
    the kept rows only), so it is part of this sequence."""
    B, G, H, R, D = q.shape
    N, C = k.shape[3], tokens.shape[3]
    dots = torch.einsum("bghrd,bghnd->bghrn", q, k.expand(B, G, H, N, D)) * scale
    if row_mask is not None:  # the official dummy row is filled with -finfo.max (weight 0 after softmax)
        dots = dots.masked_fill(~row_mask.view(1, G, 1, R, 1), -torch.finfo(dots.dtype).max)
    a = dots.reshape(B, G, H * R, N)
    score = (a.softmax(dim=2) * a).sum(dim=2)
    index = score.topk(keep, dim=-1).indices
    if gate is not None:  # official order: the channel mask gates all N tokens and their PE, then the gather
        gate = torch.sigmoid(gate)
        tokens = tokens * gate
        pos = pos * gate
    idx = index.unsqueeze(-1).repeat(1, 1, 1, C)
    out = torch.gather(tokens.expand(B, G, N, C), 2, idx)
    out_pos = torch.gather(pos.expand(B, G, N, C), 2, idx)
    return out, out_pos, index


def official_eager_wholebody(q, k, tokens, pos, scale, groups):
    """The official WholeBody fine-L3 prune: per group, its leading rows (sparse + dense; the head group's dummy
    row at -finfo.max) rank its own visual tokens, topk(keep_g), gather. ``groups``: ((lead, keep), ...); q, k,
    tokens, pos in the fused layout (candidate columns from the shortest lead on)."""
    first = min(lead for lead, _ in groups)
    outs, poss, idxs = [], [], []
    for g, (lead, keep) in enumerate(groups):
        off = lead - first
        mask = torch.ones(1, lead, dtype=torch.bool, device=q.device)
        mask[0, 0] = g != 0
        out, out_pos, index = official_eager(q[:, g:g + 1, :, :lead], k[:, g:g + 1, :, off:],
                                             tokens[:, g:g + 1, off:], pos[:, g:g + 1, off:], keep, scale,
                                             row_mask=mask)
        outs.append(out)
        poss.append(out_pos)
        idxs.append(index + off)
    return outs, poss, idxs


def fused(q, k, tokens, pos, keep, scale, row_mask=None, gate=None, col_mask=None):
    return token_prune(q, k, tokens, pos, keep, scale, row_mask=row_mask, gate=gate, backend="triton",
                       col_mask=col_mask, gate_logits=gate is not None)


def make_callables(inputs: dict, compile_mode: Optional[str] = "default",
                   which=("fused", "eager", "compiled")) -> Dict[str, Callable[[], object]]:
    args = (inputs["q"], inputs["k"], inputs["tokens"], inputs["pos"], inputs["keep"], inputs["scale"])
    kw = dict(row_mask=inputs["row_mask"], gate=inputs["gate"])
    wb = inputs.get("wholebody")
    eager = official_eager
    eager_args, eager_kw = args, kw
    if wb:
        eager = official_eager_wholebody
        eager_args, eager_kw = args[:4] + (inputs["scale"], wb), {}
    fns: Dict[str, Callable[[], object]] = {}
    if "fused" in which:
        fns["fused"] = lambda: fused(*args, col_mask=inputs.get("col_mask"), **kw)
    if "eager" in which:
        fns["eager"] = lambda: eager(*eager_args, **eager_kw)
    if "compiled" in which and compile_mode is not None:
        mode = None if compile_mode == "default" else compile_mode
        # A fresh Dynamo cache per case: the cache is per code object (official_eager) and past its recompile
        # limit (8) a sweep's later cases would silently run eager.
        torch._dynamo.reset()
        comp = torch.compile(eager, mode=mode, dynamic=False)
        fns["compiled"] = lambda: comp(*eager_args, **eager_kw)
    return fns


def kept_sets_agree(inputs: dict, fused_index, eager_index) -> float:
    """Fraction of kept indices the fused op and the official sequence agree on (as sets per (b, g))."""
    wb = inputs.get("wholebody")
    if not wb:
        return float((fused_index.sort(-1).values == eager_index.sort(-1).values).float().mean())
    agree = [(fused_index[:, g, :keep].sort(-1).values == eager_index[g][:, 0].sort(-1).values).float().mean()
             for g, (_, keep) in enumerate(wb)]
    return float(sum(agree) / len(agree))


def synchronized(fn: Callable[[], object], device: str) -> Callable[[], object]:
    """The callable for wall-clock timers (pytest-benchmark): waits for the GPU so they measure the work, not the
    enqueue. CUDA-event timing (:func:`time_us`) needs no such wait."""
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out
    return run


def time_us(fn: Callable[[], object], device: str, warmup: int = 10, rep: int = 100) -> Dict[str, float]:
    """Median / p20 / p80 microseconds per call. On CUDA: CUDA events around each call after warm-up (L2 is not
    flushed: the pruning site reads tensors the preceding layer just wrote, so warm L2 is the realistic case)."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(rep):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
    else:
        for _ in range(rep):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
    times.sort()
    return {"median_us": statistics.median(times), "p20_us": times[int(0.2 * (len(times) - 1))],
            "p80_us": times[int(0.8 * (len(times) - 1))]}


def time_flushed_us(fn: Callable[[], object]) -> Optional[float]:
    """Median microseconds per call with L2 flushed before every call (``triton.testing.do_bench``): the site's
    inputs cold, as a microbenchmark usually sees them; :func:`time_us` keeps them warm, as in the model. CUDA only;
    None if the timing fails."""
    try:
        import triton.testing
        return 1e3 * triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")
    except Exception:
        torch.cuda.synchronize()
        return None


def time_graph_us(fn: Callable[[], object], calls: int = 20, rep: int = 50) -> Optional[float]:
    """Median microseconds per call of ``fn`` replayed from a CUDA graph of ``calls`` back-to-back calls: the
    device time without the host's per-call launch overhead (Python, dispatcher, Triton launcher), which
    :func:`time_us` includes and which can exceed a microsecond-scale kernel. This is the cost of the site inside
    a model run under CUDA graphs (``gtpt profile --backends cudagraph``). None if ``fn`` cannot be captured."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(rep):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / calls)
        del graph
        return statistics.median(times)
    except Exception:  # e.g. an implementation that synchronises; reported as "-"
        torch.cuda.synchronize()
        return None


def count_launches(fn: Callable[[], object], device: str) -> Optional[int]:
    """GPU kernels launched by one call (torch.profiler); None when not on CUDA or the profiler fails."""
    if device != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile
        fn()
        torch.cuda.synchronize()
        # CPU activity too: with CUDA alone some kineto versions drop kernel events (seen in tritonbench)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and "memcpy" not in e.name.lower() and "memset" not in e.name.lower())
    except Exception:  # pragma: no cover - profiler unavailable (e.g. CUPTI missing)
        return None


def environment(device: str) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": device}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # pragma: no cover
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    info["interpreter"] = os.environ.get("TRITON_INTERPRET", "0")
    return info


# The sites the targets are judged on first (fine L3 has the <= 15 us target), so a time-boxed run measures them
# before the others.
SITE_PRIORITY = ("fine_L3", "fine_entry", "coarse_L3", "fine_L3_wholebody")


def case_plan(sites: List[str], batches: List[int], dtypes: List[str], compiled: bool) -> List[tuple]:
    """The order cases run in: ``[(site, B, dtype, impls), ...]``. Two passes: fused and eager over every case,
    then ``torch.compile`` of the eager sequence (tens of seconds of compilation per case). Within a pass: dtypes
    in the order given, larger batches first, sites by ``SITE_PRIORITY``."""
    def priority(case):
        name, B, dt = case
        rank = SITE_PRIORITY.index(name) if name in SITE_PRIORITY else len(SITE_PRIORITY)
        return dtypes.index(dt), -B, rank
    cases = sorted(((n, B, dt) for n in sites for B in batches for dt in dtypes), key=priority)
    passes = [("fused", "eager")] + ([("compiled",)] if compiled else [])
    return [case + (p,) for p in passes for case in cases]


def run(sites: List[str], batches: List[int], dtypes: List[str], device: str, compile_mode: Optional[str],
        warmup: int, rep: int, budget_s: Optional[float] = None) -> List[dict]:
    """Every (site, B, dtype) case, in :func:`case_plan` order. A case that fails is reported with its error, not
    fatal; with ``budget_s``, cases that would start after that many seconds are listed as not run, and a
    KeyboardInterrupt (a timeout's SIGTERM or SIGINT) lists the rest as interrupted."""
    rows = {(n, B, dt): {"site": n, "B": B, "dtype": dt} for n in sites for B in batches for dt in dtypes}
    t_start = time.perf_counter()
    stop_reason = None
    for name, B, dt, impls in case_plan(sites, batches, dtypes, compile_mode is not None):
        row = rows[(name, B, dt)]
        if stop_reason is None and budget_s is not None and time.perf_counter() - t_start > budget_s:
            stop_reason = f"not run: time budget of {budget_s:.0f} s spent"
        if "error" in row:  # failed or not run in the first pass: that error stands
            continue
        if stop_reason is not None:
            row["error"] = stop_reason if "compiled" not in impls else f"compiled baseline {stop_reason}"
            continue
        site = SITES[name]
        try:
            inputs = make_inputs(site, B, DTYPES[dt], device)
            row["shapes"] = {"q": list(inputs["q"].shape), "k": list(inputs["k"].shape),
                             "tokens": list(inputs["tokens"].shape), "keep": site.keep}
            fns = make_callables(inputs, compile_mode, which=impls)
            if "fused" in fns:
                # Same selection as the official topk (the kernel breaks ties by index; random inputs have none).
                row["index_agreement"] = kept_sets_agree(inputs, fns["fused"]()[2], fns["eager"]()[2])
            for impl, fn in fns.items():
                # No sync inside the timed call: the events bracket it on the stream, so the figure is the call's
                # span on the GPU, host launch delay included, without the host's wake-up from a sync.
                row[impl] = time_us(fn, device, warmup, rep) if device == "cuda" else time_us(fn, device, 1, 3)
                row[impl]["launches"] = count_launches(fn, device)
                row[impl]["graph_us"] = time_graph_us(fn) if device == "cuda" else None
                row[impl]["flushed_us"] = time_flushed_us(fn) if device == "cuda" else None
            for base in ("eager", "compiled"):
                if base in row and "fused" in row:
                    row[f"speedup_vs_{base}"] = row[base]["median_us"] / row["fused"]["median_us"]
                    if row[base].get("graph_us") and row["fused"].get("graph_us"):
                        row[f"graph_speedup_vs_{base}"] = row[base]["graph_us"] / row["fused"]["graph_us"]
        except KeyboardInterrupt:
            stop_reason = "not run: interrupted"
            row["error"] = "interrupted"
        except Exception as exc:  # reported in the table, the sweep goes on
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        print(format_row(row), flush=True)
    return list(rows.values())  # in the order the sites / batches / dtypes were given


HEADER = ("Per call: one call timed alone (host launch overhead included; inputs L2-warm, as in the model). Graph: "
          "per call inside a CUDA graph of back-to-back calls (device time). Flushed: L2 flushed before every call "
          "(do_bench; inputs cold).\n\n"
          "| site | B | dtype | fused us | eager us | compiled us | x eager | x compiled | fused graph us | "
          "eager graph us | compiled graph us | x eager (graph) | x compiled (graph) | launches f/e/c | index agree |"
          " fused flushed us | eager flushed us |"
          "\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def _fmt(row: dict, impl: str, key: str, spec: str = ".1f") -> str:
    v = row.get(impl, {}).get(key) if impl in row else None
    return "-" if v is None else format(v, spec)


def format_row(row: dict) -> str:
    sv = lambda k, spec=".2f": "-" if k not in row else format(row[k], spec)  # noqa: E731
    launches = "/".join(_fmt(row, i, "launches", "d") for i in ("fused", "eager", "compiled"))
    return (f"| {row['site']} | {row['B']} | {row['dtype']} | {_fmt(row, 'fused', 'median_us')} | "
            f"{_fmt(row, 'eager', 'median_us')} | {_fmt(row, 'compiled', 'median_us')} | "
            f"{sv('speedup_vs_eager')} | {sv('speedup_vs_compiled')} | {_fmt(row, 'fused', 'graph_us')} | "
            f"{_fmt(row, 'eager', 'graph_us')} | {_fmt(row, 'compiled', 'graph_us')} | "
            f"{sv('graph_speedup_vs_eager')} | {sv('graph_speedup_vs_compiled')} | {launches} | "
            f"{sv('index_agreement', '.3f')} | {_fmt(row, 'fused', 'flushed_us')} | {_fmt(row, 'eager', 'flushed_us')} |"
            + (f" {row['error']}" if "error" in row else ""))


def check_targets(rows: List[dict]) -> List[dict]:
    """Issue 4's targets on an H100 against every measured case they apply to: one launch per site, >= 3x the
    eager sequence, <= 15 us at B = 128 for the fine-L3 site (COCO's; WholeBody's is listed beside it)."""
    fused = [r for r in rows if "fused" in r]
    checks = [("one kernel launch per site", fused, lambda r: r["fused"].get("launches"), lambda v: v == 1),
              (">= 3x the eager sequence (per call)", [r for r in fused if "speedup_vs_eager" in r],
               lambda r: r["speedup_vs_eager"], lambda v: v >= 3.0),
              (">= 3x the eager sequence (CUDA graph)", [r for r in fused if "graph_speedup_vs_eager" in r],
               lambda r: r["graph_speedup_vs_eager"], lambda v: v >= 3.0)]
    for site in ("fine_L3", "fine_L3_wholebody"):
        at_128 = [r for r in fused if r["site"] == site and r["B"] == 128]
        checks.append((f"<= 15 us at B = 128 ({site}, per call)", at_128, lambda r: r["fused"]["median_us"],
                       lambda v: v <= 15.0))
        checks.append((f"<= 15 us at B = 128 ({site}, CUDA graph)", at_128, lambda r: r["fused"].get("graph_us"),
                       lambda v: v <= 15.0))
    out = []
    for what, cases, value, ok in checks:
        cases = [r for r in cases if value(r) is not None]
        res = {"target": what, "measured": len(cases), "met": sum(bool(ok(value(r))) for r in cases)}
        failing = [r for r in cases if not ok(value(r))]
        if failing:
            res["failing"] = [f"{r['site']} B={r['B']} {r['dtype']}: {value(r):g}" for r in failing]
        out.append(res)
    return out


def targets_markdown(targets: List[dict]) -> str:
    lines = ["## Issue 4 targets (H100)", "", "| target | cases meeting it | cases missing it |", "|---|---|---|"]
    for t in targets:
        lines.append(f"| {t['target']} | {t['met']} / {t['measured']} | {'; '.join(t.get('failing', [])) or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sites", nargs="+", default=list(SITES), choices=list(SITES))
    ap.add_argument("--batch", nargs="+", type=int, default=[32, 128])
    ap.add_argument("--dtype", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode for the 'compiled' baseline (default, max-autotune-no-cudagraphs, "
                         "reduce-overhead, ...) or 'none' to skip it")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--rep", type=int, default=200)
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new case after this many seconds (the rest are reported as not run)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny CPU run to check the pipeline (no timings)")
    ap.add_argument("--list-cases", action="store_true",
                    help="print the cases in the order they would run and exit (1 if there are none); no GPU needed")
    args = ap.parse_args(argv)

    compile_mode = None if args.compile_mode == "none" else args.compile_mode
    if args.list_cases:
        plan = case_plan(args.sites, args.batch, args.dtype, compile_mode is not None)
        for name, B, dt, impls in plan:
            print(f"{name} B={B} {dt}: {' '.join(impls)}")
        return 0 if plan else 1
    if args.cpu_smoke:
        device, batches, dtypes, compile_mode = "cpu", [1], ["fp32"], None
        sites = ["fine_L3"]
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to time (use --cpu-smoke to check the pipeline)", file=sys.stderr)
        return 2
    else:
        device, batches, dtypes, sites = "cuda", args.batch, args.dtype, args.sites

    print(HEADER)
    with interrupt_on_stop_signals():  # a timeout's SIGTERM / SIGINT ends the sweep; the tables are still written
        rows = run(sites, batches, dtypes, device, compile_mode, args.warmup, args.rep, args.budget_s)
    os.makedirs(args.out_dir, exist_ok=True)
    result = {"env": environment(device), "compile_mode": compile_mode, "warmup": args.warmup, "rep": args.rep,
              "targets": check_targets(rows), "rows": rows}
    with open(os.path.join(args.out_dir, "token_prune.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(args.out_dir, "token_prune.md"), "w") as f:
        f.write(f"# token_prune timings\n\n`{json.dumps(result['env'])}`, compile mode `{compile_mode}`\n\n")
        f.write(HEADER + "\n" + "\n".join(format_row(r) for r in rows) + "\n\n")
        f.write(targets_markdown(result["targets"]))
    print("\n" + targets_markdown(result["targets"]))
    print(f"wrote {args.out_dir}/token_prune.json and token_prune.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
