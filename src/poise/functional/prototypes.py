"""PMR (CVPR 2023): class prototypes per modality and the prototypical cross-entropy."""

from __future__ import annotations

import torch
from torch import Tensor


def prototype_logits(features: Tensor, prototypes: Tensor) -> Tensor:
    """``-||z_i - c_k||_2``: features (B, d), prototypes (C, d) -> (B, C)."""
    diff = features.float().unsqueeze(1) - prototypes.float().unsqueeze(0)
    # the plain norm of the difference (cdist's matrix-product path loses precision for close points);
    # the floor keeps the gradient finite where a feature sits on a prototype
    return -diff.pow(2).sum(-1).clamp_min(1e-12).sqrt()


def class_feature_sums(features: Tensor, labels: Tensor, num_classes: int,
                       rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-class sums (C, d) and counts (C,) of ``features`` over the selected rows (all when None)."""
    features = features.float()
    if rows is not None:
        features, labels = features[rows], labels[rows]
    sums = torch.zeros(num_classes, features.shape[1], device=features.device)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=num_classes).to(features.device, torch.float32)
    return sums, counts


def update_prototypes(previous: Tensor | None, sums: Tensor, counts: Tensor, momentum: float) -> Tensor:
    """``c <- (1 - mu) c_new + mu c_old`` with ``c_new`` the class means; a class with no sample keeps
    its old prototype (zero when there is none yet)."""
    new = sums / counts.clamp_min(1).unsqueeze(1)
    if previous is None:
        return new
    seen = (counts > 0).unsqueeze(1)
    return torch.where(seen, (1 - momentum) * new + momentum * previous, previous)


def prototype_entropy(features: Tensor, prototypes: Tensor) -> Tensor:
    """Mean entropy of ``softmax(prototype_logits)``: PMR's prototypical entropy regularisation term."""
    log_p = torch.log_softmax(prototype_logits(features, prototypes), dim=1)
    return -(log_p.exp() * log_p).sum(1).mean()
