"""The GPU benchmark scripts' scheduling, checked on CPU: a GPU session has minutes, so the scripts must run the
cases in priority order (cheap implementations over every case before any compiled baseline), honour their time
budget and still write complete tables when the budget runs out or they are interrupted."""
import importlib
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _bench_module(name):
    sys.path.insert(0, BENCH)
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(BENCH)


@pytest.fixture(scope="module")
def attn():
    return _bench_module("run_group_attention")


@pytest.fixture(scope="module")
def prune():
    return _bench_module("run_token_prune")


def test_attention_plan_cheap_pass_first(attn):
    shapes = [attn.SHAPES[n] for n in ("coarse", "teacher", "coco_fine")]
    plan = attn.case_plan(shapes, [32, 128], ["bf16", "fp32"], list(attn.IMPLS), list(attn.MODES))
    pairs = [(s.name, B, d, m, i) for s, B, d, m, impls in plan for i in impls]
    # every (case, implementation) exactly once
    assert len(pairs) == len(set(pairs)) == 3 * 2 * 2 * 2 * len(attn.IMPLS)
    first_compiled = next(k for k, p in enumerate(pairs) if p[4] not in attn.CHEAP_IMPLS)
    assert all(p[4] in attn.CHEAP_IMPLS for p in pairs[:first_compiled])
    assert all(p[4] not in attn.CHEAP_IMPLS for p in pairs[first_compiled:])
    # inside a pass: the first dtype given, the largest batch, forward, then the target shapes in priority order
    assert [(s.name, B, d, m) for s, B, d, m, _ in plan[:3]] == [
        ("coco_fine", 128, "bf16", "fwd"), ("teacher", 128, "bf16", "fwd"), ("coarse", 128, "bf16", "fwd")]
    assert plan[3][3] == "fwd+bwd"


def test_attention_budget_and_interrupt_still_give_full_tables(attn, monkeypatch):
    shapes = [attn.SHAPES["coco_fine_late"]]
    # budget 0: nothing starts, every row says why
    rows = attn.run_all(shapes, [1], ["fp32"], ["eager", "sdpa"], ["fwd"], "cpu", 1, 1, None, budget_s=0.0)
    assert len(rows) == 2 and all(r["error"].startswith("not run: time budget") for r in rows)
    assert "not run" in attn.to_markdown(rows, {})

    # an interrupt in the middle of the sweep marks the rest, keeps what ran
    calls = []
    real = attn.make_callable

    def interrupting(impl, *a, **kw):
        calls.append(impl)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(impl, *a, **kw)
    monkeypatch.setattr(attn, "make_callable", interrupting)
    rows = attn.run_all(shapes, [1], ["fp32"], ["eager", "sdpa"], ["fwd", "fwd+bwd"], "cpu", 1, 1, None)
    by = {(r["mode"], r["impl"]): r for r in rows}
    assert len(rows) == 4 and "ms" in by[("fwd", "eager")] and by[("fwd", "eager")]["max_err_vs_eager"] == 0
    assert by[("fwd", "sdpa")]["error"] == "interrupted"
    assert by[("fwd+bwd", "eager")]["error"] == by[("fwd+bwd", "sdpa")]["error"] == "not run: interrupted"
    assert [(r["mode"], r["impl"]) for r in rows] == [("fwd", "eager"), ("fwd", "sdpa"), ("fwd+bwd", "eager"),
                                                      ("fwd+bwd", "sdpa")]


def test_prune_plan_compiled_last(prune):
    plan = prune.case_plan(["coarse_L3", "fine_L3"], [32, 128], ["fp32"], compiled=True)
    assert [p[3] for p in plan] == [("fused", "eager")] * 4 + [("compiled",)] * 4
    assert plan[0][:3] == ("fine_L3", 128, "fp32")  # the site with the latency target, largest batch first
    assert prune.case_plan(["fine_L3"], [32], ["fp32"], compiled=False) == [("fine_L3", 32, "fp32",
                                                                              ("fused", "eager"))]


def test_prune_budget_and_interrupt(prune, monkeypatch):
    rows = prune.run(["fine_L3", "coarse_L3"], [1], ["fp32"], "cpu", None, 1, 1, budget_s=0.0)
    assert [r["site"] for r in rows] == ["fine_L3", "coarse_L3"]  # the order given, whatever order they ran in
    assert all(r["error"].startswith("not run: time budget") for r in rows)

    def interrupting(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(prune, "make_callables", interrupting)
    rows = prune.run(["fine_L3", "coarse_L3"], [1], ["fp32"], "cpu", None, 1, 1)
    assert rows[0]["error"] == "interrupted" and rows[1]["error"] == "not run: interrupted"
    assert all(prune.format_row(r) for r in rows)


def test_prune_compiled_pass_keeps_first_pass_figures(prune, monkeypatch):
    """A compiled baseline that fails (here: the budget ends between the passes) leaves the fused/eager figures
    of the case in place and says which part did not run."""
    if not torch.cuda.is_available():
        from gtpt_kernels.backend import interpreter_enabled
        if not interpreter_enabled():
            pytest.skip("the fused op needs a GPU or the Triton interpreter")
    real = prune.make_callables
    seen = []

    def recording(inputs, compile_mode, which):
        seen.append(which)
        if which == ("compiled",):
            raise RuntimeError("no compiler here")
        return real(inputs, compile_mode, which)
    monkeypatch.setattr(prune, "make_callables", recording)
    monkeypatch.setattr(prune, "SITES", dict(prune.SITES, tiny=prune.Site("tiny", G=1, R=2, N=9, keep=4, k_groups=1,
                                                                          dummy_row=False, gate=False, H=2, D=4,
                                                                          C=8)))
    rows = prune.run(["tiny"], [1], ["fp32"], "cpu", "default", 1, 1)
    assert seen == [("fused", "eager"), ("compiled",)]
    (row,) = rows
    assert row["fused"]["median_us"] > 0 and row["eager"]["median_us"] > 0 and row["index_agreement"] == 1.0
    assert row["error"].startswith("RuntimeError: no compiler here")


def test_attention_targets_from_rows(attn):
    def row(shape, mode, impl, ms, peak):
        return dict(shape=shape, B=128, dtype="bf16", mode=mode, impl=impl, ms=ms, peak_mb=peak)
    rows = [row("teacher", "fwd", "fused", 1.0, 10.0), row("teacher", "fwd", "eager", 12.0, 80.0),
            row("teacher", "fwd", "sdpa", 1.2, 20.0),
            row("coco_fine", "fwd", "fused", 1.0, 5.0), row("coco_fine", "fwd", "eager", 8.0, 20.0),
            dict(shape="coco_fine", B=128, dtype="bf16", mode="fwd+bwd", impl="sdpa", error="not run: x")]
    attn._add_ratios(rows)
    t = {x["target"]: x for x in attn.check_targets(rows)}
    fwd_eager = t["forward >= 10x the eager reference"]
    assert (fwd_eager["met"], fwd_eager["measured"]) == (1, 2) and fwd_eager["worst"] == pytest.approx(8.0)
    assert fwd_eager["worst_case"] == "coco_fine B=128 bf16 fwd"
    assert t["forward >= 1.5x the SDPA baseline"]["met"] == 0  # 1.2x
    assert t["forward+backward >= 5x eager"]["measured"] == 0  # nothing measured is not a pass
    mem = t["teacher-pass peak memory >= 5x below eager"]
    assert (mem["met"], mem["measured"]) == (1, 1) and mem["worst"] == pytest.approx(8.0)  # teacher rows only
    floor = t[">= 40% of the memory-bandwidth floor"]
    assert floor["measured"] == 2 and all(0 < r["pct_of_floor"] for r in rows if r["impl"] == "fused")
    md = "\n".join(attn.targets_markdown(list(t.values())))
    assert "| forward+backward >= 5x eager | 0 / 0 | not measured |" in md


def test_prune_targets_from_rows(prune):
    rows = [{"site": "fine_L3", "B": 128, "dtype": "bf16", "fused": {"median_us": 22.0, "launches": 1, "graph_us": 6.0},
             "eager": {"median_us": 60.0}, "speedup_vs_eager": 5.0},
            {"site": "fine_L3", "B": 32, "dtype": "bf16", "fused": {"median_us": 8.0, "launches": 2},
             "eager": {"median_us": 16.0}, "speedup_vs_eager": 2.0},
            {"site": "fine_L3_wholebody", "B": 128, "dtype": "fp32", "fused": {"median_us": 20.0, "launches": 1}},
            {"site": "coarse_L3", "B": 128, "dtype": "fp32", "error": "not run"}]
    t = {x["target"]: x for x in prune.check_targets(rows)}
    assert (t["one kernel launch per site"]["met"], t["one kernel launch per site"]["measured"]) == (2, 3)
    assert t["one kernel launch per site"]["failing"] == ["fine_L3 B=32 bf16: 2"]
    per_call = t[">= 3x the eager sequence (per call)"]
    assert (per_call["met"], per_call["measured"]) == (1, 2)
    assert t[">= 3x the eager sequence (CUDA graph)"]["measured"] == 0  # no graph figures: not a pass
    # host overhead can miss a target the device time meets; both are reported
    assert t["<= 15 us at B = 128 (fine_L3, per call)"]["failing"] == ["fine_L3 B=128 bf16: 22"]
    assert (t["<= 15 us at B = 128 (fine_L3, CUDA graph)"]["met"], t["<= 15 us at B = 128 (fine_L3, CUDA graph)"]
            ["measured"]) == (1, 1)
    assert t["<= 15 us at B = 128 (fine_L3_wholebody, per call)"]["failing"] == ["fine_L3_wholebody B=128 fp32: 20"]
    assert t["<= 15 us at B = 128 (fine_L3_wholebody, CUDA graph)"]["measured"] == 0
    md = prune.targets_markdown(list(t.values()))
    assert "| >= 3x the eager sequence (per call) | 1 / 2 | fine_L3 B=32 bf16: 2 |" in md


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("pad", [True, False])
def test_attention_baselines_compute_the_reference(attn, pad):
    # The SDPA and FlexAttention baselines must compute exactly what the op computes (every row, the pad query
    # row's uniform softmax included), or the speed-ups compare different work.
    from gtpt_kernels.reference import group_attention_reference
    shape = attn.Shape("t", G=3, N=9, S=6 if pad else 2, pad=pad, heads=2, dim=32)
    qkv = torch.randn(2, shape.G, shape.N, 3 * shape.dim, dtype=torch.float64)
    scale = shape.dim ** -0.5
    ref = group_attention_reference(qkv, shape.heads, shape.S, scale, pad)
    sdpa = attn.make_callable("sdpa", shape, 2, torch.float64, "cpu")(qkv)
    torch.testing.assert_close(sdpa, ref, rtol=1e-10, atol=1e-10)
    flex = attn.make_flex(shape, 2, "cpu", scale, compiled=False)(qkv.float())
    torch.testing.assert_close(flex, ref.float(), rtol=1e-5, atol=1e-5)


# run_gpu.sh (the GPU session) is tested in tests/test_gpu_session.py.
