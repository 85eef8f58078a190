"""OGM, OGM-GE (CVPR 2022) and OPM (TPAMI 2024): slow the dominant modality by its confidence ratio,
in the backward pass (gradient scale) or in the forward pass (feature dropping).

The mathematics is in :mod:`poise.functional.ogm`; these classes only decide when and on what it acts.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from poise.config import FloatRange
from poise.functional.confidence import confidence_scores
from poise.functional.ogm import (
    opm_drop_probabilities,
    opm_feature_scale,
    opm_keep_mask,
    opm_loss_rows,
    opm_theta,
    stack_ratios,
)
from poise.methods.base import Method, MethodParams, StepPlan
from poise.methods.modulation import Modulated
from poise.train.distributed import all_reduce_sum, rank

if TYPE_CHECKING:
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput, MultimodalModel
    from poise.train.context import TrainContext

# offsets that keep the method's random streams apart from each other and from the run's own seed
_COIN_STREAM = 7_013
_MASK_STREAM = 7_027


def _unwrap(model: nn.Module) -> MultimodalModel:
    """The multimodal model behind a distributed wrapper."""
    return getattr(model, "module", model)


def _present_in_order(batch: MultimodalBatch, modalities: tuple[str, ...]) -> Tensor:
    """(B, M) presence mask with columns in ``modalities`` order."""
    return torch.stack([batch.present_of(m) for m in modalities], dim=1)


class OGMParams(MethodParams):
    alpha: float = Field(0.8, ge=0, description="modulation strength (released: CREMA-D 0.8, VGGSound 0.1)")
    continuous: bool = Field(
        False,
        description="true: poise's own variant 1 - tanh(alpha * relu(rho - 1)), continuous at rho = 1; default "
        "false: the paper's Eq. 10 and the released code, 1 - tanh(alpha * relu(rho)), which jumps from 1 to "
        "1 - tanh(alpha) as rho crosses 1",
    )
    modulation_starts: int = Field(0, ge=0, description="first epoch with modulation (inclusive)")
    modulation_ends: int = Field(50, ge=0, description="last epoch with modulation (inclusive; released default 50)")
    params: Literal["weights", "conv", "all"] = Field(
        "weights",
        description="weights: every weight tensor of each encoder (conv and linear, a projection after the "
        "convolutions included; never normalisation parameters or biases), what the released rule touches in "
        "its ResNet-18 encoders; conv: the released rule literally, 4-D conv weights only (refused for an "
        "encoder without any); all: every encoder parameter",
    )

    tunable = {"alpha": FloatRange(0.05, 2.0, log=True)}

    @model_validator(mode="after")
    def _window(self) -> OGMParams:
        if self.modulation_ends < self.modulation_starts:
            raise ValueError(
                f"modulation_ends ({self.modulation_ends}) is before modulation_starts ({self.modulation_starts})"
            )
        return self

    def active(self, epoch: int) -> bool:
        return self.modulation_starts <= epoch <= self.modulation_ends


class OGM(Modulated):
    """On-the-fly gradient modulation: after the backward pass, the gradients of each dominant
    modality's encoder are multiplied by ``k_m < 1`` (GE variant: plus Gaussian noise on every
    modulated tensor of every encoder). The confidence estimator, the slow-dominant direction and the
    gradient actuator of :mod:`poise.methods.modulation`."""

    name = "ogm"
    family = "gradients"
    Params: ClassVar[type[MethodParams]] = OGMParams
    estimator = "confidence"
    direction = "slow_dominant"
    actuator = "grad"


class OGMGE(OGM):
    """OGM with generalisation enhancement: ``g <- k_m g + N(0, std(g) + 1e-8)`` on every modulated tensor."""

    name = "ogm_ge"
    actuator = "grad_noise"


class OPMParams(MethodParams):
    q_base: float = Field(0.5, ge=0, le=1, description="base drop probability of the dominant modality")
    lam: float = Field(0.5, ge=0, description="lambda: how much the drop probability grows with the imbalance")
    p_exe: float = Field(0.7, ge=0, le=1, description="probability that a batch is modulated at all")
    warmup_epochs: int = Field(6, ge=0, description="epochs without dropping at the start (released: epochs 0-5)")
    ratio_source: Literal["current", "previous"] = Field(
        "current",
        description="current: the ratio of this batch, read from the training forward's own features before they "
        "are dropped (as the released code does); previous: the ratio of the previous training batch (one step late)",
    )
    extra_pass: bool = Field(
        False,
        description="current ratio only: compute it in a separate no-grad encoder pass before the forward (the same "
        "ratio at the cost of one more encoder forward per modulated batch)",
    )

    tunable = {"q_base": FloatRange(0.1, 0.9), "lam": FloatRange(0.1, 2.0, log=True)}


class OPM(Method):
    """On-the-fly prediction modulation: on a share ``p_exe`` of the batches, each sample drops the
    dominant modality's features with probability ``q_m``; the kept features are rescaled by
    ``1 / (1 - theta)``; samples left with no modality leave the loss, and a batch with none left is
    skipped. Evaluation never drops."""

    name = "opm"
    family = "features"
    Params: ClassVar[type[MethodParams]] = OPMParams
    min_modalities = 2

    def __init__(self, params: MethodParams | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self._modalities: tuple[str, ...] = ()
        self._feature_dims: Tensor | None = None
        self._coin_generator: torch.Generator | None = None
        self._mask_generator: torch.Generator | None = None
        self._previous_ratios: Tensor | None = None
        self._keep: Tensor | None = None
        self._skip = False

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        model = _unwrap(ctx.model)
        self._modalities = tuple(model.modalities)
        dims = [model.fusion.feature_dims[m] for m in self._modalities]
        self._feature_dims = torch.tensor(dims, dtype=torch.float32, device=ctx.device)
        base = ctx.seed * 1_000_003
        # The per-batch decision is the same on every rank (one batch, one decision); the per-sample
        # masks differ by rank because every rank holds different samples.
        self._coin_generator = self.add_state("coin_generator", torch.Generator().manual_seed(base + _COIN_STREAM))
        self._mask_generator = self.add_state(
            "mask_generator", torch.Generator(device=ctx.device).manual_seed(base + _MASK_STREAM + 7919 * rank()))

    def per_batch_decision(self) -> str | None:
        return "draws whether to drop features and computes its confidence ratio"

    # ---- ratio estimate ---------------------------------------------------------------------------
    def _ratios(self, unimodal_logits: dict[str, Tensor], batch: MultimodalBatch) -> Tensor:
        unimodal = {m: unimodal_logits[m] for m in self._modalities}
        return stack_ratios(confidence_scores(unimodal, batch.labels, batch.present, reduce=all_reduce_sum))

    @torch.no_grad()
    def _current_ratios(self, batch: MultimodalBatch) -> Tensor:
        """This batch's ratio from an encoder pass that leaves no trace: norm-layer running statistics
        are restored afterwards, so the training forward sees the model exactly as it was."""
        assert self.ctx is not None
        model = _unwrap(self.ctx.model)
        buffers = list(model.buffers())
        saved = [b.clone() for b in buffers]
        try:
            # the run's mixed precision (a context built by hand may have none)
            with getattr(self.ctx, "autocast", contextlib.nullcontext)():
                features = model.encode(batch, self._modalities)
                logits = model.fusion.unimodal(features)
        finally:
            for b, s in zip(buffers, saved):
                b.copy_(s)
        return self._ratios(logits, batch)

    # ---- the step ---------------------------------------------------------------------------------
    def on_step_start(self, batch: MultimodalBatch) -> StepPlan | None:
        assert self.ctx is not None, "setup() must run before training"
        self._keep, self._skip = None, False
        if self.ctx.epoch < self.params.warmup_epochs:
            return None
        # drawn on the CPU generator: deciding the branch never waits for the device
        if float(torch.rand((), generator=self._coin_generator)) >= self.params.p_exe:
            return None
        if self.params.ratio_source == "current" and not self.params.extra_pass:
            # decided inside the forward, from the features it has just computed
            return StepPlan(feature_scale=lambda _, unimodal: self._feature_scale(self._ratios(unimodal, batch), len(batch)))
        if self.params.ratio_source == "current":
            ratios = self._current_ratios(batch)
        elif self._previous_ratios is not None:
            ratios = self._previous_ratios
        else:
            return None
        return StepPlan(feature_scale=self._feature_scale(ratios, len(batch)))

    def _feature_scale(self, ratios: Tensor, batch_size: int) -> dict[str, Tensor]:
        """Drop probabilities from the ratios, then this batch's keep mask and feature multipliers."""
        q = opm_drop_probabilities(ratios, self.params.q_base, self.params.lam)
        theta = opm_theta(q, self._feature_dims)
        keep = opm_keep_mask(q, batch_size, self._mask_generator)
        scale = opm_feature_scale(keep, theta)
        self._keep = keep
        for i, m in enumerate(self._modalities):
            self.record(f"q/{m}", q[i])
        self.record("theta", theta)
        return {m: scale[:, i] for i, m in enumerate(self._modalities)}

    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        if self.params.ratio_source == "previous":
            # unimodal logits come from the features before any dropping
            self._previous_ratios = self._ratios(output.unimodal_logits, batch)
        if self._keep is None:
            return {"ce": F.cross_entropy(output.logits, batch.labels)}
        rows = opm_loss_rows(self._keep, _present_in_order(batch, self._modalities))
        remaining = all_reduce_sum(rows.sum())
        self.record("kept_samples", rows.float().mean())
        if int(remaining) == 0:
            # every sample of the (global) batch lost every modality: no update this step
            self._skip = True
            return {"ce": output.logits.new_zeros(())}
        if not bool(rows.any()):
            # nothing left on this rank, but other ranks step: take part with a zero gradient
            return {"ce": output.logits.sum() * 0.0}
        return {"ce": F.cross_entropy(output.logits[rows], batch.labels[rows])}

    def backward(self, terms: dict[str, Tensor], output: ModelOutput, batch: MultimodalBatch) -> None:
        if self._skip:
            # no backward: every gradient stays None and the optimizer leaves every parameter as it is
            return
        super().backward(terms, output, batch)

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()  # the two generators
        if self._previous_ratios is not None:
            state["previous_ratios"] = self._previous_ratios.detach().cpu().clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        previous = state.get("previous_ratios")
        self._previous_ratios = previous.to(self._feature_dims.device) if previous is not None else None
