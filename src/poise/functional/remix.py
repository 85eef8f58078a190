"""Data Remixing (Ma, Chen and Deng, ICML 2025, "Improving Multimodal Learning Balance and Sufficiency
through Data Remixing"): each training sample is given to the one modality that is least sure of it
(decoupling), and the samples of each modality are batched together (batch-level reassembling)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def kl_from_uniform(logits: Tensor) -> Tensor:
    """``KL(softmax(z) || U) = sum_k p_k log(C p_k)`` per row of (B, C) logits, in nats: 0 for a prediction
    that says nothing, ``log C`` for a one-hot one. Computed without autograd, in float32."""
    with torch.no_grad():
        log_p = torch.log_softmax(logits.detach().float(), dim=1)
        return (log_p.exp() * (log_p + math.log(logits.shape[1]))).sum(dim=1)


def remix_assignment(unimodal_logits: dict[str, Tensor], present: Tensor | None = None) -> Tensor:
    """(B,) index, in the order of ``unimodal_logits``, of the modality each sample trains: the one whose
    prediction is closest to uniform (smallest :func:`kl_from_uniform`), among the modalities the sample
    has (``present`` (B, M)); ties go to the first. A sample with no modality goes to the first."""
    kl = torch.stack([kl_from_uniform(z) for z in unimodal_logits.values()], dim=1)  # (B, M)
    if present is not None:
        has = present.bool().to(kl.device)
        kl = torch.where(has | ~has.any(dim=1, keepdim=True), kl, torch.inf)
    return kl.argmin(dim=1)


def remix_order(assignment: Tensor, num_modalities: int, generator: torch.Generator | None = None,
                batch_size: int | None = None) -> Tensor:
    """The sample positions of one epoch, grouped by assigned modality and shuffled within each group by
    ``generator``, to be cut into consecutive batches of ``batch_size``.

    ``batch_size`` None: the groups one after the other (modality 0's samples, then modality 1's, ...);
    every batch holds one modality's samples except where two groups meet. With a ``batch_size``: each
    group is cut into full batches, those batches come in an order drawn from ``generator``, and the
    groups' remainders (fewer than ``batch_size`` samples each) close the epoch, so only the last
    batches can hold more than one modality."""
    assignment = assignment.cpu()
    groups = []
    for k in range(num_modalities):
        rows = (assignment == k).nonzero().squeeze(1)
        groups.append(rows[torch.randperm(len(rows), generator=generator)])
    if batch_size is None:
        return torch.cat(groups)
    full, rest = [], []
    for rows in groups:
        cut = len(rows) - len(rows) % batch_size
        full += list(rows[:cut].split(batch_size))
        rest.append(rows[cut:])
    shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
    return torch.cat(shuffled + rest)


__all__ = ["kl_from_uniform", "remix_assignment", "remix_order"]
