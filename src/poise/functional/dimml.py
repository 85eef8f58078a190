"""DI-MML (Fan et al., "Detached and Interactive Multimodal Learning"): separately trained encoders with
their own heads plus a shared classifier, and a dimension-decoupled contrastive loss that lets each
modality learn, from the other's detached features, the feature dimensions where the other is
discriminative and it is not. At test time the unimodal heads and a fusion head trained on the frozen
features are combined with weights from their confidences."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dimension_discriminability(features: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(d,) per feature dimension: the fraction of samples whose nearest class centroid along that one
    dimension (``argmin_k |h_id - c_kd|``) is their own class. Centroids are the class means of
    ``features`` (N, d); a class without samples is never nearest."""
    features = features.float()
    counts = torch.bincount(labels, minlength=num_classes).float()
    sums = torch.zeros(num_classes, features.shape[1], device=features.device).index_add_(0, labels, features)
    centroids = sums / counts.clamp_min(1).unsqueeze(1)
    distance = (features.unsqueeze(1) - centroids.unsqueeze(0)).abs()  # (N, K, d)
    distance[:, counts == 0, :] = float("inf")
    nearest = distance.argmin(dim=1)  # (N, d)
    return (nearest == labels.unsqueeze(1)).float().mean(dim=0)


def discriminative_dimensions(accuracy: Tensor) -> Tensor:
    """(d,) bool: the dimensions whose nearest-centroid accuracy is above the mean over dimensions."""
    return accuracy > accuracy.mean()


def decoupled_dimensions(discriminative: dict[str, Tensor], teacher: str, student: str) -> Tensor:
    """(d,) bool: dimensions discriminative for ``teacher`` and not for ``student`` (the student learns
    them from the teacher)."""
    return discriminative[teacher] & ~discriminative[student]


def dimension_decoupled_contrastive(student: Tensor, teacher: Tensor, dimensions: Tensor, temperature: float = 1.0,
                                    valid: Tensor | None = None) -> Tensor:
    """InfoNCE of the student's features on ``dimensions`` against the teacher's (detached) on the same
    dimensions: ``mean_i -log( exp(s_i.t_i / T) / sum_j exp(s_i.t_j / T) )``, i and j over ``valid`` rows
    (both modalities present). Zero when no dimension is selected or fewer than one valid row."""
    if valid is None:
        valid = torch.ones(student.shape[0], dtype=torch.bool, device=student.device)
    if not bool(dimensions.any()) or not bool(valid.any()):
        return student.sum() * 0.0
    s = student[valid][:, dimensions].float()
    t = teacher[valid][:, dimensions].detach().float()
    logits = s @ t.T / temperature
    return F.cross_entropy(logits, torch.arange(len(s), device=s.device))


def confidence_weighted_logits(logits: list[Tensor], temperature: float = 1.0) -> Tensor:
    """``sum_k w_k o_k`` with ``w = softmax_k(max_c softmax(o_k)_c / T)`` per sample: the heads that are
    most confident on a sample weigh most."""
    confidence = torch.stack([F.softmax(o.float(), dim=1).amax(dim=1) for o in logits])  # (K, B)
    weights = F.softmax(confidence / temperature, dim=0)
    return sum(w.unsqueeze(1) * o.float() for w, o in zip(weights, logits))


__all__ = ["confidence_weighted_logits", "decoupled_dimensions", "dimension_decoupled_contrastive",
           "dimension_discriminability", "discriminative_dimensions"]
