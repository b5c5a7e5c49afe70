"""Softmax-pooled token scoring, top-k selection and gather (GTPT's pruning): kernels, public ops and module.

Semantics: :func:`gtpt_kernels.reference.token_prune_reference`.

Triton path (one launch per pruning site): :func:`_prune_kernel` runs one program per (batch, group). It
computes the ``(H*R, N)`` logit slab row by row in registers (never in memory), 64 token columns at a time,
folds it into the softmax-pooled score with an online max / sum over heads x rows, selects the top ``keep``
tokens by counting each token's rank (ties: lower index first), writes the int64 index and gathers the kept
token and position-embedding rows (times the channel gate, fused) into the compact ``(B, G, keep, C)``
layout. The same kernel with selection compiled out is the scores-only op. Masks make one launch serve groups
of different shapes: ``row_mask`` drops query rows (skipped, not computed), ``col_mask`` drops candidate columns
(scored ``-inf``); with ``gate_logits`` the channel mask's sigmoid is applied to the kept rows in the gather.

The ops are registered with ``torch.library`` (``triton_op`` where available) so ``torch.compile`` can trace
them without graph breaks; the backward is plain PyTorch scatter (indices are unique per (b, g), so it is
deterministic).
"""
from __future__ import annotations

import numbers
import weakref
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..backend import call_op, fall_back_or_raise, forward_ad_error, interpreter_enabled, resolve_backend
from ..reference import softmax_pool_scores_reference, token_prune_reference

try:
    import triton
    import triton.language as tl

    from ._rounding import cast as _cast  # fp32 -> bf16 rounding under the interpreter
except Exception:  # pragma: no cover - triton missing: only the reference backend is usable
    triton = None


# ----------------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------------

if triton is not None:

    _UNROLL_ROWS = tl.constexpr(16)

    @triton.jit
    def _pool_row(m, z, w, kt, q_row, mask_row, offs_d, d_ok, sq_d, scale, HAS_MASK: tl.constexpr):
        """Fold one query row into the running (max, sum exp, sum exp * logit) of every column of ``kt``.

        Excluded rows are skipped outright (a runtime branch): with a mask that leaves groups different row
        counts (WholeBody fine L3: 73 / 48 / 12 of 74 rows), each group pays only for its own rows."""
        row_on = True
        if HAS_MASK:
            row_on = tl.load(mask_row) != 0
        if row_on:
            qr = tl.load(q_row + offs_d * sq_d, mask=d_ok, other=0.0).to(tl.float32)
            # Same operation order as the reference: (q . k) then * scale.
            a = tl.sum(kt * qr[None, :], axis=1) * scale
            m_new = tl.maximum(m, a)
            # m_new is -inf only for -inf logits; exp(-inf - -inf) would be NaN, so shift by 0 then.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            p = tl.exp(a - m_safe)
            z = z * alpha + p
            w = w * alpha + p * a
            m = m_new
        return m, z, w

    @triton.jit
    def _prune_kernel(
        q_ptr, k_ptr, mask_ptr, col_mask_ptr, tok_ptr, pos_ptr, gate_ptr,
        scores_ptr, out_ptr, out_pos_ptr, idx_ptr,
        G, H, N, D, C, K, scale,
        sq_b, sq_g, sq_h, sq_r, sq_d,
        sk_b, sk_g, sk_h, sk_n, sk_d,
        sm_g, sm_r, scm_g, scm_n,
        st_b, st_g, st_n, st_c,
        sp_b, sp_g, sp_n, sp_c,
        sgt_b, sgt_g, sgt_n, sgt_c,
        R: tl.constexpr, HAS_MASK: tl.constexpr, HAS_COL_MASK: tl.constexpr, SELECT: tl.constexpr,
        HAS_POS: tl.constexpr, HAS_GATE: tl.constexpr, TOK_F64: tl.constexpr, POS_F64: tl.constexpr,
        GATE_SIGMOID: tl.constexpr, GATE_F64: tl.constexpr, RNE_BF16: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = (pid // G).to(tl.int64)  # 64-bit base offsets: strided views of a big packed qkv can pass 2**31
        g = pid % G
        pid64 = pid.to(tl.int64)

        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < D
        q_base = q_ptr + b * sq_b + g * sq_g
        k_base = k_ptr + b * sk_b + g * sk_g  # sk_g == 0 when k broadcasts over groups
        sc_base = scores_ptr + pid64 * N

        # Scores in column chunks of BLOCK_S tokens (columns are independent, so chunking changes no result bit):
        # a (BLOCK_S, BLOCK_D) K tile and the unrolled rows' products stay in registers, where a whole
        # (BLOCK_N, BLOCK_D) tile at head dim 24 (BLOCK_D=32) spilled kilobytes per thread on sm_90.
        # Online softmax over the j = (head, row) axis, per token column n: m = running max of the logits,
        # z = sum exp(a - m), w = sum exp(a - m) * a. score = w / z. Nothing of size (H*R, N) is stored.
        for n0 in range(0, N, BLOCK_S):
            cols = n0 + offs_s
            c_ok = cols < N
            m = tl.full([BLOCK_S], float("-inf"), tl.float32)
            z = tl.zeros([BLOCK_S], tl.float32)
            w = tl.zeros([BLOCK_S], tl.float32)
            for h in range(H):
                # K tile of this head, reused by all R query rows; upcast so half inputs accumulate in fp32
                # (elementwise + reduction rather than tl.dot: D is 16/24, rows are few, and it keeps fp32 IEEE
                # numerics and the interpreter's broken bf16 tl.dot out of the picture).
                kt = tl.load(k_base + h * sk_h + cols[:, None] * sk_n + offs_d[None, :] * sk_d,
                             mask=c_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                # Few rows (R <= 8 at every COCO site): the row loop unrolls (R is a constexpr), so the compiler
                # can issue the tiny q-row loads ahead instead of one dependent load per (head, row) iteration.
                # Many rows (WholeBody fine L3: 74): a plain loop, which keeps code size and registers bounded.
                if R <= _UNROLL_ROWS:
                    for r in tl.static_range(R):
                        m, z, w = _pool_row(m, z, w, kt, q_base + h * sq_h + r * sq_r, mask_ptr + g * sm_g + r * sm_r,
                                            offs_d, d_ok, sq_d, scale, HAS_MASK)
                else:
                    for r in range(R):
                        m, z, w = _pool_row(m, z, w, kt, q_base + h * sq_h + r * sq_r, mask_ptr + g * sm_g + r * sm_r,
                                            offs_d, d_ok, sq_d, scale, HAS_MASK)
            s = w / z  # z >= 1 for real columns: every group has a valid row (checked on the host)
            if HAS_COL_MASK:
                # Columns a group may not keep score -inf: they rank after every candidate, in index order.
                col_on = tl.load(col_mask_ptr + g * scm_g + cols * scm_n, mask=c_ok, other=0) != 0
                s = tl.where(col_on, s, float("-inf"))
            # -0.0 and +0.0 compare equal (the reference's stable sort keeps index order between them) but their
            # bit keys below differ, so canonicalise.
            s = tl.where(s == 0.0, 0.0, s)
            # The scores go to memory either way: as the scores-only op's output, or as the (B, G, N) fp32
            # scratch the rank count below reads back in chunks (register tensors cannot be sliced or indexed).
            tl.store(sc_base + cols, s, mask=c_ok)

        if SELECT:
            # Rank selection: rank[n] = #{m : m beats n}, where m beats n if key[m] > key[n] or (key[m] ==
            # key[n] and m < n). key is the score's bit pattern mapped to an order-preserving int32 (flip the
            # magnitude bits of negatives), so the order is total even with NaN and ranks are a permutation of
            # 0..N-1: every output slot is written exactly once, ties go to the lower index first (the
            # reference's stable-sort rule) and the result is deterministic. O(N^2) compares in BLOCK_M x
            # BLOCK_R chunks is cheap next to the scores for N <= a few hundred and needs no tl.sort (whose
            # bitonic network is also ~100x slower in the interpreter).
            tl.debug_barrier()  # make this CTA's score stores visible to all of its threads
            offs_r = tl.arange(0, BLOCK_R)
            offs_m = tl.arange(0, BLOCK_M)
            for r0 in range(0, N, BLOCK_R):
                rows_n = r0 + offs_r
                n_ok = rows_n < N
                s_n = tl.load(sc_base + rows_n, mask=n_ok, other=0.0)
                bits_n = s_n.to(tl.int32, bitcast=True)
                key_n = bits_n ^ ((bits_n >> 31) & 0x7FFFFFFF)
                rank = tl.zeros([BLOCK_R], tl.int32)
                for m0 in range(0, N, BLOCK_M):
                    rows_m = m0 + offs_m
                    s_m = tl.load(sc_base + rows_m, mask=rows_m < N, other=0.0)
                    bits_m = s_m.to(tl.int32, bitcast=True)
                    key_m = (bits_m ^ ((bits_m >> 31) & 0x7FFFFFFF))[:, None]
                    beats = (key_m > key_n[None, :]) | ((key_m == key_n[None, :]) & (rows_m[:, None] < rows_n[None, :]))
                    beats = beats & (rows_m < N)[:, None]
                    rank += tl.sum(beats.to(tl.int32), axis=0)
                # Scatter: slot rank[n] of the index gets n (kept tokens only).
                tl.store(idx_ptr + pid64 * K + rank, rows_n.to(tl.int64), mask=n_ok & (rank < K))
            # The gather below reads the index back in row chunks.
            tl.debug_barrier()

            offs_k = tl.arange(0, BLOCK_K)
            offs_c = tl.arange(0, BLOCK_C)
            tok_base = tok_ptr + b * st_b + g * st_g  # st_g == 0 when tokens broadcast over groups
            pos_base = pos_ptr + b * sp_b + g * sp_g
            gate_base = gate_ptr + b * sgt_b + g * sgt_g
            out_base = out_ptr + pid64 * K * C  # outputs are contiguous (B, G, K, C)
            out_pos_base = out_pos_ptr + pid64 * K * C
            for k0 in range(0, K, BLOCK_K):
                rows = k0 + offs_k
                r_ok = rows < K
                src = tl.load(idx_ptr + pid64 * K + rows, mask=r_ok, other=0)
                for c0 in range(0, C, BLOCK_C):
                    cols = c0 + offs_c
                    mk = r_ok[:, None] & (cols < C)[None, :]
                    dst = rows[:, None] * C + cols[None, :]
                    x = tl.load(tok_base + src[:, None] * st_n + cols[None, :] * st_c, mask=mk, other=0.0)
                    if HAS_GATE:
                        gv = tl.load(gate_base + src[:, None] * sgt_n + cols[None, :] * sgt_c, mask=mk, other=0.0)
                        if GATE_SIGMOID:
                            # The gate arrives as the mask MLP's logits: sigmoid of the kept rows only, rounded to
                            # the gate dtype as torch.sigmoid's output would be (fp64 stays fp64).
                            if GATE_F64:
                                gv = (1.0 / (1.0 + tl.exp(-gv.to(tl.float64)))).to(gate_ptr.dtype.element_ty)
                            else:
                                gv = _cast(1.0 / (1.0 + tl.exp(-gv.to(tl.float32))), gate_ptr.dtype.element_ty,
                                               RNE_BF16)
                        # Multiply in fp32 (fp64 for fp64 outputs) and round once: for 16-bit operands the fp32
                        # product is exact, so the result is bit-identical to PyTorch's correctly rounded
                        # half-precision multiply (and avoids the interpreter's bf16 arithmetic).
                        if TOK_F64:
                            x = x.to(tl.float64) * gv.to(tl.float64)
                        else:
                            x = x.to(tl.float32) * gv.to(tl.float32)
                    tl.store(out_base + dst, _cast(x, out_ptr.dtype.element_ty, RNE_BF16), mask=mk)
                    if HAS_POS:
                        pv = tl.load(pos_base + src[:, None] * sp_n + cols[None, :] * sp_c, mask=mk, other=0.0)
                        if HAS_GATE:
                            if POS_F64:
                                pv = pv.to(tl.float64) * gv.to(tl.float64)
                            else:
                                pv = pv.to(tl.float32) * gv.to(tl.float32)
                        tl.store(out_pos_base + dst, _cast(pv, out_pos_ptr.dtype.element_ty, RNE_BF16),
                                 mask=mk)


# Column chunk of the scoring loop: a (64, BLOCK_D) K tile plus the R unrolled rows' products fit in registers at
# head dim 24 (BLOCK_D=32) on sm_90; the whole (BLOCK_N, 32) tile spilled 0.5-9 KB per thread at GTPT-S/B width.
_SCORE_BLOCK = 64
# Column chunk of the rank count (BLOCK_M x _RANK_BLOCK compares per step): one chunk at GTPT's N <= 256.
_RANK_BLOCK = 256


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _group_stride(t: Tensor) -> int:
    # A size-1 group dim broadcasts: stride 0 makes every group program read the same rows.
    return 0 if t.shape[1] == 1 else t.stride(1)


def _launch(q: Tensor, k: Tensor, row_mask: Optional[Tensor], scale: float, scores: Tensor, *,
            col_mask: Optional[Tensor] = None, tokens: Optional[Tensor] = None, pos: Optional[Tensor] = None,
            gate: Optional[Tensor] = None,
            out: Optional[Tensor] = None, out_pos: Optional[Tensor] = None, index: Optional[Tensor] = None,
            gate_sigmoid: bool = False) -> None:
    """Launch :func:`_prune_kernel` (one program per (b, g)): write the fp32 scores ``(B, G, N)`` into
    ``scores``; with ``index`` also select and gather into ``out`` / ``out_pos``."""
    B, G, H, R, D = q.shape
    N = k.shape[3]
    select = index is not None
    K = index.shape[2] if select else 1
    C = tokens.shape[3] if select else 1
    dummy = q  # never dereferenced: the matching constexpr flag compiles the access out
    mask_t = row_mask.view(torch.uint8) if row_mask is not None else dummy
    tok = tokens if select else dummy
    st = (tokens.stride(0), _group_stride(tokens), tokens.stride(2), tokens.stride(3)) if select else (0,) * 4
    sp = (pos.stride(0), _group_stride(pos), pos.stride(2), pos.stride(3)) if pos is not None else (0,) * 4
    sg = (gate.stride(0), gate.stride(1), gate.stride(2), gate.stride(3)) if gate is not None else (0,) * 4
    sm = (row_mask.stride(0), row_mask.stride(1)) if row_mask is not None else (0, 0)
    col_t = col_mask.view(torch.uint8) if col_mask is not None else dummy
    scm = (col_mask.stride(0), col_mask.stride(1)) if col_mask is not None else (0, 0)
    BLOCK_N = max(2, _next_pow2(N))
    # Gather tiles of 32 rows x 64 channels keep three live tiles (tokens, pos, gate) in registers.
    BLOCK_K = min(32, max(2, _next_pow2(K)))
    BLOCK_C = min(64, max(2, _next_pow2(C)))
    # CPU tensors mean the interpreter, whose fp32 -> bf16 casts truncate: round by hand there (ops/_rounding.py).
    bf16_out = select and any(t is not None and t.dtype == torch.bfloat16
                              for t in (out, out_pos if pos is not None else None, gate))
    rne_bf16 = q.device.type == "cpu" and bf16_out
    kernel = _prune_kernel if _OPAQUE else torch.library.wrap_triton(_prune_kernel)
    kernel[(B * G,)](
        q, k, mask_t, col_t, tok, pos if pos is not None else dummy, gate if gate is not None else dummy,
        scores, out if select else dummy,
        out_pos if pos is not None else dummy, index if select else dummy,
        G, H, N, D, C, K, float(scale),
        q.stride(0), q.stride(1), q.stride(2), q.stride(3), q.stride(4),
        k.stride(0), _group_stride(k), k.stride(2), k.stride(3), k.stride(4),
        sm[0], sm[1], scm[0], scm[1], st[0], st[1], st[2], st[3],
        sp[0], sp[1], sp[2], sp[3], sg[0], sg[1], sg[2], sg[3],
        R=R, HAS_MASK=row_mask is not None, HAS_COL_MASK=col_mask is not None, SELECT=select,
        HAS_POS=pos is not None, HAS_GATE=gate is not None,
        GATE_SIGMOID=gate is not None and gate_sigmoid, GATE_F64=gate is not None and gate.dtype == torch.float64,
        RNE_BF16=rne_bf16,
        TOK_F64=select and out.dtype == torch.float64,
        POS_F64=pos is not None and out_pos.dtype == torch.float64,
        BLOCK_S=min(_SCORE_BLOCK, BLOCK_N), BLOCK_R=min(_RANK_BLOCK, BLOCK_N), BLOCK_M=32,
        BLOCK_D=max(2, _next_pow2(D)), BLOCK_K=BLOCK_K, BLOCK_C=BLOCK_C,
        num_warps=4 if BLOCK_N <= 256 else 8,
    )


# ----------------------------------------------------------------------------------------------------------
# torch.library ops (Triton backend)
# ----------------------------------------------------------------------------------------------------------
# Compiled Triton on torch >= 2.6: ``triton_op``, whose body (``wrap_triton`` launches) doubles as the fake
# impl and which torch.compile decomposes so Inductor sees the kernel. Under the interpreter (and on torch
# without ``triton_op``) the op is an opaque ``custom_op`` with an explicit fake impl instead: ``wrap_triton``
# cannot wrap an interpreted kernel on older torch, and on newer torch it hands the bare interpreted kernel
# back, which would run on fake tensors in the fake impl and vanish from a decomposed compiled graph.
_OPAQUE = triton is None or interpreter_enabled() or not hasattr(torch.library, "triton_op")


def _register(name: str, fake):
    def deco(fn):
        if not _OPAQUE:
            return torch.library.triton_op(name, mutates_args=())(fn)
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.register_fake(fake)
        return op
    return deco


def _prune_out_dtypes(tokens: Tensor, pos: Optional[Tensor], gate: Optional[Tensor]):
    # Same promotion as the reference's ``gathered * gathered_gate``.
    tok_dt = tokens.dtype if gate is None else torch.promote_types(tokens.dtype, gate.dtype)
    pos_dt = None if pos is None else (pos.dtype if gate is None else torch.promote_types(pos.dtype, gate.dtype))
    return tok_dt, pos_dt


def _prune_alloc(q: Tensor, tokens: Tensor, pos: Optional[Tensor], gate: Optional[Tensor], keep: int):
    B, G = q.shape[:2]
    C = tokens.shape[3]
    tok_dt, pos_dt = _prune_out_dtypes(tokens, pos, gate)
    out = torch.empty((B, G, keep, C), dtype=tok_dt, device=q.device)
    # The op schema has no optional outputs: without pos an empty placeholder is returned (the public
    # function turns it into None).
    out_pos = torch.empty((B, G, keep, C) if pos is not None else (0,), dtype=pos_dt or tokens.dtype,
                          device=q.device)
    index = torch.empty((B, G, keep), dtype=torch.int64, device=q.device)
    return out, out_pos, index


def _scores_fake(q, k, row_mask, col_mask, scale):
    return q.new_empty((q.shape[0], q.shape[1], k.shape[3]), dtype=torch.float32)


def _prune_fake(q, k, tokens, pos, gate, row_mask, col_mask, keep, scale, gate_sigmoid):
    return _prune_alloc(q, tokens, pos, gate, keep)


def _softmax_pool_scores_impl(q: Tensor, k: Tensor, row_mask: Optional[Tensor], col_mask: Optional[Tensor],
                              scale: float) -> Tensor:
    scores = q.new_empty((q.shape[0], q.shape[1], k.shape[3]), dtype=torch.float32)
    _launch(q, k, row_mask, scale, scores, col_mask=col_mask)
    return scores


def _token_prune_impl(q: Tensor, k: Tensor, tokens: Tensor, pos: Optional[Tensor], gate: Optional[Tensor],
                      row_mask: Optional[Tensor], col_mask: Optional[Tensor], keep: int, scale: float,
                      gate_sigmoid: bool) -> Tuple[Tensor, Tensor, Tensor]:
    out, out_pos, index = _prune_alloc(q, tokens, pos, gate, keep)
    # fp32 score scratch for the in-kernel rank count (B*G*N*4 bytes, small next to the gathered rows).
    scratch = q.new_empty((q.shape[0], q.shape[1], k.shape[3]), dtype=torch.float32)
    _launch(q, k, row_mask, scale, scratch, col_mask=col_mask, tokens=tokens, pos=pos, gate=gate, out=out,
            out_pos=out_pos if pos is not None else None, index=index, gate_sigmoid=gate_sigmoid)
    return out, out_pos, index


# The registered ops (what autograd, torch.compile and dispatch modes see); eager inference calls the _impl
# functions directly (gtpt_kernels.backend.direct_launch).
_softmax_pool_scores_op = _register("gtpt_kernels::softmax_pool_scores", _scores_fake)(_softmax_pool_scores_impl)
_token_prune_op = _register("gtpt_kernels::token_prune", _prune_fake)(_token_prune_impl)


def softmax_pool_scores_flops(q_shape, k_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the scoring (2 per MAC of the logits ``q @ k^T``, k broadcast over groups), the convention of
    :class:`torch.utils.flop_counter.FlopCounterMode`, which counts the same matmul in the reference. Pooling,
    selection, gathering and the gate are not matmuls and are not counted."""
    B, G, H, R, D = q_shape
    return 2 * B * G * H * R * D * k_shape[3]


def _register_flop_formulas() -> None:
    from torch.utils.flop_counter import register_flop_formula
    for op in (torch.ops.gtpt_kernels.softmax_pool_scores, torch.ops.gtpt_kernels.token_prune):
        register_flop_formula(op)(softmax_pool_scores_flops)


_register_flop_formulas()


def _prune_setup_context(ctx, inputs, output):
    q, k, tokens, pos, gate, row_mask, col_mask, keep, scale, gate_sigmoid = inputs
    index = output[2]
    ctx.N = tokens.shape[2]
    ctx.tok_meta = (tokens.shape[1], tokens.dtype)
    ctx.pos_meta = (pos.shape[1], pos.dtype) if pos is not None else None
    ctx.has_gate = gate is not None
    ctx.gate_sigmoid = gate_sigmoid
    # tokens / pos are only needed for the gate's gradient; they are inputs, so saving them costs no memory.
    if gate is not None:
        ctx.save_for_backward(index, tokens, pos, gate)
    else:
        ctx.save_for_backward(index)


def _scatter_rows(v: Tensor, index: Tensor, N: int, src_groups: int, dtype: torch.dtype) -> Tensor:
    """Backward of the gather: rows ``v (B, G, K, C)`` scattered to ``(B, src_groups, N, C)``. Indices are
    unique per (b, g), so a plain scatter into zeros is exact and deterministic; broadcast sources sum their
    groups in fixed order (``sum`` over dim 1)."""
    B, G, K = index.shape
    C = v.shape[-1]
    full = torch.zeros((B, G, N, C), dtype=dtype, device=v.device)
    full.scatter_(2, index.unsqueeze(-1).expand(B, G, K, C), v.to(dtype))
    if src_groups == 1 and G > 1:
        full = full.sum(dim=1, keepdim=True)
    return full


def _prune_backward(ctx, d_out, d_out_pos, d_index):
    index = ctx.saved_tensors[0]
    B, G, K = index.shape
    d_tokens = d_pos = d_gate = None
    g_rows = None
    if ctx.has_gate:
        _, tokens, pos, gate = ctx.saved_tensors
        g_rows = _gather_rows(gate, index)
        if ctx.gate_sigmoid:
            # The same op on the same rows as the forward's sigmoid of the kept logits.
            g_rows = torch.sigmoid(g_rows)
    need = ctx.needs_input_grad
    if need[2] and d_out is not None:
        v = d_out * g_rows if g_rows is not None else d_out
        d_tokens = _scatter_rows(v, index, ctx.N, ctx.tok_meta[0], ctx.tok_meta[1])
    if ctx.pos_meta is not None and need[3] and d_out_pos is not None:
        v = d_out_pos * g_rows if g_rows is not None else d_out_pos
        d_pos = _scatter_rows(v, index, ctx.N, ctx.pos_meta[0], ctx.pos_meta[1])
    if ctx.has_gate and need[4]:
        # d gate_rows = d_out * tokens_rows + d_out_pos * pos_rows, each cast to the gate dtype before the
        # sum, as autograd accumulates the two uses of the gathered gate in the reference.
        parts = []
        if d_out is not None:
            parts.append((d_out * _gather_rows(tokens, index)).to(gate.dtype))
        if pos is not None and d_out_pos is not None:
            parts.append((d_out_pos * _gather_rows(pos, index)).to(gate.dtype))
        if parts:
            v = parts[0] if len(parts) == 1 else parts[0] + parts[1]
            if ctx.gate_sigmoid:
                # Autograd's own formula (sigmoid_backward) on the kept rows; the other rows' gradient is zero.
                v = torch.ops.aten.sigmoid_backward(v, g_rows)
            d_gate = _scatter_rows(v, index, ctx.N, G, gate.dtype)
    return None, None, d_tokens, d_pos, d_gate, None, None, None, None, None


def _gather_rows(t: Tensor, index: Tensor) -> Tensor:
    B, G, K = index.shape
    C = t.shape[-1]
    return torch.gather(t.expand(B, G, t.shape[2], C), 2, index.unsqueeze(-1).expand(B, G, K, C))


torch.library.register_autograd("gtpt_kernels::token_prune", _prune_backward, setup_context=_prune_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Public ops
# ----------------------------------------------------------------------------------------------------------

def keep_count(keep_rate: float, num_tokens: int = 256, num_dense: int = 0) -> int:
    """Number of visual tokens a GTPT site keeps: ``int(num_tokens * keep_rate) - num_dense`` (``int()``
    truncates, as the official code does: 179, 76, 25 for COCO)."""
    if isinstance(keep_rate, bool) or not isinstance(keep_rate, numbers.Real):
        raise TypeError(f"keep rate must be a real number, got {type(keep_rate).__name__}")
    keep_rate = float(keep_rate)
    if not 0.0 < keep_rate <= 1.0:  # NaN fails this too
        raise ValueError(f"keep rate must be in (0, 1], got {keep_rate!r}")
    for name, v in (("num_tokens", num_tokens), ("num_dense", num_dense)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
            raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    k = int(num_tokens * keep_rate) - int(num_dense)
    if k <= 0:
        raise ValueError(f"keep rate {keep_rate} keeps {k} tokens out of {num_tokens} ({num_dense} dense): "
                         f"must keep at least one")
    return k


def _check_scores_inputs(q: Tensor, k: Tensor, row_mask: Optional[Tensor],
                         col_mask: Optional[Tensor] = None) -> None:
    if q.dim() != 5 or k.dim() != 5:
        raise ValueError(f"q must be (B, G, H, R, D) and k (B, G or 1, H, N, D); got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    B, G, H, R, D = q.shape
    if H == 0 or R == 0 or D == 0:
        raise ValueError(f"q of shape {tuple(q.shape)} has no query rows to score with (heads, rows and head dim "
                         f"must be positive)")
    if k.shape[0] != B or k.shape[1] not in (1, G) or k.shape[2] != H or k.shape[4] != D:
        raise ValueError(f"k of shape {tuple(k.shape)} does not match q of shape {tuple(q.shape)}")
    if q.device != k.device:
        raise ValueError(f"q and k are on different devices ({q.device}, {k.device})")
    if not q.is_floating_point() or q.dtype != k.dtype:
        raise TypeError(f"q and k must share one floating dtype, got {q.dtype} and {k.dtype}")
    if row_mask is not None:
        if row_mask.shape != (G, R) or row_mask.dtype != torch.bool:
            raise ValueError(f"row_mask must be a bool tensor of shape ({G}, {R}), got {row_mask.dtype} "
                             f"{tuple(row_mask.shape)}")
        _check_mask_rows(row_mask)
    if col_mask is not None:
        N = k.shape[3]
        if col_mask.shape != (G, N) or col_mask.dtype != torch.bool:
            raise ValueError(f"col_mask must be a bool tensor of shape ({G}, {N}), got {col_mask.dtype} "
                             f"{tuple(col_mask.shape)}")


# Masks that passed the "every group keeps a row" check, by id -> (weakref, version counter). The check reads
# the mask's values, which for a CUDA mask is a device sync; GTPT passes the same constant mask every call, so
# it is checked once (again after any in-place change, which bumps ``_version``).
_MASKS_OK: dict = {}


def _check_mask_rows(row_mask: Tensor) -> None:
    # Value checks cannot run while tracing (data-dependent) or during CUDA graph capture (sync); the kernel
    # does not misbehave on such a mask, its scores for that group are NaN like the reference's.
    if torch.compiler.is_compiling() or (row_mask.is_cuda and torch.cuda.is_current_stream_capturing()):
        return
    # Inference tensors (made under torch.inference_mode) have no version counter, and cannot change in place
    # outside inference mode; one made inside is checked every call.
    version = None if row_mask.is_inference() else row_mask._version
    hit = _MASKS_OK.get(id(row_mask))
    if hit is not None and hit[0]() is row_mask and version is not None and hit[1] == version:
        return
    if not bool(row_mask.any(dim=1).all()):
        raise ValueError("row_mask leaves a group without any query row")
    if version is None:
        return
    if len(_MASKS_OK) >= 64:
        _MASKS_OK.clear()
    _MASKS_OK[id(row_mask)] = (weakref.ref(row_mask), version)


def _check_tokens(name: str, t: Tensor, B: int, G: int, N: int, device: torch.device) -> None:
    if t.dim() != 4 or t.shape[0] != B or t.shape[1] not in (1, G) or t.shape[2] != N:
        raise ValueError(f"{name} must have shape ({B}, {G} or 1, {N}, C), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def _mask_on(row_mask: Optional[Tensor], device: torch.device) -> Optional[Tensor]:
    # A CPU mask with CUDA inputs is copied each call; pass it on the device to avoid the copy.
    return None if row_mask is None else row_mask.to(device)


def softmax_pool_scores(q: Tensor, k: Tensor, scale: float, row_mask: Optional[Tensor] = None,
                        backend: Optional[str] = None, col_mask: Optional[Tensor] = None) -> Tensor:
    """fp32 softmax-pooled scores ``(B, G, N)``; see :func:`gtpt_kernels.reference.softmax_pool_scores_reference`
    (``col_mask``: excluded columns score ``-inf``).

    The Triton backend (the scoring half of :func:`token_prune`'s kernel) is not differentiable: its result never
    requires grad. Use ``backend="reference"`` to backpropagate through the scores."""
    _check_scores_inputs(q, k, row_mask, col_mask)
    name = resolve_backend(backend, q.device)
    if name == "triton":
        # The Triton scores are not differentiable (GTPT never backpropagates through them).
        return call_op("gtpt_kernels::softmax_pool_scores", _softmax_pool_scores_impl, _softmax_pool_scores_op,
                       q.detach(), k.detach(), _mask_on(row_mask, q.device), _mask_on(col_mask, q.device),
                       float(scale))
    return softmax_pool_scores_reference(q, k, scale, row_mask, col_mask)


def token_prune(q: Tensor, k: Tensor, tokens: Tensor, pos: Optional[Tensor], keep: int, scale: float,
                row_mask: Optional[Tensor] = None, gate: Optional[Tensor] = None,
                backend: Optional[str] = None, col_mask: Optional[Tensor] = None, gate_logits: bool = False
                ) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """One GTPT pruning site: score the N candidate tokens, keep the best ``keep`` per (batch, group), gather
    them (and their position embeddings), optionally gated. See
    :func:`gtpt_kernels.reference.token_prune_reference`.

    Triton backend: one kernel launch; deterministic (ties: lower index first); gradients flow to ``tokens``,
    ``pos`` and ``gate`` through an index scatter, never to ``q`` / ``k``. ``row_mask`` is best passed on the
    inputs' device (a CPU mask is copied every call); its "every group keeps a row" check runs once per mask
    tensor (and not at all under ``torch.compile`` or CUDA graph capture). ``col_mask`` ``(G, N)`` bool marks
    each group's candidate columns; excluded ones rank after all candidates (in index order), so with ``keep``
    above a group's candidate count they fill the tail of its rows - slice each group's first rows, as GTPT's
    WholeBody fine layer 3 does to prune three groups with different candidate ranges in one launch.
    ``gate_logits=True``: ``gate`` holds the mask MLP's pre-sigmoid logits and the gate is their sigmoid, which
    the kernel computes for the kept rows only (GTPT's fine entry: no full-size sigmoid pass); gradients flow to
    the logits."""
    _check_scores_inputs(q, k, row_mask, col_mask)
    B, G = q.shape[:2]
    N = k.shape[3]
    _check_tokens("tokens", tokens, B, G, N, q.device)
    if pos is not None:
        _check_tokens("pos", pos, B, G, N, q.device)
    if gate is not None:
        if tuple(gate.shape) != (B, G, N, tokens.shape[-1]):
            raise ValueError(f"gate must have shape ({B}, {G}, {N}, {tokens.shape[-1]}), got {tuple(gate.shape)}")
        if gate.device != q.device:
            raise ValueError(f"gate is on {gate.device}, expected {q.device}")
    if pos is not None and pos.shape[-1] != tokens.shape[-1]:
        raise ValueError(f"pos must have {tokens.shape[-1]} channels like tokens, got {tuple(pos.shape)}")
    for name_, t in (("tokens", tokens), ("pos", pos), ("gate", gate)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{name_} must be a floating-point tensor, got {t.dtype}")
    if gate_logits and gate is None:
        raise ValueError("gate_logits=True needs the gate logits passed as gate")
    if not isinstance(keep, int) or isinstance(keep, bool):
        raise TypeError(f"keep must be an int, got {type(keep).__name__}")
    if keep <= 0 or keep > N:
        raise ValueError(f"keep must be in [1, {N}] (the number of candidate tokens), got {keep}")
    name = resolve_backend(backend, q.device)
    if name == "triton":
        error = forward_ad_error(tokens, pos, gate)  # the reference has the forward-mode rule the kernel lacks
        if error is not None:
            name = fall_back_or_raise(error, backend)
    if name == "triton":
        # No gradient reaches q / k (selection is discrete); detaching keeps autograd from asking for one.
        out, out_pos, index = call_op("gtpt_kernels::token_prune", _token_prune_impl, _token_prune_op,
                                      q.detach(), k.detach(), tokens, pos, gate, _mask_on(row_mask, q.device),
                                      _mask_on(col_mask, q.device), keep, float(scale), bool(gate_logits))
        return out, (out_pos if pos is not None else None), index
    return token_prune_reference(q, k, tokens, pos, keep, scale, row_mask, gate, col_mask, gate_logits)


class TokenPrune(nn.Module):
    """Module wrapper of :func:`token_prune` with a fixed ``keep`` and ``scale``."""

    def __init__(self, keep: int, scale: float, backend: Optional[str] = None):
        super().__init__()
        self.keep, self.scale, self.backend = keep, scale, backend

    def forward(self, q, k, tokens, pos=None, row_mask=None, gate=None, col_mask=None, gate_logits=False):
        return token_prune(q, k, tokens, pos, self.keep, self.scale, row_mask, gate, backend=self.backend,
                           col_mask=col_mask, gate_logits=gate_logits)

    def extra_repr(self) -> str:
        return f"keep={self.keep}, scale={self.scale:.6g}"
