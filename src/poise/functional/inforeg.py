"""InfoReg (CVPR 2025): during the prime learning window, pull the dominant modality's encoder towards
its weights at the start of the epoch, with a strength that grows with its confidence lead."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def fisher_trace(grads: Sequence[Tensor]) -> Tensor:
    """``T = sum_tensors mean(g^2)``: the empirical Fisher trace the released code accumulates per step."""
    return torch.stack([g.detach().float().pow(2).mean() for g in grads]).sum()


def prime_window_slope(history: Sequence[float], window: int = 10) -> float:
    """``k = (mean of the last ``window`` traces - mean of the ``window`` before the latest) / mean of the
    last ``window````, the history pre-filled with ``window`` zeros (as released). 0 when it is all zeros."""
    padded = [0.0] * window + [float(t) for t in history]
    recent = sum(padded[-window:]) / window
    previous = sum(padded[-window - 1:-1]) / window
    if recent == 0:
        return 0.0
    return (recent - previous) / recent


def inforeg_coefficients(scores: Tensor, strengths: Tensor) -> Tensor:
    """(M,) proximal strengths ``beta``: only the dominant modality (the largest score; on a tie the later
    one, as the released ``if s_a > s_v ... else`` does) gets ``c_m * exp(tanh(s_m - max_{k != m} s_k))``,
    the others 0."""
    scores = scores.detach().float()
    m = scores.numel()
    dominant = m - 1 - int(torch.argmax(scores.flip(0)))
    others = torch.cat([scores[:dominant], scores[dominant + 1:]])
    beta = torch.zeros(m, dtype=torch.float32, device=scores.device)
    beta[dominant] = strengths[dominant].float() * torch.exp(torch.tanh(scores[dominant] - others.max()))
    return beta


@torch.no_grad()
def add_proximal_gradient(params: Sequence[Tensor], anchors: Sequence[Tensor], beta: Tensor | float) -> None:
    """``g <- g + beta (theta - theta_anchor)`` in place on every parameter that has a gradient."""
    for p, a in zip(params, anchors):
        if p.grad is not None:
            p.grad.add_(p.detach() - a.to(p.dtype), alpha=float(beta))


__all__ = ["add_proximal_gradient", "fisher_trace", "inforeg_coefficients", "prime_window_slope"]
