"""CPU inference runtimes side by side: the official forward against every way this package can run GTPT.

Contenders (``RUNTIMES``), all on the same weights and the same input, timed *interleaved* in one process (one
call of each contender per round, so load changes on a shared machine hit them alike):

* ``official`` - the official GTPT forward as ``tests/official_port.py`` transcribes it (only available in a
  source checkout, where ``tests/`` sits beside ``gtpt/``), on the unfused modules;
* ``eager`` - our model, fast inference path off (``model.set_fast_inference(False)``);
* ``eager-fused`` - our model as it runs by default in eval (:mod:`gtpt.fast_inference`);
* ``compile`` - ``torch.compile`` (Inductor, CPU C++) of our model, one compile per configuration
  (``dynamic=False``; Inductor bakes the thread count into its OpenMP code); ``compile_configs`` can add
  Inductor options (e.g. ``{"freezing": True}``: weights folded as constants, convolutions prepacked);
* ``onnxruntime`` - ONNX Runtime on our ONNX export (``gtpt.export.export_onnx``);
* ``pt2`` - the ``torch.export`` + AOTInductor package (``gtpt.export.export_pt2``);
* ``onnxruntime-official`` - ONNX Runtime on the official forward exported with ``torch.onnx.export``;
* ``onnxruntime-fixed``, ``onnxruntime-official-fixed`` - the same two files, the session told the batch size
  (``SessionOptions.add_free_dimension_override_by_name``), so ONNX Runtime folds the graph's shape arithmetic
  for that batch; a deployment with a fixed batch (as TensorRT engines usually are) can do the same.

A contender that cannot run here (no ``gtpt.export``, no ``tests/official_port.py``, an export that fails) is
skipped with its reason; the rest still run. Ratios are ``official median / contender median`` from the same
rounds. Timing weights: the official from-scratch init (conv N(0, 0.001), BN running stats (0, 1)) drives the
stem's activations towards subnormal floats, which x86 handles in microcode and which no trained checkpoint
produces, so :func:`trained_like_weights` gives every convolution Kaiming-normal weights and every BatchNorm
trained-looking statistics first.
"""
from __future__ import annotations

import copy
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Sequence, TextIO

import torch
from torch import Tensor, nn

RUNTIMES = ("official", "eager", "eager-fused", "compile", "onnxruntime", "pt2", "onnxruntime-official",
            "onnxruntime-fixed", "onnxruntime-official-fixed")


class Unavailable(Exception):
    """A contender that cannot run in this environment (the message says why)."""


def trained_like_weights(model: nn.Module, seed: int = 0) -> nn.Module:
    """In place: Kaiming-normal conv weights, BN weight ~ U(0.5, 1.5), bias / running mean ~ N(0, 0.1), running
    var ~ U(0.5, 1.5) (magnitudes of a trained network; see the module docstring for why)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / m.weight[0].numel()) ** 0.5)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _official_forward():
    """``official_forward`` from ``tests/official_port.py`` of this source checkout."""
    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    if not os.path.isfile(os.path.join(tests, "official_port.py")):
        raise Unavailable("tests/official_port.py not found (the official transcription ships with the source only)")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from official_port import official_forward
    return official_forward


class OfficialModel(nn.Module):
    """The official forward on ``model``'s weights as a module (what ``onnxruntime-official`` exports)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.forward_fn = _official_forward()

    def forward(self, images: Tensor):
        return self.forward_fn(self.model, images, self.model.cfg.keep_rates)


def _export_module():
    try:
        from . import export
    except ImportError as e:
        raise Unavailable(f"gtpt.export is not available ({e})")
    return export


def _onnx_session(path: str, threads: int, batch: Optional[Dict[str, int]] = None):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    # No spin-waiting: ONNX Runtime's pool threads spin after each run by default, which on a 2-core machine takes
    # the cores from the contender timed next in the same process (the official forward measured 2-25x slower
    # after an ONNX Runtime run at 2 threads).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for dim, size in (batch or {}).items():  # a fixed batch: shape arithmetic folds at session creation
        opts.add_free_dimension_override_by_name(dim, size)
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def _ort_runner(session, images: Tensor) -> Callable[[], object]:
    name = session.get_inputs()[0].name
    feed = {name: images.numpy()}
    return lambda: session.run(None, feed)


def build_runner(name: str, model: nn.Module, images: Tensor, threads: int, workdir: str,
                 cache: Dict[str, object]) -> Callable[[], object]:
    """A zero-argument callable running contender ``name`` on ``images`` (outputs: the two SimCC logit arrays).
    ``model`` is the eval-mode model whose weights everyone uses; ``cache`` keeps exports per variant."""
    variant = model.cfg.name
    plain = cache.setdefault(f"{variant}/plain", copy.deepcopy(model).set_fast_inference(False))
    if name == "official":
        official = _official_forward()
        rates = model.cfg.keep_rates
        return lambda: official(plain, images.clone(), rates)
    if name == "eager":
        return lambda: plain(images)
    if name == "eager-fused":
        return lambda: model(images)
    if name == "compile":
        torch._dynamo.reset()  # a fresh compile per configuration
        return _compiled(plain, images, cache.get("compile_configs"))
    B = images.size(0)
    if name in ("onnxruntime", "onnxruntime-fixed"):
        key = f"{variant}/onnx"
        if key not in cache:
            path = os.path.join(workdir, f"{variant}.onnx")
            try:
                _export_module().export_onnx(plain, path)
            except Unavailable:
                raise
            except Exception as e:  # an export failure skips the contender, it does not end the run
                raise Unavailable(f"export_onnx failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            cache[key] = path
        fixed = {"batch": B} if name == "onnxruntime-fixed" else None  # export_onnx names the axis "batch"
        return _ort_runner(_onnx_session(cache[key], threads, fixed), images)
    if name == "pt2":
        key = f"{variant}/pt2/{threads}"  # Inductor fixes the OpenMP thread count at compile time
        if key not in cache:
            export = _export_module()
            path = os.path.join(workdir, f"{variant}-{threads}t.pt2")
            try:
                export.export_pt2(plain, path, inductor_configs=cache.get("compile_configs"))
                cache[key] = export.load_pt2(path)
            except Exception as e:
                raise Unavailable(f"export_pt2 failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        runner = cache[key]
        return lambda: runner(images)
    if name in ("onnxruntime-official", "onnxruntime-official-fixed"):
        key = f"{variant}/onnx-official"
        if key not in cache:
            path = os.path.join(workdir, f"{variant}-official.onnx")
            try:
                with torch.no_grad():
                    torch.onnx.export(OfficialModel(plain).eval(), (images[:1].clone(),), path, opset_version=17,
                                      input_names=["images"], output_names=["simcc_x", "simcc_y"],
                                      dynamic_axes={"images": {0: "N"}, "simcc_x": {0: "N"}, "simcc_y": {0: "N"}},
                                      dynamo=False)
            except Unavailable:
                raise
            except Exception as e:
                raise Unavailable(f"torch.onnx.export of the official forward failed: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200]}")
            cache[key] = path
        fixed = {"N": B} if name == "onnxruntime-official-fixed" else None
        return _ort_runner(_onnx_session(cache[key], threads, fixed), images)
    raise ValueError(f"unknown runtime {name!r}; valid: {', '.join(RUNTIMES)}")


def _compiled(plain: nn.Module, images: Tensor, configs: Optional[Dict[str, object]] = None) -> Callable[[], object]:
    fn = torch.compile(plain, dynamic=False, options=dict(configs) if configs else None)
    return lambda: fn(images)


def _outputs(out) -> List[Tensor]:
    return [torch.as_tensor(o).float() for o in out]


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def compare_runtimes(variants: Sequence[str] = ("gtpt-t", "gtpt-s"), batch_sizes: Sequence[int] = (1, 8),
                     threads: Sequence[int] = (1, 2), runtimes: Sequence[str] = RUNTIMES, repeats: int = 15,
                     warmup: int = 2, workdir: Optional[str] = None, log: Optional[TextIO] = sys.stderr,
                     seed: int = 0, compiled_threads: Optional[Sequence[int]] = None,
                     compile_configs: Optional[Dict[str, object]] = None) -> Dict[str, object]:
    """Time every runtime on every (variant, batch size, threads) configuration, interleaved; see the module
    docstring. Returns ``{"configs": [...], "skipped": {runtime: reason}}``; each config has per-runtime
    ``median_ms``, ``p20_ms``, ``p80_ms``, ``max_rel_err`` (vs ``official``, or ``eager`` without it),
    ``setup_s`` (building the runner: export / compile, plus warm-up) and ``speedup_vs_official``.
    ``compiled_threads``: thread counts at which ``compile`` and ``pt2`` run (each needs its own minutes-long
    compile per thread count; None: all of ``threads``); elsewhere they are left out of that configuration."""
    from .model import build_model

    for r in runtimes:
        if r not in RUNTIMES:
            raise ValueError(f"unknown runtime {r!r}; valid: {', '.join(RUNTIMES)}")
    say = (lambda msg: print(msg, file=log, flush=True)) if log else (lambda msg: None)
    workdir = workdir or tempfile.mkdtemp(prefix="gtpt-runtimes-")
    old_threads = torch.get_num_threads()
    skipped: Dict[str, str] = {}
    configs = []
    try:
        for variant in variants:
            torch.manual_seed(seed)
            model = trained_like_weights(build_model(variant, backend="reference"), seed).eval()
            cache: Dict[str, object] = {"compile_configs": compile_configs}
            for B in batch_sizes:
                images = torch.randn(B, 3, *model.cfg.image_size, generator=torch.Generator().manual_seed(seed))
                for t in threads:
                    torch.set_num_threads(t)
                    runners: Dict[str, Callable[[], object]] = {}
                    refs: Dict[str, List[Tensor]] = {}
                    setup: Dict[str, float] = {}
                    with torch.no_grad():
                        for r in runtimes:
                            if r in skipped:
                                continue
                            if r in ("compile", "pt2") and compiled_threads is not None and t not in compiled_threads:
                                continue
                            t0 = time.perf_counter()
                            try:
                                fn = build_runner(r, model, images, t, workdir, cache)
                                for _ in range(max(warmup, 1)):
                                    out = fn()
                            except Unavailable as e:
                                skipped[r] = str(e)
                                say(f"skip {r}: {e}")
                                continue
                            runners[r], refs[r] = fn, _outputs(out)
                            setup[r] = time.perf_counter() - t0
                            # an exporter restores the mode of what it exported, which for a wrapper module can
                            # be train(): keep every model in eval
                            for m in (model, cache[f"{variant}/plain"]):
                                m.eval()
                            say(f"{variant} B={B} threads={t}: {r} ready ({time.perf_counter() - t0:.1f} s)")
                        times: Dict[str, List[float]] = {r: [] for r in runners}
                        for _ in range(repeats):
                            for r, fn in runners.items():
                                t0 = time.perf_counter()
                                fn()
                                times[r].append((time.perf_counter() - t0) * 1e3)
                    base = "official" if "official" in refs else ("eager" if "eager" in refs else None)
                    res = {}
                    for r, ts in times.items():
                        err = None
                        if base is not None:
                            err = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
                                      for a, b in zip(refs[r], refs[base]))
                        res[r] = {"median_ms": statistics.median(ts), "p20_ms": _quantile(ts, 0.2),
                                  "p80_ms": _quantile(ts, 0.8), "max_rel_err": err, "setup_s": setup[r],
                                  "times_ms": ts}
                    if "official" in res:
                        for r in res:
                            res[r]["speedup_vs_official"] = res["official"]["median_ms"] / res[r]["median_ms"]
                    configs.append({"variant": variant, "batch_size": B, "threads": t, "repeats": repeats,
                                    "runtimes": res})
                    say(f"{variant} B={B} threads={t}: " + ", ".join(
                        f"{r} {v['median_ms']:.1f} ms" for r, v in res.items()))
    finally:
        torch.set_num_threads(old_threads)
    return {"configs": configs, "skipped": skipped}


def runtimes_markdown(result: Dict[str, object]) -> str:
    """Median [p20, p80] ms per runtime and configuration, the speedup over the official forward, the winner."""
    configs = result["configs"]
    if not configs:
        return "No configuration was timed."
    names = [r for r in RUNTIMES if any(r in c["runtimes"] for c in configs)]
    head = ["variant", "B", "threads"] + names + ["fastest"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in configs:
        row = [c["variant"], str(c["batch_size"]), str(c["threads"])]
        for r in names:
            v = c["runtimes"].get(r)
            if v is None:
                row.append("-")
                continue
            cell = f"{v['median_ms']:.1f} [{v['p20_ms']:.1f}, {v['p80_ms']:.1f}]"
            if "speedup_vs_official" in v and r != "official":
                cell += f" **{v['speedup_vs_official']:.2f}x**"
            row.append(cell)
        best = min(c["runtimes"].items(), key=lambda kv: kv[1]["median_ms"])[0]
        row.append(best)
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines.append("ms per forward: median [p20, p80] over interleaved rounds; **Nx** = official median / runtime median "
                 "(same rounds, same weights, same input).")
    for r, why in result.get("skipped", {}).items():
        lines.append(f"- `{r}` not run: {why}")
    for r in ("compile", "pt2", "onnxruntime", "onnxruntime-official", "onnxruntime-fixed",
              "onnxruntime-official-fixed"):
        costs = [f"{c['variant']} B={c['batch_size']} t={c['threads']}: {c['runtimes'][r]['setup_s']:.0f} s"
                 for c in configs if r in c["runtimes"] and "setup_s" in c["runtimes"][r]]
        if costs:
            lines.append(f"- `{r}` setup (export / compile + warm-up, wall; a cached export or package shows only "
                         f"its warm-up): " + ", ".join(costs))
    errs = [(c["variant"], c["batch_size"], r, v["max_rel_err"]) for c in configs for r, v in c["runtimes"].items()
            if v.get("max_rel_err") is not None]
    if errs:
        worst = max(errs, key=lambda e: e[3])
        lines.append(f"- largest output difference from the official forward: {worst[3]:.1e} (relative to the "
                     f"largest logit; {worst[2]}, {worst[0]} B={worst[1]})")
    return "\n".join(lines)
