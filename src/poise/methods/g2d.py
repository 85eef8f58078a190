"""G2D, Gradient-Guided Distillation (Rakib and Bagavathi, ICCV 2025; rAIson-Lab/G2D).

A frozen unimodal teacher per modality (the same teachers as UMT: the run's own nested unimodal runs,
or ``teacher_checkpoints``). The loss is ``CE(f) + sum_m [feature_weight * MSE(h_m, t_m) + logit_weight *
T^2 KL(softmax(z^T_m / T) || softmax(f / T))]``: each teacher's features distilled into its modality's
encoder and each teacher's logits into the fused logits. Sequential Modality Prioritization (SMP): for
the first ``smp_epochs`` epochs, after every backward, only the modality whose teacher is least confident
on the step's batch (mean true-class probability) keeps its encoder gradient; the others' are zeroed.
The mathematics is in :mod:`poise.functional.g2d`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from poise.config import FloatRange
from poise.errors import DataError
from poise.functional.g2d import logit_distillation_loss, smp_coefficients, teacher_confidence_sums
from poise.functional.teachers import feature_distillation_losses
from poise.methods.base import Method, MethodParams
from poise.methods.teachers import check_checkpoints, unimodal_models, validation_accuracy
from poise.train.distributed import all_reduce_sum

if TYPE_CHECKING:
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput
    from poise.train.context import TrainContext


class G2DParams(MethodParams):
    feature_weight: float = Field(1.0, ge=0, description="weight of each modality's feature MSE to its teacher (released 1)")
    logit_weight: float = Field(1.0, ge=0, description="weight of each teacher's logit KL on the fused logits (released 1)")
    temperature: float = Field(1.0, gt=0, description="T of the logit distillation (released 1)")
    smp_epochs: int | None = Field(None, ge=0, description="epochs with Sequential Modality Prioritization (default: "
                                   "the first half of trainer.epochs; released epochs 0-150 of 300)")
    smp_scope: Literal["encoder", "conv_kernels"] = Field(
        "encoder", description="what SMP zeroes: the whole encoder's gradient, or only its 4-d convolution kernels "
        "(released: norm and linear layers keep learning)")
    teacher_epochs: int | None = Field(None, ge=1, description="epochs of each teacher's training (default: trainer.epochs)")
    teacher_checkpoints: dict[str, str] = Field(
        default_factory=dict, description="modality -> best.pt of a unimodal run, used as that modality's teacher")

    tunable = {"feature_weight": FloatRange(0.1, 10.0, log=True), "logit_weight": FloatRange(0.1, 10.0, log=True)}


class G2D(Method):
    """Unimodal teachers' features and logits distilled into the model; the encoder of the modality whose
    teacher is least confident on the batch is the only one updated while SMP lasts."""

    name = "g2d"
    family = "gradients"
    Params: ClassVar[type[MethodParams]] = G2DParams
    min_modalities = 2
    per_batch_decisions = True

    def __init__(self, params: MethodParams | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.teachers: dict[str, nn.Module] = {}
        #: (M, 2) teacher confidence sums of the step's micro-batches, read once per step
        self._pending: list[Tensor] = []

    def check(self, info, modalities, fusion):
        super().check(info, modalities, fusion)
        check_checkpoints(self.name, self.params.teacher_checkpoints, modalities)

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        self._pending = []
        if not ctx.training:
            return
        p = self.params
        models = unimodal_models(ctx, ctx.model.modalities, p.teacher_checkpoints, p.teacher_epochs)
        self.teachers = {}
        for m, model in models.items():
            width = model.fusion.feature_dims[m]
            if width != ctx.model.fusion.feature_dims[m]:
                raise DataError(f"the teacher of modality '{m}' ({p.teacher_checkpoints.get(m, 'trained here')}) gives "
                                f"{width}-d features, the model {ctx.model.fusion.feature_dims[m]}-d")
            self.record(f"teacher_val_accuracy/{m}", validation_accuracy(ctx, model, m))
            self.teachers[m] = model

    @property
    def smp_epochs(self) -> int:
        assert self.ctx is not None
        given = self.params.smp_epochs
        return self.ctx.config.trainer.epochs // 2 if given is None else given

    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        p = self.params
        terms = {"ce": F.cross_entropy(output.logits, batch.labels)}
        with torch.no_grad():
            teacher_out = {m: teacher(batch) for m, teacher in self.teachers.items()}
        present = {m: batch.present_of(m) for m in self.teachers}
        teacher_logits = {m: out.logits for m, out in teacher_out.items()}
        student = {m: output.features[m] for m in self.teachers}
        features = feature_distillation_losses(student, {m: out.features[m] for m, out in teacher_out.items()}, present)
        for m in self.teachers:
            terms[f"distill/{m}"] = p.feature_weight * features[m]
            terms[f"kd/{m}"] = p.logit_weight * logit_distillation_loss(output.logits, teacher_logits[m], p.temperature,
                                                                       present[m])
        self._pending.append(teacher_confidence_sums(teacher_logits, batch.labels, present))
        return terms

    def after_backward(self, output: ModelOutput, batch: MultimodalBatch) -> None:
        assert self.ctx is not None
        if not self._pending:
            return
        sums = all_reduce_sum(torch.stack(self._pending).sum(dim=0))
        self._pending = []
        count = sums[:, 1]
        confidence = torch.where(count > 0, sums[:, 0] / count.clamp_min(1), torch.inf)
        names = list(self.teachers)
        for i, m in enumerate(names):
            if bool(count[i] > 0):
                self.record(f"teacher_confidence/{m}", confidence[i])
        if self.ctx.epoch >= self.smp_epochs:
            return
        gates = smp_coefficients(confidence)
        model = self.ctx.model
        for i, m in enumerate(names):
            self.record(f"smp/{m}", gates[i])
            if bool(gates[i] == 0):
                for param in model.modality_parameters(m):
                    if param.grad is not None and (self.params.smp_scope == "encoder" or param.dim() == 4):
                        param.grad.zero_()


__all__ = ["G2D", "G2DParams"]
