"""G2D (Rakib and Bagavathi, ICCV 2025, "G2D: Boosting Multimodal Learning with Gradient-Guided
Distillation"): unimodal teachers distilled into a multimodal student (features and logits), and
Sequential Modality Prioritization, which lets only the modality whose teacher is least confident on
the batch update its encoder."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def logit_distillation_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0,
                            rows: Tensor | None = None) -> Tensor:
    """``T^2 * mean_i KL(softmax(t_i / T) || softmax(s_i / T))`` over the rows selected by the (B,) bool
    ``rows`` (default: all); the teacher's side carries no gradient. No selected row: a zero that keeps
    the graph."""
    s, t = student_logits.float(), teacher_logits.detach().float()
    if rows is not None and not bool(rows.all()):
        if not bool(rows.any()):
            return student_logits.sum() * 0.0
        s, t = s[rows], t[rows]
    log_q = F.log_softmax(s / temperature, dim=1)
    log_p = F.log_softmax(t / temperature, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return kl.mean() * temperature**2


def teacher_confidence_sums(teacher_logits: dict[str, Tensor], labels: Tensor,
                            present: dict[str, Tensor] | None = None) -> Tensor:
    """(M, 2): per teacher, in the order of ``teacher_logits``, the sum of its softmax probability of the
    true class over the samples that have its modality (``present``: modality -> (B,) bool) and the number
    of those samples. Sums, so that micro-batches and processes combine by adding."""
    with torch.no_grad():
        out = []
        for m, z in teacher_logits.items():
            p = torch.softmax(z.detach().float(), dim=1).gather(1, labels.view(-1, 1)).squeeze(1)
            has = present[m].to(p.dtype) if present is not None else torch.ones_like(p)
            out.append(torch.stack([(p * has).sum(), has.sum()]))
        return torch.stack(out)


def smp_coefficients(confidence: Tensor) -> Tensor:
    """Sequential Modality Prioritization's (M,) gradient gates from each teacher's confidence: 1 for the
    modality whose teacher is least confident, 0 for every other; all 1 when the lowest confidence is
    shared (no modality to prioritise)."""
    lowest = confidence == confidence.min()
    if int(lowest.sum()) > 1:
        return torch.ones_like(confidence)
    return lowest.to(confidence.dtype)


__all__ = ["logit_distillation_loss", "smp_coefficients", "teacher_confidence_sums"]
