"""MBSD (BalanceBenchmark's modality-balanced self-distillation; attributed to Liu et al. 2023).

Loss ``CE(fused) + sum_m CE(z_m) + mean over modality pairs of (1/B) sum_i w_i (A_i + KL_i)``: for each
pair (a, b) and sample i, ``w_i = |p_a(y) - p_b(y)|`` when at least one of the two classifies i correctly
(else 0), ``A_i = (1/C) ||z_a - z_b||^2`` and ``KL_i`` the divergence of the weaker modality's prediction
from the stronger one's. The mathematics is in :mod:`poise.functional.mbsd`.
"""

from __future__ import annotations

from itertools import combinations
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from poise.functional.mbsd import mbsd_alignment, mbsd_distillation_kl, mbsd_released_kl, mbsd_sample_weights
from poise.functional.losses import present_cross_entropy
from poise.methods.base import Method, MethodParams

if TYPE_CHECKING:
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput


class MBSDParams(MethodParams):
    kl: Literal["distribution", "released"] = Field(
        "distribution",
        description="distribution: KL(p_strong || p_weak) over the classes, teacher detached; released: "
        "F.kl_div(p_strong(y), p_weak(y)) on the two true-class probabilities, a probability passed where "
        "kl_div expects a log-probability (BalanceBenchmark's term; not a divergence)")
    alignment: Literal["logits", "probabilities"] = Field(
        "logits", description="what the (1/C)||.||^2 term compares: logits (released, two modalities) or "
        "softmax probabilities (released, three modalities)")


class MBSD(Method):
    """Fused and unimodal CE plus sample-weighted alignment and self-distillation between modality pairs."""

    name = "mbsd"
    family = "losses"
    Params: ClassVar[type[MethodParams]] = MBSDParams
    params: MBSDParams
    min_modalities = 2

    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        labels = batch.labels
        logits = {m: z.float() for m, z in output.unimodal_logits.items()}
        terms = {"ce": F.cross_entropy(output.logits.float(), labels)}
        for m, z in logits.items():
            terms[f"ce_{m}"] = present_cross_entropy(z, labels, batch.present_of(m).float())
        log_probs = {m: F.log_softmax(z, dim=1) for m, z in logits.items()}
        probs = {m: lp.exp() for m, lp in log_probs.items()}
        pairs = list(combinations(logits, 2))
        alignment, distillation = [], []
        for a, b in pairs:
            both = (batch.present_of(a) & batch.present_of(b)).float()
            # a weight, not a path for gradients: it says how much the pair disagrees on sample i
            w = mbsd_sample_weights(probs[a].detach(), probs[b].detach(), labels) * both
            if self.params.alignment == "logits":
                align = mbsd_alignment(logits[a], logits[b])
            else:
                align = mbsd_alignment(probs[a], probs[b])
            if self.params.kl == "distribution":
                kl = mbsd_distillation_kl(log_probs[a], log_probs[b], labels)
            else:
                kl = mbsd_released_kl(probs[a], probs[b], labels)
            alignment.append((w * align).sum() / len(labels))
            distillation.append((w * kl).sum() / len(labels))
            self.record(f"weight/{a}-{b}", w.sum() / both.sum().clamp_min(1))
        terms["alignment"] = torch.stack(alignment).mean()
        terms["distillation"] = torch.stack(distillation).mean()
        return terms
