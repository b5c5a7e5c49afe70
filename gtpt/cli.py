"""The ``gtpt`` command line: ``summary``, ``flops``, ``profile``, ``env``, ``train``, ``synth``, ``eval``, ``infer``.

``gtpt profile`` is the one-command report: parameters and FLOPs next to the paper's numbers, the FLOP saving of
the pruned path, and latency by backend (pruned and unpruned path in the same run), written to ``reports/`` as
JSON, markdown and a PNG chart. Its defaults finish in a few minutes on a 2-core CPU; GPU sweeps are flags.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

from .cli_options import (EVAL_DESCRIPTION, INFER_DESCRIPTION, PROFILE_BACKENDS, PROFILE_DTYPES,
                          PROFILE_MODES, add_eval_arguments, add_export_arguments, add_infer_arguments, nonneg_int,
                          positive_int)
from .config import get_config, list_variants
from .errors import DEBUG_ENV, exit_code, one_line

# Published numbers, shown next to what this package measures (never used as results):
# the paper's table (GFLOPs = thop MACs, params in millions; the WholeBody rows give no params) and the exact
# MACs thop reports on the official code (shared/reference/gtpt-reference.md, section 1).
PAPER_TABLE: Dict[str, Dict[str, Optional[float]]] = {
    "gtpt-t": {"gflops": 0.7, "mparams": 2.4}, "gtpt-s": {"gflops": 1.6, "mparams": 5.4},
    "gtpt-b": {"gflops": 3.6, "mparams": 8.3}, "gtpt-t-wholebody": {"gflops": 0.8, "mparams": None},
    "gtpt-s-wholebody": {"gflops": 2.0, "mparams": None}, "gtpt-b-wholebody": {"gflops": 4.0, "mparams": None},
}
OFFICIAL_THOP_MACS = {
    "gtpt-t": 663_179_264, "gtpt-s": 1_625_954_304, "gtpt-b": 3_646_568_448,
    "gtpt-t-wholebody": 831_771_648, "gtpt-s-wholebody": 1_994_497_536, "gtpt-b-wholebody": 4_015_111_680,
}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit code 2), pointing at ``--help`` instead of dumping the usage."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _variants(names: Optional[Sequence[str]], default: Sequence[str]) -> List[str]:
    """Resolve variant arguments (``all`` = every variant); unknown names raise ValueError with the valid ones."""
    if not names:
        return list(default)
    known = [get_config(n).name for n in names if n.lower() != "all"]  # unknown names raise, with or without 'all'
    if len(known) < len(names):
        return list(list_variants())
    return list(dict.fromkeys(known))  # each variant once (gtpt-t and gtpt_t are one)


# ----------------------------------------------------------------------------------------------------------------
# summary

def _cmd_summary(args) -> int:
    from .summary import summary

    for i, name in enumerate(_variants(args.variants, list_variants())):
        if i:
            print()
        print(summary(name))
    return 0


# ----------------------------------------------------------------------------------------------------------------
# flops

def _g(x: float) -> str:
    return f"{x / 1e9:.3f}"


def flops_rows(variants: Sequence[str], full: bool = True, batch_size: int = 1,
               progress=None) -> List[Dict[str, object]]:
    """Parameters and MACs of each variant: paper convention, full convention on both paths, per stage."""
    from .flops import count_flops, count_parameters
    from .model import build_model

    rows = []
    for v in variants:
        t0 = time.perf_counter()
        model = build_model(v, backend="reference")
        paper = count_flops(model, "paper", batch_size=batch_size)
        row = {"variant": v, "batch_size": batch_size,
               "params_paper": count_parameters(model, "paper"),
               "params_trainable": count_parameters(model, "trainable"),
               "paper_macs": paper.total, "paper_per_stage": dict(paper.per_stage),
               "published_gflops": PAPER_TABLE[v]["gflops"], "published_mparams": PAPER_TABLE[v]["mparams"],
               "official_thop_macs": OFFICIAL_THOP_MACS[v] * batch_size}
        if full:
            pruned = count_flops(model, "full", batch_size=batch_size)
            unpruned = count_flops(model, "full", batch_size=batch_size, path="unpruned")
            row.update({"full_macs": pruned.total, "full_per_stage": dict(pruned.per_stage),
                        "full_by_operator": dict(pruned.by_operator),
                        "full_unpruned_macs": unpruned.total, "full_unpruned_per_stage": dict(unpruned.per_stage),
                        "pruning_saving": 1.0 - pruned.total / unpruned.total})
        rows.append(row)
        if progress is not None:
            print(f"counted {v} in {time.perf_counter() - t0:.1f} s", file=progress, flush=True)
    return rows


def flops_markdown(rows: Sequence[Dict[str, object]]) -> str:
    full = all("full_macs" in r for r in rows)
    head = ("| variant | params (paper conv.) | published params | paper-conv. GMACs | official thop GMACs | match "
            "| published GFLOPs |")
    sep = "|---|---:|---:|---:|---:|---|---:|"
    if full:
        head += " full GMACs pruned | full GMACs unpruned | pruning saves |"
        sep += "---:|---:|---:|"
    lines = [head, sep]
    for r in rows:
        mp = r["published_mparams"]
        match = "exact" if r["paper_macs"] == r["official_thop_macs"] else \
            f"{(r['paper_macs'] / r['official_thop_macs'] - 1) * 100:+.3f}%"
        line = (f"| {r['variant']} | {r['params_paper'] / 1e6:.3f} M | {'%.1f M' % mp if mp else '-'} | "
                f"{_g(r['paper_macs'])} | {_g(r['official_thop_macs'])} | {match} | {r['published_gflops']} |")
        if full:
            line += (f" {_g(r['full_macs'])} | {_g(r['full_unpruned_macs'])} | "
                     f"{r['pruning_saving'] * 100:.1f}% |")
        lines.append(line)
    lines += ["", "Per stage (GMACs, paper convention" + (" / full convention, pruned path" if full else "") + "):",
              ""]
    stages = list(rows[0]["paper_per_stage"]) if rows else []
    lines += ["| variant | " + " | ".join(stages) + " |", "|---|" + "---:|" * len(stages)]
    for r in rows:
        cells = []
        for s in stages:
            c = _g(r["paper_per_stage"][s])
            if full:
                c += f" / {_g(r['full_per_stage'].get(s, 0))}"
            cells.append(c)
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


_FLOPS_NOTE = ("GMACs = 1e9 multiply-accumulates (the paper's 'GFLOPs' are thop MACs). Paper convention: thop "
               "rules (Conv/Linear without bias, 4*numel per BN/LN, attention matmuls not counted), pruned eval "
               "path. Full convention: fvcore, every matmul incl. attention and pruning scores, plus norms. "
               "Params (paper conv.): executed Conv/Linear/Norm modules, no token embeddings, no frozen PE.")


def _cmd_flops(args) -> int:
    import json

    rows = flops_rows(_variants(args.variants, list_variants()), full=args.convention in ("full", "both"),
                      batch_size=args.batch_size)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if args.convention == "full":
        for r in rows:  # keep the table, but the user asked for full: say so first
            print(f"{r['variant']}: full-convention GMACs {_g(r['full_macs'])} (pruned), "
                  f"{_g(r['full_unpruned_macs'])} (unpruned)")
        print()
    print(flops_markdown(rows))
    print()
    print(_FLOPS_NOTE)
    return 0


# ----------------------------------------------------------------------------------------------------------------
# profile

def _cmd_profile(args) -> int:
    import torch

    from . import profiler

    variants = _variants(args.variants, ("gtpt-t", "gtpt-s"))
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    progress = None if args.quiet else sys.stderr
    t_start = time.perf_counter()
    # Validate the sweep before spending minutes on FLOP counting.
    for name, values, valid in (("backend", args.backends, profiler.BACKENDS),
                                ("dtype", args.dtypes, profiler.DTYPES), ("mode", args.modes, profiler.MODES)):
        for v in values:
            if v not in valid:
                raise ValueError(f"unknown {name} {v!r}; valid: {', '.join(valid)}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda requested but CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if args.budget_s is not None and not (math.isfinite(args.budget_s) and args.budget_s >= 0):
        raise ValueError(f"--budget-s must be a non-negative number of seconds, got {args.budget_s}")
    # The report directory must be writable before minutes of measurement, not after.
    try:
        os.makedirs(args.out_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=args.out_dir):
            pass
    except OSError as e:
        raise ValueError(f"--out-dir {args.out_dir!r} is not a writable directory ({e.strerror or e})") from None
    if args.runtimes:
        return _cmd_runtimes(args, variants, device, progress)
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    cores = os.cpu_count() or 1
    load_note = ""
    if device == "cpu" and load_start is not None and load_start > 0.5 * cores:
        # Several processes each running one OpenMP thread per core spin against each other: CPU timings can get
        # 10x worse. Say so (here and in the report) instead of silently reporting them.
        load_note = (f"load average {load_start:.1f} on {cores} cores at the start: other processes shared the CPU, "
                     f"so timings are noisier (paths are interleaved and noisy configs get more repeats)")
        if args.threads is None:
            # OpenMP threads of several processes spinning against each other were measured ~10x slower per op;
            # one thread per process keeps a busy machine's timings usable.
            torch.set_num_threads(1)
            load_note += "; timed with 1 CPU thread (--threads N to choose)"
        if progress is not None:
            print(f"note: {load_note}", file=progress, flush=True)

    rows, interleaved, results = [], [], []
    md_parts = ["# GTPT profile", ""]
    # A timeout's SIGTERM (or SIGINT) anywhere below ends the run early; the report is still written with what was
    # measured (the sweep records the configs it did not reach as skipped).
    with profiler.interrupt_on_stop_signals():
        try:
            rows = [] if args.no_flops else flops_rows(variants, full=True, progress=progress)
            if rows:
                md_parts += ["## Parameters and FLOPs (batch 1)", "", flops_markdown(rows), "", _FLOPS_NOTE]
                print(flops_markdown(rows))
                print()
            # The sweep times the two paths of each eager config interleaved (pruned, unpruned, pruned, ...), so
            # load from other processes hits both alike - the robust number for "the pruned model is faster"; its
            # reference pair at the smallest batch is the "interleaved" table. Only when the sweep has no such
            # pair is the comparison run on its own, before the sweep (eager CPU timings taken after a
            # torch.compile config are not clean).
            covered = ("reference" in args.backends and {"pruned", "unpruned"} <= set(args.paths))
            if "inference" in args.modes and not covered:
                b = min(args.batch_sizes)
                dtype = args.dtypes[0]
                for v in variants:
                    r = profiler.compare_paths(v, b, repeats=args.repeats, warmup=max(1, args.warmup), device=device,
                                               dtype=dtype)
                    interleaved.append(r)
                    if progress is not None:
                        print(f"interleaved pruned/unpruned {v} B={b} {dtype}: speedup {r['speedup_median']:.2f}x "
                              f"(median), {r['speedup_min']:.2f}x (min)", file=progress, flush=True)
            results = profiler.profile(variants, backends=args.backends, batch_sizes=args.batch_sizes,
                                       dtypes=args.dtypes, modes=args.modes, paths=args.paths, device=device,
                                       warmup=args.warmup, repeats=args.repeats, per_stage=not args.no_stages,
                                       progress=progress, budget_s=args.budget_s, op_breakdown=args.op_breakdown)
        except KeyboardInterrupt:  # before the sweep started (it handles its own): report what there is
            print("interrupted before the latency sweep; writing the report with what was measured",
                  file=sys.stderr, flush=True)
    if "inference" in args.modes and not interleaved:
        for v in variants:
            r = profiler.interleaved_from_results(results, v, min(args.batch_sizes), args.dtypes[0])
            if r is not None:
                interleaved.append(r)
    meta = profiler.environment_info(device)
    meta.update({"command": "gtpt " + " ".join(args.argv), "device": device,
                 "wall_s": round(time.perf_counter() - t_start, 1),
                 "load_average_start": load_start,
                 "load_average_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
                 "load_note": load_note or None})
    if load_note:
        md_parts[2:2] = [f"Note: {load_note}.", ""]
    extra_md = ""
    if interleaved:
        extra_md = ("\n\n## Pruned vs unpruned, interleaved runs (reference eager)\n\n"
                    "| variant | batch | dtype | rounds | pruned ms (median) | unpruned ms (median) | speedup (median) "
                    "| per-round p20-p80 | speedup (min) | note |\n|---|---:|---|---:|---:|---:|---:|---|---:|---|\n" +
                    "\n".join(f"| {r['variant']} | {r['batch_size']} | {r['dtype']} | {len(r['times_ms']['pruned'])} | "
                              f"{statistics.median(r['times_ms']['pruned']):.2f} | "
                              f"{statistics.median(r['times_ms']['unpruned']):.2f} | {r['speedup_median']:.2f}x | "
                              f"{r['speedup_p20']:.2f}-{r['speedup_p80']:.2f}x | "
                              f"{r['speedup_min']:.2f}x | {r.get('note') or ''} |" for r in interleaved))
    paths = profiler.write_report(args.out_dir, results, rows, meta, markdown_prefix="\n".join(md_parts),
                                  extra={"pruning_speedup_interleaved": interleaved}, markdown_suffix=extra_md)
    print(profiler.latency_markdown(results))
    if extra_md:
        print(extra_md)
    speedups = profiler.pruning_speedups(results)
    if speedups:
        print()
        for s in speedups:
            how = "interleaved" if s.get("interleaved") else "separate runs"
            print(f"speedup of the pruned over the unpruned path: {s['speedup']:.2f}x  ({s['variant']} "
                  f"{s['backend']} B={s['batch_size']} {s['dtype']}: {s['pruned_ms']:.1f} vs "
                  f"{s['unpruned_ms']:.1f} ms median, {how}" + (f"; {s['note']}" if s.get("note") else "") + ")")
        if load_note:
            print(f"note: {load_note}")
    print()
    print(f"report: {', '.join(paths.values())}  "
          f"[{time.perf_counter() - t_start:.0f} s]")
    return 0


def _cmd_runtimes(args, variants: Sequence[str], device: str, progress) -> int:
    """``gtpt profile --runtimes``: :func:`gtpt.runtimes.compare_runtimes` -> runtimes.md / runtimes.json."""
    import json

    from . import profiler, runtimes

    names = list(runtimes.RUNTIMES) if "all" in args.runtimes else list(dict.fromkeys(args.runtimes))
    for r in names:
        if r not in runtimes.RUNTIMES:
            raise ValueError(f"unknown runtime {r!r} in --runtimes; valid: {', '.join(runtimes.RUNTIMES)}, all")
    if device != "cpu":
        raise ValueError("--runtimes compares CPU runtimes: use --device cpu")
    threads = [args.threads] if args.threads is not None else [1, 2]
    result = runtimes.compare_runtimes(variants, args.batch_sizes, threads, names, repeats=args.repeats,
                                       warmup=max(1, args.warmup), log=progress)
    result["environment"] = profiler.environment_info("cpu")
    result["command"] = "gtpt " + " ".join(args.argv)
    md = runtimes.runtimes_markdown(result)
    with open(os.path.join(args.out_dir, "runtimes.md"), "w") as f:
        f.write("# GTPT CPU inference runtimes\n\n" + md + "\n")
    with open(os.path.join(args.out_dir, "runtimes.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(md)
    print(f"\nreport: {os.path.join(args.out_dir, 'runtimes.md')}, {os.path.join(args.out_dir, 'runtimes.json')}")
    return 0


def _cmd_env(args) -> int:
    from .flops import registered_custom_ops
    from .profiler import environment_info

    info = environment_info()
    info["gtpt_custom_ops"] = registered_custom_ops() or "none registered"
    for k, v in info.items():
        print(f"{k:>18}: {v}")
    return 0


# ----------------------------------------------------------------------------------------------------------------

_positive_int, _nonneg_int = positive_int, nonneg_int


def _run_eval(args):
    from .evaluate import run_eval_cli
    return run_eval_cli(args)


def _run_infer(args):
    from .inference import run_inference_cli
    return run_inference_cli(args)


def _run_export(args):
    from .export import run_export_cli
    return run_export_cli(args)


def build_parser() -> argparse.ArgumentParser:
    # Torch-free (gtpt.cli_options): `gtpt --help` and `gtpt X --help` answer without importing torch.
    BACKENDS, DTYPES, MODES = PROFILE_BACKENDS, PROFILE_DTYPES, PROFILE_MODES

    names = ", ".join(list_variants())
    p = _Parser(prog="gtpt", description="GTPT pose estimation on fused Triton kernels",
                epilog="--debug (anywhere on the line) or GTPT_DEBUG=1: full tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", metavar="command")

    s = sub.add_parser("summary", help="parameters per stage and token schedule of GTPT variants")
    s.add_argument("variants", nargs="*", help=f"variants (default: all): {names}")
    s.set_defaults(func=_cmd_summary)

    f = sub.add_parser("flops", help="parameters and FLOPs (MACs), paper and full conventions, per stage")
    f.add_argument("variants", nargs="*", help=f"variants (default: all): {names}")
    f.add_argument("--convention", choices=("paper", "full", "both"), default="both",
                   help="paper: thop rules as the paper counted; full: fvcore incl. attention (default: both)")
    f.add_argument("--batch-size", type=_positive_int, default=1, help="images per forward (default 1)")
    f.add_argument("--json", action="store_true", help="print JSON instead of tables")
    f.set_defaults(func=_cmd_flops)

    pr = sub.add_parser("profile", help="params, FLOPs vs the paper, pruning saving and latency -> reports/",
                        description="Parameters and FLOPs next to the paper's numbers, the FLOP saving of the "
                                    "pruned path, and latency by backend for the pruned and the unpruned path. "
                                    "Writes profile.json, profile.md and profile.png to --out-dir. Defaults fit "
                                    "a 2-core CPU in a few minutes; for a GPU sweep use e.g. --device cuda "
                                    "--batch-sizes 1 32 128 --dtypes fp32 bf16 --backends reference triton "
                                    "compile compile-reduce-overhead compile-triton cudagraph.")
    pr.add_argument("--variants", nargs="+", metavar="VARIANT",
                    help=f"variants or 'all' (default: gtpt-t gtpt-s): {names}")
    pr.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    pr.add_argument("--batch-sizes", nargs="+", type=_positive_int, default=[1, 8], metavar="B",
                    help="default: 1 8")
    pr.add_argument("--dtypes", nargs="+", choices=tuple(DTYPES), default=["fp32"], help="default: fp32")
    pr.add_argument("--backends", nargs="+", choices=BACKENDS, default=["reference"],
                    help="default: reference (triton, compile-reduce-overhead and cudagraph need CUDA)")
    pr.add_argument("--modes", nargs="+", choices=MODES, default=["inference"],
                    help="inference and/or train (one forward+backward of both passes); default: inference")
    pr.add_argument("--warmup", type=_nonneg_int, default=2, help="untimed iterations per config (default 2)")
    pr.add_argument("--repeats", type=_positive_int, default=5, help="timed iterations per config (default 5)")
    pr.add_argument("--threads", type=_positive_int, default=None,
                    help="CPU intra-op threads (default: torch's choice, one per core); 1 avoids OpenMP "
                         "oversubscription when other processes share the cores")
    pr.add_argument("--paths", nargs="+", choices=("pruned", "unpruned"), default=["pruned", "unpruned"],
                    help="inference paths to time (default: both; the saving needs both)")
    pr.add_argument("--budget-s", type=float, default=None,
                    help="start no new latency config after this many seconds; the rest are reported as skipped")
    pr.add_argument("--no-stages", action="store_true", help="skip the per-stage timing pass")
    pr.add_argument("--op-breakdown", action="store_true",
                    help="also profile each config with torch.profiler: time per kernel (CUDA) or operator (CPU), "
                         "summed by category (fused attention, pruning, GEMM, norms, elementwise, ...)")
    pr.add_argument("--no-flops", action="store_true", help="skip parameter and FLOP counting")
    pr.add_argument("--out-dir", default="reports", help="report directory (default: reports/)")
    pr.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    pr.add_argument("--runtimes", nargs="+", metavar="RUNTIME", default=None,
                    help="instead of the profile: CPU inference runtimes timed side by side, interleaved, against "
                         "the official forward (gtpt.runtimes: official eager eager-fused compile onnxruntime pt2 "
                         "onnxruntime-official, or 'all'); uses --variants --batch-sizes --threads (default 1 2) "
                         "--repeats --warmup; writes runtimes.md and runtimes.json to --out-dir")
    pr.set_defaults(func=_cmd_profile)

    e = sub.add_parser("env", help="versions, hardware and registered gtpt_kernels custom ops")
    e.set_defaults(func=_cmd_env)

    # Listed for help; `gtpt train ...` hands its arguments to gtpt.train's own parser (see main).
    sub.add_parser("train", add_help=False, help="train a variant (two passes, EMA, AMP, DDP under torchrun; "
                                                 "'gtpt train --help' for options)")

    from .synth import add_synth_arguments, run_synth_cli
    add_synth_arguments(sub.add_parser(
        "synth", help="generate a synthetic COCO-format pose dataset (drawn figures, known keypoints)",
        description="Write a seeded synthetic dataset in COCO format: JPEG images of articulated figures, "
                    "person_keypoints (17) or COCO-WholeBody (133) annotations for a train and a val split, and "
                    "person detection files. 'gtpt train' without data options trains on one of these.")
    ).set_defaults(func=run_synth_cli)


    add_eval_arguments(sub.add_parser("eval", help="COCO / COCO-WholeBody keypoint AP of a checkpoint (pycocotools)",
                                      description=EVAL_DESCRIPTION)).set_defaults(func=_run_eval)

    add_infer_arguments(sub.add_parser("infer", help="poses on images, folders and videos from person boxes; JSON + "
                                                     "drawings", description=INFER_DESCRIPTION)
                        ).set_defaults(func=_run_infer)

    add_export_arguments(sub.add_parser("export", help="export a variant to ONNX or a .pt2 (AOTInductor) package",
                                        description="Export a variant (random weights, or --checkpoint) for "
                                                    "deployment: ONNX (input 'images', outputs 'simcc_x', "
                                                    "'simcc_y'; dynamic batch) or a .pt2 AOTInductor package.")
                         ).set_defaults(func=_run_export)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``gtpt``: every failure is one line on stderr (exit 2 for a bad argument, 1 otherwise; see
    :mod:`gtpt.errors`); ``--debug`` anywhere on the line, or ``GTPT_DEBUG=1``, shows the traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:
        argv = [a for a in argv if a != "--debug"]
        os.environ[DEBUG_ENV] = "1"
    command = next((a for a in argv if not a.startswith("-")), None)
    prog = f"gtpt {command}" if command in ("summary", "flops", "profile", "env", "train", "synth", "eval", "infer",
                                                   "export") else "gtpt"
    try:
        return _main(argv)
    except SystemExit:
        raise
    except BaseException as e:  # one line, never a traceback (unless asked for)
        if os.environ.get(DEBUG_ENV, "0") not in ("", "0"):
            raise
        if isinstance(e, KeyboardInterrupt):
            print(f"{prog}: interrupted", file=sys.stderr)
        else:
            print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return exit_code(e)


def _main(argv: List[str]) -> int:
    if argv[:1] == ["train"]:
        from .train import main as train_main
        return train_main(argv[1:], prog="gtpt train")
    if argv[:1] == ["infer"]:
        from .inputs import join_negative_box_values
        argv = join_negative_box_values(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    args.argv = argv
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
