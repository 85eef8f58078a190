"""MLA (multimodal learning with alternating unimodal adaptation, CVPR 2024): the head-gradient
projection (orthogonal weight modification, OWM) and the test-time fusion weights.

Paper forms:

- OWM, one recursive-least-squares step for the mean feature ``h`` (d,) of the modality trained at
  the step before: ``q = 1 / (alpha + h^T P h)``, ``P <- P - q (P h)(P h)^T``; the head weight gradient
  becomes ``grad_W P`` (the bias gradient is untouched). Afterwards ``P h = alpha / (alpha + h^T P h) * P_old h``,
  so for a small ``alpha`` the head no longer moves along the directions earlier modalities used.
- Dynamic fusion, per sample: ``e_m = -sum_c p_mc log p_mc`` with ``p_m = softmax(z_m)``,
  ``lambda_m = softmax_m(max_k e_k - e_m)``, prediction ``sum_m lambda_m z_m``.

The released code differs; its forms are here too (``*_released``) so that runs can reproduce it:
the OWM update divides element-wise by the outer product ``k r`` (not by the scalar ``r k``),
Frobenius-normalises ``P`` every step and multiplies the gradient by ``P^T``; its ``alpha`` follows
``0.1 ** (1 + batch_index / batches_per_epoch)``, reset every epoch; its dynamic fusion takes the
softmax over the batch dimension, so each modality gets one weight per batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def owm_update(P: Tensor, h: Tensor, alpha: float) -> Tensor:
    """One recursive-least-squares step of the projection matrix ``P`` (d, d) for the mean feature
    ``h`` (d,): ``P - (P h)(P h)^T / (alpha + h^T P h)``. Returns a new tensor; ``P`` is left as it is."""
    if alpha <= 0:
        raise ValueError(f"owm alpha must be positive, got {alpha}")
    h = h.reshape(-1).to(P.dtype)
    Ph = P @ h
    q = 1.0 / (alpha + h @ Ph)
    return P - q * torch.outer(Ph, Ph)


def owm_update_released(P: Tensor, h: Tensor, alpha: float) -> Tensor:
    """The released code's update: with ``r = h`` as a row and ``k = P r^T`` as a column,
    ``P' = P - (k k^T) / (alpha + k r)`` where ``k r`` is the (d, d) outer product and the division is
    element-wise, then ``P' / ||P'||_F``. Returns a new tensor."""
    r = h.reshape(1, -1).to(P.dtype)
    k = P @ r.T
    updated = P - (k @ k.T) / (alpha + k @ r)
    return updated / torch.linalg.matrix_norm(updated, ord="fro")


def released_owm_alpha(batch_index: int, batches_per_epoch: int) -> float:
    """The released code's alpha schedule, ``0.1 ** (1 + batch_index / batches_per_epoch)``: from 0.1 at
    the first batch of every epoch down towards 0.01 at its last."""
    return 0.1 ** (1.0 + batch_index / max(batches_per_epoch, 1))


def owm_project(grad: Tensor, P: Tensor) -> Tensor:
    """The modified head weight gradient ``grad P`` (grad: (C, d)). The released code uses ``grad P^T``:
    pass ``P.T`` for that (the paper's ``P`` is symmetric, the released one is not)."""
    return grad @ P.to(grad.dtype)


def _renormalise(weights: Tensor, present: Tensor | None) -> Tensor:
    """(B, M) weights -> zero for absent modalities, rows summing to 1 (rows with no modality: all zero)."""
    if present is None:
        return weights / weights.sum(1, keepdim=True)
    weights = weights * present.to(weights.dtype)
    total = weights.sum(1, keepdim=True)
    return torch.where(total > 0, weights / total.clamp_min(torch.finfo(weights.dtype).tiny), torch.zeros_like(weights))


def prediction_entropy(logits: Tensor) -> Tensor:
    """(B, C) logits -> (B,) entropy of the softmax, ``-sum_c p_c log p_c`` (stable for saturated logits)."""
    log_p = torch.log_softmax(logits.float(), dim=1)
    return -(log_p.exp() * log_p).sum(1)


def entropy_fusion_weights(unimodal_logits: dict[str, Tensor], present: Tensor | None = None) -> dict[str, Tensor]:
    """Per-sample fusion weights (paper): ``lambda_m = softmax_m(max_k e_k - e_m)`` with ``e_m`` the
    entropy of ``softmax(z_m)``, so the more certain modality gets the larger weight.

    ``present`` (B, M), columns in the order of ``unimodal_logits``: absent modalities get weight 0 and
    the others are renormalised (the softmax runs over the present ones). Returns modality -> (B,)
    weights that sum to 1 over modalities for every sample that has at least one modality.
    """
    names = list(unimodal_logits)
    with torch.no_grad():
        entropy = torch.stack([prediction_entropy(unimodal_logits[m]) for m in names], dim=1)  # (B, M)
        if present is None:
            present = torch.ones_like(entropy, dtype=torch.bool)
        present = present.bool()
        any_present = present.any(dim=1, keepdim=True)
        top = entropy.masked_fill(~present, float("-inf")).max(dim=1, keepdim=True).values
        gap = (top - entropy).masked_fill(~present, float("-inf"))  # max_k e_k - e_m over present k
        # a sample without any modality would give softmax(-inf, ...) = NaN: give it zero weights
        weights = torch.softmax(gap.masked_fill(~any_present, 0.0), dim=1) * any_present
    return {m: weights[:, j] for j, m in enumerate(names)}


def entropy_fusion_weights_released(
    unimodal_logits: dict[str, Tensor], present: Tensor | None = None
) -> dict[str, Tensor]:
    """The released code's fusion weights: ``softmax`` over the BATCH dimension, the entropy summed over
    the whole (B, C) matrix, so each modality gets one scalar weight per batch and the result depends on
    the batch size. ``softmax_m(max_k e_k - e_m)`` as in the paper. With ``present``, each modality's
    entropy is taken over the samples that have it. Returns modality -> () weights summing to 1."""
    names = list(unimodal_logits)
    with torch.no_grad():
        entropies = []
        for j, m in enumerate(names):
            z = unimodal_logits[m].float()
            if present is not None:
                z = z[present[:, j].bool()]
            log_p = torch.log_softmax(z, dim=0)
            entropies.append(-(log_p.exp() * log_p).sum())
        entropy = torch.stack(entropies)
        weights = torch.softmax(entropy.max() - entropy, dim=0)
    return {m: weights[j] for j, m in enumerate(names)}


def fixed_fusion_weights(
    weights: Sequence[float], modalities: Sequence[str], present: Tensor | None = None, batch_size: int | None = None
) -> dict[str, Tensor]:
    """Fixed per-modality weights (released non-dynamic fusion: 0.55 / 0.45 for two modalities,
    0.35 / 0.25 / 0.40 for three), per sample: zero for absent modalities, the rest renormalised to sum 1."""
    if len(weights) != len(modalities):
        raise ValueError(f"{len(weights)} fixed weights for {len(modalities)} modalities")
    if present is None and batch_size is None:
        raise ValueError("fixed_fusion_weights needs the present mask or the batch size")
    rows = present.shape[0] if present is not None else batch_size
    device = present.device if present is not None else None
    w = torch.as_tensor(list(weights), dtype=torch.float32, device=device).expand(rows, -1)
    w = _renormalise(w, present)
    return {m: w[:, j] for j, m in enumerate(modalities)}


def fuse_logits(unimodal_logits: dict[str, Tensor], weights: dict[str, Tensor]) -> Tensor:
    """``sum_m lambda_m z_m`` with per-sample (B,) or per-batch () weights."""
    fused = None
    for m, z in unimodal_logits.items():
        w = weights[m].to(z.dtype)
        term = z * (w.unsqueeze(1) if w.dim() == 1 else w)
        fused = term if fused is None else fused + term
    if fused is None:
        raise ValueError("fuse_logits needs at least one modality")
    return fused
