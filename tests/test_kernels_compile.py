"""Ahead-of-time compile of every ``@triton.jit`` kernel for an H100 (sm_90), without a GPU.

The kernel tests run in the Triton interpreter on machines without a GPU, which never sees the compiled path:
type errors the frontend rejects, unsupported ops, constexpr mistakes, shared-memory or register blowups. This
module compiles the MHGA forward/backward kernels (:mod:`gtpt_kernels.ops.group_attention`) and the fused
scoring/top-k/gather kernel (:mod:`gtpt_kernels.ops.token_prune`) for an H100 (sm_90) through ``ptxas`` to a
cubin, for the configurations GTPT launches.

Faithfulness: the signature, constexprs, divisibility attributes and launch options are not written by hand.
The real launchers (``_fwd_impl``/``_bwd_impl`` and the token-prune ``_launch``) are called on ``meta``-device
tensors shaped and strided as the GTPT model passes them (views of the packed ``qkv``, expanded position
embeddings, ...), with the kernel launch intercepted; the intercepted arguments then go to the kernel's
``warmup``, which runs Triton's own binder, specialisation and option parsing, exactly as a GPU launch would, and
compiles without launching (a stand-in driver reports an sm_90 target). So block sizes, ``num_warps``/
``num_stages``, stride-1 specialisation and 16-byte divisibility all come from the launch code. ``warmup`` is
public on every supported triton, so this test runs on 3.2 through the current release.

``TRITON_INTERPRET=1`` (set by conftest) makes ``@triton.jit`` return interpreter objects that cannot be
compiled, so the compiles run in two worker subprocesses (this file run as a script, ``TRITON_INTERPRET``
unset), one per core, which write their results to JSON. Compiles land in Triton's usual cache, so a rerun with
unchanged kernels costs only the process start-up.

Checks per config: it compiles (any frontend/LLVM/ptxas error fails the test with the error), the kernel's
shared memory fits one H100 block (227 KB opt-in), and local memory (register spills) stays under MAX_SPILL_BYTES.
Registers, spills (local bytes per thread, from ``cuobjdump --dump-resource-usage``) and shared memory of every
config are printed by ``test_resource_report``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

H100_SMEM_PER_BLOCK = 227 * 1024  # opt-in maximum per block on sm_90 (228 KB per SM, 1 KB reserved)
# Spills: per-thread stack frame + local memory from the cubin (Triton kernels have no stack arrays or calls, so
# the stack frame is ptxas's spill area). Every config is held to MAX_SPILL_BYTES. History: the token-prune kernel's
# whole-row K tile spilled 0.5-9 KB at head dim 24 (it now scores in 64-column chunks), and 64-row fp32 MHGA tiles
# spilled 136-480 B at head dim 24 and 1.5 KB at 64 (fp32 now uses 32-row tiles); both measure 0-24 B now.
MAX_SPILL_BYTES = 256
WORKERS = 2
WORKER_TIMEOUT_S = 600

# ------------------------------------------------------------------------------------------------------------
# Configurations (pure data: collected without triton). GTPT: dim 128 (T) / 192 (S, B), 8 heads -> head dims
# 16 / 24; 32 / 64 cover other widths. Fine layers: G=3 groups, S=6 shared tokens, pad token on, sequences of
# 6 + 76 = 82 (after fine L3 pruning) and 6 + 256 = 262 (unpruned); coarse layers: plain attention (G=1, S=0,
# pad off) on up to 1 + 256 tokens (262 picks the same tiles as 257).
# ------------------------------------------------------------------------------------------------------------

MHGA_DTYPES = ("float32", "float16", "bfloat16")
MHGA_HEAD_DIMS = (16, 24, 32, 64)
# (N, G, S, pad_token)
MHGA_SHAPES = ((82, 3, 6, True), (262, 3, 6, True), (262, 1, 0, False))
MHGA_KERNELS = ("_mhga_fwd_kernel", "_mhga_bwd_dq_kernel", "_mhga_bwd_dkdv_kernel")


def _mhga_configs():
    out = []
    for dtype in MHGA_DTYPES:
        for D in MHGA_HEAD_DIMS:
            shapes = list(MHGA_SHAPES)
            if D == 32 and dtype != "float16":
                # D=32 has the same tiles as D=24 (BLOCK_D=32) without the head-dim mask: one dtype suffices.
                continue
            if D in (32, 64):
                # Not a GTPT width: the short fine sequence (pad on) and the long coarse one (pad off) cover the
                # block choices (tiles depend on N, L, D and dtype only; 262 pad-on has the tiles of 262 pad-off).
                shapes = [(82, 3, 6, True), (262, 1, 0, False)]
            for N, G, S, pad in shapes:
                precs = ("ieee", "tf32") if dtype == "float32" and D == 24 and N == 82 else ("ieee",)
                for prec in precs:
                    cid = f"mhga-{dtype}-D{D}-N{N}-G{G}S{S}-{'pad' if pad else 'nopad'}" + (
                        "" if prec == "ieee" else f"-{prec}")
                    out.append(dict(id=cid, op="mhga", dtype=dtype, D=D, N=N, G=G, S=S, pad=pad, prec=prec))
    return out


# Token-prune sites of the GTPT model (gtpt/model.py): (site, R query rows, N candidates, keep, mask, gate).
PRUNE_SITES = (
    ("coarseL3", 1, 256, 179, False, False),        # human token ranks the 256 visual tokens, keep 0.7
    ("fine-entry", 6, 179, 76, True, True),        # COCO: 6 sparse rows per group (pad row masked), gated
    ("fine-entry-wb", 8, 179, 122, True, True),    # WholeBody: part + body rows padded to 8, keep 128 - 6
    ("fineL3", 6, 76, 25, True, False),            # COCO fine L3: keep 0.1
    ("fineL3-wb", 74, 122, 70, True, False),       # WholeBody fine L3, one call: rows 74/48/12, col mask, keep 70
)
PRUNE_DTYPES = ("float32", "bfloat16")
PRUNE_DIMS = (128, 192)  # model dim C (head dim C / 8 = 16 / 24)


def _prune_configs():
    out = []
    for dtype in PRUNE_DTYPES:
        for C in PRUNE_DIMS:
            for site, R, N, keep, mask, gate in PRUNE_SITES:
                out.append(dict(id=f"prune-{site}-{dtype}-C{C}", op="prune", site=site, dtype=dtype, C=C, R=R, N=N,
                                keep=keep, mask=mask, gate=gate, select=True))
        # The scores-only op (softmax_pool_scores): same kernel, selection compiled out.
        for C in PRUNE_DIMS:
            out.append(dict(id=f"scores-fineL3-{dtype}-C{C}", op="prune", site="fineL3", dtype=dtype, C=C, R=6, N=76,
                            keep=25, mask=True, gate=False, select=False))
    # Column-split launches (few (batch, group) programs, e.g. B = 32): the sliced scoring launch and the
    # selection kernel (_prune_select_kernel), at GTPT-S width.
    for dtype in PRUNE_DTYPES:
        for site, R, N, keep, mask, gate in PRUNE_SITES:
            out.append(dict(id=f"prune-split-{site}-{dtype}-C192", op="prune", site=site, dtype=dtype, C=192, R=R,
                            N=N, keep=keep, mask=mask, gate=gate, select=True, split=True))
    return out


CONFIGS = _mhga_configs() + _prune_configs()
# Each MHGA config is three kernels (forward, dq, dk/dv); results are keyed by "<config id>/<kernel>".
MHGA_KEYS = [f"{c['id']}/{k}" for c in CONFIGS if c["op"] == "mhga" for k in MHGA_KERNELS]
PRUNE_SPLIT_KERNELS = ("_prune_kernel", "_prune_select_kernel")
PRUNE_KEYS = [f"{c['id']}/{k}" for c in CONFIGS if c["op"] == "prune"
              for k in (PRUNE_SPLIT_KERNELS if c.get("split") else ("_prune_kernel",))]


# ------------------------------------------------------------------------------------------------------------
# Worker (runs in a subprocess without TRITON_INTERPRET)
# ------------------------------------------------------------------------------------------------------------

def _unavailable_reason():
    """Why AOT compilation for sm_90 cannot run here (None if it can)."""
    if sys.platform not in ("linux", "win32"):
        return f"no CUDA toolchain for platform {sys.platform}"
    try:
        import triton  # noqa: F401
        from triton.backends import backends
    except Exception as e:  # pragma: no cover
        return f"triton unavailable: {e}"
    if "nvidia" not in backends:
        return "triton was built without the NVIDIA backend"
    path = _nvidia_tool("ptxas")
    if not path or not os.path.exists(path):
        return "no ptxas for sm_90 in this triton install"
    return None


def _nvidia_tool(name):
    """Path of a CUDA binary that ships with triton (ptxas, cuobjdump), across triton 3.2 .. current."""
    try:
        from triton import knobs  # triton >= 3.4
        return getattr(knobs.nvidia, name).path
    except Exception:
        pass
    try:
        from triton.backends.nvidia.compiler import _path_to_binary  # triton 3.2 / 3.3
        return _path_to_binary(name)[0]
    except Exception:
        return None


def _resource_usage(cubin: bytes, name: str):
    """(registers, local bytes, stack bytes, static shared bytes) per thread from the cubin, or None."""
    import re
    import tempfile
    tool = _nvidia_tool("cuobjdump")
    if not tool or not os.path.exists(tool):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, timeout=60).stdout
    finally:
        os.remove(path)
    m = re.search(r"Function " + re.escape(name) + r":\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    if not m:
        return None
    reg, stack, shared, local = map(int, m.groups())
    return dict(regs=reg, stack=stack, static_smem=shared, local=local)


class _FakePtr:
    """A tensor argument as the JIT binder sees it: its dtype and an address with the alignment a real launch
    would have (allocations are 256-byte aligned; views such as k inside the packed qkv add their offset)."""

    def __init__(self, t):
        self.dtype = t.dtype
        self._ptr = (1 << 20) + t.storage_offset() * t.element_size()

    def data_ptr(self):
        return self._ptr


class _Sm90Driver:
    """Stands in for the CUDA driver so that ``JITFunction.warmup`` compiles for an H100 on a machine without one.

    ``warmup`` runs the same binder, specialisation and option parsing as a launch, then stops before loading the
    cubin; it only asks the driver for the current device, stream and target. This is public API on every
    supported triton (3.2 .. current), unlike the binder internals, which change between releases."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget
        return GPUTarget("cuda", 90, 32)

    def is_active(self):
        return True

    def get_benchmarker(self):  # looked up at import by some triton / torch versions, never called here
        def benchmark(*args, **kwargs):
            raise RuntimeError("no GPU: the sm_90 stand-in driver cannot run kernels")
        return benchmark


def _use_sm90_driver():
    from triton.runtime import driver
    driver.set_active(_Sm90Driver())


def _compile_launch(kernel, args, kwargs):
    """Compile ``kernel`` for sm_90 exactly as ``kernel[grid](*args, **kwargs)`` would on that GPU.
    Returns the compiled kernel and the constexpr launch arguments (for the report)."""
    import torch
    args = [_FakePtr(a) if isinstance(a, torch.Tensor) else a for a in args]
    compiled = kernel.warmup(*args, grid=(1,), **kwargs)
    return compiled, {k: v for k, v in kwargs.items() if k.isupper()}


def _mhga_launches(cfg, ga):
    """(kernel, args, kwargs) of the forward and both backward launches, from the real launchers."""
    import torch
    dtype = getattr(torch, cfg["dtype"])
    B, G, N, S, D, H = 2, cfg["G"], cfg["N"], cfg["S"], cfg["D"], 8
    C = H * D
    launches = []
    saved = ga._launch
    ga._launch = lambda kernel, grid, *a, **m: launches.append((kernel, a, m))
    try:
        qkv = torch.empty(B, G, N, 3 * C, dtype=dtype, device="meta")
        out, lse = ga._fwd_impl(qkv, H, S, C ** -0.5, cfg["pad"], cfg["prec"])
        ga._bwd_impl(torch.empty_like(out), qkv, out, lse, H, S, C ** -0.5, cfg["pad"], cfg["prec"])
    finally:
        ga._launch = saved
    return launches


class _Capture:
    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *a, **m: self.calls.append((a, m))


def _prune_launch(cfg, tp):
    """(args, kwargs) of the token-prune launch at a GTPT site, tensors built as gtpt/model.py builds them."""
    import torch
    from gtpt_kernels.reference import split_qkv
    dtype = getattr(torch, cfg["dtype"])
    B, H, C, R, N, keep = 2, 8, cfg["C"], cfg["R"], cfg["N"], cfg["keep"]
    D = C // H
    meta = dict(dtype=dtype, device="meta")
    pos_emb = torch.empty(1, 256, C, **meta)  # the sine PE parameter, expanded over the batch
    col_mask = None
    if cfg["site"] == "coarseL3":  # coarse layer 3: [human | 256 visual], G=1
        qkv = torch.empty(B, 1, 1 + N, 3 * C, **meta)
        q, k, _ = split_qkv(qkv, H)
        x = torch.empty(B, 1 + N, C, **meta)
        q, k, tokens, pos = q[:, :, :, :1], k[:, :, :, 1:], x[:, None, 1:], pos_emb.expand(B, -1, -1)[:, None, :N]
        gate = row_mask = None
    elif cfg["site"].startswith("fine-entry"):  # last coarse layer: [sparse (17 or 22) | 179 visual]
        G, K = 3, 17 if R == 6 else 22
        qkv = torch.empty(B, 1, K + N, 3 * C, **meta)
        q_all, k_all, _ = split_qkv(qkv, H)
        if R == 6:
            q = torch.cat([q_all.new_zeros(B, 1, H, 1, D), q_all[:, :, :, :K]], dim=3).view(B, H, G, 6, D)
            q = q.transpose(1, 2)
        else:
            index = torch.zeros(G * R, dtype=torch.long, device="meta")
            q = q_all[:, 0].index_select(2, index).view(B, H, G, -1, D).transpose(1, 2)
        k = k_all[:, :, :, K:]
        x = torch.empty(B, K + N, C, **meta)
        tokens, pos = x[:, None, K:], pos_emb.expand(B, -1, -1)[:, None, :N]
        gate = torch.empty(B, N, G * C, **meta).view(B, N, G, C).transpose(1, 2)
        row_mask = torch.ones(G, R, dtype=torch.bool, device="meta")
    elif cfg["site"] == "fineL3-wb":  # WholeBody fine L3: (B, 3, 6 + 128, C), candidates from token 12
        G, first = 3, 12
        qkv = torch.empty(B, G, first + N, 3 * C, **meta)
        q_all, k_all, _ = split_qkv(qkv, H)
        q, k = q_all[:, :, :, :R], k_all[:, :, :, first:]
        x = torch.empty(B, G, first + N, C, **meta)
        tokens, pos = x[:, :, first:], torch.empty(B, G, 128, C, **meta)[:, :, first - 6:]
        gate = None
        row_mask = torch.ones(G, R, dtype=torch.bool, device="meta")
        col_mask = torch.ones(G, 256 + R, dtype=torch.bool, device="meta")[:, :N]
    else:  # fine L3 (COCO): (B, 3, 6 + 76, C)
        G, S = 3, 6
        qkv = torch.empty(B, G, S + N, 3 * C, **meta)
        q_all, k_all, _ = split_qkv(qkv, H)
        q, k = q_all[:, :, :, :S], k_all[:, :, :, S:]
        x = torch.empty(B, G, S + N, C, **meta)
        tokens, pos = x[:, :, S:], torch.empty(B, G, N, C, **meta)
        gate = None
        row_mask = torch.ones(G, S, dtype=torch.bool, device="meta")
    if not cfg["gate"]:
        gate = None
    if not cfg["mask"]:
        row_mask = None
    capture = _Capture()
    saved = tp._prune_kernel, tp._OPAQUE
    tp._prune_kernel, tp._OPAQUE = capture, True
    try:
        scores = q.new_empty((B, q.shape[1], N), dtype=torch.float32)
        if cfg["select"]:
            out, out_pos, index = tp._prune_alloc(q, tokens, pos, gate, keep)
            # The model passes the channel-mask logits (sigmoid fused) wherever it gates.
            tp._launch(q, k, row_mask, C ** -0.5, scores, col_mask=col_mask, tokens=tokens, pos=pos, gate=gate,
                       out=out, out_pos=out_pos, index=index, gate_sigmoid=gate is not None)
        else:
            tp._launch(q, k, row_mask, C ** -0.5, scores, col_mask=col_mask)
    finally:
        tp._prune_kernel, tp._OPAQUE = saved
    (call,) = capture.calls
    return call


def _prune_split_launches(cfg, tp):
    """[(kernel, args, kwargs)] of a column-split prune site: :func:`_prune_launch` with the launcher planning for
    132 SMs (B = 2 gives few programs, so the columns split) and the selection kernel captured too."""
    calls = []

    class SelectCapture:
        def __getitem__(self, grid):
            return lambda *a, **m: calls.append((tp._prune_select_kernel_real, a, m))

    saved = tp._SPLIT_SM_COUNT, tp._prune_select_kernel
    tp._prune_select_kernel_real = tp._prune_select_kernel
    tp._SPLIT_SM_COUNT, tp._prune_select_kernel = 132, SelectCapture()
    try:
        a, m = _prune_launch(cfg, tp)
    finally:
        tp._SPLIT_SM_COUNT, tp._prune_select_kernel = saved
        del tp._prune_select_kernel_real
    assert m["NSPLIT"] > 1 and not m["SELECT"], "the launcher did not split the columns"
    return [(tp._prune_kernel, a, m)] + calls


def _record(results, key, fn):
    t0 = time.perf_counter()
    try:
        compiled, consts = fn()
    except Exception as e:  # any compile error is the finding
        msg = f"{type(e).__name__}: {e}"
        results[key] = dict(ok=False, error=msg[:6000], compile_s=time.perf_counter() - t0)
        return
    res = dict(ok=True, compile_s=time.perf_counter() - t0, shared=int(compiled.metadata.shared),
               num_warps=int(compiled.metadata.num_warps), num_stages=int(compiled.metadata.num_stages),
               consts=consts)
    usage = _resource_usage(compiled.asm["cubin"], compiled.metadata.name)
    if usage:
        res.update(usage)
    results[key] = res


def _worker(config_ids, out_path):
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the current default, without its warning
    sys.path.insert(0, REPO)
    reason = _unavailable_reason()
    if reason is not None:
        with open(out_path, "w") as f:
            json.dump({"__skip__": reason}, f)
        return
    import warnings
    warnings.filterwarnings("ignore")
    _use_sm90_driver()
    import gtpt_kernels.ops.group_attention as ga
    import gtpt_kernels.ops.token_prune as tp
    by_id = {c["id"]: c for c in CONFIGS}
    results = {}
    for cid in config_ids:
        cfg = by_id[cid]
        if cfg["op"] == "mhga":
            try:
                launches = _mhga_launches(cfg, ga)
            except Exception as e:
                for name in MHGA_KERNELS:
                    results[f"{cid}/{name}"] = dict(ok=False, error=f"launcher failed: {type(e).__name__}: {e}")
                continue
            for kernel, a, m in launches:
                _record(results, f"{cid}/{kernel.__name__}",
                        lambda: _compile_launch(kernel, a, m))
        elif cfg.get("split"):
            try:
                launches = _prune_split_launches(cfg, tp)
            except Exception as e:
                for name in PRUNE_SPLIT_KERNELS:
                    results[f"{cid}/{name}"] = dict(ok=False, error=f"launcher failed: {type(e).__name__}: {e}")
                continue
            for kernel, a, m in launches:
                _record(results, f"{cid}/{kernel.__name__}", lambda: _compile_launch(kernel, a, m))
        else:
            try:
                a, m = _prune_launch(cfg, tp)
            except Exception as e:
                results[f"{cid}/_prune_kernel"] = dict(ok=False, error=f"launcher failed: {type(e).__name__}: {e}")
                continue
            _record(results, f"{cid}/_prune_kernel",
                    lambda: _compile_launch(tp._prune_kernel, a, m))
    with open(out_path, "w") as f:
        json.dump(results, f)


def _mutant_worker(out_path):
    """Negative control: compile copies of both modules' first kernels with a pointer + float type error
    injected (the repo files are untouched). Writes {"<kernel>": "<error>" or null if it compiled}."""
    import importlib.util
    import re
    import tempfile
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    sys.path.insert(0, REPO)
    import warnings
    warnings.filterwarnings("ignore")
    _use_sm90_driver()
    import gtpt_kernels.ops.group_attention as ga
    import gtpt_kernels.ops.token_prune as tp
    cfg = next(c for c in CONFIGS if c["op"] == "mhga" and c["dtype"] == "float16")
    cases = [(ga, "_mhga_fwd_kernel", "# Launchers", _mhga_launches(cfg, ga)[0]),
             (tp, "_prune_kernel", "def _next_pow2", (tp._prune_kernel,) + _prune_launch(PRUNE_CFG, tp))]
    out = {}
    tmp = tempfile.mkdtemp()
    for i, (mod, name, cut, (kernel, a, m)) in enumerate(cases):
        src = open(mod.__file__).read()
        src = src[:src.index(cut)]  # kernels only: no op registration in the copy
        first_arg = kernel.arg_names[0]
        # Inject `_kc_bad = <first pointer arg> + 0.5` as the kernel's first statement.
        match = re.search(r"def " + name + r"\(.*?\):\n", src, flags=re.S)
        body = src[match.end():]
        indent = re.match(r"\s*", body).group(0).split("\n")[-1]
        src = src[:match.end()] + f"{indent}_kc_bad = {first_arg} + 0.5\n" + body
        path = os.path.join(tmp, f"_kc_mutant_{i}.py")
        with open(path, "w") as f:
            f.write(src)
        spec = importlib.util.spec_from_file_location(f"gtpt_kernels.ops._kc_mutant_{i}", path)
        mutant = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mutant)
        try:
            _compile_launch(getattr(mutant, name), a, m)
            out[name] = None
        except Exception as e:
            out[name] = f"{type(e).__name__}: {e}"[:2000]
    with open(out_path, "w") as f:
        json.dump(out, f)


PRUNE_CFG = next(c for c in CONFIGS if c["op"] == "prune" and c["site"] == "fine-entry" and c["dtype"] == "bfloat16")


# ------------------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------------------

def _worker_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _skip_if_unavailable():
    reason = _unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def compile_results(tmp_path_factory):
    _skip_if_unavailable()
    tmp = tmp_path_factory.mktemp("aot")
    # Balance the workers by rough cold-compile cost (seconds on one core): longest first, to the least loaded.
    parts, load = [[] for _ in range(WORKERS)], [0.0] * WORKERS
    for c in sorted(CONFIGS, key=_cost, reverse=True):
        i = load.index(min(load))
        parts[i].append(c["id"])
        load[i] += _cost(c)
    procs = []
    t0 = time.perf_counter()
    # The negative control runs beside the workers (it is mostly interpreter start-up).
    mutant_out = tmp / "mutant.json"
    mutant = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--mutant", str(mutant_out)],
                              env=_worker_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for i, part in enumerate(parts):
        out = tmp / f"results{i}.json"
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", str(out), json.dumps(part)]
        procs.append((subprocess.Popen(cmd, env=_worker_env(), cwd=REPO, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True), out))
    results = {}
    for proc, out in procs:
        try:
            log, _ = proc.communicate(timeout=WORKER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            log, _ = proc.communicate()
        if proc.returncode != 0 or not out.exists():
            pytest.fail(f"compile worker failed (rc={proc.returncode}):\n{log[-6000:]}")
        part = json.loads(out.read_text())
        if "__skip__" in part:
            pytest.skip(part["__skip__"])
        results.update(part)
    results["__wall_s__"] = time.perf_counter() - t0
    log, _ = mutant.communicate(timeout=WORKER_TIMEOUT_S)
    results["__mutant__"] = (json.loads(mutant_out.read_text()) if mutant.returncode == 0 and mutant_out.exists()
                             else {"__error__": f"rc={mutant.returncode}\n{log[-6000:]}"})
    return results


def _cost(c):
    if c["op"] == "mhga":
        return 2.0
    return 1.2 if c["C"] == 128 else 2.5


def _check(results, key):
    res = results.get(key)
    assert res is not None, f"{key}: no result from the compile worker"
    assert res["ok"], f"{key} failed to compile for sm_90:\n{res['error']}"
    smem = res["shared"] + res.get("static_smem", 0)
    assert smem <= H100_SMEM_PER_BLOCK, f"{key}: {smem} bytes of shared memory > {H100_SMEM_PER_BLOCK} (H100 block)"
    if "local" in res:
        spill = res["local"] + res["stack"]
        assert spill <= MAX_SPILL_BYTES, (
            f"{key}: {spill} bytes of stack/local memory per thread (register spills), regs={res['regs']}")


@pytest.mark.parametrize("key", MHGA_KEYS)
def test_mhga_compiles_sm90(compile_results, key):
    _check(compile_results, key)


@pytest.mark.parametrize("key", PRUNE_KEYS)
def test_token_prune_compiles_sm90(compile_results, key):
    _check(compile_results, key)


def test_resource_report(compile_results, capsys):
    """Registers / spills / shared memory of every compiled config (printed even under -q)."""
    lines = [f"\nsm_90 AOT compile: {sum(not k.startswith('__') for k in compile_results)} kernels in {compile_results['__wall_s__']:.1f} s "
             f"({WORKERS} workers)",
             f"{'config/kernel':<66} {'warps':>5} {'stg':>3} {'regs':>4} {'spill(B)':>8} {'smem(B)':>8}  blocks",
             "(spill: per-thread stack frame + local memory; smem: dynamic + static bytes per block)"]
    for key, res in compile_results.items():
        if key.startswith("__"):
            continue
        if not res["ok"]:
            lines.append(f"{key:<66} FAILED: {res['error'].splitlines()[0][:120]}")
            continue
        blocks = " ".join(f"{k}={v}" for k, v in res["consts"].items() if k.startswith("BLOCK") or k == "R")
        lines.append(f"{key:<66} {res['num_warps']:>5} {res['num_stages']:>3} {res.get('regs', '?'):>4} "
                     f"{res['local'] + res['stack'] if 'local' in res else '?':>8} "
                     f"{res['shared'] + res.get('static_smem', 0):>8}  {blocks}")
    with capsys.disabled():
        print("\n".join(lines))
    assert all(r["ok"] for k, r in compile_results.items() if not k.startswith("__"))


def test_compile_catches_type_error(compile_results):
    """Negative control: the same compile path rejects a kernel copy with a type error (pointer + float)."""
    res = compile_results["__mutant__"]
    assert "__error__" not in res, res.get("__error__")
    assert set(res) == {"_mhga_fwd_kernel", "_prune_kernel"}
    for name, err in res.items():
        assert err is not None, f"the mutated copy of {name} compiled: this test cannot detect type errors"


if __name__ == "__main__":
    if sys.argv[1] == "--worker":
        _worker(json.loads(sys.argv[3]), sys.argv[2])
    elif sys.argv[1] == "--mutant":
        _mutant_worker(sys.argv[2])
