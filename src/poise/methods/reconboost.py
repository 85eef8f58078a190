"""ReconBoost (Hua et al., ICML 2024): modality-alternating boosting with global rectification.

Stage t, modality ``m`` in turn: ``epochs_per_phase`` epochs train ``m``'s encoder and the head alone
(every other encoder and the boost rate frozen) with the boosting loss against the ensemble of the other
learners plus ``alpha`` times the alignment term with the previous stage's learner; then as many epochs of
cross-entropy on the ensemble ``F = b sum_m f_m`` train everything. A learner joins the ensemble after its
first boosting phase. Prediction is ``F``. The mathematics is in :mod:`poise.functional.reconboost`."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from poise.config import FloatRange, IntRange
from poise.functional.reconboost import boosting_loss, ensemble_logits, ga_loss, reconboost_schedule
from poise.methods.base import Method, MethodParams

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput
    from poise.train.context import TrainContext


class ReconBoostParams(MethodParams):
    epochs_per_phase: int = Field(4, ge=1, description="epochs of boosting and of rectification per stage "
                                                       "(released 4 and 4; BalanceBenchmark 1)")
    w1: float = Field(5.0, description="weight of -log p_m(y) (released 5)")
    w2: float = Field(1.0, description="weight of pbar(y) log p_m(y) (released 1)")
    alpha: float = Field(0.5, ge=0, description="weight of the alignment (GA) term (released 0.5)")
    ga_detached: bool = Field(False, description="detach both arguments of the GA term as released (it then has "
                                                 "no gradient); default: the paper's term, f_m not detached")
    boost_rate: float = Field(1.0, description="initial value of the learnable ensemble scale b (released 1)")

    tunable = {"alpha": FloatRange(0.1, 2.0, log=True), "epochs_per_phase": IntRange(1, 6)}


class ReconBoost(Method):
    """Alternate boosting of one modality's learner with rectification of the whole ensemble."""

    name = "reconboost"
    family = "losses"
    Params: ClassVar[type[MethodParams]] = ReconBoostParams
    min_modalities = 2
    default_fusion = "shared"
    fusions = ("shared", "concat", "sum")
    #: a boosting phase's loss reaches one encoder only, which DistributedDataParallel's reduction during the
    #: backward refuses; averaging the gradients once at the step has no such constraint
    multiple_backward = True

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        model = ctx.model
        self._modalities = tuple(model.modalities)
        self._groups = {m: model.modality_parameters(m) for m in self._modalities}
        self.boost_rate = self.add_state("boost_rate", nn.Parameter(torch.tensor(self.params.boost_rate, device=ctx.device)))
        ctx.optimizer.add_param_group({"params": [self.boost_rate]})
        #: learners in the ensemble (in the order they joined)
        self.add_state("learners", [])

    # ---- schedule ---------------------------------------------------------------------------------
    def schedule(self, epoch: int) -> tuple[int, str, str]:
        return reconboost_schedule(epoch, self._modalities, self.params.epochs_per_phase)

    def on_epoch_start(self, epoch: int, loader: DataLoader) -> DataLoader | None:
        assert self.ctx is not None
        stage, m, phase = self.schedule(epoch)
        if phase == "boost":
            frozen = [p for k in self._modalities if k != m for p in self._groups[k]] + [self.boost_rate]
            self.ctx.set_phase(f"boost/{m}", frozen)
        else:
            self.ctx.set_phase("rectify", [])
        return None

    def on_epoch_end(self, epoch: int) -> None:
        stage, m, phase = self.schedule(epoch)
        if phase == "boost" and self.schedule(epoch + 1)[2] == "rectify" and m not in self.learners:
            self.learners = [*self.learners, m]
        self.record("stage", stage)
        self.record("boost_rate", self.boost_rate)
        self.record("learners", len(self.learners))

    # ---- losses -----------------------------------------------------------------------------------
    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        assert self.ctx is not None
        stage, m, phase = self.schedule(self.ctx.epoch)
        present = {k: batch.present_of(k) for k in self._modalities}
        if phase == "rectify":
            learners = self.learners or list(self._modalities)
            return {"ce": F.cross_entropy(ensemble_logits(output.unimodal_logits, learners, self.boost_rate, present),
                                          batch.labels)}
        others = [k for k in self.learners if k != m]
        with torch.no_grad():
            rest = ensemble_logits(output.unimodal_logits, others, self.boost_rate, present)
        rows = present[m]
        per_sample = boosting_loss(output.unimodal_logits[m], rest, batch.labels, self.params.w1, self.params.w2)
        terms = {"boost": (per_sample * rows.to(per_sample.dtype)).sum() / rows.sum().clamp_min(1)}
        previous = self._modalities[(stage - 1) % len(self._modalities)]
        if stage > 0 and self.params.alpha > 0 and previous in self.learners and previous != m:
            both = rows & present[previous]
            if both.any():
                ga = ga_loss(output.unimodal_logits[m][both], output.unimodal_logits[previous][both],
                             self.params.ga_detached)
                self.record("ga", ga)
                terms["ga"] = self.params.alpha * ga
        return terms

    def predict(self, output: ModelOutput, batch: MultimodalBatch) -> Tensor:
        present = {k: batch.present_of(k) for k in self._modalities}
        learners = self.learners or list(self._modalities)
        return ensemble_logits(output.unimodal_logits, learners, self.boost_rate.detach(), present)
