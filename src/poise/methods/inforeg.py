"""InfoReg (Huang et al., CVPR 2025): adaptive information regulation.

Loss ``CE(fused) + sum_m CE(z_m)``. Once per epoch a Fisher-trace test decides whether training is in its
prime learning window (the trace still grows by more than ``threshold``); inside the window, each step
the dominant modality's encoder gradient gets a proximal term ``beta (theta - theta_anchor)`` towards its
weights at the start of the epoch. The mathematics is in :mod:`poise.functional.inforeg`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from poise.config import FloatRange
from poise.errors import IncompatibleError
from poise.functional.confidence import confidence_scores
from poise.functional.inforeg import add_proximal_gradient, fisher_trace, inforeg_coefficients, prime_window_slope
from poise.functional.losses import present_cross_entropy
from poise.methods.base import Method, MethodParams
from poise.train.distributed import all_reduce_sum

if TYPE_CHECKING:
    from poise.data.base import DatasetInfo
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput
    from poise.train.context import TrainContext


class InfoRegParams(MethodParams):
    strength: list[float] = Field(
        [0.95, 0.1], min_length=1,
        description="c_m of beta_m = c_m exp(tanh(s_m - s_other)), per modality in the model's order (the last "
        "value is used for further modalities); released: audio 0.95, visual 0.1")
    threshold: float = Field(0.05, description="the window is active while the trace slope k exceeds this")
    window: int = Field(10, ge=1, description="epochs averaged by the trace slope (released 10, history pre-filled "
                                              "with zeros)")
    trace_of: str = Field(
        "all", description="whose Fisher trace decides the window: 'all' encoders (the paper's model-level "
        "information) or one modality's name (released: audio)")
    unimodal_loss: bool = Field(True, description="add CE of every modality's logits (released)")

    tunable = {"threshold": FloatRange(0.01, 0.2, log=True)}


class InfoReg(Method):
    """Regulate the dominant modality during the prime learning window with a proximal gradient term."""

    name = "inforeg"
    family = "gradients"
    Params: ClassVar[type[MethodParams]] = InfoRegParams
    min_modalities = 2
    fusions = ("concat", "sum")
    per_batch_decisions = True

    def check(self, info: DatasetInfo, modalities: tuple[str, ...], fusion: str) -> None:
        super().check(info, modalities, fusion)
        if self.params.trace_of != "all" and self.params.trace_of not in modalities:
            raise IncompatibleError(f"method 'inforeg': trace_of '{self.params.trace_of}' is not 'all' or one of "
                                    f"the modalities {', '.join(modalities)}")

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        model = ctx.model
        self._modalities = tuple(model.modalities)
        self._groups = {m: model.modality_parameters(m) for m in self._modalities}
        watched = self._modalities if self.params.trace_of == "all" else (self.params.trace_of,)
        # conv and linear weights, as released
        self._watched = [p for m in watched for p in self._groups[m] if p.dim() >= 2]
        s = self.params.strength
        self._strengths = torch.tensor([s[min(i, len(s) - 1)] for i in range(len(self._modalities))],
                                       device=ctx.device)
        self.add_state("trace_history", [])
        self.add_state("epoch_trace", torch.zeros((), device=ctx.device))
        # the first epochs are inside the window: the zero-filled history makes k = 1 after epoch 0
        self.add_state("window_active", True)
        for m in self._modalities:
            ctx.snapshot(f"inforeg/{m}", self._groups[m])

    def on_epoch_start(self, epoch: int, loader):
        assert self.ctx is not None
        for m in self._modalities:
            self.ctx.snapshot(f"inforeg/{m}", self._groups[m])
        return None

    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        terms = {"ce": F.cross_entropy(output.logits, batch.labels)}
        if self.params.unimodal_loss:
            for m in self._modalities:
                # mean over the samples that have the modality; 0 (with a graph) when none does
                terms[f"ce/{m}"] = present_cross_entropy(output.unimodal_logits[m], batch.labels, batch.present_of(m))
        return terms

    def after_backward(self, output: ModelOutput, batch: MultimodalBatch) -> None:
        assert self.ctx is not None
        grads = [p.grad for p in self._watched if p.grad is not None]
        if grads:
            self.epoch_trace = self.epoch_trace + fisher_trace(grads)
        self.record("window", float(self.window_active))
        if not self.window_active:
            return
        unimodal = {m: output.unimodal_logits[m] for m in self._modalities}
        scores = confidence_scores(unimodal, batch.labels, batch.present, reduce=all_reduce_sum)
        beta = inforeg_coefficients(torch.stack([scores[m] for m in self._modalities]), self._strengths)
        for i, m in enumerate(self._modalities):
            if beta[i] > 0:
                add_proximal_gradient(self._groups[m], self.ctx.snapshots[f"inforeg/{m}"], beta[i])
            self.record(f"beta/{m}", beta[i])

    def on_epoch_end(self, epoch: int) -> None:
        self.trace_history = [*self.trace_history, float(self.epoch_trace)]
        slope = prime_window_slope(self.trace_history, self.params.window)
        self.window_active = slope > self.params.threshold
        self.epoch_trace = torch.zeros((), device=self.epoch_trace.device)
        self.record("trace", self.trace_history[-1])
        self.record("trace_slope", slope)
