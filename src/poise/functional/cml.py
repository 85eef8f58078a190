"""CML (Ma et al., ICML 2023, "Calibrating Multimodal Learning"): a prediction made from fewer modalities
should not be more confident than one made from more."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor


def prediction_confidence(logits: Tensor) -> Tensor:
    """(B,) the largest softmax probability of each row (the confidence of the predicted class)."""
    return torch.softmax(logits.float(), dim=1).max(dim=1).values


def cml_confidence_penalty(reference_logits: Tensor, partial_logits: Tensor,
                           hinge: Literal["batch", "sample"] = "batch",
                           reduce: Callable[[Tensor], Tensor] | None = None, processes: int = 1) -> Tensor:
    """How much more confident the prediction from fewer modalities (``partial_logits``) is than the one from
    more (``reference_logits``), both (B, C).

    batch: ``max(0, sum_b (conf_partial - conf_reference))``, BalanceBenchmark's form (a sample less confident
    without a modality offsets one that is more); sample: ``sum_b max(0, conf_partial - conf_reference)``.

    Over processes (``reduce`` sums a tensor over them, ``processes`` is their number): whether the batch
    hinge is open is decided on the sum over every process, and the local sum is multiplied by
    ``processes``, so that gradients averaged over the processes equal one process's on the whole batch."""
    gap = prediction_confidence(partial_logits) - prediction_confidence(reference_logits)
    if hinge == "batch":
        local = gap.sum()
        total = reduce(local.detach()) if reduce is not None else local.detach()
        return processes * (total > 0).to(local.dtype) * local
    if hinge == "sample":
        return processes * gap.clamp_min(0).sum()
    raise ValueError(f"cml_confidence_penalty hinge must be 'batch' or 'sample', not '{hinge}'")


def removal_chain(order: list[str] | tuple[str, ...]) -> list[tuple[str, ...]]:
    """The modalities kept after removing ``order``'s last, then its second-to-last, ... down to one kept:
    ``('a', 'v', 't')`` -> ``[('a', 'v'), ('a',)]`` (BalanceBenchmark pops from the end of a shuffled list)."""
    kept = list(order)
    chain = []
    while len(kept) > 1:
        kept.pop()
        chain.append(tuple(kept))
    return chain


__all__ = ["cml_confidence_penalty", "prediction_confidence", "removal_chain"]
