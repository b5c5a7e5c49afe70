"""Multi-Head Group Attention (MHGA): public op and ``nn.Module``.

Semantics: :func:`gtpt_kernels.reference.group_attention_reference`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..backend import resolve_backend
from ..reference import group_attention_reference


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


def group_attention(qkv: Tensor, heads: int, num_shared: int, scale: Optional[float] = None,
                    pad_token: bool = False, backend: Optional[str] = None) -> Tensor:
    """Multi-Head Group Attention on a packed ``to_qkv`` output ``(B, G, N, 3C)`` -> ``(B, G, N, C)``.

    See :func:`gtpt_kernels.reference.group_attention_reference` for the exact semantics.
    """
    _check_inputs(qkv, heads, num_shared, pad_token)
    name = resolve_backend(backend, qkv.device)
    if name == "triton":
        raise NotImplementedError("the Triton MHGA kernel is not available yet; use backend='reference'")
    return group_attention_reference(qkv, heads, num_shared, scale, pad_token)


class GroupAttention(nn.Module):
    """Drop-in for the official ``GroupAttention`` / ``Attention`` layers (same parameter names).

    ``forward(x)`` takes ``(B, G, N, dim)`` and returns ``(B, G, N, dim)``; with ``return_qkv=True`` it also
    returns the packed ``to_qkv`` output, which the pruning ops read their logits from.
    """

    def __init__(self, dim: int, heads: int, num_shared: int, scale: Optional[float] = None,
                 pad_token: bool = False, backend: Optional[str] = None):
        super().__init__()
        if dim % heads != 0:
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
