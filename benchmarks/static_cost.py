#!/usr/bin/env python
"""Static sm_90 cost report of every Triton kernel launch the GTPT model makes (no GPU needed).

    python benchmarks/static_cost.py --out DIR [--only mhga|prune] [--variants gtpt-s,...] [--batches 32,128]
                                     [--dtypes bf16,fp32] [--workers 2]

Method (all figures are ESTIMATES from compiled code, not measurements):

1. Launch capture. The real model (``gtpt.build_model``) runs on ``meta`` tensors in train mode under ``no_grad``
   (student and teacher passes), routed to the Triton backend, with ``JITFunction.run`` intercepted: every
   ``kernel[grid](...)`` any launcher makes is recorded with its grid, arguments and launch options, together with
   where the model was (pass, stage, layer). The backward kernels come from calling the op's backward launcher
   (``_bwd_impl``) on every forward's inputs. Nothing is typed by hand: shapes, strides, block sizes and warps are
   what the launchers choose.
2. Compile. Each distinct compiled config (kernel + constexprs + launch options + Triton's specialisation of the
   runtime arguments) is compiled once for sm_90 through ``JITFunction.warmup`` (the machinery of
   ``tests/test_kernels_compile.py``) and disassembled with the ``nvdisasm`` that ships with triton
   (``-gi``: source lines, inlined call sites).
3. Analysis. Loops are found in the SASS from backward branches; each is mapped to the ``for`` statement of the
   kernel source that holds most of its instructions' lines. Trip counts come from walking the kernel's Python
   AST with the launch's scalar arguments and constexprs for every program (scalar control flow only: loop
   bounds and ``if`` conditions that can be evaluated on scalars; others are assumed taken and flagged).
   Executed warp instructions = sum over SASS instructions of (executions of their innermost loop, or once per
   program) x warps per program. Issue time = the busiest SM's warp instructions / (4 per clock x 1.755 GHz).
   Bytes = what the launch must move (inputs read once, outputs written once, gathers count the kept rows);
   floor = bytes / HBM bandwidth. MUFU time = the busiest SM's executed MUFU (exp2, log2, rcp) warp instructions
   x 2 clocks (16 results per clock per SM). Estimate = max(issue time, MUFU time, H100 floor); ratio = estimate /
   H100 floor.

The parsing / estimation functions at the top of this file import neither torch nor triton (the test
``tests/test_static_cost.py`` runs them on a checked-in SASS snippet).
"""
from __future__ import annotations

import argparse
import ast
import collections
import hashlib
import inspect
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------------------------------------------------------------------
# Machine model (stated in the report)
# ------------------------------------------------------------------------------------------------------------

H100 = dict(
    name="H100 SXM (sm_90)", sms=132, clock_ghz=1.755, issue_per_clk=4,  # 4 schedulers x 1 warp-instr / clk per SM
    mufu_per_clk=16,  # MUFU (exp2, log2, rcp, ...) results per clock per SM
    regs_per_sm=65536, reg_alloc_unit=256, max_regs_per_thread=255,
    smem_per_sm=228 * 1024, smem_reserved_per_block=1024,
    threads_per_sm=2048, blocks_per_sm=32, hbm_bw=3.35e12)
H200_HBM_BW = 4.8e12  # same SM model assumed (GH100), only the bandwidth differs

ASSUMPTIONS = [
    "ESTIMATES from compiled code, not measurements. No GPU was used.",
    "Target: sm_90 (H100 SXM): 132 SMs, 1.755 GHz boost clock, 4 warp instructions issued per clock per SM "
    "(one per scheduler, every cycle: a peak that real kernels do not reach; latency, dependency and memory stalls "
    "are not modelled).",
    "Issue time = (warp instructions of the busiest SM) / (4 x 1.755e9 /s); the busiest SM runs ceil(programs / 132) "
    "programs of the launch's average size (programs spread round-robin, resident blocks share the issue slots).",
    "Executed instructions: every SASS instruction of a loop body issues once per iteration of its innermost loop "
    "(predicated-off instructions issue too; instructions behind a data-dependent branch are counted as taken); "
    "instructions outside loops issue once per program; x warps per program. Exception (2026-12-06): unpredicated "
    "instructions whose source line lies in the body or else branch of an if with a scalar condition the trip walk "
    "evaluates (e.g. a work-item slot that has no second job) issue as often as that branch runs, not every "
    "iteration of the enclosing loop.",
    "Trip counts: the kernel's Python source walked per program with the launch's scalar arguments and "
    "constexprs (loop bounds, scalar if-conditions); a software-pipelined loop is counted with its source trip "
    "count. Loops are mapped to source for-statements by the SASS line info.",
    "Bytes = every input read once and every output written once from HBM (shared key rows re-read from L2 are "
    "not counted; gathers count the kept rows; a broadcast (stride-0) operand counts its distinct elements). "
    "Floor = bytes / 3.35 TB/s (H100 SXM) or / 4.8 TB/s (H200).",
    "MUFU time = (MUFU warp instructions of the busiest SM) x 32 / (16 per clock x 1.755e9 /s): the special-function "
    "unit (exp2, log2, rcp, ...) delivers 16 results per clock per SM on sm_90 (CUDA C++ Programming Guide, "
    "throughput table), a second limit beside issue.",
    "Estimate = max(issue time, MUFU time, H100 floor); ratio = estimate / H100 floor (1.0 = at the memory floor, if "
    "issue and MUFU were the only other limits). Launch overhead (several us per launch) is not included.",
    "Not in the estimate, reported beside it (tensor_us in the json): a tensor-pipe time, the busiest SM's HMMA "
    "multiply-adds at an ASSUMED 1024 per clock per SM for 16-bit mma.sync (HMMA; half the dense wgmma peak of 2048, "
    "which HGMMA is counted at; TF32 half those). If the real mma.sync rate is that low, launches whose tensor_us "
    "reaches their estimate are tensor-bound.",
    "Occupancy (blocks per SM) from registers (allocated per warp in units of 256), shared memory (+1 KB reserved per "
    "block, 228 KB per SM), threads (2048 per SM) and the 32-block limit. Waves = programs / (132 x blocks per SM).",
    "dtype bf16 / fp32: the whole model in that dtype (model.to(dtype)); under torch.autocast the pruning gathers "
    "would read fp32 tokens instead.",
]

# ------------------------------------------------------------------------------------------------------------
# SASS parsing (pure python)
# ------------------------------------------------------------------------------------------------------------

_LINE_RE = re.compile(r'//## File "([^"]*)", line (\d+)(.*)$')
_FILE_HEADER_RE = re.compile(r"^//# file (\S+)\s*$")
_TRAILING_LOC_RE = re.compile(r";\s*//\s*((?:[\w.\-]+:)?\d+(?:<-(?:[\w.\-]+:)?\d+)*)\s*$")
_INLINED_RE = re.compile(r'inlined at "([^"]*)", line (\d+)')
_INSTR_RE = re.compile(r"^\s*/\*([0-9a-fA-F]+)\*/\s+(.*?)\s*;?\s*(?:/\*.*)?$")
_LABEL_RE = re.compile(r"^\s*(\.L\w+):\s*$")
_PRED_RE = re.compile(r"^@!?U?P[T0-9]+\s+")
_BRANCH_TARGET_RE = re.compile(r"`\((\.L\w+)\)|\b0x([0-9a-fA-F]+)\b")


def parse_sass(text):
    """Parse ``nvdisasm -gi -c`` (or ``cuobjdump -sass``) output of ONE function into a list of instructions:
    dicts with ``addr`` (int), ``op`` (opcode with modifiers), ``text`` (the instruction), ``loc`` (the chain of
    (file, line) source locations, innermost first; empty without line info) and ``target`` (branch target address
    or None). Labels are resolved to addresses."""
    instrs, labels, pending_labels = [], {}, []
    loc = ()
    main_file = ""
    for raw in text.splitlines():
        m = _LINE_RE.search(raw)
        if m:
            chain = [(os.path.basename(m.group(1)), int(m.group(2)))]
            chain += [(os.path.basename(f), int(n)) for f, n in _INLINED_RE.findall(m.group(3))]
            loc = tuple(chain)
            continue
        m = _FILE_HEADER_RE.match(raw)
        if m:
            main_file = m.group(1)
            continue
        m = _TRAILING_LOC_RE.search(raw)
        if m and raw.lstrip().startswith("/*"):
            chain = []
            for part in m.group(1).split("<-"):
                f, _, n = part.rpartition(":")
                chain.append((f or main_file, int(n)))
            loc = tuple(chain)
            raw = raw[:m.start()] + ";"
        m = _LABEL_RE.match(raw)
        if m:
            pending_labels.append(m.group(1))
            continue
        m = _INSTR_RE.match(raw)
        if not m:
            continue
        addr = int(m.group(1), 16)
        body = m.group(2).strip()
        if not body:
            continue
        for lab in pending_labels:
            labels[lab] = addr
        pending_labels = []
        op = _PRED_RE.sub("", body).split()[0] if _PRED_RE.sub("", body).split() else body
        instrs.append(dict(addr=addr, op=op, text=body, loc=loc, target=None, _tgt=None))
    for ins in instrs:
        if ins["op"].split(".")[0] in ("BRA", "BRX", "JMP", "CALL"):
            m = _BRANCH_TARGET_RE.search(ins["text"][ins["text"].index(ins["op"]) + len(ins["op"]):])
            if m:
                ins["target"] = labels.get(m.group(1)) if m.group(1) else int(m.group(2), 16)
        del ins["_tgt"]
    return instrs


def find_loops(instrs):
    """Loops from backward branches: a branch at index e to an address at or before it (itself excluded: the
    trailing ``BRA self`` after EXIT) makes the loop [start, e]. Branches to the same target merge. Returns loops
    sorted by start, each ``dict(start, end, parent, depth)`` (indices into ``instrs``, inclusive)."""
    index_of = {ins["addr"]: i for i, ins in enumerate(instrs)}
    by_start = {}
    for e, ins in enumerate(instrs):
        t = ins["target"]
        if t is None or t >= ins["addr"] or t not in index_of:
            continue
        s = index_of[t]
        by_start[s] = max(by_start.get(s, e), e)
    loops = [dict(start=s, end=e, parent=None, depth=0) for s, e in sorted(by_start.items())]
    for i, lp in enumerate(loops):
        # parent: the smallest enclosing loop
        best = None
        for j, other in enumerate(loops):
            if j != i and other["start"] <= lp["start"] and lp["end"] <= other["end"] and \
                    (other["start"], other["end"]) != (lp["start"], lp["end"]):
                if best is None or (other["end"] - other["start"]) < (loops[best]["end"] - loops[best]["start"]):
                    best = j
        lp["parent"] = best
    for lp in loops:
        d, p = 0, lp["parent"]
        while p is not None:
            d, p = d + 1, loops[p]["parent"]
        lp["depth"] = d
    return loops


def innermost_loop(loops, n_instrs):
    """For every instruction index, the index of its innermost enclosing loop (or None)."""
    owner = [None] * n_instrs
    for li in sorted(range(len(loops)), key=lambda i: loops[i]["depth"]):
        lp = loops[li]
        for k in range(lp["start"], lp["end"] + 1):
            owner[k] = li
    return owner


_MMA_OPS = ("HMMA", "HGMMA", "IMMA", "IGMMA", "DMMA", "BMMA", "QGMMA")
_FMA_OPS = ("FFMA", "FMUL", "FADD", "HFMA2", "HMUL2", "HADD2", "DFMA", "DMUL", "DADD", "FFMA2", "FMUL2", "FADD2")


def classify(op):
    """Coarse class of an opcode: mma (tensor core), fma (FP32/FP16/FP64 FMA pipe arithmetic), ldg (global load),
    ldgsts (async global->shared copy), stg, lds/sts (shared), shfl, mufu, bar, branch, other."""
    base = op.split(".")[0]
    if base in _MMA_OPS:
        return "mma"
    if base in _FMA_OPS:
        return "fma"
    return {"LDG": "ldg", "LDGSTS": "ldgsts", "STG": "stg", "LDS": "lds", "LDSM": "lds", "STS": "sts",
            "SHFL": "shfl", "MUFU": "mufu", "BAR": "bar", "BRA": "branch", "UTMALDG": "tma", "STL": "local",
            "LDL": "local", "REDUX": "redux", "RED": "atomic", "ATOM": "atomic", "ATOMG": "atomic"}.get(base, "other")


def load_width_bits(op):
    """Access width in bits of a global load / async copy opcode (LDG.E.128 -> 128, LDG.E.U16 -> 16, LDG.E -> 32,
    LDGSTS.E.BYPASS.LTC128B.128 -> 128), None for other opcodes."""
    parts = op.split(".")
    if parts[0] not in ("LDG", "LDGSTS", "STG"):
        return None
    width = 32
    for p in parts[1:]:
        if p in ("128", "64", "32", "16", "8"):
            width = int(p)
        elif p in ("U8", "S8"):
            width = 8
        elif p in ("U16", "S16"):
            width = 16
        elif p == "SYS" or p.startswith("LTC") or p.startswith("EL") or p in ("E", "CONSTANT", "BYPASS", "ZFILL",
                                                                                "STRONG", "GPU", "LU", "EF"):
            continue
    return width


def histogram(instrs, lo=0, hi=None):
    """Instruction-class counts and per-opcode counts of global memory ops in instrs[lo:hi+1]."""
    hi = len(instrs) - 1 if hi is None else hi
    classes = collections.Counter()
    mem = collections.Counter()
    for ins in instrs[lo:hi + 1]:
        c = classify(ins["op"])
        classes[c] += 1
        if c in ("ldg", "ldgsts", "stg", "local", "tma"):
            mem[ins["op"]] += 1
    return dict(classes), dict(mem)


def kernel_line(loc, kernel_file):
    """The line of the kernel's own source an instruction belongs to: the outermost location of its inline chain
    that is in the kernel's file (helpers inlined into the kernel map to their call site)."""
    for f, n in reversed(loc):
        if f == kernel_file:
            return n
    return None


def map_loops_to_source(instrs, loops, source_loops, kernel_file):
    """Map each SASS loop to a source ``for`` loop (``dict(line, end, depth, parent, static)``; unrolled
    ``static_range`` loops are never candidates). A loop that contains other SASS loops maps to the nearest
    non-static source loop enclosing its inner loops' source loop (its own instructions are often the inner loop's
    software-pipelining prologue); a loop without inner loops maps to the deepest source loop whose line range
    holds at least half of its own instructions with line info. Returns source-loop line numbers (or None)."""
    by_line = {sl["line"]: sl for sl in source_loops}
    candidates = [sl for sl in source_loops if not sl.get("static")]
    owner = innermost_loop(loops, len(instrs))
    out = [None] * len(loops)

    def ancestor(line):
        p = by_line[line].get("parent")
        while p is not None and by_line[p].get("static"):
            p = by_line[p].get("parent")
        return p

    for li in sorted(range(len(loops)), key=lambda i: -loops[i]["depth"]):
        lp = loops[li]
        children = [out[j] for j, o in enumerate(loops) if o["parent"] == li and out[j] is not None]
        if children:
            anc = [ancestor(c) for c in children]
            if all(a is not None and a == anc[0] for a in anc):
                out[li] = anc[0]
                continue
        lines = [kernel_line(instrs[k]["loc"], kernel_file) for k in range(lp["start"], lp["end"] + 1)
                 if owner[k] == li]
        lines = [n for n in lines if n is not None]
        best = None
        if lines:
            for sl in candidates:
                inside = sum(1 for n in lines if sl["line"] <= n <= sl["end"])
                if inside * 2 >= len(lines) and (best is None or sl["depth"] > best["depth"]):
                    best = sl
        out[li] = best["line"] if best else None
    return out


# ------------------------------------------------------------------------------------------------------------
# Occupancy and estimates (pure python)
# ------------------------------------------------------------------------------------------------------------

def blocks_per_sm(regs, smem_bytes, threads, gpu=H100):
    """Resident blocks per SM and the limiting resource."""
    warps = max(1, math.ceil(threads / 32))
    regs_per_warp = math.ceil(max(regs, 1) * 32 / gpu["reg_alloc_unit"]) * gpu["reg_alloc_unit"]
    limits = {
        "regs": (gpu["regs_per_sm"] // regs_per_warp) // warps,
        "threads": gpu["threads_per_sm"] // threads,
        "blocks": gpu["blocks_per_sm"],
    }
    limits["smem"] = gpu["smem_per_sm"] // (smem_bytes + gpu["smem_reserved_per_block"]) if smem_bytes else 10 ** 9
    n = min(limits.values())
    limiter = min(limits, key=lambda k: limits[k])
    return n, limiter


def waves(programs, bps, gpu=H100):
    return programs / (gpu["sms"] * max(bps, 1))


def issue_time_us(total_warp_instr, programs, gpu=H100):
    """Issue-bound time of a launch: the busiest SM issues ceil(programs / SMs) average programs' instructions at
    ``issue_per_clk`` warp instructions per clock."""
    if programs <= 0:
        return 0.0
    per_program = total_warp_instr / programs
    busiest = math.ceil(programs / gpu["sms"]) * per_program
    return busiest / (gpu["issue_per_clk"] * gpu["clock_ghz"] * 1e3)


def floor_us(nbytes, bw):
    return nbytes / bw * 1e6


def executed_instructions(instrs, loops, loop_execs, programs, warps, cls=None, inst_execs=None):
    """Warp instructions a launch issues: each instruction x executions of its innermost loop (programs if outside
    every loop) x warps per program. ``loop_execs[i]`` = total body executions of SASS loop i over the grid.
    ``cls``: count only the instructions of that class (:func:`classify`), e.g. ``"mufu"``. ``inst_execs``:
    per-instruction executions that replace that default where not None (see :func:`branch_executions`)."""
    owner = innermost_loop(loops, len(instrs))
    total = 0.0
    for k in range(len(instrs)):
        if cls is not None and classify(instrs[k]["op"]) != cls:
            continue
        if inst_execs is not None and inst_execs[k] is not None:
            total += inst_execs[k]
            continue
        li = owner[k]
        total += loop_execs[li] if li is not None else programs
    return total * warps


def branch_executions(instrs, loops, mapped, per_src, walker, kernel_file):
    """Executions of the instructions that sit in the body (or else branch) of a source ``if`` whose condition the
    trip walk evaluated: the if's own count over the grid (split like its loop's count when several SASS loops map to
    that source loop), instead of every execution of the enclosing loop. Only unpredicated instructions (an
    instruction under a guard predicate is if-converted code that issues whether or not its condition holds) whose
    kernel source line lies in the branch and whose innermost SASS loop maps to the if's enclosing source loop (or
    that are outside every loop for a top-level if); the innermost such branch wins. An if whose condition is a
    tensor value is walked as taken, so its body keeps the count of the enclosing loop. Returns a list with None
    where the default applies."""
    owner = innermost_loop(loops, len(instrs))
    regions = []
    for it in walker.ifs:
        for branch in ("body", "orelse"):
            span = it[branch]
            if span is not None:
                regions.append((span[1] - span[0], span, it["loop"], walker.if_counts.get((it["line"], branch), 0)))
    regions.sort(key=lambda r: r[0])
    out = [None] * len(instrs)
    for k, ins in enumerate(instrs):
        if ins["text"].startswith("@"):
            continue
        line = kernel_line(ins["loc"], kernel_file)
        if line is None:
            continue
        li = owner[k]
        src = mapped[li] if li is not None else None
        if li is not None and src is None:
            continue
        for _, (lo, hi), loop, count in regions:
            if loop == src and lo <= line <= hi:
                out[k] = count / per_src[src] if src is not None else count
                break
    return out


_HMMA_SHAPE_RE = re.compile(r"^HMMA\.(16816|1688|884|168)\.")
# Informational tensor-pipe term (not part of the estimate): assumed mma.sync (HMMA) throughput per SM per clock in
# multiply-adds, half of the dense wgmma peak (989 TFLOP/s bf16 = 2048 MAC / clock / SM at 1.83 GHz); TF32 at half
# the 16-bit rate. Microbenchmarks of Hopper report legacy mma.sync well below wgmma; this rate is an assumption,
# not a measurement.
HMMA_MAC_PER_CLK = {"16bit": 1024, "tf32": 512, "wgmma": 2048, "wgmma_tf32": 1024}


_HGMMA_SHAPE_RE = re.compile(r"^HGMMA\.(\d+)x(\d+)x(\d+)\.")


def hmma_macs(op):
    """Multiply-adds of one warp's MMA instruction and the rate class (None for other instructions). An HGMMA
    (wgmma) is issued by the 4 warps of a warpgroup for one M x N x K product: a quarter per warp, at the wgmma
    rate."""
    g = _HGMMA_SHAPE_RE.match(op)
    if g:
        return int(g.group(1)) * int(g.group(2)) * int(g.group(3)) // 4, (
            "wgmma_tf32" if ".TF32" in op else "wgmma")
    m = _HMMA_SHAPE_RE.match(op)
    if not m:
        return None
    shape = {"16816": 16 * 8 * 16, "1688": 16 * 8 * 8, "884": 8 * 8 * 4, "168": 16 * 8 * 8}[m.group(1)]
    return shape, ("tf32" if ".TF32" in op else "16bit")


def tensor_time_us(instrs, loops, loop_execs, programs, warps, inst_execs=None, gpu=None):
    """Busiest SM's HMMA multiply-adds / (HMMA_MAC_PER_CLK x clock): a tensor-pipe time, reported beside the
    estimate (not in it)."""
    gpu = gpu or H100
    if programs <= 0:
        return 0.0
    owner = innermost_loop(loops, len(instrs))
    clocks = 0.0
    for k, ins in enumerate(instrs):
        mk = hmma_macs(ins["op"])
        if mk is None:
            continue
        ex = inst_execs[k] if inst_execs is not None and inst_execs[k] is not None else (
            loop_execs[owner[k]] if owner[k] is not None else programs)
        clocks += ex * warps * mk[0] / HMMA_MAC_PER_CLK[mk[1]]
    busiest = math.ceil(programs / gpu["sms"]) * clocks / programs
    return busiest / (gpu["clock_ghz"] * 1e3)


def mufu_time_us(mufu_warp_instr, programs, gpu=None):
    """Time of the busiest SM's special-function unit: ``mufu_per_clk`` results per clock per SM (sm_90: 16 for
    exp2 / log2 / rcp / rsqrt / sin / cos, CUDA C++ Programming Guide, arithmetic instruction throughput table), so
    a warp's MUFU instruction occupies it for 32 / 16 = 2 clocks, whatever else issues meanwhile."""
    gpu = gpu or H100
    if programs <= 0:
        return 0.0
    busiest = math.ceil(programs / gpu["sms"]) * mufu_warp_instr / programs
    return busiest * 32 / (gpu["mufu_per_clk"] * gpu["clock_ghz"] * 1e3)


# ------------------------------------------------------------------------------------------------------------
# Trip counts: walk the kernel source per program (pure python on the AST)
# ------------------------------------------------------------------------------------------------------------

class _Unknown:
    def __repr__(self):
        return "?"


UNKNOWN = _Unknown()


class TripWalker:
    """Counts the body executions of every ``for`` statement of a ``@triton.jit`` kernel for given program ids.

    Only scalar control flow is evaluated: assignments, ``range`` / ``tl.range`` / ``tl.static_range`` bounds,
    ``if`` conditions, built from the kernel's scalar arguments, constexprs, ``tl.program_id`` /
    ``tl.num_programs`` and integer arithmetic. Anything else (tensors, loads, calls of other jit functions) is
    unknown; an ``if`` on an unknown condition is assumed taken and a loop with an unknown bound runs once (both
    recorded in ``self.flags``)."""

    MAX_STEPS = 200000
    RARE_MARK = "static-cost: rare"

    def __init__(self, source, first_line, env, globals_=None, rare=True):
        """``rare``: an ``if`` on a tensor value whose line carries the comment ``# static-cost: rare`` (a branch
        that the kernel expects to take seldom, e.g. lazy softmax rescaling) is counted taken on its first
        execution in each program and not taken after that; with ``rare=False`` it is counted taken always, like
        any other data-dependent if."""
        self.src_lines = textwrap.dedent(source).splitlines()
        self.rare = rare
        self.has_rare = any(self.RARE_MARK in ln for ln in self.src_lines)
        tree = ast.parse(textwrap.dedent(source))
        fn = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))
        self.offset = first_line - 1  # ``source`` starts at the function's first line (its decorator)
        self.fn = fn
        self.env0 = dict(env)
        self.globals = globals_ or {}
        self.flags = set()
        self.loops = []  # dict(line, end, depth, parent)
        # if statements: dict(line, loop (line of the nearest enclosing for, None at top level), body / orelse
        # (first, last) source lines). Their executions over a grid are in self.if_counts after grid_counts.
        self.ifs = []
        self.if_counts = collections.Counter()
        self._collect(fn.body, 0, None)

    def _collect(self, body, depth, parent):
        for node in body:
            if isinstance(node, ast.If):
                def span(stmts):
                    return (stmts[0].lineno + self.offset, stmts[-1].end_lineno + self.offset) if stmts else None
                self.ifs.append(dict(line=node.lineno + self.offset, loop=parent, body=span(node.body),
                                     orelse=span(node.orelse)))
            if isinstance(node, ast.For):
                line = node.lineno + self.offset
                it = node.iter
                fname = None
                if isinstance(it, ast.Call):
                    fname = it.func.attr if isinstance(it.func, ast.Attribute) else getattr(it.func, "id", None)
                # static_range is unrolled by the compiler: no SASS loop of its own
                self.loops.append(dict(line=line, end=node.end_lineno + self.offset, depth=depth, parent=parent,
                                       static=fname == "static_range"))
                self._collect(node.body, depth + 1, line)
                self._collect(node.orelse, depth, parent)
            else:
                for field in ("body", "orelse", "finalbody"):
                    sub = getattr(node, field, None)
                    if isinstance(sub, list) and sub and isinstance(sub[0], ast.stmt):
                        self._collect(sub, depth, parent)

    # -- expressions --
    def _value(self, v):
        # tl.constexpr objects (module globals such as _UNROLL_ROWS) hold .value
        if hasattr(v, "value") and type(v).__name__ == "constexpr":
            return v.value
        return v

    def _name(self, name, env):
        if name in env:
            return env[name]
        if name in self.globals:
            v = self._value(self.globals[name])
            if isinstance(v, (int, float, bool)):
                return v
        return UNKNOWN

    def ev(self, node, env):
        try:
            return self._ev(node, env)
        except (ZeroDivisionError, TypeError, ValueError, OverflowError):
            return UNKNOWN

    def _ev(self, node, env):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return self._name(node.id, env)
        if isinstance(node, ast.BinOp):
            a, b = self.ev(node.left, env), self.ev(node.right, env)
            if a is UNKNOWN or b is UNKNOWN:
                return UNKNOWN
            op = type(node.op)
            if op is ast.FloorDiv and isinstance(a, int) and isinstance(b, int):
                q = abs(a) // abs(b)  # C semantics (truncate toward zero), as Triton's integer division
                return q if (a >= 0) == (b >= 0) else -q
            if op is ast.Mod and isinstance(a, int) and isinstance(b, int):
                return a - b * (abs(a) // abs(b) if (a >= 0) == (b >= 0) else -(abs(a) // abs(b)))
            fns = {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y, ast.Mult: lambda x, y: x * y,
                   ast.Div: lambda x, y: x / y, ast.FloorDiv: lambda x, y: x // y, ast.Mod: lambda x, y: x % y,
                   ast.LShift: lambda x, y: x << y, ast.RShift: lambda x, y: x >> y, ast.BitAnd: lambda x, y: x & y,
                   ast.BitOr: lambda x, y: x | y, ast.BitXor: lambda x, y: x ^ y, ast.Pow: lambda x, y: x ** y}
            return fns[op](a, b) if op in fns else UNKNOWN
        if isinstance(node, ast.UnaryOp):
            a = self.ev(node.operand, env)
            if a is UNKNOWN:
                return UNKNOWN
            return {ast.USub: lambda x: -x, ast.UAdd: lambda x: x, ast.Not: lambda x: not x,
                    ast.Invert: lambda x: ~x}[type(node.op)](a)
        if isinstance(node, ast.Compare):
            left = self.ev(node.left, env)
            if left is UNKNOWN:
                return UNKNOWN
            result = True
            for op, comp in zip(node.ops, node.comparators):
                right = self.ev(comp, env)
                if right is UNKNOWN:
                    return UNKNOWN
                ok = {ast.Eq: left == right, ast.NotEq: left != right, ast.Lt: left < right, ast.LtE: left <= right,
                      ast.Gt: left > right, ast.GtE: left >= right}.get(type(op), UNKNOWN) \
                    if type(op) in (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE) else UNKNOWN
                if ok is UNKNOWN:
                    return UNKNOWN
                result = result and ok
                left = right
            return result
        if isinstance(node, ast.BoolOp):
            vals = [self.ev(v, env) for v in node.values]
            if isinstance(node.op, ast.And):
                if any(v is not UNKNOWN and not v for v in vals):
                    return False
                return UNKNOWN if any(v is UNKNOWN for v in vals) else True
            if any(v is not UNKNOWN and v for v in vals):
                return True
            return UNKNOWN if any(v is UNKNOWN for v in vals) else False
        if isinstance(node, ast.IfExp):
            c = self.ev(node.test, env)
            if c is UNKNOWN:
                return UNKNOWN
            return self.ev(node.body if c else node.orelse, env)
        if isinstance(node, ast.Call):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else (f.id if isinstance(f, ast.Name) else None)
            args = [self.ev(a, env) for a in node.args]
            if fname == "program_id":
                axis = args[0] if args else self._kw(node, "axis", env)
                return env["__pid__"][axis] if isinstance(axis, int) else UNKNOWN
            if fname == "num_programs":
                axis = args[0] if args else self._kw(node, "axis", env)
                return env["__grid__"][axis] if isinstance(axis, int) else UNKNOWN
            if isinstance(f, ast.Attribute) and fname == "to":  # scalar.to(dtype): the value
                return self.ev(f.value, env)
            if any(a is UNKNOWN for a in args):
                return UNKNOWN
            if fname == "cdiv" and len(args) == 2:
                return -(-args[0] // args[1])
            if fname in ("minimum", "min") and len(args) >= 2:
                return min(args)
            if fname in ("maximum", "max") and len(args) >= 2:
                return max(args)
            if fname == "where" and len(args) == 3:
                return args[1] if args[0] else args[2]
            if fname == "int" and len(args) == 1:
                return int(args[0])
            if fname == "abs" and len(args) == 1:
                return abs(args[0])
            return UNKNOWN
        if isinstance(node, ast.Attribute) and node.attr == "value":
            return self.ev(node.value, env)
        return UNKNOWN

    def _kw(self, node, name, env):
        for kw in node.keywords:
            if kw.arg == name:
                return self.ev(kw.value, env)
        return UNKNOWN

    # -- statements --
    def _assign(self, target, value, env):
        if isinstance(target, ast.Name):
            env[target.id] = value
        elif isinstance(target, (ast.Tuple, ast.List)):
            for t in target.elts:
                self._assign(t, UNKNOWN, env)

    def _range(self, node, env):
        it = node.iter
        if isinstance(it, ast.Call):
            f = it.func
            fname = f.attr if isinstance(f, ast.Attribute) else (f.id if isinstance(f, ast.Name) else None)
            if fname in ("range", "static_range"):
                args = [self.ev(a, env) for a in it.args]
                if args and all(isinstance(a, int) and not isinstance(a, bool) for a in args):
                    return range(*args)
        self.flags.add(f"loop at line {node.lineno + self.offset}: bound not evaluable, counted once")
        return [UNKNOWN]

    def _block(self, body, env, counts):
        for node in body:
            self._steps += 1
            if self._steps > self.MAX_STEPS:
                raise RuntimeError("trip walk exceeded its step budget")
            if isinstance(node, ast.Assign):
                v = self.ev(node.value, env)
                for t in node.targets:
                    self._assign(t, v if isinstance(t, ast.Name) else UNKNOWN, env)
            elif isinstance(node, ast.AnnAssign) and node.value is not None:
                self._assign(node.target, self.ev(node.value, env), env)
            elif isinstance(node, ast.AugAssign):
                if isinstance(node.target, ast.Name):
                    cur = env.get(node.target.id, UNKNOWN)
                    v = self.ev(ast.BinOp(left=ast.Name(id=node.target.id, ctx=ast.Load()), op=node.op,
                                          right=node.value), env) if cur is not UNKNOWN else UNKNOWN
                    env[node.target.id] = v
            elif isinstance(node, ast.For):
                line = node.lineno + self.offset
                for v in self._range(node, env):
                    counts[line] += 1
                    self._assign(node.target, v, env)
                    self._block(node.body, env, counts)
            elif isinstance(node, ast.If):
                c = self.ev(node.test, env)
                line = node.lineno + self.offset
                marked = self.rare and self.RARE_MARK in self.src_lines[node.lineno - 1]
                if c is UNKNOWN and marked:
                    self.flags.add(f"if at line {line}: data-dependent, marked rare: counted taken on its first "
                                   f"execution per program only (worst case, taken always: the *_if_rare_taken "
                                   f"fields)")
                    c = line not in self._rare_seen
                    self._rare_seen.add(line)
                if c is UNKNOWN:
                    self.flags.add(f"if at line {line}: condition not evaluable, counted taken")
                    counts[("if", line, "body")] += 1
                    self._block(node.body, env, counts)
                elif c:
                    counts[("if", line, "body")] += 1
                    self._block(node.body, env, counts)
                else:
                    counts[("if", line, "orelse")] += 1
                    self._block(node.orelse, env, counts)
            elif isinstance(node, ast.While):
                self.flags.add(f"while at line {node.lineno + self.offset}: not evaluated")
            elif isinstance(node, ast.With):
                self._block(node.body, env, counts)
            elif isinstance(node, ast.Return):
                return True
        return False

    def program(self, pid, grid):
        env = dict(self.env0)
        env["__pid__"], env["__grid__"] = pid, grid
        counts = collections.Counter()
        self._steps = 0
        self._rare_seen = set()
        self._block(self.fn.body, env, counts)
        return counts

    def grid_counts(self, grid, batch=None):
        """Total body executions per source loop over the grid. With ``batch`` and axis 0 divisible by it, the
        programs of batch elements 0 and 1 (axis-0 slices) are walked; if they agree, batch 0 x batch is used,
        otherwise the whole grid is walked."""
        grid = tuple(grid) + (1,) * (3 - len(grid))
        g0, g1, g2 = grid

        def walk(axis0):
            total = collections.Counter()
            for a in axis0:
                for b in range(g1):
                    for c in range(g2):
                        total.update(self.program((a, b, c), grid))
            return total

        def split(total):
            # loop counts are returned; the executions of if bodies / else branches go to self.if_counts
            self.if_counts = collections.Counter({k[1:]: v for k, v in total.items() if isinstance(k, tuple)})
            return collections.Counter({k: v for k, v in total.items() if not isinstance(k, tuple)})

        if batch and batch > 1 and g0 % batch == 0:
            per = g0 // batch
            first, second = walk(range(per)), walk(range(per, 2 * per))
            if first == second:
                return split(collections.Counter({k: v * batch for k, v in first.items()}))
            self.flags.add("programs differ between batch elements: whole grid walked")
        return split(walk(range(g0)))


# ------------------------------------------------------------------------------------------------------------
# Bytes a launch must move (from the captured tensors; torch needed only for dtype sizes)
# ------------------------------------------------------------------------------------------------------------

def footprint_bytes(shape, strides, elem):
    """Distinct bytes a strided view addresses (stride-0 dims counted once; views assumed non-overlapping)."""
    n = 1
    for s, st in zip(shape, strides):
        if st != 0:
            n *= s
    return n * elem if all(s > 0 for s in shape) else 0


def launch_bytes(kernel_name, tensors, consts, scalars):
    """(bytes, rule) of one launch. ``tensors``: arg name -> dict(shape, strides, elem, fp (footprint bytes));
    ``consts``: constexprs; ``scalars``: scalar args. Known kernels use their read/write sets; any other kernel
    counts every distinct tensor argument once (each read or written once)."""
    fp = {k: v["fp"] for k, v in tensors.items()}
    if kernel_name == "_mhga_fwd_kernel":
        return fp["QKV"] + fp["O"] + fp["LSE"], "read qkv; write o, lse"
    if kernel_name == "_mhga_bwd_dq_kernel":
        return (fp["QKV"] + fp["O"] + fp["DO"] + fp["LSE"] + fp["DELTA"] + fp["DQKV"] // 3,
                "read qkv, o, do, lse; write delta, dq (1/3 of dqkv)")
    if kernel_name == "_mhga_bwd_dkdv_kernel":
        return (fp["QKV"] + fp["DO"] + fp["LSE"] + fp["DELTA"] + 2 * fp["DQKV"] // 3,
                "read qkv, do, lse, delta; write dk, dv (2/3 of dqkv)")
    if kernel_name == "_prune_kernel":
        B, G = tensors["q_ptr"]["shape"][0], tensors["q_ptr"]["shape"][1]
        K = scalars.get("K", 1)
        total = fp["q_ptr"] + fp["k_ptr"] + fp["scores_ptr"]
        parts = ["read q rows, k (all heads), write scores"]
        if consts.get("HAS_MASK"):
            total += fp["mask_ptr"]
        if consts.get("HAS_COL_MASK"):
            total += fp["col_mask_ptr"]
        if consts.get("SELECT"):
            C = scalars.get("C", 1)

            def gathered(name):
                t = tensors[name]
                return min(t["fp"], B * G * K * C * t["elem"])

            total += gathered("tok_ptr") + tensors["out_ptr"]["fp"] + tensors["idx_ptr"]["fp"]
            parts.append("gather kept token rows, write out, index")
            if consts.get("HAS_POS"):
                total += gathered("pos_ptr") + tensors["out_pos_ptr"]["fp"]
                parts.append("gather kept pos rows, write out_pos")
            if consts.get("HAS_GATE"):
                total += gathered("gate_ptr")
                parts.append("gather kept gate rows")
        return total, "; ".join(parts)
    # generic: distinct tensors (by base pointer and shape) once each
    seen, total = set(), 0
    for name, t in tensors.items():
        key = (t.get("ptr"), tuple(t["shape"]), tuple(t["strides"]))
        if key in seen:
            continue
        seen.add(key)
        total += t["fp"]
    return total, "generic: every tensor argument read or written once"


# ------------------------------------------------------------------------------------------------------------
# Aggregates: per shape and direction, the issue's targets, comparison with a baseline run (pure python)
# ------------------------------------------------------------------------------------------------------------

def shape_totals(records):
    """Sum of estimates and floors per (variant, batch, dtype, op, shape, direction), over the kernels of that
    launch shape (e.g. dq + dk/dv for the MHGA backward, however many kernels a rewrite splits it into).
    Returns {key: dict(estimate_us, floor_us_h100, ratio, kernels, registers, spill_bytes)}."""
    out = collections.OrderedDict()
    for r in records:
        if r.get("estimate_us") is None:
            continue
        key = (r["variant"], r["batch"], r["dtype"], r["op"], r["shape"], r.get("direction", "fwd"))
        e = out.setdefault(key, dict(estimate_us=0.0, floor_us_h100=0.0, kernels=[], registers=[], spill_bytes=[]))
        e["estimate_us"] += r["estimate_us"]
        e["floor_us_h100"] += r["floor_us_h100"]
        e["kernels"].append(r["kernel"])
        e["registers"].append(r["registers"])
        e["spill_bytes"].append(r["spill_bytes"])
    for e in out.values():
        e["ratio"] = e["estimate_us"] / e["floor_us_h100"] if e["floor_us_h100"] else None
    return out


# The targets of issue 12 at B = 128 bf16 (estimates): MHGA forward <= 1.5x floor, MHGA backward (all its kernels)
# <= 2x, every pruning site <= 2x, dk/dv kernels <= 128 registers, no spills.
TARGETS = dict(batch=128, dtype="bf16", mhga_fwd=1.5, mhga_bwd=2.0, prune=2.0, dkdv_regs=128)


def check_targets(records, targets=TARGETS):
    """[(what, value, limit, ok)] for the records at the targets' batch and dtype."""
    rows = []
    rs = [r for r in records if r["batch"] == targets["batch"] and r["dtype"] == targets["dtype"]
          and r.get("estimate_us") is not None]
    for (v, b, d, op, shape, direction), e in shape_totals(rs).items():
        if op == "mhga":
            limit = targets["mhga_fwd"] if direction == "fwd" else targets["mhga_bwd"]
            rows.append((f"{v} {shape} MHGA {direction} ratio", round(e["ratio"], 2), limit, e["ratio"] <= limit))
        else:
            rows.append((f"{v} {shape} prune ratio", round(e["ratio"], 2), targets["prune"],
                         e["ratio"] <= targets["prune"]))
    dk = [r for r in rs if r["op"] == "mhga" and r.get("direction") == "bwd" and "dk" in r["kernel"]]
    if dk:
        worst = max(r["registers"] for r in dk)
        rows.append(("max registers of the dk/dv kernel(s)", worst, targets["dkdv_regs"],
                     worst <= targets["dkdv_regs"]))
    spills = [r for r in records if r.get("spill_bytes")]
    rows.append(("configs that spill (any batch / dtype)", len({r["config"] for r in spills}), 0, not spills))
    return rows


def compare_runs(records, baseline):
    """[(variant, batch, dtype, op, shape, direction, before ratio, after ratio, before est, after est)] for the
    shape keys both runs have."""
    before, after = shape_totals(baseline), shape_totals(records)
    rows = []
    for key, a in after.items():
        b = before.get(key)
        if b is None:
            continue
        rows.append(key + (b["ratio"], a["ratio"], b["estimate_us"], a["estimate_us"]))
    return rows


# ------------------------------------------------------------------------------------------------------------
# Launch capture (needs torch + triton, TRITON_INTERPRET unset)
# ------------------------------------------------------------------------------------------------------------

DTYPES = {"bf16": "bfloat16", "fp32": "float32", "fp16": "float16"}


def _compile_helpers():
    """The AOT machinery of tests/test_kernels_compile.py (fake pointers, the sm_90 stand-in driver, the triton
    tool lookup, cuobjdump resource usage)."""
    sys.path.insert(0, os.path.join(REPO, "tests"))
    import test_kernels_compile as kc  # noqa: E402
    return kc


class Launch:
    def __init__(self, kernel, grid, args, kwargs, ctx):
        self.kernel, self.grid, self.args, self.kwargs, self.ctx = kernel, grid, args, kwargs, dict(ctx)


def _capture_model(variant, batch, dtype_name, log):
    """Run the model on meta tensors and return its kernel launches (forward of both passes + backward)."""
    import torch
    import triton
    from triton.runtime.jit import JITFunction
    import gtpt_kernels
    import gtpt_kernels.backend as backend_mod
    from gtpt.model import build_model, Attention

    dtype = getattr(torch, dtype_name)
    launches = []
    ctx = {"pass": "student", "stage": None, "layer": None, "dir": "fwd"}
    orig_run = JITFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        if warmup:
            return orig_run(self, *args, grid=grid, warmup=warmup, **kwargs)
        g = grid(dict(zip(self.arg_names, args), **kwargs)) if callable(grid) else grid
        launches.append(Launch(self, tuple(g), args, kwargs, ctx))
        return None

    mods = [m for name, m in sys.modules.items() if name.startswith("gtpt_kernels") and m is not None]
    saved = []

    def patch(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    # Route to triton on meta tensors, launch kernels directly (no wrap_triton), skip value checks of masks.
    for m in mods:
        if hasattr(m, "resolve_backend"):
            patch(m, "resolve_backend", lambda backend, device: "triton")
        for flag in ("_OPAQUE", "_OPAQUE_OP"):
            if hasattr(m, flag):
                patch(m, flag, True)
        if hasattr(m, "_check_mask_rows"):
            patch(m, "_check_mask_rows", lambda *a, **k: None)
    patch(JITFunction, "run", run)
    ga = sys.modules["gtpt_kernels.ops.group_attention"]
    fwd_impl, bwd_impl = ga._fwd_impl, ga._bwd_impl

    def fwd_with_bwd(qkv, *rest):
        # The backward launcher on the forward's inputs and outputs, as autograd would call it in training
        # (grad_out contiguous like to_out's input gradient): _bwd_impl(grad_out, qkv, out, lse, *same args).
        res = fwd_impl(qkv, *rest)
        out, lse = res[0], res[1]
        prev = ctx["dir"]
        ctx["dir"] = "bwd"
        try:
            bwd_impl(torch.empty_like(out), qkv, out, lse, *rest)
        finally:
            ctx["dir"] = prev
        return res

    patch(ga, "_fwd_impl", fwd_with_bwd)
    try:
        with torch.device("meta"):
            model = build_model(variant, backend="triton").to(dtype)
        model.train()
        tr = model.features.transformer
        attn_index = {}
        for i, (a, _) in enumerate(tr.layers):
            attn_index[id(a.fn.fn)] = ("coarse", i)
        for i, (a, _) in enumerate(tr.group_layers):
            attn_index[id(a.fn.fn)] = ("fine", i)
        hooks = []
        for mod in model.modules():
            if isinstance(mod, Attention):
                def pre(m, inp):
                    ctx["stage"], ctx["layer"] = attn_index[id(m)]
                hooks.append(mod.register_forward_pre_hook(pre))
        passes = iter(["student", "teacher"])
        encode = model.features.encode

        def encode_hook(*a, **k):
            ctx["pass"] = next(passes)
            return encode(*a, **k)

        fine_entry = tr.fine_entry

        def fine_entry_hook(*a, **k):
            ctx["stage"], ctx["layer"] = "fine_entry", None
            return fine_entry(*a, **k)

        model.features.encode = encode_hook
        tr.fine_entry = fine_entry_hook
        h, w = model.cfg.image_size
        with torch.no_grad():
            model(torch.empty(batch, 3, h, w, dtype=dtype, device="meta"))
        for hk in hooks:
            hk.remove()
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
    return launches, model.cfg


def _arg_summary(launch):
    """Tensors (name -> shape/strides/elem/footprint), scalars and constexprs of a captured launch."""
    import torch
    kernel = launch.kernel
    names = kernel.arg_names
    tensors, scalars = {}, {}
    for name, a in zip(names, launch.args):
        if isinstance(a, torch.Tensor):
            tensors[name] = dict(shape=list(a.shape), strides=list(a.stride()), elem=a.element_size(),
                                 fp=footprint_bytes(a.shape, a.stride(), a.element_size()),
                                 dtype=str(a.dtype).replace("torch.", ""), ptr=id(a.untyped_storage()))
        elif isinstance(a, (int, float, bool)) or a is None:
            scalars[name] = a
    consts = {k: v for k, v in launch.kwargs.items() if k in names}
    options = {k: v for k, v in launch.kwargs.items() if k not in names}
    return tensors, scalars, consts, options


def _spec_key(launch):
    """What makes two launches compile to the same binary: kernel, constexprs, options, and Triton's
    specialisation of runtime args (dtype and 16-byte alignment of pointers, ints equal to 1 / divisible by 16)."""
    import torch
    parts = []
    for a in launch.args:
        if isinstance(a, torch.Tensor):
            ptr = (1 << 20) + a.storage_offset() * a.element_size()
            parts.append(("T", str(a.dtype), ptr % 16 == 0))
        elif isinstance(a, bool):
            parts.append(("b", a))
        elif isinstance(a, int):
            parts.append(("i", a == 1, a % 16 == 0, -2 ** 31 <= a < 2 ** 31))
        elif isinstance(a, float):
            parts.append(("f",))
        else:
            parts.append((type(a).__name__, repr(a)))
    k = launch.kernel
    return (k.fn.__module__, k.fn.__name__, tuple(sorted((n, repr(v)) for n, v in launch.kwargs.items())), tuple(parts))


def _config_name(launch, dtype_short, key):
    k = launch.kernel.fn.__name__.strip("_")
    blocks = "".join(f"{n.replace('BLOCK_', '')}{v}" for n, v in sorted(launch.kwargs.items())
                     if n.startswith("BLOCK_"))
    h = hashlib.sha1(repr(key).encode()).hexdigest()[:8]
    return f"{k}-{dtype_short}-{blocks}-w{launch.kwargs.get('num_warps', 4)}-{h}"


# ------------------------------------------------------------------------------------------------------------
# Compile (in worker processes)
# ------------------------------------------------------------------------------------------------------------

_WORK = {}  # config name -> (module, kernel name, args, kwargs); set before the pool forks


def _compile_one(name):
    kc = _compile_helpers()
    module, kname, args, kwargs = _WORK[name]
    import importlib
    kernel = getattr(importlib.import_module(module), kname)
    t0 = time.perf_counter()
    try:
        compiled, _ = kc._compile_launch(kernel, args, kwargs)
    except Exception as e:  # the compile error is the finding
        return name, dict(ok=False, error=f"{type(e).__name__}: {e}"[:4000])
    meta = dict(ok=True, compile_s=round(time.perf_counter() - t0, 2), shared=int(compiled.metadata.shared),
                num_warps=int(compiled.metadata.num_warps), num_stages=int(compiled.metadata.num_stages),
                fn=compiled.metadata.name)
    usage = kc._resource_usage(compiled.asm["cubin"], compiled.metadata.name)
    if usage:
        meta.update(usage)
    # nvdisasm -gi: SASS with source lines and inline chains (needed to map loops to the source); without it,
    # cuobjdump -sass (loops are then not mapped: counted once per program, and flagged)
    tool = kc._nvidia_tool("nvdisasm")
    cmd = [tool, "-gi", "-c"] if tool and os.path.exists(tool) else [kc._nvidia_tool("cuobjdump"), "-sass"]
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
        path = f.name
    try:
        sass = subprocess.run(cmd + [path], capture_output=True, text=True, timeout=120).stdout
    finally:
        os.remove(path)
    meta["sass"] = sass
    return name, meta


def _shorten_sass(text):
    """The saved listing (plain text, compact): one function, no section directives, padding collapsed. A source
    location is appended to the first instruction it applies to as ``// LINE<-CALLER<-...`` (inline chain,
    innermost first; ``file.py:LINE`` for a file other than the kernel's, which the header line names).
    ``parse_sass`` reads this form as well as nvdisasm's."""
    instrs = parse_sass(text)
    outer = collections.Counter(ins["loc"][-1][0] for ins in instrs if ins["loc"])
    main = outer.most_common(1)[0][0] if outer else ""
    out = [f"//# file {main}"] if main else []
    loc = ()
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith((".section", ".align", ".type", ".size", ".other", ".global",
                                                ".elftype", ".headerflags", ".text.", "//----")):
            continue
        m = _LINE_RE.search(line)
        if m:
            chain = [(os.path.basename(m.group(1)), m.group(2))]
            chain += [(os.path.basename(f), n) for f, n in _INLINED_RE.findall(m.group(3))]
            loc = chain
            continue
        text_line = re.sub(r"\s+", " ", stripped)
        if loc and _INSTR_RE.match(line):
            text_line += " // " + "<-".join(n if f == main else f"{f}:{n}" for f, n in loc)
            loc = ()
        out.append(text_line)
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------------------
# Analysis of one compiled config + one launch
# ------------------------------------------------------------------------------------------------------------

def analyse_sass(sass_text):
    instrs = parse_sass(sass_text)
    loops = find_loops(instrs)
    classes, mem = histogram(instrs)
    for lp in loops:
        lp["instructions"] = lp["end"] - lp["start"] + 1
    for lp in loops:
        inner = sum(o["instructions"] for o in loops if o["parent"] is not None and loops[o["parent"]] is lp)
        lp["exclusive"] = lp["instructions"] - inner
        c, m = histogram(instrs, lp["start"], lp["end"])
        lp["classes"], lp["mem"] = c, m
        end_addr = instrs[lp["end"]]["addr"]
        # branches that skip forward inside the body: parts of the body may not run every iteration
        lp["forward_branches"] = sum(1 for ins in instrs[lp["start"]:lp["end"]]
                                     if ins["target"] is not None and ins["addr"] < ins["target"] <= end_addr)
    return instrs, loops, classes, mem


def estimate_launch(kernel_name, sass_analysis, meta, grid, batch, scalars, consts, tensors, source, first_line,
                    kernel_globals, kernel_file, trip_cache=None):
    """Every estimated figure of one launch (pure python): occupancy, waves, loops with trip counts, executed
    instructions, bytes, floors, issue time, estimate and ratio. ``sass_analysis`` = :func:`analyse_sass` of the
    config's SASS; ``meta`` = its compile metadata (num_warps, shared, regs, local, stack); ``source`` /
    ``first_line`` / ``kernel_globals`` / ``kernel_file``: the kernel's Python source, its first line in
    ``kernel_file`` and its module globals (constexpr globals)."""
    instrs, loops, classes, mem = sass_analysis
    grid = tuple(grid)
    warps = meta["num_warps"]
    threads = 32 * warps
    smem = meta["shared"] + meta.get("static_smem", 0)
    regs = meta.get("regs")
    bps, limiter = blocks_per_sm(regs or 0, smem, threads)
    programs = 1
    for g in grid:
        programs *= g
    tkey = (kernel_name, source, grid, tuple(sorted((k, repr(x)) for k, x in scalars.items())),
            tuple(sorted((k, repr(x)) for k, x in consts.items())), batch)
    if trip_cache is None or tkey not in trip_cache:
        env = dict(scalars)
        env.update(consts)
        walker = TripWalker(source, first_line, env, kernel_globals)
        counts = walker.grid_counts(grid, batch=batch)
        if trip_cache is not None:
            trip_cache[tkey] = (walker, counts)
    else:
        walker, counts = trip_cache[tkey]
    mapped = map_loops_to_source(instrs, loops, walker.loops, kernel_file)
    per_src = collections.Counter(m for m in mapped if m is not None)
    loop_execs, flags = [], sorted(walker.flags)
    for li, m in enumerate(mapped):
        if m is None:
            loop_execs.append(programs)
            flags.append(f"SASS loop {li} not mapped to a source loop: counted once per program")
        else:
            loop_execs.append(counts.get(m, 0) / per_src[m])
    inst_execs = branch_executions(instrs, loops, mapped, per_src, walker, kernel_file)
    total_instr = executed_instructions(instrs, loops, loop_execs, programs, warps, inst_execs=inst_execs)
    issue = issue_time_us(total_instr, programs)
    mufu_instr = executed_instructions(instrs, loops, loop_execs, programs, warps, cls="mufu", inst_execs=inst_execs)
    mufu = mufu_time_us(mufu_instr, programs)
    tensor = tensor_time_us(instrs, loops, loop_execs, programs, warps, inst_execs=inst_execs)
    worst = {}
    if walker.has_rare:
        # the same launch with the rare-marked branches counted taken on every execution (the worst case)
        w2 = TripWalker(source, first_line, dict(scalars, **consts), kernel_globals, rare=False)
        w2.grid_counts(grid, batch=batch)
        ex2 = branch_executions(instrs, loops, mapped, per_src, w2, kernel_file)
        worst = dict(
            issue_us_if_rare_taken=round(issue_time_us(executed_instructions(
                instrs, loops, loop_execs, programs, warps, inst_execs=ex2), programs), 3),
            mufu_us_if_rare_taken=round(mufu_time_us(executed_instructions(
                instrs, loops, loop_execs, programs, warps, cls="mufu", inst_execs=ex2), programs), 3))
    nbytes, rule = launch_bytes(kernel_name, tensors, consts, scalars)
    if rule.startswith("generic"):
        flags.append("bytes: generic rule (no read/write model for this kernel in launch_bytes): every tensor "
                     "argument counted once in full")
    fl100, fl200 = floor_us(nbytes, H100["hbm_bw"]), floor_us(nbytes, H200_HBM_BW)
    est = max(issue, mufu, fl100)
    loop_recs = []
    for li, lp in enumerate(loops):
        loop_recs.append(dict(
            index=li, start=f"{instrs[lp['start']]['addr']:#06x}", end=f"{instrs[lp['end']]['addr']:#06x}",
            depth=lp["depth"], instructions=lp["instructions"], exclusive=lp["exclusive"],
            source_line=mapped[li], executions=loop_execs[li],
            per_program=round(loop_execs[li] / programs, 3) if programs else None,
            mma=lp["classes"].get("mma", 0), fma=lp["classes"].get("fma", 0), mem=lp["mem"],
            forward_branches=lp["forward_branches"],
            share=round(lp["exclusive"] * loop_execs[li] * warps / total_instr, 4) if total_instr else None))
    hot = max(loop_recs, key=lambda r: r["exclusive"] * r["executions"]) if loop_recs else None
    for lr in loop_recs:
        if lr["forward_branches"] and (lr["share"] or 0) >= 0.05:
            flags.append(f"SASS loop {lr['index']} (source line {lr['source_line']}) has "
                         f"{lr['forward_branches']} forward branch(es) in its body: skipped parts are "
                         f"counted as executed (except branches of ifs with an evaluable scalar condition)")
    w = waves(programs, bps)
    return dict(
        registers=regs, spill_bytes=(meta.get("local", 0) + meta.get("stack", 0)) if "local" in meta else None,
        shared_bytes=smem, threads=threads, blocks_per_sm=bps, occupancy_limiter=limiter,
        programs=programs, waves=round(w, 3), waves_ceil=math.ceil(w),
        warps_per_scheduler=round(min(bps, math.ceil(programs / H100["sms"])) * warps / 4, 2),
        loop_instructions=hot["exclusive"] if hot else 0,
        hot_loop=hot, loops=loop_recs, kernel_instructions=len(instrs),
        mma_instructions=classes.get("mma", 0), fma_instructions=classes.get("fma", 0),
        instruction_classes=classes, global_memory_ops=mem,
        executed_warp_instructions=int(total_instr),
        bytes=int(nbytes), bytes_rule=rule, floor_us_h100=round(fl100, 3), floor_us_h200=round(fl200, 3),
        issue_us=round(issue, 3), mufu_us=round(mufu, 3), executed_mufu_instructions=int(mufu_instr),
        tensor_us=round(tensor, 3),
        estimate_us=round(est, 3), ratio=round(est / fl100, 3) if fl100 else None,
        estimate_us_h200=round(max(issue, mufu, fl200), 3),
        ratio_h200=round(max(issue, mufu, fl200) / fl200, 3) if fl200 else None,
        bound="memory" if fl100 >= max(issue, mufu) else ("issue" if issue >= mufu else "mufu"), flags=flags,
        **worst, **({"ratio_if_rare_taken": round(max(worst["issue_us_if_rare_taken"],
                                                      worst["mufu_us_if_rare_taken"], fl100) / fl100, 3)}
                    if worst and fl100 else {}))


def shape_name(ctx, cfg, order):
    """Name of an MHGA launch shape / pruning site from where the model was when it launched."""
    stage, layer, ps = ctx.get("stage"), ctx.get("layer"), ctx.get("pass")
    teacher = ps == "teacher"
    if ctx.get("op") == "prune":
        site = "fine_entry" if stage == "fine_entry" else f"{stage}_l{layer}"
        return ("teacher_" if teacher else "") + site
    # MHGA: first distinct N within a stage keeps the base name, later (pruned) ones get "late"
    idx = order[(ps, stage)].index(ctx["N"])
    if stage == "coarse":
        if idx == 0:
            return "coarse"
        return ("teacher_" if teacher else "") + "coarse_late" + ("" if idx == 1 else str(idx))
    if teacher:
        return "teacher" + ("" if idx == 0 else f"_late{idx}")
    base = "wholebody" if cfg.wholebody else "fine"
    if idx == 0:
        return base
    return ("late_fine" if not cfg.wholebody else "wholebody_late") + ("" if idx == 1 else str(idx))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (static_cost.md, static_cost.json, sass/)")
    p.add_argument("--only", choices=("mhga", "prune"), help="only the MHGA kernels or only the pruning kernels")
    p.add_argument("--variants", default="gtpt-s,gtpt-b,gtpt-s-wholebody", help="comma-separated GTPT variants")
    p.add_argument("--batches", default="32,128", help="comma-separated batch sizes")
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp32, fp16")
    p.add_argument("--workers", type=int, default=2, help="compile processes (default 2)")
    p.add_argument("--compare", metavar="JSON", help="a baseline static_cost.json (or its folder): adds a before / "
                                                    "now table per shape")
    p.add_argument("--nice", type=int, default=10, help="raise the process niceness by this much first (default 10; "
                                                        "nothing here is timed)")
    a = p.parse_args(argv)
    try:
        variants = [v.strip() for v in a.variants.split(",") if v.strip()]
        batches = [int(b) for b in a.batches.split(",") if b.strip()]
    except ValueError:
        p.error(f"--batches must be comma-separated integers, got {a.batches!r}")
    dtypes = [d.strip() for d in a.dtypes.split(",") if d.strip()]
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        p.error(f"--dtypes: unknown {','.join(bad)}; use bf16, fp32 or fp16")
    if not batches or any(b <= 0 for b in batches):
        p.error("--batches must be positive integers")
    if a.workers < 1:
        p.error("--workers must be >= 1")
    baseline = None
    if a.compare:
        path = os.path.join(a.compare, "static_cost.json") if os.path.isdir(a.compare) else a.compare
        try:
            with open(path) as f:
                baseline = json.load(f)
            if not isinstance(baseline, list) or not all(isinstance(r, dict) and "shape" in r for r in baseline):
                raise ValueError("not a list of static_cost records")
        except (OSError, ValueError) as e:
            print(f"static_cost: --compare {a.compare}: cannot read a static_cost.json there ({e})", file=sys.stderr)
            return 2
        a.compare = path
    if a.nice > 0:
        os.nice(a.nice)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.path.insert(0, REPO)
    try:
        from gtpt.config import get_config
        for v in variants:
            get_config(v)
    except ValueError as e:
        p.error(f"--variants: {e}")
    kc = _compile_helpers()
    reason = kc._unavailable_reason()
    if reason:
        print(f"static_cost: cannot compile for sm_90 here: {reason}", file=sys.stderr)
        return 1
    import warnings
    warnings.filterwarnings("ignore")
    kc._use_sm90_driver()
    try:
        os.makedirs(os.path.join(a.out, "sass"), exist_ok=True)
    except OSError as e:
        print(f"static_cost: --out {a.out}: cannot create it ({e})", file=sys.stderr)
        return 1
    return run_report(a.out, variants, batches, dtypes, a.only, a.workers, baseline, a.compare)


def run_report(out_dir, variants, batches, dtypes, only, workers, baseline=None, baseline_name=None):
    import torch
    t_start = time.perf_counter()
    kc = _compile_helpers()
    # 1. capture
    groups = []  # (variant, batch, dtype_short, launches, cfg)
    for v in variants:
        for b in batches:
            for d in dtypes:
                try:
                    launches, cfg = _capture_model(v, b, DTYPES[d], print)
                except Exception as e:  # a launcher that cannot run on meta tensors: say which, stop
                    print(f"static_cost: capturing the launches of {v} B={b} {d} failed: {type(e).__name__}: {e}",
                          file=sys.stderr)
                    return 1
                for L in launches:
                    name = L.kernel.fn.__name__
                    L.ctx["op"] = "prune" if "prune" in name or L.kernel.fn.__module__.endswith("token_prune") \
                        else "mhga"
                    L.ctx["dir"] = L.ctx.get("dir", "fwd")
                if only:
                    launches = [L for L in launches if L.ctx["op"] == only]
                groups.append((v, b, d, launches, cfg))
                print(f"[capture] {v} B={b} {d}: {len(launches)} kernel launches per training step", flush=True)
    # 2. distinct compiled configs
    configs = {}  # key -> name
    for v, b, d, launches, cfg in groups:
        for L in launches:
            key = _spec_key(L)
            if key not in configs:
                configs[key] = _config_name(L, d, key)
                kargs = [kc._FakePtr(x) if isinstance(x, torch.Tensor) else x for x in L.args]
                _WORK[configs[key]] = (L.kernel.fn.__module__, L.kernel.fn.__name__, kargs, dict(L.kwargs))
            L.config = configs[key]
    names = sorted(_WORK)
    print(f"[compile] {len(names)} distinct sm_90 configs ({workers} worker(s))", flush=True)
    results = {}
    if workers > 1 and len(names) > 1:
        import multiprocessing as mp
        with mp.get_context("fork").Pool(workers) as pool:
            for i, (n, meta) in enumerate(pool.imap_unordered(_compile_one, names), 1):
                results[n] = meta
                print(f"[compile] {i}/{len(names)} {n}: " + (f"{meta.get('regs')} regs, {meta['compile_s']} s"
                                                                if meta["ok"] else "FAILED"), flush=True)
    else:
        for i, n in enumerate(names, 1):
            results[n] = _compile_one(n)[1]
            meta = results[n]
            print(f"[compile] {i}/{len(names)} {n}: " + (f"{meta.get('regs')} regs, {meta['compile_s']} s"
                                                            if meta["ok"] else "FAILED"), flush=True)
    # 3. per-config SASS analysis
    sass_info = {}
    for n, meta in results.items():
        if not meta["ok"]:
            continue
        with open(os.path.join(out_dir, "sass", f"{n}.sass"), "w") as f:
            f.write(_shorten_sass(meta["sass"]))
        sass_info[n] = analyse_sass(meta["sass"])
    # 4. records
    records = []
    walkers = {}
    trip_cache = {}
    for v, b, d, launches, cfg in groups:
        # distinct N per (pass, stage) in launch order, for the shape names
        order = collections.defaultdict(list)
        agg = collections.OrderedDict()
        for L in launches:
            if L.ctx["op"] == "mhga":
                N = L.args[L.kernel.arg_names.index("N")] if "N" in L.kernel.arg_names else None
                L.ctx["N"] = N
                if L.ctx["dir"] == "fwd" and N not in order[(L.ctx["pass"], L.ctx["stage"])]:
                    order[(L.ctx["pass"], L.ctx["stage"])].append(N)
        for L in launches:
            if L.ctx["op"] == "mhga" and L.ctx["N"] not in order[(L.ctx["pass"], L.ctx["stage"])]:
                order[(L.ctx["pass"], L.ctx["stage"])].append(L.ctx["N"])
            shape = shape_name(L.ctx, cfg, order)
            tensors, scalars, consts, options = _arg_summary(L)
            key = (L.kernel.fn.__name__, shape, L.config, L.grid,
                   tuple(sorted((k, repr(x)) for k, x in scalars.items())))
            if key not in agg:
                agg[key] = dict(L=L, shape=shape, tensors=tensors, scalars=scalars, consts=consts, options=options,
                                eval=0, train=0, layers=[])
            e = agg[key]
            e["train"] += 1
            if L.ctx["pass"] == "student" and L.ctx["dir"] == "fwd":
                e["eval"] += 1
            e["layers"].append(f"{L.ctx['pass'][0]}:{L.ctx['stage']}{'' if L.ctx['layer'] is None else L.ctx['layer']}")
        for (kname, shape, cname, grid, _), e in agg.items():
            L = e["L"]
            rec = dict(op=L.ctx["op"], kernel=kname, shape=shape, variant=v, batch=b, dtype=d,
                       direction=L.ctx["dir"], config=cname, sass=f"sass/{cname}.sass",
                       launches_per_eval_forward=e["eval"], launches_per_train_step=e["train"],
                       layers=e["layers"], grid=list(grid), constexprs={k: x for k, x in e["consts"].items()},
                       num_warps=e["options"].get("num_warps", 4), num_stages=e["options"].get("num_stages"))
            if kname in ("_mhga_fwd_kernel", "_mhga_bwd_dq_kernel", "_mhga_bwd_dkdv_kernel") or L.ctx["op"] == "mhga":
                sc = e["scalars"]
                rec["problem"] = {k: sc[k] for k in ("G", "N", "S") if k in sc}
                if all(k in sc for k in ("G", "N", "S")):
                    rec["problem"]["L"] = sc["G"] * sc["S"] + sc["N"] - sc["S"]
            else:
                sc = e["scalars"]
                rec["problem"] = {k: sc[k] for k in ("G", "H", "N", "D", "C", "K") if k in sc}
                rec["problem"]["R"] = e["consts"].get("R")
            meta = results[cname]
            if not meta["ok"]:
                rec.update(compile_error=meta["error"], registers=None, spill_bytes=None, blocks_per_sm=None,
                           loop_instructions=None, bytes=None, floor_us_h100=None, estimate_us=None, ratio=None)
                records.append(rec)
                continue
            fn = L.kernel.fn
            wkey = (fn.__module__, fn.__name__)
            if wkey not in walkers:
                walkers[wkey] = (inspect.getsource(fn), fn.__code__.co_firstlineno, fn.__globals__,
                                 os.path.basename(inspect.getsourcefile(fn)))
            src, first_line, globs, kfile = walkers[wkey]
            rec.update(estimate_launch(kname, sass_info[cname], meta, grid, b, e["scalars"], e["consts"],
                                       e["tensors"], src, first_line, globs, kfile, trip_cache))
            records.append(rec)
    with open(os.path.join(out_dir, "static_cost.json"), "w") as f:
        # one record per line: compact, and a diff shows which launch configs changed
        f.write("[\n" + ",\n".join(json.dumps(r, sort_keys=False) for r in records) + "\n]\n")
    with open(os.path.join(out_dir, "static_cost.md"), "w") as f:
        f.write(render_markdown(records, results, variants, batches, dtypes, only, baseline, baseline_name))
    print(f"[done] {len(records)} records, {len(results)} configs in {time.perf_counter() - t_start:.0f} s -> "
          f"{out_dir}", flush=True)
    failed = sorted(n for n, m in results.items() if not m["ok"])
    if failed:
        print(f"static_cost: {len(failed)} config(s) failed to compile for sm_90 (see static_cost.md): "
              f"{', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


# ------------------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------------------

def _fmt(x, nd=1):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _mem_summary(mem):
    return ", ".join(f"{k} x{v}" for k, v in sorted(mem.items())) or "-"


def render_markdown(records, results, variants, batches, dtypes, only, baseline=None, baseline_name=None):
    ok = [r for r in records if r.get("estimate_us") is not None]
    lines = ["# Static sm_90 cost report (ESTIMATES from compiled code, not measurements)", ""]
    lines.append(f"Variants {', '.join(variants)}; batches {', '.join(map(str, batches))}; dtypes "
                 f"{', '.join(dtypes)}" + (f"; only {only}" if only else "") + ". Generated by "
                 "`benchmarks/static_cost.py`.")
    try:
        import triton
        lines.append(f"triton {triton.__version__}, ptxas/nvdisasm bundled with it.")
    except Exception:
        pass
    lines.append(f"fp32 MHGA dots: fp32_precision = {os.environ.get('GTPT_KERNELS_FP32_PRECISION', 'ieee')} "
                 "(the op's default unless GTPT_KERNELS_FP32_PRECISION is set).")
    lines += ["", "## Assumptions", ""] + [f"- {s}" for s in ASSUMPTIONS]
    failed = [n for n, m in results.items() if not m["ok"]]
    if failed:
        lines += ["", "## Compile failures", ""] + [f"- `{n}`: {results[n]['error'].splitlines()[0][:200]}"
                                                    for n in failed]
    # headline: B=largest, bf16
    lines += ["", "## Headline: estimate / H100 floor per shape", ""]
    for d in dtypes:
        for b in sorted(batches, reverse=True)[:1]:
            lines += [f"### B = {b}, {d}", "",
                      "| variant | shape | fwd est/floor us | fwd ratio | bwd (dq+dkdv) est/floor us | bwd ratio | "
                      "regs fwd/dq/dkdv | spills (B) |", "|---|---|---|---|---|---|---|---|"]
            for v in variants:
                rs = [r for r in ok if r["variant"] == v and r["batch"] == b and r["dtype"] == d]
                shapes = []
                for r in rs:
                    if r["shape"] not in shapes:
                        shapes.append(r["shape"])
                for s in shapes:
                    sr = [r for r in rs if r["shape"] == s]
                    if sr[0]["op"] == "prune":
                        for r in sr:
                            lines.append(f"| {v} | {s} (prune) | {_fmt(r['estimate_us'])} / {_fmt(r['floor_us_h100'])} "
                                         f"| **{_fmt(r['ratio'], 2)}** | - | - | {r['registers']} | {r['spill_bytes']} |")
                        continue
                    fwd = [r for r in sr if r["direction"] == "fwd"]
                    bwd = [r for r in sr if r["direction"] == "bwd"]
                    fe, ff = sum(r["estimate_us"] for r in fwd), sum(r["floor_us_h100"] for r in fwd)
                    be, bf = sum(r["estimate_us"] for r in bwd), sum(r["floor_us_h100"] for r in bwd)
                    regs = "/".join(str(r["registers"]) for r in fwd + bwd)
                    spills = "/".join(str(r["spill_bytes"]) for r in fwd + bwd)
                    lines.append(f"| {v} | {s} | {_fmt(fe)} / {_fmt(ff)} | **{_fmt(fe / ff if ff else None, 2)}** | "
                                 f"{_fmt(be) if bwd else '-'} / {_fmt(bf) if bwd else '-'} | "
                                 f"**{_fmt(be / bf, 2) if bf else '-'}** | {regs} | {spills} |")
            lines.append("")
    lines += ["(per-launch figures; a shape's forward runs once per layer that has it, see `launches_per_*` in "
              "the json. bwd ratio = (dq + dkdv estimates) / (their floors).)", ""]
    # the two figures beside the estimate: rare-marked branches taken every time, and the tensor pipe
    big = sorted(batches, reverse=True)[:1]
    cav = [r for r in ok if r["op"] == "mhga" and r["batch"] in big and r["dtype"] == (dtypes[0] if dtypes else "")]
    if cav:
        lines += [f"## Beside the estimate: worst case of the rare branches, tensor pipe (B = {big[0]}, {dtypes[0]})",
                  "", "`ratio if rare taken`: the launch with its `# static-cost: rare` branches (the forward's lazy "
                  "rescaling) counted taken on every execution. `tensor us`: HMMA multiply-adds at the assumed "
                  "mma.sync rate (see Assumptions), not part of the estimate.", "",
                  "| variant | shape | kernel | est us | ratio | ratio if rare taken | tensor us |",
                  "|---|---|---|---|---|---|---|"]
        for r in cav:
            lines.append(f"| {r['variant']} | {r['shape']} | {r['kernel']} | {_fmt(r['estimate_us'])} | "
                         f"{_fmt(r['ratio'], 2)} | {_fmt(r.get('ratio_if_rare_taken'), 2) if 'ratio_if_rare_taken' in r else '-'} | "
                         f"{_fmt(r.get('tensor_us'))} |")
        lines.append("")
    # totals per model call: sum of estimates x launches
    lines += ["## Totals per model call (sum over launches of estimate x count; kernels of these ops only)", "",
              "| variant | B | dtype | eval forward: est / floor us (ratio) | train step: est / floor us (ratio) |",
              "|---|---|---|---|---|"]
    combos = []
    for r in ok:
        c = (r["variant"], r["batch"], r["dtype"])
        if c not in combos:
            combos.append(c)
    for c in combos:
        rs = [r for r in ok if (r["variant"], r["batch"], r["dtype"]) == c]
        cells = []
        for key in ("launches_per_eval_forward", "launches_per_train_step"):
            e = sum(r["estimate_us"] * r[key] for r in rs)
            fl = sum(r["floor_us_h100"] * r[key] for r in rs)
            cells.append(f"{e:.0f} / {fl:.0f} ({e / fl:.2f})" if fl else "-")
        lines.append(f"| {c[0]} | {c[1]} | {c[2]} | {cells[0]} | {cells[1]} |")
    lines.append("")
    targets = check_targets(ok)
    if any(r["batch"] == TARGETS["batch"] and r["dtype"] == TARGETS["dtype"] for r in ok):
        lines += [f"## Issue 12 targets at B = {TARGETS['batch']} {TARGETS['dtype']} (estimates)", "",
                  "| what | value | limit | met |", "|---|---|---|---|"]
        lines += [f"| {w} | {v} | {lim} | {'yes' if good else '**no**'} |" for w, v, lim, good in targets]
        lines.append("")
    if baseline is not None:
        rows = compare_runs(ok, baseline)
        lines += [f"## Against the baseline `{baseline_name}` (estimate / H100 floor, per shape and direction)", "",
                  "| variant | B | dtype | op | shape | dir | ratio before | ratio now | est before us | est now us |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for v, b, d, op, shape, direction, rb, ra, eb, ea in rows:
            lines.append(f"| {v} | {b} | {d} | {op} | {shape} | {direction} | {_fmt(rb, 2)} | **{_fmt(ra, 2)}** | "
                         f"{_fmt(eb)} | {_fmt(ea)} |")
        lines.append("")
    # configs
    lines += ["## Compiled configs", "",
              "| config | regs | spill B | smem B | warps | blocks/SM (limit) | SASS instr | mma / fma | hot loop "
              "instr (mma/fma) | global memory ops (whole kernel) |", "|---|---|---|---|---|---|---|---|---|---|"]
    seen = set()
    for r in ok:
        if r["config"] in seen:
            continue
        seen.add(r["config"])
        hot = r["hot_loop"]
        hot_s = f"{hot['exclusive']} ({hot['mma']}/{hot['fma']})" if hot else "-"
        lines.append(f"| [{r['config']}]({r['sass']}) | {r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | "
                     f"{r['num_warps']} | {r['blocks_per_sm']} ({r['occupancy_limiter']}) | {r['kernel_instructions']} | "
                     f"{r['mma_instructions']} / {r['fma_instructions']} | {hot_s} | {_mem_summary(r['global_memory_ops'])} |")
    # all launches
    lines += ["", "## Every launch", "",
              "| variant | B | dtype | op | kernel | shape | per eval fwd / train step | grid | programs | waves | "
              "loop instr x trips/program | warp-instr (M) | MB | floor H100/H200 us | issue us | MUFU us | est us | "
              "ratio | bound |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in ok:
        loops = "; ".join(f"{lp['exclusive']}x{_fmt(lp['per_program'], 2)}" for lp in r["loops"]) or "-"
        lines.append(
            f"| {r['variant']} | {r['batch']} | {r['dtype']} | {r['op']} | {r['kernel']} | {r['shape']} | "
            f"{r['launches_per_eval_forward']} / {r['launches_per_train_step']} | {'x'.join(map(str, r['grid']))} | "
            f"{r['programs']} | {_fmt(r['waves'], 2)} | {loops} | {r['executed_warp_instructions'] / 1e6:.1f} | "
            f"{r['bytes'] / 1e6:.2f} | {_fmt(r['floor_us_h100'])} / {_fmt(r['floor_us_h200'])} | {_fmt(r['issue_us'])} | "
            f"{_fmt(r.get('mufu_us'))} | {_fmt(r['estimate_us'])} | {_fmt(r['ratio'], 2)} | {r['bound']} |")
    flags = sorted({f"`{r['config']}`: {fl}" for r in ok for fl in r["flags"]})
    if flags:
        lines += ["", "## Flags (approximations in the trip counts)", ""] + [f"- {f}" for f in flags]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
