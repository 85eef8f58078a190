"""Diagnosing & Re-learning (ECCV 2024): diagnose each modality's learning state by the gap between the
clustering purity of its features on the training and on a held-out split, and re-initialise its
encoder towards its initial weights in proportion."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def minmax_scale(features: np.ndarray | Tensor) -> np.ndarray:
    """Each feature column scaled to [-1, 1] (sklearn's ``MinMaxScaler(feature_range=(-1, 1))``); a
    constant column becomes -1."""
    x = np.asarray(features.detach().cpu() if isinstance(features, Tensor) else features, dtype=np.float64)
    low, high = x.min(axis=0), x.max(axis=0)
    span = np.where(high - low == 0, 1.0, high - low)
    return 2.0 * (x - low) / span - 1.0


def clustering_purity(assignments: np.ndarray | Tensor, labels: np.ndarray | Tensor) -> float:
    """``sum_k max_c |{i : cluster_i = k, y_i = c}| / N``."""
    a = np.asarray(assignments.cpu() if isinstance(assignments, Tensor) else assignments).astype(np.int64)
    y = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels).astype(np.int64)
    if a.size == 0:
        return float("nan")
    table = np.zeros((a.max() + 1, y.max() + 1), dtype=np.int64)
    np.add.at(table, (a, y), 1)
    return float(table.max(axis=1).sum() / a.size)


def kmeans_purity(features: np.ndarray | Tensor, labels: np.ndarray | Tensor, num_clusters: int, seed: int = 0) -> float:
    """Purity of KMeans(``num_clusters``, ``random_state=seed``) on the min-max scaled features."""
    from sklearn.cluster import KMeans

    x = minmax_scale(features)
    assignments = KMeans(n_clusters=num_clusters, random_state=seed, n_init=10).fit_predict(x)
    return clustering_purity(assignments, labels)


def relearning_strength(purity_train: float, purity_val: float, lam: float) -> float:
    """``alpha = tanh(lambda |P_train - P_val|)``: how far the encoder is pulled back to its initial weights."""
    return math.tanh(lam * abs(purity_train - purity_val))


@torch.no_grad()
def reinitialise(params: Sequence[Tensor], initial: Sequence[Tensor], alpha: float) -> None:
    """``theta <- alpha theta_0 + (1 - alpha) theta`` in place."""
    for p, p0 in zip(params, initial):
        p.mul_(1.0 - alpha).add_(p0.to(p.dtype), alpha=alpha)


__all__ = ["clustering_purity", "kmeans_purity", "minmax_scale", "reinitialise", "relearning_strength"]
