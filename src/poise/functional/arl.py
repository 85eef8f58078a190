"""ARL (Wei et al., ICCV 2025, "Improving Multimodal Learning via Imbalanced Learning"): each modality's
dependence weight from its prediction entropy (variance) and the others' logit magnitude (bias)."""

from __future__ import annotations

import torch
from torch import Tensor


def logit_magnitude(logits: Tensor) -> Tensor:
    """(B,) ``sum_k |z_k|``."""
    return logits.float().abs().sum(dim=1)


def arl_dependence_weights(entropies: Tensor, magnitudes: Tensor, temperature: float = 8.0,
                           entropy_floor: float = 0.3) -> Tensor:
    """(M,) ``softmax_m(T * v_m * b_m)``: ``v_m`` the inverse of modality m's share of the summed mean
    entropies (floored at ``entropy_floor``), normalised to sum 1 (low variance -> large ``v_m``); ``b_m``
    the mean of the other modalities' shares of the summed mean logit magnitudes (for two modalities
    the other's share, as released). ``entropies``, ``magnitudes``: (M,) batch means."""
    m = entropies.numel()
    if m < 2 or magnitudes.numel() != m:
        raise ValueError(f"arl_dependence_weights: needs two or more modalities with one entropy and one magnitude each, "
                         f"got {m} and {magnitudes.numel()}")
    share = (entropies / entropies.sum()).clamp_min(entropy_floor)
    inverse = 1.0 / share
    inverse = inverse / inverse.sum()
    magnitude_share = magnitudes / magnitudes.sum()
    others = (1.0 - magnitude_share) / (m - 1)
    return torch.softmax(temperature * inverse * others, dim=0)
