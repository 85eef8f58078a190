"""Gradient-Blending (Wang, Tran and Feiszli, CVPR 2020): loss weights for the unimodal and fused heads
from how each head generalises and overfits over a short training window.

Every head ``i`` (each modality's own head, and ``"fused"``) is measured at two checkpoints, N and N + n:
its mean loss on a train subset T' (``L^T``) and on a held-out split V carved from the training data
(``L^V``). The overfitting is ``O = L^V - L^T``. The paper's weight is

    dG_i = L^V_{i,N} - L^V_{i,N+n}         (generalisation gained)
    dO_i = O_{i,N+n} - O_{i,N}             (overfitting gained)
    w_i  proportional to dG_i / dO_i^2,    normalised to sum to 1.

The paper's overfitting-to-generalisation ratio is ``OGR = |dO / dG|``: the sign of ``dO`` does not matter,
so a head whose held-out/train gap shrank (``dO < 0``) is weighted by ``dG / dO^2`` like one whose gap grew
by as much. Degenerate cases, decided per head:

- ``dG_i <= 0`` (the held-out loss did not fall): weight 0; training that head further does not help
  generalisation.
- ``|dO_i| < floor`` (1e-4 by default) while ``dG_i > 0``: ``|dO_i|`` is raised to ``floor``. The formula's
  weight grows without bound as ``dO -> 0``; the guard caps it at ``dG_i / floor^2``, so such a head takes
  nearly all the weight (several such heads share it by their ``dG``), and ``dO = 0`` does not divide by 0.
  The guard touches only ``|dO|`` below ``floor``: a clearly negative ``dO`` is used as it is.
- every head has ``dG_i <= 0`` (no head generalised better): uniform weights ``1 / K``; the fallback is
  reported (:func:`normalise_blend_weights`).

The MultiBench form (``form="multibench"``, ``training_structures/gradient_blend.py`` with its default
``delta = False``) uses no deltas: ``G_i = L^V_{i,N+n}`` and ``O_i = L^V_{i,N+n} - L^T_{i,N+n}``,
``O_i`` replaced by 1e-4 when it is negative, ``w_i = |G_i| / O_i^2``, normalised. MultiBench leaves
``0 <= O_i < 1e-4`` as it is and divides by zero at ``O_i = 0``; here ``O_i = 0`` is floored too (the only
departure). Its losses at N are measured but unused. (Its ``delta = True`` switch computes
``|L^V_{N+n} - L^V_N| / dO^2``, which, through the absolute value, also rewards a head whose held-out
loss rose.)
"""

from __future__ import annotations

import math
from typing import Literal

GBlendForm = Literal["paper", "multibench"]

#: floor of the overfitting term; MultiBench's constant
DEFAULT_OVERFITTING_FLOOR = 1e-4


def _check_losses(losses: dict[str, dict[str, float]]) -> list[str]:
    """The head names, after checking that every checkpoint names the same heads with finite losses."""
    names = list(next(iter(losses.values())))
    if not names:
        raise ValueError("gblend_weights needs the losses of at least one head")
    for label, values in losses.items():
        if set(values) != set(names):
            raise ValueError(f"{label} names heads {sorted(values)}, expected {sorted(names)}")
        for head, value in values.items():
            if not math.isfinite(float(value)):
                raise ValueError(f"{label}['{head}'] is {value}, losses must be finite")
    return names


def overfitting_to_generalization(
    train_start: dict[str, float], val_start: dict[str, float], train_end: dict[str, float], val_end: dict[str, float]
) -> dict[str, tuple[float, float]]:
    """``(dG_i, dO_i)`` per head: generalisation and overfitting gained between checkpoints N and N + n."""
    names = _check_losses({"train_start": train_start, "val_start": val_start, "train_end": train_end, "val_end": val_end})
    out = {}
    for h in names:
        gain = float(val_start[h]) - float(val_end[h])
        overfit = (float(val_end[h]) - float(train_end[h])) - (float(val_start[h]) - float(train_start[h]))
        out[h] = (gain, overfit)
    return out


def gblend_raw_weights(
    train_start: dict[str, float],
    val_start: dict[str, float],
    train_end: dict[str, float],
    val_end: dict[str, float],
    *,
    form: GBlendForm = "paper",
    floor: float = DEFAULT_OVERFITTING_FLOOR,
) -> dict[str, float]:
    """Unnormalised weights (see the module docstring for both forms and the guard rule)."""
    if floor <= 0:
        raise ValueError(f"floor must be positive, got {floor}")
    if form == "paper":
        raw = {}
        for h, (gain, overfit) in overfitting_to_generalization(train_start, val_start, train_end, val_end).items():
            raw[h] = 0.0 if gain <= 0 else gain / max(abs(overfit), floor) ** 2
        return raw
    if form == "multibench":
        names = _check_losses({"train_start": train_start, "val_start": val_start, "train_end": train_end, "val_end": val_end})
        raw = {}
        for h in names:
            generalization = float(val_end[h])
            overfit = float(val_end[h]) - float(train_end[h])
            if overfit <= 0:
                overfit = floor
            raw[h] = abs(generalization) / overfit**2
        return raw
    raise ValueError(f"unknown Gradient-Blending form '{form}' (expected 'paper' or 'multibench')")


def normalise_blend_weights(raw: dict[str, float]) -> tuple[dict[str, float], bool]:
    """Raw weights scaled to sum to 1, and whether they fell back to uniform ``1 / K`` (every raw weight
    0: no head's held-out loss fell)."""
    total = sum(raw.values())
    if total <= 0 or not math.isfinite(total):
        return {h: 1.0 / len(raw) for h in raw}, True
    return {h: w / total for h, w in raw.items()}, False


def gblend_weights(
    train_start: dict[str, float],
    val_start: dict[str, float],
    train_end: dict[str, float],
    val_end: dict[str, float],
    *,
    form: GBlendForm = "paper",
    floor: float = DEFAULT_OVERFITTING_FLOOR,
) -> dict[str, float]:
    """Blending weights, one per head, summing to 1.

    Each argument maps head name (modality names and ``"fused"``) to a mean loss: train subset T' and
    held-out split V at checkpoint N (``*_start``) and N + n (``*_end``). ``form="paper"``:
    ``w_i ~ dG_i / dO_i^2`` with the guard rule of the module docstring; ``form="multibench"``:
    ``w_i ~ L^V_{i,N+n} / O_{i,N+n}^2``. When every raw weight is 0 the weights are uniform
    (:func:`normalise_blend_weights` also says whether that happened).
    """
    raw = gblend_raw_weights(train_start, val_start, train_end, val_end, form=form, floor=floor)
    return normalise_blend_weights(raw)[0]


def mix_with_uniform(weights: dict[str, float], min_weight: float) -> dict[str, float]:
    """``w_i <- m + (1 - K m) w_i``: every weight at least ``m`` and the sum still 1 (needs ``K m <= 1``).
    Keeps a head whose estimate came out at 0 (often the fused head early in a short run) in training."""
    k = len(weights)
    if not 0.0 <= min_weight * k <= 1.0:
        raise ValueError(f"min_weight must be in [0, 1/{k}] for {k} heads, got {min_weight}")
    return {h: min_weight + (1.0 - k * min_weight) * w for h, w in weights.items()}


__all__ = [
    "DEFAULT_OVERFITTING_FLOOR",
    "GBlendForm",
    "gblend_raw_weights",
    "gblend_weights",
    "mix_with_uniform",
    "normalise_blend_weights",
    "overfitting_to_generalization",
]
