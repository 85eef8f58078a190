"""AMCo (Zhou et al., ICASSP 2023, as BalanceBenchmark implements it): a random share of the dominant
modality's logit classes is masked before fusion; the share follows ``sin(pi/2 min(eps, l)/eps)``."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def amco_mask_fraction(level: float, eps: float = 0.3) -> float:
    """``p = sin(pi/2 * min(eps, level) / eps)``: the share of the dominant modality's classes masked at
    schedule level ``level`` (>= 0); 0 at level 0, 1 from level ``eps`` on."""
    if eps <= 0:
        raise ValueError(f"amco_mask_fraction: eps must be > 0, got {eps}")
    if level < 0:
        raise ValueError(f"amco_mask_fraction: level must be >= 0, got {level}")
    return math.sin(math.pi / 2 * min(eps, level) / eps)


def amco_class_mask(num_classes: int, fraction: float, generator: torch.Generator | None = None) -> Tensor:
    """(C,) float mask with ``int(fraction * C)`` zeros at random classes (drawn with ``generator``) and
    ones elsewhere."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"amco_class_mask: fraction must be in [0, 1], got {fraction}")
    masked = int(fraction * num_classes)
    mask = torch.ones(num_classes)
    if masked:
        mask[torch.randperm(num_classes, generator=generator)[:masked]] = 0.0
    return mask


def amco_softmax_mass(unimodal_logits: Tensor, present: Tensor | None = None) -> Tensor:
    """(B, M) per sample, the share of each modality in one softmax over the concatenated logits of the
    sample's modalities. ``unimodal_logits``: (B, M, C); ``present``: (B, M) bool (an absent modality takes
    no share: 0)."""
    b, m, c = unimodal_logits.shape
    logits = unimodal_logits.float()
    if present is not None:
        logits = logits.masked_fill(~present.bool().unsqueeze(2), float("-inf"))
    probs = torch.softmax(logits.reshape(b, m * c), dim=1).reshape(b, m, c)
    return torch.nan_to_num(probs.sum(dim=2), nan=0.0)
