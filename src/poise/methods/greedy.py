"""Balanced multi-modal learning against the greedy learner (Wu, Jastrzebski, Cho & Geras, ICML 2022).

The model is the paper's: one branch per modality (encoder + its own head: ``sum`` fusion) joined by MMTM
mid-fusion between the encoders' stages. After every regular step the conditional learning speed of each
modality (``log10`` of the MMTM parameters' summed ``||grad||^2 / ||w||^2`` over m's branch's, both summed
over all steps so far) is updated; when the gap between the fastest and the slowest exceeds ``threshold``,
the next ``window`` steps are re-balancing steps: the fastest modality's MMTM gates are replaced by their
running means, so that its branch learns from its own input only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from poise.config import FloatRange, IntRange
from poise.errors import IncompatibleError
from poise.functional.greedy import conditional_learning_speeds, rebalance_target, squared_norm_ratio
from poise.functional.losses import present_cross_entropy
from poise.methods.base import Method, MethodParams

if TYPE_CHECKING:
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput
    from poise.train.context import TrainContext


class GreedyParams(MethodParams):
    threshold: float = Field(0.001, ge=0, description="gap of conditional learning speeds that starts re-balancing "
                             "(BalanceBenchmark: 0.001)")
    window: int = Field(5, ge=1, description="re-balancing steps once started (BalanceBenchmark: 5)")
    start_epoch: int = Field(1, ge=0, description="first epoch (0-based) that may re-balance; the released code "
                             "starts after one epoch, BalanceBenchmark at once (0)")
    loss: Literal["branches", "fused"] = Field(
        "branches", description="branches: the sum of each branch's cross-entropy (paper, released code); "
        "fused: the cross-entropy of the fused logits (BalanceBenchmark)")

    tunable = {"threshold": FloatRange(1e-4, 1e-2, log=True), "window": IntRange(1, 10)}


class Greedy(Method):
    """Needs the ``mmtm`` mid-fusion (its default); decides once per step from the step's gradients."""

    name = "greedy"
    partial_graph = True
    family = "architecture"
    Params: ClassVar[type[MethodParams]] = GreedyParams
    min_modalities = 2
    default_fusion = "sum"
    default_mid_fusion = "mmtm"
    per_batch_decisions = True

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        from poise.models.midfusion import MMTMFusion

        mid = getattr(ctx.model, "mid_fusion", None)
        if not isinstance(mid, MMTMFusion):
            raise IncompatibleError("method 'greedy' needs the mmtm mid-fusion between the encoders; leave "
                                    "model.mid_fusion unset or set it to mmtm")
        # the re-balancing steps read the running mean gates: over every process's samples
        mid.reduce_gate_sums = True
        self._modalities = tuple(ctx.model.modalities)
        n = len(self._modalities)
        self.add_state("bypass", torch.zeros(n, device=ctx.device))
        self.add_state("main", torch.zeros(n, device=ctx.device))
        #: index of the modality whose branch is being re-balanced, -1 in regular steps
        self.add_state("caring", -1)
        self.add_state("curation_step", 0)

    def on_step_start(self, batch: MultimodalBatch):
        assert self.ctx is not None, "setup() must run before training"
        mid = self.ctx.model.mid_fusion
        mid.cut = (self._modalities[self.caring],) if self.caring >= 0 else ()
        return None

    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        if self.params.loss == "fused":
            return {"ce": F.cross_entropy(output.logits, batch.labels)}
        terms = {}
        for m in self._modalities:
            terms[f"ce_{m}"] = present_cross_entropy(output.unimodal_logits[m], batch.labels, batch.present_of(m))
        return terms

    def after_backward(self, output: ModelOutput, batch: MultimodalBatch) -> None:
        ctx = self.ctx
        assert ctx is not None, "setup() must run before training"
        model = ctx.model
        mid = model.mid_fusion
        mid.cut = ()  # evaluation and other forwards see the full MMTM
        for i, m in enumerate(self._modalities):
            self.record(f"rebalanced/{m}", float(self.caring == i))
        if self.caring >= 0:
            self.curation_step += 1
            if self.curation_step >= self.params.window:
                self.caring, self.curation_step = -1, 0
            return
        shared = mid.shared_parameters()
        bypass, main = [], []
        for m in self._modalities:
            by = mid.excitation_parameters(m) + shared
            bypass.append(squared_norm_ratio([p.grad for p in by], by))
            own = model.modality_parameters(m)
            main.append(squared_norm_ratio([p.grad for p in own], own))
        self.bypass = self.bypass + torch.stack(bypass)
        self.main = self.main + torch.stack(main)
        speeds = conditional_learning_speeds(self.bypass, self.main)
        self.record("speed_gap", speeds.max() - speeds.min())
        for m, s in zip(self._modalities, speeds):
            self.record(f"speed/{m}", s)
        if ctx.epoch >= self.params.start_epoch:
            target = rebalance_target(speeds, self.params.threshold)
            if target is not None:
                self.caring, self.curation_step = target, 0


__all__ = ["Greedy", "GreedyParams"]
