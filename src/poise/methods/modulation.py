"""Estimator x actuator: what measures the imbalance, kept apart from what acts on it.

An **estimator** turns a batch into per-modality imbalance ratios ``rho_m`` (``> 1``: modality ``m`` is ahead
of the others' mean; ``< 1``: behind) and a flag saying whether the batch could be scored at all:

- ``confidence``: the summed true-class probability of each modality's unimodal logits (OGM-GE's
  ``s_m``), ``rho_m = s_m / mean_{j != m} s_j``, over the samples that have every modality, summed over
  processes. Available inside the forward (from the features before any feature scaling).
- ``shapley``: the same ratio of the summed true-class probabilities of each modality's exact Shapley
  response (AGM's mono-modal responses, from forwards with modalities zeroed at the input in eval
  mode, without gradients). Costs ``2^M - 2`` extra forwards; needs the fused output, so it is read
  after the forward.

A **direction** turns the ratios into coefficients ``k_m``:

- ``slow_dominant``: ``k_m = 1 - tanh(alpha * relu(rho_m))`` where ``rho_m > 1`` (OGM's Eq. 10;
  ``continuous``: ``rho_m - 1`` inside the relu), 1 elsewhere;
- ``boost_weak``: ``k_m = 1 + tanh(alpha * relu(1 / rho_m - 1))`` (every modality below 1, or only the
  weakest), 1 elsewhere.

An **actuator** applies the coefficients at one point of the step:

- ``grad``: multiplies the gradients of each modality's encoder (a selection of its tensors, see
  ``params``) by ``k_m`` after the backward pass (OGM);
- ``grad_noise``: the same plus OGM-GE's ``N(0, std(g) + 1e-8)`` noise on every selected tensor;
- ``lr``: multiplies the learning rate of each encoder's parameter group by ``k_m`` for the step
  (``boost_weak``'s ``mode=lr``; survives Adam, which cancels a gradient scale);
- ``loss_weight``: adds each modality's unimodal cross-entropy to the fused one, weighted by ``k_m``;
- ``feature_drop``: each sample keeps modality ``m``'s features with probability ``k_m`` and the kept
  ones are scaled by ``1 / k_m`` (inverted dropout), decided inside the training forward from its own
  features; only slows (``k_m <= 1``).

``ogm`` is confidence x slow_dominant x grad, ``ogm_ge`` confidence x slow_dominant x grad_noise and
``boost_weak`` confidence x boost_weak x grad (or lr); ``modulate`` takes any pairing from options, e.g.
``--method modulate --set method.modulate.actuator=loss_weight``. Pairings that cannot work refuse at
construction with one sentence.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from poise.config import FloatRange
from poise.errors import IncompatibleError
from poise.functional.extensions import BoostTargets, batch_confidence_ratios, boost_coefficients_from_ratios
from poise.functional.ogm import ModulatedParameters, modulate_gradients, modulation_coefficients, select_modulated_parameters
from poise.functional.shapley import shapley_responses
from poise.functional.losses import present_cross_entropy
from poise.methods.base import Method, MethodParams, StepPlan
from poise.registry import Registry
from poise.train.distributed import all_reduce_sum, rank

if TYPE_CHECKING:
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput
    from poise.train.context import TrainContext

# offsets that keep the random streams apart from each other and from the run's own seed
_NOISE_STREAM = 7_001
_DROP_STREAM = 7_043


# ---- estimators ------------------------------------------------------------------------------------
class Estimator:
    """Per-modality imbalance ratios of a batch."""

    name: ClassVar[str] = "estimator"
    #: computable from the unimodal logits alone, i.e. inside the forward before any feature scaling
    in_forward: ClassVar[bool] = True

    def estimate(self, unimodal_logits: dict[str, Tensor], batch: MultimodalBatch, modalities: tuple[str, ...],
                 ctx: TrainContext, logits: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(M,) ratios in ``modalities`` order and a 0-d bool, False when no sample could be scored."""
        raise NotImplementedError


class ConfidenceEstimator(Estimator):
    name = "confidence"

    def estimate(self, unimodal_logits, batch, modalities, ctx, logits=None):
        unimodal = {m: unimodal_logits[m] for m in modalities}
        return batch_confidence_ratios(unimodal, batch.labels, batch.present, reduce=all_reduce_sum)


def shapley_outputs(ctx: TrainContext, modalities: tuple[str, ...], full: Tensor, batch: MultimodalBatch,
                    empty: str = "zero", grad: bool = False) -> dict[str, Tensor]:
    """Every modality's Shapley response: ``full`` is the output on every modality; the outputs on the other
    subsets come from forwards with the missing modalities zeroed at the input, in eval mode (the norm
    layers' running statistics stay untouched)."""
    model = ctx.model
    outputs = {frozenset(modalities): full}
    sizes = range(0 if empty == "output" else 1, len(modalities))
    was_training = model.training
    model.eval()
    try:
        for size in sizes:
            for subset in itertools.combinations(modalities, size):
                drop = [m for m in modalities if m not in subset]
                outputs[frozenset(subset)] = ctx.masked_forward(batch, drop, level="input", grad=grad).logits
    finally:
        model.train(was_training)
    return shapley_responses(outputs, modalities, empty)


class ShapleyEstimator(Estimator):
    name = "shapley"
    in_forward = False

    def estimate(self, unimodal_logits, batch, modalities, ctx, logits=None):
        if logits is None:
            raise ValueError("the shapley estimator needs the fused output of the forward")
        with torch.no_grad():
            responses = shapley_outputs(ctx, modalities, logits.detach(), batch)
        return batch_confidence_ratios(responses, batch.labels, batch.present, reduce=all_reduce_sum)


ESTIMATORS: Registry[type[Estimator]] = Registry("estimator", {"confidence": ConfidenceEstimator,
                                                               "shapley": ShapleyEstimator})

# ---- directions ------------------------------------------------------------------------------------
DIRECTIONS = ("slow_dominant", "boost_weak")

# ---- actuators -------------------------------------------------------------------------------------
#: actuator -> the hook where it acts (what a combination checks for conflicts)
ACTUATOR_HOOKS = {
    "grad": "after_backward",
    "grad_noise": "after_backward",
    "lr": "after_backward",
    "loss_weight": "loss",
    "feature_drop": "on_step_start",
}
Actuator = Literal["grad", "grad_noise", "lr", "loss_weight", "feature_drop"]


def separate_param_groups(optimizer: torch.optim.Optimizer, groups: dict[str, list[nn.Parameter]]) -> dict[str, list[dict]]:
    """Move each named list of parameters out of the optimizer's groups into groups of its own, each
    copying the hyperparameters of the group its parameters came from, so that their learning rate
    can be changed alone. Optimizer state is keyed by parameter and is kept. Returns name -> the new
    groups (empty for parameters the optimizer does not hold, e.g. frozen ones)."""
    out: dict[str, list[dict]] = {}
    for name, params in groups.items():
        ids = {id(p) for p in params}
        out[name] = []
        for source in list(optimizer.param_groups):
            moved = [p for p in source["params"] if id(p) in ids]
            if not moved:
                continue
            source["params"] = [p for p in source["params"] if id(p) not in ids]
            optimizer.add_param_group({**{k: v for k, v in source.items() if k != "params"}, "params": moved})
            out[name].append(optimizer.param_groups[-1])
    return out


def feature_drop_scale(k: Tensor, batch_size: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """(B, M) keep mask (sample i keeps modality m with probability ``k_m``) and feature multipliers
    (``1 / k_m`` where kept, 0 where dropped); ``k`` (M,) in (0, 1]."""
    u = torch.rand(batch_size, k.shape[0], generator=generator, device=k.device)
    keep = u < k
    return keep, keep.to(k.dtype) / k.clamp_min(1e-6)


#: what each actuator acts on (``poise.methods.base.FAMILIES``)
ACTUATOR_FAMILIES = {"grad": "gradients", "grad_noise": "gradients", "lr": "gradients", "loss_weight": "losses",
                     "feature_drop": "features"}


# ---- the method ------------------------------------------------------------------------------------
class ModulateParams(MethodParams):
    estimator: Literal["confidence", "shapley"] = Field("confidence", description="what measures the imbalance")
    direction: Literal["slow_dominant", "boost_weak"] = Field(
        "slow_dominant", description="slow_dominant: k < 1 for modalities ahead (OGM); boost_weak: k > 1 for those behind")
    actuator: Actuator = Field("grad", description="where the coefficients act: grad, grad_noise, lr, loss_weight, feature_drop")
    alpha: float = Field(0.8, ge=0, description="strength of the coefficients")
    continuous: bool = Field(False, description="slow_dominant: 1 - tanh(alpha * relu(rho - 1)) instead of OGM's relu(rho)")
    targets: BoostTargets = Field("below_one", description="boost_weak with more than two modalities: every modality "
                                  "below 1 (below_one) or only the weakest")
    params: ModulatedParameters = Field("weights", description="grad, grad_noise: which encoder tensors are scaled "
                                        "(weights: every weight tensor; conv: 4-D conv weights; all: every parameter)")
    modulation_starts: int = Field(0, ge=0, description="first epoch (0-based) in which the method acts")
    modulation_ends: int | None = Field(None, ge=0, description="last epoch in which it acts, inclusive (none: to the end)")

    tunable = {"alpha": FloatRange(0.05, 2.0, log=True)}

    @model_validator(mode="after")
    def _consistent(self) -> ModulateParams:
        if self.modulation_ends is not None and self.modulation_ends < self.modulation_starts:
            raise ValueError(f"modulation_ends ({self.modulation_ends}) is before modulation_starts ({self.modulation_starts})")
        check_pairing(self.estimator, self.direction, self.actuator)
        return self

    def active(self, epoch: int) -> bool:
        return self.modulation_starts <= epoch and (self.modulation_ends is None or epoch <= self.modulation_ends)


def check_pairing(estimator: str, direction: str, actuator: str) -> None:
    """Refuse, in one sentence, a pairing that cannot work."""
    if actuator == "feature_drop" and direction != "slow_dominant":
        raise ValueError("actuator feature_drop can only slow a modality (keep probability k <= 1); "
                         "use direction=slow_dominant, or another actuator with boost_weak")
    if actuator == "feature_drop" and not ESTIMATORS[estimator].in_forward:
        raise ValueError(f"estimator {estimator} needs the fused output, which exists only after the forward where "
                         "feature_drop acts; use grad, grad_noise, lr or loss_weight with it")


class Modulated(Method):
    """An estimator, a direction and an actuator (see the module's description). Subclasses fix the
    three (``estimator``, ``direction``, ``actuator`` class attributes) or leave them to the options."""

    family = "gradients"
    min_modalities = 2
    per_batch_decisions = True
    #: fixed components; None: read from the options of the same name
    estimator: ClassVar[str | None] = None
    direction: ClassVar[str | None] = None
    actuator: ClassVar[str | None] = None
    #: fixed encoder-tensor selection of the grad actuators; None: the ``params`` option
    modulated_parameters: ClassVar[str | None] = None

    def __init__(self, params: MethodParams | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        try:
            check_pairing(self.component("estimator"), self.component("direction"), self.component("actuator"))
        except ValueError as err:
            raise IncompatibleError(f"method '{self.name}': {err}") from None
        self._estimator = ESTIMATORS[self.component("estimator")]()
        self.family = self.family_for({"actuator": self.component("actuator")})
        self._modalities: tuple[str, ...] = ()
        self._groups: list[list[nn.Parameter]] = []
        self._encoder_groups: dict[str, list[dict]] = {}
        self._scheduled_lr: list[tuple[dict, float]] = []

    @classmethod
    def family_for(cls, options: dict[str, Any]) -> str:
        """Gradient actuators act on gradients; ``loss_weight`` on the losses; ``feature_drop`` on features."""
        actuator = cls.actuator or options.get("actuator") or ModulateParams.model_fields["actuator"].default
        return ACTUATOR_FAMILIES.get(actuator, cls.family)

    def component(self, kind: str) -> str:
        fixed = getattr(type(self), kind)
        return fixed if fixed is not None else getattr(self.params, kind)

    def acts_at(self, hook: str) -> bool:
        return hook == ACTUATOR_HOOKS[self.component("actuator")]

    def per_batch_decision(self) -> str | None:
        if self.component("actuator") in ("loss_weight", "feature_drop"):
            return f"reads its {self.component('estimator')} ratio from each batch's forward to weight or drop it"
        return None

    def active(self, epoch: int) -> bool:
        return self.params.active(epoch)

    # ---- set-up ---------------------------------------------------------------------------------
    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        model = ctx.model
        self._modalities = tuple(model.modalities)
        actuator = self.component("actuator")
        if actuator in ("grad", "grad_noise"):
            mode = self.modulated_parameters or self.params.params
            self._groups = []
            for m in self._modalities:
                group = select_modulated_parameters(model.encoders[m], mode)
                if not group:
                    raise IncompatibleError(
                        f"method '{self.name}' with params={mode} modulates no parameter of modality '{m}' "
                        f"(its {type(model.encoders[m]).__name__} has no "
                        f"{'4-D conv weights' if mode == 'conv' else 'trainable weight tensors'}); use params=weights")
                self._groups.append(group)
        if actuator == "grad_noise":
            # same seed on every rank: after the all-reduce the gradients agree, and so must the noise
            self.add_state("noise_generator",
                           torch.Generator(device=ctx.device).manual_seed(ctx.seed * 1_000_003 + _NOISE_STREAM))
        if actuator == "feature_drop":
            # per-sample masks differ by rank because every rank holds different samples
            self.add_state("drop_generator", torch.Generator(device=ctx.device).manual_seed(
                ctx.seed * 1_000_003 + _DROP_STREAM + 7919 * rank()))
        if actuator == "lr":
            # each encoder in a param group of its own; the scheduled learning rate is put back right
            # after every optimizer step, so the scheduler only ever sees (and decays) scheduled values
            self._encoder_groups = separate_param_groups(
                ctx.optimizer, {m: model.modality_parameters(m) for m in self._modalities})
            ctx.optimizer.register_step_post_hook(self._restore_learning_rates)

    # ---- estimate and direction -------------------------------------------------------------------
    def coefficients(self, unimodal_logits: dict[str, Tensor], batch: MultimodalBatch,
                     logits: Tensor | None = None) -> Tensor:
        """(M,) coefficients of this batch, recorded with their ratios."""
        assert self.ctx is not None, "setup() must run before training"
        ratios, valid = self._estimator.estimate(unimodal_logits, batch, self._modalities, self.ctx, logits)
        if self.component("direction") == "slow_dominant":
            k = modulation_coefficients(ratios, self.params.alpha, getattr(self.params, "continuous", False))
        else:
            k = boost_coefficients_from_ratios(ratios, self.params.alpha, getattr(self.params, "targets", "below_one"))
        k = torch.where(valid, k, torch.ones_like(k))
        for i, m in enumerate(self._modalities):
            self.record(f"ratio/{m}", ratios[i])
            self.record(f"coef/{m}", k[i])
        return k

    # ---- actuators --------------------------------------------------------------------------------
    def on_step_start(self, batch: MultimodalBatch) -> StepPlan | None:
        assert self.ctx is not None, "setup() must run before training"
        if self.component("actuator") != "feature_drop" or not self.active(self.ctx.epoch):
            return None
        return StepPlan(feature_scale=lambda _, unimodal: self._drop(unimodal, batch))

    def _drop(self, unimodal_logits: dict[str, Tensor], batch: MultimodalBatch) -> dict[str, Tensor]:
        k = self.coefficients(unimodal_logits, batch)
        keep, scale = feature_drop_scale(k, len(batch), self.drop_generator)
        for i, m in enumerate(self._modalities):
            self.record(f"kept/{m}", keep[:, i].float().mean())
        return {m: scale[:, i] for i, m in enumerate(self._modalities)}

    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        terms = {"ce": F.cross_entropy(output.logits, batch.labels)}
        if self.component("actuator") != "loss_weight":
            return terms
        assert self.ctx is not None, "setup() must run before training"
        if self.active(self.ctx.epoch):
            k = self.coefficients(output.unimodal_logits, batch, output.logits)
        else:
            k = torch.ones(len(self._modalities), device=output.logits.device)
        for i, m in enumerate(self._modalities):
            ce = present_cross_entropy(output.unimodal_logits[m], batch.labels, batch.present_of(m))
            terms[f"uni/{m}"] = k[i].to(ce.dtype) * ce
        return terms

    def after_backward(self, output: ModelOutput, batch: MultimodalBatch) -> None:
        assert self.ctx is not None, "setup() must run before training"
        actuator = self.component("actuator")
        if actuator not in ("grad", "grad_noise", "lr") or not self.active(self.ctx.epoch):
            return
        k = self.coefficients(output.unimodal_logits, batch, output.logits)
        if actuator != "lr":
            modulate_gradients(self._groups, k, noise=actuator == "grad_noise",
                               generator=getattr(self, "noise_generator", None))
            return
        # a step the fp16 gradient scaler skipped never ran the restoring hook: restore first
        self._restore_learning_rates(self.ctx.optimizer, (), {})
        factors = k.tolist()  # optimizers take Python-float learning rates: one sync per step
        for i, m in enumerate(self._modalities):
            for group in self._encoder_groups.get(m, []):
                self._scheduled_lr.append((group, group["lr"]))
                group["lr"] = group["lr"] * factors[i]

    def _restore_learning_rates(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group, lr in self._scheduled_lr:
            group["lr"] = lr
        self._scheduled_lr.clear()


class Modulate(Modulated):
    """Any estimator with any direction and actuator, chosen by options."""

    name = "modulate"
    Params: ClassVar[type[MethodParams]] = ModulateParams


__all__ = ["ACTUATOR_HOOKS", "DIRECTIONS", "ESTIMATORS", "ConfidenceEstimator", "Estimator", "Modulate",
           "ModulateParams", "Modulated", "ShapleyEstimator", "check_pairing", "feature_drop_scale",
           "separate_param_groups", "shapley_outputs"]
