"""Extensions around OGM-GE: boosting the weak modality, uncertainty-weighted multi-task loss,
cross-modal knowledge distillation and modality dropout.

Every function here is pure (no module state) and vectorised over the batch and the modalities, so
that it never forces a device synchronisation; the statistics that decide a coefficient (confidence
scores) are summed over distributed ranks first.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from poise.functional.confidence import Reducer, confidence_ratios, confidence_scores

BoostTargets = Literal["below_one", "weakest"]
DistillStudents = Literal["all", "weakest"]


def batch_confidence_ratios(
    unimodal_logits: dict[str, Tensor], labels: Tensor, present: Tensor | None = None, reduce: Reducer | None = None
) -> tuple[Tensor, Tensor]:
    """(M,) confidence ratios in the order of ``unimodal_logits`` (scores summed over processes by ``reduce``
    when given), and a 0-d bool that is False when no sample had every modality (the scores, hence the
    ratios, are void)."""
    scores = confidence_scores(unimodal_logits, labels, present, reduce=reduce)
    ratios = confidence_ratios(scores)
    valid = torch.stack(list(scores.values())).sum() > 0
    return torch.stack([ratios[m] for m in unimodal_logits]), valid


def boost_coefficients_from_ratios(
    ratios: Tensor, alpha: float, targets: BoostTargets = "below_one", eps: float = 1e-12
) -> Tensor:
    """Gradient multipliers that raise the weak modalities: ``k_m = 1 + tanh(alpha * relu(1 / rho_m - 1))``.

    ``ratios`` is the (M,) vector of confidence ratios ``rho_m = s_m / mean_{j != m} s_j``. For two
    modalities ``1 / rho_weak = rho_dom``, so the weak modality gets exactly
    ``1 + tanh(alpha * relu(rho_dom - 1))`` and the dominant one 1. For more modalities,
    ``targets="below_one"`` boosts every modality with ``rho_m < 1``, each by its own gap
    ``1 / rho_m - 1`` (how far the others' mean confidence is above its own); ``"weakest"`` boosts
    only the modality with the lowest ratio. The strongest modality always has ``rho >= 1`` and so
    keeps ``k = 1``.
    """
    gap = torch.relu(1.0 / ratios.clamp_min(eps) - 1.0)
    k = 1.0 + torch.tanh(alpha * gap)
    if targets == "weakest":
        weakest = F.one_hot(ratios.argmin(), ratios.numel()).to(torch.bool)
        k = torch.where(weakest, k, torch.ones_like(k))
    return k


def weak_boost_coefficients(
    unimodal_logits: dict[str, Tensor],
    labels: Tensor,
    alpha: float,
    present: Tensor | None = None,
    targets: BoostTargets = "below_one",
    reduce: Reducer | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per-modality gradient (or learning-rate) multipliers that raise the weak modalities, and the
    confidence ratios they come from, from a batch's unimodal logits.

    With a ``present`` mask only samples that have every modality are scored; a batch without such a
    sample decides nothing (every coefficient is 1).
    """
    ratios, valid = batch_confidence_ratios(unimodal_logits, labels, present, reduce)
    k = boost_coefficients_from_ratios(ratios, alpha, targets)
    k = torch.where(valid, k, torch.ones_like(k))
    names = list(unimodal_logits)
    return {m: k[i] for i, m in enumerate(names)}, {m: ratios[i] for i, m in enumerate(names)}


UncertaintyForm = Literal["classification", "regression"]


def uncertainty_weighted_loss(
    losses: Tensor, log_variances: Tensor, active: Tensor | None = None, form: UncertaintyForm = "classification"
) -> Tensor:
    """Per-term contributions of the uncertainty-weighted multi-task loss (Kendall et al., CVPR 2018),
    with ``s_t = log sigma_t^2``; their sum is the loss.

    ``form="classification"``: ``exp(-s_t) * L_t + s_t / 2``, Kendall's form for a cross-entropy term
    (a softmax scaled by ``1 / sigma_t^2``: ``L_t / sigma_t^2 + log sigma_t``); minimiser
    ``exp(-s_t) = 1 / (2 L_t)``.
    ``form="regression"``: ``exp(-s_t) * L_t + s_t``, twice Kendall's regression form
    ``L_t / (2 sigma_t^2) + log sigma_t``; minimiser ``exp(-s_t) = 1 / L_t``.
    ``active`` (T,) bool zeroes whole terms (loss and regulariser) that had no sample this step, so
    that ``s_t`` is not driven down by its regulariser alone.
    """
    if form not in ("classification", "regression"):
        raise ValueError(f"form must be 'classification' or 'regression', got {form!r}")
    regulariser = log_variances / 2 if form == "classification" else log_variances
    contributions = torch.exp(-log_variances) * losses + regulariser
    if active is not None:
        contributions = contributions * active.to(contributions.dtype)
    return contributions


def distillation_roles(
    ratios: Tensor, valid: Tensor | None = None, teacher: int | None = None, students: DistillStudents = "all"
) -> tuple[Tensor, Tensor]:
    """(M,) one-hot teacher and (M,) 0/1 student weights.

    The teacher is the modality with the highest confidence ratio unless ``teacher`` fixes its index.
    Students are every other modality (``"all"``) or only the lowest-ratio modality among them
    (``"weakest"``). ``valid`` False (no sample scored) makes every student weight 0 when the teacher
    is chosen by ratio.
    """
    m = ratios.numel()
    index = ratios.argmax() if teacher is None else torch.tensor(teacher, device=ratios.device)
    teacher_onehot = F.one_hot(index, m).to(ratios.dtype)
    others = 1.0 - teacher_onehot
    if students == "weakest":
        masked = torch.where(others.bool(), ratios, torch.full_like(ratios, float("inf")))
        student_weights = F.one_hot(masked.argmin(), m).to(ratios.dtype)
    else:
        student_weights = others
    if teacher is None and valid is not None:
        student_weights = student_weights * valid.to(ratios.dtype)
    return teacher_onehot, student_weights


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Per-sample ``T^2 * KL(softmax(z_t / T) || softmax(z_s / T))``; the teacher is detached."""
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(dim=1)
    return kl * temperature**2


def cross_modal_distillation(
    unimodal_logits: dict[str, Tensor],
    teacher_onehot: Tensor,
    student_weights: Tensor,
    temperature: float,
    present: Tensor | None = None,
) -> Tensor:
    """Knowledge distillation from the teacher modality's soft predictions to the students' logits.

    For each student m: the mean over the samples that have both m and the teacher of
    ``T^2 KL(softmax(z_teacher / T) || softmax(z_m / T))``; the result is the student-weighted mean
    over modalities (0 when no student has a sample). The teacher is picked by ``teacher_onehot``
    (M,) without leaving the device.
    """
    names = list(unimodal_logits)
    stacked = torch.stack([unimodal_logits[m] for m in names])  # (M, B, C)
    onehot = teacher_onehot.to(stacked.dtype)
    teacher_logits = torch.einsum("m,mbc->bc", onehot, stacked.detach())
    kl = torch.stack([distillation_kl(stacked[i], teacher_logits, temperature) for i in range(len(names))])  # (M, B)
    if present is None:
        rows = torch.ones_like(kl)
    else:
        has = present.to(kl.dtype).T  # (M, B)
        rows = has * (onehot @ has).unsqueeze(0)
    per_student = (kl * rows).sum(dim=1) / rows.sum(dim=1).clamp_min(1.0)
    weights = student_weights.to(kl.dtype) * (rows.sum(dim=1) > 0).to(kl.dtype)
    return (weights * per_student).sum() / weights.sum().clamp_min(1.0)


def modality_dropout_mask(present: Tensor, p: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """(B, M) bool: which modalities each sample keeps.

    Each present modality m is dropped with probability ``p[m]`` (draw ``u = rand(B, M)``, drop where
    ``u < p``). A sample that would lose every present modality keeps one of them, chosen uniformly
    at random (second draw ``v = rand(B, M)``, the present modality with the largest ``v``); so a
    sample with a single present modality always keeps it. Absent modalities are never kept.
    """
    present = present.bool()
    drop = torch.rand(present.shape, device=present.device, generator=generator) < p.to(present.device)
    keep = present & ~drop
    pick = torch.rand(present.shape, device=present.device, generator=generator)
    pick = torch.where(present, pick, torch.full_like(pick, -1.0))
    restore = F.one_hot(pick.argmax(dim=1), present.shape[1]).bool() & present
    lost_all = ~keep.any(dim=1, keepdim=True)
    return torch.where(lost_all, restore, keep)


def modality_dropout_scale(keep: Tensor, p: Tensor, rescale: bool = False) -> Tensor:
    """(B, M) feature multipliers from a keep mask: 1 kept, 0 dropped; with ``rescale`` kept features
    are multiplied by ``1 / (1 - p[m])`` (inverted dropout, with the nominal probability)."""
    scale = keep.to(p.dtype)
    if rescale:
        scale = scale / (1.0 - p)
    return scale


__all__ = [
    "batch_confidence_ratios",
    "boost_coefficients_from_ratios",
    "cross_modal_distillation",
    "distillation_kl",
    "distillation_roles",
    "modality_dropout_mask",
    "modality_dropout_scale",
    "uncertainty_weighted_loss",
    "weak_boost_coefficients",
]
