"""AMCo (Zhou et al., ICASSP 2023, "Adaptive Mask Co-optimization for Modal Dependence in Multimodal
Learning"), in BalanceBenchmark's form: a random share ``p`` of the classes of the dominant modality's
logits is masked (zeroed) before the logits are summed, the sum goes through a learned ``Linear(C, C)``,
and every modality keeps its own unimodal CE (the co-optimisation). A modality is dominant when its share
of one softmax over all modalities' concatenated logits, averaged over the batch, exceeds ``sigma``;
``p = sin(pi/2 min(eps, l)/eps)`` rises with the schedule level ``l``. The mathematics is in
:mod:`poise.functional.amco`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from poise.config import FloatRange
from poise.errors import IncompatibleError
from poise.functional.amco import amco_class_mask, amco_mask_fraction, amco_softmax_mass
from poise.functional.losses import present_cross_entropy
from poise.methods.base import Method, MethodParams
from poise.train.distributed import all_reduce_sum

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput
    from poise.train.context import TrainContext


class AMCoParams(MethodParams):
    sigma: float = Field(0.5, gt=0, lt=1, description="a modality whose batch-mean softmax share exceeds sigma is dominant (released 0.5)")
    eps: float = Field(0.3, gt=0, description="schedule level at which the whole of the dominant modality's classes is masked (released 0.3)")
    formulation: Literal["progress", "released"] = Field(
        "progress",
        description="progress: level l = the share of the run's training done, dominance decided from this "
        "step's unmasked logits, unimodal CE on unmasked logits; released: BalanceBenchmark's l (reset to 0 "
        "every epoch, + epoch/10 per step), dominance from the previous step's masked logits, unimodal CE on "
        "the masked logits")

    tunable = {"sigma": FloatRange(0.4, 0.8), "eps": FloatRange(0.1, 0.6)}


class AMCo(Method):
    """Mask part of the dominant modality's logit classes before a learned Linear(C, C) over their sum."""

    name = "amco"
    family = "features"
    Params: ClassVar[type[MethodParams]] = AMCoParams
    params: AMCoParams
    min_modalities = 2
    fusions = ("concat", "sum")

    def __init__(self, params: MethodParams | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.head: nn.Linear | None = None
        self._modalities: tuple[str, ...] = ()

    def per_batch_decision(self) -> str | None:
        return "decides the dominant modality and draws its class mask"

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        self._modalities = tuple(ctx.model.modalities)
        classes = ctx.info.num_classes
        generator = torch.Generator().manual_seed(ctx.seed)
        self.head = nn.Linear(classes, classes)
        # nn.Linear's own initialisation, drawn from the run's seed so that it does not depend on the global RNG
        bound = 1.0 / classes ** 0.5
        with torch.no_grad():
            self.head.weight.uniform_(-bound, bound, generator=generator)
            self.head.bias.uniform_(-bound, bound, generator=generator)
        self.head.to(ctx.device)
        ctx.optimizer.add_param_group({"params": list(self.head.parameters())})
        self.add_state("generator", generator)
        self.add_state("epoch_step", 0)
        self.add_state("steps_per_epoch", 1)
        self.add_state("dominant", torch.zeros(len(self._modalities), dtype=torch.bool))

    def on_epoch_start(self, epoch: int, loader: DataLoader) -> DataLoader | None:
        self.epoch_step = 0
        self.steps_per_epoch = max(1, len(loader))
        self.dominant = torch.zeros(len(self._modalities), dtype=torch.bool)
        return None

    def _level(self) -> float:
        assert self.ctx is not None
        if self.params.formulation == "released":
            return self.epoch_step * self.ctx.epoch / 10
        epochs = max(1, self.ctx.config.trainer.epochs)
        return (self.ctx.epoch + self.epoch_step / self.steps_per_epoch) / epochs

    def _dominance(self, stacked: Tensor, present: Tensor) -> Tensor:
        """(M,) bool: the modalities whose mean softmax share over the samples that have them exceeds sigma."""
        mass = amco_softmax_mass(stacked.detach(), present)
        totals = all_reduce_sum(torch.stack([mass.sum(0), present.float().sum(0)]))
        return (totals[0] / totals[1].clamp_min(1)) > self.params.sigma

    def _fuse(self, unimodal: dict[str, Tensor]) -> Tensor:
        assert self.head is not None, "setup() must run before training"
        return self.head(torch.stack([unimodal[m] for m in self._modalities]).sum(0))

    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        released = self.params.formulation == "released"
        present = torch.stack([batch.present_of(m) for m in self._modalities], dim=1)
        unmasked = {m: output.unimodal_logits[m].float() for m in self._modalities}
        stacked = torch.stack([unmasked[m] for m in self._modalities], dim=1)
        dominant = self.dominant.to(stacked.device) if released else self._dominance(stacked, present)
        fraction = amco_mask_fraction(self._level(), self.params.eps)
        mask = amco_class_mask(stacked.shape[2], fraction, self.generator).to(stacked.device)
        masked = {m: unmasked[m] * mask if bool(dominant[i]) else unmasked[m] for i, m in enumerate(self._modalities)}
        terms = {"ce": F.cross_entropy(self._fuse(masked), batch.labels)}
        for m in self._modalities:
            terms[f"ce_{m}"] = present_cross_entropy(masked[m] if released else unmasked[m], batch.labels,
                                                     batch.present_of(m).float())
        if released:  # decided after the step from the masked logits, used by the next one
            self.dominant = self._dominance(torch.stack([masked[m] for m in self._modalities], dim=1), present).cpu()
        self.epoch_step += 1
        self.record("mask_fraction", int(fraction * stacked.shape[2]) / stacked.shape[2])
        for i, m in enumerate(self._modalities):
            self.record(f"dominant/{m}", float(dominant[i]))
        return terms

    def predict(self, output: ModelOutput, batch: MultimodalBatch) -> Tensor:
        return self._fuse(output.unimodal_logits)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.head is not None:
            state["head"] = {k: v.detach().clone() for k, v in self.head.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        head = state.pop("head", None)
        super().load_state_dict(state)
        if head is not None:
            if self.head is None or head["weight"].shape != self.head.weight.shape:
                raise IncompatibleError(f"amco state holds a {tuple(head['weight'].shape)} head, this run has "
                                        f"{tuple(self.head.weight.shape) if self.head is not None else 'none (not set up)'}")
            self.head.load_state_dict(head)
