"""Test oracle: the official GTPT transformer forward, restated step by step in its own style.

An independent second implementation of ``Transformer.forward`` of github.com/haonanwang0522/GTPT
(``lib/models/pose_gtpt_{s}_{human,wholebody}.py``) as ``shared/reference/gtpt-reference.md`` and the official code
describe it: materialised repeated shared keys, the fixed boolean mask filled with ``-finfo.max`` (so the
padding query row gets a uniform softmax), ``-1e5`` padding logits at the fine entry, ``topk(sorted=False)``,
full ``argsort`` at the WholeBody fine entry, in-place PE adds. It borrows only the weights of our modules.
"""
import torch


def _softmax_pool(x, dim):
    w = x.softmax(dim)
    return (x * w).sum(dim)


def _attention(layer, x):
    """Official ``Attention`` (coarse): returns (x + out, scaled logits)."""
    pre = layer[0].fn
    a = pre.fn
    h = a.heads
    y = pre.norm(x)
    q, k, v = a.to_qkv(y).chunk(3, dim=-1)
    b, n, c = q.shape
    q, k, v = (t.reshape(b, n, h, c // h).permute(0, 2, 1, 3) for t in (q, k, v))
    dots = torch.einsum("bhid,bhjd->bhij", q, k) * c ** -0.5  # dim^-0.5, not head_dim^-0.5
    out = torch.einsum("bhij,bhjd->bhid", dots.softmax(-1), v).permute(0, 2, 1, 3).reshape(b, n, c)
    return a.to_out(out) + x, dots


def _group_attention(layer, x):
    """Official ``GroupAttention`` with its fixed mask buffer semantics."""
    pre = layer[0].fn
    a = pre.fn
    B, G, N, C = x.shape
    H, K = a.heads, 6
    y = pre.norm(x)
    q, k, v = a.to_qkv(y).chunk(3, dim=-1)
    q, k, v = (t.reshape(B, G, N, H, C // H).permute(0, 3, 1, 2, 4) for t in (q, k, v))  # b h g n d
    k_kp = k[:, :, :, :K].flatten(2, 3).unsqueeze(2).repeat(1, 1, G, 1, 1)
    v_kp = v[:, :, :, :K].flatten(2, 3).unsqueeze(2).repeat(1, 1, G, 1, 1)
    k = torch.cat([k_kp, k[:, :, :, K:]], 3)
    v = torch.cat([v_kp, v[:, :, :, K:]], 3)
    dots = torch.einsum("bhgid,bhgjd->bhgij", q, k) * C ** -0.5
    mask_q = torch.ones(1, H, 3, N, dtype=torch.bool)
    mask_q[:, :, 0, 0] = 0
    mask_k = torch.ones(1, H, 3, k.size(3), dtype=torch.bool)
    mask_k[:, :, :, 0] = 0
    mask = ~(mask_q[..., None] * mask_k[:, :, :, None, :])
    dots.masked_fill_(mask.repeat(B, 1, 1, 1, 1), -torch.finfo(dots.dtype).max)
    out = torch.einsum("bhgij,bhgjd->bhgid", dots.softmax(-1), v).permute(0, 2, 3, 1, 4).reshape(B, G, N, C)
    return a.to_out(out) + x, dots


def official_forward(model, img, keep_rate):
    """SimCC logits of ``model``'s weights run through the official forward with per-block ``keep_rate`` (4)."""
    f = model.features
    tr = f.transformer
    wb = model.cfg.num_keypoints == 133
    rates = [keep_rate[i] for i in range(4) for _ in range(3)]
    # --- TokenPose_S_base.forward
    x = f.patch2emb_norm(f.stem(img))
    b, c, hh, ww = x.shape
    x = x.reshape(b, c, hh // 4, 4, ww // 3, 3).permute(0, 2, 4, 3, 5, 1).reshape(b, -1, 12 * c)
    x = f.patch2emb_mlp(x)
    x += f.pos_embedding[:, : x.size(1)]
    x = torch.cat([f.human_token.repeat(b, 1, 1), x], 1)
    if wb:
        sparse = torch.cat([f.extra_token, f.keypoint_token], 1).repeat(b, 1, 1)
        dense = f.fine_keypoint_token.repeat(b, 1, 1)
    else:
        sparse = f.keypoint_token.repeat(b, 1, 1)
    # --- Transformer.forward
    K = 1
    B, N, C = x.shape
    N_img = N - K
    pos = f.pos_embedding.repeat(B, 1, 1)
    for idx, layer in enumerate(tr.layers):
        if idx > 0:
            x[:, K:] += pos
        x, logit = _attention(layer, x)
        now, tgt = x.size(1) - K, int(N_img * rates[idx])
        if now != tgt:
            score = _softmax_pool(logit[:, :, :K, K:].flatten(1, 2), 1)
            _, si = score.topk(tgt, dim=1)
            img_t = torch.gather(x[:, K:], 1, si[..., None].repeat(1, 1, C))
            pos = torch.gather(pos, 1, si[..., None].repeat(1, 1, C))
            x = torch.cat([x[:, :K], img_t], 1)
        if idx == 3:
            x = torch.cat([x[:, :1] + sparse, x[:, 1:]], 1)
            K = sparse.size(1)
        x = layer[1](x)
    if not wb:
        kp, img_t = x[:, :K], x[:, K:]
    else:
        part, kp, img_t = x[:, :5], x[:, 5:K], x[:, K:]
    kp = torch.cat([kp[:, :1].clone(), kp], 1).reshape(B, 3, 6, C)
    cm = tr.group_mask(img_t).reshape(B, img_t.size(1), 3, C).permute(0, 2, 1, 3)
    img_t = img_t[:, None].repeat(1, 3, 1, 1) * cm
    pos = pos[:, None].repeat(1, 3, 1, 1) * cm
    now, tgt = img_t.size(2), int(N_img * rates[6])
    if not wb:
        if now != tgt:
            al = logit[:, :, :K, K:]
            ga = torch.cat([-1e5 * torch.ones_like(al[:, :, :1]), al], 2)  # b h 18 n
            H = ga.size(1)
            ga = ga.reshape(B, H, 3, 6, now).permute(0, 2, 1, 3, 4).reshape(B, 3, H * 6, now)
            _, si = _softmax_pool(ga, 2).topk(tgt, dim=2, largest=True, sorted=False)
            img_t = torch.gather(img_t, 2, si[..., None].repeat(1, 1, 1, C))
            pos = torch.gather(pos, 2, si[..., None].repeat(1, 1, 1, C))
    else:
        pa, ka = logit[:, :, 0:5, K:], logit[:, :, 5:K, K:]
        ga = [torch.cat([pa[:, :, 0:1], ka[:, :, 0:5]], 2), torch.cat([pa[:, :, 1:3], ka[:, :, 5:11]], 2),
              torch.cat([pa[:, :, 3:5], ka[:, :, 11:17]], 2)]
        score = torch.stack([_softmax_pool(a.flatten(1, 2), 1) for a in ga], 1)
        si = torch.argsort(score, dim=2, descending=True)
        img_t = torch.gather(img_t, 2, si[..., None].repeat(1, 1, 1, C))
        pos = torch.gather(pos, 2, si[..., None].repeat(1, 1, 1, C))
        d = now - tgt
        pf = part[:, 0:1].repeat(1, 68, 1) + dense[:, 0:68]
        pu = torch.cat([part[:, 1:2].repeat(1, 21, 1), part[:, 2:3].repeat(1, 21, 1)], 1) + dense[:, 68:110]
        pl = torch.cat([part[:, 3:4].repeat(1, 3, 1), part[:, 4:5].repeat(1, 3, 1)], 1) + dense[:, 110:116]
        img_t = torch.stack([torch.cat([pf, img_t[:, 0, :-68 - d]], 1), torch.cat([pu, img_t[:, 1, :-42 - d]], 1),
                             torch.cat([pl, img_t[:, 2, :-6 - d]], 1)], 1)
        pos = torch.stack([torch.cat([torch.zeros_like(pf), pos[:, 0, :-68 - d]], 1),
                           torch.cat([torch.zeros_like(pu), pos[:, 1, :-42 - d]], 1),
                           torch.cat([torch.zeros_like(pl), pos[:, 2, :-6 - d]], 1)], 1)
    x = torch.cat([kp, img_t], 2)
    K = 6
    for idx, layer in enumerate(tr.group_layers):
        x[:, :, K:] += pos
        x, logit = _group_attention(layer, x)
        now, tgt = x.size(2) - K, int(N_img * rates[idx + 6])
        if now != tgt:
            if not wb:
                ga = logit[:, :, :, :K, 3 * K:].permute(0, 2, 1, 3, 4).flatten(2, 3)
                _, si = _softmax_pool(ga, 2).topk(tgt, dim=2, largest=True, sorted=False)
                img_t = torch.gather(x[:, :, K:], 2, si[..., None].repeat(1, 1, 1, C))
                pos = torch.gather(pos, 2, si[..., None].repeat(1, 1, 1, C))
                x = torch.cat([x[:, :, :K], img_t], 2)
            else:
                gx, gp = [], []
                for g, nd in enumerate((68, 42, 6)):
                    ga = logit[:, :, g, :K + nd, 3 * K + nd:]
                    _, si = _softmax_pool(ga.flatten(1, 2), 1).topk(tgt - nd, dim=1)
                    gx.append(torch.cat([x[:, g, :K + nd],
                                         torch.gather(x[:, g, K + nd:], 1, si[..., None].repeat(1, 1, C))], 1))
                    gp.append(torch.cat([pos[:, g, :nd],
                                         torch.gather(pos[:, g, nd:], 1, si[..., None].repeat(1, 1, C))], 1))
                x, pos = torch.stack(gx, 1), torch.stack(gp, 1)
        x = layer[1](x)
    out = x[:, :, :K].flatten(1, 2)[:, 1:]
    if wb:
        out = torch.cat([out, x[:, 2, K:K + 6], x[:, 0, K:K + 68], x[:, 1, K:K + 42]], 1)
    return model.mlp_head_x(out), model.mlp_head_y(out)
