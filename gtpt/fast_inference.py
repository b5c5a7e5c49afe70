"""The fast eval-mode path of :class:`gtpt.model.GTPT` (on by default; ``model.set_fast_inference(False)`` turns
it off). Same outputs as the plain modules up to float rounding, fewer and cheaper operator calls.

What it changes, and only in eval mode (``model.training`` False) outside tracing, compiling, exporting, dispatch /
torch-function modes (``FlopCounterMode``) and functorch transforms:

* **Stem** (:func:`fast_patch_embed`): every eval-mode BatchNorm is folded into the convolution before it (and the
  stem's final ``patch2emb_norm`` into ``patch2emb_mlp``); the stem runs channels-last (NHWC), where the 1x1
  convolutions are plain matrix products (``addmm``) on strided views - no ``_slow_conv2d_forward``, whose CPU
  heuristic takes 1x1 convolutions at batch < 16 on one thread and copies their non-contiguous inputs - and
  the depthwise and 3x3 convolutions run on oneDNN in channels-last; ``cat`` + channel shuffle become one
  ``stack``. The folded weights are cached per model and rebuilt when any source tensor changes (its version
  counter, storage, dtype or device); with autograd recording they are folded afresh, differentiably, so
  gradients still reach the original parameters.
* **Attention** (:func:`sdpa_group_attention`): where the attention op would run its pure-PyTorch reference (CPU
  tensors; not the Triton kernels on CUDA), ``torch.nn.functional.scaled_dot_product_attention`` on strided
  views of the packed ``qkv`` replaces the materialised logits, mask fill, softmax and two batched matmuls. The
  padded head group of the fine layers is handled exactly: the padding key is left out of every key set and the
  padding query row gets its official value (the uniform mean of its group's values), so every row equals the
  reference op's.

Training mode never takes this path: ``model.train()`` runs the unfused modules and the state dict is untouched
(the cache is a plain attribute, not a buffer). The one piece training shares is :func:`sdpa_group_attention`, which
:class:`gtpt.model.Attention` also calls in train mode on CPU (``model.set_fast_training``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from gtpt_kernels.backend import _MODE_PROBES, forward_ad_active, resolve_backend


def fast_inference_active(module: nn.Module) -> bool:
    """Whether ``module`` (a GTPT submodule carrying a ``fast_inference`` flag) takes the fast eval path now."""
    if not getattr(module, "fast_inference", False) or module.training or not _MODE_PROBES:
        return False
    dispatch_depth, function_mode_on, functorch_level = _MODE_PROBES
    return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()
                or dispatch_depth() or function_mode_on() or functorch_level() is not None)


def export_graph_active(module: nn.Module) -> bool:
    """Whether ``module`` (fast path flag on, eval mode) is being exported (ONNX tracing, ``torch.export``): then
    the model traces the exporter-friendly forms of the fast path (:func:`export_patch_embed`)."""
    if not getattr(module, "fast_inference", False) or module.training:
        return False
    return torch.jit.is_tracing() or (torch.compiler.is_compiling() and torch.compiler.is_exporting())


# ----------------------------------------------------------------------------------------------------------------
# Attention

def use_sdpa(module: nn.Module, qkv: Tensor) -> bool:
    """The attention layer ``module`` uses :func:`sdpa_group_attention`: fast path on, and the op would run its
    reference (so the Triton kernels keep CUDA and the interpreter), and no forward-mode AD."""
    return (fast_inference_active(module) and resolve_backend(module.backend, qkv.device) == "reference"
            and not forward_ad_active(qkv))


def sdpa_group_attention(qkv: Tensor, heads: int, num_shared: int, scale: float, pad_token: bool) -> Tensor:
    """:func:`gtpt_kernels.reference.group_attention_reference` through ``scaled_dot_product_attention``.

    ``qkv`` ``(B, G, N, 3C)`` -> ``(B, G, N, C)``. Queries are a strided view of ``qkv``; with shared tokens the
    keys and values of every group (the ``G*S`` shared rows, group-major, then its own rows) are built by one
    ``cat`` of the packed ``[k | v]`` columns. With ``pad_token`` the padding key (shared token 0 of group 0),
    masked for every other query, is simply left out, and the padding query row, whose logits the official layer
    masks entirely (a uniform softmax), is set to the mean of group 0's values, padding value included.
    """
    B, G, N, C3 = qkv.shape
    C = C3 // 3
    D = C // heads
    S = num_shared
    q = qkv.view(B, G, N, 3, heads, D)[:, :, :, 0].transpose(2, 3)  # (B, G, H, N, D) view
    if S == 0:
        kv = qkv[..., C:]
    else:
        shared = qkv[:, :, :S, C:].reshape(B, 1, G * S, 2 * C)  # group-major shared rows
        if pad_token:
            shared = shared[:, :, 1:]
        kv = torch.cat([shared.expand(B, G, -1, 2 * C), qkv[:, :, S:, C:]], dim=2)
    L = kv.size(2)
    kv = kv.view(B, G, L, 2, heads, D)
    k, v = kv[:, :, :, 0].transpose(2, 3), kv[:, :, :, 1].transpose(2, 3)
    out = F.scaled_dot_product_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), scale=scale)
    out = out.transpose(1, 2).reshape(B, G, N, C)
    if pad_token:
        if torch.is_grad_enabled():
            out = out.clone()  # the SDPA backward needs its own output untouched
        # official pad row: mean over all L + 1 values of group 0 (the left-out padding value included)
        values = kv[:, 0, :, 1].reshape(B, L, C)
        out[:, 0, 0] = (values.sum(1) + qkv[:, 0, 0, 2 * C:]) / (L + 1)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Stem + patch embedding, BatchNorm folded, channels-last

def _bn_affine(bn: nn.BatchNorm2d) -> Tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as ``y = x * scale + shift`` per channel."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _fold_conv(conv: nn.Conv2d, bn: Optional[nn.BatchNorm2d], repeat: int = 1) -> Tuple[Tensor, Tensor]:
    """``conv`` then ``bn`` as one convolution; ``repeat`` = output channels per BN channel (a PixelShuffle(r)
    between them has ``r * r``)."""
    w = conv.weight
    b = conv.bias if conv.bias is not None else w.new_zeros(w.shape[0])
    if bn is not None:
        scale, shift = _bn_affine(bn)
        scale, shift = scale.repeat_interleave(repeat), shift.repeat_interleave(repeat)
        w, b = w * scale.view(-1, 1, 1, 1), b * scale + shift
    return w, b


class _StemPlan:
    """The stem as the fast path runs it. Feature maps are NHWC and their channels are stored in a *physical* order
    that is not the logical one: a block's concatenation stays a block ``cat`` (about 7x cheaper than the
    element-interleaving copy that ``channel_shuffle`` is in NHWC, measured on this CPU), and the shuffle becomes a
    permutation ``perm`` (``perm[j]`` = the logical channel held by physical channel ``j``) that is folded into the
    weights of whatever reads the map next: input columns of 1x1 convolutions, the filters of depthwise ones, the
    columns of ``patch2emb_mlp``. A stride-1 block's split halves then are sets of physical channel ranges
    (``split``). Built by walking the stem with permutations only (:meth:`branch`, :meth:`block`); the run-time
    walk (:func:`fast_patch_embed`) follows the same structure.
    """

    def __init__(self):
        self.conv: Dict[nn.Module, Tuple[Tensor, Tensor]] = {}
        self.split: Dict[nn.Module, Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]] = {}
        self.patch: Optional[Tuple[Tensor, Tensor]] = None

    def branch(self, seq: nn.Sequential, perm: List[int]) -> List[int]:
        mods = list(seq)
        for i, m in enumerate(mods):
            if isinstance(m, nn.Conv2d):
                nxt = mods[i + 1] if i + 1 < len(mods) else None
                if isinstance(nxt, nn.PixelShuffle):  # conv -> PixelShuffle(r) -> BN (U-shaped stem upsampling)
                    w, b = _fold_conv(m, mods[i + 2], nxt.upscale_factor ** 2)
                else:
                    w, b = _fold_conv(m, nxt if isinstance(nxt, nn.BatchNorm2d) else None)
                if m.groups == 1:
                    w = w[:, perm]  # read the input channels in their physical order
                    perm = list(range(w.shape[0]))
                    if w.shape[-2:] == (1, 1) and m.stride == (1, 1):
                        w = w.flatten(1).t()  # 1x1 on NHWC: x @ w + b
                elif m.groups == m.in_channels == m.out_channels:  # depthwise: filters follow their channels
                    w, b = w[perm], b[perm]
                else:
                    raise TypeError("fast stem: grouped convolutions other than depthwise are not supported")
                self.conv[m] = (w, b)
            elif isinstance(m, nn.PixelShuffle):
                perm = list(range(len(perm) // m.upscale_factor ** 2))
        return perm

    def block(self, block: nn.Module, perm: List[int]) -> List[int]:
        if block.stride > 1:
            p1, p2 = self.branch(block.branch1, perm), self.branch(block.branch2, perm)
        else:
            half = len(perm) // 2
            x1 = [j for j, c in enumerate(perm) if c < half]
            x2 = [j for j, c in enumerate(perm) if c >= half]
            self.split[block] = (_runs(x1), _runs(x2))
            p1 = [perm[j] for j in x1]
            p2 = self.branch(block.branch2, [perm[j] - half for j in x2])
        # stored as cat(p1 part, p2 part); logically channel_shuffle(cat(...), 2): c -> 2c and 2c + 1
        return [2 * c for c in p1] + [2 * c + 1 for c in p2]

    def stage(self, stage: nn.Sequential, perm: List[int]) -> List[int]:
        for m in stage:
            perm = self.branch(m, perm) if isinstance(m, nn.Sequential) else self.block(m, perm)
        return perm


def _runs(positions: List[int]) -> List[Tuple[int, int]]:
    """Sorted channel positions as maximal ``(start, stop)`` ranges."""
    runs: List[Tuple[int, int]] = []
    for j in positions:
        if runs and runs[-1][1] == j:
            runs[-1] = (runs[-1][0], j + 1)
        else:
            runs.append((j, j + 1))
    return runs


def _build_plan(features: nn.Module) -> _StemPlan:
    plan = _StemPlan()
    stem = features.stem
    perm = plan.branch(stem.conv1, [0, 1, 2])
    if hasattr(stem, "layer"):
        perm = plan.stage(stem.layer, perm)
    else:  # U-shaped stem
        p1 = plan.stage(stem.down_layer1, perm)
        p2 = plan.stage(stem.down_layer2, p1)
        p3 = plan.stage(stem.down_layer3, p2)
        up = plan.branch(stem.upsample1, p3)
        p2 = plan.stage(stem.up_layer1, p2 + [len(p2) + c for c in up])
        up = plan.branch(stem.upsample2, p2)
        perm = plan.stage(stem.up_layer2, p1 + [len(p1) + c for c in up])
    # patch2emb_norm (BN on the stem output) folded into patch2emb_mlp, whose inputs are (p1 p2 c), channels
    # fastest, with c in the stem output's physical order
    scale, shift = _bn_affine(features.patch2emb_norm)
    mlp = features.patch2emb_mlp
    C = len(perm)
    w = mlp.weight.view(mlp.out_features, -1, C)
    bias = mlp.bias + (w * shift).sum((1, 2))
    plan.patch = ((w * scale)[:, :, perm].flatten(1), bias)
    return plan


def _source_tensors(features: nn.Module) -> List[Tensor]:
    tensors = [t for m in features.stem.modules() for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))]
    tensors += [*features.patch2emb_norm.parameters(), *features.patch2emb_norm.buffers()]
    return tensors + [*features.patch2emb_mlp.parameters()]


def _plan(features: nn.Module) -> _StemPlan:
    """The stem plan of ``features``: cached while autograd is off, rebuilt when a source tensor changed."""
    sources = _source_tensors(features)
    if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
        return _build_plan(features)  # differentiable: gradients reach the original parameters
    try:
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
    except RuntimeError:  # inference tensors (built under torch.inference_mode) have no version counter
        key = None
    cache = features.__dict__.get("_fast_cache")
    if key is not None and cache is not None and cache[0] == key:
        return cache[1]
    with torch.no_grad():
        plan = _build_plan(features)
    features.__dict__["_fast_cache"] = (key, plan) if key is not None else None
    return plan


def clear_cache(features: nn.Module) -> None:
    features.__dict__.pop("_fast_cache", None)


def _channels(x: Tensor, runs: List[Tuple[int, int]], dim: int) -> Tensor:
    parts = [x.narrow(dim, a, b - a) for a, b in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def _run_branch(seq: nn.Sequential, x: Tensor, plan: _StemPlan) -> Tensor:
    for m in seq:
        if isinstance(m, nn.Conv2d):
            w, b = plan.conv[m]
            if w.dim() == 2:  # 1x1: one addmm on the (B*H*W, C) view (a channel slice is a strided view, no copy)
                x = torch.addmm(b, x.reshape(-1, x.size(-1)), w).view(*x.shape[:-1], w.size(1))
            else:  # oneDNN on the channels-last view
                x = F.conv2d(x.permute(0, 3, 1, 2), w, b, m.stride, m.padding, m.dilation, m.groups).permute(0, 2, 3, 1)
        elif isinstance(m, nn.ReLU):
            x = torch.relu_(x)
        elif isinstance(m, nn.PixelShuffle):  # NHWC: channel c*r*r + i*r + j -> pixel (i, j) of channel c
            B, H, W, C = x.shape
            r = m.upscale_factor
            x = x.view(B, H, W, C // (r * r), r, r).permute(0, 1, 4, 2, 5, 3).reshape(B, H * r, W * r, C // (r * r))
        elif not isinstance(m, nn.BatchNorm2d):  # BatchNorm: folded into the conv before it
            raise TypeError(f"fast stem: unexpected module {type(m).__name__}")
    return x


def walk_stem(stem: nn.Module, x: Tensor, plan: _StemPlan, branch, dim: int) -> Tensor:
    """The stem's structure with ``branch(seq, x, plan)`` running each convolution branch and feature maps
    concatenated / split along the channel axis ``dim``: NHWC (-1) on the fast eager path, NCHW (1) in the export
    graph (:func:`gtpt.export_graph.patch_embed`)."""
    def stage(seq: nn.Sequential, x: Tensor) -> Tensor:
        for m in seq:
            if isinstance(m, nn.Sequential):
                x = branch(m, x, plan)
            elif m.stride > 1:
                x = torch.cat([branch(m.branch1, x, plan), branch(m.branch2, x, plan)], dim)
            else:
                keep, rest = plan.split[m]
                x = torch.cat([x.narrow(dim, a, b - a) for a, b in keep]
                              + [branch(m.branch2, _channels(x, rest, dim), plan)], dim)
        return x

    x = branch(stem.conv1, x, plan)
    if hasattr(stem, "layer"):
        return stage(stem.layer, x)
    # U-shaped stem
    x1 = stage(stem.down_layer1, x)
    x2 = stage(stem.down_layer2, x1)
    x3 = stage(stem.down_layer3, x2)
    x2 = stage(stem.up_layer1, torch.cat([x2, branch(stem.upsample1, x3, plan)], dim))
    return stage(stem.up_layer2, torch.cat([x1, branch(stem.upsample2, x2, plan)], dim))


def _stem(features: nn.Module, plan: _StemPlan, images: Tensor) -> Tensor:
    """The stem with BN folded: NHWC ``(B, H/4, W/4, C)``, channels in the plan's physical order."""
    nhwc = images.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    return walk_stem(features.stem, nhwc, plan, _run_branch, -1)


def fast_patch_embed(features: nn.Module, images: Tensor) -> Tensor:
    """``patch2emb_mlp(patchify(patch2emb_norm(stem(images))))`` -> ``(B, h*w, dim)``: BN folded, NHWC, no
    channel shuffles (see :class:`_StemPlan`)."""
    plan = _plan(features)
    x = _stem(features, plan, images)
    for hook in features.__dict__.get("_fast_stem_hooks", {}).values():
        hook(x)
    b, h, w, c = x.shape
    ph, pw = features.cfg.patch_size
    # 'b (h p1) (w p2) c -> b (h w) (p1 p2 c)'
    x = x.view(b, h // ph, ph, w // pw, pw, c).permute(0, 1, 3, 2, 4, 5).reshape(b, (h // ph) * (w // pw), -1)
    return F.linear(x, *plan.patch)


def register_stem_hook(features: nn.Module, hook) -> RemovableHandle:
    """``hook(stem_output)`` after the stem inside every :func:`fast_patch_embed` of ``features`` (the stem
    module's own forward hooks do not fire on the fast path, which never calls it); for stage timers."""
    hooks = features.__dict__.setdefault("_fast_stem_hooks", OrderedDict())  # weak-referenceable
    handle = RemovableHandle(hooks)
    hooks[handle.id] = hook
    return handle

