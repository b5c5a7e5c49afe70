"""Tests of the fused softmax-pool scoring / top-k / gather kernel (gtpt_kernels.ops.token_prune).

On a CPU machine the Triton kernel runs in the interpreter (conftest sets TRITON_INTERPRET=1), so shapes are
small: B <= 2 and few heads except for the three GTPT site shapes. The contract is
gtpt_kernels.reference: scores within 1e-5 relative of fp64, the kept index equal to the reference's stable
descending order of the kernel's own scores (and the kept *set* equal to torch.topk of the fp64 scores on
inputs without near-ties), gathered rows bit-exact, gradients equal to reference autograd.
"""
from __future__ import annotations

import pytest
import torch

from gtpt_kernels import TokenPrune, keep_count, softmax_pool_scores, token_prune
from gtpt_kernels.ops import token_prune as tp_mod
from gtpt_kernels.reference import (gather_tokens_reference, softmax_pool_scores_reference, split_qkv,
                                    token_prune_reference, topk_indices_reference)
from gtpt_kernels.testing import assert_close, poison_

SCALE = 192 ** -0.5  # GTPT scales by the model dim


def make_site(B, G, H, R, D, N, C, *, k_groups=None, tok_groups=None, dtype=torch.float32, device="cpu",
              row_mask=None, gate=False, pos=True, seed=0, spread=3.0):
    """Inputs of one pruning site laid out like the model's: q and k are strided views of packed to_qkv
    outputs (B, G, tokens, 3*H*D) (q the first R rows, k the N visual rows), tokens/pos slices of a wider
    buffer, so no input is contiguous. ``spread`` scales q so logits span a few units (distinct scores)."""
    gen = torch.Generator().manual_seed(seed)
    kg = G if k_groups is None else k_groups
    tg = G if tok_groups is None else tok_groups

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)

    q_src = rnd(B, G, R + 2, 3 * H * D, scale=spread)
    k_src = rnd(B, kg, N + 1, 3 * H * D)
    q = split_qkv(q_src, H)[0][:, :, :, 1:R + 1]   # (B, G, H, R, D) view
    k = split_qkv(k_src, H)[1][:, :, :, 1:]         # (B, kg, H, N, D) view
    tokens = rnd(B, tg, N, C + 3)[..., 2:C + 2]      # non-contiguous channel slice
    p = rnd(B, tg, N, C + 3)[..., 1:C + 1] if pos else None
    g = torch.rand(B, G, N, C, generator=gen).to(dtype=dtype, device=device) if gate else None
    return dict(q=q, k=k, tokens=tokens, pos=p, gate=g, row_mask=row_mask)


def dummy_row_mask(G, R, device="cpu"):
    """GTPT's COCO layout: row 0 of group 0 is the padded dummy row."""
    m = torch.ones(G, R, dtype=torch.bool, device=device)
    m[0, 0] = False
    return m


def ref_scores64(inp):
    return softmax_pool_scores_reference(inp["q"].double(), inp["k"].double(), SCALE, inp["row_mask"])


def run_prune(inp, keep, backend="triton"):
    return token_prune(inp["q"], inp["k"], inp["tokens"], inp["pos"], keep, SCALE, row_mask=inp["row_mask"],
                       gate=inp["gate"], backend=backend)


def expected_rows(inp, index):
    """Reference gather (and gate product) with the kernel's own index: what the kernel must write bit-exactly."""
    out = gather_tokens_reference(inp["tokens"], index)
    out_pos = gather_tokens_reference(inp["pos"], index) if inp["pos"] is not None else None
    if inp["gate"] is not None:
        g = gather_tokens_reference(inp["gate"], index)
        out = out * g
        out_pos = out_pos * g if out_pos is not None else None
    return out, out_pos


def assert_topk_set(scores64, index, keep, min_gap=1e-4):
    """Kept set == torch.topk of the fp64 scores; the inputs must have no near-tie at the cut (checked)."""
    srt = scores64.sort(dim=-1, descending=True).values
    if keep < scores64.shape[-1]:
        gap = (srt[..., keep - 1] - srt[..., keep]).min().item()
        assert gap > min_gap, f"test inputs have a near-tie at the cut (gap {gap:.2e}); pick another seed"
    want = torch.topk(scores64, keep, dim=-1).indices.sort(dim=-1).values
    assert torch.equal(index.sort(dim=-1).values, want)


# name: (B, G, H, R, D, N, C, k_groups, tok_groups, keep, row_mask, gate)
SITES = {
    "coarse_L3": (2, 1, 8, 1, 24, 256, 192, 1, 1, 179, False, False),
    "fine_entry": (2, 3, 8, 6, 24, 179, 192, 1, 1, 76, True, True),
    "fine_L3": (2, 3, 8, 6, 24, 76, 192, 3, 3, 25, True, False),
}


@pytest.mark.parametrize("site", list(SITES))
def test_gtpt_sites(site, device):
    B, G, H, R, D, N, C, kg, tg, keep, rm, gate = SITES[site]
    inp = make_site(B, G, H, R, D, N, C, k_groups=kg, tok_groups=tg, gate=gate, device=device,
                    row_mask=dummy_row_mask(G, R, device) if rm else None, seed=1)
    out, out_pos, index = run_prune(inp, keep)
    assert index.dtype == torch.int64 and index.shape == (B, G, keep)
    s64 = ref_scores64(inp)
    assert_topk_set(s64, index.cpu(), keep)
    scores = softmax_pool_scores(inp["q"], inp["k"], SCALE, inp["row_mask"], backend="triton")
    assert_close(scores, s64, rtol=1e-5, what="scores")
    assert torch.equal(index, topk_indices_reference(scores, keep))
    want_out, want_pos = expected_rows(inp, index)
    assert torch.equal(out, want_out) and torch.equal(out_pos, want_pos)
    # And the whole thing against the reference op.
    r_out, r_pos, r_idx = token_prune_reference(inp["q"], inp["k"], inp["tokens"], inp["pos"], keep, SCALE,
                                                inp["row_mask"], inp["gate"])
    assert torch.equal(index, r_idx) and torch.equal(out, r_out) and torch.equal(out_pos, r_pos)


def test_wholebody_fine_entry(device):
    """WholeBody: groups with 6/8/8 rows padded to 8 via row_mask; keep = max over groups."""
    B, G, H, R, D, N, C = 1, 3, 8, 8, 24, 179, 16
    rm = torch.ones(G, R, dtype=torch.bool, device=device)
    rm[0, 6:] = False
    inp = make_site(B, G, H, R, D, N, C, k_groups=1, tok_groups=1, gate=True, row_mask=rm, device=device, seed=2)
    out, out_pos, index = run_prune(inp, 122)
    assert_topk_set(ref_scores64(inp), index.cpu(), 122)
    r_out, r_pos, r_idx = token_prune_reference(inp["q"], inp["k"], inp["tokens"], inp["pos"], 122, SCALE, rm,
                                                inp["gate"])
    assert torch.equal(index, r_idx) and torch.equal(out, r_out) and torch.equal(out_pos, r_pos)


def wholebody_l3_masks(R, N, leads, device="cpu"):
    """WholeBody fine layer 3 in one call: group g ranks by its first ``leads[g]`` rows (row 0 of group 0 is the
    dummy) and may keep only the columns past its own leading rows (offset by the smallest lead)."""
    G = len(leads)
    rows = torch.zeros(G, R, dtype=torch.bool, device=device)
    cols = torch.zeros(G, N, dtype=torch.bool, device=device)
    for g, lead in enumerate(leads):
        rows[g, :lead] = True
        cols[g, lead - min(leads):] = True
    rows[0, 0] = False
    return rows, cols


def test_wholebody_fine_l3_col_mask(device):
    """Three groups with different row counts and candidate ranges (GTPT-S WholeBody: leads 74/48/12 rows,
    60/86/122 candidates, keeps 8/34/70) in one launch: each group's first keep_g rows are exactly what a
    separate call on its own rows and candidates keeps, and masked columns only ever fill the tail."""
    B, H, D, C = 2, 8, 24, 16
    leads, keeps = (74, 48, 12), (8, 34, 70)
    R, N = max(leads), 134 - min(leads)
    rows, cols = wholebody_l3_masks(R, N, leads, device)
    inp = make_site(B, 3, H, R, D, N, C, k_groups=3, tok_groups=3, row_mask=rows, device=device, seed=21)
    out, out_pos, index = token_prune(inp["q"], inp["k"], inp["tokens"], inp["pos"], max(keeps), SCALE,
                                      row_mask=rows, col_mask=cols, backend="triton")
    r_out, r_pos, r_idx = token_prune_reference(inp["q"], inp["k"], inp["tokens"], inp["pos"], max(keeps), SCALE,
                                                rows, col_mask=cols)
    assert torch.equal(index, r_idx) and torch.equal(out, r_out) and torch.equal(out_pos, r_pos)
    scores = softmax_pool_scores(inp["q"], inp["k"], SCALE, rows, backend="triton", col_mask=cols)
    s64 = softmax_pool_scores_reference(inp["q"].double(), inp["k"].double(), SCALE, rows, cols)
    assert torch.equal(torch.isinf(scores), ~cols.expand(B, -1, -1))
    assert_close(scores[:, cols], s64[:, cols], rtol=1e-5, what="scores")
    for g, (lead, keep) in enumerate(zip(leads, keeps)):
        off = lead - min(leads)
        sep = token_prune_reference(inp["q"][:, g:g + 1, :, :lead], inp["k"][:, g:g + 1, :, off:],
                                    inp["tokens"][:, g:g + 1, off:], inp["pos"][:, g:g + 1, off:], keep, SCALE,
                                    rows[g:g + 1, :lead])
        assert torch.equal(index[:, g, :keep], sep[2][:, 0] + off)
        assert torch.equal(out[:, g, :keep], sep[0][:, 0]) and torch.equal(out_pos[:, g, :keep], sep[1][:, 0])
    # Group 0 has 60 candidates and keeps 70 slots: the last 10 are its excluded columns, lowest index first.
    assert torch.equal(index[:, 0, 60:], torch.arange(10, device=device).expand(B, 10))


# Odd sizes: (B, G, H, R, D, N, C, k_groups, tok_groups, keep, row_mask, gate, pos)
ODD = [
    (1, 1, 2, 1, 16, 1, 8, 1, 1, 1, False, False, True),     # N = 1
    (2, 1, 1, 3, 5, 5, 3, 1, 1, 5, False, True, True),       # keep = N, odd D / C
    (1, 3, 2, 2, 24, 37, 40, 1, 1, 7, True, True, False),    # broadcast k + tokens, no pos, gate
    (2, 3, 2, 8, 16, 37, 70, 3, 1, 36, True, False, True),   # R = 8, tokens broadcast only
    (1, 3, 3, 7, 24, 179, 65, 3, 3, 76, False, False, True), # R = 7, C just over a tile
    (1, 2, 2, 4, 24, 33, 64, 2, 2, 32, True, True, True),    # N just over a 32-row chunk
    (1, 2, 2, 3, 24, 65, 16, 1, 2, 40, True, True, True),    # N just over a 64-column score chunk
    (1, 1, 1, 5, 8, 262, 4, 1, 1, 262, False, False, True),  # N > 256 (teacher-pass width), R = 5, keep all
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", ODD, ids=lambda s: "B{}G{}H{}R{}D{}N{}C{}k{}".format(*s[:7], s[9]))
def test_odd_shapes(shape, dtype, device):
    B, G, H, R, D, N, C, kg, tg, keep, rm, gate, pos = shape
    inp = make_site(B, G, H, R, D, N, C, k_groups=kg, tok_groups=tg, gate=gate, pos=pos, dtype=dtype,
                    device=device, row_mask=dummy_row_mask(G, R, device) if rm else None, seed=3)
    scores = softmax_pool_scores(inp["q"], inp["k"], SCALE, inp["row_mask"], backend="triton")
    assert scores.dtype == torch.float32 and scores.shape == (B, G, N)
    # fp16 inputs are upcast exactly, so fp32 accuracy holds against fp64 of the same fp16 values.
    assert_close(scores, ref_scores64(inp), rtol=1e-5, what="scores")
    out, out_pos, index = run_prune(inp, keep)
    assert torch.equal(index, topk_indices_reference(scores, keep))
    assert_topk_set(ref_scores64(inp), index.cpu(), keep)
    want_out, want_pos = expected_rows(inp, index)
    assert out.dtype == want_out.dtype and torch.equal(out, want_out)
    if pos:
        assert out_pos.dtype == want_pos.dtype and torch.equal(out_pos, want_pos)
    else:
        assert out_pos is None


@pytest.mark.parametrize("tok_dtype,gate_dtype", [(torch.float64, torch.float64), (torch.float16, torch.float32),
                                                   (torch.float32, torch.float16)])
def test_mixed_and_fp64_dtypes(tok_dtype, gate_dtype, device):
    """Outputs take the reference's promoted dtype and stay bit-exact (fp64 multiplies in fp64)."""
    inp = make_site(1, 3, 2, 2, 16, 37, 9, k_groups=1, tok_groups=1, gate=True, device=device, seed=18)
    inp["tokens"] = inp["tokens"].to(tok_dtype)
    inp["pos"] = inp["pos"].to(tok_dtype)
    inp["gate"] = inp["gate"].to(gate_dtype)
    out, out_pos, index = run_prune(inp, 13)
    want_out, want_pos = expected_rows(inp, index)
    assert out.dtype == want_out.dtype == torch.promote_types(tok_dtype, gate_dtype)
    assert torch.equal(out, want_out) and torch.equal(out_pos, want_pos)
    # Gradients come back in each input's own dtype, equal to reference autograd's.
    leaves = {n: inp[n].detach().clone().requires_grad_(True) for n in ("tokens", "pos", "gate")}
    w = torch.randn(1, 3, 13, 9, generator=torch.Generator().manual_seed(19)).to(device)
    kern = lambda *a: token_prune(*a, backend="triton")  # noqa: E731
    _, g_k = _grads(kern, inp, leaves, 13, w, -w)
    _, g_r = _grads(token_prune_reference, inp, leaves, 13, w, -w)
    for n in leaves:
        assert g_k[n].dtype == leaves[n].dtype and torch.equal(g_k[n], g_r[n]), n


def test_tie_rule(device):
    """Exact ties (duplicate key rows give bit-identical scores): lower index wins and comes first."""
    B, G, H, R, D, N, C = 1, 2, 2, 3, 16, 37, 8
    inp = make_site(B, G, H, R, D, N, C, k_groups=1, tok_groups=1, device=device, seed=4)
    keep = 10
    order = topk_indices_reference(ref_scores64(inp), N)[0, 0]  # group 0's full ranking
    k = inp["k"].clone()
    # Straddle the cut: a dropped token with a lower index than the last kept one becomes its duplicate, so
    # the lower one must take the last slot. Inside the kept set, two other kept tokens become duplicates of
    # the best one (the kept set is unchanged by that) and must follow it in index order.
    last = int(order[keep - 1])
    lower_dropped = [int(n) for n in order[keep:] if int(n) < last]
    assert lower_dropped, "seed gives no lower-index dropped token"
    lo = lower_dropped[0]
    k[:, :, :, lo] = k[:, :, :, last]
    best = int(order[0])
    dups = [int(n) for n in order[1:keep - 1]][:2]
    for n in dups:
        k[:, :, :, n] = k[:, :, :, best]
    inp["k"] = k
    scores = softmax_pool_scores(inp["q"], k, SCALE, backend="triton")
    assert scores[0, 0, lo] == scores[0, 0, last] and all(scores[0, 0, n] == scores[0, 0, best] for n in dups)
    out, out_pos, index = run_prune(inp, keep)
    idx = index[0, 0].tolist()
    assert lo in idx and last not in idx
    tied = sorted([best] + dups)
    pos_of = [idx.index(n) for n in tied]
    assert pos_of == sorted(pos_of) and pos_of[-1] - pos_of[0] == len(tied) - 1, "ties not in index order"
    assert torch.equal(index, topk_indices_reference(scores, keep))
    assert torch.equal(index, token_prune_reference(inp["q"], k, inp["tokens"], inp["pos"], keep, SCALE)[2])


def test_all_equal_scores(device):
    """q = 0: every logit and score is 0, so the selection is the first `keep` tokens in index order."""
    inp = make_site(2, 3, 2, 2, 8, 37, 5, device=device, seed=5)
    inp["q"] = torch.zeros_like(inp["q"])
    out, out_pos, index = run_prune(inp, 20)
    assert torch.equal(index, torch.arange(20, device=device).expand(2, 3, 20))
    assert torch.equal(out, inp["tokens"][:, :, :20]) and torch.equal(out_pos, inp["pos"][:, :, :20])


def test_row_mask_excludes_rows(device):
    """An excluded row must not influence the scores, however large its logits."""
    G, R = 3, 4
    rm = dummy_row_mask(G, R, device)
    inp = make_site(1, G, 2, R, 16, 37, 8, row_mask=rm, device=device, seed=6)
    base = softmax_pool_scores(inp["q"], inp["k"], SCALE, rm, backend="triton")
    rm_t = rm.t().contiguous().t()  # same values, transposed strides
    assert torch.equal(softmax_pool_scores(inp["q"], inp["k"], SCALE, rm_t, backend="triton"), base)
    q2 = inp["q"].clone()
    q2[:, 0, :, 0] *= 1000.0  # only the excluded (g=0, r=0) row changes
    assert torch.equal(softmax_pool_scores(q2, inp["k"], SCALE, rm, backend="triton"), base)
    # ...while with the row included the scores do change (so the test can fail).
    assert not torch.equal(softmax_pool_scores(q2, inp["k"], SCALE, None, backend="triton"),
                           softmax_pool_scores(inp["q"], inp["k"], SCALE, None, backend="triton"))


def test_large_logits_no_overflow(device):
    """Logits in the hundreds: the online max keeps exp() finite."""
    inp = make_site(1, 3, 2, 3, 16, 37, 8, spread=400.0, device=device, seed=7)
    scores = softmax_pool_scores(inp["q"], inp["k"], SCALE, backend="triton")
    assert_close(scores, ref_scores64(inp), rtol=1e-5, what="scores")


def test_poisoned_outputs_fully_written(device):
    """Launch into NaN / -1 prefilled buffers: every element of every output must be overwritten."""
    B, G, H, R, D, N, C, keep = 2, 3, 2, 3, 16, 37, 70, 33
    inp = make_site(B, G, H, R, D, N, C, k_groups=1, tok_groups=1, gate=True, device=device,
                    row_mask=dummy_row_mask(G, R, device), seed=8)
    scores = poison_(torch.empty(B, G, N, device=device))
    out = poison_(torch.empty(B, G, keep, C, device=device))
    out_pos = poison_(torch.empty(B, G, keep, C, device=device))
    index = torch.full((B, G, keep), -1, dtype=torch.int64, device=device)
    tp_mod._launch(inp["q"], inp["k"], inp["row_mask"], SCALE, scores, tokens=inp["tokens"], pos=inp["pos"],
                   gate=inp["gate"], out=out, out_pos=out_pos, index=index)
    assert torch.isfinite(scores).all() and torch.isfinite(out).all() and torch.isfinite(out_pos).all()
    assert (index >= 0).all() and (index < N).all()
    assert torch.equal(index, topk_indices_reference(scores, keep))
    want_out, want_pos = expected_rows(inp, index)
    assert torch.equal(out, want_out) and torch.equal(out_pos, want_pos)
    only_scores = poison_(torch.empty(B, G, N, device=device))
    tp_mod._launch(inp["q"], inp["k"], inp["row_mask"], SCALE, only_scores)
    assert torch.equal(only_scores, scores)


def _grad_case(dtype, device, gate=True, seed=9):
    # Broadcast tokens/pos (B, 1, N, C) with G = 3 exercises the group reduction of the scatter backward.
    inp = make_site(2, 3, 2, 3, 16, 37, 12, k_groups=1, tok_groups=1, gate=gate, dtype=dtype, device=device,
                    row_mask=dummy_row_mask(3, 3, device), seed=seed)
    leaves = {}
    for name in ("tokens", "pos", "gate"):
        if inp[name] is not None:
            leaves[name] = inp[name].detach().clone().requires_grad_(True)
    return inp, leaves


def _grads(fn, inp, leaves, keep, w_out, w_pos):
    args = {**inp, **leaves}
    out, out_pos, index = fn(args["q"], args["k"], args["tokens"], args["pos"], keep, SCALE,
                             args["row_mask"], args["gate"])
    loss = (out.float() * w_out).sum() + (out_pos.float() * w_pos).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return index, dict(zip(leaves, grads))


@pytest.mark.parametrize("gate", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gradients_match_reference(dtype, gate, device):
    inp, leaves = _grad_case(dtype, device, gate=gate)
    keep = 17
    gen = torch.Generator().manual_seed(10)
    w_out = torch.randn(2, 3, keep, 12, generator=gen).to(device)
    w_pos = torch.randn(2, 3, keep, 12, generator=gen).to(device)
    kern = lambda *a: token_prune(*a, backend="triton")  # noqa: E731
    idx_k, g_k = _grads(kern, inp, leaves, keep, w_out, w_pos)
    idx_r, g_r = _grads(token_prune_reference, inp, leaves, keep, w_out, w_pos)
    assert torch.equal(idx_k, idx_r)
    for name in leaves:
        assert g_k[name].dtype == leaves[name].dtype and g_k[name].shape == leaves[name].shape
        assert torch.equal(g_k[name], g_r[name]), f"grad of {name} differs"
    # The scatter really targets the kept rows: dropped tokens get zero gradient, kept ones (almost surely) not.
    kept = torch.zeros(2, 37, dtype=torch.bool, device=device)
    for b in range(2):
        kept[b, idx_k[b].flatten()] = True
    row_norm = g_k["tokens"].abs().sum(-1)[:, 0]
    assert (row_norm[~kept] == 0).all() and (row_norm[kept] > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_gate_logits_fused_sigmoid(dtype, device):
    """gate_logits=True: the kernel applies the sigmoid to the kept gate rows itself. Same selection; rows and
    gradients (tokens, pos and the logits, through sigmoid_backward) match the reference, which takes
    torch.sigmoid of the whole gate first. The kernel's sigmoid may differ from torch's by an ulp (a different
    exp), hence closeness instead of bit equality."""
    inp, leaves = _grad_case(dtype, device, gate=True, seed=12)
    with torch.no_grad():
        leaves["gate"].normal_(0.0, 3.0)  # logits spanning the sigmoid's range
    keep = 17
    gen = torch.Generator().manual_seed(11)
    w_out = torch.randn(2, 3, keep, 12, generator=gen).to(device)
    w_pos = torch.randn(2, 3, keep, 12, generator=gen).to(device)
    kern = lambda *a: token_prune(*a, backend="triton", gate_logits=True)  # noqa: E731
    ref = lambda *a: token_prune_reference(*a, gate_logits=True)  # noqa: E731
    args = {**inp, **leaves}
    call = (args["q"], args["k"], args["tokens"], args["pos"], keep, SCALE, args["row_mask"], args["gate"])
    k_out, k_pos, k_idx = kern(*call)
    r_out, r_pos, r_idx = ref(*call)
    assert torch.equal(k_idx, r_idx)
    assert_close(k_out, r_out, what="gated tokens")
    assert_close(k_pos, r_pos, what="gated pos")
    idx_k, g_k = _grads(kern, inp, leaves, keep, w_out, w_pos)
    idx_r, g_r = _grads(ref, inp, leaves, keep, w_out, w_pos)
    for name in leaves:
        assert g_k[name].dtype == leaves[name].dtype and g_k[name].shape == leaves[name].shape
        assert_close(g_k[name], g_r[name], what=f"grad of {name}")
    # Only the kept rows of the logits get a gradient.
    kept = torch.zeros(2, 3, 37, dtype=torch.bool, device=device)
    kept.scatter_(2, idx_k, True)
    assert (g_k["gate"].abs().sum(-1)[~kept] == 0).all() and (g_k["gate"].abs().sum(-1)[kept] > 0).all()
    with pytest.raises(ValueError, match="gate_logits"):
        token_prune(*call[:7], None, backend="triton", gate_logits=True)


def test_no_grad_to_q_k_and_pos_none(device):
    inp, leaves = _grad_case(torch.float32, device)
    q = inp["q"].detach().clone().requires_grad_(True)
    out, out_pos, index = token_prune(q, inp["k"], leaves["tokens"], None, 5, SCALE, inp["row_mask"],
                                      leaves["gate"], backend="triton")
    assert out_pos is None and out.requires_grad and not index.requires_grad
    d_tok, d_gate = torch.autograd.grad(out.sum(), [leaves["tokens"], leaves["gate"]])
    r_out, _, _ = token_prune_reference(q, inp["k"], leaves["tokens"], None, 5, SCALE, inp["row_mask"],
                                        leaves["gate"])
    r_tok, r_gate = torch.autograd.grad(r_out.sum(), [leaves["tokens"], leaves["gate"]])
    assert torch.equal(d_tok, r_tok) and torch.equal(d_gate, r_gate)
    assert q.grad is None


def test_deterministic(device):
    inp, leaves = _grad_case(torch.float32, device, seed=11)
    runs = []
    for _ in range(2):
        args = {**inp, **leaves}
        out, out_pos, index = token_prune(args["q"], args["k"], args["tokens"], args["pos"], 9, SCALE,
                                          args["row_mask"], args["gate"], backend="triton")
        grads = torch.autograd.grad(out.sum() + 2 * out_pos.sum(), list(leaves.values()))
        runs.append((out, out_pos, index) + tuple(grads))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_module_and_auto_backend(device):
    inp = make_site(1, 3, 2, 2, 16, 37, 8, gate=True, row_mask=dummy_row_mask(3, 2, device), device=device, seed=12)
    mod = TokenPrune(keep=11, scale=SCALE, backend="triton")
    assert "keep=11" in repr(mod)
    out, out_pos, index = mod(inp["q"], inp["k"], inp["tokens"], inp["pos"], inp["row_mask"], inp["gate"])
    a_out, a_pos, a_idx = run_prune(inp, 11, backend=None)  # auto: the interpreter / CUDA picks triton
    r_out, r_pos, r_idx = run_prune(inp, 11, backend="reference")
    for x, y, z in ((out, a_out, r_out), (out_pos, a_pos, r_pos), (index, a_idx, r_idx)):
        assert torch.equal(x, y) and torch.equal(x, z)


def test_opcheck(device):
    """torch.library consistency: schema, fake impl (shapes / dtypes), autograd registration."""
    inp = make_site(1, 3, 2, 2, 16, 9, 4, k_groups=1, tok_groups=1, gate=True, row_mask=dummy_row_mask(3, 2, device),
                    device=device, seed=13)
    tokens = inp["tokens"].detach().clone().requires_grad_(True)
    col_mask = torch.ones(3, 9, dtype=torch.bool, device=device)
    col_mask[1, :2] = False
    for cm in (None, col_mask):
        args = (inp["q"], inp["k"], tokens, inp["pos"], inp["gate"], inp["row_mask"], cm, 4, SCALE, cm is not None)
        torch.library.opcheck(torch.ops.gtpt_kernels.token_prune.default, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
        torch.library.opcheck(torch.ops.gtpt_kernels.softmax_pool_scores.default,
                              (inp["q"], inp["k"], inp["row_mask"], cm, SCALE),
                              test_utils=("test_schema", "test_faketensor"))


def test_keep_count():
    assert [keep_count(r) for r in (0.7, 0.3, 0.1)] == [179, 76, 25]
    assert [keep_count(0.5, 256, nd) for nd in (68, 42, 6)] == [60, 86, 122]
    assert keep_count(1.0) == 256
    import numpy as np
    assert keep_count(np.float32(0.7)) == keep_count(np.float64(0.7)) == 179  # numpy rates are rates
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="keep rate must be in"):
            keep_count(bad)
    for bad in ("0.5", True, None):
        with pytest.raises(TypeError, match="keep rate must be a real number"):
            keep_count(bad)
    with pytest.raises(ValueError):
        keep_count(0.01, 256, 3)  # keeps 2 - 3 < 1
    with pytest.raises(ValueError, match="num_dense must be a non-negative int"):
        keep_count(1.0, 256, -1)  # would keep 257 of 256
    with pytest.raises(ValueError, match="num_tokens"):
        keep_count(0.5, 256.0)


def test_errors(device):
    inp = make_site(1, 3, 2, 2, 16, 9, 4, k_groups=1, tok_groups=1, gate=True, device=device, seed=14)
    q, k, tok, pos, gate = inp["q"], inp["k"], inp["tokens"], inp["pos"], inp["gate"]

    def call(**kw):
        a = dict(q=q, k=k, tokens=tok, pos=pos, keep=4, scale=SCALE, row_mask=None, gate=gate, backend="triton")
        a.update(kw)
        return token_prune(**a)

    for keep in (0, -1, 10):
        with pytest.raises(ValueError, match="keep"):
            call(keep=keep)
    with pytest.raises(TypeError, match="keep"):
        call(keep=4.0)
    with pytest.raises(ValueError):
        call(k=k[:, :, :1])                         # head count mismatch
    with pytest.raises(ValueError, match="does not match"):
        call(k=k.expand(1, 2, *k.shape[2:]))          # k group dim neither 1 nor G
    with pytest.raises(ValueError, match="does not match"):
        call(k=k[..., :8])                           # head dim mismatch
    with pytest.raises(ValueError, match="no query rows"):
        call(q=q[:, :, :, :0])                       # R = 0: nothing to score with (the kernel would give NaN)
    with pytest.raises(ValueError, match="tokens"):
        call(tokens=tok[:, :, :8])                   # wrong N
    with pytest.raises(ValueError, match="pos"):
        call(pos=pos[:, :, :, :3])                   # wrong channels
    with pytest.raises(ValueError, match="gate"):
        call(gate=gate[:, :1])                       # gate must be per group
    with pytest.raises(ValueError, match="gate"):
        call(gate=gate.unsqueeze(3))                 # (B, G, N, 1, C): 5-D, the kernel would misread its strides
    with pytest.raises(ValueError, match="row_mask"):
        call(row_mask=torch.ones(3, 3, dtype=torch.bool))
    bad = torch.ones(3, 2, dtype=torch.bool)
    bad[1] = False
    with pytest.raises(ValueError, match="without any query row"):
        call(row_mask=bad)
    # The check is cached per mask tensor; an in-place change must invalidate the cache.
    good = torch.ones(3, 2, dtype=torch.bool)
    call(row_mask=good)
    good[2] = False
    with pytest.raises(ValueError, match="without any query row"):
        call(row_mask=good)
    with pytest.raises(TypeError):
        call(k=k.double())
    with pytest.raises(TypeError, match="gate"):
        call(gate=(gate > 0.5))
    with pytest.raises(ValueError, match="tokens is on meta"):
        call(tokens=tok.to("meta"))
    with pytest.raises(ValueError, match="gate is on meta"):
        call(gate=gate.to("meta"))
    with pytest.raises(ValueError, match="different devices"):
        call(k=k.to("meta"))
    with pytest.raises(ValueError):
        softmax_pool_scores(q, k.transpose(1, 2), SCALE, backend="triton")
    for bad_cols in (torch.ones(3, 8, dtype=torch.bool), torch.ones(1, 9, dtype=torch.bool), torch.ones(3, 9)):
        with pytest.raises(ValueError, match="col_mask"):
            call(col_mask=bad_cols.to(device))
        with pytest.raises(ValueError, match="col_mask"):
            softmax_pool_scores(q, k, SCALE, backend="triton", col_mask=bad_cols.to(device))


def test_row_mask_with_non_unit_row_stride(device):
    # An irregular mask read through a transposed layout (strides (1, G)): the kernel must use both mask strides.
    G, R = 3, 4
    rm = torch.tensor([[False, True, True, False], [True, False, True, True], [True, True, False, True]])
    rm_t = rm.t().contiguous().t()
    assert rm_t.stride() == (1, G) and torch.equal(rm_t, rm)
    inp = make_site(1, G, 2, R, 16, 37, 8, row_mask=rm, seed=6, device=device)
    want = softmax_pool_scores_reference(inp["q"].double(), inp["k"].double(), SCALE, rm.to(device))
    for m in (rm, rm_t):
        got = softmax_pool_scores(inp["q"], inp["k"], SCALE, m.to(device), backend="triton")
        assert_close(got, want, rtol=1e-5, what="scores")


def test_signed_zero_scores_tie_in_index_order(device):
    # Logits so small that every score underflows to +0 or -0: all tie, so the kept index is 0..keep-1 (-0 must
    # not rank below +0).
    inp = make_site(1, 2, 8, 8, 8, 37, 5, seed=5, device=device)
    q = inp["q"] * 1e-45
    s = softmax_pool_scores(q, inp["k"], SCALE, backend="triton")
    assert (s == 0).all()
    _, _, index = token_prune(q, inp["k"], inp["tokens"], inp["pos"], 20, SCALE, backend="triton")
    assert torch.equal(index.cpu(), torch.arange(20).expand(1, 2, 20))


def test_bf16_fused_sigmoid_rounds_to_nearest(device):
    # Tokens of 1: the kept rows are the gate itself, sigmoid(logits) rounded to bf16 - equal to the reference's
    # almost everywhere (an ulp apart at most, from fp32 sigmoid differences), never truncated.
    inp = make_site(2, 3, 2, 3, 16, 37, 64, k_groups=1, tok_groups=1, gate=True, dtype=torch.bfloat16, seed=12,
                    device=device)
    gate = (inp["gate"].float() * 6 - 3).to(torch.bfloat16)
    ones = torch.ones_like(inp["tokens"])
    got = token_prune(inp["q"], inp["k"], ones, None, 17, SCALE, gate=gate, backend="triton", gate_logits=True)[0]
    want = token_prune_reference(inp["q"], inp["k"], ones, None, 17, SCALE, gate=gate, gate_logits=True)[0]
    assert (got == want).float().mean() > 0.95, (got == want).float().mean()


def test_row_mask_made_in_inference_mode(device):
    # Inference tensors have no version counter: the once-per-mask check must still run (every call) and work.
    inp = make_site(1, 3, 2, 2, 16, 9, 4, k_groups=1, tok_groups=1, device=device, seed=14)
    with torch.inference_mode():
        mask = torch.ones(3, 2, dtype=torch.bool, device=device)
        bad = mask.clone()
        bad[1] = False
    for backend in ("reference", "triton"):
        out = token_prune(inp["q"], inp["k"], inp["tokens"], inp["pos"], 4, SCALE, row_mask=mask, backend=backend)
        assert out[0].shape == (1, 3, 4, 4)
        with pytest.raises(ValueError, match="without any query row"):
            token_prune(inp["q"], inp["k"], inp["tokens"], inp["pos"], 4, SCALE, row_mask=bad, backend=backend)


def test_forward_mode_autodiff_goes_to_the_reference(device):
    # The kernel has no forward-mode rule (torch would return zero tangents silently): "auto" runs the reference
    # under jvp / dual tensors, an explicit "triton" refuses.
    inp = make_site(1, 3, 2, 2, 16, 9, 4, k_groups=1, tok_groups=1, gate=True, device=device, seed=14)
    t_tok = torch.randn_like(inp["tokens"])

    def f(backend):
        return lambda tok: token_prune(inp["q"], inp["k"], tok, inp["pos"], 4, SCALE, gate=inp["gate"],
                                       backend=backend)[0]
    _, want = torch.func.jvp(f("reference"), (inp["tokens"],), (t_tok,))
    assert want.abs().sum() > 0
    _, got = torch.func.jvp(f("auto"), (inp["tokens"],), (t_tok,))
    assert torch.equal(got, want)
    with pytest.raises(NotImplementedError, match="forward-mode"):
        torch.func.jvp(f("triton"), (inp["tokens"],), (t_tok,))
    import torch.autograd.forward_ad as fwAD
    with fwAD.dual_level():
        dual = fwAD.make_dual(inp["tokens"], t_tok)
        got = fwAD.unpack_dual(f("auto")(dual)).tangent
    assert torch.equal(got, want)


@pytest.mark.parametrize("site", list(SITES))
def test_bf16_sites(site, device):
    """bf16 at the GTPT sites: scores still within 1e-5 of fp64 (fp32 accumulation), rows bit-exact. Under the
    interpreter the kernel rounds fp32 -> bf16 to nearest-even by hand (the interpreter's own cast truncates)."""
    B, G, H, R, D, N, C, kg, tg, keep, rm, gate = SITES[site]
    B = 8 if device == "cuda" else 2
    inp = make_site(B, G, H, R, D, N, C, k_groups=kg, tok_groups=tg, gate=gate, dtype=torch.bfloat16,
                    device=device, row_mask=dummy_row_mask(G, R, device) if rm else None, seed=15)
    scores = softmax_pool_scores(inp["q"], inp["k"], SCALE, inp["row_mask"], backend="triton")
    assert_close(scores, ref_scores64(inp), rtol=1e-5, what="scores")
    out, out_pos, index = run_prune(inp, keep)
    assert torch.equal(index, topk_indices_reference(scores, keep))
    want_out, want_pos = expected_rows(inp, index)
    assert torch.equal(out, want_out) and torch.equal(out_pos, want_pos)
    if gate:  # the fused sigmoid, rounded to bf16 like torch.sigmoid's output
        got = token_prune(inp["q"], inp["k"], inp["tokens"], inp["pos"], keep, SCALE, row_mask=inp["row_mask"],
                          gate=inp["gate"], backend="triton", gate_logits=True)
        want = token_prune_reference(inp["q"], inp["k"], inp["tokens"], inp["pos"], keep, SCALE, inp["row_mask"],
                                     inp["gate"], gate_logits=True)
        assert torch.equal(got[2], want[2])
        # The kernel's exp is not torch's: a gate can land one bf16 ulp away, so closeness, not equality.
        assert_close(got[0], want[0], what="gated tokens")
        assert_close(got[1], want[1], what="gated pos")


@pytest.mark.gpu
def test_torch_compile_fullgraph_gpu():
    inp = make_site(4, 3, 8, 6, 24, 179, 192, k_groups=1, tok_groups=1, gate=True, device="cuda",
                    row_mask=dummy_row_mask(3, 6, "cuda"), seed=16)
    tokens = inp["tokens"].detach().clone().requires_grad_(True)

    def f(q, k, tokens, pos, row_mask, gate):
        out, out_pos, index = token_prune(q, k, tokens, pos, 76, SCALE, row_mask, gate, backend="triton")
        return out * 2 + out_pos, index

    compiled = torch.compile(f, fullgraph=True)
    args = (inp["q"], inp["k"], tokens, inp["pos"], inp["row_mask"], inp["gate"])
    y, idx = compiled(*args)
    y_e, idx_e = f(*args)
    assert torch.equal(idx, idx_e)
    assert_close(y, y_e, what="compiled")
    (g,) = torch.autograd.grad(y.sum(), [tokens])
    (g_e,) = torch.autograd.grad(y_e.sum(), [tokens])
    assert_close(g, g_e, what="compiled grad")


def test_compile_fullgraph_aot_eager(device):
    """No graph break under torch.compile(fullgraph=True) (aot_eager: no C++/GPU toolchain needed), gradients
    through the compiled graph equal eager."""
    inp = make_site(1, 3, 2, 2, 16, 37, 8, k_groups=1, tok_groups=1, gate=True, device=device,
                    row_mask=dummy_row_mask(3, 2, device), seed=17)
    tokens = inp["tokens"].detach().clone().requires_grad_(True)
    gate = inp["gate"].detach().clone().requires_grad_(True)

    def f(q, k, tokens, pos, row_mask, gate):
        out, out_pos, index = token_prune(q, k, tokens, pos, 11, SCALE, row_mask, gate, backend="triton")
        return out * 2 + out_pos, index

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    args = (inp["q"], inp["k"], tokens, inp["pos"], inp["row_mask"], gate)
    y, idx = compiled(*args)
    y_e, idx_e = f(*args)
    assert torch.equal(idx, idx_e) and torch.equal(y, y_e)
    g = torch.autograd.grad(y.sum(), [tokens, gate])
    g_e = torch.autograd.grad(y_e.sum(), [tokens, gate])
    assert all(torch.equal(a, b) for a, b in zip(g, g_e))


# ---------------------------------------------------------------------------------------------------------------
# Column-split launches (few (batch, group) programs: scores over column slices, then _prune_select_kernel)
# ---------------------------------------------------------------------------------------------------------------

def test_column_splits_plan():
    cpu = torch.device("cpu")
    # Enough (batch, group) programs for the GPU: one fused launch, one slice covering every column.
    assert tp_mod._column_splits(384, 76, 64, cpu) == (1, 128)
    saved = tp_mod._SPLIT_SM_COUNT
    try:
        tp_mod._SPLIT_SM_COUNT = 132
        assert tp_mod._column_splits(384, 76, 64, cpu) == (1, 128)    # GTPT-S fine L3 at B = 128
        assert tp_mod._column_splits(96, 76, 64, cpu) == (2, 64)      # ... at B = 32: 192 programs
        assert tp_mod._column_splits(96, 179, 64, cpu) == (2, 128)    # fine entry at B = 32: 3 chunks -> 2 + 1
        assert tp_mod._column_splits(32, 256, 64, cpu) == (4, 64)     # coarse L3 at B = 32: 128 programs
        assert tp_mod._column_splits(6, 37, 64, cpu) == (1, 64)       # a single chunk is never split
        for programs in range(1, 200):
            for N in (1, 37, 65, 76, 122, 179, 256, 262):
                ns, cols = tp_mod._column_splits(programs, N, 64, cpu)
                assert cols % 64 == 0 and (ns - 1) * cols < N <= ns * cols  # every slice non-empty, all covered
    finally:
        tp_mod._SPLIT_SM_COUNT = saved


@pytest.fixture
def split_launches(monkeypatch):
    """Force column splits (a 132-SM plan whatever the device) and count the launches of both kernels."""
    monkeypatch.setattr(tp_mod, "_SPLIT_SM_COUNT", 132)
    counts = {"_prune_kernel": 0, "_prune_select_kernel": 0}
    for name in counts:
        real = getattr(tp_mod, name)

        class Counting:
            def __init__(self, real, name):
                self.real, self.name = real, name

            def __getitem__(self, grid):
                counts[self.name] += 1
                return self.real[grid]
        monkeypatch.setattr(tp_mod, name, Counting(real, name))
    monkeypatch.setattr(tp_mod, "_OPAQUE", True)  # launch the (counting) kernels directly
    return counts


# (B, G, H, R, D, N, C, k_groups, tok_groups, keep, row_mask, gate, dtype): GTPT-like sites with few programs.
SPLIT_CASES = [
    (1, 3, 8, 6, 24, 179, 192, 1, 1, 76, True, True, torch.bfloat16),   # fine entry: 3 chunks in 3 slices
    (1, 1, 2, 1, 24, 256, 16, 1, 1, 179, False, False, torch.float32),  # coarse L3 shape: 4 slices
    (2, 3, 2, 5, 16, 130, 40, 3, 3, 70, True, True, torch.float16),     # N = 2 chunks + 2 columns, C > 32
]


@pytest.mark.parametrize("case", SPLIT_CASES, ids=lambda c: "B{}G{}H{}R{}N{}".format(*c[:5], c[5]))
def test_column_split_equals_fused(case, split_launches, device):
    """The split launches give bitwise the fused launch's results (columns are scored independently, ranks are
    exact), every output slot is written (poisoned buffers), and the results equal the reference."""
    B, G, H, R, D, N, C, kg, tg, keep, rm, gate, dtype = case
    inp = make_site(B, G, H, R, D, N, C, k_groups=kg, tok_groups=tg, gate=gate, dtype=dtype, device=device,
                    row_mask=dummy_row_mask(G, R, device) if rm else None, seed=31)
    nsplit, _ = tp_mod._column_splits(B * G, N, 64, torch.device(device))
    assert nsplit > 1

    def launch(sm_count):
        tp_mod._SPLIT_SM_COUNT = sm_count
        scores = poison_(torch.empty(B, G, N, device=device))
        out_dt, pos_dt = tp_mod._prune_out_dtypes(inp["tokens"], inp["pos"], inp["gate"])
        out = poison_(torch.empty(B, G, keep, C, dtype=out_dt, device=device))
        out_pos = poison_(torch.empty(B, G, keep, C, dtype=pos_dt, device=device))
        index = torch.full((B, G, keep), -1, dtype=torch.int64, device=device)
        tp_mod._launch(inp["q"], inp["k"], inp["row_mask"], SCALE, scores, tokens=inp["tokens"], pos=inp["pos"],
                       gate=inp["gate"], out=out, out_pos=out_pos, index=index, gate_sigmoid=gate)
        return scores, out, out_pos, index

    split = launch(132)
    assert split_launches == {"_prune_kernel": 1, "_prune_select_kernel": 1}
    fused = launch(1)  # 1 SM: every plan fills it, one fused launch
    assert split_launches == {"_prune_kernel": 2, "_prune_select_kernel": 1}
    for a, b in zip(split, fused):
        assert torch.equal(a, b)
    scores, out, out_pos, index = split
    assert (index >= 0).all() and torch.isfinite(out.float()).all() and torch.isfinite(out_pos.float()).all()
    assert_close(scores, ref_scores64(inp), rtol=1e-5, what="scores")
    assert torch.equal(index, topk_indices_reference(scores, keep))
    r_out, r_pos, _ = token_prune_reference(inp["q"], inp["k"], inp["tokens"], inp["pos"], keep, SCALE,
                                            inp["row_mask"], inp["gate"], gate_logits=gate)
    want_out, want_pos = gather_tokens_reference(inp["tokens"], index), gather_tokens_reference(inp["pos"], index)
    if gate:  # the kernel's sigmoid is its own exp: compare the gated rows closely, the index exactly
        assert_close(out, r_out, what="gated tokens")
        assert_close(out_pos, r_pos, what="gated pos")
    else:
        assert torch.equal(out, want_out) and torch.equal(out_pos, want_pos)


def test_column_split_public_ops_and_ties(split_launches, device):
    """Through the public ops: the split path keeps the tie rule across slices (duplicates of the best column
    placed in other slices follow it in index order) and the WholeBody column mask."""
    B, G, H, R, D, N, C = 1, 2, 2, 3, 16, 150, 8
    inp = make_site(B, G, H, R, D, N, C, k_groups=1, tok_groups=1, device=device, seed=32)
    k = inp["k"].clone()
    best = int(topk_indices_reference(ref_scores64(dict(inp, k=k)), N)[0, 0, 0])
    dups = [n for n in (5, 70, 140) if n != best]
    for n in dups:
        k[:, :, :, n] = k[:, :, :, best]
    cols = torch.ones(G, N, dtype=torch.bool, device=device)
    cols[1, :40] = False
    out, out_pos, index = token_prune(inp["q"], k, inp["tokens"], inp["pos"], 60, SCALE, col_mask=cols,
                                      backend="triton")
    assert split_launches["_prune_select_kernel"] == 1
    r_out, r_pos, r_idx = token_prune_reference(inp["q"], k, inp["tokens"], inp["pos"], 60, SCALE, col_mask=cols)
    assert torch.equal(index, r_idx) and torch.equal(out, r_out) and torch.equal(out_pos, r_pos)
    tied = sorted([best] + dups)
    assert index[0, 0, :len(tied)].tolist() == tied
    scores = softmax_pool_scores(inp["q"], k, SCALE, backend="triton", col_mask=cols)
    assert split_launches == {"_prune_kernel": 2, "_prune_select_kernel": 1}  # the scores op: one launch
    assert torch.equal(index, topk_indices_reference(scores, 60))
