"""The lean GTPT model: ShuffleNetV2 stem, coarse encoder with human-token pruning, Human-2-Keypoint, channel
mask, grouped fine encoder with Multi-Head Group Attention and keypoint-guided pruning, SimCC heads.

Reads top to bottom. It reproduces the official implementation (github.com/haonanwang0522/GTPT @ f3a6068,
``lib/models/pose_gtpt_{t,s,b}_{human,wholebody}.py``) as ``shared/reference/gtpt-reference.md`` describes it,
quirks included, so that official checkpoints give official outputs; module and parameter names equal the
official student copy (``features.*``, ``mlp_head_x/y.*``). Attention, softmax pooling and top-k gather go through
:mod:`gtpt_kernels`, so the same model runs on the reference ops or on the fused Triton kernels. In eval mode the
stem (BatchNorm folded, channels-last) and, on CPU, the attention (SDPA) take the fast inference path of
:mod:`gtpt.fast_inference` (``model.set_fast_inference(False)`` turns it off). In train mode on CPU the attention
also runs through SDPA where the op's backend is ``"auto"`` (``model.set_fast_training(False)`` turns it off).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from gtpt_kernels import group_attention, token_prune
from gtpt_kernels.backend import _MODE_PROBES, BACKENDS, forward_ad_active, get_backend, resolve_backend
from gtpt_kernels.reference import split_qkv

from . import export_graph, fast_inference
from .config import GTPTConfig, get_config
from .keypoints import WHOLEBODY_DENSE_PER_GROUP, WHOLEBODY_ENTRY_ROWS


# ----------------------------------------------------------------------------------------------------------------
# Stem: ShuffleNetV2 (one stage for T/S, U-shaped for B). All convs keep their bias, as in the official code.

def channel_shuffle(x: Tensor, groups: int) -> Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


class InvertedResidual(nn.Module):
    """ShuffleNetV2 block; stride 2 has two branches, stride 1 splits the channels in half."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        branch = out_channels // 2
        if stride == 1 and in_channels != 2 * branch:
            raise ValueError(f"stride-1 block needs in_channels == out_channels, got {in_channels}->{out_channels}")
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(in_channels, in_channels, 3, stride, 1, groups=in_channels), nn.BatchNorm2d(in_channels),
                nn.Conv2d(in_channels, branch, 1), nn.BatchNorm2d(branch), nn.ReLU(inplace=True))
        self.branch2 = nn.Sequential(
            nn.Conv2d(in_channels if stride > 1 else branch, branch, 1), nn.BatchNorm2d(branch), nn.ReLU(inplace=True),
            nn.Conv2d(branch, branch, 3, stride, 1, groups=branch), nn.BatchNorm2d(branch),
            nn.Conv2d(branch, branch, 1), nn.BatchNorm2d(branch), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        else:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        return channel_shuffle(out, 2)


def _stage(in_channels: int, out_channels: int, blocks: int) -> nn.Sequential:
    return nn.Sequential(*[InvertedResidual(in_channels if i == 0 else out_channels, out_channels, 2 if i == 0 else 1)
                           for i in range(blocks)])


def _conv1() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.ReLU(inplace=True))


class ShuffleNetV2Stem(nn.Module):
    """T/S stem: conv3x3 s2 -> 4 blocks (first stride 2). Output (B, C, H/4, W/4)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = _conv1()
        self.layer = _stage(64, channels, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(self.conv1(x))


class UShapedShuffleNetV2Stem(nn.Module):
    """B stem: three down stages (1/4, 1/8, 1/16) and two pixel-shuffle up stages back to 1/4 with 256 channels."""

    def __init__(self):
        super().__init__()
        self.conv1 = _conv1()
        self.down_layer1 = _stage(64, 256, 4)
        self.down_layer2 = _stage(256, 384, 4)
        self.down_layer3 = _stage(384, 512, 4)
        self.upsample1 = self._upsample(512, 384)
        self.upsample2 = self._upsample(384, 256)
        self.up_layer1 = self._up_layer(384, 2)
        self.up_layer2 = self._up_layer(256, 2)

    @staticmethod
    def _upsample(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout * 4, 1), nn.PixelShuffle(2), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    @staticmethod
    def _up_layer(c: int, blocks: int) -> nn.Sequential:
        fuse = nn.Sequential(nn.Conv2d(2 * c, c, 1), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        return nn.Sequential(fuse, *[InvertedResidual(c, c, 1) for _ in range(blocks)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x1 = self.down_layer1(x)
        x2 = self.down_layer2(x1)
        x3 = self.down_layer3(x2)
        x2 = self.up_layer1(torch.cat([x2, self.upsample1(x3)], 1))
        return self.up_layer2(torch.cat([x1, self.upsample2(x2)], 1))


# ----------------------------------------------------------------------------------------------------------------
# Transformer blocks. Wrapper names (ResidualAttn -> PreNorm -> fn) mirror TokenPose's so state-dict keys match.

class PreNorm(nn.Module):
    def __init__(self, dim: int, fn: nn.Module):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = fn

    def forward(self, x: Tensor, **kwargs):
        return self.fn(self.norm(x), **kwargs)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        # indices 0 and 3 carry weights, as in TokenPose (Linear, GELU, Dropout, Linear, Dropout); dropout is 0.
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim),
                                 nn.Dropout(0.0))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x) + x


class Attention(nn.Module):
    """Attention layer on ``(B, G, N, dim)`` tokens through :func:`gtpt_kernels.group_attention`.

    ``num_shared=0`` (G=1) is the coarse layers' plain attention; ``num_shared=6, pad_token=True`` is the fine
    layers' MHGA with GTPT's padded head group. Returns the output and the packed ``to_qkv`` activations, from
    which the pruning sites read their logits.
    """

    def __init__(self, dim: int, heads: int, num_shared: int, pad_token: bool):
        super().__init__()
        self.heads, self.num_shared, self.pad_token = heads, num_shared, pad_token
        self.scale = dim ** -0.5  # GTPT scales by the model dim (scale_with_head=False), not the head dim
        self.backend: Optional[str] = None
        self.fast_inference = True
        self.fast_training = True
        self.to_qkv = nn.Linear(dim, dim * 3, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def _sdpa_training(self, qkv: Tensor) -> bool:
        """Train mode, backend "auto" and the op would run its reference (CPU without the Triton interpreter):
        the same attention through SDPA, forward and backward, without materialising the (B, G, H, N, L) logits.
        At gtpt-t's teacher fine shape (B 8, 3 x 262 queries, 274 keys) that is 332 -> 76 ms per forward +
        backward on the 2-core CPU (measured 2026-12-01), about half of a training step. An explicit
        ``backend="reference"`` keeps the reference (the truth), and so do tracing, compiling, dispatch modes
        (``FlopCounterMode``) and functorch transforms."""
        if not (self.training and self.fast_training and _MODE_PROBES) or forward_ad_active(qkv):
            return False
        if (self.backend or get_backend()) != "auto" or resolve_backend(self.backend, qkv.device) != "reference":
            return False
        dispatch_depth, function_mode_on, functorch_level = _MODE_PROBES
        return not (torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()
                    or dispatch_depth() or function_mode_on() or functorch_level() is not None)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        qkv = self.to_qkv(x)
        if fast_inference.use_sdpa(self, qkv) or self._sdpa_training(qkv):  # CPU: the same attention through SDPA
            out = fast_inference.sdpa_group_attention(qkv, self.heads, self.num_shared, self.scale, self.pad_token)
        else:
            out = group_attention(qkv, self.heads, self.num_shared, self.scale, self.pad_token, backend=self.backend)
        return self.to_out(out), qkv


class ResidualAttn(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        out, qkv = self.fn(x)
        return out + x, qkv


def _layer(dim: int, heads: int, mlp_dim: int, num_shared: int, pad_token: bool) -> nn.ModuleList:
    return nn.ModuleList([ResidualAttn(PreNorm(dim, Attention(dim, heads, num_shared, pad_token))),
                          Residual(PreNorm(dim, FeedForward(dim, mlp_dim)))])


class Transformer(nn.Module):
    """6 coarse layers (plain attention) + channel mask + 6 fine layers (MHGA), with GTPT's pruning schedule."""

    def __init__(self, cfg: GTPTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.group_mask = nn.Sequential(nn.Linear(d, d // 2), nn.ReLU(), nn.Linear(d // 2, d * cfg.num_groups),
                                        nn.Sigmoid())
        n = cfg.depth // 2
        self.layers = nn.ModuleList([_layer(d, cfg.heads, cfg.mlp_dim, 0, False) for _ in range(n)])
        self.group_layers = nn.ModuleList([_layer(d, cfg.heads, cfg.mlp_dim, cfg.num_sparse, True) for _ in range(n)])
        self.backend: Optional[str] = None
        self.scale = d ** -0.5
        G, S = cfg.num_groups, cfg.num_sparse
        # Query rows of the fine-L3 (and COCO fine-entry) ranking: every group's 6 sparse rows except the padding.
        pad_rows = torch.ones(G, S, dtype=torch.bool)
        pad_rows[0, 0] = False
        self.register_buffer("_coco_rows", pad_rows, persistent=False)
        if cfg.wholebody:
            # WholeBody fine entry: per group its part tokens then its body keypoints (6 / 8 / 8 rows, padded to 8),
            # as indices into the 22 sparse tokens [5 part | 17 body] of coarse layer 5.
            width = max(len(p) + len(k) for p, k in WHOLEBODY_ENTRY_ROWS)
            index = torch.zeros(G, width, dtype=torch.long)
            valid = torch.zeros(G, width, dtype=torch.bool)
            for g, (parts, kps) in enumerate(WHOLEBODY_ENTRY_ROWS):
                rows = list(parts) + [5 + k for k in kps]
                index[g, :len(rows)] = torch.tensor(rows)
                valid[g, :len(rows)] = True
            self.register_buffer("_wb_entry_index", index.flatten(), persistent=False)
            self.register_buffer("_wb_entry_rows", valid, persistent=False)
            # WholeBody fine L3 ranks each group by its sparse + dense rows (6 + 68 / 42 / 6), padding row excluded,
            # and keeps visual tokens only (columns past the group's own lead). One pruning call serves the three
            # groups: rows padded to the longest lead (74) and masked; candidate columns start at the shortest
            # lead (12) and each group masks off the dense tokens ahead of its own visual ones. Buffers, not
            # per-call tensors, so the op's row check runs once and never syncs a GPU; the column mask is sliced
            # to the current width (a view).
            leads = [S + nd for nd in WHOLEBODY_DENSE_PER_GROUP]
            rows = torch.zeros(G, max(leads), dtype=torch.bool)
            cols = torch.zeros(G, cfg.num_patches + max(leads), dtype=torch.bool)
            for g, lead in enumerate(leads):
                rows[g, :lead] = True
                cols[g, lead - min(leads):] = True
            rows[0, 0] = False
            self.register_buffer("_wb_l3_rows", rows, persistent=False)
            self.register_buffer("_wb_l3_cols", cols, persistent=False)

    # -- pruning helpers ------------------------------------------------------------------------------------------
    def _prune(self, q, k, tokens, pos, keep, row_mask=None, gate_logits=None, col_mask=None):
        # The channel mask's gate goes in as the mask MLP's logits: the op takes the sigmoid of the kept rows only.
        return token_prune(q, k, tokens, pos, keep, self.scale, row_mask=row_mask, gate=gate_logits,
                           backend=self.backend, col_mask=col_mask, gate_logits=gate_logits is not None)

    # -- coarse encoder -------------------------------------------------------------------------------------------
    def coarse(self, x: Tensor, pos: Tensor, sparse_tokens: Tensor, keep_rates: Sequence[float]):
        """Coarse layers on [human | 256 visual] tokens. Returns (x, pos, qkv of the last layer, K)."""
        cfg = self.cfg
        H, n_img = cfg.heads, cfg.num_patches
        K = 1
        qkv = None
        for idx, (attn, ff) in enumerate(self.layers):
            if idx > 0:
                x[:, K:] += pos  # "sine-full": the PE is re-added at every layer, accumulating (in place, as upstream)
            x, qkv = attn(x.unsqueeze(1))
            x = x.squeeze(1)
            target = int(n_img * keep_rates[idx])
            if x.size(1) - K != target:
                # prune visual tokens by the softmax-pooled logits of the human token over the 8 heads
                q, k, _ = split_qkv(qkv, H)
                kept, kept_pos, _ = self._prune(q[:, :, :, :K], k[:, :, :, K:], x[:, None, K:], pos[:, None], target)
                x = torch.cat([x[:, :K], kept[:, 0]], dim=1)
                pos = kept_pos[:, 0]
            if idx == 3:
                # Human-2-Keypoint: every keypoint (and WholeBody part) token = human token + its embedding
                x = torch.cat([x[:, :1] + sparse_tokens, x[:, 1:]], dim=1)
                K = sparse_tokens.size(1)
            x = ff(x)
        return x, pos, qkv, K

    # -- fine entry: channel mask, grouping, pruning --------------------------------------------------------------
    def fine_entry(self, x: Tensor, pos: Tensor, qkv: Tensor, K: int, dense_tokens: Optional[Tensor],
                   keep_rate: float) -> Tuple[Tensor, Tensor]:
        cfg = self.cfg
        B, _, C = x.shape
        G, S, H, D = cfg.num_groups, cfg.num_sparse, cfg.heads, cfg.head_dim
        P = cfg.num_part_tokens
        body = x[:, P:K]
        # pad the head group with a copy of the nose token (masked everywhere in MHGA, dropped at the end)
        sparse = torch.cat([body[:, :1], body], dim=1).view(B, G, S, C)
        img = x[:, K:]
        n = img.size(1)
        # (B, G, n, C) channel-mask logits per group: group_mask without its final Sigmoid, which the pruning op
        # applies to the kept rows (or group_mask[-1] below, when nothing is pruned)
        logits = self.group_mask[:-1](img).view(B, n, G, C).transpose(1, 2)
        target = int(cfg.num_patches * keep_rate)
        q, k, _ = split_qkv(qkv, H)  # logits of the last coarse layer rank the visual tokens
        k_img = k[:, :, :, K:]
        if not cfg.wholebody:
            if n != target:
                q_rows = torch.cat([q.new_zeros(B, 1, H, 1, D), q[:, :, :, :K]], dim=3)  # dummy row in front
                q_rows = q_rows.view(B, H, G, S, D).transpose(1, 2)
                img_g, pos_g, _ = self._prune(q_rows, k_img, img[:, None], pos[:, None], target,
                                              row_mask=self._coco_rows, gate_logits=logits)
            else:
                gate = self.group_mask[-1](logits)
                img_g, pos_g = img[:, None] * gate, pos[:, None] * gate
            return torch.cat([sparse, img_g], dim=2), pos_g

        # WholeBody: rank per group by its part tokens + body keypoints, keep int(256*r) - N_dense visual tokens,
        # and put the group's dense tokens (part token + fine embedding, zero PE) in front of them.
        keeps = [target - nd for nd in WHOLEBODY_DENSE_PER_GROUP]
        q_rows = q[:, 0].index_select(2, self._wb_entry_index).view(B, H, G, -1, D).transpose(1, 2)
        img_g, pos_g, _ = self._prune(q_rows, k_img, img[:, None], pos[:, None], max(keeps),
                                      row_mask=self._wb_entry_rows, gate_logits=logits)
        part = x[:, :P]
        dense = [part[:, 0:1].expand(B, 68, C),
                 torch.cat([part[:, 1:2].expand(B, 21, C), part[:, 2:3].expand(B, 21, C)], 1),
                 torch.cat([part[:, 3:4].expand(B, 3, C), part[:, 4:5].expand(B, 3, C)], 1)]
        starts = (0, 68, 110)
        seqs, poss = [], []
        for g in range(G):
            nd = WHOLEBODY_DENSE_PER_GROUP[g]
            d_g = dense[g] + dense_tokens[:, starts[g]:starts[g] + nd]
            seqs.append(torch.cat([d_g, img_g[:, g, :keeps[g]]], dim=1))
            poss.append(torch.cat([torch.zeros_like(d_g), pos_g[:, g, :keeps[g]]], dim=1))
        return torch.cat([sparse, torch.stack(seqs, 1)], dim=2), torch.stack(poss, 1)

    # -- fine encoder ---------------------------------------------------------------------------------------------
    def fine(self, x: Tensor, pos: Tensor, keep_rates: Sequence[float]) -> Tensor:
        """Fine layers on (B, 3, 6 + dense + visual, C). Returns the keypoint features in output order."""
        cfg = self.cfg
        S, H = cfg.num_sparse, cfg.heads
        for idx, (attn, ff) in enumerate(self.group_layers):
            x[:, :, S:] += pos  # masked PE (zero for dense tokens), re-added at every fine layer
            x, qkv = attn(x)
            target = int(cfg.num_patches * keep_rates[idx])
            if x.size(2) - S != target:
                q, k, _ = split_qkv(qkv, H)
                if not cfg.wholebody:
                    kept, kept_pos, _ = self._prune(q[:, :, :, :S], k[:, :, :, S:], x[:, :, S:], pos, target,
                                                    row_mask=self._coco_rows)
                    x = torch.cat([x[:, :, :S], kept], dim=2)
                    pos = kept_pos
                else:
                    # Groups differ in their dense count (rows 6 + 68 / 42 / 6, keep target - dense): one call
                    # with row and column masks (see __init__) keeps max(keep) per group in descending score
                    # order; each group's first keep_g are exactly its own top keep_g.
                    R, first = self._wb_l3_rows.shape[1], S + min(WHOLEBODY_DENSE_PER_GROUP)
                    n_cols = x.size(2) - first
                    keeps = [target - nd for nd in WHOLEBODY_DENSE_PER_GROUP]
                    kept, kept_pos, _ = self._prune(q[:, :, :, :R], k[:, :, :, first:], x[:, :, first:],
                                                    pos[:, :, first - S:], max(keeps), row_mask=self._wb_l3_rows,
                                                    col_mask=self._wb_l3_cols[:, :n_cols])
                    xs, ps = [], []
                    for g, nd in enumerate(WHOLEBODY_DENSE_PER_GROUP):
                        xs.append(torch.cat([x[:, g, :S + nd], kept[:, g, :keeps[g]]], dim=1))
                        ps.append(torch.cat([pos[:, g, :nd], kept_pos[:, g, :keeps[g]]], dim=1))
                    x, pos = torch.stack(xs, 1), torch.stack(ps, 1)
            x = ff(x)
        body = x[:, :, :S].flatten(1, 2)[:, 1:]  # drop the padding token: COCO order
        if not cfg.wholebody:
            return body
        face, hands, feet = x[:, 0, S:S + 68], x[:, 1, S:S + 42], x[:, 2, S:S + 6]
        return torch.cat([body, feet, face, hands], dim=1)  # COCO-WholeBody order

    def forward(self, x: Tensor, pos: Tensor, sparse_tokens: Tensor, dense_tokens: Optional[Tensor],
                keep_rates: Sequence[float]) -> Tensor:
        n = self.cfg.depth // 2
        x, pos, qkv, K = self.coarse(x, pos, sparse_tokens, keep_rates[:n])
        x, pos = self.fine_entry(x, pos, qkv, K, dense_tokens, keep_rates[n])
        return self.fine(x, pos, keep_rates[n:])


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer + transformer ("features" in the official checkpoints) and the full model.

def sine_position_embedding(h: int, w: int, dim: int, temperature: float = 10000.0,
                            scale: float = 2 * math.pi) -> Tensor:
    """Fixed DETR-style 2-D sine PE (1, h*w, dim): [y-part | x-part], sin/cos interleaved, as TokenPose builds it."""
    area = torch.ones(1, h, w)
    y = area.cumsum(1, dtype=torch.float32)
    x = area.cumsum(2, dtype=torch.float32)
    eps = 1e-6
    y = y / (y[:, -1:, :] + eps) * scale
    x = x / (x[:, :, -1:] + eps) * scale
    half = dim // 2
    dim_t = torch.arange(half, dtype=torch.float32)
    dim_t = temperature ** (2 * (dim_t // 2) / half)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=4).flatten(3)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=4).flatten(3)
    return torch.cat((py, px), dim=3).permute(0, 3, 1, 2).flatten(2).permute(0, 2, 1).contiguous()


class GTPTFeatures(nn.Module):
    def __init__(self, cfg: GTPTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.human_token = nn.Parameter(torch.zeros(1, 1, d))
        self.keypoint_token = nn.Parameter(torch.zeros(1, 17, d))
        if cfg.wholebody:
            self.extra_token = nn.Parameter(torch.zeros(1, cfg.num_part_tokens, d))
            self.fine_keypoint_token = nn.Parameter(torch.zeros(1, cfg.num_dense, d))
        gh, gw = cfg.grid
        self.pos_embedding = nn.Parameter(sine_position_embedding(gh, gw, d), requires_grad=False)
        self.stem = ShuffleNetV2Stem(cfg.stem_channels) if cfg.stem == "one-stage" else UShapedShuffleNetV2Stem()
        self.patch2emb_norm = nn.BatchNorm2d(cfg.stem_channels, momentum=0.1)
        self.patch2emb_mlp = nn.Linear(cfg.patch_dim, d)
        self.transformer = Transformer(cfg)
        self.fast_inference = True

    def embed(self, images: Tensor) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Stem + patch embedding: ([human | 256 visual] tokens with PE added once, sparse tokens, dense tokens)."""
        cfg = self.cfg
        ph, pw = cfg.patch_size
        b = images.size(0)
        if fast_inference.fast_inference_active(self):
            x = fast_inference.fast_patch_embed(self, images)  # the same, BatchNorm folded, channels-last
        else:
            x = self.patch2emb_norm(self.stem(images))
            _, c, h, w = x.shape
            # 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)': 4x3 patches, channels fastest
            x = x.view(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // ph) * (w // pw),
                                                                                         ph * pw * c)
            x = self.patch2emb_mlp(x)
        x = x + self.pos_embedding
        x = torch.cat([self.human_token.expand(b, -1, -1), x], dim=1)
        sparse = self.keypoint_token
        dense = None
        if cfg.wholebody:
            sparse = torch.cat([self.extra_token, self.keypoint_token], dim=1)
            dense = self.fine_keypoint_token.expand(b, -1, -1)
        return x, sparse.expand(b, -1, -1), dense

    def encode(self, x: Tensor, sparse: Tensor, dense: Optional[Tensor], keep_rates: Sequence[float]) -> Tensor:
        pos = self.pos_embedding.expand(x.size(0), -1, -1)
        return self.transformer(x, pos, sparse, dense, keep_rates)


class TrainOutput(NamedTuple):
    """Training-mode outputs: the pruned (student) and unpruned (teacher) SimCC logits."""
    pred_x: Tensor
    pred_y: Tensor
    entire_pred_x: Tensor
    entire_pred_y: Tensor


class GTPT(nn.Module):
    """GTPT pose estimator on 256x192 person crops.

    * eval: ``model(images)`` -> ``(x_logits (B, K, 384), y_logits (B, K, 512))`` of the pruned path.
    * train: ``model(images)`` -> :class:`TrainOutput` with both passes (the stem runs once).
    """

    def __init__(self, cfg: GTPTConfig, backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.features = GTPTFeatures(cfg)
        bx, by = cfg.simcc_bins
        self.mlp_head_x = nn.Sequential(nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, bx))
        self.mlp_head_y = nn.Sequential(nn.LayerNorm(cfg.dim), nn.Linear(cfg.dim, by))
        self.lean_export = True
        self.set_backend(backend)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official from-scratch init: conv N(0, 0.001), BN (1, 0), Linear/LayerNorm PyTorch defaults, tokens
        trunc-normal std 0.02."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.001)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        f = self.features
        for name in ("human_token", "keypoint_token", "extra_token", "fine_keypoint_token"):
            if hasattr(f, name):
                nn.init.trunc_normal_(getattr(f, name), std=0.02, a=-2.0, b=2.0)

    # -- backend ---------------------------------------------------------------------------------------------------
    def set_backend(self, backend: Optional[str]) -> "GTPT":
        """Route every attention and pruning op to ``backend`` (``"auto"``, ``"reference"``, ``"triton"``; ``None``
        follows :func:`gtpt_kernels.set_backend` / the environment)."""
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
        self.backend = backend
        for m in self.modules():
            if isinstance(m, (Attention, Transformer)):
                m.backend = backend
        return self

    def set_fast_inference(self, enabled: bool = True) -> "GTPT":
        """Turn the fast eval path (:mod:`gtpt.fast_inference`: BatchNorm folded into the stem convolutions,
        channels-last stem, SDPA attention on CPU) on (the default) or off. Train mode never uses it."""
        for m in self.modules():
            if isinstance(m, (Attention, GTPTFeatures)):
                m.fast_inference = bool(enabled)
        if not enabled:
            fast_inference.clear_cache(self.features)
        return self

    def set_lean_export(self, enabled: bool = True) -> "GTPT":
        """Exporters (ONNX, ``torch.export``) trace the lean eval graph of :mod:`gtpt.export_graph` (on, the
        default) or the eager code (off). Same outputs either way up to float rounding; eager runs are unaffected."""
        self.lean_export = bool(enabled)
        return self

    def set_fast_training(self, enabled: bool = True) -> "GTPT":
        """Turn SDPA attention in train mode on CPU (backend "auto", no Triton interpreter) on (the default) or
        off; off, training runs the reference ops. Same values up to float rounding either way."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.fast_training = bool(enabled)
        return self

    def train(self, mode: bool = True) -> "GTPT":
        if mode:
            fast_inference.clear_cache(self.features)  # the folded stem weights are an eval-only cache
        return super().train(mode)

    # -- forward ---------------------------------------------------------------------------------------------------
    def _check_images(self, images: Tensor) -> None:
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if not images.is_floating_point():
            raise TypeError(f"images must be a float tensor (normalised RGB), got {images.dtype}")
        h, w = self.cfg.image_size
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[2:]) != (h, w):
            raise ValueError(f"images must have shape (B, 3, {h}, {w}), got {tuple(images.shape)}")
        p = next(self.parameters())
        if images.dtype != p.dtype:
            raise TypeError(f"images are {images.dtype} but the model is {p.dtype}; cast one to the other "
                            f"(or run under torch.autocast)")
        if images.device != p.device:
            raise ValueError(f"images are on {images.device} but the model is on {p.device}")

    def heads(self, kp: Tensor) -> Tuple[Tensor, Tensor]:
        return self.mlp_head_x(kp), self.mlp_head_y(kp)

    def forward(self, images: Tensor):
        self._check_images(images)
        if export_graph.export_graph_active(self, images):  # an exporter tracing eval mode on the reference ops
            return export_graph.export_forward(self, images)
        x, sparse, dense = self.features.embed(images)
        student = self.cfg.layer_keep_rates()
        kp = self.features.encode(x, sparse, dense, student)
        pred_x, pred_y = self.heads(kp)
        if not self.training:
            return pred_x, pred_y
        teacher = (1.0,) * len(student)
        kp_t = self.features.encode(x, sparse, dense, teacher)
        return TrainOutput(pred_x, pred_y, *self.heads(kp_t))

    @torch.no_grad()
    def predict(self, images: Tensor, keep_rates: Optional[Sequence[float]] = None) -> Tuple[Tensor, Tensor]:
        """SimCC logits of one path regardless of train/eval mode (``keep_rates`` = the 12 per-layer rates; default
        the pruned schedule; ``[1.0] * 12`` gives the unpruned path)."""
        self._check_images(images)
        rates = tuple(keep_rates) if keep_rates is not None else self.cfg.layer_keep_rates()
        if len(rates) != self.cfg.depth:
            raise ValueError(f"need {self.cfg.depth} keep rates, got {len(rates)}")
        for r in rates:
            if not 0.0 < float(r) <= 1.0:
                raise ValueError(f"keep rate must be in (0, 1], got {r}")
        x, sparse, dense = self.features.embed(images)
        return self.heads(self.features.encode(x, sparse, dense, rates))


def build_model(name: str = "gtpt-s", backend: str = "auto") -> GTPT:
    """Build a GTPT variant by name (``gtpt-t``, ``gtpt-s``, ``gtpt-b``, and ``-wholebody`` versions)."""
    return GTPT(get_config(name), backend=backend)


def num_trainable_parameters(model: nn.Module) -> int:
    """Trainable parameters (the frozen sine PE is excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
