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

    @triton.jit
    def _logits_dot(kt, qt, IEEE: tl.constexpr, INTERPRET: tl.constexpr):
        """``kt (S, D) @ qt (D, R)`` with fp32 accumulation: the logits of R query rows against S key columns.
        Compiled: tl.dot (tensor cores for 16-bit inputs, whose products are exact in fp32; fp32 inputs ``ieee``,
        i.e. FMA, never tf32). Every output element takes the same path whatever its position, so duplicate key
        columns get bit-identical scores (the tie rule relies on it). The interpreter's tl.dot is numpy's matmul,
        whose BLAS kernels round edge columns differently (and multiplies bf16 bit patterns, triton-lang/triton
        #11584), so there the products are summed elementwise in fp32 instead: position-independent too."""
        if INTERPRET:
            return tl.sum(kt.to(tl.float32)[:, None, :] * tl.trans(qt.to(tl.float32))[None, :, :], axis=2)
        elif IEEE:
            return tl.dot(kt, qt, input_precision="ieee")
        else:
            return tl.dot(kt, qt)

    @triton.jit
    def _order_key(s, idx):
        """Strict total order of (score, index) as one int64: the score's bit pattern mapped to an order-preserving
        int32 (flip the magnitude bits of negatives, so NaNs order too) in the high word, the complement of the
        index in the low word (equal scores: the lower index is the larger key)."""
        bits = s.to(tl.int32, bitcast=True)
        key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)
        return (key << 32) | (4294967295 - idx.to(tl.int64))

    @triton.jit
    def _rank_gather(sc_base, n_lo, n_hi, N, C, K, bg64,
                     tok_base, pos_base, gate_base, st_n, st_c, sp_n, sp_c, sgt_n, sgt_c,
                     out_base, out_pos_base, idx_base, gate_ty: tl.constexpr, out_ty: tl.constexpr,
                     out_pos_ty: tl.constexpr,
                     HAS_POS: tl.constexpr, HAS_GATE: tl.constexpr, TOK_F64: tl.constexpr, POS_F64: tl.constexpr,
                     GATE_SIGMOID: tl.constexpr, GATE_F64: tl.constexpr, RNE_BF16: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """Select and gather the kept columns among ``[n_lo, n_hi)`` of one (batch, group) row of scores.

        rank[n] = #{m in 0..N-1 : key[m] > key[n]} with :func:`_order_key`, a strict total order: ranks are a
        permutation of 0..N-1, so every kept slot (rank < K) is written by exactly one column, ties go to the lower
        index first (the reference's stable-sort rule) and the result is deterministic without atomics, whichever
        program owns the column. O(N^2) compares in (BLOCK_M, BLOCK_R) chunks is cheap next to the scores for N <=
        a few hundred and needs no tl.sort (whose bitonic network is also ~100x slower in the interpreter). Each
        kept column's token (and position) row goes straight to its slot, gated, so the index is never read back."""
        offs_r = tl.arange(0, BLOCK_R)
        offs_m = tl.arange(0, BLOCK_M)
        offs_c = tl.arange(0, BLOCK_C)
        for r0 in range(n_lo, n_hi, BLOCK_R):
            rows_n = r0 + offs_r
            n_ok = rows_n < n_hi
            e_n = _order_key(tl.load(sc_base + rows_n, mask=n_ok, other=0.0), rows_n)
            rank = tl.zeros([BLOCK_R], tl.int32)
            for m0 in range(0, N, BLOCK_M):
                rows_m = m0 + offs_m
                m_ok = rows_m < N
                e_m = _order_key(tl.load(sc_base + rows_m, mask=m_ok, other=0.0), rows_m)
                # Past N: the smallest key (INT32_MIN high word, an index past every real one), never beats.
                e_m = tl.where(m_ok, e_m, -9223372036854775807 - 1)
                rank += tl.sum((e_m[:, None] > e_n[None, :]).to(tl.int32), axis=0)
            kept = n_ok & (rank < K)
            tl.store(idx_base + rank, rows_n.to(tl.int64), mask=kept)
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + offs_c
                mk = kept[:, None] & (cols < C)[None, :]
                dst = rank[:, None] * C + cols[None, :]
                x = tl.load(tok_base + rows_n[:, None] * st_n + cols[None, :] * st_c, mask=mk, other=0.0)
                if HAS_GATE:
                    gv = tl.load(gate_base + rows_n[:, None] * sgt_n + cols[None, :] * sgt_c, mask=mk, other=0.0)
                    if GATE_SIGMOID:
                        # The gate arrives as the mask MLP's logits: sigmoid of the kept rows only, rounded to
                        # the gate dtype as torch.sigmoid's output would be (fp64 stays fp64).
                        if GATE_F64:
                            gv = (1.0 / (1.0 + tl.exp(-gv.to(tl.float64)))).to(gate_ty)
                        else:
                            gv = _cast(1.0 / (1.0 + tl.exp(-gv.to(tl.float32))), gate_ty, RNE_BF16)
                    # Multiply in fp32 (fp64 for fp64 outputs) and round once: for 16-bit operands the fp32
                    # product is exact, so the result is bit-identical to PyTorch's correctly rounded
                    # half-precision multiply (and avoids the interpreter's bf16 arithmetic).
                    if TOK_F64:
                        x = x.to(tl.float64) * gv.to(tl.float64)
                    else:
                        x = x.to(tl.float32) * gv.to(tl.float32)
                tl.store(out_base + dst, _cast(x, out_ty, RNE_BF16), mask=mk)
                if HAS_POS:
                    pv = tl.load(pos_base + rows_n[:, None] * sp_n + cols[None, :] * sp_c, mask=mk, other=0.0)
                    if HAS_GATE:
                        if POS_F64:
                            pv = pv.to(tl.float64) * gv.to(tl.float64)
                        else:
                            pv = pv.to(tl.float32) * gv.to(tl.float32)
                    tl.store(out_pos_base + dst, _cast(pv, out_pos_ty, RNE_BF16), mask=mk)

    @triton.jit
    def _prune_kernel(
        q_ptr, k_ptr, mask_ptr, col_mask_ptr, tok_ptr, pos_ptr, gate_ptr,
        scores_ptr, out_ptr, out_pos_ptr, idx_ptr,
        G, N, C, K, scale,
        sq_b, sq_g, sq_h8, sq_r, sq_d,
        sk_b, sk_g, sk_h8, sk_n, sk_d,
        sm_g, sm_r, scm_g, scm_n,
        st_b, st_g, st_n, st_c,
        sp_b, sp_g, sp_n, sp_c,
        sgt_b, sgt_g, sgt_n, sgt_c,
        H: tl.constexpr, R: tl.constexpr, D: tl.constexpr, HVEC_Q: tl.constexpr, HVEC_K: tl.constexpr,
        HAS_MASK: tl.constexpr, HAS_COL_MASK: tl.constexpr, SELECT: tl.constexpr,
        HAS_POS: tl.constexpr, HAS_GATE: tl.constexpr, TOK_F64: tl.constexpr, POS_F64: tl.constexpr,
        GATE_SIGMOID: tl.constexpr, GATE_F64: tl.constexpr, RNE_BF16: tl.constexpr,
        IEEE: tl.constexpr, INTERPRET: tl.constexpr,
        NSPLIT: tl.constexpr, SPLIT_COLS: tl.constexpr,
        BLOCK_S: tl.constexpr, BLOCK_QR: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # One program per (batch, group) (NSPLIT == 1: scores, selection and gather in one launch), or per
        # (batch, group, SPLIT_COLS-column slice) (scores only; :func:`_prune_select_kernel` selects after).
        pid = tl.program_id(0)
        bg = pid // NSPLIT
        b = (bg // G).to(tl.int64)  # 64-bit base offsets: strided views of a big packed qkv can pass 2**31
        g = bg % G
        pid64 = bg.to(tl.int64)
        n_lo = (pid % NSPLIT) * SPLIT_COLS
        n_hi = tl.minimum(n_lo + SPLIT_COLS, N)

        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        offs_qr = tl.arange(0, BLOCK_QR)
        d_ok = offs_d < D  # D is a constexpr: the mask is a compile-time pattern, and so is every head offset
        # Head strides arrive divided by HVEC (the largest of 8 / 4 / 2 / 1 dividing them): multiplied back by a
        # constexpr, the compiler sees every head's rows 16-byte aligned and loads them as vectors (a runtime head
        # stride of 24 elements, the packed qkv's, proves nothing and gave scalar 2-byte loads).
        sk_h = sk_h8 * HVEC_K
        sq_h = sq_h8 * HVEC_Q
        q_base = q_ptr + b * sq_b + g * sq_g
        k_base = k_ptr + b * sk_b + g * sk_g  # sk_g == 0 when k broadcasts over groups
        sc_base = scores_ptr + pid64 * N

        # Scores in column chunks of BLOCK_S tokens (columns are independent, so chunking changes no result bit).
        # Per head, the logits of BLOCK_QR query rows against the chunk are one tl.dot ``K_h (S, D) @ Q_h^T (D, QR)``
        # (fp32 accumulation), laid out with the columns across threads and the rows along the dot's N axis, so the
        # per-column reductions over rows are in-thread plus two lane shuffles. Online softmax over the j = (head,
        # row) axis, per token column n: m = running max of the logits, z = sum exp(a - m), w = sum exp(a - m) * a;
        # score = w / z. Excluded rows (row_mask, or past R) are masked to weight 0, not branched around. Nothing of
        # size (H*R, N) is stored.
        for n0 in range(n_lo, n_hi, BLOCK_S):
            cols = n0 + offs_s
            c_ok = cols < n_hi
            m = tl.full([BLOCK_S], float("-inf"), tl.float32)
            z = tl.zeros([BLOCK_S], tl.float64)
            w = tl.zeros([BLOCK_S], tl.float64)
            # A loop, not unrolled: unrolled, fp32 WholeBody fine L3 (74 rows, 3 x 8 FMA dots) spilled 16 KB on sm_90.
            for r0 in range(0, R, BLOCK_QR):
                rows = r0 + offs_qr
                r_in = rows < R
                r_on = r_in
                if HAS_MASK:
                    r_on = r_on & (tl.load(mask_ptr + g * sm_g + rows * sm_r, mask=r_in, other=0) != 0)
                for h in tl.static_range(H):
                    kt = tl.load(k_base + h * sk_h + cols[:, None] * sk_n + offs_d[None, :] * sk_d,
                                 mask=c_ok[:, None] & d_ok[None, :], other=0.0)
                    qt = tl.load(q_base + h * sq_h + rows[None, :] * sq_r + offs_d[:, None] * sq_d,
                                 mask=d_ok[:, None] & r_on[None, :], other=0.0)
                    if kt.dtype == tl.float64:  # fp64 inputs are scored in fp32, as the fp32 reference does
                        kt = kt.to(tl.float32)
                        qt = qt.to(tl.float32)
                    # Same operation order as the reference: (q . k) then * scale.
                    a0 = _logits_dot(kt, qt, IEEE, INTERPRET) * scale
                    a = tl.where(r_on[None, :], a0, float("-inf"))
                    m_new = tl.maximum(m, tl.max(a, axis=1))
                    # m_new is -inf only for -inf logits; exp(-inf - -inf) would be NaN, so shift by 0 then.
                    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                    alpha = tl.exp(m - m_safe)
                    p = tl.exp(a - m_safe[:, None])  # exactly 0 on excluded rows (their a0 is finite: q rows are 0)
                    # z and w are summed in fp64 across the (head, row-block) steps: a handful of fp64 operations
                    # per column and step (nothing per logit), which keeps the scores within about an fp32 ulp of
                    # exact, so near-ties rank as in an exact computation rather than by accumulated rounding.
                    alpha64 = alpha.to(tl.float64)
                    z = z * alpha64 + tl.sum(p, axis=1).to(tl.float64)
                    w = w * alpha64 + tl.sum(p * a0, axis=1).to(tl.float64)
                    m = m_new
            s = (w / z).to(tl.float32)  # z >= 1 for real columns: every group has a valid row (checked on the host)
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
            tl.debug_barrier()  # make this CTA's score stores visible to all of its threads
            _rank_gather(sc_base, 0, N, N, C, K, pid64,
                         tok_ptr + b * st_b + g * st_g, pos_ptr + b * sp_b + g * sp_g,  # st_g == 0: broadcast
                         gate_ptr + b * sgt_b + g * sgt_g, st_n, st_c, sp_n, sp_c, sgt_n, sgt_c,
                         out_ptr + pid64 * K * C, out_pos_ptr + pid64 * K * C, idx_ptr + pid64 * K,
                         gate_ptr.dtype.element_ty, out_ptr.dtype.element_ty, out_pos_ptr.dtype.element_ty,
                         HAS_POS, HAS_GATE, TOK_F64, POS_F64, GATE_SIGMOID, GATE_F64, RNE_BF16,
                         BLOCK_R, BLOCK_M, BLOCK_C)

    @triton.jit
    def _prune_select_kernel(
        scores_ptr, tok_ptr, pos_ptr, gate_ptr, out_ptr, out_pos_ptr, idx_ptr,
        G, N, C, K,
        st_b, st_g, st_n, st_c,
        sp_b, sp_g, sp_n, sp_c,
        sgt_b, sgt_g, sgt_n, sgt_c,
        HAS_POS: tl.constexpr, HAS_GATE: tl.constexpr, TOK_F64: tl.constexpr, POS_F64: tl.constexpr,
        GATE_SIGMOID: tl.constexpr, GATE_F64: tl.constexpr, RNE_BF16: tl.constexpr,
        NSPLIT: tl.constexpr, SPLIT_COLS: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """Selection and gather after a column-split :func:`_prune_kernel` launch: one program per (batch, group,
        column slice) ranks its slice's columns against the group's N scores and writes its kept columns' slots
        (index, token and position rows). Slots are disjoint across programs, so no atomics are needed."""
        pid = tl.program_id(0)
        bg = pid // NSPLIT
        b = (bg // G).to(tl.int64)
        g = bg % G
        pid64 = bg.to(tl.int64)
        n_lo = (pid % NSPLIT) * SPLIT_COLS
        n_hi = tl.minimum(n_lo + SPLIT_COLS, N)
        _rank_gather(scores_ptr + pid64 * N, n_lo, n_hi, N, C, K, pid64,
                     tok_ptr + b * st_b + g * st_g, pos_ptr + b * sp_b + g * sp_g,
                     gate_ptr + b * sgt_b + g * sgt_g, st_n, st_c, sp_n, sp_c, sgt_n, sgt_c,
                     out_ptr + pid64 * K * C, out_pos_ptr + pid64 * K * C, idx_ptr + pid64 * K,
                     gate_ptr.dtype.element_ty, out_ptr.dtype.element_ty, out_pos_ptr.dtype.element_ty,
                     HAS_POS, HAS_GATE, TOK_F64, POS_F64, GATE_SIGMOID, GATE_F64, RNE_BF16,
                     BLOCK_R, BLOCK_M, BLOCK_C)


# Column chunk of the scoring loop: the (64, BLOCK_D) K tile of a head and the (64, BLOCK_QR) logits of its dot.
_SCORE_BLOCK = 64
# Query rows per logit dot (the dot's N axis): all of a COCO / WholeBody-entry site's rows in one; WholeBody fine
# L3 (74 rows) in two chunks, which keeps the logit tile and its exponentials in registers.
_ROW_BLOCK = 32
# Software-pipeline stages of the column loop: every head's K tile is a dot operand in shared memory, so each
# stage costs H tiles; the default 3 stages took 121 KB at GTPT-S (one block per SM).
_SCORE_STAGES = 1
# Column chunk of the rank count (BLOCK_M x _RANK_BLOCK compares per step): one chunk at GTPT's N <= 256.
_RANK_BLOCK = 256


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _head_vec(t: Tensor) -> int:
    """Largest of 8, 4, 2, 1 dividing the head stride of ``t`` (B, G, H, rows, D) when its head dim is contiguous
    (1 otherwise): the kernel gets the head stride divided by it and multiplies back by a constexpr."""
    if t.stride(4) != 1:
        return 1
    for v in (8, 4, 2):
        if t.stride(2) % v == 0:
            return v
    return 1


def _group_stride(t: Tensor) -> int:
    # A size-1 group dim broadcasts: stride 0 makes every group program read the same rows.
    return 0 if t.shape[1] == 1 else t.stride(1)


def _launch(q: Tensor, k: Tensor, row_mask: Optional[Tensor], scale: float, scores: Tensor, *,
            col_mask: Optional[Tensor] = None, tokens: Optional[Tensor] = None, pos: Optional[Tensor] = None,
            gate: Optional[Tensor] = None,
            out: Optional[Tensor] = None, out_pos: Optional[Tensor] = None, index: Optional[Tensor] = None,
            gate_sigmoid: bool = False) -> None:
    """Launch :func:`_prune_kernel`: write the fp32 scores ``(B, G, N)`` into ``scores``; with ``index`` also
    select and gather into ``out`` / ``out_pos`` (in the same launch, or in a :func:`_prune_select_kernel` launch
    after a column-split scoring launch, see :func:`_column_splits`)."""
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
    # fp32 / fp64 inputs: FMA dots whose operands stay in registers; 64 columns spilled 64-96 B at GTPT-S on sm_90.
    BLOCK_S = min(_SCORE_BLOCK if q.element_size() == 2 else _SCORE_BLOCK // 2, BLOCK_N)
    # Query-row blocks: fp32 / fp64 FMA dots hold both operands in registers: 32-row blocks at WholeBody fine L3
    # (74 rows) took 254 registers and spilled 40 B on sm_90; 16-row blocks (also less padding: 80 rows, not 96)
    # take 168 and store 24 B of long-lived values to the stack around the row loop (est. 2.25x -> 1.85x floor).
    # (Compiled only: the interpreter's cost is per row block, so it keeps the larger blocks.)
    wide_rows = q.element_size() == 2 or q.device.type == "cpu"
    block_qr = max(16, min(_ROW_BLOCK if wide_rows else _ROW_BLOCK // 2, _next_pow2(R)))
    # Gather tiles of 32 kept rows x 64 channels keep three live tiles (tokens, pos, gate) in registers.
    BLOCK_R = min(32, BLOCK_N)
    BLOCK_C = min(64, max(2, _next_pow2(C)))
    nsplit, split_cols = _column_splits(B * G, N, BLOCK_S, q.device)
    fused = select and nsplit == 1
    # CPU tensors mean the interpreter, whose fp32 -> bf16 casts truncate: round by hand there (ops/_rounding.py).
    bf16_out = select and any(t is not None and t.dtype == torch.bfloat16
                              for t in (out, out_pos if pos is not None else None, gate))
    rne_bf16 = q.device.type == "cpu" and bf16_out
    gather_flags = dict(
        HAS_POS=pos is not None, HAS_GATE=gate is not None,
        TOK_F64=select and out.dtype == torch.float64,
        POS_F64=pos is not None and out_pos.dtype == torch.float64,
        GATE_SIGMOID=gate is not None and gate_sigmoid, GATE_F64=gate is not None and gate.dtype == torch.float64,
        RNE_BF16=rne_bf16, NSPLIT=nsplit, SPLIT_COLS=split_cols,
        BLOCK_R=BLOCK_R, BLOCK_M=min(_RANK_BLOCK, BLOCK_N), BLOCK_C=BLOCK_C,
    )
    pos_t = pos if pos is not None else dummy
    gate_t = gate if gate is not None else dummy
    out_t = out if select else dummy
    out_pos_t = out_pos if pos is not None else dummy
    index_t = index if select else dummy
    kernel = _prune_kernel if _OPAQUE else torch.library.wrap_triton(_prune_kernel)
    hvec_q, hvec_k = _head_vec(q), _head_vec(k)
    kernel[(B * G * nsplit,)](
        q, k, mask_t, col_t, tok, pos_t, gate_t, scores,
        out_t if fused else dummy, out_pos_t if fused else dummy, index_t if fused else dummy,
        G, N, C, K, float(scale),
        q.stride(0), q.stride(1), q.stride(2) // hvec_q, q.stride(3), q.stride(4),
        k.stride(0), _group_stride(k), k.stride(2) // hvec_k, k.stride(3), k.stride(4),
        sm[0], sm[1], scm[0], scm[1], st[0], st[1], st[2], st[3],
        sp[0], sp[1], sp[2], sp[3], sg[0], sg[1], sg[2], sg[3],
        H=H, R=R, D=D, HVEC_Q=hvec_q, HVEC_K=hvec_k,
        HAS_MASK=row_mask is not None, HAS_COL_MASK=col_mask is not None, SELECT=fused,
        IEEE=q.dtype in (torch.float32, torch.float64), INTERPRET=q.device.type == "cpu",
        BLOCK_S=BLOCK_S, BLOCK_QR=block_qr, BLOCK_D=max(16, _next_pow2(D)),
        num_warps=4 if BLOCK_N <= 256 else 8, num_stages=_SCORE_STAGES, **gather_flags,
    )
    if select and not fused:
        kernel = _prune_select_kernel if _OPAQUE else torch.library.wrap_triton(_prune_select_kernel)
        kernel[(B * G * nsplit,)](
            scores, tok, pos_t, gate_t, out_t, out_pos_t, index_t,
            G, N, C, K, st[0], st[1], st[2], st[3], sp[0], sp[1], sp[2], sp[3], sg[0], sg[1], sg[2], sg[3],
            num_warps=4, **gather_flags,
        )


# Column splits (see _column_splits): None = the device's SM count where it can be queried, no split elsewhere
# (CPU / the interpreter, meta and fake tensors); an int forces that SM count (tests, AOT compiles of the split).
_SPLIT_SM_COUNT: Optional[int] = None
_SM_COUNTS: dict = {}


def _sm_count(device: torch.device) -> Optional[int]:
    if _SPLIT_SM_COUNT is not None:
        return _SPLIT_SM_COUNT
    if device.type != "cuda":
        return None
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNTS:
        try:
            _SM_COUNTS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
        except Exception:  # fake / traced CUDA tensors without a GPU
            _SM_COUNTS[idx] = None
    return _SM_COUNTS[idx]


def _column_splits(programs: int, N: int, block_s: int, device: torch.device) -> Tuple[int, int]:
    """(slices per (batch, group), columns per slice). One program per (batch, group) fills the GPU when there
    are at least as many as SMs (GTPT at B = 128: 128 - 384): then scoring, selection and gather run in one launch.
    Fewer (B = 32: 32 - 96 programs on 132 SMs) split the columns into BLOCK_S-multiple slices, up to one wave of
    programs, and the selection runs as a second launch over the same slices (:func:`_prune_select_kernel`)."""
    chunks = -(-N // block_s)
    sms = _sm_count(device)
    if sms is None or programs >= sms or chunks == 1:
        return 1, chunks * block_s
    per = -(-chunks // min(chunks, -(-sms // programs)))  # score chunks per slice
    return -(-chunks // per), per * block_s


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
