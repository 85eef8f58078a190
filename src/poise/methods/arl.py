"""ARL (Wei, Luo and Luo, ICCV 2025, "Improving Multimodal Learning via Imbalanced Learning"): asymmetric
representation learning.

Loss ``CE(fused) + gamma sum_m CE(z_m)`` (unimodal losses through the model's own head, no extra
parameters). After the warm-up (``start`` epochs, where the unimodal losses have weight 1 and nothing is
scaled), each step weighs every modality by ``w = softmax(T v b)``: ``v`` from the inverse of its share of
the prediction entropy (variance), ``b`` from the other modalities' share of the logit magnitude (bias);
modality m's encoder gradient is multiplied by ``1 + w_m``. The mathematics is in
:mod:`poise.functional.arl`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from poise.config import FloatRange
from poise.functional.arl import arl_dependence_weights, logit_magnitude
from poise.functional.mla import prediction_entropy
from poise.functional.losses import present_cross_entropy
from poise.methods.base import Method, MethodParams
from poise.train.distributed import all_reduce_sum

if TYPE_CHECKING:
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput


class ARLParams(MethodParams):
    gamma: float = Field(4.0, ge=0, description="weight of the unimodal losses after the warm-up (released CREMA-D 4)")
    temperature: float = Field(8.0, gt=0, description="T of softmax(T v b) (released 8)")
    start: int = Field(5, ge=0, description="warm-up: the weighting acts from epoch start + 1 on (0-based, released 5)")
    entropy_floor: float = Field(0.3, ge=0, lt=1, description="floor of a modality's entropy share (released 0.3)")

    tunable = {"gamma": FloatRange(0.5, 8.0, log=True), "temperature": FloatRange(1.0, 16.0, log=True)}


class ARL(Method):
    """Unimodal losses with weight gamma, and each encoder's gradient scaled by 1 + w_m from the batch's
    entropies and logit magnitudes."""

    name = "arl"
    family = "gradients"
    Params: ClassVar[type[MethodParams]] = ARLParams
    params: ARLParams
    min_modalities = 2
    per_batch_decisions = True

    def _active(self) -> bool:
        assert self.ctx is not None, "setup() must run before training"
        return self.ctx.epoch > self.params.start

    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        gamma = self.params.gamma if self._active() else 1.0
        terms = {"ce": F.cross_entropy(output.logits.float(), batch.labels)}
        for m, z in output.unimodal_logits.items():
            terms[f"ce_{m}"] = gamma * present_cross_entropy(z, batch.labels, batch.present_of(m).float())
        return terms

    def after_backward(self, output: ModelOutput, batch: MultimodalBatch) -> None:
        """Estimate every step (recorded in the warm-up too, as ``dependence/<m>``); scale after it."""
        modalities = list(output.unimodal_logits)
        sums = []
        for m in modalities:
            z, rows = output.unimodal_logits[m].detach(), batch.present_of(m).float()
            sums.append(torch.stack([(prediction_entropy(z) * rows).sum(), (logit_magnitude(z) * rows).sum(), rows.sum()]))
        totals = all_reduce_sum(torch.stack(sums))  # (M, 3): entropy, magnitude, samples
        if bool((totals[:, 2] == 0).any()):
            return  # a modality absent from the whole step: no estimate for it, no scaling this step
        means = totals[:, :2] / totals[:, 2:]
        weights = arl_dependence_weights(means[:, 0], means[:, 1], self.params.temperature, self.params.entropy_floor)
        active = self._active()
        model = self.ctx.model
        for i, m in enumerate(modalities):
            scale = 1.0 + weights[i] if active else torch.ones_like(weights[i])
            if active:
                for p in model.modality_parameters(m):
                    if p.grad is not None:
                        p.grad.mul_(scale.to(p.grad.dtype))
            self.record(f"dependence/{m}", weights[i])
            self.record(f"scale/{m}", scale)
