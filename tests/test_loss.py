"""GlobalPerceivedLoss against a from-scratch fp64 evaluation of the official formula
(``KLDiscretGlobalPerceivedLoss``, shared/reference/gtpt-reference.md §6)."""
import math

import pytest
import torch

from gtpt.loss import GlobalPerceivedLoss, g2l_kl_loss, simcc_kl_loss
from gtpt.model import TrainOutput


def gaussian_targets(b, k, n, g, zero_rows=()):
    """Normalised 1-D Gaussians (sigma 4 bins) at random centres; the listed (b, k) rows all zero (WholeBody v<=0.5)."""
    mu = torch.rand(b, k, 1, generator=g, dtype=torch.float64) * n
    t = torch.exp(-(torch.arange(n, dtype=torch.float64) - mu) ** 2 / (2 * 4.0 ** 2))
    t = t / t.sum(-1, keepdim=True)
    for bi, ki in zero_rows:
        t[bi, ki] = 0
    return t.float()


def make_case(b=3, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = TrainOutput(torch.randn(b, k, 384, generator=g) * 3, torch.randn(b, k, 512, generator=g) * 3,
                      torch.randn(b, k, 384, generator=g) * 3, torch.randn(b, k, 512, generator=g) * 3)
    tx = gaussian_targets(b, k, 384, g, zero_rows=[(0, 1)])
    ty = gaussian_targets(b, k, 512, g, zero_rows=[(0, 1)])
    w = torch.rand(b, k, generator=g)
    w[1, k - 1] = 0.0
    return out, tx, ty, w


def kl_rows_fp64(p, log_q):
    """sum_bins p (log p - log q) / n_bins per row, with 0 log 0 = 0, by explicit loops in float64."""
    p, log_q = p.double(), log_q.double()
    out = torch.zeros(p.shape[:-1], dtype=torch.float64)
    n = p.shape[-1]
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in p.shape[:-1]]):
        i = tuple(idx.tolist())
        acc = 0.0
        for pv, lq in zip(p[i].tolist(), log_q[i].tolist()):
            if pv > 0:
                acc += pv * (math.log(pv) - lq)
        out[i] = acc / n
    return out


def official_formula_fp64(out, tx, ty, w, temperature=1.0):
    """(1/J) sum_j sum_axes [L_unpruned + L_pruned + L_G2L], each mean_b(w * KL_elem)."""
    parts = {"unpruned": 0.0, "pruned": 0.0, "g2l": 0.0}
    w = w.double()
    for pred, entire, target in ((out.pred_x, out.entire_pred_x, tx), (out.pred_y, out.entire_pred_y, ty)):
        pred, entire = pred.double(), entire.double()
        parts["unpruned"] += (kl_rows_fp64(target, torch.log_softmax(entire, -1)) * w).mean(0).sum().item()
        parts["pruned"] += (kl_rows_fp64(target, torch.log_softmax(pred, -1)) * w).mean(0).sum().item()
        teacher = torch.softmax(entire / temperature, -1)
        g2l = kl_rows_fp64(teacher, torch.log_softmax(pred / temperature, -1)) * temperature ** 2
        parts["g2l"] += (g2l * w).mean(0).sum().item()
    joints = tx.shape[1]
    return {k: v / joints for k, v in parts.items()}


def test_matches_fp64_official_formula():
    out, tx, ty, w = make_case()
    total, parts = GlobalPerceivedLoss()(out, tx, ty, w, return_parts=True)
    expect = official_formula_fp64(out, tx, ty, w)
    assert total.dtype == torch.float32 and total.dim() == 0
    for k in GlobalPerceivedLoss.PARTS:
        assert parts[k].item() == pytest.approx(expect[k], rel=2e-5, abs=1e-9), k
    assert total.item() == pytest.approx(sum(expect.values()), rel=2e-5)
    # the four-tensor tuple and the official (B, K, 1) weight layout give the same number
    assert torch.equal(GlobalPerceivedLoss()(tuple(out), tx, ty, w[..., None]), total)


def test_simcc_kl_is_per_joint_batch_mean_of_bin_mean():
    out, tx, _, w = make_case(b=2, k=3, seed=1)
    per_joint = simcc_kl_loss(out.pred_x, tx, w)
    expect = (kl_rows_fp64(tx, torch.log_softmax(out.pred_x.double(), -1)) * w.double()).mean(0)
    assert per_joint.shape == (3,)
    torch.testing.assert_close(per_joint.double(), expect, rtol=2e-5, atol=1e-9)


def test_temperature_scales_by_t_squared():
    out, _, _, w = make_case(b=2, k=2, seed=2)
    t = 2.0
    got = g2l_kl_loss(out.pred_x, out.entire_pred_x, w, temperature=t)
    teacher = torch.softmax(out.entire_pred_x.double() / t, -1)
    expect = (kl_rows_fp64(teacher, torch.log_softmax(out.pred_x.double() / t, -1)) * t * t * w.double()).mean(0)
    torch.testing.assert_close(got.double(), expect, rtol=2e-5, atol=1e-9)
    # the official T = 1 is the default, and identical passes distil nothing
    assert GlobalPerceivedLoss().temperature == 1.0
    assert g2l_kl_loss(out.pred_x, out.pred_x.clone(), w).abs().max().item() < 1e-7


def test_target_weight_scales_every_term_and_zero_weight_is_zero():
    out, tx, ty, w = make_case(seed=3)
    loss = GlobalPerceivedLoss()
    base, parts = loss(out, tx, ty, w, return_parts=True)
    double, parts2 = loss(out, tx, ty, 2 * w, return_parts=True)
    for k in parts:
        torch.testing.assert_close(parts2[k], 2 * parts[k])  # G2L is weighted too (no distillation on w = 0)
    # zero weights: zero loss, zero (not NaN) gradients
    logits = [t.clone().requires_grad_(True) for t in out]
    zero = loss(TrainOutput(*logits), tx, ty, torch.zeros_like(w))
    zero.backward()
    assert zero.item() == 0.0
    assert all(torch.equal(t.grad, torch.zeros_like(t)) for t in logits)


def test_all_zero_targets_are_finite():
    """A WholeBody joint with visibility <= 0.5 has weight v but an all-zero target: its KL terms are 0, not NaN."""
    out, tx, ty, w = make_case(seed=4)
    logits = [t.clone().requires_grad_(True) for t in out]
    total, parts = GlobalPerceivedLoss()(TrainOutput(*logits), torch.zeros_like(tx), torch.zeros_like(ty), w,
                                         return_parts=True)
    total.backward()
    assert parts["unpruned"].item() == 0.0 and parts["pruned"].item() == 0.0
    assert torch.isfinite(total) and parts["g2l"].item() > 0
    assert all(torch.isfinite(t.grad).all() for t in logits)


def test_g2l_gradient_does_not_reach_the_teacher():
    out, tx, ty, w = make_case(seed=5)
    logits = [t.clone().requires_grad_(True) for t in out]
    GlobalPerceivedLoss()(TrainOutput(*logits), tx, ty, w).backward()
    # the unpruned logits' gradient is exactly that of L_unpruned alone
    ex = out.entire_pred_x.clone().requires_grad_(True)
    ey = out.entire_pred_y.clone().requires_grad_(True)
    ((simcc_kl_loss(ex, tx, w) + simcc_kl_loss(ey, ty, w)).mean()).backward()
    torch.testing.assert_close(logits[2].grad, ex.grad, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(logits[3].grad, ey.grad, rtol=1e-6, atol=1e-12)
    # the pruned logits get L_pruned + L_G2L
    px = out.pred_x.clone().requires_grad_(True)
    ((simcc_kl_loss(px, tx, w) + g2l_kl_loss(px, out.entire_pred_x, w)).mean()).backward()
    torch.testing.assert_close(logits[0].grad, px.grad, rtol=1e-6, atol=1e-12)


def test_bf16_logits_under_autocast_are_computed_in_fp32():
    out, tx, ty, w = make_case(seed=6)
    half = TrainOutput(*[t.bfloat16() for t in out])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        total = GlobalPerceivedLoss()(half, tx, ty, w)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert torch.equal(total, GlobalPerceivedLoss()(TrainOutput(*[t.float() for t in half]), tx, ty, w))


def test_shape_and_type_errors_are_clear():
    out, tx, ty, w = make_case(b=2, k=3, seed=7)
    loss = GlobalPerceivedLoss()
    with pytest.raises(ValueError, match="target shape"):
        loss(out, tx[:, :2], ty, w)
    with pytest.raises(ValueError, match="target_weight"):
        loss(out, tx, ty, w[:, :2])
    with pytest.raises(ValueError, match="pruned and unpruned"):
        loss(TrainOutput(out.pred_x, out.pred_y, out.entire_pred_x[:, :2], out.entire_pred_y), tx, ty, w)
    with pytest.raises(ValueError, match=r"\(batch, joints, bins\)"):
        simcc_kl_loss(out.pred_x[0], tx[0], w)
    with pytest.raises(TypeError, match="model.train"):
        loss((out.pred_x, out.pred_y), tx, ty, w)  # eval-mode outputs
    with pytest.raises(ValueError, match="temperature"):
        GlobalPerceivedLoss(temperature=0.0)
