"""MMCosine (ICASSP 2023): fused logits as a scaled sum of per-modality cosine similarities."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def cosine_logits(features: dict[str, Tensor], weights: dict[str, Tensor], scale: float) -> Tensor:
    """``scale * sum_m cos(x_m, W_m[k])``, shape (B, C), no bias.

    features: modality -> (B, d_m); weights: modality -> (C, d_m), modality m's slice of the concat head.
    A zero feature vector (a missing modality) has cosine 0 with every class."""
    if set(features) != set(weights):
        raise ValueError(f"cosine_logits: features have modalities {sorted(features)}, weights {sorted(weights)}")
    total = None
    for m, x in features.items():
        cos = F.normalize(x, dim=1) @ F.normalize(weights[m], dim=1).T
        total = cos if total is None else total + cos
    return scale * total
