"""Model summary: parameters per stage and the token schedule per layer of a variant."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from torch import nn

from .config import GTPTConfig, get_config
from .keypoints import WHOLEBODY_DENSE_PER_GROUP

# Stages of the model, by state-dict prefix (the same split the profilers use).
STAGES = {
    "stem": ("features.stem.",),
    "patch_embedding": ("features.patch2emb_norm.", "features.patch2emb_mlp.", "features.pos_embedding"),
    "tokens": ("features.human_token", "features.keypoint_token", "features.extra_token",
               "features.fine_keypoint_token"),
    "coarse_encoder": ("features.transformer.layers.",),
    "channel_mask": ("features.transformer.group_mask.",),
    "fine_encoder": ("features.transformer.group_layers.",),
    "heads": ("mlp_head_x.", "mlp_head_y."),
}


def stage_of(name: str) -> str:
    for stage, prefixes in STAGES.items():
        if name.startswith(prefixes):
            return stage
    raise KeyError(name)


def parameters_per_stage(model: nn.Module, trainable_only: bool = True) -> Dict[str, int]:
    counts = {s: 0 for s in STAGES}
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        counts[stage_of(name)] += p.numel()
    return counts


@dataclass(frozen=True)
class LayerTokens:
    stage: str        # "coarse" or "fine"
    layer: int
    groups: int
    attn_queries: int  # tokens per group entering attention
    attn_keys: int     # keys per group seen by attention
    ffn_tokens: int    # tokens per group entering the FFN (after a pruning site)
    note: str = ""


def token_schedule(cfg, pruned: bool = True) -> List[LayerTokens]:
    """Token counts per layer, from the keep-rate rules of the official code (``int(256 * rate)``)."""
    cfg = get_config(cfg) if not isinstance(cfg, GTPTConfig) else cfg
    rates = cfg.layer_keep_rates() if pruned else (1.0,) * cfg.depth
    n_img = cfg.num_patches
    half = cfg.depth // 2
    rows: List[LayerTokens] = []
    K, vis = 1, n_img
    for i in range(half):
        q = K + vis
        target = int(n_img * rates[i])
        note = ""
        if vis != target:
            vis, note = target, f"prune to {target} visual (human-token score)"
        if i == 3:
            K = 17 + cfg.num_part_tokens
            note = (note + "; " if note else "") + f"Human-2-Keypoint ({K} tokens)"
        rows.append(LayerTokens("coarse", i, 1, q, q, K + vis, note))
    G, S = cfg.num_groups, cfg.num_sparse
    entry = int(n_img * rates[half])
    if cfg.wholebody:
        n_after = entry  # dense + visual per group, equal for all groups
        note = "fine entry: visual " + "/".join(str(entry - d) for d in WHOLEBODY_DENSE_PER_GROUP) + " + dense"
    else:
        n_after = entry if vis != entry else vis
        note = f"fine entry: {n_after} visual per group" if vis != entry else ""
    n = n_after
    for i in range(half):
        q = S + n
        target = int(n_img * rates[half + i])
        this = note if i == 0 else ""
        if n != target:
            n = target
            this = f"prune to {target} {'dense+visual' if cfg.wholebody else 'visual'} per group"
        rows.append(LayerTokens("fine", i, G, q, G * S + q - S, S + n, this))
    return rows


def summary(name_or_model, pruned_and_unpruned: bool = True) -> str:
    """Human-readable summary of a variant: parameters per stage and the token schedule."""
    from .model import GTPT, build_model, num_trainable_parameters

    model = name_or_model if isinstance(name_or_model, GTPT) else build_model(name_or_model, backend="reference")
    cfg = model.cfg
    lines = [f"{cfg.name}: dim {cfg.dim}, heads {cfg.heads} (head dim {cfg.head_dim}), {cfg.stem} ShuffleNetV2 stem "
             f"({cfg.stem_channels} ch), {cfg.num_keypoints} keypoints, keep rates {list(cfg.keep_rates)}",
             f"  trainable parameters (frozen PE excluded): {num_trainable_parameters(model):,}"]
    for stage, count in parameters_per_stage(model).items():
        lines.append(f"    {stage:<16} {count:>12,}")
    for pruned in ((True, False) if pruned_and_unpruned else (True,)):
        lines.append(f"  token schedule, {'pruned (eval / student)' if pruned else 'unpruned (teacher)'} path:")
        lines.append(f"    {'layer':<9} {'groups':>6} {'queries':>8} {'keys':>6} {'ffn':>6}  note")
        for r in token_schedule(cfg, pruned):
            lines.append(f"    {r.stage + ' ' + str(r.layer):<9} {r.groups:>6} {r.attn_queries:>8} {r.attn_keys:>6} "
                         f"{r.ffn_tokens:>6}  {r.note}")
    return "\n".join(lines)
