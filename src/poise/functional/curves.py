"""Training diagnostics over epochs: Gradient-Blending's overfitting-to-generalisation ratio between
consecutive checkpoints (Wang et al., CVPR 2020) and the modality gap of features that share one space
(Liang et al., NeurIPS 2022).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def overfitting_to_generalization_ratio(train_before: float, val_before: float, train_after: float,
                                        val_after: float) -> float | None:
    """``|dO / dG|`` between two checkpoints of one head: ``O = L^V - L^T`` (validation minus train loss),
    ``dO = O_after - O_before``, ``dG = L^V_before - L^V_after``. None where it is undefined: a loss that is
    not finite, or ``dG = 0`` (the validation loss did not move)."""
    values = (train_before, val_before, train_after, val_after)
    if any(v is None or not math.isfinite(v) for v in values):
        return None
    d_g = val_before - val_after
    if d_g == 0:
        return None
    d_o = (val_after - train_after) - (val_before - train_before)
    return abs(d_o / d_g)


def overfitting_to_generalization_ratios(train_losses: Sequence[float], val_losses: Sequence[float]) -> list[float | None]:
    """Per epoch, the ratio between the previous epoch and this one (None for the first epoch, which has
    no previous checkpoint, and wherever :func:`overfitting_to_generalization_ratio` is undefined)."""
    if len(train_losses) != len(val_losses):
        raise ValueError(f"{len(train_losses)} train losses and {len(val_losses)} validation losses: one of each per epoch")
    out: list[float | None] = [None] if train_losses else []
    for n in range(1, len(train_losses)):
        out.append(overfitting_to_generalization_ratio(train_losses[n - 1], val_losses[n - 1], train_losses[n],
                                                       val_losses[n]))
    return out


def normalized_feature_sums(features: dict[str, Tensor], present: dict[str, Tensor] | None = None
                            ) -> tuple[Tensor, Tensor]:
    """(M, d) sums of the L2-normalised features of each modality over the samples that have it, and the
    (M,) counts of those samples, in the order of ``features``: summed over batches (and processes), they
    give the centroids of :func:`modality_gap`."""
    sums, counts = [], []
    for m, h in features.items():
        rows = torch.ones(h.shape[0], dtype=torch.bool, device=h.device) if present is None else present[m].bool()
        unit = F.normalize(h.detach().float(), dim=1)[rows]
        sums.append(unit.sum(0))
        counts.append(torch.tensor(float(unit.shape[0]), device=h.device))
    return torch.stack(sums), torch.stack(counts)


def centroid_gaps(sums: Tensor, counts: Tensor, names: Sequence[str]) -> dict[str, float]:
    """``"m-n" -> || c_m - c_n ||`` for every pair of modalities, ``c_m`` the mean of modality m's
    L2-normalised features (``sums[m] / counts[m]``); NaN for a pair where a modality has no sample."""
    gaps = {}
    for i, j in itertools.combinations(range(len(names)), 2):
        if counts[i] == 0 or counts[j] == 0:
            gaps[f"{names[i]}-{names[j]}"] = math.nan
            continue
        gap = sums[i] / counts[i] - sums[j] / counts[j]
        gaps[f"{names[i]}-{names[j]}"] = float(gap.norm())
    return gaps


def modality_gap(features: dict[str, Tensor], present: dict[str, Tensor] | None = None) -> dict[str, float]:
    """The modality gap of features that share one space: for every pair of modalities the Euclidean
    distance between the centroids of their L2-normalised features, each over the samples that have the
    modality. Keys ``"m-n"`` in the order of ``features``."""
    sums, counts = normalized_feature_sums(features, present)
    return centroid_gaps(sums, counts, list(features))


__all__ = [
    "centroid_gaps",
    "modality_gap",
    "normalized_feature_sums",
    "overfitting_to_generalization_ratio",
    "overfitting_to_generalization_ratios",
]
