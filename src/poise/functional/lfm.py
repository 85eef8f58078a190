"""LFM (Yang et al., NeurIPS 2024, "Facilitating Multimodal Classification via Dynamically Learning Modality
Gap"): the fused cross-entropy and an alignment (Jensen-Shannon) term between the modalities' predictions,
mixed by weights that move from alignment towards classification over training."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: alpha_cls(e) = sum_i c_i e^i: the released polynomial fit of the learnable schedule (Crema_epoch.py)
LFM_FITTED_COEFFICIENTS = (2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08,
                           -5.39717505e-11)


def lfm_schedule(epoch: float) -> tuple[float, float]:
    """The fitted schedule ``(alpha_cls, alpha_align)`` at ``epoch``: ``alpha_cls = sum_i c_i epoch^i`` with
    the released coefficients, ``alpha_align = 1 - alpha_cls``."""
    alpha_cls = sum(c * float(epoch) ** i for i, c in enumerate(LFM_FITTED_COEFFICIENTS))
    return alpha_cls, 1.0 - alpha_cls


def js_divergence(p_logits: Tensor, q_logits: Tensor, form: Literal["js", "released"] = "js") -> Tensor:
    """Per-sample divergence (B,) between the softmax distributions ``p`` and ``q`` of two (B, C) logits,
    with ``m = (p + q) / 2``.

    js: the Jensen-Shannon divergence ``(KL(p || m) + KL(q || m)) / 2``. released: ``(KL(m || p) + KL(m || q)) / 2``,
    what the released ``Alignment`` computes (``F.kl_div(p.log(), m)`` is ``KL(m || p)``): also zero only when
    ``p = q``, but unbounded where the JS divergence is at most ``log 2``."""
    log_p = F.log_softmax(p_logits.float(), dim=-1)
    log_q = F.log_softmax(q_logits.float(), dim=-1)
    p, q = log_p.exp(), log_q.exp()
    m = 0.5 * (p + q)
    log_m = m.clamp_min(torch.finfo(m.dtype).tiny).log()
    if form == "js":
        kl_p = (p * (log_p - log_m)).sum(-1)
        kl_q = (q * (log_q - log_m)).sum(-1)
    elif form == "released":
        kl_p = (m * (log_m - log_p)).sum(-1)
        kl_q = (m * (log_m - log_q)).sum(-1)
    else:
        raise ValueError(f"js_divergence form must be 'js' or 'released', not '{form}'")
    return 0.5 * (kl_p + kl_q)


def pairwise_alignment(unimodal_logits: dict[str, Tensor], rows: dict[str, Tensor] | None = None,
                       form: Literal["js", "released"] = "js") -> Tensor:
    """Mean over the pairs of modalities of the mean ``js_divergence`` over the samples that have both
    (``rows``: modality -> (B,) bool; None: every sample). A pair no sample has both of adds zero."""
    names = list(unimodal_logits)
    if len(names) < 2:
        raise ValueError(f"pairwise_alignment needs at least two modalities, got {names}")
    total = None
    pairs = list(itertools.combinations(names, 2))
    for a, b in pairs:
        d = js_divergence(unimodal_logits[a], unimodal_logits[b], form)
        if rows is None:
            term = d.mean()
        else:
            both = (rows[a] & rows[b]).to(d.dtype)
            term = (d * both).sum() / both.sum().clamp_min(1)
        total = term if total is None else total + term
    assert total is not None
    return total / len(pairs)


def lfm_loss(classification: Tensor, alignment: Tensor, alpha_cls: float | Tensor, alpha_align: float | Tensor) -> Tensor:
    """``2 (alpha_cls * classification + alpha_align * alignment)``, as released."""
    return 2 * (alpha_cls * classification + alpha_align * alignment)


def lfm_alpha_lr(epoch: int, lr: float, halve_every: int = 20) -> float:
    """The learnable schedule's step size at ``epoch``: ``lr`` halved at every multiple of ``halve_every``."""
    return lr * 0.5 ** (epoch // halve_every)


def lfm_alpha_update(alpha_align: float, hypergradient: float, lr: float, low: float = 0.05,
                     high: float = 0.95) -> tuple[float, float]:
    """One step of the learnable schedule: ``alpha_align <- clip(alpha_align - lr * hypergradient, low, high)``;
    returns ``(alpha_cls, alpha_align)`` with ``alpha_cls = 1 - alpha_align``."""
    alpha_align = min(high, max(low, alpha_align - lr * hypergradient))
    return 1.0 - alpha_align, alpha_align


def hessian_vector_product(total: Tensor, classification: Tensor, params: Sequence[nn.Parameter]) -> list[Tensor]:
    """``H v`` per parameter, ``H`` the Hessian of ``total`` and ``v`` the gradient of ``classification``
    (both over ``params``, ``v`` held constant); zeros for a parameter neither loss reaches."""
    params = list(params)
    grads = torch.autograd.grad(total, params, create_graph=True, allow_unused=True)
    vector = torch.autograd.grad(classification, params, retain_graph=True, allow_unused=True)
    pairs = [(g, v.detach()) for g, v in zip(grads, vector) if g is not None and g.requires_grad and v is not None]
    if not pairs:
        return [torch.zeros_like(p) for p in params]
    inner = sum((g * v).sum() for g, v in pairs)
    hv = torch.autograd.grad(inner, params, allow_unused=True)
    return [torch.zeros_like(p) if h is None else h for p, h in zip(params, hv)]


__all__ = ["LFM_FITTED_COEFFICIENTS", "hessian_vector_product", "js_divergence", "lfm_alpha_lr", "lfm_alpha_update",
           "lfm_loss", "lfm_schedule", "pairwise_alignment"]
