"""Unimodal teachers and ensembles: feature distillation (UMT) and ensemble fusion (UME), Du et al. ICML 2023."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor


def feature_distillation_losses(
    features: dict[str, Tensor], teacher_features: dict[str, Tensor], present: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """``MSE(h_m, t_m)`` per modality: the mean squared difference over the samples that have the modality
    and over the feature dimensions. ``present`` maps a modality to its (B,) bool mask (default: every
    sample); a modality no sample of the batch has gives a zero that keeps the graph."""
    losses = {}
    for m, h in features.items():
        t = teacher_features[m].detach()
        rows = present[m] if present is not None else None
        if rows is not None and not bool(rows.all()):
            if not bool(rows.any()):
                losses[m] = h.sum() * 0.0
                continue
            h, t = h[rows], t[rows]
        losses[m] = torch.nn.functional.mse_loss(h.float(), t.float())
    return losses


def ensemble_logits(
    unimodal_logits: dict[str, Tensor], present: Tensor | None = None, combine: Literal["logits", "probs"] = "logits"
) -> Tensor:
    """The prediction of an ensemble of unimodal models, over the modalities each sample has.

    ``logits``: the mean of the members' logits. ``probs``: ``log`` of the mean of their softmax
    probabilities (a log-probability, so cross-entropy on it is the ensemble's likelihood). The mean and
    the sum give the same class for every sample; the mean keeps one model's scale. ``present`` is (B, M)
    with columns in the order of ``unimodal_logits``; a sample without any modality uses all of them
    (their inputs are zero-filled, so this is the members' prior).
    """
    stacked = torch.stack([z.float() for z in unimodal_logits.values()], dim=1)  # (B, M, C)
    if present is None:
        mask = torch.ones(stacked.shape[:2], dtype=torch.bool, device=stacked.device)
    else:
        mask = present.bool() | ~present.bool().any(dim=1, keepdim=True)
    count = mask.sum(dim=1, keepdim=True).to(stacked.dtype)  # (B, 1), >= 1
    if combine == "logits":
        return (stacked * mask.unsqueeze(2).to(stacked.dtype)).sum(dim=1) / count
    if combine == "probs":
        log_probs = torch.log_softmax(stacked, dim=2).masked_fill(~mask.unsqueeze(2), float("-inf"))
        return torch.logsumexp(log_probs, dim=1) - count.log()
    raise ValueError(f"combine must be 'logits' or 'probs', got {combine!r}")
