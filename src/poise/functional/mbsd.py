"""MBSD (BalanceBenchmark's modality-balanced self-distillation): per-sample weights from the gap between
two modalities' true-class probabilities, a logit-alignment term and a distillation term from the
stronger modality of each sample to the weaker."""

from __future__ import annotations

import torch
from torch import Tensor


def _true_class(probs: Tensor, labels: Tensor) -> Tensor:
    return probs.gather(1, labels.view(-1, 1)).squeeze(1)


def mbsd_sample_weights(probs_a: Tensor, probs_b: Tensor, labels: Tensor) -> Tensor:
    """(B,) ``|p_a(y) - p_b(y)|`` for the samples that at least one of the two modalities classifies
    correctly (argmax), 0 for the others. ``probs_*``: (B, C) softmax outputs; ``labels``: (B,)."""
    gap = (_true_class(probs_a, labels) - _true_class(probs_b, labels)).abs()
    correct = (probs_a.argmax(1) == labels) | (probs_b.argmax(1) == labels)
    return torch.where(correct, gap, torch.zeros_like(gap))


def mbsd_alignment(a: Tensor, b: Tensor) -> Tensor:
    """(B,) ``(1/C) sum_k (a_k - b_k)^2``: the squared distance of two modalities' outputs (logits or
    probabilities), averaged over the C classes."""
    return (a - b).pow(2).mean(dim=1)


def mbsd_distillation_kl(log_probs_a: Tensor, log_probs_b: Tensor, labels: Tensor, detach_teacher: bool = True) -> Tensor:
    """(B,) ``KL(p_s || p_w) = sum_k p_s,k (log p_s,k - log p_w,k)`` per sample, where the teacher ``s`` is
    the modality with the larger true-class probability for that sample (``a`` on a tie) and ``w`` the other.
    ``detach_teacher``: the teacher's distribution takes no gradient (it only teaches)."""
    a_teaches = (_true_class(log_probs_a, labels) >= _true_class(log_probs_b, labels)).unsqueeze(1)
    teacher = torch.where(a_teaches, log_probs_a, log_probs_b)
    student = torch.where(a_teaches, log_probs_b, log_probs_a)
    if detach_teacher:
        teacher = teacher.detach()
    return (teacher.exp() * (teacher - student)).sum(dim=1)


def mbsd_released_kl(probs_a: Tensor, probs_b: Tensor, labels: Tensor) -> Tensor:
    """(B,) the released term ``F.kl_div(p_s, p_w, reduction='none')`` on the two true-class probabilities
    ``p_s = max(p_a(y), p_b(y))``, ``p_w = min(...)``: ``p_w (log p_w - p_s)``. ``kl_div`` expects a
    log-probability as its first argument and gets a probability, so this is not a divergence (it is
    negative for most samples); kept only to reproduce the released runs."""
    pa, pb = _true_class(probs_a, labels), _true_class(probs_b, labels)
    strong, weak = torch.maximum(pa, pb), torch.minimum(pa, pb)
    return torch.where(weak > 0, weak * (weak.clamp_min(torch.finfo(weak.dtype).tiny).log() - strong), torch.zeros_like(weak))
