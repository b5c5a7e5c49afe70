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
