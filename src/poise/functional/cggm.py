"""CGGM (Guo et al., NeurIPS 2024, "Classifier-guided Gradient Modulation"): auxiliary per-modality
classifiers measure how fast each modality improves; encoder gradients are scaled by the others' share of
the improvement, and a direction term pulls the fused head's gradient towards each classifier's."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def cggm_coefficients(improvement: Tensor, eps: float = 1e-8) -> Tensor:
    """``c_m = (sum_k d_k - d_m) / (sum_k d_k + eps)`` from the (M,) accuracy changes ``d`` of the auxiliary
    classifiers since the previous step: a modality that improved less than the others gets a larger
    coefficient. ``eps`` is the released 1e-8."""
    total = improvement.sum()
    return (total - improvement) / (total + eps)


def head_weight_gradient(logits: Tensor, labels: Tensor, features: Tensor, rows: Tensor | None = None) -> Tensor:
    """The gradient (C, d) of the mean cross-entropy of ``logits`` (B, C) on the weight ``W`` of a linear
    map whose output ``features @ W.T`` enters ``logits`` additively: ``(softmax(logits) - onehot(y)).T @ features / n``
    over the ``rows`` (B,) bool (None: all). Differentiable in ``logits`` and ``features``."""
    residual = torch.softmax(logits.float(), dim=1) - F.one_hot(labels, logits.shape[1]).float()
    h = features.float()
    if rows is not None:
        keep = rows.float().unsqueeze(1)
        residual, h = residual * keep, h * keep
        n = rows.float().sum().clamp_min(1)
    else:
        n = torch.tensor(float(len(labels)), device=logits.device)
    return residual.T @ h / n


def gradient_cosines(classifier_grads: list[Tensor], fused_grads: list[Tensor]) -> Tensor:
    """(M,) cosine similarity of each flattened pair; 0 for a pair with a zero vector."""
    out = [F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0, eps=1e-12)
           for a, b in zip(classifier_grads, fused_grads)]
    return torch.stack(out)


def cggm_direction_loss(coefficients: Tensor, cosines: Tensor) -> Tensor:
    """``L_gm = (sum_m |c_m| - sum_m c_m cos_m) / M``: zero when every fused-head gradient points where the
    corresponding classifier's does; a modality with a larger coefficient weighs more."""
    return (coefficients.abs().sum() - (coefficients * cosines).sum()) / len(coefficients)


__all__ = ["cggm_coefficients", "cggm_direction_loss", "gradient_cosines", "head_weight_gradient"]
