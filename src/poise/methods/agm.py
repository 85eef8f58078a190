"""AGM (Li et al., ICCV 2023): adaptive gradient modulation from Shapley mono-modal responses. Each
modality's response is its exact Shapley value of the model's output over the subsets of modalities
(the others zeroed at the input); a modality whose response is more confident now than on average
over the run is slowed, one that is less confident is sped up."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor

from poise.config import FloatRange
from poise.functional.shapley import agm_coefficients
from poise.methods.base import Method, MethodParams
from poise.methods.modulation import shapley_outputs
from poise.train.distributed import all_reduce_sum

if TYPE_CHECKING:
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput
    from poise.train.context import TrainContext


class AGMParams(MethodParams):
    alpha: float = Field(1.5, ge=0, description="modulation strength (released: CREMA-D 1.5, AV-MNIST 2.5, UR-Funny 4.0)")
    formulation: Literal["gradient", "released"] = Field(
        "gradient",
        description="gradient: plain fused CE, each encoder's gradient multiplied by k_m (responses from no-grad "
        "passes); released: the loss is CE(sum_m o_m) through the masked passes (with grad, in eval mode), the "
        "gradient into each response o_m multiplied by k_m, and the norm clipped to 1 when a fused-head gradient "
        "entry exceeds 1",
    )
    empty: Literal["zero", "output"] = Field(
        "zero", description="the empty subset's value: zero (released; responses sum to the output) or the output with "
                            "every modality zeroed (the classic Shapley value)")
    clamp: float = Field(10.0, gt=0, description="k_m = exp(alpha * min(r*_m - r_m, clamp)) (released 10; BalanceBenchmark 7)")
    modulation_starts: int = Field(0, ge=0, description="first epoch with modulation (inclusive)")
    modulation_ends: int = Field(1_000_000, ge=0, description="last epoch with modulation (inclusive; released: all)")

    tunable = {"alpha": FloatRange(0.5, 5.0, log=True)}

    @model_validator(mode="after")
    def _window(self) -> AGMParams:
        if self.modulation_ends < self.modulation_starts:
            raise ValueError(f"modulation_ends ({self.modulation_ends}) is before modulation_starts ({self.modulation_starts})")
        return self


def _scale_gradient(x: Tensor, k: Tensor) -> Tensor:
    """``x`` in the forward pass; its gradient multiplied by ``k`` in the backward pass."""
    k = k.to(x.dtype)
    return x * k + x.detach() * (1 - k)


class AGM(Method):
    name = "agm"
    family = "gradients"
    Params: ClassVar[type[MethodParams]] = AGMParams
    min_modalities = 2

    def __init__(self, params: MethodParams | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self._modalities: tuple[str, ...] = ()
        released = self.params.formulation == "released"
        # the released form backpropagates through the masked passes; the gradient form decides once per step
        self.multiple_backward = released
        self.per_batch_decisions = not released

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        self._modalities = tuple(ctx.model.modalities)
        M = len(self._modalities)
        self.add_state("score_sum", torch.zeros(M, device=ctx.device))
        self.add_state("score_count", torch.zeros((), device=ctx.device))

    def active(self, epoch: int) -> bool:
        return self.params.modulation_starts <= epoch <= self.params.modulation_ends

    # ---- responses and coefficients ---------------------------------------------------------------
    def responses(self, full: Tensor, batch: MultimodalBatch, grad: bool) -> dict[str, Tensor]:
        """Every modality's Shapley response: ``full`` is the output on every modality; the outputs on the
        other subsets come from masked passes in eval mode (their norm statistics stay untouched)."""
        assert self.ctx is not None
        return shapley_outputs(self.ctx, self._modalities, full, batch, self.params.empty, grad)

    def coefficients(self, responses: dict[str, Tensor], batch: MultimodalBatch) -> Tensor:
        """``k_m`` from this batch's scores (over every process, present samples only) and their running
        mean over the run, which this call updates."""
        sums, counts = [], []
        for m in self._modalities:
            o = responses[m].detach().float()
            p = torch.softmax(o, 1).gather(1, batch.labels.view(-1, 1)).squeeze(1)
            rows = batch.present_of(m).float()
            sums.append((-torch.log(p.clamp_min(1e-8)) * rows).sum())
            counts.append(rows.sum())
        scores = all_reduce_sum(torch.stack(sums)) / all_reduce_sum(torch.stack(counts)).clamp_min(1)
        with torch.no_grad():
            self.score_sum += scores
            self.score_count += 1
        running = self.score_sum / self.score_count
        k = agm_coefficients(scores, running, self.params.alpha, self.params.clamp)
        for i, m in enumerate(self._modalities):
            self.record(f"score/{m}", scores[i])
            self.record(f"coef/{m}", k[i])
        return k

    # ---- the released form: through the responses -------------------------------------------------
    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        assert self.ctx is not None, "setup() must run before training"
        if self.params.formulation != "released":
            return {"ce": F.cross_entropy(output.logits, batch.labels)}
        responses = self.responses(output.logits, batch, grad=True)
        if self.active(self.ctx.epoch):
            k = self.coefficients(responses, batch)
            responses = {m: _scale_gradient(o, k[i]) for i, (m, o) in enumerate(responses.items())}
        fused = torch.stack(list(responses.values())).sum(0)
        return {"ce": F.cross_entropy(fused, batch.labels)}

    # ---- the gradient form: encoder gradients ------------------------------------------------------
    def after_backward(self, output: ModelOutput, batch: MultimodalBatch) -> None:
        ctx = self.ctx
        assert ctx is not None, "setup() must run before training"
        model = ctx.model
        if self.params.formulation == "released":
            head = [p.grad for p in model.head_parameters() if p.grad is not None]
            if head and bool(torch.stack([g.abs().max() for g in head]).max() > 1):
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
            return
        if not self.active(ctx.epoch):
            return
        with torch.no_grad():
            k = self.coefficients(self.responses(output.logits.detach(), batch, grad=False), batch)
            for i, m in enumerate(self._modalities):
                for p in model.modality_parameters(m):
                    if p.grad is not None:
                        p.grad.mul_(k[i].to(p.grad.dtype))
