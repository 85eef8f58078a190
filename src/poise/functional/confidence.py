"""Per-modality confidence: the score that OGM-GE uses to measure imbalance, logged for every method."""

from __future__ import annotations

import torch
from torch import Tensor


def confidence_scores(
    unimodal_logits: dict[str, Tensor], labels: Tensor, present: Tensor | None = None, reduce: bool = False
) -> dict[str, Tensor]:
    """``s_m = sum_i softmax(z_m)_i[y_i]``: the summed true-class probability of each modality over the batch.

    With a ``present`` mask (B, M, columns in the order of ``unimodal_logits``) only samples that have
    every modality are counted, so the scores stay comparable. Computed without autograd, vectorised.
    ``reduce=True`` sums the scores over distributed ranks (a no-op in one process).
    """
    with torch.no_grad():
        rows = None
        if present is not None:
            rows = present.all(dim=1)
        scores = {}
        for m, z in unimodal_logits.items():
            p = torch.softmax(z.detach().float(), dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
            scores[m] = (p[rows] if rows is not None else p).sum()
        if reduce:
            from poise.train.distributed import all_reduce_sum

            stacked = all_reduce_sum(torch.stack(list(scores.values())))
            scores = {m: stacked[i] for i, m in enumerate(scores)}
        return scores


def confidence_ratios(scores: dict[str, Tensor], eps: float = 1e-12) -> dict[str, Tensor]:
    """``rho_m = s_m / mean_{j != m} s_j``; for two modalities ``rho_a = s_a / s_v`` and ``rho_v = 1 / rho_a``."""
    names = list(scores)
    if len(names) < 2:
        return {}
    stacked = torch.stack([scores[m] for m in names])
    total = stacked.sum()
    others = (total - stacked) / (len(names) - 1)
    ratios = stacked / others.clamp_min(eps)
    return {m: ratios[i] for i, m in enumerate(names)}
