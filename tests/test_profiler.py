"""Latency / memory profiler on CPU at tiny settings (GPU-only backends skip; CUDA cases run with a GPU)."""
import json

import pytest
import torch

from gtpt import build_model
from gtpt.flops import FLOP_STAGES, count_flops
from gtpt.profiler import (LatencyResult, build_step, compare_paths, latency_markdown, measure_op_breakdown,
                           op_category, profile, profile_config, pruning_speedups, write_report)


pytestmark = pytest.mark.usefixtures("one_thread")  # see tests/conftest.py


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return build_model("gtpt-t", backend="reference")


def test_profile_config_inference_cpu(tiny_model):
    r = profile_config("gtpt-t", "reference", batch_size=1, warmup=1, repeats=3, model=tiny_model)
    assert r.status == "ok" and r.repeats in (3, 6, 9)  # more rounds only when the spread is wide
    assert 0 < r.p20_ms <= r.median_ms <= r.p80_ms
    assert r.images_per_s == pytest.approx(1e3 / r.median_ms)
    assert list(r.per_stage_ms) == list(FLOP_STAGES) and all(v >= 0 for v in r.per_stage_ms.values())
    assert r.peak_memory_mb is None  # no fake CPU memory number
    md = latency_markdown([r, r])
    assert md.count("n/a on CPU") == 1 and "peak memory n/a" not in md  # said once, not in every row


def test_profile_config_train_step_cpu(tiny_model):
    r = profile_config("gtpt-t", "reference", batch_size=1, mode="train", warmup=0, repeats=1, model=tiny_model)
    assert r.status == "ok" and r.path == "both" and r.median_ms > 0
    assert r.per_stage_ms is None  # stages are timed for inference only
    assert all(p.grad is None for p in tiny_model.parameters())  # grads are released after the step
    tiny_model.eval()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU skip notes")
@pytest.mark.parametrize("backend", ["triton", "cudagraph", "cudagraph-reference", "compile-reduce-overhead",
                                     "compile-triton", "compile-triton-reduce-overhead"])
def test_gpu_only_backends_skip_on_cpu(backend):
    r = profile_config("gtpt-t", backend, batch_size=1, repeats=1)
    assert r.status == "skipped" and ("CUDA" in r.note)
    assert r.median_ms is None


def test_sweep_report_files(tmp_path):
    lines = []

    class Progress:
        def write(self, s):
            lines.append(s)

        def flush(self):
            pass

    results = profile(["gtpt-t"], backends=["reference", "cudagraph"], batch_sizes=[1], warmup=0, repeats=1,
                      per_stage=False, progress=Progress())
    assert [r.path for r in results] == ["pruned", "unpruned", "pruned", "unpruned"]
    assert sum("[" in s and "/4]" in s for s in lines) == 4  # one progress line per config
    ok = [r for r in results if r.status == "ok"]
    assert len(ok) == (4 if torch.cuda.is_available() else 2)
    flops = [count_flops("gtpt-t", "paper").as_dict()]
    paths = write_report(str(tmp_path), results, flops, meta={"test": True})
    data = json.loads(open(paths["json"]).read())
    assert data["meta"] == {"test": True} and data["flops"][0]["total"] == flops[0]["total"]
    assert len(data["latency"]) == 4 and data["pruning_speedup"]
    md = open(paths["markdown"]).read()
    assert "| gtpt-t | reference | inference | pruned | 1 | fp32 |" in md and "speedup" in md
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sweep_time_budget_and_paths():
    # A spent budget records the remaining configs as skipped (the report still lists them); paths restrict the
    # inference configs.
    results = profile(["gtpt-t"], backends=["reference"], batch_sizes=[1, 2], paths=["pruned"], warmup=0,
                      repeats=1, per_stage=False, progress=None, budget_s=0.0)
    assert [(r.batch_size, r.path) for r in results] == [(1, "pruned"), (2, "pruned")]
    assert all(r.status == "skipped" and "time budget" in r.note and r.median_ms is None for r in results)


def test_sweep_interrupt_keeps_measured_configs(monkeypatch):
    # `timeout -s INT` on a GPU session: the config in flight and the rest are skipped, what ran is kept.
    import gtpt.profiler as prof
    real, calls = prof.profile_config, []

    def interrupting(*a, **kw):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)
    monkeypatch.setattr(prof, "profile_config", interrupting)
    results = profile(["gtpt-t"], backends=["reference"], batch_sizes=[1, 2, 3], paths=["pruned"], warmup=0,
                      repeats=1, per_stage=False, progress=None)
    assert [r.status for r in results] == ["ok", "skipped", "skipped"] and len(calls) == 2
    assert [r.note for r in results[1:]] == ["interrupted", "interrupted"]


def test_compile_configs_start_from_a_fresh_dynamo_cache(monkeypatch, tiny_model):
    # Every config of a sweep compiles the same forward code object; past Dynamo's recompile limit it would run
    # eager under a "compile" label. build_step resets the cache for each compiled config (compile itself is
    # stubbed: this checks the wiring, not Inductor).
    calls = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: calls.append("reset"))
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: calls.append(("compile", mode)) or fn)
    for mode in ("inference", "train"):
        build_step("gtpt-t", "compile", 1, "fp32", mode, "pruned", "cpu", model=tiny_model)
    assert calls == ["reset", ("compile", None), "reset", ("compile", None)]
    tiny_model.eval()
    calls.clear()
    build_step("gtpt-t", "reference", 1, "fp32", "inference", "pruned", "cpu", model=tiny_model)
    assert calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compile-triton needs CUDA")
def test_compile_triton_compiles_the_model_on_the_kernels(monkeypatch, tiny_model):
    calls = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None, **kw: calls.append(mode) or fn)
    step = build_step("gtpt-t", "compile-triton-reduce-overhead", 1, "fp32", "inference", "pruned", "cuda",
                      model=tiny_model)
    assert calls == ["reduce-overhead"] and step.model.backend == "triton"
    tiny_model.set_backend("reference")
    tiny_model.cpu()


def test_compile_configs_run_last_most_important_case_first(monkeypatch):
    # Eager configs keep their order; compiled ones follow, the first dtype / batch / path across every compile
    # backend before the next case (each compile takes tens of seconds of a time-boxed run).
    import gtpt.profiler as prof
    order = []

    def fake(v, be, b, dt, m, p, *a, **kw):
        order.append((be, dt, b, p))
        return LatencyResult(v, be, b, dt, m, p, "cpu")
    monkeypatch.setattr(prof, "profile_config", fake)
    profile(["gtpt-t"], backends=["compile", "reference", "compile-triton"], batch_sizes=[8, 1],
            dtypes=["bf16", "fp32"], paths=["pruned"], progress=None)
    assert order[:4] == [("reference", dt, b, "pruned") for dt in ("bf16", "fp32") for b in (8, 1)]
    assert order[4:8] == [("compile", "bf16", 8, "pruned"), ("compile-triton", "bf16", 8, "pruned"),
                          ("compile", "bf16", 1, "pruned"), ("compile-triton", "bf16", 1, "pruned")]
    assert len(order) == 12


@pytest.mark.parametrize("name, category", [
    ("_mhga_fwd_kernel", "fused attention (MHGA kernels)"),
    ("_prune_kernel", "fused pruning (token_prune kernel)"),
    ("_prune_select_kernel", "fused pruning (token_prune kernel)"),  # the column-split selection launch
    ("triton_per_fused_native_layer_norm_0", "Inductor-generated (triton_*)"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "GEMM / matmul"),
    ("aten::addmm", "GEMM / matmul"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>", "normalisation"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "elementwise / reductions"),
    ("Memcpy DtoD (Device -> Device)", "copies / layout / fill"),
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
    ("void cutlass__5x_cudnn::Kernel<cutlass_tensorop_s1688fprop_optimized_bf16_128x64_32x5_nhwc>", "convolution"),
    ("void cudnn::bn_fw_tr_1C11_kernel_NCHW<__nv_bfloat16, float, 512, true, 1>", "normalisation"),
    ("aten::mkldnn_convolution", "convolution"),
    ("aten::expand", "other"),                       # a view, not aten::exp
    ("aten::convert_element_type", "other"),         # not a convolution
    ("aten::exp_", "elementwise / reductions"),
    ("aten::add_", "elementwise / reductions"),
    ("aten::topk", "top-k / sort / gather / index"),
    ("something_else", "other"),
])
def test_op_category(name, category):
    assert op_category(name) == category


def test_op_breakdown_cpu(tiny_model):
    # Operator self times of a few reference forwards, summed by category; the shares add up to the total.
    step = build_step("gtpt-t", "reference", 1, "fp32", "inference", "pruned", "cpu", model=tiny_model).step
    ob = measure_op_breakdown(step, torch.device("cpu"), iters=2, top=5)
    assert ob["measure"] == "CPU operator self time" and ob["iters"] == 2 and ob["total_ms"] > 0
    assert sum(ob["categories"].values()) == pytest.approx(ob["total_ms"], rel=1e-6)
    assert "GEMM / matmul" in ob["categories"] and "convolution" in ob["categories"]
    assert len(ob["top"]) == 5 and ob["top"][0]["ms"] >= ob["top"][-1]["ms"] > 0
    assert all(t["category"] == op_category(t["name"]) for t in ob["top"])
    assert not any(t["name"].startswith("gtpt") for t in ob["top"])  # record_function ranges are not counted


def test_op_breakdown_in_report(tmp_path, tiny_model):
    r = profile_config("gtpt-t", "reference", batch_size=1, warmup=0, repeats=2, per_stage=False, model=tiny_model,
                       op_breakdown=True)
    assert r.status == "ok" and r.op_breakdown["total_ms"] > 0
    md = latency_markdown([r])
    assert "Op breakdown" in md and "GEMM / matmul" in md and "Top entries, gtpt-t reference" in md
    row = next(line for line in md.splitlines() if line.startswith("| gtpt-t reference inference pruned B=1 fp32 | "))
    busy = row.split(" | ")[2]
    assert busy == f"{r.op_breakdown['total_ms'] / r.median_ms:.0%}"
    bad = LatencyResult("gtpt-t", "reference", 1, "fp32", "inference", "pruned", "cpu", median_ms=1.0,
                        op_breakdown={"error": "RuntimeError: no CUPTI"})
    assert "Op breakdown failed: gtpt-t reference inference pruned B=1 fp32: RuntimeError: no CUPTI" in \
        latency_markdown([bad])
    data = json.loads(open(write_report(str(tmp_path), [r], meta={})["json"]).read())
    assert data["latency"][0]["op_breakdown"]["categories"]


def test_report_without_measurements_has_no_png(tmp_path):
    r = LatencyResult("gtpt-t", "triton", 1, "fp32", "inference", "pruned", "cpu", status="skipped", note="x")
    paths = write_report(str(tmp_path), [r], meta={})
    assert "png" not in paths and "skipped: x" in latency_markdown([r])


def test_pruned_path_is_faster_than_unpruned(tiny_model):
    # FLOPs first (deterministic): the unpruned path does > 2x the work.
    pruned = count_flops(tiny_model, "full").total
    unpruned = count_flops(tiny_model, "full", path="unpruned").total
    assert unpruned > 2 * pruned
    # Timing: interleaved runs and the minimum per path, so load from other processes cannot make the pruned
    # path look slower; the margin (expected ~2-2.5x) leaves ample room.
    r = compare_paths("gtpt-t", batch_size=1, repeats=5, warmup=1, model=tiny_model)
    # 5 rounds, more when the spread is wide (gtpt profile adds rounds on a noisy machine)
    assert len(r["times_ms"]["pruned"]) == len(r["times_ms"]["unpruned"]) >= 5
    assert r["speedup_min"] > 1.3, r


def test_speedup_table_pairs_paths():
    mk = lambda p, ms: LatencyResult("gtpt-t", "reference", 1, "fp32", "inference", p, "cpu", median_ms=ms,  # noqa
                                     p20_ms=ms, p80_ms=ms)
    sp = pruning_speedups([mk("pruned", 10.0), mk("unpruned", 25.0)])
    assert len(sp) == 1 and sp[0]["speedup"] == pytest.approx(2.5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown backend"):
        profile(["gtpt-t"], backends=["tensorrt"], progress=None)
    with pytest.raises(ValueError, match="unknown dtype"):
        profile(["gtpt-t"], dtypes=["fp8"], progress=None)
    with pytest.raises(ValueError, match="unknown GTPT variant"):
        profile(["gtpt-q"], progress=None)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton", "cudagraph", "cudagraph-reference"])
def test_cuda_backends(backend):
    r = profile_config("gtpt-s", backend, batch_size=2, dtype="bf16", device="cuda", warmup=2, repeats=3)
    assert r.status == "ok", r.note
    assert r.peak_memory_mb > 0 and r.median_ms > 0


@pytest.mark.gpu
def test_cuda_train_step():
    r = profile_config("gtpt-s", "reference", batch_size=2, mode="train", device="cuda", warmup=1, repeats=2)
    assert r.status == "ok" and r.peak_memory_mb > 0


@pytest.mark.gpu
def test_cuda_op_breakdown_sees_the_fused_kernels():
    # On CUDA the breakdown is kernel time: the Triton backend's attention and pruning kernels show up by name.
    r = profile_config("gtpt-s", "triton", batch_size=2, dtype="bf16", device="cuda", warmup=1, repeats=2,
                       per_stage=False, op_breakdown=True)
    assert r.status == "ok", r.note
    ob = r.op_breakdown
    assert "error" not in ob, ob.get("error")
    assert ob["measure"] == "CUDA kernel time" and ob["total_ms"] > 0
    cats = ob["categories"]
    assert cats.get("fused attention (MHGA kernels)", 0) > 0 and cats.get("fused pruning (token_prune kernel)", 0) > 0
    assert cats.get("GEMM / matmul", 0) > 0
