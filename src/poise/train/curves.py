"""Per-epoch learning curves of every head (G-Blend's evidence) and the modality gap, from forward passes
the trainer already runs: the training epoch's own forwards and the validation pass.

Heads: ``fused`` (the model's fused logits, ``output.logits``) and each modality's unimodal logits. A
head's training loss is the mean cross-entropy over the epoch's training batches as they were seen (no
extra pass: the model moves during the epoch), its validation loss the mean over the validation split
after the epoch; a modality's head counts only the samples that have the modality.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from poise.functional.curves import centroid_gaps, normalized_feature_sums, overfitting_to_generalization_ratio

FUSED_HEAD = "fused"


def head_names(modalities: tuple[str, ...] | list[str]) -> list[str]:
    return [FUSED_HEAD, *modalities]


@torch.no_grad()
def head_loss_sums(output, batch) -> Tensor:
    """(H, 2): per head (fused, then each modality of ``output.unimodal_logits``) the summed
    cross-entropy and the number of samples it is over."""
    present = {m: batch.present_of(m) for m in output.unimodal_logits}
    return head_loss_sums_of(output.logits, output.unimodal_logits, batch.labels, present)


@torch.no_grad()
def head_loss_sums_of(logits: Tensor, unimodal_logits: dict[str, Tensor], labels: Tensor,
                      present: dict[str, Tensor]) -> Tensor:
    """:func:`head_loss_sums` on tensors: ``present`` maps each modality to its (B,) bool mask."""
    rows = [(logits, None)] + [(z, present[m]) for m, z in unimodal_logits.items()]
    out = []
    for z, keep in rows:
        # classes first: torch's CPU log-softmax along a short last dimension costs ~100 ns a row, along the first ~10
        log_p = torch.log_softmax(z.detach().float().t(), dim=0)
        ce = -log_p.gather(0, labels.view(1, -1)).squeeze(0)
        if keep is None:
            out.append(torch.stack([ce.sum(), ce.new_tensor(float(len(ce)))]))
            continue
        keep = keep.to(ce.dtype)
        out.append(torch.stack([(ce * keep).sum(), keep.sum()]))
    return torch.stack(out)


def head_means(sums: Tensor | None, names: list[str]) -> dict[str, float]:
    """head -> mean loss (NaN for a head without samples)."""
    if sums is None:
        return {}
    return {h: float(sums[i, 0] / sums[i, 1]) if float(sums[i, 1]) > 0 else math.nan for i, h in enumerate(names)}


class ValidationCurves:
    """Called on every validation batch's output: adds up each head's loss and, with ``gap_dim`` (the
    common feature size of features that share one space), each modality's L2-normalised features for
    the modality gap. The sums start at zero, so that a process without a batch still takes part in the
    reduction over processes."""

    def __init__(self, modalities: tuple[str, ...], device: torch.device, gap_dim: int | None = None):
        self.modalities = tuple(modalities)
        self.heads = torch.zeros(len(self.modalities) + 1, 2, device=device)
        self.feature_sums = None if gap_dim is None else torch.zeros(len(self.modalities), gap_dim, device=device)
        self.feature_counts = None if gap_dim is None else torch.zeros(len(self.modalities), device=device)

    @classmethod
    def for_model(cls, model, device: torch.device) -> ValidationCurves:
        """Head losses always; the modality gap where the model's fusion puts every modality's features in
        one space (``Fusion.shares_feature_space``) of one size."""
        widths = set(model.fusion.feature_dims.values())
        gap_dim = widths.pop() if model.fusion.shares_feature_space and len(widths) == 1 else None
        return cls(model.modalities, device, gap_dim)

    def __call__(self, output, batch) -> None:
        self.heads += head_loss_sums(output, batch)
        if self.feature_sums is not None:
            features = {m: output.features[m] for m in self.modalities}
            s, c = normalized_feature_sums(features, {m: batch.present_of(m) for m in self.modalities})
            self.feature_sums += s
            self.feature_counts += c

    def tensors(self) -> list[Tensor]:
        """What is summed over processes, in a fixed order."""
        return [t for t in (self.heads, self.feature_sums, self.feature_counts) if t is not None]

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"head_loss": head_means(self.heads, head_names(self.modalities))}
        if self.feature_sums is not None:
            out["modality_gap"] = centroid_gaps(self.feature_sums, self.feature_counts, list(self.modalities))
        return out


def ogr_entry(previous: dict[str, Any] | None, train: dict[str, float], val: dict[str, float]) -> dict[str, float | None]:
    """Each head's ``|dO / dG|`` between the previous epoch's history entry and this epoch; None where it
    is undefined (first epoch, a head without a previous value, ``dG = 0``, a loss that is not finite)."""
    before_train = (previous or {}).get("head_train_loss", {})
    before_val = ((previous or {}).get("val") or {}).get("head_loss", {})
    out: dict[str, float | None] = {}
    for head in train:
        if head not in before_train or head not in before_val or head not in val:
            out[head] = None
            continue
        out[head] = overfitting_to_generalization_ratio(before_train[head], before_val[head], train[head], val[head])
    return out


__all__ = ["FUSED_HEAD", "ValidationCurves", "head_loss_sums", "head_loss_sums_of", "head_means", "head_names", "ogr_entry"]
