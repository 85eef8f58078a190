"""Contrastive objectives for self-supervised encoder pre-training (no labels)."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(a: Tensor, b: Tensor, temperature: float = 0.1) -> Tensor:
    """Symmetric InfoNCE (CLIP): row i of ``a`` and row i of ``b`` are a positive pair, every other row of
    the other side a negative. Both (N, p); rows are L2-normalised here.
    ``(CE(a b^T / t, i) + CE(b a^T / t, i)) / 2``."""
    a, b = F.normalize(a.float(), dim=1), F.normalize(b.float(), dim=1)
    logits = a @ b.T / temperature
    target = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def nt_xent(a: Tensor, b: Tensor, temperature: float = 0.1) -> Tensor:
    """SimCLR's NT-Xent over two views (N, p) of the same N samples: for each of the 2N embeddings the
    other view of its sample is the positive and the remaining 2N - 2 embeddings the negatives."""
    z = F.normalize(torch.cat([a, b]).float(), dim=1)
    n = a.shape[0]
    logits = (z @ z.T / temperature).fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(logits, target)


def cross_modal_info_nce(
    embeddings: dict[str, Tensor], present: dict[str, Tensor] | None = None, temperature: float = 0.1
) -> Tensor:
    """Mean of :func:`info_nce` over every pair of modalities, each pair over the samples that have both
    (``present``: modality -> (B,) bool). A pair with fewer than two such samples has no negative and is
    skipped; when every pair is skipped the result is a zero that keeps the graph."""
    losses = []
    for m, n in itertools.combinations(embeddings, 2):
        a, b = embeddings[m], embeddings[n]
        if present is not None:
            rows = present[m] & present[n]
            a, b = a[rows], b[rows]
        if a.shape[0] >= 2:
            losses.append(info_nce(a, b, temperature))
    if not losses:
        return sum(z.sum() for z in embeddings.values()) * 0.0
    return torch.stack(losses).mean()
