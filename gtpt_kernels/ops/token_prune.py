"""Softmax-pooled token scoring, top-k selection and gather (GTPT's pruning): public ops and module.

Semantics: :func:`gtpt_kernels.reference.token_prune_reference`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ..backend import resolve_backend
from ..reference import softmax_pool_scores_reference, token_prune_reference


def keep_count(keep_rate: float, num_tokens: int = 256, num_dense: int = 0) -> int:
    """Number of visual tokens a GTPT site keeps: ``int(num_tokens * keep_rate) - num_dense`` (``int()``
    truncates, as the official code does: 179, 76, 25 for COCO)."""
    if not isinstance(keep_rate, (int, float)) or not 0.0 < float(keep_rate) <= 1.0:
        raise ValueError(f"keep rate must be in (0, 1], got {keep_rate!r}")
    k = int(num_tokens * keep_rate) - num_dense
    if k <= 0:
        raise ValueError(f"keep rate {keep_rate} keeps {k} tokens out of {num_tokens} ({num_dense} dense): "
                         f"must keep at least one")
    return k


def _check_scores_inputs(q: Tensor, k: Tensor, row_mask: Optional[Tensor]) -> None:
    if q.dim() != 5 or k.dim() != 5:
        raise ValueError(f"q must be (B, G, H, R, D) and k (B, G or 1, H, N, D); got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    B, G, H, R, D = q.shape
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
        if not bool(row_mask.any(dim=1).all()):
            raise ValueError("row_mask leaves a group without any query row")


def _check_tokens(name: str, t: Tensor, B: int, G: int, N: int, device: torch.device) -> None:
    if t.dim() != 4 or t.shape[0] != B or t.shape[1] not in (1, G) or t.shape[2] != N:
        raise ValueError(f"{name} must have shape ({B}, {G} or 1, {N}, C), got {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def softmax_pool_scores(q: Tensor, k: Tensor, scale: float, row_mask: Optional[Tensor] = None,
                        backend: Optional[str] = None) -> Tensor:
    """fp32 softmax-pooled scores ``(B, G, N)``; see :func:`gtpt_kernels.reference.softmax_pool_scores_reference`."""
    _check_scores_inputs(q, k, row_mask)
    name = resolve_backend(backend, q.device)
    if name == "triton":
        raise NotImplementedError("the Triton scoring kernel is not available yet; use backend='reference'")
    return softmax_pool_scores_reference(q, k, scale, row_mask)


def token_prune(q: Tensor, k: Tensor, tokens: Tensor, pos: Optional[Tensor], keep: int, scale: float,
                row_mask: Optional[Tensor] = None, gate: Optional[Tensor] = None,
                backend: Optional[str] = None) -> Tuple[Tensor, Optional[Tensor], Tensor]:
    """One GTPT pruning site: score the N candidate tokens, keep the best ``keep`` per (batch, group), gather
    them (and their position embeddings), optionally gated. See
    :func:`gtpt_kernels.reference.token_prune_reference`."""
    _check_scores_inputs(q, k, row_mask)
    B, G = q.shape[:2]
    N = k.shape[3]
    _check_tokens("tokens", tokens, B, G, N, q.device)
    if pos is not None:
        _check_tokens("pos", pos, B, G, N, q.device)
    if gate is not None:
        if gate.shape[:3] != (B, G, N) or gate.shape[-1] != tokens.shape[-1]:
            raise ValueError(f"gate must have shape ({B}, {G}, {N}, {tokens.shape[-1]}), got {tuple(gate.shape)}")
    if not isinstance(keep, int) or isinstance(keep, bool):
        raise TypeError(f"keep must be an int, got {type(keep).__name__}")
    if keep <= 0 or keep > N:
        raise ValueError(f"keep must be in [1, {N}] (the number of candidate tokens), got {keep}")
    name = resolve_backend(backend, q.device)
    if name == "triton":
        raise NotImplementedError("the Triton pruning kernel is not available yet; use backend='reference'")
    return token_prune_reference(q, k, tokens, pos, keep, scale, row_mask, gate)


class TokenPrune(nn.Module):
    """Module wrapper of :func:`token_prune` with a fixed ``keep`` and ``scale``."""

    def __init__(self, keep: int, scale: float, backend: Optional[str] = None):
        super().__init__()
        self.keep, self.scale, self.backend = keep, scale, backend

    def forward(self, q, k, tokens, pos=None, row_mask=None, gate=None):
        return token_prune(q, k, tokens, pos, self.keep, self.scale, row_mask, gate, backend=self.backend)

    def extra_repr(self) -> str:
        return f"keep={self.keep}, scale={self.scale:.6g}"
