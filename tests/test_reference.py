"""The reference ops (the contract) against naive per-group / per-token loops, and the backend switch."""

import pytest
import torch

import gtpt_kernels as gk
from gtpt_kernels.backend import resolve_backend
from gtpt_kernels.reference import (group_attention_reference, softmax_pool_scores_reference, split_qkv,
                                    token_prune_reference, topk_indices_reference)
from gtpt_kernels.testing import assert_close


def naive_group_attention(qkv, heads, S, scale, pad_token):
    B, G, N, C3 = qkv.shape
    C = C3 // 3
    D = C // heads
    q, k, v = qkv.double().split(C, -1)
    out = torch.zeros(B, G, N, C, dtype=torch.float64)
    for b in range(B):
        shared_k = torch.cat([k[b, g, :S] for g in range(G)])  # group-major shared rows
        shared_v = torch.cat([v[b, g, :S] for g in range(G)])
        for g in range(G):
            keys = torch.cat([shared_k, k[b, g, S:]])
            vals = torch.cat([shared_v, v[b, g, S:]])
            for h in range(heads):
                sl = slice(h * D, (h + 1) * D)
                logits = q[b, g, :, sl] @ keys[:, sl].T * scale
                if pad_token:
                    logits[:, 0] = float("-inf")
                p = logits.softmax(-1)
                if pad_token and g == 0:  # the pad query: all logits masked officially, a uniform softmax
                    p[0] = 1.0 / len(keys)
                out[b, g, :, sl] = p @ vals[:, sl]
    return out


@pytest.mark.parametrize("G,N,S,pad", [(1, 7, 0, False), (3, 9, 2, False), (3, 8, 6, True), (2, 5, 1, True)])
def test_group_attention_reference_matches_naive(G, N, S, pad):
    torch.manual_seed(0)
    heads, C = 2, 8
    qkv = torch.randn(2, G, N, 3 * C, dtype=torch.float64)
    ref = group_attention_reference(qkv, heads, S, None, pad)
    assert_close(ref, naive_group_attention(qkv, heads, S, C ** -0.5, pad))


def test_group_attention_g1_s0_is_sdpa():
    torch.manual_seed(0)
    qkv = torch.randn(2, 1, 11, 3 * 16, dtype=torch.float64)
    q, k, v = split_qkv(qkv, 4)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=16 ** -0.5)
    assert_close(group_attention_reference(qkv, 4, 0), sdpa.transpose(2, 3).reshape(2, 1, 11, 16))


def test_softmax_pool_scores_reference_matches_definition():
    torch.manual_seed(0)
    B, G, H, R, N, D = 2, 3, 4, 5, 7, 6
    q = torch.randn(B, G, H, R, D, dtype=torch.float64)
    k = torch.randn(B, 1, H, N, D, dtype=torch.float64)
    mask = torch.ones(G, R, dtype=torch.bool)
    mask[0, 0] = False
    got = softmax_pool_scores_reference(q, k, 0.3, mask)
    for b in range(B):
        for g in range(G):
            for n in range(N):
                a = torch.stack([0.3 * q[b, g, h, r] @ k[b, 0, h, n] for h in range(H) for r in range(R) if mask[g, r]])
                expect = (a.softmax(0) * a).sum()
                assert abs(float(got[b, g, n]) - float(expect)) < 1e-6


def test_topk_tie_rule_lower_index_wins():
    s = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    assert topk_indices_reference(s, 3).tolist() == [[1, 2, 4]]
    assert topk_indices_reference(s, 4).tolist() == [[1, 2, 4, 3]]


def test_token_prune_reference_gathers_and_gates():
    torch.manual_seed(0)
    B, G, H, R, N, D, C = 1, 2, 2, 3, 6, 4, 5
    q, k = torch.randn(B, G, H, R, D), torch.randn(B, G, H, N, D)
    tokens, pos, gate = torch.randn(B, 1, N, C), torch.randn(B, 1, N, C), torch.rand(B, G, N, C)
    out, out_pos, idx = token_prune_reference(q, k, tokens, pos, 4, 0.5, gate=gate)
    for g in range(G):
        for i, n in enumerate(idx[0, g].tolist()):
            assert torch.equal(out[0, g, i], tokens[0, 0, n] * gate[0, g, n])
            assert torch.equal(out_pos[0, g, i], pos[0, 0, n] * gate[0, g, n])


def test_keep_count_and_its_errors():
    assert [gk.keep_count(r) for r in (0.7, 0.3, 0.1)] == [179, 76, 25]
    assert [gk.keep_count(0.5, 256, d) for d in (68, 42, 6)] == [60, 86, 122]
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            gk.keep_count(bad)
    with pytest.raises(ValueError, match="at least one"):
        gk.keep_count(0.1, 256, 30)


def test_backend_switch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("GTPT_KERNELS_BACKEND", raising=False)
    assert gk.get_backend() == "auto"
    assert resolve_backend("reference", cpu) == "reference"
    with gk.use_backend("reference"):
        assert gk.get_backend() == "reference"
    assert gk.get_backend() == "auto"
    monkeypatch.setenv("GTPT_KERNELS_BACKEND", "reference")
    assert gk.get_backend() == "reference"
    gk.set_backend("auto")
    assert gk.get_backend() == "auto"  # the global setter beats the environment
    gk.set_backend(None)
    with pytest.raises(ValueError, match="valid backends"):
        gk.set_backend("cuda")
    # What counts is TRITON_INTERPRET when gtpt_kernels was imported (triton builds the kernels then)
    import gtpt_kernels.backend as backend_mod
    monkeypatch.setattr(backend_mod, "_INTERPRET_AT_IMPORT", False)
    assert resolve_backend("auto", cpu) == "reference"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        resolve_backend("triton", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # set too late: still the reference
    assert resolve_backend("auto", cpu) == "reference"
    monkeypatch.setattr(backend_mod, "_INTERPRET_AT_IMPORT", True)
    assert resolve_backend("auto", cpu) == "triton"
