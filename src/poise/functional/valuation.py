"""Sample- and modality-level valuation (Wei et al., CVPR 2024): each modality's per-sample Shapley
contribution to a correct prediction, and how many training copies that asks for."""

from __future__ import annotations

import math
from itertools import combinations

import torch
from torch import Tensor


def sample_shapley_values(correct: dict[frozenset[str], Tensor],
                          present: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Per-sample exact Shapley value of each modality for ``v(S) = |S| * 1[the prediction from S alone is
    correct]`` (``v(empty) = 0``). ``correct`` maps every non-empty subset of the modalities to a (B,)
    boolean tensor. For two modalities ``phi_a = (v_a + v_all - v_v) / 2`` with ``v_all = 2 * 1[fused correct]``.

    ``present`` (modality -> (B,) bool): a sample's absent modalities are not players, ``v(S)`` being
    ``v(S and present)``; their value is then 0 and the others' are those of the game over the present ones."""
    modalities = sorted(set().union(*correct))
    n = len(modalities)
    missing = [frozenset(s) for k in range(1, n + 1) for s in combinations(modalities, k) if frozenset(s) not in correct]
    if missing:
        raise ValueError(f"sample_shapley_values needs every non-empty subset of {modalities}; missing {sorted(missing[0])}")
    first = next(iter(correct.values()))

    def value(subset: frozenset[str]) -> Tensor:
        if not subset:
            return torch.zeros(first.shape, dtype=torch.float32, device=first.device)
        if present is None:
            return len(subset) * correct[subset].float()
        # v(S) = v(S and present): sum over T in S of 1[S and present = T] |T| 1[correct from T]
        total = torch.zeros(first.shape, dtype=torch.float32, device=first.device)
        members = sorted(subset)
        for k in range(1, len(members) + 1):
            for t in combinations(members, k):
                here = torch.ones(first.shape, dtype=torch.float32, device=first.device)
                for m in members:
                    here = here * (present[m].float() if m in t else 1.0 - present[m].float())
                total = total + here * k * correct[frozenset(t)].float()
        return total

    out = {}
    for m in modalities:
        others = [k for k in modalities if k != m]
        phi = torch.zeros(first.shape, dtype=torch.float32, device=first.device)
        for k in range(len(others) + 1):
            weight = math.factorial(k) * math.factorial(n - k - 1) / math.factorial(n)
            for s in combinations(others, k):
                s = frozenset(s)
                phi = phi + weight * (value(s | {m}) - value(s))
        out[m] = phi
    return out


def sample_copies(phi: Tensor, max_copies: int = 3) -> Tensor:
    """Copies of a sample that train modality ``m`` alone: ``round(2 (1 - phi_m))`` clipped to
    ``[0, max_copies]``; for two modalities the released 1, 2, 3 copies for ``phi = 1/2, 0, -1/2`` and none
    for ``phi >= 1``."""
    return torch.round(2.0 * (1.0 - phi)).clamp(0, max_copies).long()


def modality_copies(mean_phi: dict[str, float], alpha: float, num_samples: int) -> tuple[str, int]:
    """Modality level: ``floor(|phi_strong - phi_weak| * 2/3 * alpha * N)`` copies with the strongest
    modality zeroed; returns (strongest modality, number of copies)."""
    strong = max(mean_phi, key=lambda m: mean_phi[m])
    weak = min(mean_phi, key=lambda m: mean_phi[m])
    count = math.floor(abs(mean_phi[strong] - mean_phi[weak]) * (2.0 / 3.0) * alpha * num_samples)
    return strong, count


__all__ = ["modality_copies", "sample_copies", "sample_shapley_values"]
