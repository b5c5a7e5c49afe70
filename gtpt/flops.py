"""FLOP (multiply-accumulate) and parameter counts of GTPT, in the paper's convention and in full.

Two conventions, both reported as **MACs** (one multiply-accumulate = 1; the paper's "GFLOPs" are thop MACs):

* ``"paper"`` - what ``tools/compute_flops.py`` of the official code reports (``thop.profile`` 0.1.1 on the eval
  model, batch 1). thop hooks *leaf modules* that ran: ``Conv2d`` = numel(out) * (C_in / groups) * kh * kw,
  ``Linear`` = numel(out) * in_features (bias terms are not counted), ``BatchNorm`` / ``LayerNorm`` with affine
  weights = 4 * numel(in). Everything that is not such a module - the attention matmuls, softmax, GELU, adds, the
  pruning scores - is invisible to it. Reimplemented here with forward hooks (no thop dependency); the test suite
  checks the six official numbers exactly.
* ``"full"`` - every matmul, attention included, as ``fvcore.nn.FlopCountAnalysis`` counts it (fvcore's "flop"
  is one MAC; it also counts norms: BN in eval 2 * numel, LN 5 * numel). The custom ops of :mod:`gtpt_kernels`
  are opaque to fvcore's JIT trace, so handles are registered for them by op name; each handle counts exactly the
  matmuls the op's pure-PyTorch reference performs, so a model on the fused kernels counts the same as on the
  reference ops.

Per-stage breakdowns follow :data:`gtpt.summary.STAGES`. ``channel_mask`` is the whole fine entry: the channel
mask MLP, the per-group gating and the fine-entry pruning. The coarse and fine encoders include their own
pruning sites.
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .config import get_config
from .summary import STAGES

CONVENTIONS = ("paper", "full")
PARAM_CONVENTIONS = ("paper", "trainable", "all")
PATHS = ("pruned", "unpruned")
# Stages that compute something (``tokens`` only holds embeddings), in execution order.
FLOP_STAGES = ("stem", "patch_embedding", "coarse_encoder", "channel_mask", "fine_encoder", "heads")


@dataclass(frozen=True)
class FlopCount:
    """A MAC count: ``total`` and ``per_stage`` (same unit; per-stage values sum to the total)."""
    variant: str
    convention: str
    path: str
    batch_size: int
    total: int
    per_stage: Mapping[str, int] = field(default_factory=dict)
    by_operator: Mapping[str, int] = field(default_factory=dict)

    @property
    def gmacs(self) -> float:
        return self.total / 1e9

    def as_dict(self) -> dict:
        return {"variant": self.variant, "convention": self.convention, "path": self.path,
                "batch_size": self.batch_size, "total": self.total, "per_stage": dict(self.per_stage),
                "by_operator": dict(self.by_operator)}


# ----------------------------------------------------------------------------------------------------------------
# helpers

def _as_model(model_or_name, backend: str = "reference") -> Tuple[nn.Module, str]:
    from .model import GTPT, build_model

    if isinstance(model_or_name, GTPT):
        return model_or_name, model_or_name.cfg.name
    if isinstance(model_or_name, nn.Module):
        raise TypeError(f"expected a GTPT model or a variant name, got {type(model_or_name).__name__}")
    cfg = get_config(model_or_name)  # raises ValueError with the valid names
    return build_model(cfg.name, backend=backend), cfg.name


def _check_batch(batch_size: int) -> int:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def _keep_rates(model, path: str) -> Tuple[float, ...]:
    if path not in PATHS:
        raise ValueError(f"unknown path {path!r}; valid paths: {', '.join(PATHS)}")
    return model.cfg.layer_keep_rates() if path == "pruned" else (1.0,) * model.cfg.depth


def _example_images(model: nn.Module, batch_size: int) -> Tensor:
    p = next(model.parameters())
    h, w = model.cfg.image_size
    g = torch.Generator().manual_seed(0)
    # Random rather than zeros so the top-k selections are ordinary; counts do not depend on values.
    return torch.randn(batch_size, 3, h, w, generator=g).to(device=p.device, dtype=p.dtype)


class PathRunner(nn.Module):
    """``forward(images)`` = one path of ``model`` (pruned or unpruned), so module-based tools can trace it."""

    def __init__(self, model: nn.Module, keep_rates: Sequence[float]):
        super().__init__()
        self.model = model
        self.keep_rates = tuple(keep_rates)

    def forward(self, images: Tensor):
        m = self.model
        x, sparse, dense = m.features.embed(images)
        return m.heads(m.features.encode(x, sparse, dense, self.keep_rates))


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode on the plain modules: the fast inference path (gtpt.fast_inference) folds BatchNorm into the
    convolutions and runs some layers as functional calls, which module-based counting would not see."""
    was_training = model.training
    fast = {m: m.fast_inference for m in model.modules() if hasattr(m, "fast_inference")}
    for m in fast:
        m.fast_inference = False
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        for m, on in fast.items():
            m.fast_inference = on


def _stage_of_module(name: str) -> Optional[str]:
    # STAGES holds state-dict prefixes ("features.stem."); a module's own name lacks the trailing dot.
    for stage, prefixes in STAGES.items():
        if (name + ".").startswith(prefixes):
            return stage
    return None


# ----------------------------------------------------------------------------------------------------------------
# "paper" convention: thop 0.1.1 rules as forward hooks on leaf modules

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)


def _thop_macs(module: nn.Module, inputs, output) -> Optional[int]:
    """MACs of one call of ``module`` as thop 0.1.1 counts it, or None for module types thop does not hook."""
    if isinstance(module, nn.modules.conv._ConvNd):
        # calculate_conv2d_flops: numel(out) * (C_in // groups) * prod(kernel); the bias is ignored
        in_c = inputs[0].shape[1]
        return output.numel() * (in_c // module.groups) * int(torch.Size(module.weight.shape[2:]).numel())
    if isinstance(module, nn.Linear):
        # count_linear: in_features * numel(out)
        return module.in_features * output.numel()
    if isinstance(module, _NORMS):
        # count_normalization: 2 * numel(x), doubled when the norm has affine weights
        affine = getattr(module, "affine", False) or getattr(module, "elementwise_affine", False)
        return 2 * inputs[0].numel() * (2 if affine else 1)
    return None


@contextlib.contextmanager
def _module_hooks(model: nn.Module, fn: Callable[[str, nn.Module, tuple, object], None]) -> Iterator[None]:
    handles = []
    try:
        for name, m in model.named_modules():
            if next(m.children(), None) is None:  # leaf modules only, as thop
                handles.append(m.register_forward_hook(lambda mod, i, o, _n=name: fn(_n, mod, i, o)))
        yield
    finally:
        for h in handles:
            h.remove()


def _paper_count(model, name: str, path: str, batch_size: int) -> FlopCount:
    per_stage = {s: 0 for s in FLOP_STAGES}
    by_type: Dict[str, int] = {}

    def hook(mname, mod, inputs, output):
        macs = _thop_macs(mod, inputs, output)
        if macs is None or macs == 0:
            return
        stage = _stage_of_module(mname)
        per_stage[stage] += macs
        key = type(mod).__name__
        by_type[key] = by_type.get(key, 0) + macs

    runner = PathRunner(model, _keep_rates(model, path))
    with _eval_mode(model), torch.no_grad(), _module_hooks(model, hook):
        runner(_example_images(model, batch_size))
    return FlopCount(name, "paper", path, batch_size, sum(per_stage.values()), per_stage, by_type)


# ----------------------------------------------------------------------------------------------------------------
# "full" convention: fvcore, with handles for the gtpt_kernels custom ops

# The custom ops may be registered under either namespace (``gtpt::`` for the MHGA kernel, ``gtpt_kernels::`` for
# the pruning kernels); a handle for a name that is never registered is simply never used.
_OP_NAMESPACES = ("gtpt", "gtpt_kernels")


def _shape(v) -> Optional[List[int]]:
    from fvcore.nn.jit_handles import get_shape

    return get_shape(v)


def _const(v):
    return v.toIValue()


def group_attention_reference_macs(B: int, G: int, N: int, C: int, heads: int, num_shared: int) -> int:
    """MACs of the reference MHGA's two matmuls: ``q @ k^T`` and ``attn @ v`` with ``L = G*S + N - S`` keys per
    group, i.e. ``2 * B * G * N * L * C`` (``heads`` cancels: H heads of C/H channels)."""
    L = G * num_shared + N - num_shared
    return 2 * B * G * N * L * C


def _group_attention_macs_fn() -> Callable[..., int]:
    # The kernel module may publish its own count (so both sides agree by construction); fall back to ours.
    try:
        from gtpt_kernels.ops.group_attention import group_attention_macs  # type: ignore[attr-defined]
        return group_attention_macs
    except ImportError:
        return group_attention_reference_macs


def _group_attention_handle(inputs, outputs) -> int:
    # gtpt::group_attention(qkv (B, G, N, 3C), heads, num_shared, scale, pad_token, ...)
    B, G, N, C3 = _shape(inputs[0])
    heads, num_shared = int(_const(inputs[1])), int(_const(inputs[2]))
    return int(_group_attention_macs_fn()(B, G, N, C3 // 3, heads, num_shared))


def _prune_scores_handle(inputs, outputs) -> int:
    # gtpt_kernels::softmax_pool_scores / token_prune(q (B, G, H, R, D), k (B, G or 1, H, N, D), ...): the reference
    # computes the logits q @ k^T (broadcast over k's group dim); selection and gathering are not MACs.
    B, G, H, R, D = _shape(inputs[0])
    N = _shape(inputs[1])[3]
    return B * G * H * R * D * N


CUSTOM_OP_HANDLES: Dict[str, Callable] = {}
for _ns in _OP_NAMESPACES:
    CUSTOM_OP_HANDLES[f"{_ns}::group_attention"] = _group_attention_handle
    CUSTOM_OP_HANDLES[f"{_ns}::softmax_pool_scores"] = _prune_scores_handle
    CUSTOM_OP_HANDLES[f"{_ns}::token_prune"] = _prune_scores_handle


def registered_custom_ops() -> List[str]:
    """The handled custom ops that are registered in this process (for reports)."""
    out = []
    for name in CUSTOM_OP_HANDLES:
        ns, op = name.split("::")
        try:
            getattr(getattr(torch.ops, ns), op)
        except (AttributeError, RuntimeError):
            continue
        out.append(name)
    return out


class _Scope(nn.Module):
    """A module wrapper around a bound method, so fvcore's per-module scopes see the method as a submodule."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


# (owner module path, method) -> stage; module-scoped stages come straight from STAGES.
_METHOD_SCOPES = (("features", "embed"), ("features.transformer", "coarse"),
                  ("features.transformer", "fine_entry"), ("features.transformer", "fine"))


@contextlib.contextmanager
def stage_scopes(model: nn.Module) -> Iterator[Dict[str, str]]:
    """Temporarily route ``features.embed`` and the transformer's ``coarse`` / ``fine_entry`` / ``fine`` through
    :class:`_Scope` submodules (restored on exit), so per-module tools (fvcore scopes, forward hooks) see these
    methods as modules. Yields {method: submodule path relative to ``model``}. The model code stays untouched."""
    installed = []
    names = {}
    try:
        for owner_path, method in _METHOD_SCOPES:
            owner = model.get_submodule(owner_path)
            attr = f"_flops_scope_{method}"
            scope = _Scope(getattr(owner, method))
            owner.add_module(attr, scope)
            owner.__dict__[method] = scope  # instance attribute shadows the class method
            installed.append((owner, attr, method))
            names[method] = f"{owner_path}.{attr}"
        yield names
    finally:
        for owner, attr, method in installed:
            owner.__dict__.pop(method, None)
            owner._modules.pop(attr, None)


def fvcore_analysis(module: nn.Module, inputs: Union[Tensor, Tuple[Tensor, ...]]):
    """A configured ``FlopCountAnalysis`` of ``module(*inputs)`` with the gtpt_kernels handles registered."""
    with warnings.catch_warnings():
        # fvcore.nn scripts its focal loss at import with torch.jit.script, deprecated in torch >= 2.10
        warnings.simplefilter("ignore", DeprecationWarning)
        from fvcore.nn import FlopCountAnalysis

    fa = FlopCountAnalysis(module, inputs if isinstance(inputs, tuple) else (inputs,))
    fa.set_op_handle(**CUSTOM_OP_HANDLES)
    # "caller": an op counts toward every module on the call stack, which lets the method scopes collect the ops
    # their methods run, including those of child modules.
    fa.ancestor_mode("caller")
    fa.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
    with warnings.catch_warnings():
        # fvcore traces with torch.jit, which torch >= 2.10 flags as deprecated; the trace is cached after this.
        warnings.simplefilter("ignore", DeprecationWarning)
        fa.total()
    return fa


def _full_count(model, name: str, path: str, batch_size: int) -> FlopCount:
    runner = PathRunner(model, _keep_rates(model, path))
    with _eval_mode(model), torch.no_grad(), stage_scopes(model) as scopes:
        fa = fvcore_analysis(runner, _example_images(model, batch_size))
        by_mod = fa.by_module()
        total = int(fa.total())
        by_op = {k: int(v) for k, v in fa.by_operator().items()}
    m = lambda n: int(by_mod.get(f"model.{n}", 0))  # noqa: E731 - runner prefixes the model's names
    per_stage = {
        "stem": m("features.stem"),
        "patch_embedding": m(scopes["embed"]) - m("features.stem"),
        "coarse_encoder": m(scopes["coarse"]),
        "channel_mask": m(scopes["fine_entry"]),
        "fine_encoder": m(scopes["fine"]),
        "heads": m("mlp_head_x") + m("mlp_head_y"),
    }
    rest = total - sum(per_stage.values())
    if rest:  # ops outside every stage (none today); kept visible instead of silently dropped
        per_stage["other"] = rest
    return FlopCount(name, "full", path, batch_size, total, per_stage, by_op)


# ----------------------------------------------------------------------------------------------------------------
# public API

def count_flops(model_or_name: Union[str, nn.Module], convention: str = "paper", batch_size: int = 1,
                path: str = "pruned", backend: str = "reference") -> FlopCount:
    """MACs of one forward pass of a GTPT model (a variant name or a :class:`gtpt.GTPT`).

    Args:
        convention: ``"paper"`` (thop's rules, the numbers the paper reports) or ``"full"`` (fvcore: every
            matmul including attention and the pruning scores, plus norms).
        batch_size: images per forward (the paper counts batch 1; counts scale linearly).
        path: ``"pruned"`` (eval / student) or ``"unpruned"`` (every keep rate 1.0, the teacher pass).
        backend: backend of the model built from a name (a given model keeps its own).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FLOP convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    batch_size = _check_batch(batch_size)
    model, name = _as_model(model_or_name, backend)
    if convention == "paper":
        return _paper_count(model, name, path, batch_size)
    return _full_count(model, name, path, batch_size)


def count_parameters(model_or_name: Union[str, nn.Module], convention: str = "paper") -> int:
    """Parameters of a GTPT model.

    * ``"paper"``: thop's count - parameters of the Conv/Linear/Norm leaf modules that run on the eval path
      (excludes the human/keypoint token embeddings and the frozen sine position embedding).
    * ``"trainable"``: every parameter with ``requires_grad`` (excludes the frozen PE).
    * ``"all"``: every parameter.
    """
    if convention not in PARAM_CONVENTIONS:
        raise ValueError(f"unknown parameter convention {convention!r}; valid: {', '.join(PARAM_CONVENTIONS)}")
    model, _ = _as_model(model_or_name)
    if convention == "trainable":
        return sum(p.numel() for p in model.parameters() if p.requires_grad)
    if convention == "all":
        return sum(p.numel() for p in model.parameters())
    ran: Dict[int, nn.Module] = {}

    def hook(mname, mod, inputs, output):
        if _thop_macs(mod, inputs, output) is not None:
            ran[id(mod)] = mod

    runner = PathRunner(model, _keep_rates(model, "pruned"))
    with _eval_mode(model), torch.no_grad(), _module_hooks(model, hook):
        runner(_example_images(model, 1))
    return sum(p.numel() for m in ran.values() for p in m.parameters())


def flop_counter_mode_flops(model_or_name: Union[str, nn.Module], batch_size: int = 1, path: str = "pruned",
                            backend: str = "reference") -> Dict[str, int]:
    """FLOPs by ``torch.utils.flop_counter.FlopCounterMode`` (it reports FLOPs = 2 * MACs of mm / bmm / conv-type
    ops and does not count norms), per aten op. Used to cross-check the ``"full"`` convention."""
    from torch.utils.flop_counter import FlopCounterMode

    model, _ = _as_model(model_or_name, backend)
    runner = PathRunner(model, _keep_rates(model, path))
    counter = FlopCounterMode(display=False)
    # Grad mode stays on: FlopCounterMode's module tracker registers autograd hooks on module inputs, which fails
    # for no_grad views of parameters (the token embeddings). Batch 1 makes the kept graph cheap.
    with _eval_mode(model), counter:
        runner(_example_images(model, _check_batch(batch_size)))
    return {str(k): int(v) for k, v in counter.get_flop_counts().get("Global", {}).items()}
