"""Pure-PyTorch reference ops: the contract every Triton kernel in :mod:`gtpt_kernels` must meet.

Tests compare the kernels against these functions (run in fp64), and they are the CPU fallback of the public
ops. They follow the official GTPT code (github.com/haonanwang0522/GTPT @ f3a6068, ``GroupAttention``,
``Attention`` and ``Transformer.softmax_pool`` in ``lib/models/pose_gtpt_*``), restated as standalone
functions with explicit arguments. No input validation happens here: the public ops validate.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def split_qkv(qkv: Tensor, heads: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Split the packed ``to_qkv`` output ``(B, G, N, 3C)`` into q, k, v views of shape ``(B, G, H, N, D)``.

    The last dimension is ``[q | k | v]`` and each third is ``(heads, head_dim)``, head-major, exactly as
    ``qkv.chunk(3, -1)`` followed by ``rearrange('b g n (h d) -> b g h n d')`` in the official code.
    """
    B, G, N, C3 = qkv.shape
    C = C3 // 3
    D = C // heads
    t = qkv.view(B, G, N, 3, heads, D)
    q, k, v = t.unbind(3)  # each (B, G, N, H, D), strided views into qkv
    return q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3)


def group_attention_keys(t: Tensor, num_shared: int) -> Tensor:
    """Key (or value) sequence of every group: the ``G*S`` shared rows of all groups, then the group's own rows.

    ``t`` is ``(B, G, H, N, D)``; the result is ``(B, G, H, G*S + N - S, D)``. This is the materialised layout
    of the official ``GroupAttention``; the fused kernel never builds it.
    """
    B, G, H, N, D = t.shape
    S = num_shared
    if S == 0:
        return t
    shared = t[:, :, :, :S].transpose(1, 2).reshape(B, H, G * S, D)  # group-major: g0 s0..sS-1, g1 ...
    shared = shared.unsqueeze(1).expand(B, G, H, G * S, D)
    return torch.cat([shared, t[:, :, :, S:]], dim=3)


def group_attention_reference(qkv: Tensor, heads: int, num_shared: int, scale: Optional[float] = None,
                              pad_token: bool = False) -> Tensor:
    """Multi-Head Group Attention on a packed ``to_qkv`` output.

    Args:
        qkv: ``(B, G, N, 3C)``, the output of the layer's ``to_qkv`` (no bias) on ``x`` of shape ``(B, G, N, C)``.
        heads: number of heads H (``C % H == 0``).
        num_shared: S, the number of leading tokens of every group that are shared. The keys/values of group g
            are the ``G*S`` shared tokens of all groups (group-major) followed by group g's own ``N - S`` tokens;
            the queries of group g are its ``N`` tokens. ``G=1, S=0`` is plain multi-head self-attention.
        scale: softmax scale; default ``C ** -0.5`` (GTPT scales by the model dim, not the head dim).
        pad_token: GTPT's padded head group, masked as the official layer masks it. Shared token 0 of group 0 is
            a padding token: it is masked as a key for every other query, and its own query row has every logit
            masked (``-finfo.max`` there), which makes that row's softmax uniform over all ``L`` keys of group 0,
            the padding key included: the row outputs the mean of those values, and its logits receive no
            gradient. The row is discarded at the model's end, so it never changes a model output; it is kept
            exact so the op is a drop-in for the official layer on every row.

    Returns:
        ``(B, G, N, C)``: the attention output with heads merged, before ``to_out``.
    """
    B, G, N, C3 = qkv.shape
    C = C3 // 3
    if scale is None:
        scale = C ** -0.5
    q, k, v = split_qkv(qkv, heads)
    k = group_attention_keys(k, num_shared)
    v = group_attention_keys(v, num_shared)
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, G, H, N, L)
    if pad_token:
        key_mask = torch.zeros(logits.shape[-1], dtype=torch.bool, device=qkv.device)
        key_mask[0] = True
        logits = logits.masked_fill(key_mask, float("-inf"))
        # The pad query row: all logits equal (the official -finfo.max fill), so a uniform softmax over all keys.
        row_mask = torch.zeros(G, 1, N, 1, dtype=torch.bool, device=qkv.device)
        row_mask[0, 0, 0, 0] = True
        logits = logits.masked_fill(row_mask, 0.0)
    attn = logits.softmax(dim=-1)
    out = torch.matmul(attn, v)  # (B, G, H, N, D)
    return out.transpose(2, 3).reshape(B, G, N, C)


def softmax_pool_scores_reference(q: Tensor, k: Tensor, scale: float, row_mask: Optional[Tensor] = None,
                                  col_mask: Optional[Tensor] = None) -> Tensor:
    """GTPT's softmax-pooled importance score of every key token (Eq. 10 as the official code computes it).

    Args:
        q: ``(B, G, H, R, D)`` query rows of the pruning site (keypoint / human tokens).
        k: ``(B, G or 1, H, N, D)`` key rows of the candidate (visual) tokens; a size-1 group dim broadcasts.
        scale: the attention scale (the logits are the scaled, pre-softmax attention logits).
        row_mask: optional ``(G, R)`` bool, True where a row takes part. Excluded rows get zero weight, like the
            official ``-finfo.max`` / ``-1e5`` padding rows.
        col_mask: optional ``(G, N)`` bool, True where a column is a candidate of its group. Excluded columns
            score ``-inf``, so they rank after every candidate (lets groups with different candidate ranges
            share one call, as WholeBody's fine layer 3 does).

    Returns:
        fp32 ``(B, G, N)``: ``score[n] = sum_j softmax_j(a[j, n]) * a[j, n]`` with ``j`` over heads x valid rows.
        Computed in fp32 whatever the input dtype.
    """
    B, G, H, R, D = q.shape
    N = k.shape[3]
    a = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # (B, G, H, R, N)
    if row_mask is not None:
        valid = row_mask.to(device=a.device, dtype=torch.bool).view(1, G, 1, R, 1).expand(B, G, H, R, N)
    else:
        valid = torch.ones_like(a, dtype=torch.bool)
    a = a.reshape(B, G, H * R, N)
    valid = valid.reshape(B, G, H * R, N)
    w = torch.softmax(a.masked_fill(~valid, float("-inf")), dim=2)
    scores = torch.where(valid, w * a, torch.zeros_like(a)).sum(dim=2)
    if col_mask is not None:
        scores = scores.masked_fill(~col_mask.to(device=scores.device, dtype=torch.bool)[None], float("-inf"))
    return scores


def topk_indices_reference(scores: Tensor, keep: int) -> Tensor:
    """Indices of the ``keep`` highest scores along the last dim, in descending score order.

    Tie rule: among equal scores the lower index wins (and comes first); NaN ranks above every number. Eager
    PyTorch uses a stable descending sort (``torch.topk`` does not order ties: measured on CPU, it differs from
    the rule on most inputs with exact ties). While a model is exported (``torch.export``, the ONNX exporters,
    jit tracing), which have no stable sort, :func:`topk_indices_exportable` computes the same indices from
    ``topk`` alone.
    """
    # torch.export and the dynamo ONNX exporter compile (is_compiling, cheap, is checked first); the TorchScript
    # ONNX exporter traces. (torch.onnx.is_in_onnx_export costs ~5 us a call here: too much for a hot path.)
    if (torch.compiler.is_compiling() and torch.compiler.is_exporting()) or torch.jit.is_tracing():
        return topk_indices_exportable(scores, keep)
    return torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :keep]


def topk_indices_exportable(scores: Tensor, keep: int) -> Tensor:
    """:func:`topk_indices_reference`'s indices (same tie rule, exactly) from two ``topk`` calls and a gather, ops
    every exporter supports (ONNX ``TopK``, ``CumSum``, ``GatherElements``).

    A full sorted ``topk`` orders the scores but leaves the order of equal scores to the implementation; equal
    scores are adjacent in it, so the run number of each (the count of value changes before it) is its dense
    rank. ``run * N + index`` is then a unique integer key whose ascending order is (score descending, index
    ascending), and a second ``topk`` (smallest ``keep``) on it has no ties to break. It does not rely on any
    runtime ordering ties itself (ONNX's ``TopK`` spec does, but not every runtime follows it). In eager
    PyTorch it costs ~0.1 ms more per call than the stable sort (measured on a 2-core CPU, B = 1 to 8), which is
    why eager keeps the sort.
    """
    n = scores.shape[-1]
    values, order = torch.topk(scores, n, dim=-1, largest=True, sorted=True)
    prev, cur = values[..., :-1], values[..., 1:]
    new_run = (cur != prev) & ~(cur.isnan() & prev.isnan())  # NaNs (ranked first by topk) form one run
    run = torch.cat([torch.zeros_like(order[..., :1]), new_run.long().cumsum(-1)], dim=-1)
    key = run * n + order
    pos = torch.topk(key, keep, dim=-1, largest=False, sorted=True).indices
    return torch.gather(order, -1, pos)


def gather_tokens_reference(tokens: Tensor, index: Tensor) -> Tensor:
    """``out[b, g, i] = tokens[b, g or 0, index[b, g, i]]`` for ``tokens (B, G or 1, N, C)``, ``index (B, G, K)``."""
    B, G, K = index.shape
    C = tokens.shape[-1]
    src = tokens.expand(B, G, tokens.shape[2], C)
    return torch.gather(src, 2, index.unsqueeze(-1).expand(B, G, K, C))


def token_prune_reference(q: Tensor, k: Tensor, tokens: Tensor, pos: Optional[Tensor], keep: int, scale: float,
                          row_mask: Optional[Tensor] = None, gate: Optional[Tensor] = None,
                          col_mask: Optional[Tensor] = None, gate_logits: bool = False
                          ) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """Score, select and gather: one GTPT pruning site.

    Scores come from :func:`softmax_pool_scores_reference` (no gradient flows through them or the selection);
    the ``keep`` best tokens per (batch, group) are gathered from ``tokens`` and ``pos`` (``(B, G or 1, N, C)``)
    and, when ``gate`` ``(B, G, N, C)`` is given, multiplied by the gathered gate (GTPT's channel mask, applied
    to tokens and position embedding alike).

    Returns ``(kept_tokens (B, G, keep, C), kept_pos or None, index (B, G, keep) int64)``, kept tokens in
    descending score order (ties: lower index first). With ``col_mask``, a group's excluded columns rank last
    (in index order): when ``keep`` exceeds a group's candidates they fill the tail of its rows, so the first
    ``c`` rows are its top ``c`` candidates for any ``c`` up to its candidate count. ``gate_logits=True``: ``gate``
    holds pre-sigmoid logits; the gate is ``torch.sigmoid(gate)`` (GTPT's channel mask ends in a Sigmoid).
    """
    with torch.no_grad():
        scores = softmax_pool_scores_reference(q, k, scale, row_mask, col_mask)
        index = topk_indices_reference(scores, keep)
    out = gather_tokens_reference(tokens, index)
    out_pos = gather_tokens_reference(pos, index) if pos is not None else None
    if gate is not None and gate_logits:
        gate = torch.sigmoid(gate)
    if gate is not None:
        g = gather_tokens_reference(gate, index)
        out = out * g
        out_pos = out_pos * g if out_pos is not None else None
    return out, out_pos, index
