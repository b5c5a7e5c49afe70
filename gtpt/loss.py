"""GTPT's training loss: SimCC KL on both passes plus the global-perceived distillation (G2L).

Follows the official ``lib/core/loss.py: KLDiscretGlobalPerceivedLoss`` (github.com/haonanwang0522/GTPT @ f3a6068)
reduction for reduction, as ``shared/reference/gtpt-reference.md`` §6 states it:

    per joint j, axis a, sample b:  KL_elem = sum_bins p * (log p - log q) / n_bins      (KLDivLoss 'none', .mean(1))
    L_a,j = mean_b(target_weight[b, j] * KL_elem)
    total = (1/J) * sum_j sum_{a in x,y} (L_unpruned + L_pruned + L_G2L)

L_unpruned = KL(target || softmax(entire_pred)), L_pruned = KL(target || softmax(pred)),
L_G2L = T^2 * KL(softmax(entire_pred.detach() / T) || softmax(pred / T)) with T = 1, also weighted by target_weight.
The official loop runs per joint; here every joint is reduced at once (same sums, one kernel per term). Everything
is computed in fp32 whatever dtype the logits come in (bf16/fp16 under autocast).
"""
from __future__ import annotations

from typing import Dict, Sequence, Tuple, Union

import torch.nn.functional as F
from torch import Tensor, nn

from .model import TrainOutput

__all__ = ["simcc_kl_loss", "g2l_kl_loss", "GlobalPerceivedLoss"]


def _check(name: str, logits: Tensor, other: Tensor, other_name: str, target_weight: Tensor) -> Tensor:
    """Validate (B, K, N) logits against a same-shaped tensor and (B, K) / (B, K, 1) weights; returns (B, K) fp32
    weights."""
    for n, t in ((name, logits), (other_name, other), ("target_weight", target_weight)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{n} must be a torch.Tensor, got {type(t).__name__}")
    if logits.dim() != 3:
        raise ValueError(f"{name} must be (batch, joints, bins), got shape {tuple(logits.shape)}")
    if other.shape != logits.shape:
        raise ValueError(f"{other_name} shape {tuple(other.shape)} does not match {name} shape {tuple(logits.shape)}")
    w = target_weight
    if w.dim() == 3 and w.shape[-1] == 1:  # the official (B, K, 1) layout
        w = w.squeeze(-1)
    if w.shape != logits.shape[:2]:
        raise ValueError(f"target_weight must be (batch, joints) = {tuple(logits.shape[:2])} or that with a "
                         f"trailing 1, got {tuple(target_weight.shape)}")
    return w.float()


def simcc_kl_loss(logits: Tensor, target: Tensor, target_weight: Tensor) -> Tensor:
    """Per-joint SimCC KL loss, shape (K,): mean over the batch of target_weight * mean over bins of
    ``KLDivLoss(reduction='none')(log_softmax(logits), target)`` (official ``KLDiscretLoss.criterion``).

    ``target`` is a distribution over the bins (the normalised 1-D Gaussian); all-zero rows give zero loss.
    """
    w = _check("logits", logits, target, "target", target_weight)
    kl = F.kl_div(F.log_softmax(logits.float(), dim=-1), target.float(), reduction="none").mean(-1)
    return (kl * w).mean(0)


def g2l_kl_loss(pred: Tensor, teacher: Tensor, target_weight: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-joint global-to-local distillation, shape (K,): T^2 * KL(softmax(teacher/T) || softmax(pred/T)) with the
    same bin mean, weighting and batch mean as :func:`simcc_kl_loss`. The teacher (unpruned pass) is detached, as in
    the official ``criterion(..., log_target=True)`` call, so this term only trains the pruned pass."""
    w = _check("pred", pred, teacher, "teacher", target_weight)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    log_q = F.log_softmax(pred.float() / t, dim=-1)
    log_p = F.log_softmax(teacher.detach().float() / t, dim=-1)
    kl = F.kl_div(log_q, log_p, reduction="none", log_target=True).mean(-1) * (t * t)
    return (kl * w).mean(0)


class GlobalPerceivedLoss(nn.Module):
    """The official ``KLDiscretGlobalPerceivedLoss`` (all three terms weight 1, T = 1).

    ``forward(outputs, target_x, target_y, target_weight)`` with ``outputs`` a :class:`~gtpt.model.TrainOutput` or the
    tuple ``(pred_x, pred_y, entire_pred_x, entire_pred_y)``; logits (B, K, 384) / (B, K, 512), targets of the same
    shapes, weights (B, K). Returns the scalar total; with ``return_parts=True`` also a dict of the three terms
    (detached, each already divided by K, so they sum to the total) for logging.
    """

    PARTS = ("unpruned", "pruned", "g2l")

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(self, outputs: Union[TrainOutput, Sequence[Tensor]], target_x: Tensor, target_y: Tensor,
                target_weight: Tensor, return_parts: bool = False
                ) -> Union[Tensor, Tuple[Tensor, Dict[str, Tensor]]]:
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 4:
            raise TypeError("outputs must be a TrainOutput or (pred_x, pred_y, entire_pred_x, entire_pred_y); got "
                            f"{type(outputs).__name__}" + (f" of length {len(outputs)}"
                                                            if isinstance(outputs, (tuple, list)) else "")
                            + " (eval-mode outputs have only the pruned pass: call model.train())")
        pred_x, pred_y, entire_x, entire_y = outputs
        if pred_x.shape != entire_x.shape or pred_y.shape != entire_y.shape:
            raise ValueError(f"pruned and unpruned logits differ in shape: x {tuple(pred_x.shape)} vs "
                             f"{tuple(entire_x.shape)}, y {tuple(pred_y.shape)} vs {tuple(entire_y.shape)}")
        if pred_x.shape[:2] != pred_y.shape[:2]:
            raise ValueError(f"x and y logits disagree on (batch, joints): {tuple(pred_x.shape[:2])} vs "
                             f"{tuple(pred_y.shape[:2])}")
        per_joint = {
            "unpruned": (simcc_kl_loss(entire_x, target_x, target_weight)
                         + simcc_kl_loss(entire_y, target_y, target_weight)),
            "pruned": simcc_kl_loss(pred_x, target_x, target_weight) + simcc_kl_loss(pred_y, target_y, target_weight),
            "g2l": (g2l_kl_loss(pred_x, entire_x, target_weight, self.temperature)
                    + g2l_kl_loss(pred_y, entire_y, target_weight, self.temperature)),
        }
        parts = {k: v.mean() for k, v in per_joint.items()}  # (1/J) * sum over joints
        total = parts["unpruned"] + parts["pruned"] + parts["g2l"]
        if return_parts:
            return total, {k: v.detach() for k, v in parts.items()}
        return total
