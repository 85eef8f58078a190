"""Per-modality confidence: the score that OGM-GE uses to measure imbalance, logged for every method."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

#: sums a tensor over the processes of a run (``poise.train.distributed.all_reduce_sum``), injected by the caller
Reducer = Callable[[Tensor], Tensor]


def confidence_scores(
    unimodal_logits: dict[str, Tensor], labels: Tensor, present: Tensor | None = None, reduce: Reducer | None = None
) -> dict[str, Tensor]:
    """``s_m = sum_i softmax(z_m)_i[y_i]``: the summed true-class probability of each modality over the batch.

    With a ``present`` mask (B, M, columns in the order of ``unimodal_logits``) only samples that have
    every modality are counted, so the scores stay comparable. Computed without autograd, vectorised.
    ``reduce``: a function that sums the (M,) scores over the run's processes, e.g.
    ``poise.train.distributed.all_reduce_sum`` (this module stays free of ``torch.distributed``).
    """
    if isinstance(reduce, bool):
        raise TypeError("confidence_scores(reduce=...) takes the function that sums over processes, e.g. "
                        "reduce=poise.train.distributed.all_reduce_sum, not a bool")
    with torch.no_grad():
        rows = None
        if present is not None:
            rows = present.all(dim=1)
        scores = {}
        for m, z in unimodal_logits.items():
            p = torch.softmax(z.detach().float(), dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
            scores[m] = (p[rows] if rows is not None else p).sum()
        if reduce is not None:
            stacked = reduce(torch.stack(list(scores.values())))
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
