"""MMPareto (ICML 2024): Pareto integration of the multimodal and unimodal gradients of an encoder."""

from __future__ import annotations

import torch
from torch import Tensor

#: the released solver's clip of the min-norm coefficient
PARETO_CLIP = (0.001, 0.999)
MAGNITUDES = ("encoder", "tensor", "none")


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
                   magnitude: str = "encoder", gamma: float = 1.0) -> list[Tensor]:
    """An encoder's gradient ``2 (a_1 g_multi + a_2 g_uni)`` (one tensor per parameter), its magnitude
    then raised to at least that of the summed gradient ``g_sum = g_multi + g_uni`` and multiplied by
    ``gamma``: ``magnitude="encoder"`` compares the norms over the whole encoder,
    ``"tensor"`` tensor by tensor (the released code, with ``gamma`` 1.5), ``"none"`` leaves it as it is.
    A combined gradient that is zero stays zero (the released ratio would be infinite)."""
    if magnitude not in MAGNITUDES:
        raise ValueError(f"pareto_combine: magnitude must be one of {', '.join(MAGNITUDES)}, not '{magnitude}'")
    a1, a2 = weights
    out = [2.0 * (a1 * gm + a2 * gu) for gm, gu in zip(g_multi, g_uni)]
    if magnitude == "none":
        return [gamma * g for g in out] if gamma != 1.0 else out
    sums = [gm + gu for gm, gu in zip(g_multi, g_uni)]

    def factor(norm_sum: Tensor, norm: Tensor) -> Tensor:
        ratio = torch.where(norm > 0, norm_sum / norm.clamp_min(torch.finfo(norm.dtype).tiny), torch.ones_like(norm))
        return gamma * ratio.clamp_min(1.0)

    if magnitude == "tensor":
        return [factor(torch.linalg.vector_norm(gs), torch.linalg.vector_norm(g)) * g for g, gs in zip(out, sums)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in out]))
    norm_sum = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in sums]))
    k = factor(norm_sum, norm)
    return [k * g for g in out]
