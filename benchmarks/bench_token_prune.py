"""pytest-benchmark cases for the fused pruning op at the GTPT sites (B = 32 / 128, fp32 / bf16).

Run on a GPU machine:  ``python -m pytest benchmarks/bench_token_prune.py --benchmark-group-by=param:case``.
Each case times the fused kernel, the official eager sequence and ``torch.compile`` of it on the same inputs;
the timed callables synchronize the GPU. Cases, inputs and callables come from ``run_token_prune.py`` so the
pytest numbers and the standalone table measure the same code. Without a GPU the timed cases skip; the check
that the eager baseline computes the same selection and rows as the reference runs everywhere (CPU, eager only).
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run_token_prune as rtp  # noqa: E402
from conftest import record_environment  # noqa: E402  (benchmarks/conftest.py: versions, git commit, device)

from gtpt_kernels.reference import token_prune_reference  # noqa: E402

CASES = [(site, B, dt) for site in rtp.SITES for B in (32, 128) for dt in ("fp32", "bf16")]


def _assert_same_selection(index, out, out_pos, r_idx, r_out, r_pos):
    """Same kept set and, row for row once both are put in index order, the same gathered rows."""
    assert torch.equal(index.sort(-1).values, r_idx.sort(-1).values)
    take = lambda t, o: torch.gather(t, 2, o.unsqueeze(-1).expand_as(t))  # noqa: E731
    order, r_order = torch.argsort(index, dim=-1), torch.argsort(r_idx, dim=-1)
    assert torch.equal(take(out, order), take(r_out, r_order))
    assert torch.equal(take(out_pos, order), take(r_pos, r_order))


@pytest.mark.parametrize("site", list(rtp.SITES))
def test_eager_baseline_matches_reference(site):
    """The timed baseline must be the same computation: same kept set, same rows (CPU, fp32, B=2)."""
    inputs = rtp.make_inputs(rtp.SITES[site], 2, torch.float32, "cpu", seed=1)
    args = (inputs["q"], inputs["k"], inputs["tokens"], inputs["pos"], inputs["keep"], inputs["scale"])
    r_out, r_pos, r_idx = token_prune_reference(*args, row_mask=inputs["row_mask"], gate=inputs["gate"],
                                                col_mask=inputs["col_mask"], gate_logits=inputs["gate"] is not None)
    wb = inputs["wholebody"]
    if not wb:
        out, out_pos, index = rtp.official_eager(*args, row_mask=inputs["row_mask"], gate=inputs["gate"])
        _assert_same_selection(index, out, out_pos, r_idx, r_out, r_pos)
        return
    # WholeBody: the official per-group calls against the first keep_g rows of each group of the one-call op.
    outs, poss, idxs = rtp.official_eager_wholebody(*args[:4], inputs["scale"], wb)
    for g, (_, keep) in enumerate(wb):
        sl = slice(g, g + 1)
        _assert_same_selection(idxs[g], outs[g], poss[g], r_idx[:, sl, :keep], r_out[:, sl, :keep],
                               r_pos[:, sl, :keep])


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fused", "eager", "compiled"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-B{c[1]}-{c[2]}")
def test_token_prune_speed(benchmark, case, impl):
    site, B, dt = case
    inputs = rtp.make_inputs(rtp.SITES[site], B, rtp.DTYPES[dt], "cuda")
    fn = rtp.make_callables(inputs, "default", which=(impl,))[impl]
    timed = rtp.synchronized(fn, "cuda")
    for _ in range(10):  # warm-up outside the timing (compilation, autotuning caches, allocator)
        timed()
    record_environment(benchmark, "cuda", site=site, B=B, dtype=dt, impl=impl, gpu=torch.cuda.get_device_name(),
                       q=tuple(inputs["q"].shape), k=tuple(inputs["k"].shape),
                       tokens=tuple(inputs["tokens"].shape), keep=inputs["keep"],
                       launches=rtp.count_launches(fn, "cuda"))
    benchmark.pedantic(timed, rounds=200, iterations=1, warmup_rounds=5)
