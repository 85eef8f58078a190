"""MMPareto (ICML 2024): Pareto integration of the multimodal and unimodal gradients of an encoder."""

from __future__ import annotations

import torch
from torch import Tensor

#: the released solver's clip of the min-norm coefficient
PARETO_CLIP = (0.001, 0.999)


def pareto_weights(g_multi: Tensor, g_uni: Tensor) -> tuple[float, float]:
    """The weights ``(a_multi, a_uni)`` of two flattened gradients: ``(0.5, 0.5)`` when their cosine is
    positive (or either is zero: there is no conflict to resolve); otherwise MGDA's two-vector min-norm
    point ``a = ((g_uni - g_multi) . g_uni) / ||g_multi - g_uni||^2`` on the simplex, clipped to
    [0.001, 0.999] as the released solver does."""
    g1, g2 = g_multi.detach().reshape(-1).double(), g_uni.detach().reshape(-1).double()
    n1, n2 = torch.linalg.vector_norm(g1), torch.linalg.vector_norm(g2)
    dot = torch.dot(g1, g2)
    if float(n1) == 0.0 or float(n2) == 0.0 or float(dot) > 0.0:
        return 0.5, 0.5
    diff = torch.dot(g1 - g2, g1 - g2)
    a = float(torch.dot(g2 - g1, g2) / diff)
    a = min(max(a, PARETO_CLIP[0]), PARETO_CLIP[1])
    return a, 1.0 - a


def pareto_combine(g_multi: list[Tensor], g_uni: list[Tensor], weights: tuple[float, float],
                   g_sum: list[Tensor] | None = None, gamma: float = 1.5) -> list[Tensor]:
    """``2 (a_1 g_multi + a_2 g_uni)`` per tensor. With ``g_sum`` (the released per-tensor magnitude
    rescaling): each tensor times ``gamma * max(||g_sum_p|| / ||g_p||, 1)``; a tensor whose combined
    gradient is zero stays zero (the released ratio would be infinite)."""
    a1, a2 = weights
    out = [2.0 * (a1 * gm + a2 * gu) for gm, gu in zip(g_multi, g_uni)]
    if g_sum is None:
        return out
    scaled = []
    for g, gs in zip(out, g_sum):
        norm = torch.linalg.vector_norm(g)
        ratio = torch.where(norm > 0, torch.linalg.vector_norm(gs) / norm.clamp_min(torch.finfo(g.dtype).tiny),
                            torch.ones_like(norm))
        scaled.append(gamma * ratio.clamp_min(1.0) * g)
    return scaled
