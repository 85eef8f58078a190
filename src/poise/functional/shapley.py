"""AGM (ICCV 2023): exact Shapley mono-modal responses and the adaptive modulation coefficients."""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

EMPTY_MODES = ("zero", "output")


def shapley_responses(outputs: dict[frozenset[str], Tensor], modalities: tuple[str, ...],
                      empty: str = "zero") -> dict[str, Tensor]:
    """Each modality's exact Shapley response ``sum_{S not containing m} |S|!(M-|S|-1)!/M! (f(S+m) - f(S))``
    from the model's output on every subset of modalities (the others zeroed). ``empty="zero"``: the
    empty subset counts as 0 (AGM's released form; the responses sum to the full output);
    ``"output"``: the output with every modality zeroed, ``outputs[frozenset()]`` (the classic value)."""
    if empty not in EMPTY_MODES:
        raise ValueError(f"shapley_responses: empty must be one of {', '.join(EMPTY_MODES)}, not '{empty}'")
    M = len(modalities)
    if M < 2:
        raise ValueError(f"shapley_responses needs at least 2 modalities, got {M}")
    full = frozenset(modalities)
    if full not in outputs:
        raise ValueError("shapley_responses: outputs lacks the full set of modalities")

    def value(s: frozenset[str]) -> Tensor:
        if not s:
            if empty == "zero":
                return torch.zeros_like(outputs[full])
            if s not in outputs:
                raise ValueError("shapley_responses: empty='output' needs outputs[frozenset()] (every modality zeroed)")
        if s not in outputs:
            raise ValueError(f"shapley_responses: outputs lacks the subset {sorted(s)}")
        return outputs[s]

    responses = {}
    for m in modalities:
        others = [k for k in modalities if k != m]
        total = None
        for size in range(M):
            weight = math.factorial(size) * math.factorial(M - size - 1) / math.factorial(M)
            for subset in itertools.combinations(others, size):
                s = frozenset(subset)
                term = weight * (value(s | {m}) - value(s))
                total = term if total is None else total + term
        responses[m] = total
    return responses


def agm_coefficients(scores: Tensor, running: Tensor, alpha: float, clamp: float = 10.0) -> Tensor:
    """``k_m = exp(alpha * min(r*_m - r_m, clamp))`` with ``r_m = exp(M/(M-1) (mean_k s_k - s_m))`` from
    this batch's scores and ``r*_m`` the same of the running means ``running``: a modality that is more
    dominant now (lower loss) than on average is slowed (k < 1), one that is weaker is sped up."""
    M = scores.numel()
    c = M / (M - 1)
    r = torch.exp(c * (scores.mean() - scores))
    r_star = torch.exp(c * (running.mean() - running))
    return torch.exp(alpha * (r_star - r).clamp_max(clamp))
