"""MLA: multimodal learning with alternating unimodal adaptation (Zhang et al., CVPR 2024).

One linear head ``g`` is shared by every modality (the ``shared`` fusion). Per batch, for each
modality ``m`` in a fixed order: ``loss_m = CE(g(h_m), y)`` over the samples that have ``m``, backward,
head-gradient modification, optimizer step, zero grad. The encoders' features come from the one
forward pass of the step; after a step the head has changed in place, so the next modality's logits
are recomputed from its features with the updated head. An encoder only ever receives gradients from
its own modality's loss, and ``zero_grad(set_to_none=True)`` leaves the others' gradients ``None``, so
SGD and AdamW skip them entirely (no momentum, no weight decay) during other modalities' steps. The
released environment (PyTorch 1.8) zeroes gradients in place instead, so there the encoders stepped
earlier in the same batch keep moving by momentum and weight decay (``zero_grad=zeros``).

Head-gradient modification, paper order: ``P_0 = I``; the step of modality ``m`` uses ``grad_W P`` where
``P`` has absorbed the mean features of every step before it (so, at the step of ``m``, the mean
feature of the modality trained just before, ``P <- owm_update(P, mean h_prev, alpha)``); here that
update is done right after each step, with the features of the modality just trained. The released
code instead updates ``P`` with the CURRENT modality's mean feature before projecting that same
modality's gradient, skips the very first step of the run, and uses its own update formula and alpha
schedule (see :mod:`poise.functional.mla`). At the released code's current head that projection never
runs at all: it looks for a parameter named ``module.weight`` in the head ``Linear``, whose weight is named
``weight``; ``variant=released`` therefore does not project unless ``gradient_modification=true``.

Test time: ``sum_m lambda_m z_m`` over the present modalities, ``lambda`` from per-sample prediction
entropy (paper), from the released batch-dimension softmax, or fixed (released: by modality role, see
``RELEASED_FIXED_WEIGHTS``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor

from poise.config import FloatRange
from poise.errors import IncompatibleError
from poise.functional.mla import (
    entropy_fusion_weights,
    entropy_fusion_weights_released,
    fixed_fusion_weights,
    fuse_logits,
    owm_project,
    owm_update,
    owm_update_released,
    released_owm_alpha,
)
from poise.methods.base import Method, MethodParams
from poise.models.fusion import SharedHeadFusion
from poise.train.distributed import all_reduce_sum

if TYPE_CHECKING:
    from poise.data.base import DatasetInfo
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput
    from poise.train.context import TrainContext

#: The released code's fixed fusion weights belong to the slots of its models' outputs, not to the
#: dataset's order: ``av_alpha * out_a + (1 - av_alpha) * out_v`` with ``main(av_alpha=0.55)``, where the first
#: slot holds the audio on audio-visual data and the TEXT on image-text data (its image-text model returns the
#: text features first), and ``a_alpha * out_a + v_alpha * out_v + t_alpha * out_t`` (0.35 / 0.25 / 0.40) for
#: audio, visual and text. Its alternating steps run in the same slot order.
RELEASED_FIXED_WEIGHTS: dict[tuple[str, ...], tuple[float, ...]] = {
    ("audio", "visual"): (0.55, 0.45),
    ("text", "visual"): (0.55, 0.45),
    ("audio", "visual", "text"): (0.35, 0.25, 0.40),
}
PAPER_OWM_ALPHA = 0.1
#: a modality's role from its input kind, else from its name (feature datasets name them so)
_KIND_ROLES = {"spectrogram": "audio", "image": "visual", "frames": "visual", "tokens": "text"}
_NAME_ROLES = {"audio": "audio", "visual": "visual", "image": "visual", "video": "visual", "text": "text"}


def _released_layout(info: DatasetInfo, modalities: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(roles, modalities in the released code's slot order), or None when the roles cannot be told apart
    or the released code has no such combination."""
    roles = {}
    for m in modalities:
        spec = info.modalities.get(m)
        role = _KIND_ROLES.get(spec.kind) if spec is not None else None
        roles[m] = role or _NAME_ROLES.get(m.lower())
    if None in roles.values() or len(set(roles.values())) != len(modalities):
        return None
    by_role = {r: m for m, r in roles.items()}
    for slots in RELEASED_FIXED_WEIGHTS:
        if set(slots) == set(by_role):
            return slots, tuple(by_role[r] for r in slots)
    return None


def released_slots(info: DatasetInfo, modalities: tuple[str, ...]) -> tuple[str, ...] | None:
    """The modalities in the order of the released code's output slots (audio, visual; text, image;
    audio, visual, text), from their roles: the input kind (spectrogram: audio; image, frames: visual;
    tokens: text), else the modality's name. None when the roles cannot be told apart."""
    layout = _released_layout(info, modalities)
    return layout[1] if layout else None


def released_fixed_weights(info: DatasetInfo, modalities: tuple[str, ...]) -> dict[str, float] | None:
    """modality -> the released code's fixed fusion weight for its role (None: roles not recognised)."""
    layout = _released_layout(info, modalities)
    if layout is None:
        return None
    roles, slots = layout
    return dict(zip(slots, RELEASED_FIXED_WEIGHTS[roles]))


class MLAParams(MethodParams):
    variant: Literal["paper", "released"] = Field(
        "paper",
        description="paper: RLS projection with the previous step's mean feature, per-sample entropy fusion; "
        "released: the authors' code at its current head (no head-gradient projection, batch-dimension entropy "
        "softmax or fixed weights 0.55/0.45 by modality role, steps in its slot order, torch-1.8 zero_grad)",
    )
    alternate: bool = Field(True, description="one optimizer step per modality; false: one joint step on the sum of unimodal losses")
    gradient_modification: bool | None = Field(
        None,
        description="project the shared head's weight gradient with the OWM matrix P (default: on for paper; off "
        "for released, because at the released code's current head the projection's parameter-name check "
        "('module.weight') never matches the fusion layer's 'weight', so it never runs; true runs the released "
        "projection as written: element-wise division, Frobenius-normalised P, alpha 0.1^(1 + batch/len))",
    )
    dynamic_fusion: bool = Field(True, description="entropy-weighted test-time fusion; false: fixed weights")
    fixed_weights: list[float] | dict[str, float] | None = Field(
        None,
        description="fusion weights when dynamic_fusion is false: modality -> weight, or a list in dataset order "
        "(default: equal for paper; released: by modality role, 0.55 audio / 0.45 visual, 0.55 text / 0.45 image, "
        "0.35 / 0.25 / 0.40 audio / visual / text)",
    )
    owm_alpha: float | None = Field(
        None, gt=0, description="alpha of the OWM update (default: 0.1 for the paper variant, the released schedule for the released one)"
    )
    modality_order: list[str] | None = Field(
        None,
        description="order of the alternating unimodal steps (default: dataset order; released: its slot order, "
        "audio then visual, text then image, audio-visual-text)",
    )
    zero_grad: Literal["set_to_none", "zeros"] | None = Field(
        None,
        description="how gradients are cleared after each modality's step: set_to_none (PyTorch >= 2: an encoder "
        "without a gradient is skipped by the optimizer); zeros (PyTorch 1.8, the released environment: the "
        "encoders stepped earlier in the same batch keep zero gradients, so momentum and weight decay keep moving "
        "them during the later modalities' steps; the released code deletes every gradient after each batch). "
        "Default: set_to_none for paper, zeros for released",
    )

    tunable = {"owm_alpha": FloatRange(0.01, 1.0, log=True)}

    @field_validator("fixed_weights")
    @classmethod
    def _weights_positive(cls, value: list[float] | dict[str, float] | None) -> list[float] | dict[str, float] | None:
        values = list(value.values()) if isinstance(value, dict) else value
        if values is not None and (any(w < 0 for w in values) or sum(values) <= 0):
            raise ValueError("fixed_weights must be non-negative with a positive sum")
        return value

    def projects(self) -> bool:
        """Whether the head gradient is projected (the variant's default unless set)."""
        return self.gradient_modification if self.gradient_modification is not None else self.variant == "paper"

    def keeps_zero_grads(self) -> bool:
        return (self.zero_grad or ("zeros" if self.variant == "released" else "set_to_none")) == "zeros"


class MLA(Method):
    """Alternating unimodal steps through one shared head, OWM head-gradient projection and
    test-time uncertainty-weighted fusion. Handles missing modalities natively: each modality trains
    on the samples that have it and only present modalities are fused."""

    name = "mla"
    family = "gradients"
    min_modalities = 2
    Params: ClassVar[type[MethodParams]] = MLAParams
    default_fusion = "shared"
    fusions = ("shared",)
    owns_optimizer_step = True
    multiple_backward = True

    def __init__(self, params: MethodParams | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.params: MLAParams
        #: the OWM projection matrix (d, d), float64 so that thousands of rank-one updates stay accurate
        self.projection: Tensor | None = None
        #: head steps the projection has seen (the released code leaves the first one unprojected)
        self.owm_steps = 0
        self.batch_index = 0
        self.batches_per_epoch = 1
        self.model_modalities: tuple[str, ...] = ()
        #: the modalities in the released code's output slots (None: roles not recognised)
        self.slots: tuple[str, ...] | None = None
        self.released_weights: dict[str, float] | None = None
        self.order: tuple[str, ...] = ()
        self._counts: tuple[dict[str, int], dict[str, int]] = ({}, {})

    # ---- start-up --------------------------------------------------------------------------------
    def check(self, info: DatasetInfo, modalities: tuple[str, ...], fusion: str) -> None:
        super().check(info, modalities, fusion)
        p = self.params
        if isinstance(p.fixed_weights, dict):
            if sorted(p.fixed_weights) != sorted(modalities):
                raise IncompatibleError(
                    f"method 'mla' fixed_weights names {sorted(p.fixed_weights)}; it must give a weight to each of the "
                    f"modalities {list(modalities)}"
                )
        elif p.fixed_weights is not None and len(p.fixed_weights) != len(modalities):
            raise IncompatibleError(
                f"method 'mla' got {len(p.fixed_weights)} fixed_weights for {len(modalities)} modalities ({', '.join(modalities)})"
            )
        if (p.variant == "released" and not p.dynamic_fusion and p.fixed_weights is None
                and released_slots(info, modalities) is None):
            kinds = ", ".join(f"{m} ({info.modalities[m].kind})" for m in modalities)
            raise IncompatibleError(
                "method 'mla' variant=released fixes its fusion weights by modality role (audio and visual, text and "
                f"image, or audio, visual and text), and the modalities {kinds} do not match those roles; set "
                "method.mla.fixed_weights"
            )
        if p.modality_order is not None and sorted(p.modality_order) != sorted(modalities):
            raise IncompatibleError(
                f"method 'mla' modality_order {p.modality_order} must list each of the modalities {list(modalities)} once"
            )

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        head = self._head()
        self.projection = torch.eye(head.in_features, dtype=torch.float64, device=ctx.device)
        self.owm_steps = 0
        self.model_modalities = tuple(ctx.model.modalities)
        self.slots = released_slots(ctx.info, self.model_modalities) if ctx.info is not None else None
        self.released_weights = released_fixed_weights(ctx.info, self.model_modalities) if ctx.info is not None else None
        default_order = self.slots if self.params.variant == "released" and self.slots else self.model_modalities
        self.order = tuple(self.params.modality_order or default_order)

    def _head(self) -> torch.nn.Linear:
        fusion = self.ctx.model.fusion
        if not isinstance(fusion, SharedHeadFusion):
            raise IncompatibleError(f"method 'mla' needs the shared-head fusion, the model has {type(fusion).__name__}")
        return fusion.head

    # ---- training --------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, loader) -> None:
        self.batch_index = 0
        try:
            self.batches_per_epoch = max(len(loader), 1)
        except TypeError:  # an iterable loader without a length: the schedule stays at its start
            self.batches_per_epoch = 1
        return None

    @staticmethod
    def _unimodal_loss(logits: Tensor, labels: Tensor, rows: Tensor, count: int, batch_size: int) -> Tensor:
        if count == batch_size:
            return F.cross_entropy(logits, labels)
        if count == 0:  # keeps the graph so that every rank can call backward
            return logits.sum() * 0.0
        return F.cross_entropy(logits[rows], labels[rows])

    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        """Per-modality cross-entropy of the shared head, over the samples that have the modality. In
        alternating mode the terms of the second and later modalities are recomputed in ``backward``
        with the head as it is after the previous steps (and replaced in this dict, so the logged
        value is the one trained on)."""
        local = torch.stack([batch.present_of(m).sum() for m in self.order])
        both = torch.stack([local, all_reduce_sum(local)]).tolist()  # one host sync per batch
        self._counts = (dict(zip(self.order, both[0])), dict(zip(self.order, both[1])))
        return {
            f"ce_{m}": self._unimodal_loss(output.unimodal_logits[m], batch.labels, batch.present_of(m), self._counts[0][m], len(batch))
            for m in self.order
        }

    def backward(self, terms: dict[str, Tensor], output: ModelOutput, batch: MultimodalBatch) -> None:
        ctx = self.ctx
        local, total = self._counts
        ctx.optimizer.zero_grad(set_to_none=True)
        trained = [m for m in self.order if total[m] > 0]  # a modality absent on every rank is skipped
        if not self.params.alternate:
            if trained:
                ctx.backward(torch.stack([terms[f"ce_{m}"] for m in trained]).sum())
                self._head_step(trained, output, batch)
        else:
            head_moved = False
            stepped: dict[int, torch.nn.Parameter] = {}  # parameters with a gradient earlier in this batch
            for m in trained:
                key = f"ce_{m}"
                if head_moved:
                    with ctx.autocast():
                        logits = ctx.model.fusion.unimodal({m: output.features[m]})[m]
                        terms[key] = self._unimodal_loss(logits, batch.labels, batch.present_of(m), local[m], len(batch))
                # gradients averaged over processes and unscaled when this returns: the projection reads them
                ctx.backward(terms[key])
                if self.params.keeps_zero_grads():
                    self._keep_zero_grads(stepped)
                self._head_step([m], output, batch)
                head_moved = True
        if self.params.projects() and self.projection is not None:
            self.record("owm/trace", torch.trace(self.projection))
        self.batch_index += 1

    def _keep_zero_grads(self, stepped: dict[int, torch.nn.Parameter]) -> None:
        """PyTorch 1.8's ``zero_grad()`` zeroes gradients in place instead of dropping them: every parameter
        that had a gradient earlier in this batch takes part in this step with a zero one, so SGD's momentum
        and weight decay (and Adam's moments) still move it."""
        for group in self.ctx.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    stepped[id(p)] = p
        for p in stepped.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)

    def _head_step(self, modalities: list[str], output: ModelOutput, batch: MultimodalBatch) -> None:
        """Gradient modification for the modalities of this step, then the optimizer step."""
        p = self.params
        if not p.projects():
            self.ctx.optimizer_step()
            return
        means = [self._mean_feature(output.features[m], batch.present_of(m)) for m in modalities]
        if p.variant == "released":
            if self.owm_steps > 0:
                alpha = p.owm_alpha if p.owm_alpha is not None else released_owm_alpha(self.batch_index, self.batches_per_epoch)
                for h in means:
                    self.projection = owm_update_released(self.projection, h, alpha)
                self._project(modalities, self.projection.T)
            self.ctx.optimizer_step()
        else:
            self._project(modalities, self.projection)
            self.ctx.optimizer_step()
            alpha = p.owm_alpha if p.owm_alpha is not None else PAPER_OWM_ALPHA
            for h in means:  # absorbed now, used from the next step on
                self.projection = owm_update(self.projection, h, alpha)
        self.owm_steps += 1

    def _project(self, modalities: list[str], matrix: Tensor) -> None:
        weight = self._head().weight
        if weight.grad is None:
            return
        raw = weight.grad
        projected = owm_project(raw, matrix)
        ratio = torch.linalg.vector_norm(projected) / torch.linalg.vector_norm(raw).clamp_min(1e-12)
        self.record(f"owm/head_grad_ratio/{'+'.join(modalities)}", ratio)
        weight.grad = projected

    def _mean_feature(self, features: Tensor, rows: Tensor) -> Tensor:
        """Mean feature over the samples that have the modality, on every rank together."""
        h = features.detach()[rows].to(torch.float64)
        stats = torch.cat([h.sum(0), h.new_tensor([h.shape[0]])])
        stats = all_reduce_sum(stats)
        return stats[:-1] / stats[-1].clamp_min(1.0)

    # ---- evaluation ------------------------------------------------------------------------------
    def fusion_weights(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        names = self.model_modalities or tuple(output.unimodal_logits)
        logits = {m: output.unimodal_logits[m] for m in names}
        present = torch.stack([batch.present_of(m) for m in names], dim=1)
        p = self.params
        if p.dynamic_fusion:
            if p.variant == "released":
                per_batch = entropy_fusion_weights_released(logits, present)
                expanded = torch.stack([per_batch[m].expand(len(batch)) for m in names], dim=1)
                weights = expanded * present.to(expanded.dtype)
                weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-12)
                return {m: weights[:, j] for j, m in enumerate(names)}
            return entropy_fusion_weights(logits, present)
        fixed = p.fixed_weights
        if isinstance(fixed, dict):
            fixed = [fixed[m] for m in names]
        elif fixed is None and p.variant == "released" and self.released_weights:
            fixed = [self.released_weights[m] for m in names]
        return fixed_fusion_weights(fixed or [1.0] * len(names), names, present)

    def predict(self, output: ModelOutput, batch: MultimodalBatch) -> Tensor:
        weights = self.fusion_weights(output, batch)
        for m in weights:
            rows = batch.present_of(m)
            self.record(f"fusion_weight/{m}", (weights[m] * rows).sum() / rows.sum().clamp_min(1))
        return fuse_logits({m: output.unimodal_logits[m] for m in weights}, weights)

    # ---- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "projection": None if self.projection is None else self.projection.detach().clone(),
            "owm_steps": self.owm_steps,
            "batch_index": self.batch_index,
            "batches_per_epoch": self.batches_per_epoch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        projection = state.get("projection")
        if projection is not None:
            device = self.projection.device if self.projection is not None else projection.device
            self.projection = projection.detach().clone().to(device=device, dtype=torch.float64)
        self.owm_steps = int(state.get("owm_steps", 0))
        self.batch_index = int(state.get("batch_index", 0))
        self.batches_per_epoch = int(state.get("batches_per_epoch", 1))
