"""Loss pieces several methods share."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def present_cross_entropy(logits: Tensor, labels: Tensor, rows: Tensor) -> Tensor:
    """Cross-entropy averaged over the rows that have the modality (``rows``: (B,) 0/1 or bool; 0 when none
    has it), computed in float32 and without a host synchronisation."""
    rows = rows.float()
    per_sample = F.cross_entropy(logits.float(), labels, reduction="none")
    return (per_sample * rows).sum() / rows.sum().clamp_min(1)


__all__ = ["present_cross_entropy"]
