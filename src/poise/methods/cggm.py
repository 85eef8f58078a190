"""CGGM (Guo et al., NeurIPS 2024): per-modality auxiliary classifiers, trained on the detached encoder
features by an optimizer of their own, measure each modality's batch accuracy; from the change since the
previous step every encoder's gradient is scaled by ``rho * c_m`` (``c_m`` the other modalities' share of the
improvement), and a direction term ``L_gm`` pulls each modality's part of the fused head's gradient towards
its classifier's gradient."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from poise.config import FloatRange
from poise.functional.cggm import cggm_coefficients, cggm_direction_loss, gradient_cosines, head_weight_gradient
from poise.methods.base import Method, MethodParams
from poise.models.init import init_weights
from poise.train.distributed import all_reduce_sum, average_gradients, world_size

if TYPE_CHECKING:
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput
    from poise.train.context import TrainContext


class CGGMParams(MethodParams):
    rho: float = Field(1.3, gt=0, description="encoder gradients are multiplied by rho * c_m (released 1.3)")
    direction_weight: float = Field(
        0.05, ge=0, description="lambda, the weight of L_gm (released: Food-101 0.05, MOSI 0.2)")
    direction: Literal["gradient", "released"] = Field(
        "gradient",
        description="gradient: L_gm of this step from the cosine between each classifier's weight gradient and the "
        "fused head's weight gradient on that modality, differentiable through the latter (paper); released: the "
        "previous step's L_gm from the cosine between the weights themselves, a constant that moves no gradient",
    )
    bound_coefficients: bool = Field(
        True,
        description="clamp c_m to [0, 1], the formula's range when every classifier improves; false: unbounded as "
        "released, where c_m explodes (or turns negative and reverses an encoder's gradient) when the improvements "
        "nearly cancel, which the released code survives only through its gradient clipping (0.8)",
    )
    classifier_lr: float = Field(5e-4, gt=0, description="learning rate of the classifiers' AdamW (released 5e-4)")
    classifier_weight_decay: float = Field(3e-3, ge=0, description="weight decay of the classifiers' AdamW (released 3e-3)")

    tunable = {"rho": FloatRange(1.0, 2.0), "direction_weight": FloatRange(0.01, 0.5, log=True)}


class CGGM(Method):
    name = "cggm"
    family = "gradients"
    Params: ClassVar[type[MethodParams]] = CGGMParams
    min_modalities = 2
    # L_gm compares a classifier's (C, d_m) weight gradient with the fused head's weight on modality m
    fusions = ("concat", "sum")
    params: CGGMParams

    def __init__(self, params: MethodParams | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self._modalities: tuple[str, ...] = ()
        self.classifiers: nn.ModuleDict | None = None
        self.classifier_optimizer: torch.optim.Optimizer | None = None
        self._coefficients: Tensor | None = None

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        model = ctx.model
        self._modalities = tuple(model.modalities)
        M = len(self._modalities)
        dims = model.fusion.feature_dims
        self.classifiers = nn.ModuleDict({m: nn.Linear(dims[m], ctx.info.num_classes) for m in self._modalities})
        init_weights(self.classifiers)
        self.classifiers.to(ctx.device)
        self.classifier_optimizer = torch.optim.AdamW(self.classifiers.parameters(), lr=self.params.classifier_lr,
                                                      weight_decay=self.params.classifier_weight_decay)
        # the released code starts from accuracies of 0, so the first step's changes are the first accuracies
        self.add_state("previous_accuracy", torch.zeros(M, device=ctx.device))
        self.add_state("previous_direction", torch.zeros((), device=ctx.device))
        self.add_state("have_direction", False)

    def per_batch_decision(self) -> str | None:
        return "steps its classifiers and decides its coefficients"

    def head_weight(self, m: str) -> Tensor:
        """The fused head's weight on modality m's features (C, d_m)."""
        assert self.ctx is not None
        fusion = self.ctx.model.fusion
        if hasattr(fusion, "_slices"):
            return fusion.fc.weight[:, dict(fusion._slices())[m]]
        return fusion.fc[m].weight

    # ---- the classifiers --------------------------------------------------------------------------
    def classifier_step(self, output: ModelOutput, batch: MultimodalBatch) -> tuple[Tensor, list[Tensor]]:
        """Accuracies (M,) of the classifiers on this batch (present samples, over every process), then one
        step of their optimizer; returns the accuracies and each classifier's weight gradient of the step."""
        assert self.classifiers is not None and self.classifier_optimizer is not None
        correct, counts, losses = [], [], []
        with torch.enable_grad(), torch.autocast(device_type=batch.labels.device.type, enabled=False):
            for m in self._modalities:
                rows = batch.present_of(m)
                logits = self.classifiers[m](output.features[m].detach().float())
                correct.append(((logits.argmax(1) == batch.labels) & rows).sum().float())
                counts.append(rows.sum().float())
                # a sum over this process's samples divided by the count over every process (times the
                # number of processes, whose gradients are averaged): the mean over the whole batch
                total = all_reduce_sum(rows.sum().float()).clamp_min(1)
                losses.append((F.cross_entropy(logits, batch.labels, reduction="none") * rows).sum()
                              * world_size() / total)
            self.classifier_optimizer.zero_grad(set_to_none=True)
            torch.stack(losses).sum().backward()
        params = list(self.classifiers.parameters())
        average_gradients(params)
        grads = [self.classifiers[m].weight.grad.detach().clone() for m in self._modalities]
        self.classifier_optimizer.step()
        self.classifier_optimizer.zero_grad(set_to_none=True)
        correct_t, counts_t = all_reduce_sum(torch.stack(correct)), all_reduce_sum(torch.stack(counts))
        # a modality no sample has in this batch keeps its previous accuracy (no change)
        accuracy = torch.where(counts_t > 0, correct_t / counts_t.clamp_min(1), self.previous_accuracy)
        return accuracy, grads

    # ---- the loss and the gradients ---------------------------------------------------------------
    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        assert self.ctx is not None and self.classifiers is not None, "setup() must run before training"
        terms = {"ce": F.cross_entropy(output.logits, batch.labels)}
        released = self.params.direction == "released"
        if released:
            with torch.no_grad():
                weight_cosines = gradient_cosines([self.classifiers[m].weight for m in self._modalities],
                                                  [self.head_weight(m) for m in self._modalities])
        accuracy, classifier_grads = self.classifier_step(output, batch)
        with torch.no_grad():
            coefficients = cggm_coefficients(accuracy - self.previous_accuracy)
            if self.params.bound_coefficients:
                coefficients = coefficients.clamp(0.0, 1.0)
            self.previous_accuracy.copy_(accuracy)
        self._coefficients = coefficients
        for i, m in enumerate(self._modalities):
            self.record(f"accuracy/{m}", accuracy[i])
            self.record(f"coef/{m}", coefficients[i])
        if released:
            # the previous step's value: a constant in this step's loss
            if self.have_direction:
                terms["direction"] = self.params.direction_weight * self.previous_direction.clone()
            with torch.no_grad():
                self.previous_direction.copy_(cggm_direction_loss(coefficients, weight_cosines))
            self.have_direction = True
            return terms
        fused = [self.fused_gradient(output, batch, m) for m in self._modalities]
        direction = cggm_direction_loss(coefficients, gradient_cosines(classifier_grads, fused))
        self.record("direction", direction)
        terms["direction"] = self.params.direction_weight * direction
        return terms

    def fused_gradient(self, output: ModelOutput, batch: MultimodalBatch, m: str) -> Tensor:
        """The fused loss's gradient on ``W_m`` over the batch of every process, up to a positive factor (the
        cosine ignores it): this process's part is differentiable, the others' are constants; scaled by the
        number of processes, whose gradients are averaged, so that N processes step as one would."""
        rows = batch.present_of(m)
        local = head_weight_gradient(output.logits, batch.labels, output.features[m], rows) * rows.sum().clamp_min(1)
        n = world_size()
        if n == 1:
            return local
        return all_reduce_sum(local.detach()) + n * (local - local.detach())

    def after_backward(self, output: ModelOutput, batch: MultimodalBatch) -> None:
        assert self.ctx is not None
        if self._coefficients is None:
            return
        scale = self.params.rho * self._coefficients
        with torch.no_grad():
            for i, m in enumerate(self._modalities):
                for p in self.ctx.model.modality_parameters(m):
                    if p.grad is not None:
                        p.grad.mul_(scale[i].to(p.grad.dtype))

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.classifiers is not None and self.classifier_optimizer is not None:
            state["classifiers"] = {k: v.detach().clone() for k, v in self.classifiers.state_dict().items()}
            state["classifier_optimizer"] = copy.deepcopy(self.classifier_optimizer.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "classifiers" in state and self.classifiers is not None and self.classifier_optimizer is not None:
            self.classifiers.load_state_dict(state["classifiers"])
            self.classifier_optimizer.load_state_dict(state["classifier_optimizer"])
