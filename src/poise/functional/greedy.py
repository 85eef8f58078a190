"""MMTM mid-fusion (Joze et al., CVPR 2020) and the balanced multi-modal learning of Wu et al. (ICML 2022,
"Characterizing and overcoming the greedy nature of learning in multi-modal deep neural networks").

MMTM, for modalities m with feature maps ``A_m`` of shape (B, C_m, *spatial):
``S_m = mean over spatial(A_m)``, ``Z = ReLU(W [S_1, ..., S_M] + b)``, ``E_m = W_m Z + b_m``,
``A'_m = gate_scale * sigmoid(E_m) (x) A_m`` (the paper's ``gate_scale`` is 2: a gate of 1 is the identity).

The greedy learner's conditional learning speed of modality m compares how fast the parameters that carry
the other modalities into m's branch (the MMTM layers: m's excitation and the shared squeeze) learn, with
how fast m's own branch learns, each as ``sum ||grad||^2 / sum ||weight||^2`` summed over steps:
``speed_m = log10(bypass_m / main_m)``. A large gap means one branch leans on the others.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def squeeze(feature_map: Tensor) -> Tensor:
    """(B, C, *spatial) -> (B, C): the mean over every spatial (and time) position; (B, C) stays as it is."""
    return feature_map.flatten(2).mean(dim=2) if feature_map.dim() > 2 else feature_map


def mmtm_gates(squeezed: Sequence[Tensor], squeeze_weight: Tensor, squeeze_bias: Tensor | None,
               excite_weights: Sequence[Tensor], excite_biases: Sequence[Tensor | None],
               gate_scale: float = 2.0) -> list[Tensor]:
    """Per-modality channel gates (B, C_m) from the squeezed maps (B, C_m), in one order throughout:
    ``gate_m = gate_scale * sigmoid(W_m ReLU(W [S_1..S_M] + b) + b_m)``."""
    joint = F.relu(F.linear(torch.cat(list(squeezed), dim=1), squeeze_weight, squeeze_bias))
    return [gate_scale * torch.sigmoid(F.linear(joint, w, b)) for w, b in zip(excite_weights, excite_biases)]


def apply_gate(feature_map: Tensor, gate: Tensor) -> Tensor:
    """``feature_map`` (B, C, *spatial) times ``gate`` (B, C) or (C,), broadcast over the positions."""
    if gate.dim() == 1:
        gate = gate.unsqueeze(0)
    return feature_map * gate.view(*gate.shape, *([1] * (feature_map.dim() - 2))).to(feature_map.dtype)


def mmtm(feature_maps: Sequence[Tensor], squeeze_weight: Tensor, squeeze_bias: Tensor | None,
         excite_weights: Sequence[Tensor], excite_biases: Sequence[Tensor | None], gate_scale: float = 2.0,
         present: Sequence[Tensor | None] | None = None,
         fixed_gates: dict[int, Tensor] | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """The multimodal transfer module on one stage: returns the gated maps and the gates (B, C_m).

    ``present``: per modality an optional (B,) mask; a missing sample's squeezed vector is zero (its map
    carries nothing). ``fixed_gates``: modality index -> a (C_m,) gate used instead of the computed one for
    every sample (the greedy re-balancing step: no information from the others reaches that branch)."""
    squeezed = [squeeze(a) for a in feature_maps]
    if present is not None:
        squeezed = [s if keep is None else s * keep.view(-1, 1).to(s.dtype) for s, keep in zip(squeezed, present)]
    gates = mmtm_gates(squeezed, squeeze_weight, squeeze_bias, excite_weights, excite_biases, gate_scale)
    for i, gate in (fixed_gates or {}).items():
        gates[i] = gate.to(gates[i].dtype).expand_as(gates[i])
    return [apply_gate(a, g) for a, g in zip(feature_maps, gates)], gates


def squared_norm_ratio(grads: Iterable[Tensor | None], weights: Iterable[Tensor]) -> Tensor:
    """``sum_p ||g_p||^2 / sum_p ||w_p||^2`` over a group of parameters (a missing gradient counts 0)."""
    weights = list(weights)
    grads = list(grads)
    num = sum((g.detach().float().pow(2).sum() for g in grads if g is not None), torch.zeros((), device=weights[0].device))
    den = sum((w.detach().float().pow(2).sum() for w in weights), torch.zeros((), device=weights[0].device))
    return num / den.clamp_min(torch.finfo(torch.float32).tiny)


def conditional_learning_speeds(bypass: Tensor, main: Tensor) -> Tensor:
    """(M,) ``log10(bypass_m / main_m)`` from the per-modality sums of squared-norm ratios over steps."""
    tiny = torch.finfo(torch.float32).tiny
    return torch.log10(bypass.clamp_min(tiny)) - torch.log10(main.clamp_min(tiny))


def rebalance_target(speeds: Tensor, threshold: float) -> int | None:
    """The modality whose branch a re-balancing step trains on its own input: the one with the largest
    conditional learning speed (it learns most through the others), when the gap between the largest and the
    smallest exceeds ``threshold``; None otherwise. With two modalities: ``|speed_0 - speed_1| > threshold``,
    modality 0 when ``speed_0 > speed_1``."""
    gap = speeds.max() - speeds.min()
    if not bool(gap > threshold):
        return None
    return int(torch.argmax(speeds))


__all__ = ["apply_gate", "conditional_learning_speeds", "mmtm", "mmtm_gates", "rebalance_target", "squared_norm_ratio",
           "squeeze"]
