"""gtpt-kernels: fused Triton ops for GTPT (Group-based Token Pruning Transformer, ECCV 2024).

Every op has a pure-PyTorch reference (:mod:`gtpt_kernels.reference`) and a backend switch
(:mod:`gtpt_kernels.backend`).
"""
from .backend import BACKENDS, get_backend, resolve_backend, set_backend, use_backend
from .ops.group_attention import GroupAttention, group_attention
from .ops.token_prune import TokenPrune, keep_count, softmax_pool_scores, token_prune

__version__ = "0.1.0"

__all__ = [
    "BACKENDS", "get_backend", "set_backend", "use_backend", "resolve_backend",
    "group_attention", "GroupAttention",
    "softmax_pool_scores", "token_prune", "TokenPrune", "keep_count",
]
