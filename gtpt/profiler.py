"""Latency and memory profiler for GTPT: end to end and per stage, across backends, batch sizes, dtypes and modes.

Backends:

* ``reference`` - eager PyTorch, attention and pruning on the pure-PyTorch reference ops;
* ``triton`` - eager, attention and pruning on the fused Triton kernels (CUDA only: on CPU they would run in the
  Triton interpreter, whose timings mean nothing);
* ``compile`` - ``torch.compile`` of the reference model (default mode);
* ``compile-reduce-overhead`` - ``torch.compile(mode="reduce-overhead")`` of the reference model (Inductor plus
  its own CUDA graphs; CUDA only);
* ``compile-triton`` / ``compile-triton-reduce-overhead`` - the same two compiles of the model on the Triton
  kernels: attention and pruning stay our kernels (custom ops are opaque to Inductor), Inductor fuses the norms,
  activations, residual and position-embedding adds around them (CUDA only);
* ``cudagraph`` / ``cudagraph-reference`` - replay of a ``torch.cuda.CUDAGraph`` captured from the triton /
  reference model (CUDA only, inference only).

Timing: on CUDA, one pair of CUDA events per iteration after warm-up; on CPU, ``time.perf_counter``. Results
are the median and the 20th / 80th percentiles. Per-stage times come from separate iterations with markers at
the stage boundaries (forward hooks), so the markers never perturb the end-to-end numbers; they are taken for the
eager backends in inference. Stages: stem, patch embedding, coarse encoder (with its pruning), fine entry
(``channel_mask``: channel mask, grouping, entry pruning), fine encoder (with its pruning), heads.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` from the model build through warm-up (CUDA-graph capture
included) and the timed iterations (absolute, weights included).
On CPU there is no allocator high-water mark to read, so the peak is reported as unavailable (``None``) rather
than guessed.

Op breakdown (``op_breakdown=True``): where the time of one step goes, from ``torch.profiler`` over a few extra
iterations - on CUDA the device time of every kernel (grouped by kernel name), on CPU the self time of every
operator - summed into categories (fused attention / pruning kernels, GEMM, normalisation, elementwise, ...; see
:func:`op_category`) plus the top entries by name. It is what decides which further fusions would pay.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import signal
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Sequence, TextIO, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fast_inference
from .checkpoint import atomic_write
from .config import get_config
from .flops import FLOP_STAGES, PathRunner, stage_scopes

BACKENDS = ("reference", "triton", "compile", "compile-reduce-overhead", "compile-triton",
            "compile-triton-reduce-overhead", "cudagraph", "cudagraph-reference")
# torch.compile mode per compile backend (None: the default mode)
_COMPILE_MODES = {"compile": None, "compile-reduce-overhead": "reduce-overhead", "compile-triton": None,
                  "compile-triton-reduce-overhead": "reduce-overhead"}
# backends whose model runs on the Triton kernels
_ON_TRITON = ("triton", "cudagraph", "compile-triton", "compile-triton-reduce-overhead")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("inference", "train")
PATHS = ("pruned", "unpruned")


@dataclass
class LatencyResult:
    """One measured configuration. ``status`` is ``"ok"``, ``"skipped"`` (with the reason in ``note``) or
    ``"error"``. Times in milliseconds per forward (inference) or per forward+backward (train)."""
    variant: str
    backend: str
    batch_size: int
    dtype: str
    mode: str
    path: str
    device: str
    status: str = "ok"
    note: str = ""
    repeats: int = 0
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    images_per_s: Optional[float] = None
    per_stage_ms: Optional[Dict[str, float]] = None
    peak_memory_mb: Optional[float] = None
    op_breakdown: Optional[Dict[str, object]] = None  # see measure_op_breakdown()
    times_ms: Optional[List[float]] = None  # every timed iteration (interleaved with the other paths' of its config)

    @property
    def label(self) -> str:
        return f"{self.variant} {self.backend} {self.mode} {self.path} B={self.batch_size} {self.dtype}"


# ----------------------------------------------------------------------------------------------------------------
# environment

def environment_info(device: Optional[str] = None) -> Dict[str, object]:
    """Versions and hardware, recorded with every report and benchmark."""
    try:
        import triton  # noqa: F401 - version only
    except Exception:  # pragma: no cover - no triton on this platform
        pass
    info: Dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": getattr(sys.modules.get("triton"), "__version__", None),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
    }
    try:
        import fvcore  # noqa: F401
        info["fvcore"] = getattr(fvcore, "__version__", "installed")
    except ImportError:
        pass
    if torch.cuda.is_available():
        dev = torch.device(device) if device and device.startswith("cuda") else torch.device("cuda")
        info["gpu"] = torch.cuda.get_device_name(dev)
        info["cuda"] = torch.version.cuda
    try:
        import gtpt_kernels
        info["gtpt_kernels"] = gtpt_kernels.__version__
    except Exception:  # pragma: no cover
        pass
    return info


# ----------------------------------------------------------------------------------------------------------------
# timers

@contextlib.contextmanager
def interrupt_on_stop_signals() -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM raise KeyboardInterrupt, so a time-boxed run (``timeout``, a cluster's
    kill) ends its sweep or epoch and still writes its report or checkpoint; the previous handlers are restored
    afterwards. SIGINT needs setting too: a shell without job control starts background jobs with SIGINT ignored,
    and Python then leaves it ignored. Outside the main thread (where handlers cannot be set) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, signal.default_int_handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


class _Timer:
    """Wall time on CPU; CUDA events on GPU (no synchronisation inside the timed region)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed_ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# Adaptive repeats: on a shared machine a config whose p80/p20 spread is wider than this gets more timed rounds
# (up to SPREAD_MAX_FACTOR x the asked repeats), and the result says so in its note.
SPREAD_LIMIT = 1.25
SPREAD_MAX_FACTOR = 3
SPREAD_EXTRA_BUDGET_S = 30.0  # no extra rounds once a config's timed rounds have taken this long


def spread(times: Sequence[float]) -> float:
    """p80 / p20 of a list of timings (1.0 = perfectly steady)."""
    lo = _quantile(times, 0.2)
    return _quantile(times, 0.8) / lo if lo > 0 else float("inf")


def time_interleaved(steps: Dict[str, Callable[[], object]], timer: "_Timer", repeats: int,
                     adaptive: bool = True) -> Tuple[Dict[str, List[float]], str]:
    """Time each step ``repeats`` times in rounds (one call of every step per round, in order), so load from
    other processes hits every contender alike. With ``adaptive``, while some contender's p80/p20 spread exceeds
    :data:`SPREAD_LIMIT`, more rounds of ``repeats`` are added, up to ``SPREAD_MAX_FACTOR * repeats`` in all.
    Returns the times (ms) per step and a note ("" when the first rounds were steady)."""
    times: Dict[str, List[float]] = {k: [] for k in steps}

    def rounds(n: int) -> None:
        for _ in range(n):
            for k, step in steps.items():
                timer.sync()
                a = timer.mark()
                step()
                b = timer.mark()
                if timer.cuda:
                    b.synchronize()
                times[k].append(timer.elapsed_ms(a, b))
        timer.sync()

    t0 = time.perf_counter()
    rounds(repeats)
    if not adaptive or repeats < 3:
        return times, ""
    first = max(spread(v) for v in times.values())
    if first <= SPREAD_LIMIT:
        return times, ""
    capped = False
    while max(spread(v) for v in times.values()) > SPREAD_LIMIT and \
            len(next(iter(times.values()))) < SPREAD_MAX_FACTOR * repeats:
        if time.perf_counter() - t0 > SPREAD_EXTRA_BUDGET_S:
            capped = True
            break
        rounds(repeats)
    last = max(spread(v) for v in times.values())
    n = len(next(iter(times.values())))
    note = f"spread p80/p20 {first:.2f} after {repeats} repeats: timed {n}"
    if capped:
        note += f" (time cap {SPREAD_EXTRA_BUDGET_S:.0f} s)"
    if last > SPREAD_LIMIT:
        note += f", still {last:.2f} (noisy machine: treat as rough)"
    return times, note


@contextlib.contextmanager
def _stage_markers(model: nn.Module, runner: nn.Module, timer: _Timer) -> Iterable[List]:
    """Record a timer mark at every stage boundary of ``runner``'s forward. Yields the list the marks go to,
    as (boundary name, mark)."""
    marks: List = []
    handles = []

    def at(name):
        def hook(*_):
            marks.append((name, timer.mark()))
        return hook

    with stage_scopes(model) as scopes:
        try:
            pairs = [(runner, "start", "end"), (model.features.stem, None, "stem"),
                     (model.get_submodule(scopes["coarse"]), "coarse_start", "coarse"),
                     (model.get_submodule(scopes["fine_entry"]), None, "fine_entry"),
                     (model.get_submodule(scopes["fine"]), None, "fine")]
            for mod, pre, post in pairs:
                if pre:
                    handles.append(mod.register_forward_pre_hook(at(pre)))
                handles.append(mod.register_forward_hook(at(post)))
            # the fast eval path (gtpt.fast_inference) never calls the stem module: it marks its stem itself
            handles.append(fast_inference.register_stem_hook(model.features, at("stem")))
            yield marks
        finally:
            for h in handles:
                h.remove()


def _stages_from_marks(marks, timer: _Timer) -> Dict[str, float]:
    t = dict(marks)
    seq = [("stem", "start", "stem"), ("patch_embedding", "stem", "coarse_start"),
           ("coarse_encoder", "coarse_start", "coarse"), ("channel_mask", "coarse", "fine_entry"),
           ("fine_encoder", "fine_entry", "fine"), ("heads", "fine", "end")]
    return {stage: timer.elapsed_ms(t[a], t[b]) for stage, a, b in seq}


# ----------------------------------------------------------------------------------------------------------------
# one configuration

def _simcc_objective(out) -> Tensor:
    """A loss shaped like GTPT's: KL of each pass's SimCC distributions to a fixed soft target, plus the
    distillation KL of the pruned pass to the (detached) unpruned pass."""
    def kl(logits: Tensor, target_logits: Tensor) -> Tensor:
        return F.kl_div(F.log_softmax(logits.float(), -1), F.softmax(target_logits.float(), -1),
                        reduction="batchmean")

    tx = torch.zeros_like(out.pred_x)
    ty = torch.zeros_like(out.pred_y)
    loss = kl(out.pred_x, tx) + kl(out.pred_y, ty) + kl(out.entire_pred_x, tx) + kl(out.entire_pred_y, ty)
    return loss + kl(out.pred_x, out.entire_pred_x.detach()) + kl(out.pred_y, out.entire_pred_y.detach())


def _skip_reason(backend: str, mode: str, path: str, device: torch.device) -> Optional[str]:
    if backend in _ON_TRITON and device.type != "cuda":
        return "triton kernels need CUDA (on CPU they run in the Triton interpreter, too slow to time)"
    if backend == "compile-reduce-overhead" and device.type != "cuda":
        return "reduce-overhead compiles to CUDA graphs: CUDA only"
    if backend.startswith("cudagraph"):
        if device.type != "cuda":
            return "CUDA graphs need a CUDA device"
        if mode != "inference":
            return "CUDA-graph replay is profiled for inference only"
    return None


class Step(NamedTuple):
    step: Callable[[], object]  # one timed unit: a forward (inference) or forward + backward (train); no sync
    model: nn.Module
    runner: nn.Module  # eager module of the chosen path (what the per-stage markers hook)
    images: Tensor


def build_step(variant: str, backend: str = "reference", batch_size: int = 1, dtype: str = "fp32",
               mode: str = "inference", path: str = "pruned", device: str = "cpu",
               model: Optional[nn.Module] = None) -> Step:
    """The callable that :func:`profile_config` times, for reuse by benchmarks. ``model`` (optional) is
    moved / cast in place. GPU-only backends raise on CPU (:func:`profile_config` skips them instead)."""
    from .model import build_model

    cfg = get_config(variant)
    dev = torch.device(device)
    reason = _skip_reason(backend, mode, path, dev)
    if reason:
        raise RuntimeError(reason)
    torch.manual_seed(0)
    kernels = "triton" if backend in _ON_TRITON else "reference"
    if model is None:
        model = build_model(cfg.name, backend=kernels)
    model.set_backend(kernels)
    model = model.to(device=dev, dtype=DTYPES[dtype])
    model.train(mode == "train")
    images = torch.randn(batch_size, 3, *cfg.image_size, device=dev, dtype=DTYPES[dtype])
    rates = (1.0,) * cfg.depth if path == "unpruned" else cfg.layer_keep_rates()
    runner = PathRunner(model, rates)
    if backend in _COMPILE_MODES:
        # Dynamo caches compiled code per code object (PathRunner.forward / GTPT.forward), shared by every
        # config of a sweep; past its recompile limit (8) it silently runs eager. A fresh cache per config keeps
        # every "compile" figure a compiled one.
        torch._dynamo.reset()

    if mode == "inference":
        fn = runner
        if backend in _COMPILE_MODES:
            fn = torch.compile(runner, mode=_COMPILE_MODES[backend])
        elif backend.startswith("cudagraph"):
            fn = _cuda_graph(runner, images)

        def step():
            with torch.no_grad():
                return fn(images)
    else:
        target = torch.compile(model, mode=_COMPILE_MODES[backend]) if backend in _COMPILE_MODES else model

        def step():
            loss = _simcc_objective(target(images))
            loss.backward()
            model.zero_grad(set_to_none=True)
            return loss
    return Step(step, model, runner, images)


def profile_config(variant: str, backend: str = "reference", batch_size: int = 1, dtype: str = "fp32",
                   mode: str = "inference", path: str = "pruned", device: str = "cpu", warmup: int = 3,
                   repeats: int = 10, per_stage: bool = True, model: Optional[nn.Module] = None,
                   op_breakdown: bool = False, adaptive: bool = True) -> LatencyResult:
    """Measure one configuration (see the module docstring). ``model`` may be passed to reuse a built model
    (it is moved / cast in place). ``op_breakdown`` adds :func:`measure_op_breakdown` of the step (not for CUDA-graph
    replay, whose kernels the profiler does not see one by one). ``adaptive``: more repeats when the spread is
    wide (:func:`time_interleaved`)."""
    return profile_paths(variant, backend, batch_size, dtype, mode, (path,), device, warmup, repeats, per_stage,
                         model, op_breakdown, adaptive)[0]


def profile_paths(variant: str, backend: str = "reference", batch_size: int = 1, dtype: str = "fp32",
                  mode: str = "inference", paths: Sequence[str] = PATHS, device: str = "cpu", warmup: int = 3,
                  repeats: int = 10, per_stage: bool = True, model: Optional[nn.Module] = None,
                  op_breakdown: bool = False, adaptive: bool = True) -> List[LatencyResult]:
    """:func:`profile_config` for several inference paths of one model at once: their timed iterations are
    interleaved (pruned, unpruned, pruned, ...), so load from other processes hits every path alike and their
    ratio stays meaningful on a busy machine. One result per path, in the order given."""
    cfg = get_config(variant)
    dev = torch.device(device)
    if mode == "train":
        paths = ("both",)  # the training step runs the pruned and the unpruned pass
    for p in paths:
        if mode != "train" and p not in PATHS:
            raise ValueError(f"unknown path {p!r}; valid: {', '.join(PATHS)}")
    results = [LatencyResult(cfg.name, backend, batch_size, dtype, mode, p, str(dev)) for p in paths]
    reason = _skip_reason(backend, mode, paths[0], dev)
    if reason:
        for res in results:
            res.status, res.note = "skipped", reason
        return results
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
    if dev.type == "cuda":
        # From before the build: a CUDA graph (cudagraph*, *reduce-overhead) allocates its activations once, during
        # capture, into its private pool; replays allocate nothing, so a peak taken after warm-up would miss them.
        torch.cuda.reset_peak_memory_stats(dev)
    built = {}
    for p in paths:
        built[p] = build_step(cfg.name, backend, batch_size, dtype, mode, p, device, model)
        model = built[p].model  # every path runs the same weights
    timer = _Timer(dev)

    if backend.startswith("compile"):
        # the first calls compile (and may recompile once shapes are marked dynamic): warm-up, not measurement
        warmup = max(warmup, 3)
    for _ in range(warmup):
        for b in built.values():
            b.step()
    timer.sync()
    times, note = time_interleaved({p: b.step for p, b in built.items()}, timer, repeats, adaptive)
    for res in results:
        t = times[res.path]
        if dev.type == "cuda":
            res.peak_memory_mb = torch.cuda.max_memory_allocated(dev) / 2**20
        res.repeats = len(t)
        res.times_ms = [round(x, 4) for x in t]
        res.median_ms = statistics.median(t)
        res.p20_ms, res.p80_ms = _quantile(t, 0.2), _quantile(t, 0.8)
        res.images_per_s = batch_size / (res.median_ms / 1e3)
        res.note = note

        step, runner, images = built[res.path].step, built[res.path].runner, built[res.path].images
        if per_stage and mode == "inference" and backend in ("reference", "triton"):
            samples: Dict[str, List[float]] = {s: [] for s in FLOP_STAGES}
            with _stage_markers(model, runner, timer) as marks, torch.no_grad():
                for _ in range(repeats):
                    marks.clear()
                    runner(images)
                    timer.sync()
                    for s, v in _stages_from_marks(marks, timer).items():
                        samples[s].append(v)
            res.per_stage_ms = {s: statistics.median(v) for s, v in samples.items()}
        if op_breakdown and not backend.startswith("cudagraph"):
            try:
                res.op_breakdown = measure_op_breakdown(step, dev, iters=min(repeats, 5))
            except KeyboardInterrupt:
                raise
            except Exception as e:  # a profiler failure must not cost the latency figures already measured
                res.op_breakdown = {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]}
    return results

# (category, substrings of the lower-cased kernel / operator name), first match wins. Our kernels first, then
# Inductor's generated kernels (their names also contain the fused ops' names), then by what the name says.
_OP_CATEGORIES = (
    ("fused attention (MHGA kernels)", ("_mhga_", "group_attention")),
    ("fused pruning (token_prune kernel)", ("_prune_kernel", "_prune_select_kernel", "token_prune",
                                            "softmax_pool_scores")),
    ("Inductor-generated (triton_*)", ("triton_", "compiledfunction", "torchdynamo", "inductor")),
    # cuDNN names its BatchNorm kernels bn_fw / bn_bw and its convolutions fprop / dgrad / wgrad, often with
    # "gemm" or "cudnn" in the name too: norms first, then convolutions, then GEMMs.
    ("normalisation", ("layer_norm", "batch_norm", "group_norm", "rms_norm", "bn_fw", "bn_bw")),
    ("convolution", ("convolution", "convolve", "conv1d", "conv2d", "conv3d", "_conv", "conv_", "fprop", "dgrad",
                     "wgrad", "implicit_gemm", "winograd", "cudnn")),
    ("GEMM / matmul", ("gemm", "matmul", "addmm", "bmm", "aten::mm", "aten::linear", "cublas", "cutlass", "nvjet",
                       "xmma", "sm90_", "sm80_", "scaled_dot_product", "flash", "fmha")),
    ("softmax", ("softmax",)),
    ("top-k / sort / gather / index", ("topk", "sort", "radix", "gather", "scatter", "index", "masked_select")),
    ("copies / layout / fill", ("copy", "memcpy", "memset", "aten::cat", "catarray", "contiguous", "clone",
                                "fill", "aten::zero", "aten::empty", "aten::ones", "transpose", "permute",
                                "aten::to", "_to_copy")),
    ("elementwise / reductions", ("elementwise", "reduce", "relu", "clamp", "aten::add", "aten::mul", "aten::sub",
                                  "aten::div", "gelu", "sigmoid", "aten::exp", "aten::where", "aten::sum",
                                  "aten::mean", "aten::max", "aten::sin", "aten::cos", "aten::neg", "aten::rsqrt",
                                  "aten::pow")),
)


def op_category(name: str) -> str:
    """The category of a kernel (CUDA) or operator (CPU) name in :func:`measure_op_breakdown`; "other" if none fits."""
    n = name.lower()
    for cat, keys in _OP_CATEGORIES:
        if any(_matches(n, k) for k in keys):
            return cat
    return "other"


def _matches(name: str, key: str) -> bool:
    # An operator key ("aten::exp") names that operator and its in-place / overload forms ("aten::exp_"), not
    # every operator it prefixes ("aten::expand"); other keys are substrings of kernel names.
    if key.startswith("aten::"):
        return name == key or name.startswith(key + "_") or name.startswith(key + ".")
    return key in name


def measure_op_breakdown(step: Callable[[], object], device: torch.device, iters: int = 5, top: int = 15
                 ) -> Dict[str, object]:
    """Profile ``iters`` calls of ``step`` (after one untimed call) with ``torch.profiler`` and return where the
    time goes, per step: ``{"measure", "total_ms", "categories": {name: ms}, "top": [{"name", "category", "ms",
    "calls", "share"}]}``. On CUDA ``measure`` is the device time of kernels, copies and memsets (what the GPU
    was busy with; gaps between kernels are not in it); on CPU it is the self time of every operator."""
    from torch.profiler import ProfilerActivity, profile as torch_profile

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    step()
    if cuda:
        torch.cuda.synchronize(dev)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        for _ in range(iters):
            step()
        if cuda:
            torch.cuda.synchronize(dev)
    rows: Dict[str, List[float]] = {}
    for e in prof.key_averages():
        if getattr(e, "is_user_annotation", False) or e.key.startswith("ProfilerStep"):
            continue  # record_function ranges span other entries: counting them would count twice
        if cuda:
            if getattr(e, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            us = float(getattr(e, "self_device_time_total", 0.0) or 0.0)
        else:
            us = float(e.self_cpu_time_total)
        if us > 0:
            r = rows.setdefault(e.key, [0.0, 0])
            r[0] += us
            r[1] += int(e.count)
    total_us = sum(r[0] for r in rows.values())
    cats: Dict[str, float] = {}
    for name, (us, _) in rows.items():
        cat = op_category(name)
        cats[cat] = cats.get(cat, 0.0) + us / 1e3 / iters
    ranked = sorted(rows.items(), key=lambda kv: -kv[1][0])[:top]
    return {"measure": "CUDA kernel time" if cuda else "CPU operator self time", "iters": iters,
            "total_ms": total_us / 1e3 / iters,
            "categories": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
            "top": [{"name": name, "category": op_category(name), "ms": us / 1e3 / iters, "calls": calls / iters,
                     "share": us / total_us if total_us else 0.0} for name, (us, calls) in ranked]}


def _cuda_graph(runner: nn.Module, images: Tensor) -> Callable[[Tensor], object]:
    """Capture ``runner(images)`` into a CUDA graph (after a warm-up on a side stream) and return a replayer
    that copies new inputs into the captured buffer."""
    static_in = images.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(3):
            runner(static_in)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = runner(static_in)

    def replay(x: Tensor):
        if x.data_ptr() != static_in.data_ptr():
            static_in.copy_(x)
        graph.replay()
        return static_out
    return replay


# ----------------------------------------------------------------------------------------------------------------
# sweeps

def profile(variants: Sequence[str] = ("gtpt-t", "gtpt-s"), backends: Sequence[str] = ("reference",),
            batch_sizes: Sequence[int] = (1, 8), dtypes: Sequence[str] = ("fp32",),
            modes: Sequence[str] = ("inference",), paths: Sequence[str] = ("pruned", "unpruned"),
            device: str = "cpu", warmup: int = 3, repeats: int = 10, per_stage: bool = True,
            progress: Optional[TextIO] = sys.stderr, budget_s: Optional[float] = None,
            op_breakdown: bool = False) -> List[LatencyResult]:
    """Measure every combination; one progress line per configuration goes to ``progress``. Errors in one
    configuration (e.g. out of memory) are recorded with status ``"error"`` and do not stop the sweep. With
    ``budget_s``, configurations that would start after that many seconds are recorded as skipped; after a
    KeyboardInterrupt (SIGINT; SIGTERM too inside :func:`interrupt_on_stop_signals`) the one in flight and the rest
    are recorded as skipped and the sweep returns, so a time-boxed run still writes its report."""
    for name, values, valid in (("backend", backends, BACKENDS), ("dtype", dtypes, DTYPES),
                                ("mode", modes, MODES), ("path", paths, PATHS)):
        for v in values:
            if v not in valid:
                raise ValueError(f"unknown {name} {v!r}; valid: {', '.join(valid)}")
    for b in batch_sizes:
        if int(b) < 1:
            raise ValueError(f"batch sizes must be positive, got {b}")
    names = [get_config(v).name for v in variants]
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device cuda requested but CUDA is not available")
    # A training step always runs both passes (student and teacher), so it has a single path, "both".
    combos = [(v, be, b, dt, m, p) for v in names for m in modes for be in backends for dt in dtypes
              for b in batch_sizes for p in (paths if m == "inference" else ("both",))]
    # torch.compile configs go last: after inductor's CPU kernels have run in this process, every eager op was
    # measured ~10x slower on a 2-core CPU (a second OpenMP thread pool spinning; torch._dynamo.reset() does not
    # help), which would corrupt every eager measurement taken after it.
    # Among them, the most important case first across every compile backend (order of --dtypes, --batch-sizes,
    # paths as given): each compile costs tens of seconds, so a time-boxed sweep should not spend its budget on
    # every case of the first compile backend before the second one has run once.
    def order(c):
        v, be, b, dt, m, p = c
        if not be.startswith("compile"):
            return (0,)
        return (1, names.index(v), modes.index(m), list(dtypes).index(dt), list(batch_sizes).index(b),
                ("pruned", "unpruned", "both").index(p), list(backends).index(be))
    combos.sort(key=order)
    # The inference paths of one eager / CUDA-graph config are timed together, interleaved (profile_paths), so
    # their ratio survives other load on the machine; compiled configs are timed one by one (each compiles).
    groups: List[List[tuple]] = []
    for c in combos:
        last = groups[-1][-1] if groups else None
        if (last is not None and c[4] == "inference" and not c[1].startswith("compile")
                and last[:5] == c[:5]):
            groups[-1].append(c)
        else:
            groups.append([c])
    results = []
    t_sweep = time.perf_counter()
    interrupted = False
    i = 0
    for group in groups:
        t0 = time.perf_counter()
        v, be, b, dt, m, _ = group[0]
        gpaths = [c[5] for c in group]
        if interrupted or (budget_s is not None and t0 - t_sweep > budget_s):
            note = "interrupted" if interrupted else f"time budget of {budget_s:.0f} s spent"
            rs = [LatencyResult(get_config(v).name, be, int(b), dt, m, p, device, status="skipped", note=note)
                  for p in gpaths]
        else:
            try:
                if len(gpaths) == 1:  # one path (compiled configs, training, --paths X): on its own
                    rs = [profile_config(v, be, int(b), dt, m, gpaths[0], device, warmup, repeats, per_stage,
                                         op_breakdown=op_breakdown)]
                else:
                    rs = profile_paths(v, be, int(b), dt, m, gpaths, device, warmup, repeats, per_stage,
                                       op_breakdown=op_breakdown)
            except KeyboardInterrupt:  # e.g. a timeout's signal: keep what was measured, report the rest as skipped
                interrupted = True
                rs = [LatencyResult(get_config(v).name, be, int(b), dt, m, p, device, status="skipped",
                                    note="interrupted") for p in gpaths]
            except Exception as e:  # keep the sweep going; the report says what failed
                note = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                rs = [LatencyResult(get_config(v).name, be, int(b), dt, m, p, device, status="error", note=note)
                      for p in gpaths]
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
        for r in rs:
            i += 1
            results.append(r)
            if progress is not None:
                what = (f"{r.median_ms:9.2f} ms (p20 {r.p20_ms:.2f}, p80 {r.p80_ms:.2f})"
                        + (f"; {r.note}" if r.note else "") if r.status == "ok" else f"{r.status}: {r.note}")
                print(f"[{i}/{len(combos)}] {r.label}: {what}  [{time.perf_counter() - t0:.1f} s]", file=progress,
                      flush=True)
    return results


def compare_paths(variant: str, batch_size: int = 1, repeats: int = 5, warmup: int = 1, device: str = "cpu",
                  dtype: str = "fp32", model: Optional[nn.Module] = None, adaptive: bool = True) -> Dict[str, object]:
    """Inference latency of the pruned and the unpruned path of one eager reference model, measured
    *interleaved* (pruned, unpruned, pruned, ...) so that load from other processes hits both alike, with more
    rounds when the spread is wide (:func:`time_interleaved`). Returns the per-path times (ms) and the speedup of
    the pruned path (:func:`speedup_stats`)."""
    from .model import build_model

    cfg = get_config(variant)
    dev = torch.device(device)
    if model is None:
        torch.manual_seed(0)
        model = build_model(cfg.name, backend="reference")
    model = model.to(device=dev, dtype=DTYPES[dtype]).eval()
    images = torch.randn(batch_size, 3, *cfg.image_size, device=dev, dtype=DTYPES[dtype])
    runners = {"pruned": PathRunner(model, cfg.layer_keep_rates()), "unpruned": PathRunner(model, (1.0,) * cfg.depth)}
    timer = _Timer(dev)
    with torch.no_grad():
        for _ in range(warmup):
            for run in runners.values():
                run(images)
        timer.sync()
        times, note = time_interleaved({p: (lambda run=run: run(images)) for p, run in runners.items()}, timer,
                                       repeats, adaptive)
    return {"variant": cfg.name, "batch_size": batch_size, "device": str(dev), "dtype": dtype, "times_ms": times,
            **speedup_stats(times), "note": note}


def speedup_stats(times: Mapping[str, Sequence[float]]) -> Dict[str, float]:
    """Speedup of the pruned path from interleaved times: from the minima (the least disturbed runs), from the
    medians, and the p20 / p80 of the per-round ratios (unpruned / pruned of the same round)."""
    ratios = [u / p for p, u in zip(times["pruned"], times["unpruned"])]
    return {"speedup_min": min(times["unpruned"]) / min(times["pruned"]),
            "speedup_median": statistics.median(times["unpruned"]) / statistics.median(times["pruned"]),
            "speedup_p20": _quantile(ratios, 0.2), "speedup_p80": _quantile(ratios, 0.8)}


def interleaved_from_results(results: Sequence[LatencyResult], variant: str, batch_size: int, dtype: str,
                             backend: str = "reference") -> Optional[Dict[str, object]]:
    """The :func:`compare_paths` record of a sweep's interleaved pruned / unpruned pair, or None if the sweep
    did not measure that pair."""
    pair = {r.path: r for r in results if r.status == "ok" and r.mode == "inference" and r.variant == variant
            and r.backend == backend and r.batch_size == batch_size and r.dtype == dtype and r.times_ms}
    if set(pair) != {"pruned", "unpruned"} or len(pair["pruned"].times_ms) != len(pair["unpruned"].times_ms):
        return None
    times = {p: list(pair[p].times_ms) for p in ("pruned", "unpruned")}
    return {"variant": variant, "batch_size": batch_size, "device": pair["pruned"].device, "dtype": dtype,
            "times_ms": times, **speedup_stats(times), "note": pair["pruned"].note}


def pruning_speedups(results: Sequence[LatencyResult]) -> List[Dict[str, object]]:
    """Unpruned / pruned latency ratio for every configuration measured on both paths."""
    by_key = {}
    for r in results:
        if r.status == "ok" and r.mode == "inference":
            by_key[(r.variant, r.backend, r.batch_size, r.dtype, r.device, r.path)] = r
    out = []
    for (v, be, b, dt, dev, p), r in by_key.items():
        if p != "pruned":
            continue
        u = by_key.get((v, be, b, dt, dev, "unpruned"))
        if u is not None:
            interleaved = not be.startswith("compile") and bool(r.times_ms) and bool(u.times_ms) and \
                len(r.times_ms) == len(u.times_ms)
            out.append({"variant": v, "backend": be, "batch_size": b, "dtype": dt, "device": dev,
                        "pruned_ms": r.median_ms, "unpruned_ms": u.median_ms,
                        "speedup": u.median_ms / r.median_ms, "interleaved": interleaved,
                        "note": r.note or u.note})
    return out


# ----------------------------------------------------------------------------------------------------------------
# reports

def _fmt_ms(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def latency_markdown(results: Sequence[LatencyResult]) -> str:
    lines = ["| variant | backend | mode | path | batch | dtype | median ms | p20 | p80 | img/s | peak MiB | note |",
             "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in results:
        ips = "n/a" if r.images_per_s is None else f"{r.images_per_s:.1f}"
        mem = "n/a" if r.peak_memory_mb is None else f"{r.peak_memory_mb:.0f}"
        note = r.note if r.status == "ok" else f"{r.status}: {r.note}"
        lines.append(f"| {r.variant} | {r.backend} | {r.mode} | {r.path} | {r.batch_size} | {r.dtype} | "
                     f"{_fmt_ms(r.median_ms)} | {_fmt_ms(r.p20_ms)} | {_fmt_ms(r.p80_ms)} | {ips} | {mem} | "
                     f"{note} |")
    if any(r.status == "ok" and r.peak_memory_mb is None and r.device.startswith("cpu") for r in results):
        lines += ["", "Peak MiB: n/a on CPU (no allocator high-water mark to read)."]
    staged = [r for r in results if r.per_stage_ms]
    if staged:
        lines += ["", "Per-stage median (ms; channel_mask = fine entry: channel mask, grouping, entry pruning):", "",
                  "| config | " + " | ".join(FLOP_STAGES) + " |", "|---|" + "---:|" * len(FLOP_STAGES)]
        for r in staged:
            lines.append(f"| {r.label} | " + " | ".join(f"{r.per_stage_ms[s]:.2f}" for s in FLOP_STAGES) + " |")
    failed = [r for r in results if r.op_breakdown and "error" in r.op_breakdown]
    broken = [r for r in results if r.op_breakdown and "error" not in r.op_breakdown]
    if failed:
        lines += ["", "Op breakdown failed: " + "; ".join(f"{r.label}: {r.op_breakdown['error']}" for r in failed)]
    if broken:
        lines += ["", "Op breakdown (per step; ms and share of the measured total; CUDA: kernel time, CPU: operator "
                      "self time; 'of step time' = that total over the median step latency, on CUDA how busy the "
                      "GPU was):", ""]
        cats = []
        for r in broken:
            cats += [c for c in r.op_breakdown["categories"] if c not in cats]
        lines += ["| config | total ms | of step time | " + " | ".join(cats) + " |",
                  "|---|---:|---:|" + "---:|" * len(cats)]
        for r in broken:
            ob = r.op_breakdown
            cells = [f"{ob['categories'][c]:.3f} ({ob['categories'][c] / ob['total_ms']:.0%})"
                     if c in ob["categories"] and ob["total_ms"] else "" for c in cats]
            # measured total over the step's median latency: on CUDA, how busy the GPU is (well below 100%: the
            # step is launch-bound, and CUDA graphs would pay before more fusion)
            busy = f"{ob['total_ms'] / r.median_ms:.0%}" if r.median_ms else "n/a"
            lines.append(f"| {r.label} | {ob['total_ms']:.3f} | {busy} | " + " | ".join(cells) + " |")
        for r in broken:
            lines += ["", f"Top entries, {r.label}:", "", "| name | category | ms | calls | share |",
                      "|---|---|---:|---:|---:|"]
            for t in r.op_breakdown["top"]:
                name = t["name"].replace("|", "/")
                name = name if len(name) <= 90 else name[:87] + "..."
                lines.append(f"| `{name}` | {t['category']} | {t['ms']:.3f} | {t['calls']:g} | {t['share']:.1%} |")
    sp = pruning_speedups(results)
    if sp:
        lines += ["", "Pruned vs unpruned path (inference, same run):", "",
                  "| variant | backend | batch | dtype | pruned ms | unpruned ms | speedup | timing |",
                  "|---|---|---:|---|---:|---:|---:|---|"]
        for s in sp:
            how = "interleaved" if s.get("interleaved") else "separate runs"
            lines.append(f"| {s['variant']} | {s['backend']} | {s['batch_size']} | {s['dtype']} | "
                         f"{s['pruned_ms']:.2f} | {s['unpruned_ms']:.2f} | {s['speedup']:.2f}x | {how} |")
    return "\n".join(lines)


def plot_latency(results: Sequence[LatencyResult], path: str) -> Optional[str]:
    """Bar chart of median latency (p20-p80 whiskers) and, where measured, per-stage stacks. Returns the path,
    or None when nothing was measured."""
    import matplotlib
    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.status == "ok"]
    if not ok:
        return None
    staged = [r for r in ok if r.per_stage_ms]
    ncols = 2 if staged else 1
    fig, axes = plt.subplots(1, ncols, figsize=(7 * ncols, max(3.5, 0.38 * len(ok) + 2.0)), squeeze=False)
    ax = axes[0, 0]
    labels = [r.label for r in ok]
    med = [r.median_ms for r in ok]
    err = [[r.median_ms - r.p20_ms for r in ok], [r.p80_ms - r.median_ms for r in ok]]
    colors = [{"pruned": "tab:blue", "unpruned": "tab:orange"}.get(r.path, "tab:green") for r in ok]
    ax.barh(range(len(ok)), med, xerr=err, color=colors, capsize=3)
    ax.set_yticks(range(len(ok)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median latency, ms (log; whiskers p20-p80)")
    kinds = ["blue pruned", "orange unpruned"] + (["green train step"] if any(r.mode == "train" for r in ok) else [])
    ax.set_title(f"GTPT end to end ({', '.join(kinds)})")
    if staged:
        ax2 = axes[0, 1]
        left = [0.0] * len(staged)
        for s in FLOP_STAGES:
            vals = [r.per_stage_ms[s] / sum(r.per_stage_ms.values()) * 100 for r in staged]
            ax2.barh(range(len(staged)), vals, left=left, label=s)
            left = [a + b for a, b in zip(left, vals)]
        ax2.set_yticks(range(len(staged)), [r.label for r in staged], fontsize=7)
        ax2.invert_yaxis()
        ax2.set_xlabel("share of forward time, %")
        ax2.set_title("per stage (eager, inference)")
        ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(FLOP_STAGES) // 2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(out_dir: str, results: Sequence[LatencyResult], flops: Sequence[Dict[str, object]] = (),
                 meta: Optional[Dict[str, object]] = None, markdown_prefix: str = "",
                 stem: str = "profile", extra: Optional[Dict[str, object]] = None,
                 markdown_suffix: str = "") -> Dict[str, str]:
    """Write ``<stem>.json``, ``<stem>.md`` and ``<stem>.png`` into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, f"{stem}.json"), "markdown": os.path.join(out_dir, f"{stem}.md")}
    data = {"meta": meta if meta is not None else environment_info(), "flops": list(flops),
            "latency": [asdict(r) for r in results], "pruning_speedup": pruning_speedups(results), **(extra or {})}
    with atomic_write(paths["json"], "w") as f:
        json.dump(data, f, indent=2)
    md = (markdown_prefix + "\n\n" if markdown_prefix else "") + "## Latency\n\n" + latency_markdown(results) + markdown_suffix + "\n"
    with open(paths["markdown"], "w") as f:
        f.write(md)
    png = plot_latency(results, os.path.join(out_dir, f"{stem}.png"))
    if png:
        paths["png"] = png
    return paths
