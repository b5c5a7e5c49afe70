"""Multi-Head Group Attention (MHGA): fused Triton kernels, ``torch.library`` op, public function, ``nn.Module``.

Semantics: :func:`gtpt_kernels.reference.group_attention_reference` (the contract; tests compare against it in
fp64). In short, ``qkv`` is the packed ``to_qkv`` output ``(B, G, N, 3C)``; group ``g``'s queries are its ``N``
tokens, its keys/values are the ``G*S`` shared tokens (the first ``S`` tokens of every group, group-major) followed
by its own ``N - S`` tokens. ``G=1, S=0`` is plain multi-head self-attention.

Design (see ``/work/shared/reference/kernel-anchors.md`` sections 3, 4 and 9):

* **Forward** - FlashAttention-2 online softmax in base 2, one program per (batch*group, head, query tile).
  The key loop runs over the *virtual* key sequence of the group, ``j in [0, G*S + N - S)``: index arithmetic
  maps ``j < G*S`` to shared token ``(j // S, j % S)`` and the rest to the group's own token ``j - G*S + S``, and
  rows are loaded straight from ``qkv`` through its strides. The shared keys are therefore visited first, then
  the own keys, without ever materialising the repeated keys, the logits or the probabilities. Both segments run
  through one loop so a partial shared tile and the first own tile share a block (GTPT's 18 shared + 76 own keys
  are 2 tiles of 64, not 3). The kernel writes ``o`` in ``(B, G, N, C)`` (heads merged, ready for ``to_out``) and
  the row log-sum-exp in base 2, fp32 ``(B, G, H, N)``, for the backward.
* **Backward** - two launches, no atomics, hence bitwise deterministic:
  1. ``dq`` kernel (query-parallel, same grid as the forward): computes ``delta = rowsum(o * do)`` for its rows
     (stored for launch 2), recomputes ``P`` from the LSE and accumulates ``dq``.
  2. ``dk/dv`` kernel (key-parallel), over two kinds of work item per (batch, head): tiles of the ``G*S`` shared
     keys (a shared key is a key of *every* group, so the item loops over the query groups in a fixed order and
     sums their contributions in registers) and, per group, tiles of its ``N - S`` own keys (its own queries
     only), so no tile mixes the two and idles rows. The items are spread over the (batch*group, head,
     cdiv(N, tile)) grid; a slot runs at most one of each kind. Each element of ``dk``/``dv`` is produced by
     exactly one item in a fixed order.
  ``dqkv`` is written in ``qkv``'s packed ``(B, G, N, 3C)`` layout.
* **pad_token** - as the official layer masks it: key 0 (shared token 0 of group 0) is masked for every query but
  the pad query row (g=0, n=0), whose logits are all masked, i.e. equal: a uniform softmax over all of group 0's
  keys, pad key included (the kernel sets that row's logits to 0). In the backward that row's ``dS`` is zero (its
  logits are constants: no dq, no dk from it), while its ``P`` = 1/L still carries ``do`` into every ``dv``.
  The running max is guarded so that a key tile that is entirely masked for a row (e.g. the pad key alone)
  cannot produce NaN.
* **Precision** - fp32 inputs use exact IEEE fp32 dots by default so fp32 training matches eager PyTorch; TF32 can
  be requested with ``fp32_precision="tf32"`` or ``GTPT_KERNELS_FP32_PRECISION=tf32``. fp16/bf16 follow
  FlashAttention: fp32 accumulation and softmax, ``P``/``dS`` rounded to the input dtype for the second matmul.
  Under the Triton interpreter bf16 ``tl.dot`` is broken (triton-lang/triton#11584), so there the dot operands
  are upcast to fp32.
* **Cost** - the shared count is a constexpr (the key mapping is a multiply-shift), masks run only in the tiles
  that need them (``PEEL``; compiled fp32 keeps one masked loop), the pad row/column comes from zeroed ``q``/``dO``
  rows and a once-per-program fix-up of the pad key's dk/dv row, and 16-bit dk/dv runs one warp per 16 key rows,
  the 16-bit forward and dq one warp per 32-row query tile (head dims <= 32). The 16-bit forward rescales lazily
  (FlashAttention-4): after the exact first tile the running max moves only when a tile's max exceeds it by more
  than ``_LAZY_RESCALE`` (log2 units), in a program-uniform branch. Static sm_90 estimates are in the README.
* **Launch configs** - a fixed heuristic keyed on (N, D, dtype), no autotuning: the autotuner crashes without a
  GPU, and a benchmark-driven choice of ``BLOCK_N`` would change the summation order from process to process,
  breaking run-to-run bitwise reproducibility.
"""
from __future__ import annotations

import operator
import os
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..backend import call_op, fall_back_or_raise, forward_ad_error, interpreter_enabled, resolve_backend
from ..reference import group_attention_reference

try:
    import triton
    import triton.language as tl

    from ._rounding import cast as _cast  # fp32 -> bf16 rounding under the interpreter
except ImportError:  # pragma: no cover - no triton: only the reference backend exists
    triton = None
    tl = None

__all__ = ["group_attention", "GroupAttention", "group_attention_macs", "group_attention_flops",
           "group_attention_backward_flops", "FP32_PRECISION_ENV"]

FP32_PRECISION_ENV = "GTPT_KERNELS_FP32_PRECISION"
_FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_HEAD_DIM = 128  # register budget of one (BLOCK_M, BLOCK_D) fp32 accumulator per program

_LOG2E = 1.4426950408889634
# Lazy rescaling of the forward's online softmax (16-bit dots, and every dtype under the interpreter): the running
# row max moves only when a tile's max exceeds it by more than this many log2 units, so P <= 2^_LAZY_RESCALE.
_LAZY_RESCALE = 8.0

# Test hook: when True, every buffer the kernels must fully write is pre-filled with NaN, so an element a
# kernel forgets to write fails the closeness checks instead of silently holding stale memory.
_POISON_OUTPUTS = False


# ----------------------------------------------------------------------------------------------------------------
# FLOP accounting
# ----------------------------------------------------------------------------------------------------------------

def group_attention_macs(B: int, G: int, N: int, C: int, heads: int, num_shared: int) -> int:
    """Multiply-accumulates of one MHGA forward: ``QK^T`` and ``PV``, each ``B*G*H*N*L*D`` with
    ``L = G*S + N - S`` keys per group, i.e. ``2*B*G*N*L*C`` (``H*D = C``). Same count as the reference's two
    matmuls (masked pad entries included), so numbers are comparable across backends."""
    L = G * num_shared + N - num_shared
    D = C // heads
    return 2 * B * G * heads * N * L * D


def group_attention_flops(qkv_shape, heads: int, num_shared: int, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the forward op (2 per MAC), the convention of :class:`torch.utils.flop_counter.FlopCounterMode`."""
    B, G, N, C3 = qkv_shape
    return 2 * group_attention_macs(B, G, N, C3 // 3, heads, num_shared)


def group_attention_backward_flops(grad_out_shape, qkv_shape, out_shape_, lse_shape, heads: int, num_shared: int,
                                   *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the backward op counted as FlopCounterMode counts the reference's backward: each of the two
    forward matmuls has two gradient matmuls, so twice the forward. (The kernel also recomputes ``QK^T``, as every
    flash-style backward does; that recompute is not counted, matching PyTorch's SDPA formulas.)"""
    B, G, N, C3 = qkv_shape
    return 4 * group_attention_macs(B, G, N, C3 // 3, heads, num_shared)


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _dot(a, b, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
        # UPCAST (interpreter + bf16 only): the interpreter multiplies bf16 bit patterns in tl.dot; computing in fp32
        # is exact for bf16 inputs. The same flag makes _cast round fp32 -> bf16 by hand (the interpreter truncates).
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=DOT_PREC)
        else:
            return tl.dot(a, b, input_precision=DOT_PREC)

    @triton.jit
    def _key_rows(offs_j, g, GS, s_qg, s_qn, S: tl.constexpr):
        """Element offsets (within one batch entry of ``qkv``) of the rows behind virtual keys ``offs_j`` of group
        ``g``: ``j < G*S`` is shared token ``j % S`` of group ``j // S`` (group-major, as the reference
        concatenates), ``j >= G*S`` the group's own token ``j - G*S + S``. ``S`` is a constexpr, so ``j // S`` is a
        multiply-high and a shift, not an integer division (GTPT launches S = 0 and 6 only)."""
        if S == 0:
            return g * s_qg + offs_j * s_qn
        else:
            sg = offs_j // S
            shared = offs_j < GS
            src_g = tl.where(shared, sg, g)
            src_n = tl.where(shared, offs_j - sg * S, offs_j - GS + S)
            return src_g * s_qg + src_n * s_qn

    @triton.jit
    def _tile_logits(q, base, start, g, GS, L, s_qg, s_qn, k_cols, v_cols, own_k, v_off, d_mask, not_pad_row,
                     qk_scale,
                     S: tl.constexpr, BLOCK_N: tl.constexpr, BOUNDS: tl.constexpr, PAD_KEY: tl.constexpr,
                     POS_SCALE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, OWN_ONLY: tl.constexpr):
        """The masked logits of one key tile, shared by the forward and dq (so both see the same P): the key and
        value pointers (when OWN_ONLY, the loop-invariant key pointers ``own_k`` of the group's first own keys
        moved by ``start`` rows, values ``v_off`` elements further: a 64-bit add per 16-byte chunk instead of a
        row-offset multiply and a pointer build), their load mask, the keys, and ``q . k`` (times ``qk_scale``
        unless POS_SCALE, where the caller folds the scale in later) with keys >= L (BOUNDS) and the pad key
        (PAD_KEY) at -inf."""
        offs_j = start + tl.arange(0, BLOCK_N)
        if OWN_ONLY:
            k_ptrs = own_k + start * s_qn
            v_ptrs = k_ptrs + v_off
        else:
            rows = _key_rows(offs_j, g, GS, s_qg, s_qn, S)
            k_ptrs = base + rows[:, None] + k_cols[None, :]
            v_ptrs = base + rows[:, None] + v_cols[None, :]
        if BOUNDS:
            kv_mask = (offs_j < L)[:, None] & d_mask
        else:
            kv_mask = d_mask
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        qk = _dot(q, tl.trans(k), DOT_PREC, UPCAST)
        if not POS_SCALE:
            qk = qk * qk_scale
        if BOUNDS:
            qk = tl.where((offs_j < L)[None, :], qk, float("-inf"))
        if PAD_KEY:
            qk = tl.where((offs_j == 0)[None, :] & not_pad_row[:, None], float("-inf"), qk)
        return v_ptrs, kv_mask, k, qk

    @triton.jit
    def _fwd_tile(acc, m_i, l_i, q, base, start, g, GS, L, s_qg, s_qn, k_cols, v_cols, own_k, v_off, d_mask,
                  not_pad_row, qk_scale, S: tl.constexpr, BLOCK_N: tl.constexpr, BOUNDS: tl.constexpr,
                  PAD_KEY: tl.constexpr, POS_SCALE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                  GUARD: tl.constexpr, OWN_ONLY: tl.constexpr, SUM_DOT: tl.constexpr):
        """One key tile of the online softmax, the max moved on every tile. BOUNDS masks keys >= L (only the first
        and the last tile); PAD_KEY masks virtual key 0 for every row but the pad row (only the first tile). GUARD:
        a row may still have no unmasked key (only the first tile: after it every row has a finite max). OWN_ONLY:
        the tile holds only the group's own keys (every tile after the first when G*S <= BLOCK_N), a plain row
        offset. SUM_DOT: the row sums of P run on the tensor cores, ``l_i`` being a (BLOCK_M, 16) accumulator of
        P.ones (every column the row sum of the rounded P the P.V dot multiplies), instead of a per-logit add
        and a cross-lane reduction per tile. (16-bit dots move the max lazily after the first tile: the kernel's
        LAZY branch around _fwd_rescale, then _fwd_accumulate.)"""
        v_ptrs, kv_mask, k, qk = _tile_logits(q, base, start, g, GS, L, s_qg, s_qn, k_cols, v_cols, own_k, v_off,
                                              d_mask, not_pad_row, qk_scale, S, BLOCK_N, BOUNDS, PAD_KEY, POS_SCALE,
                                              DOT_PREC, UPCAST, OWN_ONLY)
        m_new = tl.maximum(m_i, _row_max(qk, qk_scale, POS_SCALE))
        if GUARD:
            # A row whose keys so far are all masked keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        alpha = tl.math.exp2(m_i - m_sub)
        if SUM_DOT:
            l_i = l_i * alpha[:, None]
        else:
            l_i = l_i * alpha
        acc, l_i = _fwd_accumulate(acc * alpha[:, None], l_i, qk, m_sub, v_ptrs, kv_mask, qk_scale,
                                   BLOCK_N, POS_SCALE, DOT_PREC, UPCAST, SUM_DOT)
        return acc, m_new, l_i

    @triton.jit
    def _row_max(qk, qk_scale, POS_SCALE: tl.constexpr):
        """Row max of a tile's logits in exp2 units (scale > 0 commutes with the max: one multiply per row)."""
        if POS_SCALE:
            return tl.max(qk, 1) * qk_scale
        else:
            return tl.max(qk, 1)

    @triton.jit
    def _fwd_accumulate(acc, l_i, qk, m_sub, v_ptrs, kv_mask, qk_scale, BLOCK_N: tl.constexpr,
                        POS_SCALE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
                        SUM_DOT: tl.constexpr):
        """P = exp2(logits - m_sub) of one tile added into acc (P.V) and l_i (row sums), both already scaled to
        the max m_sub."""
        if POS_SCALE:
            # scale > 0: one FFMA per logit (scale, subtract) instead of FMUL + FADD.
            p = tl.math.exp2(qk * qk_scale - m_sub[:, None])
        else:
            p = tl.math.exp2(qk - m_sub[:, None])
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        p_lo = _cast(p, v.dtype, UPCAST)
        if SUM_DOT:
            if UPCAST:
                # _dot upcasts anyway, and a bf16 tl.full fails in the triton 3.6 interpreter
                ones = tl.full([BLOCK_N, 16], 1.0, tl.float32)
            else:
                ones = tl.full([BLOCK_N, 16], 1.0, v.dtype)
            l_i = l_i + _dot(p_lo, ones, DOT_PREC, UPCAST)
        else:
            l_i = l_i + tl.sum(p, 1)
        acc = acc + _dot(p_lo, v, DOT_PREC, UPCAST)
        return acc, l_i

    @triton.jit
    def _fwd_rescale(acc, l_i, m_i, m_tile, SUM_DOT: tl.constexpr):
        """Move the running max to max(m_i, m_tile), rescaling acc and the row sums."""
        m_new = tl.maximum(m_i, m_tile)
        alpha = tl.math.exp2(m_i - m_new)
        if SUM_DOT:
            l_i = l_i * alpha[:, None]
        else:
            l_i = l_i * alpha
        return acc * alpha[:, None], l_i, m_new

    @triton.jit
    def _mhga_fwd_kernel(
        QKV, O, LSE,
        s_qb, s_qg, s_qn, s_qc,
        s_ob, s_og, s_on,
        G, N, C,
        qk_scale,
        S: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PAD_TOKEN: tl.constexpr, POS_SCALE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
        PEEL: tl.constexpr, SHARED_FIRST: tl.constexpr, LAZY: tl.constexpr,
    ):
        pid_bg = tl.program_id(0)
        h = tl.program_id(1)
        pid_m = tl.program_id(2)
        H = tl.num_programs(1)
        b = pid_bg // G
        g = pid_bg - b * G
        GS = G * S
        L = GS + N - S

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < N
        d_mask = (offs_d < HEAD_DIM)[None, :]

        base = QKV + b.to(tl.int64) * s_qb
        q_cols = (h * HEAD_DIM + offs_d) * s_qc
        k_cols = (C + h * HEAD_DIM + offs_d) * s_qc
        v_cols = (2 * C + h * HEAD_DIM + offs_d) * s_qc
        not_pad_row = (offs_m + g) != 0  # the pad query is (g=0, n=0); g, n >= 0
        q_mask = m_valid[:, None] & d_mask
        if PAD_TOKEN:
            # The pad row's logits are all equal in the official layer (a uniform softmax over every key, the pad
            # key included): a zero query row gives exactly that (all logits 0) without a per-logit select.
            q_mask = q_mask & not_pad_row[:, None]
        q = tl.load(base + g * s_qg + offs_m[:, None] * s_qn + q_cols[None, :], mask=q_mask, other=0.0)
        # Key / value pointers of the group's own keys from virtual key 0 on (tiles of own keys only add a row
        # offset to them, see _tile_logits).
        own_off = g * s_qg + (tl.arange(0, BLOCK_N) - GS + S) * s_qn
        own_k = base + own_off[:, None] + k_cols[None, :]
        v_off = C * s_qc  # values sit C columns after the keys

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        # 16-bit dots: the row sums of P on the tensor cores (SUM_DOT, see _fwd_tile); they sum the P that the P.V
        # dot multiplies, rounded as it rounds them, so the output is an exact weighted mean of the V rows.
        # (no chained boolean operators and no `not`: triton 3.2 rejects both here)
        SUM_DOT: tl.constexpr = (PEEL and (DOT_PREC == "tf32")) and (QKV.dtype.element_ty != tl.float32)
        if SUM_DOT:
            l_i = tl.zeros([BLOCK_M, 16], dtype=tl.float32)
        else:
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        if PEEL:
            # Masks only where they apply: the first tile (pad key, and the bounds if it is also the last), the
            # full tiles in between unmasked, the partial last tile with the bounds mask. After the first tile
            # every row has a finite max (it holds a key that is unmasked for every row), so no later tile guards
            # against -inf, and when it holds all G*S shared keys the later tiles map keys with a plain offset.
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, base, 0, g, GS, L, s_qg, s_qn, k_cols, v_cols, own_k, v_off,
                                      d_mask, not_pad_row, qk_scale, S, BLOCK_N, True, PAD_TOKEN, POS_SCALE,
                                      DOT_PREC, UPCAST, True, False, SUM_DOT)
            full_end = (L // BLOCK_N) * BLOCK_N
            for start in range(BLOCK_N, full_end, BLOCK_N):
                if LAZY > 0:
                    # Lazy rescaling (as FlashAttention-4): after the first tile, whose max is exact, the running
                    # max m_i moves only when a row's tile max exceeds it by more than LAZY (log2 units), in a
                    # branch uniform over the program (one warp: a shuffle reduction); otherwise P is taken
                    # against the stale max (P <= 2^LAZY) and acc and l_i are not rescaled. They share that max,
                    # so out = acc / l and LSE = m + log2(l) are exact up to rounding.
                    v_ptrs, kv_mask, k, qk = _tile_logits(q, base, start, g, GS, L, s_qg, s_qn, k_cols, v_cols, own_k,
                                                          v_off, d_mask, not_pad_row, qk_scale, S, BLOCK_N, False,
                                                          False, POS_SCALE, DOT_PREC, UPCAST, SHARED_FIRST)
                    m_tile = _row_max(qk, qk_scale, POS_SCALE)
                    if tl.max(m_tile - m_i, 0) > LAZY:  # static-cost: rare
                        acc, l_i, m_i = _fwd_rescale(acc, l_i, m_i, m_tile, SUM_DOT)
                    acc, l_i = _fwd_accumulate(acc, l_i, qk, m_i, v_ptrs, kv_mask, qk_scale, BLOCK_N,
                                               POS_SCALE, DOT_PREC, UPCAST, SUM_DOT)
                else:
                    acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, base, start, g, GS, L, s_qg, s_qn, k_cols, v_cols,
                                              own_k, v_off, d_mask, not_pad_row, qk_scale, S, BLOCK_N, False, False,
                                              POS_SCALE, DOT_PREC, UPCAST, False, SHARED_FIRST, SUM_DOT)
            if (full_end >= BLOCK_N) & (full_end < L):
                if LAZY > 0:
                    v_ptrs, kv_mask, k, qk = _tile_logits(q, base, full_end, g, GS, L, s_qg, s_qn, k_cols, v_cols,
                                                          own_k, v_off, d_mask, not_pad_row, qk_scale, S, BLOCK_N, True,
                                                          False, POS_SCALE, DOT_PREC, UPCAST, SHARED_FIRST)
                    m_tile = _row_max(qk, qk_scale, POS_SCALE)
                    if tl.max(m_tile - m_i, 0) > LAZY:  # static-cost: rare
                        acc, l_i, m_i = _fwd_rescale(acc, l_i, m_i, m_tile, SUM_DOT)
                    acc, l_i = _fwd_accumulate(acc, l_i, qk, m_i, v_ptrs, kv_mask, qk_scale, BLOCK_N,
                                               POS_SCALE, DOT_PREC, UPCAST, SUM_DOT)
                else:
                    acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, base, full_end, g, GS, L, s_qg, s_qn, k_cols, v_cols,
                                              own_k, v_off, d_mask, not_pad_row, qk_scale, S, BLOCK_N, True, False,
                                              POS_SCALE, DOT_PREC, UPCAST, False, SHARED_FIRST, SUM_DOT)
        else:
            # One loop, every tile masked: a third of the code (fp32 FMA dots, where masks cost little next to
            # the dot and three inlined copies of the tile spill registers and double compile times).
            for start in range(0, L, BLOCK_N):
                acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, base, start, g, GS, L, s_qg, s_qn, k_cols, v_cols, own_k,
                                          v_off, d_mask, not_pad_row, qk_scale, S, BLOCK_N, True, PAD_TOKEN, POS_SCALE,
                                          DOT_PREC, UPCAST, True, False, False)

        if SUM_DOT:
            l_i = tl.max(l_i, 1)  # 16 equal columns
        has_keys = l_i > 0.0
        l_safe = tl.where(has_keys, l_i, 1.0)
        # One reciprocal per row, then multiplies: an IEEE division per element costs ~10 instructions.
        out = acc * (1.0 / l_safe)[:, None]
        # +inf LSE for a row without keys makes the backward's recomputed P exactly 0.
        lse = tl.where(has_keys, m_i + tl.math.log2(l_safe), float("inf"))

        o_ptrs = O + b.to(tl.int64) * s_ob + g * s_og + offs_m[:, None] * s_on + (h * HEAD_DIM + offs_d)[None, :]
        tl.store(o_ptrs, _cast(out, O.dtype.element_ty, UPCAST), mask=m_valid[:, None] & d_mask)
        lse_row = (pid_bg.to(tl.int64) * H + h) * N
        tl.store(LSE + lse_row + offs_m, lse, mask=m_valid)

    @triton.jit
    def _dq_tile(dq, q, do, lse, delta, base, start, g, GS, L, s_qg, s_qn, k_cols, v_cols, own_k, v_off, d_mask,
                 not_pad_row,
                 qk_scale,
                 S: tl.constexpr, BLOCK_N: tl.constexpr, BOUNDS: tl.constexpr, PAD_KEY: tl.constexpr,
                 POS_SCALE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, OWN_ONLY: tl.constexpr):
        # Same logits as the forward (one helper), so P is recomputed consistently with the stored LSE (masked
        # entries are -inf there, so exp2 gives exactly 0).
        v_ptrs, kv_mask, k, qk = _tile_logits(q, base, start, g, GS, L, s_qg, s_qn, k_cols, v_cols, own_k, v_off,
                                              d_mask, not_pad_row, qk_scale, S, BLOCK_N, BOUNDS, PAD_KEY, POS_SCALE,
                                              DOT_PREC, UPCAST, OWN_ONLY)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        if POS_SCALE:
            p = tl.math.exp2(qk * qk_scale - lse[:, None])
        else:
            p = tl.math.exp2(qk - lse[:, None])
        dp = _dot(do, tl.trans(v), DOT_PREC, UPCAST)
        ds = p * (dp - delta[:, None])
        return dq + _dot(_cast(ds, k.dtype, UPCAST), k, DOT_PREC, UPCAST)

    @triton.jit
    def _mhga_bwd_dq_kernel(
        QKV, O, DO, LSE, DELTA, DQKV,
        s_qb, s_qg, s_qn, s_qc,
        s_ob, s_og, s_on,
        s_db, s_dg, s_dn, s_dc,
        s_gb, s_gg, s_gn,
        G, N, C,
        qk_scale, scale,
        S: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PAD_TOKEN: tl.constexpr, POS_SCALE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
        PEEL: tl.constexpr, SHARED_FIRST: tl.constexpr,
    ):
        pid_bg = tl.program_id(0)
        h = tl.program_id(1)
        pid_m = tl.program_id(2)
        H = tl.num_programs(1)
        b = pid_bg // G
        g = pid_bg - b * G
        GS = G * S
        L = GS + N - S

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < N
        d_mask = (offs_d < HEAD_DIM)[None, :]
        md_mask = m_valid[:, None] & d_mask
        not_pad_row = (offs_m + g) != 0  # the pad query (g=0, n=0); g, n >= 0

        base = QKV + b.to(tl.int64) * s_qb
        hd = h * HEAD_DIM + offs_d
        q_mask = md_mask
        if PAD_TOKEN:
            q_mask = q_mask & not_pad_row[:, None]  # zero pad row: its logits are exactly 0, as in the forward
        q = tl.load(base + g * s_qg + offs_m[:, None] * s_qn + (hd * s_qc)[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + b.to(tl.int64) * s_db + g * s_dg + offs_m[:, None] * s_dn + (hd * s_dc)[None, :],
                     mask=md_mask, other=0.0)
        o = tl.load(O + b.to(tl.int64) * s_ob + g * s_og + offs_m[:, None] * s_on + hd[None, :],
                    mask=md_mask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        row = (pid_bg.to(tl.int64) * H + h) * N
        tl.store(DELTA + row + offs_m, delta, mask=m_valid)
        lse = tl.load(LSE + row + offs_m, mask=m_valid, other=float("inf"))
        if PAD_TOKEN:
            # The pad row's logits are constants: no gradient through them. With its dO and delta zeroed here,
            # dS = P * (dO.V^T - delta) is exactly 0 on that row without a per-logit select.
            do = tl.where(not_pad_row[:, None], do, 0.0)
            delta = tl.where(not_pad_row, delta, 0.0)

        k_cols = (C + hd) * s_qc
        v_cols = (2 * C + hd) * s_qc
        own_off = g * s_qg + (tl.arange(0, BLOCK_N) - GS + S) * s_qn  # as in the forward
        own_k = base + own_off[:, None] + k_cols[None, :]
        v_off = C * s_qc  # values sit C columns after the keys
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if PEEL:
            dq = _dq_tile(dq, q, do, lse, delta, base, 0, g, GS, L, s_qg, s_qn, k_cols, v_cols, own_k, v_off, d_mask,
                          not_pad_row, qk_scale, S, BLOCK_N, True, PAD_TOKEN, POS_SCALE, DOT_PREC, UPCAST, False)
            full_end = (L // BLOCK_N) * BLOCK_N
            for start in range(BLOCK_N, full_end, BLOCK_N):
                dq = _dq_tile(dq, q, do, lse, delta, base, start, g, GS, L, s_qg, s_qn, k_cols, v_cols, own_k, v_off,
                              d_mask, not_pad_row, qk_scale, S, BLOCK_N, False, False, POS_SCALE, DOT_PREC, UPCAST,
                              SHARED_FIRST)
            if (full_end >= BLOCK_N) & (full_end < L):
                dq = _dq_tile(dq, q, do, lse, delta, base, full_end, g, GS, L, s_qg, s_qn, k_cols, v_cols, own_k, v_off,
                              d_mask, not_pad_row, qk_scale, S, BLOCK_N, True, False, POS_SCALE, DOT_PREC, UPCAST,
                              SHARED_FIRST)
        else:
            for start in range(0, L, BLOCK_N):
                dq = _dq_tile(dq, q, do, lse, delta, base, start, g, GS, L, s_qg, s_qn, k_cols, v_cols, own_k, v_off,
                              d_mask, not_pad_row, qk_scale, S, BLOCK_N, True, PAD_TOKEN, POS_SCALE, DOT_PREC, UPCAST,
                              False)

        dq = dq * scale
        dq_ptrs = DQKV + b.to(tl.int64) * s_gb + g * s_gg + offs_m[:, None] * s_gn + hd[None, :]
        tl.store(dq_ptrs, _cast(dq, DQKV.dtype.element_ty, UPCAST), mask=md_mask)

    @triton.jit
    def _dkdv_qtile(dk, dv, k, v, q_base, do_base, LSE, DELTA, row, start_m, gq, N, s_qn, s_dn, q_cols, do_cols,
                    d_mask, qk_scale,
                    BLOCK_M: tl.constexpr, M_BOUNDS: tl.constexpr, PAD_TOKEN: tl.constexpr, POS_SCALE: tl.constexpr,
                    DOT_PREC: tl.constexpr, UPCAST: tl.constexpr):
        """One query tile's contribution to a key tile's dk/dv, on the transposed (keys x queries) tile so the
        reductions run along axis 1. M_BOUNDS (the partial last query tile only) zeroes P past N."""
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_valid = offs_m < N
        q_mask = m_valid[:, None] & d_mask
        if PAD_TOKEN:
            not_pad_col = (offs_m + gq) != 0  # all but the pad query (gq=0, m=0); no `~`: 3.2 interpreter
            # A zero pad query gives its constant (0) logits, and its dS cannot reach dk (dk += dS.q).
            q_mask = q_mask & not_pad_col[:, None]
        q = tl.load(q_base + offs_m[:, None] * s_qn + q_cols[None, :], mask=q_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * s_dn + do_cols[None, :], mask=m_valid[:, None] & d_mask,
                     other=0.0)
        # Unmasked loads; in the partial last tile at clamped indices (rows past N repeat row N-1; M_BOUNDS zeroes
        # their P): a masked load here fails triton 3.2's layout pass under fp32 FMA dots (arith.select verifier).
        if M_BOUNDS:
            offs_m_in = tl.minimum(offs_m, N - 1)
        else:
            offs_m_in = offs_m
        lse = tl.load(LSE + row + offs_m_in)
        delta = tl.load(DELTA + row + offs_m_in)
        qk_t = _dot(k, tl.trans(q), DOT_PREC, UPCAST)
        p_t = tl.math.exp2(qk_t * qk_scale - lse[None, :])  # no max here: any sign of the scale is fine
        if M_BOUNDS:
            p_t = tl.where(m_valid[None, :], p_t, 0.0)
        # The pad key (virtual key 0) is a key of the pad query only: its row is left unmasked here and replaced
        # after the loops (rows of dk/dv are independent), so no tile pays a per-element select for it.
        dv += _dot(_cast(p_t, do.dtype, UPCAST), do, DOT_PREC, UPCAST)
        dp_t = _dot(v, tl.trans(do), DOT_PREC, UPCAST)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(_cast(ds_t, q.dtype, UPCAST), q, DOT_PREC, UPCAST)
        return dk, dv

    @triton.jit
    def _mhga_bwd_dkdv_kernel(
        QKV, DO, LSE, DELTA, DQKV,
        s_qb, s_qg, s_qn, s_qc,
        s_db, s_dg, s_dn, s_dc,
        s_gb, s_gg, s_gn,
        G, N, C, N_OWN, N_OWN_DIV, N_SHARED_TILES,
        qk_scale, scale,
        S: tl.constexpr,
        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PAD_TOKEN: tl.constexpr, POS_SCALE: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr,
        PEEL: tl.constexpr,
    ):
        # Work items per (batch, head), over virtual keys: N_SHARED_TILES tiles of the G*S shared keys (every
        # query group sees them) and, per group, N_OWN tiles of its N - S own keys (its own queries only). So a
        # shared key never shares a tile with own keys, whose rows would idle while other groups' queries run.
        # Slot u = (group index of program axis 0) * n_t + axis 2, n_t = number of programs on axis 2: slot u
        # runs own tile u (u < G*N_OWN) and, after it, shared tile (u - G*N_OWN) mod (G*n_t) if that exists.
        pid_bg = tl.program_id(0)
        h = tl.program_id(1)
        n_t = tl.num_programs(2)
        H = tl.num_programs(1)
        b = pid_bg // G
        u = (pid_bg - b * G) * n_t + tl.program_id(2)
        GS = G * S
        L = GS + N - S
        n_own_all = G * N_OWN
        n_slots = G * n_t
        s_tile = (u - n_own_all + n_slots) % n_slots

        offs_d = tl.arange(0, BLOCK_D)
        d_mask = (offs_d < HEAD_DIM)[None, :]
        base = QKV + b.to(tl.int64) * s_qb
        hd = h * HEAD_DIM + offs_d
        k_cols = (C + hd) * s_qc
        v_cols = (2 * C + hd) * s_qc
        q_cols = hd * s_qc
        do_cols = hd * s_dc

        for job in range(0, 2):
            # job_t: a tensor under every interpreter too (job is a Python int there, and the triton 3.2
            # interpreter cannot promote a Python bool to an i1 scalar); the compiler folds it to job.
            job_t = u * 0 + job
            own = job_t == 0
            active = (own & (u < n_own_all)) | ((job_t == 1) & (s_tile < N_SHARED_TILES))
            if active:
                g_own = u // N_OWN_DIV
                g = tl.where(own, g_own, 0)
                js = tl.where(own, GS + (u - g_own * N_OWN) * BLOCK_N, s_tile * BLOCK_N)
                je = tl.where(own, L, GS)
                gq_lo = tl.where(own, g, 0)
                gq_hi = tl.where(own, g + 1, G)
                offs_j = js + tl.arange(0, BLOCK_N)
                rows = _key_rows(offs_j, g, GS, s_qg, s_qn, S)
                kv_mask = (offs_j < je)[:, None] & d_mask
                k = tl.load(base + rows[:, None] + k_cols[None, :], mask=kv_mask, other=0.0)
                v = tl.load(base + rows[:, None] + v_cols[None, :], mask=kv_mask, other=0.0)
                dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
                dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
                full_end = (N // BLOCK_M) * BLOCK_M
                for gq in range(gq_lo, gq_hi):
                    # Fixed group order: the shared keys' gradient is a deterministic sum over the query groups.
                    q_base = base + gq * s_qg
                    do_base = DO + b.to(tl.int64) * s_db + gq * s_dg
                    row = ((b * G + gq).to(tl.int64) * H + h) * N
                    if PEEL:
                        for start_m in range(0, full_end, BLOCK_M):
                            dk, dv = _dkdv_qtile(dk, dv, k, v, q_base, do_base, LSE, DELTA, row, start_m, gq, N,
                                                 s_qn, s_dn, q_cols, do_cols, d_mask, qk_scale, BLOCK_M, False,
                                                 PAD_TOKEN, POS_SCALE, DOT_PREC, UPCAST)
                        if full_end < N:
                            dk, dv = _dkdv_qtile(dk, dv, k, v, q_base, do_base, LSE, DELTA, row, full_end, gq, N,
                                                 s_qn, s_dn, q_cols, do_cols, d_mask, qk_scale, BLOCK_M, True,
                                                 PAD_TOKEN, POS_SCALE, DOT_PREC, UPCAST)
                    else:
                        for start_m in range(0, N, BLOCK_M):
                            dk, dv = _dkdv_qtile(dk, dv, k, v, q_base, do_base, LSE, DELTA, row, start_m, gq, N,
                                                 s_qn, s_dn, q_cols, do_cols, d_mask, qk_scale, BLOCK_M, True,
                                                 PAD_TOKEN, POS_SCALE, DOT_PREC, UPCAST)
                dk = dk * scale
                if PAD_TOKEN:
                    # The pad key (shared token 0 of group 0, virtual key 0) is a key of the pad query only, whose
                    # logits are constants: dk = 0 and dv = P(pad row, key 0) * dO(pad row) = dO(pad) / L, where
                    # P = exp2(0 - LSE(pad row)) as the other tiles recompute it.
                    key0 = (offs_j == 0)[:, None]
                    do_pad = tl.load(DO + b.to(tl.int64) * s_db + hd * s_dc, mask=offs_d < HEAD_DIM, other=0.0)
                    p_pad = tl.math.exp2(0.0 - tl.load(LSE + (b * G).to(tl.int64) * H * N + h * N))
                    dk = tl.where(key0, 0.0, dk)
                    dv = tl.where(key0, (p_pad * do_pad.to(tl.float32))[None, :], dv)
                g_base = DQKV + b.to(tl.int64) * s_gb
                g_rows = _key_rows(offs_j, g, GS, s_gg, s_gn, S)
                tl.store(g_base + g_rows[:, None] + (C + hd)[None, :], _cast(dk, DQKV.dtype.element_ty, UPCAST),
                         mask=kv_mask)
                tl.store(g_base + g_rows[:, None] + (2 * C + hd)[None, :], _cast(dv, DQKV.dtype.element_ty, UPCAST),
                         mask=kv_mask)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------

def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _launch_config(N: int, L: int, D: int, dtype: torch.dtype, interpret: bool) -> dict:
    """Block sizes and launch options, a pure function of the problem shape (no autotuning, see module doc).

    ``fwd_m/fwd_n``: query/key tiles of the forward and dq kernels; ``bwd_m/bwd_n``: query/key tiles of the
    dk/dv kernel. Under the interpreter each program costs ~50-100 ms regardless of its size, so tiles are big.
    """
    block_d = max(16, _next_pow2(D))
    if interpret:
        m = min(64, max(16, _next_pow2(N)))
        n = min(64, max(16, _next_pow2(L)))
        return dict(fwd_m=m, fwd_n=n, bwd_m=m, bwd_n=min(64, max(16, _next_pow2(N))), block_d=block_d,
                    num_warps=4, dkdv_warps=4, num_stages=1, lazy=_LAZY_RESCALE)
    # GPU: GTPT rows are short (31..300). 32-row query tiles keep partial-tile waste low at N=82 (3x32 vs 2x64)
    # and give thousands of programs at B=32..128; longer sequences use 64-row tiles.
    if dtype != torch.float32 and block_d <= 64:
        # 16-bit tensor-core dots: 32 x 32 tiles everywhere, one warp per 16 rows of the tile whose rows own the
        # softmax and the reductions (queries in the forward and dq, keys in dk/dv). 4 warps on a 32-row tile
        # made Triton replicate the tile per warp pair (sm_90 SASS: every HMMA issued twice). Static sm_90 cost
        # estimates at B=128 (benchmarks/static_cost.py, README) picked 32-key tiles over 64 at every GTPT shape
        # (fine: 94 keys = 3 x 32 instead of 2 x 64) and 32-row over 64-row query tiles at N > 96 (within 5%).
        # dk/dv: 16-query inner tiles in one stage keep k, v, dk, dv and one q/dO tile in <= 100 registers at head
        # dim 24 (32-query tiles: 179-186 in two stages, 138 in one; maxnreg=128 spilled); long plain attention
        # (the coarse layers, no shared keys) takes 64-key tiles on 4 warps, which share each q/dO tile load.
        long_plain = L == N and N > 224
        # Forward and dq (2026-12-06): one warp per 32-row query tile at head dims <= 32, so each K/V tile's
        # shared-memory reads, async copies, address arithmetic and loop control serve 32 rows, and the forward's
        # lazy-rescale test (LAZY) is a shuffle reduction without a barrier; dq in one stage (two spilled
        # 24-32 B at 168 registers). Static sm_90 estimates, B = 128, gtpt-s teacher shape: forward 2.46 -> 1.98 x
        # floor (with lazy rescaling and the own-key pointers), dq 1.65 -> 1.39.
        one = block_d <= 32
        return dict(fwd_m=32, fwd_n=32, bwd_m=16, bwd_n=64 if long_plain else 32, block_d=block_d, num_warps=2,
                    fwd_warps=1 if one else 2, dq_warps=1 if one else 2, dq_stages=1 if one else 2,
                    dkdv_warps=4 if long_plain else 2, num_stages=2, dkdv_stages=1, lazy=_LAZY_RESCALE)
    fwd_m = 32 if N <= 96 else 64
    fwd_n = 32 if L <= 48 else 64
    bwd_n = 32 if N <= 96 else 64
    bwd_m = 16 if dtype == torch.float32 else 32
    num_warps = 8 if block_d >= 128 else 4
    dkdv_warps = num_warps
    if dtype == torch.float32 and block_d >= 32:
        # fp32 dots (IEEE: FMA units, tf32: wider operands) hold tiles in larger register layouts than 16-bit
        # MMAs. sm_90 AOT compiles (tests/test_kernels_compile.py) spilled 136-480 B/thread at head dim 24 and
        # 0.5-1.6 KB at 64 with 64-row tiles; 32-row query tiles (forward, dq) and 32-token dk/dv tiles cut that.
        fwd_m = 32
        bwd_n = 32
        if block_d >= 64:
            fwd_n = 32
            dkdv_warps = 8  # k, v, dk, dv (32 x 64 fp32 each) stay live across the query loop
    return dict(fwd_m=fwd_m, fwd_n=fwd_n, bwd_m=bwd_m, bwd_n=bwd_n, block_d=block_d, num_warps=num_warps,
                dkdv_warps=dkdv_warps, num_stages=2)


def _peel(cfg: dict, dtype: torch.dtype, interpret: bool) -> bool:
    """Whether the kernels peel their masked tiles (first/last key tile, last query tile of dk/dv) out of the
    main loops. Yes for 16-bit tensor-core dots; no for compiled fp32 (see the kernels); always under the
    interpreter, so that CI runs the peeled code (tests/test_group_attention.py also runs the one-loop form)."""
    return cfg.get("peel", interpret or dtype != torch.float32)


def _dot_precision(dtype: torch.dtype, fp32_precision: str) -> str:
    # For 16-bit operands the precision knob does not apply; pass the compiler default explicitly.
    return fp32_precision if dtype == torch.float32 else "tf32"


def _launch(kernel, grid, *args, **meta) -> None:
    """Launch ``kernel`` through ``wrap_triton`` inside the ``triton_op``, so that ``torch.compile``/``make_fx``
    see the kernel; directly for the opaque registration (always used under the interpreter, whose
    ``InterpretedFunction`` older torch versions cannot wrap)."""
    from triton.runtime.jit import JITFunction
    if isinstance(kernel, JITFunction) and not _OPAQUE_OP:
        torch.library.wrap_triton(kernel)[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def _alloc(shape, dtype, device) -> Tensor:
    t = torch.empty(shape, dtype=dtype, device=device)
    if _POISON_OUTPUTS:
        t.fill_(float("nan"))
    return t


def _fwd_impl(qkv: Tensor, heads: int, num_shared: int, scale: float, pad_token: bool,
              fp32_precision: str) -> Tuple[Tensor, Tensor]:
    B, G, N, C3 = qkv.shape
    C = C3 // 3
    D = C // heads
    S = num_shared
    L = G * S + N - S
    interpret = qkv.device.type == "cpu"
    cfg = _launch_config(N, L, D, qkv.dtype, interpret)
    out = _alloc((B, G, N, C), qkv.dtype, qkv.device)
    lse = _alloc((B, G, heads, N), torch.float32, qkv.device)
    if out.numel() == 0:
        return out, lse
    grid = (B * G, heads, triton.cdiv(N, cfg["fwd_m"]))
    _launch(_mhga_fwd_kernel, grid, qkv, out, lse, qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3),
            out.stride(0), out.stride(1), out.stride(2), G, N, C, scale * _LOG2E, S=S, HEAD_DIM=D, BLOCK_M=cfg["fwd_m"],
            BLOCK_N=cfg["fwd_n"], BLOCK_D=cfg["block_d"], PAD_TOKEN=pad_token, POS_SCALE=scale > 0,
            DOT_PREC=_dot_precision(qkv.dtype, fp32_precision), UPCAST=interpret and qkv.dtype == torch.bfloat16,
            PEEL=_peel(cfg, qkv.dtype, interpret), SHARED_FIRST=G * S <= cfg["fwd_n"],
            LAZY=float(cfg.get("lazy", 0.0)) if _peel(cfg, qkv.dtype, interpret) else 0.0,
            num_warps=cfg.get("fwd_warps", cfg["num_warps"]), num_stages=cfg["num_stages"])
    return out, lse


def _bwd_impl(grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, heads: int, num_shared: int, scale: float,
              pad_token: bool, fp32_precision: str) -> Tensor:
    B, G, N, C3 = qkv.shape
    C = C3 // 3
    D = C // heads
    S = num_shared
    L = G * S + N - S
    interpret = qkv.device.type == "cpu"
    cfg = _launch_config(N, L, D, qkv.dtype, interpret)
    dqkv = _alloc((B, G, N, C3), qkv.dtype, qkv.device)
    delta = _alloc((B, G, heads, N), torch.float32, qkv.device)
    if dqkv.numel() == 0:
        return dqkv
    prec = _dot_precision(qkv.dtype, fp32_precision)
    upcast = interpret and qkv.dtype == torch.bfloat16
    common = dict(S=S, HEAD_DIM=D, BLOCK_D=cfg["block_d"], PAD_TOKEN=pad_token, POS_SCALE=scale > 0, DOT_PREC=prec,
                  UPCAST=upcast, PEEL=_peel(cfg, qkv.dtype, interpret), num_stages=cfg["num_stages"])
    q_strides = (qkv.stride(0), qkv.stride(1), qkv.stride(2), qkv.stride(3))
    do_strides = (grad_out.stride(0), grad_out.stride(1), grad_out.stride(2), grad_out.stride(3))
    g_strides = (dqkv.stride(0), dqkv.stride(1), dqkv.stride(2))
    # Launch 1 also writes delta, which launch 2 reads: stream order makes that safe.
    _launch(_mhga_bwd_dq_kernel, (B * G, heads, triton.cdiv(N, cfg.get("dq_m", cfg["fwd_m"]))), qkv, out, grad_out, lse,
            delta, dqkv, *q_strides, out.stride(0), out.stride(1), out.stride(2), *do_strides, *g_strides, G, N, C,
            scale * _LOG2E, scale, BLOCK_M=cfg.get("dq_m", cfg["fwd_m"]), BLOCK_N=cfg["fwd_n"],
            num_warps=cfg.get("dq_warps", cfg["num_warps"]), SHARED_FIRST=G * S <= cfg["fwd_n"],
            **dict(common, num_stages=cfg.get("dq_stages", cfg["num_stages"])))
    # dk/dv work items: shared-key tiles and per-group own-key tiles, spread over the (B*G, H, cdiv(N, bwd_n))
    # grid (see the kernel); there are always enough slots: G*cdiv(N - S) own tiles and cdiv(G*S) <= G*cdiv(S).
    bwd_n = cfg["bwd_n"]
    n_own = triton.cdiv(N - S, bwd_n)
    _launch(_mhga_bwd_dkdv_kernel, (B * G, heads, triton.cdiv(N, bwd_n)),
            qkv, grad_out, lse, delta, dqkv,
            *q_strides, *do_strides, *g_strides,
            G, N, C, n_own, max(n_own, 1), triton.cdiv(G * S, bwd_n), scale * _LOG2E, scale,
            BLOCK_M=cfg["bwd_m"], BLOCK_N=cfg["bwd_n"], num_warps=cfg["dkdv_warps"],
            **dict(common, num_stages=cfg.get("dkdv_stages", cfg["num_stages"])),
            **({"maxnreg": cfg["dkdv_maxnreg"]} if cfg.get("dkdv_maxnreg") else {}))
    return dqkv


# ----------------------------------------------------------------------------------------------------------------
# torch.library registration: gtpt::group_attention (forward, returns out and the base-2 LSE) and
# gtpt::group_attention_backward, with autograd and FLOP formulas.
# ----------------------------------------------------------------------------------------------------------------

_OP_AVAILABLE = triton is not None and hasattr(torch.library, "triton_op")
# Opaque registration (plain custom_op + explicit fake impl, kernels launched directly): always under the
# interpreter, and on request (GTPT_KERNELS_OPAQUE_OP=1) as an escape hatch should the triton_op decomposition
# misbehave on some torch version. torch.compile then treats the op as a black box (still no graph break).
_OPAQUE_OP = interpreter_enabled() or os.environ.get("GTPT_KERNELS_OPAQUE_OP", "0") not in ("", "0")


def _register_op(name: str, fake):
    """Register ``fn`` as ``gtpt::<name>``.

    Compiled Triton: ``triton_op``, whose body (with ``wrap_triton`` launches) doubles as the fake impl and is
    decomposed by ``torch.compile`` so Inductor sees the kernels. Interpreter: ``triton_op`` would decompose the
    op under ``torch.compile`` into a graph that has lost the (unwrappable) interpreted launches, so the op is
    an opaque ``custom_op`` with an explicit fake impl instead."""
    def deco(fn):
        if _OPAQUE_OP:
            op = torch.library.custom_op(f"gtpt::{name}", mutates_args=())(fn)
            op.register_fake(fake)
        else:
            op = torch.library.triton_op(f"gtpt::{name}", mutates_args=())(fn)
        return op
    return deco


def _fwd_fake(qkv: Tensor, heads: int, num_shared: int, scale: float, pad_token: bool,
              fp32_precision: str) -> Tuple[Tensor, Tensor]:
    B, G, N, C3 = qkv.shape
    return qkv.new_empty((B, G, N, C3 // 3)), qkv.new_empty((B, G, heads, N), dtype=torch.float32)


def _bwd_fake(grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, heads: int, num_shared: int, scale: float,
              pad_token: bool, fp32_precision: str) -> Tensor:
    return qkv.new_empty(qkv.shape)


if _OP_AVAILABLE:

    @_register_op("group_attention", _fwd_fake)
    def _group_attention_op(qkv: Tensor, heads: int, num_shared: int, scale: float, pad_token: bool,
                            fp32_precision: str) -> Tuple[Tensor, Tensor]:
        return _fwd_impl(qkv, heads, num_shared, scale, pad_token, fp32_precision)

    @_register_op("group_attention_backward", _bwd_fake)
    def _group_attention_backward_op(grad_out: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, heads: int,
                                     num_shared: int, scale: float, pad_token: bool,
                                     fp32_precision: str) -> Tensor:
        return _bwd_impl(grad_out, qkv, out, lse, heads, num_shared, scale, pad_token, fp32_precision)

    def _setup_context(ctx, inputs, output):
        qkv, heads, num_shared, scale, pad_token, fp32_precision = inputs
        out, lse = output
        ctx.save_for_backward(qkv, out, lse)
        ctx.args = (heads, num_shared, scale, pad_token, fp32_precision)

    def _backward(ctx, grad_out, grad_lse):
        # The LSE is an internal residual (the public op never returns it), so its gradient is ignored.
        qkv, out, lse = ctx.saved_tensors
        dqkv = torch.ops.gtpt.group_attention_backward(grad_out, qkv, out, lse, *ctx.args)
        return dqkv, None, None, None, None, None

    torch.library.register_autograd("gtpt::group_attention", _backward, setup_context=_setup_context)

    from torch.utils.flop_counter import register_flop_formula

    register_flop_formula(torch.ops.gtpt.group_attention)(group_attention_flops)
    register_flop_formula(torch.ops.gtpt.group_attention_backward)(group_attention_backward_flops)


# ----------------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------------

def _as_int(name: str, value) -> int:
    """``value`` as a Python int (numpy and 0-d integer tensors too: the kernels' launcher takes only ints)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got a bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def _check_inputs(qkv: Tensor, heads: int, num_shared: int, pad_token: bool) -> None:
    if not isinstance(qkv, Tensor):
        raise TypeError(f"qkv must be a torch.Tensor, got {type(qkv).__name__}")
    if qkv.dim() != 4:
        raise ValueError(f"qkv must have shape (B, G, N, 3*C), got {tuple(qkv.shape)}")
    if not qkv.is_floating_point():
        raise TypeError(f"qkv must be a floating-point tensor, got {qkv.dtype}")
    B, G, N, C3 = qkv.shape
    if C3 % 3 != 0:
        raise ValueError(f"last dim of qkv must be 3*C, got {C3}")
    if heads <= 0 or (C3 // 3) % heads != 0:
        raise ValueError(f"model dim {C3 // 3} is not divisible by heads={heads}")
    if not 0 <= num_shared <= N:
        raise ValueError(f"num_shared must be in [0, N={N}], got {num_shared}")
    if pad_token and num_shared == 0:
        raise ValueError("pad_token=True needs num_shared >= 1 (the padding token is shared token 0 of group 0)")
    if pad_token and G * num_shared + N - num_shared < 2:
        raise ValueError("pad_token=True needs at least one key besides the padding token")


def _resolve_fp32_precision(fp32_precision: Optional[str]) -> str:
    name = fp32_precision if fp32_precision is not None else os.environ.get(FP32_PRECISION_ENV, "ieee")
    if not isinstance(name, str) or name.lower() not in _FP32_PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {_FP32_PRECISIONS}, got {name!r}")
    return name.lower()


def _triton_unsupported(qkv: Tensor, heads: int) -> Optional[Exception]:
    """The error an explicit ``backend='triton'`` raises for these inputs (None if the kernels take them)."""
    if not _OP_AVAILABLE:
        return RuntimeError("backend 'triton' needs triton and torch.library.triton_op (torch >= 2.6)")
    if qkv.dtype not in _TRITON_DTYPES:
        return TypeError(f"backend 'triton' supports float32, float16 and bfloat16, got {qkv.dtype}")
    D = qkv.shape[-1] // 3 // heads
    if D > _MAX_HEAD_DIM:
        return ValueError(f"backend 'triton' supports head dims up to {_MAX_HEAD_DIM}, got {D}")
    return None


def _autocast_input(qkv: Tensor) -> Tensor:
    """Under ``torch.autocast`` an fp32 ``qkv`` runs in the autocast dtype, as the reference's matmuls (and SDPA) do,
    so both backends return the same dtype."""
    if qkv.dtype != torch.float32:
        return qkv
    device_type = qkv.device.type
    try:
        if torch.is_autocast_enabled(device_type):
            return qkv.to(torch.get_autocast_dtype(device_type))
    except (TypeError, AttributeError, RuntimeError):  # pragma: no cover - a torch without the per-device API
        pass
    return qkv


def group_attention(qkv: Tensor, heads: int, num_shared: int, scale: Optional[float] = None,
                    pad_token: bool = False, backend: Optional[str] = None,
                    fp32_precision: Optional[str] = None) -> Tensor:
    """Multi-Head Group Attention on a packed ``to_qkv`` output ``(B, G, N, 3C)`` -> ``(B, G, N, C)``.

    See :func:`gtpt_kernels.reference.group_attention_reference` for the exact semantics. ``qkv`` may be any
    strided view. ``backend``: ``"reference" | "triton" | "auto"`` (default: the global setting, see
    :mod:`gtpt_kernels.backend`); ``"auto"`` also falls back to the reference for inputs the kernels do not take
    (float64, head dim > 128) and under forward-mode autodiff (``torch.func.jvp``, dual tensors), which the
    kernels do not implement (an explicit ``"triton"`` raises there). Under ``torch.autocast`` an fp32 ``qkv`` is
    computed in the autocast dtype on both backends (the reference's matmuls autocast; the kernels get a cast copy). ``fp32_precision`` (``"ieee"`` default, ``"tf32"``, ``"tf32x3"``; env
    ``GTPT_KERNELS_FP32_PRECISION``) selects the tensor-core mode of the kernels' fp32 dots.
    """
    heads, num_shared = _as_int("heads", heads), _as_int("num_shared", num_shared)
    _check_inputs(qkv, heads, num_shared, pad_token)
    name = resolve_backend(backend, qkv.device)
    if name == "triton":
        error = _triton_unsupported(qkv, heads) or forward_ad_error(qkv)
        if error is not None:
            name = fall_back_or_raise(error, backend)  # inputs / a transform the kernels do not cover
    if name == "reference":
        return group_attention_reference(qkv, heads, num_shared, scale, pad_token)
    qkv = _autocast_input(qkv)
    C = qkv.shape[-1] // 3
    scale = C ** -0.5 if scale is None else float(scale)
    # Inference skips the dispatcher (gtpt_kernels.backend.direct_launch); the op returns (out, lse).
    return call_op("gtpt::group_attention", _fwd_impl, torch.ops.gtpt.group_attention, qkv, heads, num_shared,
                   scale, bool(pad_token), _resolve_fp32_precision(fp32_precision))[0]


class GroupAttention(nn.Module):
    """Drop-in for the official ``GroupAttention`` / ``Attention`` layers (same parameter names).

    ``forward(x)`` takes ``(B, G, N, dim)`` and returns ``(B, G, N, dim)``; with ``return_qkv=True`` it also
    returns the packed ``to_qkv`` output, which the pruning ops read their logits from.
    """

    def __init__(self, dim: int, heads: int, num_shared: int, scale: Optional[float] = None,
                 pad_token: bool = False, backend: Optional[str] = None):
        super().__init__()
        dim, heads, num_shared = _as_int("dim", dim), _as_int("heads", heads), _as_int("num_shared", num_shared)
        if heads <= 0 or dim % heads != 0:
            raise ValueError(f"dim={dim} is not divisible by heads={heads}")
        self.dim, self.heads, self.num_shared = dim, heads, num_shared
        self.scale = dim ** -0.5 if scale is None else scale
        self.pad_token = pad_token
        self.backend = backend
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x: Tensor, return_qkv: bool = False):
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape (B, G, N, {self.dim}), got {tuple(x.shape)}")
        qkv = self.to_qkv(x)
        out = self.to_out(group_attention(qkv, self.heads, self.num_shared, self.scale, self.pad_token,
                                          backend=self.backend))
        return (out, qkv) if return_qkv else out

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.heads}, num_shared={self.num_shared}, scale={self.scale:.6g}, "
                f"pad_token={self.pad_token}")
