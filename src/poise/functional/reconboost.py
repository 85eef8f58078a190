"""ReconBoost (Hua et al., ICML 2024): modality-alternating boosting. Stage t trains one modality's learner
against the ensemble of the others (boosting loss plus a term that aligns it with the previous stage's
learner), then a global rectification trains the whole ensemble ``F = b sum_m f_m`` with cross-entropy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def boosting_loss(logits: Tensor, ensemble_logits: Tensor, labels: Tensor, w1: float = 5.0, w2: float = 1.0) -> Tensor:
    """(B,) ``-(w1 / C) log p_m(y) + (w2 / C) pbar(y) log p_m(y)``, ``p_m = softmax(f_m)`` and
    ``pbar = softmax(ensemble of the other learners)`` held fixed (the released ``mean(-1)`` over classes of
    the one-hot products gives the ``1 / C``)."""
    num_classes = logits.shape[1]
    log_p = F.log_softmax(logits.float(), dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
    p_bar = torch.softmax(ensemble_logits.detach().float(), dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
    return (-w1 * log_p + w2 * p_bar * log_p) / num_classes


def ga_loss(logits: Tensor, previous_logits: Tensor, detached: bool = False) -> Tensor:
    """``MSE(softmax f_m, softmax f_prev)`` averaged over samples and classes, the previous stage's learner held
    fixed. ``detached=True`` also detaches ``f_m``, as the released code does: the term then has no gradient."""
    current = torch.softmax(logits.float(), dim=1)
    if detached:
        current = current.detach()
    return F.mse_loss(current, torch.softmax(previous_logits.detach().float(), dim=1))


def ensemble_logits(unimodal_logits: dict[str, Tensor], learners: list[str] | tuple[str, ...], boost_rate: Tensor,
                    present: dict[str, Tensor] | None = None) -> Tensor:
    """``b sum_{m in learners} f_m`` (each sample only over the learners whose modality it has); zeros when
    there is no learner (the released code's constant before the first stage gives the same softmax)."""
    first = next(iter(unimodal_logits.values()))
    total = torch.zeros(first.shape, dtype=torch.float32, device=first.device)
    for m in learners:
        z = unimodal_logits[m].float()
        if present is not None:
            z = z * present[m].view(-1, 1).to(z.dtype)
        total = total + z
    return boost_rate * total


def reconboost_schedule(epoch: int, modalities: tuple[str, ...], epochs_per_phase: int) -> tuple[int, str, str]:
    """(stage, modality of the stage, phase ``"boost"`` or ``"rectify"``) of an epoch: each stage is
    ``epochs_per_phase`` boosting epochs of one modality (in turn) then as many rectification epochs."""
    stage, within = divmod(epoch, 2 * epochs_per_phase)
    return stage, modalities[stage % len(modalities)], ("boost" if within < epochs_per_phase else "rectify")


__all__ = ["boosting_loss", "ensemble_logits", "ga_loss", "reconboost_schedule"]
