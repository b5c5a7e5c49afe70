"""GTPT's eval forward written as a lean graph for exporters (ONNX, ``torch.export`` / AOTInductor) on the CPU.

:class:`gtpt.model.GTPT` traces this instead of its eager code when it is exported in eval mode on the reference
ops (:func:`export_graph_active`). Same outputs as the eager model up to float rounding (tested), the same kept
tokens at every pruning site (same scores, same tie rule through
:func:`gtpt_kernels.reference.topk_indices_exportable`). What it changes, and why (a dynamic-batch ONNX export of
the eager code had ~5,000 nodes, most of them shape arithmetic, and ONNX Runtime spent ~10% of gtpt-s B = 8 in one
6-D Transpose):

* The batch size is never read: every reshape says ``-1`` for it, token counts are Python ints, and constants
  broadcast instead of being expanded, so the graph carries no Shape / Gather / Concat chains.
* Stem: NCHW convolutions with every BatchNorm and channel shuffle folded into their weights (the fast eager
  path's plan, :class:`gtpt.fast_inference._StemPlan`); patchify + ``patch2emb_norm`` + ``patch2emb_mlp`` is one
  convolution with kernel = stride = the patch size.
* Position embeddings are added through zero-padded copies (``Pad``) rather than in-place slice adds (ONNX
  ``ScatterND``); the human token enters the same way.
* MHGA: the logits against the ``G*S`` shared keys and against the group's own keys are two broadcast MatMuls, so
  no expanded copy of the shared keys exists; the padding key is masked by a constant ``-inf`` bias. The padding
  query row then attends to the other keys instead of taking the official uniform mean: that row never reaches an
  output (it is masked as a key, left out of every pruning ranking and dropped at the end).
* Pruning: row and column masks are constant ``-inf`` biases, the gathers are ``GatherElements`` / ``Gather``.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gtpt_kernels.backend import resolve_backend
from gtpt_kernels.reference import topk_indices_exportable

from .fast_inference import _build_plan, _StemPlan, walk_stem
from .keypoints import WHOLEBODY_DENSE_PER_GROUP, WHOLEBODY_ENTRY_ROWS


def export_graph_active(model: nn.Module, images: Tensor) -> bool:
    """Whether ``model`` (a :class:`gtpt.model.GTPT`) traces :func:`export_forward` now: eval mode, its
    ``lean_export`` flag on (the default; ``model.set_lean_export(False)`` traces the eager code), ops on the
    reference backend (a CUDA export on the Triton backend keeps the fused kernels), and an exporter
    tracing (TorchScript ONNX export, ``torch.export``)."""
    if model.training or not getattr(model, "lean_export", False):
        return False
    if not (torch.jit.is_tracing() or (torch.compiler.is_compiling() and torch.compiler.is_exporting())):
        return False
    return resolve_backend(model.backend, images.device) == "reference"


# ----------------------------------------------------------------------------------------------------------------
# Stem + patch embedding

def _branch(seq: nn.Sequential, x: Tensor, plan: _StemPlan) -> Tensor:
    for m in seq:
        if isinstance(m, nn.Conv2d):
            w, b = plan.conv[m]
            if w.dim() == 2:  # the plan keeps 1x1 weights as (C_in, C_out) for x @ w
                w = w.t()[:, :, None, None]
            x = F.conv2d(x, w, b, m.stride, m.padding, m.dilation, m.groups)
        elif isinstance(m, nn.ReLU):
            x = torch.relu(x)
        elif isinstance(m, nn.PixelShuffle):
            x = F.pixel_shuffle(x, m.upscale_factor)
        elif not isinstance(m, nn.BatchNorm2d):  # BatchNorm: folded into the conv before it
            raise TypeError(f"export stem: unexpected module {type(m).__name__}")
    return x


@contextlib.contextmanager
def folded_weights(model: nn.Module) -> Iterator[None]:
    """Fold the stem's weights once, outside the trace, for the duration of an export: the exporter then sees
    them as constants (without this, every folding op - BN scale, channel permutation - is traced into the graph,
    where ONNX Runtime re-folds them at load)."""
    features = getattr(model, "features", None)
    if features is None or not hasattr(features, "stem"):
        yield
        return
    with torch.no_grad():
        features.__dict__["_export_plan"] = _build_plan(features)
    try:
        yield
    finally:
        features.__dict__.pop("_export_plan", None)


def patch_embed(features: nn.Module, images: Tensor) -> Tensor:
    """``patch2emb_mlp(patchify(patch2emb_norm(stem(images))))`` -> ``(B, h*w, dim)`` as NCHW convolutions."""
    plan = features.__dict__.get("_export_plan")
    if plan is None:  # traced directly (not through gtpt.export): fold inside the trace
        with torch.no_grad():
            plan = _build_plan(features)
    x = walk_stem(features.stem, images, plan, _branch, 1)
    ph, pw = features.cfg.patch_size
    w, b = plan.patch  # (dim, ph * pw * C) over inputs (p1 p2 c), c in the stem's physical channel order
    w = w.view(w.size(0), ph, pw, -1).permute(0, 3, 1, 2)
    x = F.conv2d(x, w, b, stride=(ph, pw))  # (B, dim, h, w): one linear map per non-overlapping patch
    return x.flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------------------
# Attention and pruning

# Sizes are Python ints from the config, never read off a tensor: a traced ``x.shape[i]`` becomes Shape / Gather /
# Unsqueeze / Concat nodes in the exported graph.

def _project_heads(x: Tensor, weight: Tensor, lead: Tuple[int, ...], n: int, heads: int, d: int
                   ) -> Tuple[Tensor, ...]:
    """q, k, v ``(B, *lead, H, n, D)`` of ``x (B, *lead, n, C)``: three products with the thirds of ``to_qkv``'s
    weight rather than one packed product split afterwards (the split is one more copy of q, k and v)."""
    c = heads * d
    return tuple(F.linear(x, weight[i * c:(i + 1) * c]).reshape(-1, *lead, n, heads, d).transpose(-3, -2)
                 for i in range(3))


def _merge_heads(out: Tensor, lead: Tuple[int, ...], n: int, c: int) -> Tensor:
    """``(B, *lead, H, n, D)`` -> ``(B, *lead, n, C)``."""
    return out.transpose(-3, -2).reshape(-1, *lead, n, c)


def _attention(layer: nn.Module, x: Tensor, lead: Tuple[int, ...], n: int, cfg, key_bias: Tensor = None
               ) -> Tuple[Tensor, Tensor, Tensor]:
    """One residual attention layer (``ResidualAttn(PreNorm(Attention))``) on ``x (B, *lead, N, C)``: returns the
    new ``x`` and the layer's q, k ``(B, *lead, H, N, D)`` for the pruning site after it. With shared tokens
    (MHGA, ``lead = (G,)``) the keys of a group are the ``G*S`` shared rows of all groups, then its own rows."""
    pre, attn = layer.fn, layer.fn.fn
    H, D = cfg.heads, cfg.head_dim
    q, k, v = _project_heads(pre.norm(x), attn.to_qkv.weight, lead, n, H, D)
    S = attn.num_shared
    if S == 0:
        logits = torch.matmul(q, k.transpose(-1, -2)) * attn.scale
        out = torch.matmul(logits.softmax(-1), v)
    else:
        G = lead[0]
        # group-major shared rows (g0 s0..s(S-1), g1 ...), one copy broadcast over the groups by MatMul
        ks = k[:, :, :, :S].transpose(1, 2).reshape(-1, 1, H, G * S, D)
        vs = v[:, :, :, :S].transpose(1, 2).reshape(-1, 1, H, G * S, D)
        logits = torch.cat([torch.matmul(q, ks.transpose(-1, -2)), torch.matmul(q, k[:, :, :, S:].transpose(-1, -2))],
                           -1) * attn.scale
        if key_bias is not None:
            logits = logits + key_bias
        p = logits.softmax(-1)
        out = torch.matmul(p[..., :G * S], vs) + torch.matmul(p[..., G * S:], v[:, :, :, S:])
    return attn.to_out(_merge_heads(out, lead, n, cfg.dim)) + x, q, k


def _scores(a: Tensor, row_bias: Tensor = None) -> Tensor:
    """Softmax-pooled scores ``(B, G, N)`` from scaled logits ``(B, G, rows, N)``; ``row_bias`` (0 / -inf per row)
    drops rows: their softmax weight is 0, so they add 0 (their logits are finite)."""
    w = (a if row_bias is None else a + row_bias).softmax(2)
    return (w * a).sum(2)


# Row and column masks of the pruning sites as Python lists (the Transformer's buffers hold the same values; a
# buffer's values cannot be read while torch.export traces): exported as constant 0 / -inf biases.

def coco_rows(G: int, S: int) -> List[List[bool]]:
    """Fine-entry / fine-L3 ranking rows: every group's S sparse rows except the padding row (group 0, row 0)."""
    return [[not (g == 0 and s == 0) for s in range(S)] for g in range(G)]


def wholebody_entry_rows() -> List[List[bool]]:
    """WholeBody fine entry: per group its part tokens + body keypoints, padded to the longest."""
    width = max(len(p) + len(k) for p, k in WHOLEBODY_ENTRY_ROWS)
    return [[r < len(p) + len(k) for r in range(width)] for p, k in WHOLEBODY_ENTRY_ROWS]


def wholebody_l3_masks(S: int, num_patches: int) -> Tuple[List[List[bool]], List[List[bool]]]:
    """WholeBody fine L3: rows = each group's sparse + dense lead (padding row excluded); columns = candidates
    from the shortest lead on, each group's own visual tokens only."""
    leads = [S + nd for nd in WHOLEBODY_DENSE_PER_GROUP]
    rows = [[r < lead and (g, r) != (0, 0) for r in range(max(leads))] for g, lead in enumerate(leads)]
    cols = [[c >= lead - min(leads) for c in range(num_patches + max(leads))] for lead in leads]
    return rows, cols


def _row_bias(valid: List[List[bool]], heads: int) -> Tensor:
    """``(G, R)`` row mask -> ``(1, G, H*R, 1)`` bias, rows ordered (head, row) as the scores flatten them."""
    return torch.tensor([[[[0.0 if ok else float("-inf")] for _ in range(heads) for ok in row] for row in valid]])


def _col_bias(valid: List[List[bool]]) -> Tensor:
    """``(G, N)`` column mask -> ``(1, G, N)`` bias."""
    return torch.tensor([[[0.0 if ok else float("-inf") for ok in row] for row in valid]])


def _take(src: Tensor, index: Tensor, c: int) -> Tensor:
    """``out[b, g, i] = src[b, g, index[b, g, i]]`` for ``src (B, G, N, c)``, ``index (B, G, K)``."""
    zeros = torch.zeros(1, 1, 1, c, dtype=index.dtype, device=index.device)
    return torch.gather(src, 2, index.unsqueeze(-1) + zeros)


def _take_shared(src: Tensor, index: Tensor, g: int, k: int, c: int) -> Tensor:
    """``out[b, j, i] = src[b, index[b, j, i]]`` for ``src (B, N, c)`` shared by the ``g`` groups, ``index (B, g, k)``
    -> ``(B, g, k, c)``."""
    zeros = torch.zeros(1, 1, c, dtype=index.dtype, device=index.device)
    return torch.gather(src, 1, index.reshape(-1, g * k, 1) + zeros).reshape(-1, g, k, c)


# ----------------------------------------------------------------------------------------------------------------
# The forward

def export_forward(model: nn.Module, images: Tensor) -> Tuple[Tensor, Tensor]:
    """``model(images)`` in eval mode (the pruned path): ``(simcc_x (B, K, 384), simcc_y (B, K, 512))``."""
    cfg = model.cfg
    f = model.features
    T = f.transformer
    C, H, G, S = cfg.dim, cfg.heads, cfg.num_groups, cfg.num_sparse
    P = cfg.num_part_tokens
    dtype = images.dtype
    rates = cfg.layer_keep_rates()
    n_coarse = cfg.depth // 2
    n_img = cfg.num_patches

    # tokens: [human | visual + PE]; pos holds the visual tokens' PE, (1, n, C) until the first pruning gathers it
    pos = f.pos_embedding.to(dtype)
    x = F.pad(patch_embed(f, images) + pos, (0, 0, 1, 0)) + F.pad(f.human_token, (0, 0, 0, n_img))

    # coarse layers
    K, n = 1, n_img
    pos_batched = False
    q = k = None
    for idx, (attn, ff) in enumerate(T.layers):
        if idx > 0:
            x = x + F.pad(pos, (0, 0, K, 0))  # "sine-full": the PE re-added to the visual tokens at every layer
        x, q, k = _attention(attn, x, (), K + n, cfg)
        target = int(n_img * rates[idx])
        if n != target:
            a = (torch.matmul(q[:, :, :K], k[:, :, K:].transpose(-1, -2)) * T.scale).reshape(-1, 1, H * K, n)
            index = topk_indices_exportable(_scores(a), target)  # (B, 1, target)
            img = x[:, K:]
            kept = _take_shared(img, index, 1, target, C)[:, 0]
            pos = _take_shared(pos, index, 1, target, C)[:, 0] if pos_batched else pos[0][index[:, 0]]
            pos_batched = True
            x = torch.cat([x[:, :K], kept], 1)
            n = target
        if idx == 3:  # Human-2-Keypoint
            sparse = f.keypoint_token if P == 0 else torch.cat([f.extra_token, f.keypoint_token], 1)
            x = torch.cat([x[:, :1] + sparse, x[:, 1:]], 1)
            K = 17 + P
        x = ff(x)
    if not pos_batched:  # nothing pruned in the coarse layers: give pos its batch (the gathers below need it)
        pos = pos + torch.zeros_like(x[:, K:])

    # fine entry: channel mask, grouping, pruning by the last coarse layer's logits
    body = x[:, P:K]
    sparse = torch.cat([body[:, :1], body], 1).reshape(-1, G, S, C)  # padding token: a copy of the nose
    img = x[:, K:]
    logits = T.group_mask[:-1](img).reshape(-1, n, G, C).transpose(1, 2)  # (B, G, n, C) channel-mask logits
    target = int(n_img * rates[n_coarse])
    k_img = k[:, :, K:]
    if not cfg.wholebody:
        if n != target:
            # rows: a zero dummy row in front of the 17 keypoints, 6 per group; the dummy is masked
            a = torch.matmul(q[:, :, :K], k_img.transpose(-1, -2)) * T.scale  # (B, H, K, n)
            a = F.pad(a, (0, 0, 1, 0)).reshape(-1, H, G, S, n).transpose(1, 2).reshape(-1, G, H * S, n)
            index = topk_indices_exportable(_scores(a, _row_bias(coco_rows(G, S), H).to(a)), target)
            gate = torch.sigmoid(_take(logits, index, C))
            img_g = _take_shared(img, index, G, target, C) * gate
            pos_g = _take_shared(pos, index, G, target, C) * gate
            n = target
        else:
            gate = torch.sigmoid(logits)
            img_g, pos_g = img[:, None] * gate, pos[:, None] * gate
        x, pos = torch.cat([sparse, img_g], 2), pos_g
    else:
        keeps = [target - nd for nd in WHOLEBODY_DENSE_PER_GROUP]
        R = max(len(p) + len(k) for p, k in WHOLEBODY_ENTRY_ROWS)
        a = torch.matmul(q.index_select(2, T._wb_entry_index), k_img.transpose(-1, -2)) * T.scale  # (B, H, G*R, n)
        a = a.reshape(-1, H, G, R, n).transpose(1, 2).reshape(-1, G, H * R, n)
        index = topk_indices_exportable(_scores(a, _row_bias(wholebody_entry_rows(), H).to(a)), max(keeps))
        gate = torch.sigmoid(_take(logits, index, C))
        img_g = _take_shared(img, index, G, max(keeps), C) * gate
        pos_g = _take_shared(pos, index, G, max(keeps), C) * gate
        part, dense_tokens = x[:, :P], f.fine_keypoint_token
        # per group its dense tokens (part token + fine embedding, zero PE) in front of its kept visual tokens
        dense = [[(0, 68)], [(1, 21), (2, 21)], [(3, 3), (4, 3)]]
        seqs, poss, start = [], [], 0
        for g, runs in enumerate(dense):
            parts = []
            for p, count in runs:
                parts.append(part[:, p:p + 1] + dense_tokens[:, start:start + count])
                start += count
            nd = WHOLEBODY_DENSE_PER_GROUP[g]
            seqs.append(torch.cat(parts + [img_g[:, g, :keeps[g]]], 1))
            poss.append(F.pad(pos_g[:, g, :keeps[g]], (0, 0, nd, 0)))
        x, pos = torch.cat([sparse, torch.stack(seqs, 1)], 2), torch.stack(poss, 1)
        n = target  # visual + dense tokens per group

    # fine layers (MHGA)
    # the padding key (shared token 0 of group 0) is masked for every query
    key_bias = F.pad(torch.zeros(G * S + n - 1, dtype=dtype, device=images.device), (1, 0), value=float("-inf"))
    for idx, (attn, ff) in enumerate(T.group_layers):
        x = x + F.pad(pos, (0, 0, S, 0))  # masked PE (zero for dense tokens), re-added at every fine layer
        x, q, k = _attention(attn, x, (G,), S + n, cfg, key_bias[:G * S + n])
        target = int(n_img * rates[n_coarse + idx])
        if n != target:
            if not cfg.wholebody:
                a = (torch.matmul(q[:, :, :, :S], k[:, :, :, S:].transpose(-1, -2)) * T.scale).reshape(-1, G, H * S, n)
                index = topk_indices_exportable(_scores(a, _row_bias(coco_rows(G, S), H).to(a)), target)
                x = torch.cat([x[:, :, :S], _take(x[:, :, S:], index, C)], 2)
                pos = _take(pos, index, C)
            else:
                R, first = S + max(WHOLEBODY_DENSE_PER_GROUP), S + min(WHOLEBODY_DENSE_PER_GROUP)
                n_cols = S + n - first
                keeps = [target - nd for nd in WHOLEBODY_DENSE_PER_GROUP]
                a = torch.matmul(q[:, :, :, :R], k[:, :, :, first:].transpose(-1, -2)) * T.scale
                rows, cols = wholebody_l3_masks(S, n_img)
                scores = _scores(a.reshape(-1, G, H * R, n_cols), _row_bias(rows, H).to(a))
                scores = scores + _col_bias([c[:n_cols] for c in cols]).to(scores)
                index = topk_indices_exportable(scores, max(keeps))
                kept, kept_pos = _take(x[:, :, first:], index, C), _take(pos[:, :, first - S:], index, C)
                xs, ps = [], []
                for g, nd in enumerate(WHOLEBODY_DENSE_PER_GROUP):
                    xs.append(torch.cat([x[:, g, :S + nd], kept[:, g, :keeps[g]]], 1))
                    ps.append(torch.cat([pos[:, g, :nd], kept_pos[:, g, :keeps[g]]], 1))
                x, pos = torch.stack(xs, 1), torch.stack(ps, 1)
            n = target
        x = ff(x)

    kp = x[:, :, :S].reshape(-1, G * S, C)[:, 1:]  # drop the padding token: COCO order
    if cfg.wholebody:
        kp = torch.cat([kp, x[:, 2, S:S + 6], x[:, 0, S:S + 68], x[:, 1, S:S + 42]], 1)  # COCO-WholeBody order
    return model.heads(kp)
