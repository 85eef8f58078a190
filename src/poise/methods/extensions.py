"""Extensions around OGM-GE: boost the weak modality (``boost_weak``), uncertainty-weighted multi-task
loss (``uncertainty``), cross-modal knowledge distillation (``distill``) and per-sample modality
dropout (``modality_dropout``). Their mathematics is in :mod:`poise.functional.extensions`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from poise.config import FloatRange
from poise.errors import IncompatibleError, closest
from poise.functional.extensions import (
    batch_confidence_ratios,
    cross_modal_distillation,
    distillation_roles,
    modality_dropout_mask,
    modality_dropout_scale,
    uncertainty_weighted_loss,
)
from poise.functional.teachers import feature_distillation_losses
from poise.functional.losses import present_cross_entropy
from poise.methods.base import Method, MethodParams, StepPlan
from poise.methods.modulation import Modulated, separate_param_groups
from poise.methods.teachers import check_checkpoints, unimodal_models, validation_accuracy
from poise.train.distributed import all_reduce_sum

if TYPE_CHECKING:
    from poise.data.base import DatasetInfo
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput
    from poise.train.context import TrainContext


class _ModulationWindow(MethodParams):
    modulation_starts: int = Field(0, ge=0, description="first epoch (0-based) in which the method acts")
    modulation_ends: int | None = Field(None, ge=0, description="last epoch in which it acts, inclusive (none: to the end)")

    @model_validator(mode="after")
    def _ordered(self):
        if self.modulation_ends is not None and self.modulation_ends < self.modulation_starts:
            raise ValueError(f"modulation_ends ({self.modulation_ends}) is before modulation_starts ({self.modulation_starts})")
        return self

    def active(self, epoch: int) -> bool:
        return self.modulation_starts <= epoch and (self.modulation_ends is None or epoch <= self.modulation_ends)


# ---- boost_weak ------------------------------------------------------------------------------------
class BoostWeakParams(_ModulationWindow):
    alpha: float = Field(0.8, ge=0, description="strength: k_m = 1 + tanh(alpha * relu(1 / rho_m - 1)), at most 2 "
                         "(two modalities: 1 + tanh(alpha * relu(rho_dom - 1)) for the weak one)")
    mode: Literal["grad", "lr"] = Field(
        "grad",
        description="grad: multiply the weak encoder's gradients by k; lr: multiply its learning rate by k for "
        "the step (survives Adam, which cancels a gradient scale)",
    )
    targets: Literal["below_one", "weakest"] = Field(
        "below_one",
        description="more than two modalities: boost every modality with ratio < 1 by its own gap (below_one) "
        "or only the lowest-ratio one (weakest); identical for two modalities",
    )

    tunable = {"alpha": FloatRange(0.1, 4.0, log=True)}


class BoostWeak(Modulated):
    """The mirror image of OGM: instead of slowing the dominant encoder, raise the weak encoder's
    update by ``k = 1 + tanh(alpha * relu(1 / rho_m - 1))`` (``= 1 + tanh(alpha * relu(rho_dom - 1))`` for
    two modalities), from the unimodal confidence ratios of the batch. No noise is added. The confidence
    estimator, the boost-weak direction and the gradient (or learning-rate) actuator of
    :mod:`poise.methods.modulation`, scaling every parameter of the weak encoder."""

    name = "boost_weak"
    family = "gradients"
    Params: ClassVar[type[MethodParams]] = BoostWeakParams
    params: BoostWeakParams
    estimator = "confidence"
    direction = "boost_weak"
    modulated_parameters = "all"

    def component(self, kind: str) -> str:
        if kind == "actuator":
            return self.params.mode
        return super().component(kind)


# ---- uncertainty -----------------------------------------------------------------------------------
class UncertaintyParams(MethodParams):
    init_log_variance: float = Field(0.0, description="initial s_t = log sigma_t^2 of every term (0: weight 1)")
    lr: float | None = Field(None, gt=0, description="learning rate of the log-variances (none: trainer.lr)")
    form: Literal["classification", "regression"] = Field(
        "classification",
        description="classification: exp(-s) L + s / 2 (Kendall's form for cross-entropy terms); "
        "regression: exp(-s) L + s",
    )


class UncertaintyWeighting(Method):
    """Fused and unimodal cross-entropies weighted by learned homoscedastic uncertainty (Kendall et al.,
    CVPR 2018): ``L = sum_t exp(-s_t) L_t + s_t / 2`` over t in {fused, each modality} (Kendall's form
    for cross-entropy terms; ``form=regression``: ``+ s_t``), ``s_t = log sigma_t^2`` learned with the
    model (own param group, no weight decay). Prediction: the fused logits."""

    name = "uncertainty"
    family = "losses"
    Params: ClassVar[type[MethodParams]] = UncertaintyParams
    min_modalities = 2
    params: UncertaintyParams

    def __init__(self, params: MethodParams | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.terms: tuple[str, ...] = ()
        self.log_variances: nn.Parameter | None = None

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        self.terms = ("fused", *ctx.model.modalities)
        self.log_variances = nn.Parameter(torch.full((len(self.terms),), self.params.init_log_variance, device=ctx.device))
        group: dict[str, Any] = {"params": [self.log_variances], "weight_decay": 0.0}
        if self.params.lr is not None:
            group["lr"] = self.params.lr
        ctx.optimizer.add_param_group(group)

    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        assert self.log_variances is not None
        losses = [F.cross_entropy(output.logits, batch.labels)]
        active = [torch.ones((), dtype=torch.bool, device=batch.labels.device)]
        for m in self.terms[1:]:
            rows = batch.present_of(m)
            losses.append(present_cross_entropy(output.unimodal_logits[m], batch.labels, rows))
            active.append(rows.any())
        contributions = uncertainty_weighted_loss(torch.stack(losses), self.log_variances, torch.stack(active),
                                                  self.params.form)
        weights = torch.exp(-self.log_variances.detach())
        for i, t in enumerate(self.terms):
            self.record(f"weight/{t}", weights[i])
        return {f"ce_{t}": contributions[i] for i, t in enumerate(self.terms)}

    def state_dict(self) -> dict[str, Any]:
        if self.log_variances is None:
            return {}
        return {"terms": list(self.terms), "log_variances": self.log_variances.detach().clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if self.log_variances is None or tuple(state["terms"]) != self.terms:
            raise IncompatibleError(
                f"uncertainty state holds terms {state['terms']}, this run has {list(self.terms) or 'none (not set up)'}"
            )
        with torch.no_grad():
            self.log_variances.copy_(state["log_variances"])


# ---- distill ---------------------------------------------------------------------------------------
class DistillParams(MethodParams):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    mode: Literal["online", "offline"] = Field(
        "online",
        description="online: the teacher is a modality's own head inside the joint model; offline: a separately "
        "trained one-modality model (the reading notes' three stages)",
    )
    lambda_: float = Field(1.0, ge=0, alias="lambda", description="weight of the distillation term added to the fused CE")
    temperature: float = Field(2.0, gt=0, description="softmax temperature T of teacher and student (loss scaled by T^2)")
    teacher: str | None = Field(
        None,
        description="fixed teacher modality (none: online, the highest confidence ratio per batch; offline, the "
        "unimodal model with the highest validation accuracy)",
    )
    students: Literal["all", "weakest"] = Field(
        "all", description="distil into every non-teacher modality (all) or only the lowest-ratio one (weakest)"
    )
    teacher_epochs: int | None = Field(None, ge=1, description="offline: epochs of the teacher's training (default: trainer.epochs)")
    teacher_checkpoints: dict[str, str] = Field(
        default_factory=dict, description="offline: modality -> best.pt of a unimodal run, used instead of training it"
    )
    align_weight: float = Field(
        0.0, ge=0,
        description="offline: weight of the MSE between a learned linear projection of each student's encoder "
        "feature and the teacher's encoder feature (0: no alignment)",
    )

    tunable = {"lambda_": FloatRange(0.1, 4.0, log=True), "temperature": FloatRange(1.0, 8.0, log=True)}

    @model_validator(mode="after")
    def _offline_options(self):
        if self.mode == "online":
            offline = [k for k in ("teacher_epochs", "align_weight") if getattr(self, k)] + (
                ["teacher_checkpoints"] if self.teacher_checkpoints else [])
            if offline:
                raise ValueError(f"{', '.join(offline)} {'apply' if len(offline) > 1 else 'applies'} only with mode offline")
        return self


class Distill(Method):
    """Knowledge distillation from the stronger modality to the weaker: fused CE plus
    ``lambda * T^2 * KL(softmax(z_teacher / T) || softmax(z_student / T))`` on the students' unimodal
    logits, the teacher detached. Prediction stays fused.

    ``mode=online``: the teacher is the strongest modality's own unimodal head inside the joint model,
    chosen per batch by confidence ratio (or fixed). ``mode=offline`` (the reading notes' recipe): a
    one-modality model trained first on the strong modality alone with the labels (or loaded from the
    ``best.pt`` of a unimodal run), frozen; with ``align_weight`` > 0 each student's encoder feature is
    also mapped by a learned linear projection onto the teacher's encoder feature, ``align_weight *
    MSE(P_m h_m, t)``. Without a fixed teacher a unimodal model of every modality is trained and the one
    with the highest validation accuracy teaches."""

    name = "distill"
    family = "losses"
    Params: ClassVar[type[MethodParams]] = DistillParams
    min_modalities = 2
    params: DistillParams

    def check(self, info: DatasetInfo, modalities: tuple[str, ...], fusion: str) -> None:
        super().check(info, modalities, fusion)
        teacher = self.params.teacher
        if teacher is not None and teacher not in modalities:
            raise IncompatibleError(f"distill teacher '{teacher}' is not a trained modality{closest(teacher, modalities)}")
        check_checkpoints(self.name, self.params.teacher_checkpoints, modalities)
        others = sorted(set(self.params.teacher_checkpoints) - {teacher}) if teacher is not None else []
        if others:
            raise IncompatibleError(f"method.distill: teacher_checkpoints names '{others[0]}', but the teacher is fixed "
                                    f"to '{teacher}'")

    def per_batch_decision(self) -> str | None:
        if self.params.teacher is None:
            return "chooses its teacher by confidence ratio"
        if self.params.students == "weakest":
            return "chooses its student by confidence ratio"
        return None

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        self._teacher_index = None if self.params.teacher is None else ctx.model.modalities.index(self.params.teacher)
        self.teacher_model: nn.Module | None = None
        self.projections: nn.ModuleDict | None = None
        if self.params.mode == "offline":
            self._setup_offline_teacher(ctx)

    def _setup_offline_teacher(self, ctx: TrainContext) -> None:
        p = self.params
        candidates = (p.teacher,) if p.teacher is not None else ctx.model.modalities
        models = unimodal_models(ctx, candidates, p.teacher_checkpoints, p.teacher_epochs)
        accuracy = {m: validation_accuracy(ctx, model, m) for m, model in models.items()}
        for m, acc in accuracy.items():
            self.record(f"teacher_val_accuracy/{m}", acc)
        teacher = max(candidates, key=lambda m: accuracy[m])  # ties: the first modality
        self._teacher_index = ctx.model.modalities.index(teacher)
        self.teacher_modality = teacher
        self.teacher_model = models[teacher]
        if p.align_weight > 0:
            width = self.teacher_model.fusion.feature_dims[teacher]
            self.projections = nn.ModuleDict({
                m: nn.Linear(ctx.model.fusion.feature_dims[m], width) for m in ctx.model.modalities if m != teacher
            }).to(ctx.device)
            ctx.optimizer.add_param_group({"params": list(self.projections.parameters())})

    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        ce = F.cross_entropy(output.logits, batch.labels)
        ratios, valid = batch_confidence_ratios(output.unimodal_logits, batch.labels, batch.present, all_reduce_sum)
        teacher, students = distillation_roles(ratios, valid, self._teacher_index, self.params.students)
        logits = output.unimodal_logits
        teacher_features = None
        if self.teacher_model is not None:
            with torch.no_grad():
                taught = self.teacher_model(batch)
            logits = {**logits, self.teacher_modality: taught.logits}
            teacher_features = taught.features[self.teacher_modality]
        kd = cross_modal_distillation(logits, teacher, students, self.params.temperature, batch.present)
        for i, m in enumerate(output.unimodal_logits):
            self.record(f"teacher/{m}", teacher[i])
        self.record("kd", kd)
        terms = {"ce": ce, "kd": self.params.lambda_ * kd}
        if self.projections is not None:
            align = self._alignment(output, batch, teacher_features, students)
            self.record("align", align)
            terms["align"] = self.params.align_weight * align
        return terms

    def _alignment(self, output: ModelOutput, batch: MultimodalBatch, teacher_features: Tensor,
                   students: Tensor) -> Tensor:
        """Student-weighted mean over the students of ``MSE(P_m h_m, t)`` over the samples that have both."""
        has_teacher = batch.present_of(self.teacher_modality)
        names = list(self.projections)
        projected = {m: self.projections[m](output.features[m]) for m in names}
        losses = feature_distillation_losses(projected, {m: teacher_features for m in names},
                                             {m: batch.present_of(m) & has_teacher for m in names})
        modalities = list(output.unimodal_logits)
        weights = torch.stack([students[modalities.index(m)] for m in names])
        return (weights * torch.stack([losses[m] for m in names])).sum() / weights.sum().clamp_min(1.0)

    def state_dict(self) -> dict[str, Any]:
        if self.projections is None:
            return {}
        return {"projections": {k: v.detach().clone() for k, v in self.projections.state_dict().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state and self.projections is not None:
            self.projections.load_state_dict(state["projections"])


# ---- modality_dropout ------------------------------------------------------------------------------
class ModalityDropoutParams(MethodParams):
    p: float | dict[str, float] = Field(
        0.5, description="drop probability of each modality per sample: one value for all, or modality -> value (others 0)"
    )
    rescale: bool = Field(False, description="multiply kept features by 1 / (1 - p) (inverted dropout)")

    tunable = {"p": FloatRange(0.05, 0.7)}

    @field_validator("p")
    @classmethod
    def _probabilities(cls, p: float | dict[str, float]) -> float | dict[str, float]:
        for value in p.values() if isinstance(p, dict) else (p,):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"drop probabilities must be in [0, 1), got {value}")
        return p


class ModalityDropout(Method):
    """Per-sample dropping of whole modalities during training (features multiplied by 0 before
    fusion). A sample that would lose all its present modalities keeps one of them at random. Nothing
    is dropped at evaluation."""

    name = "modality_dropout"
    family = "features"
    Params: ClassVar[type[MethodParams]] = ModalityDropoutParams
    min_modalities = 2
    params: ModalityDropoutParams

    def check(self, info: DatasetInfo, modalities: tuple[str, ...], fusion: str) -> None:
        super().check(info, modalities, fusion)
        if isinstance(self.params.p, dict):
            for m in self.params.p:
                if m not in modalities:
                    raise IncompatibleError(f"modality_dropout p names '{m}', which is not a trained modality{closest(m, modalities)}")

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        p = self.params.p
        self._modalities = ctx.model.modalities
        values = [p.get(m, 0.0) if isinstance(p, dict) else p for m in self._modalities]
        self._p = torch.tensor(values, dtype=torch.float32, device=ctx.device)

    def on_step_start(self, batch: MultimodalBatch) -> StepPlan:
        present = torch.stack([batch.present_of(m) for m in self._modalities], dim=1)
        keep = modality_dropout_mask(present, self._p)
        scale = modality_dropout_scale(keep, self._p, self.params.rescale)
        dropped = (present & ~keep).float().sum(0) / present.float().sum(0).clamp_min(1.0)
        for j, m in enumerate(self._modalities):
            self.record(f"drop_rate/{m}", dropped[j])
        return StepPlan(feature_scale={m: scale[:, j] for j, m in enumerate(self._modalities)})


__all__ = ["BoostWeak", "Distill", "ModalityDropout", "UncertaintyWeighting", "separate_param_groups"]
