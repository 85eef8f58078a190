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
        names = list(unimodal_logits)
        stacked = confidence_rows(unimodal_logits, labels, present).sum(dim=0)
        if reduce is not None:
            stacked = reduce(stacked)
        return {m: stacked[i] for i, m in enumerate(names)}


def confidence_rows(unimodal_logits: dict[str, Tensor], labels: Tensor, present: Tensor | None = None) -> Tensor:
    """(B, M): each sample's true-class probability under each modality, columns in the order of
    ``unimodal_logits``; 0 for a sample that lacks some modality (``present`` (B, M))."""
    with torch.no_grad():
        # all modalities in one (C, M, B) tensor: a handful of operations, whatever M is; classes first because
        # torch's CPU softmax along a short last dimension costs ~100 ns a row, along the first ~10
        z = torch.stack([unimodal_logits[m].detach().float().t() for m in unimodal_logits], dim=1)
        p = torch.softmax(z, dim=0).gather(0, labels.view(1, 1, -1).expand(1, z.shape[1], -1)).squeeze(0).t()
        if present is not None:
            p = torch.where(present.all(dim=1, keepdim=True), p, 0.0)
        return p


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
