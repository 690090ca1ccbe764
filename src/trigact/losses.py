"""The dual-branch loss of trigger activation: ``CE(z_pos, y) + w * L_KLD(z_neg, 1/C * 1_C)``.

The paper writes the second term as ``L_KLD(z_neg, 1/C * 1_C)`` without fixing its direction.

- ``kl_direction='uniform_to_pred'`` (default): KL(U || p) = sum_c u_c (log u_c - log p_c), which is
  PyTorch's ``F.kl_div(log_softmax(z_neg), u, reduction='batchmean')`` -- the literal PyTorch reading
  of ``L_KLD(input=z_neg, target=uniform)``. It equals the cross-entropy to the uniform label minus
  log C, so it pushes every class's probability up (mass-covering).
- ``kl_direction='pred_to_uniform'``: KL(p || U) = sum_c p_c (log p_c - log u_c) = log C - H(p), the
  negative entropy of the prediction (up to log C); it is zero exactly when p is uniform, like the other.

The two differ in how hard they push a confident clean prediction back. With p = softmax(z) and H(p)
the entropy, per image:

- d KL(U || p) / dz = p - U, which stays of order one as p becomes peaked (it tends to e_top - U);
- d KL(p || U) / dz_k = p_k (log p_k + H(p)), which goes to 0 as p becomes peaked (every term does:
  p_k -> 1 with log p_k + H -> 0, or p_k log p_k -> 0), so ``pred_to_uniform`` barely corrects a clean
  prediction that is already confident.

Both are averaged over the batch and are 0 iff the clean prediction is uniform.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from trigact.common.errors import unknown_name

KL_DIRECTIONS = ("uniform_to_pred", "pred_to_uniform")


def kl_to_uniform(logits: torch.Tensor, direction: str = "uniform_to_pred") -> torch.Tensor:
    """Batch-mean KL divergence between the softmax of ``logits`` and the uniform distribution."""
    log_p = F.log_softmax(logits, dim=1)
    num_classes = logits.shape[1]
    if direction == "uniform_to_pred":
        uniform = torch.full_like(log_p, 1.0 / num_classes)
        return F.kl_div(log_p, uniform, reduction="batchmean")
    if direction == "pred_to_uniform":
        return (log_p.exp() * (log_p + math.log(num_classes))).sum(dim=1).mean()
    raise unknown_name("kl_direction", direction, KL_DIRECTIONS)


class DualLoss(NamedTuple):
    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


def trigger_activation_loss(
    logits_pos: torch.Tensor,
    logits_neg: torch.Tensor,
    target: torch.Tensor,
    kl_weight: float = 1.0,
    kl_direction: str = "uniform_to_pred",
) -> DualLoss:
    """``CE(z_pos, y) + kl_weight * KL(z_neg vs uniform)``: correct with the trigger, uniform without."""
    ce = F.cross_entropy(logits_pos, target)
    kl = kl_to_uniform(logits_neg, kl_direction)
    return DualLoss(ce + kl_weight * kl, ce, kl)
