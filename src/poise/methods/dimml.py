"""DI-MML (Fan et al., "Detached and Interactive Multimodal Learning", ACM MM 2024; fanyunfeng-bit/DI-MML).

Stage 1 trains each modality on its own: encoder + own head (the ``sum`` fusion's per-modality heads) with
``CE(o_m)``, plus a shared classifier (the method's) on every modality's features, ``weight * CE(g(h_m))``,
which keeps the feature spaces comparable. From ``contrast_epoch`` on, the dimension-decoupled
contrastive loss teaches each modality the feature dimensions where another modality is discriminative and
it is not (selected once, at that epoch, by per-dimension nearest-centroid accuracy on the training set),
against that modality's detached features. Stage 2 (the last ``fusion_epochs``) freezes the encoders and
heads and trains a concat fusion head on their features; prediction then combines the unimodal heads and
the fusion head with weights from their per-sample confidences.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from poise.config import FloatRange
from poise.functional.dimml import (
    confidence_weighted_logits,
    decoupled_dimensions,
    dimension_decoupled_contrastive,
    dimension_discriminability,
    discriminative_dimensions,
)
from poise.methods.base import Method, MethodParams
from poise.train.distributed import all_gather_rows

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput
    from poise.train.context import TrainContext

#: the released schedule: the contrastive loss from epoch 20 of 150 stage-1 epochs, then 20 fusion epochs
RELEASED_CONTRAST_EPOCH, RELEASED_STAGE1_EPOCHS, RELEASED_FUSION_EPOCHS = 20, 150, 20


class DIMMLParams(MethodParams):
    weight: float = Field(1.0, ge=0, description="weight of the shared-classifier cross-entropy (released: 1)")
    temperature: float = Field(1.0, gt=0, description="temperature of the contrastive loss (released: 1)")
    contrast_epoch: int | None = Field(
        None, ge=0, description="first epoch (0-based) of the contrastive loss; None: 20/150 of the stage-1 "
        "epochs, the released schedule scaled to the run (20 on a 150-epoch stage 1)")
    fusion_epochs: int | None = Field(
        None, ge=0, description="epochs of stage 2 (frozen encoders, fusion head); None: 20/170 of the run "
        "(released: 20 after 150), at least 1 when the run has 2 epochs or more; 0: no stage 2")
    fusion_temperature: float = Field(1.0, gt=0, description="temperature of the confidence weights at test time "
                                      "(released: 1)")

    tunable = {"weight": FloatRange(0.1, 4.0, log=True), "temperature": FloatRange(0.1, 2.0, log=True)}


class DIMML(Method):
    name = "dimml"
    partial_graph = True
    family = "losses"
    Params: ClassVar[type[MethodParams]] = DIMMLParams
    min_modalities = 2
    default_fusion = "sum"
    fusions = ("sum",)

    def __init__(self, params: MethodParams | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self._modalities: tuple[str, ...] = ()
        self.shared: nn.Linear | None = None
        self.fusion_head: nn.Linear | None = None

    # ---- schedule ---------------------------------------------------------------------------------
    def fusion_epochs(self, epochs: int) -> int:
        if self.params.fusion_epochs is not None:
            return min(self.params.fusion_epochs, max(epochs - 1, 0))
        if epochs < 2:
            return 0
        return max(1, round(epochs * RELEASED_FUSION_EPOCHS / (RELEASED_STAGE1_EPOCHS + RELEASED_FUSION_EPOCHS)))

    def contrast_epoch(self, epochs: int) -> int:
        if self.params.contrast_epoch is not None:
            return self.params.contrast_epoch
        stage1 = epochs - self.fusion_epochs(epochs)
        return round(stage1 * RELEASED_CONTRAST_EPOCH / RELEASED_STAGE1_EPOCHS)

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        model = ctx.model
        self._modalities = tuple(model.modalities)
        dims = model.fusion.feature_dims
        d = dims[self._modalities[0]]
        C = ctx.info.num_classes
        epochs = ctx.config.trainer.epochs
        fusion = self.fusion_epochs(epochs)
        self._stage2_epoch = epochs - fusion if fusion > 0 else None
        self._contrast_epoch = self.contrast_epoch(epochs)
        torch.manual_seed(ctx.seed * 1_000_003 + 9_173)  # the heads' initialisation depends on the run's seed only
        self.shared = nn.Linear(d, C).to(ctx.device)
        self.fusion_head = nn.Linear(sum(dims.values()), C).to(ctx.device)
        for name, head in (("shared", self.shared), ("fusion_head", self.fusion_head)):
            self.add_state(f"{name}_weight", head.weight)
            self.add_state(f"{name}_bias", head.bias)
        ctx.optimizer.add_param_group({"params": list(self.shared.parameters()) + list(self.fusion_head.parameters())})
        for m in self._modalities:
            self.add_state(f"discriminative_{m}", torch.zeros(d, dtype=torch.bool, device=ctx.device))
        self.add_state("have_dimensions", False)
        self.add_state("stage", 1)

    def per_batch_decision(self) -> str | None:
        return "contrasts every sample with the other samples of its batch"

    # ---- dimension selection ----------------------------------------------------------------------
    @torch.no_grad()
    def select_dimensions(self) -> None:
        """Per-dimension nearest-centroid accuracy of every modality's features on the training split (eval
        mode, no gradient, present samples only); the discriminative dimensions are those above the mean."""
        ctx = self.ctx
        assert ctx is not None
        model = ctx.model
        features: dict[str, list[Tensor]] = {m: [] for m in self._modalities}
        labels: dict[str, list[Tensor]] = {m: [] for m in self._modalities}
        was_training = model.training
        model.eval()
        try:
            for batch in ctx.make_loader(ctx.splits.train, False):
                batch = batch.to(ctx.device)
                with ctx.autocast():
                    h = model.encode(batch)
                for m in self._modalities:
                    rows = batch.present_of(m)
                    features[m].append(h[m][rows].float())
                    labels[m].append(batch.labels[rows])
        finally:
            model.train(was_training)
        for m in self._modalities:
            hm, ym = all_gather_rows(torch.cat(features[m])), all_gather_rows(torch.cat(labels[m]))
            if len(ym) == 0:
                continue
            accuracy = dimension_discriminability(hm, ym, ctx.info.num_classes)
            getattr(self, f"discriminative_{m}").copy_(discriminative_dimensions(accuracy))
        self.have_dimensions = True

    def on_epoch_start(self, epoch: int, loader: DataLoader) -> DataLoader | None:
        assert self.ctx is not None
        if epoch >= self._contrast_epoch and not self.have_dimensions:
            self.select_dimensions()
        if self._stage2_epoch is not None and epoch >= self._stage2_epoch and self.stage == 1:
            self.stage = 2
        self._enter_stage()
        return None

    def _enter_stage(self) -> None:
        ctx = self.ctx
        assert ctx is not None and self.shared is not None
        if self.stage == 2 and ctx.phase != "fusion":
            ctx.set_phase("fusion", list(ctx.model.parameters()) + list(self.shared.parameters()))

    def on_step_start(self, batch: MultimodalBatch):
        if self.stage == 2:
            self._enter_stage()  # a run resumed in stage 2
            self.ctx.model.encoders.eval()  # frozen encoders keep their normalisation statistics, as released
        return None

    # ---- the loss ---------------------------------------------------------------------------------
    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        assert self.shared is not None and self.fusion_head is not None, "setup() must run before training"
        features = output.features
        if self.stage == 2:
            fused = self.fusion_head(torch.cat([features[m].detach() for m in self._modalities], dim=1))
            return {"ce_fusion": F.cross_entropy(fused, batch.labels)}
        terms = {}
        rows = {m: batch.present_of(m) for m in self._modalities}
        for m in self._modalities:
            r = rows[m].float()
            n = r.sum().clamp_min(1)
            own = F.cross_entropy(output.unimodal_logits[m], batch.labels, reduction="none")
            shared = F.cross_entropy(self.shared(features[m]), batch.labels, reduction="none")
            terms[f"ce_{m}"] = (own * r).sum() / n
            terms[f"shared_{m}"] = self.params.weight * (shared * r).sum() / n
        if self.have_dimensions:
            chosen = {m: getattr(self, f"discriminative_{m}") for m in self._modalities}
            contrast = output.logits.new_zeros((), dtype=torch.float32)
            for teacher in self._modalities:
                for student in self._modalities:
                    if teacher == student:
                        continue
                    dims = decoupled_dimensions(chosen, teacher, student)
                    self.record(f"dimensions/{teacher}->{student}", dims.float().sum())
                    contrast = contrast + dimension_decoupled_contrastive(
                        features[student], features[teacher], dims, self.params.temperature,
                        valid=rows[teacher] & rows[student])
            terms["contrast"] = contrast
        return terms

    def predict(self, output: ModelOutput, batch: MultimodalBatch) -> Tensor:
        if self.stage != 2 or self.fusion_head is None:
            return output.logits
        fused = self.fusion_head(torch.cat([output.features[m] for m in self._modalities], dim=1))
        logits = [output.unimodal_logits[m] for m in self._modalities] + [fused]
        return confidence_weighted_logits(logits, self.params.fusion_temperature).to(output.logits.dtype)


__all__ = ["DIMML", "DIMMLParams"]
