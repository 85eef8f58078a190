"""MLA: multimodal learning with alternating unimodal adaptation (Zhang et al., CVPR 2024).

One linear head ``g`` is shared by every modality (the ``shared`` fusion). Per batch, for each
modality ``m`` in a fixed order: ``loss_m = CE(g(h_m), y)`` over the samples that have ``m``, backward,
head-gradient modification, optimizer step, zero grad. The encoders' features come from the one
forward pass of the step; after a step the head has changed in place, so the next modality's logits
are recomputed from its features with the updated head. An encoder only ever receives gradients from
its own modality's loss, and ``zero_grad(set_to_none=True)`` leaves the others' gradients ``None``, so
SGD and AdamW skip them entirely (no momentum, no weight decay) during other modalities' steps.

Head-gradient modification, paper order: ``P_0 = I``; the step of modality ``m`` uses ``grad_W P`` where
``P`` has absorbed the mean features of every step before it (so, at the step of ``m``, the mean
feature of the modality trained just before, ``P <- owm_update(P, mean h_prev, alpha)``); here that
update is done right after each step, with the features of the modality just trained. The released
code instead updates ``P`` with the CURRENT modality's mean feature before projecting that same
modality's gradient, skips the very first step of the run, and uses its own update formula and alpha
schedule (see :mod:`poise.functional.mla`).

Test time: ``sum_m lambda_m z_m`` over the present modalities, ``lambda`` from per-sample prediction
entropy (paper), from the released batch-dimension softmax, or fixed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

from poise.errors import IncompatibleError
from poise.functional.mla import (
    entropy_fusion_weights,
    entropy_fusion_weights_released,
    fixed_fusion_weights,
    fuse_logits,
    owm_project,
    owm_update,
    owm_update_released,
    released_owm_alpha,
)
from poise.methods.base import Method, MethodParams
from poise.models.fusion import SharedHeadFusion
from poise.train.distributed import all_reduce_sum

if TYPE_CHECKING:
    from poise.data.base import DatasetInfo
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput
    from poise.train.context import TrainContext

#: the released code's fixed fusion weights (``--av_alpha 0.55``; ``--a/v/t_alpha 0.35/0.25/0.4``)
RELEASED_FIXED_WEIGHTS = {2: (0.55, 0.45), 3: (0.35, 0.25, 0.40)}
PAPER_OWM_ALPHA = 0.1


class MLAParams(MethodParams):
    variant: Literal["paper", "released"] = Field(
        "paper",
        description="paper: RLS projection with the previous step's mean feature, per-sample entropy fusion; "
        "released: the authors' code (element-wise OWM division, Frobenius-normalised P, alpha schedule "
        "0.1^(1 + batch/len) reset every epoch, batch-dimension entropy softmax, fixed weights 0.55/0.45)",
    )
    alternate: bool = Field(True, description="one optimizer step per modality; false: one joint step on the sum of unimodal losses")
    gradient_modification: bool = Field(True, description="project the shared head's weight gradient with the OWM matrix P")
    dynamic_fusion: bool = Field(True, description="entropy-weighted test-time fusion; false: fixed weights")
    fixed_weights: list[float] | None = Field(
        None,
        description="fusion weights per modality in dataset order when dynamic_fusion is false "
        "(default: equal; the released variant uses 0.55/0.45 or 0.35/0.25/0.40)",
    )
    owm_alpha: float | None = Field(
        None, gt=0, description="alpha of the OWM update (default: 0.1 for the paper variant, the released schedule for the released one)"
    )
    modality_order: list[str] | None = Field(None, description="order of the alternating unimodal steps (default: dataset order)")

    @field_validator("fixed_weights")
    @classmethod
    def _weights_positive(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and (any(w < 0 for w in value) or sum(value) <= 0):
            raise ValueError("fixed_weights must be non-negative with a positive sum")
        return value


class MLA(Method):
    """Alternating unimodal steps through one shared head, OWM head-gradient projection and
    test-time uncertainty-weighted fusion. Handles missing modalities natively: each modality trains
    on the samples that have it and only present modalities are fused."""

    name = "mla"
    Params: ClassVar[type[MethodParams]] = MLAParams
    default_fusion = "shared"
    fusions = ("shared",)
    owns_optimizer_step = True
    multiple_backward = True

    def __init__(self, params: MethodParams | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.params: MLAParams
        #: the OWM projection matrix (d, d), float64 so that thousands of rank-one updates stay accurate
        self.projection: Tensor | None = None
        #: head steps the projection has seen (the released code leaves the first one unprojected)
        self.owm_steps = 0
        self.batch_index = 0
        self.batches_per_epoch = 1
        self.model_modalities: tuple[str, ...] = ()
        self.order: tuple[str, ...] = ()
        self._counts: tuple[dict[str, int], dict[str, int]] = ({}, {})

    # ---- start-up --------------------------------------------------------------------------------
    def check(self, info: DatasetInfo, modalities: tuple[str, ...], fusion: str) -> None:
        super().check(info, modalities, fusion)
        p = self.params
        if p.fixed_weights is not None and len(p.fixed_weights) != len(modalities):
            raise IncompatibleError(
                f"method 'mla' got {len(p.fixed_weights)} fixed_weights for {len(modalities)} modalities ({', '.join(modalities)})"
            )
        if p.modality_order is not None and sorted(p.modality_order) != sorted(modalities):
            raise IncompatibleError(
                f"method 'mla' modality_order {p.modality_order} must list each of the modalities {list(modalities)} once"
            )

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        head = self._head()
        self.projection = torch.eye(head.in_features, dtype=torch.float64, device=ctx.device)
        self.owm_steps = 0
        self.model_modalities = tuple(ctx.model.modalities)
        self.order = tuple(self.params.modality_order or self.model_modalities)

    def _head(self) -> torch.nn.Linear:
        fusion = self.ctx.model.fusion
        if not isinstance(fusion, SharedHeadFusion):
            raise IncompatibleError(f"method 'mla' needs the shared-head fusion, the model has {type(fusion).__name__}")
        return fusion.head

    # ---- training --------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, loader) -> None:
        self.batch_index = 0
        try:
            self.batches_per_epoch = max(len(loader), 1)
        except TypeError:  # an iterable loader without a length: the schedule stays at its start
            self.batches_per_epoch = 1
        return None

    @staticmethod
    def _unimodal_loss(logits: Tensor, labels: Tensor, rows: Tensor, count: int, batch_size: int) -> Tensor:
        if count == batch_size:
            return F.cross_entropy(logits, labels)
        if count == 0:  # keeps the graph so that every rank can call backward
            return logits.sum() * 0.0
        return F.cross_entropy(logits[rows], labels[rows])

    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        """Per-modality cross-entropy of the shared head, over the samples that have the modality. In
        alternating mode the terms of the second and later modalities are recomputed in ``backward``
        with the head as it is after the previous steps (and replaced in this dict, so the logged
        value is the one trained on)."""
        local = torch.stack([batch.present_of(m).sum() for m in self.order])
        both = torch.stack([local, all_reduce_sum(local)]).tolist()  # one host sync per batch
        self._counts = (dict(zip(self.order, both[0])), dict(zip(self.order, both[1])))
        return {
            f"ce_{m}": self._unimodal_loss(output.unimodal_logits[m], batch.labels, batch.present_of(m), self._counts[0][m], len(batch))
            for m in self.order
        }

    def backward(self, terms: dict[str, Tensor], output: ModelOutput, batch: MultimodalBatch) -> None:
        ctx = self.ctx
        local, total = self._counts
        ctx.optimizer.zero_grad(set_to_none=True)
        trained = [m for m in self.order if total[m] > 0]  # a modality absent on every rank is skipped
        if not self.params.alternate:
            if trained:
                ctx.backward(torch.stack([terms[f"ce_{m}"] for m in trained]).sum())
                self._head_step(trained, output, batch)
        else:
            head_moved = False
            for m in trained:
                key = f"ce_{m}"
                if head_moved:
                    with ctx.autocast():
                        logits = ctx.model.fusion.unimodal({m: output.features[m]})[m]
                        terms[key] = self._unimodal_loss(logits, batch.labels, batch.present_of(m), local[m], len(batch))
                # gradients averaged over processes and unscaled when this returns: the projection reads them
                ctx.backward(terms[key])
                self._head_step([m], output, batch)
                head_moved = True
        if self.params.gradient_modification and self.projection is not None:
            self.record("owm/trace", torch.trace(self.projection))
        self.batch_index += 1

    def _head_step(self, modalities: list[str], output: ModelOutput, batch: MultimodalBatch) -> None:
        """Gradient modification for the modalities of this step, then the optimizer step."""
        p = self.params
        if not p.gradient_modification:
            self.ctx.optimizer_step()
            return
        means = [self._mean_feature(output.features[m], batch.present_of(m)) for m in modalities]
        if p.variant == "released":
            if self.owm_steps > 0:
                alpha = p.owm_alpha if p.owm_alpha is not None else released_owm_alpha(self.batch_index, self.batches_per_epoch)
                for h in means:
                    self.projection = owm_update_released(self.projection, h, alpha)
                self._project(modalities, self.projection.T)
            self.ctx.optimizer_step()
        else:
            self._project(modalities, self.projection)
            self.ctx.optimizer_step()
            alpha = p.owm_alpha if p.owm_alpha is not None else PAPER_OWM_ALPHA
            for h in means:  # absorbed now, used from the next step on
                self.projection = owm_update(self.projection, h, alpha)
        self.owm_steps += 1

    def _project(self, modalities: list[str], matrix: Tensor) -> None:
        weight = self._head().weight
        if weight.grad is None:
            return
        raw = weight.grad
        projected = owm_project(raw, matrix)
        ratio = torch.linalg.vector_norm(projected) / torch.linalg.vector_norm(raw).clamp_min(1e-12)
        self.record(f"owm/head_grad_ratio/{'+'.join(modalities)}", ratio)
        weight.grad = projected

    def _mean_feature(self, features: Tensor, rows: Tensor) -> Tensor:
        """Mean feature over the samples that have the modality, on every rank together."""
        h = features.detach()[rows].to(torch.float64)
        stats = torch.cat([h.sum(0), h.new_tensor([h.shape[0]])])
        stats = all_reduce_sum(stats)
        return stats[:-1] / stats[-1].clamp_min(1.0)

    # ---- evaluation ------------------------------------------------------------------------------
    def fusion_weights(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        names = self.model_modalities or tuple(output.unimodal_logits)
        logits = {m: output.unimodal_logits[m] for m in names}
        present = torch.stack([batch.present_of(m) for m in names], dim=1)
        p = self.params
        if p.dynamic_fusion:
            if p.variant == "released":
                per_batch = entropy_fusion_weights_released(logits, present)
                expanded = torch.stack([per_batch[m].expand(len(batch)) for m in names], dim=1)
                weights = expanded * present.to(expanded.dtype)
                weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-12)
                return {m: weights[:, j] for j, m in enumerate(names)}
            return entropy_fusion_weights(logits, present)
        fixed = p.fixed_weights
        if fixed is None:
            fixed = RELEASED_FIXED_WEIGHTS.get(len(names)) if p.variant == "released" else None
            fixed = fixed or [1.0] * len(names)
        return fixed_fusion_weights(fixed, names, present)

    def predict(self, output: ModelOutput, batch: MultimodalBatch) -> Tensor:
        weights = self.fusion_weights(output, batch)
        for m in weights:
            rows = batch.present_of(m)
            self.record(f"fusion_weight/{m}", (weights[m] * rows).sum() / rows.sum().clamp_min(1))
        return fuse_logits({m: output.unimodal_logits[m] for m in weights}, weights)

    # ---- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "projection": None if self.projection is None else self.projection.detach().clone(),
            "owm_steps": self.owm_steps,
            "batch_index": self.batch_index,
            "batches_per_epoch": self.batches_per_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        projection = state.get("projection")
        if projection is not None:
            device = self.projection.device if self.projection is not None else projection.device
            self.projection = projection.detach().clone().to(device=device, dtype=torch.float64)
        self.owm_steps = int(state.get("owm_steps", 0))
        self.batch_index = int(state.get("batch_index", 0))
        self.batches_per_epoch = int(state.get("batches_per_epoch", 1))
