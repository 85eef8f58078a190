"""PMR (Fan et al., CVPR 2023): class prototypes per modality; the prototypical cross-entropy of the
slow-learning modality is added to the loss to speed it up, and (paper) a prototypical entropy
regularisation on the dominant modality keeps it from converging too early."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from poise.config import FloatRange
from poise.functional.ogm import stack_ratios
from poise.functional.prototypes import class_feature_sums, prototype_entropy, prototype_logits, update_prototypes
from poise.methods.base import Method, MethodParams
from poise.train.distributed import all_reduce_sum

if TYPE_CHECKING:
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput
    from poise.train.context import TrainContext

_SUBSET_STREAM = 7_211


class PMRParams(MethodParams):
    alpha: float = Field(1.0, ge=0, description="weight of the weak modality's prototypical CE (released 1.0; BalanceBenchmark 0.6)")
    momentum: float = Field(0.2, ge=0, le=1, description="mu: c <- (1 - mu) c_new + mu c_old (released 0.2; BalanceBenchmark 0.5)")
    prototype_fraction: float = Field(0.1, gt=0, le=1, description="share of the training split the prototypes are computed from each epoch")
    modulation_starts: int = Field(0, ge=0, description="first epoch with the prototypical terms (inclusive)")
    modulation_ends: int = Field(100, ge=0, description="last epoch with the prototypical terms (inclusive; released 100)")
    entropy_weight: float = Field(
        0.1, ge=0,
        description="weight of the paper's prototypical entropy regularisation on the dominant modality (its "
        "prototype-softmax entropy is maximised); 0 is the released code, which lacks the term",
    )
    entropy_epochs: int = Field(10, ge=0, description="the regularisation acts in epochs 0 .. entropy_epochs - 1 (the early stage)")

    tunable = {"alpha": FloatRange(0.1, 2.0, log=True), "momentum": FloatRange(0.0, 0.9)}

    @model_validator(mode="after")
    def _window(self) -> PMRParams:
        if self.modulation_ends < self.modulation_starts:
            raise ValueError(f"modulation_ends ({self.modulation_ends}) is before modulation_starts ({self.modulation_starts})")
        return self


class PMR(Method):
    """Loss ``CE(fused) + sum_m beta_m PCE_m - mu_e sum_dominant H_m``: ``PCE_m = CE(-||z_m - c_m||, y)``,
    ``beta_m = alpha`` for a modality whose prototype ratio ``rho_m`` is below 1 (slow), else 0."""

    name = "pmr"
    family = "losses"
    Params: ClassVar[type[MethodParams]] = PMRParams
    min_modalities = 2

    def __init__(self, params: MethodParams | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self._modalities: tuple[str, ...] = ()

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        model = ctx.model
        self._modalities = tuple(model.modalities)
        C = ctx.info.num_classes
        for m in self._modalities:
            self.add_state(f"prototypes_{m}", torch.zeros(C, model.fusion.feature_dims[m], device=ctx.device))
        # whether any prototype exists yet (the first epoch's are taken without smoothing)
        self.add_state("have_prototypes", False)
        self.add_state("subset_generator", torch.Generator().manual_seed(ctx.seed * 1_000_003 + _SUBSET_STREAM))

    def prototypes(self, m: str) -> Tensor:
        return getattr(self, f"prototypes_{m}")

    def active(self, epoch: int) -> bool:
        return self.params.modulation_starts <= epoch <= self.params.modulation_ends

    # ---- prototypes -------------------------------------------------------------------------------
    @torch.no_grad()
    def compute_prototypes(self) -> None:
        """Class means of each modality's features over a random ``prototype_fraction`` of the training
        split (present samples only), in eval mode and without gradient, smoothed with the previous ones."""
        ctx = self.ctx
        assert ctx is not None
        train = ctx.splits.train
        n = max(1, math.ceil(self.params.prototype_fraction * len(train)))
        rows = torch.randperm(len(train), generator=self.subset_generator)[:n].sort().values.tolist()
        loader: DataLoader = ctx.make_loader(Subset(train, rows), False)
        C = ctx.info.num_classes
        sums = {m: torch.zeros(C, ctx.model.fusion.feature_dims[m], device=ctx.device) for m in self._modalities}
        counts = {m: torch.zeros(C, device=ctx.device) for m in self._modalities}
        model = ctx.model
        was_training = model.training
        model.eval()
        try:
            for batch in loader:
                batch = batch.to(ctx.device)
                with ctx.autocast():
                    features = model.encode(batch, self._modalities)
                for m in self._modalities:
                    s, c = class_feature_sums(features[m], batch.labels, C, batch.present_of(m))
                    sums[m] += s
                    counts[m] += c
        finally:
            model.train(was_training)
        for m in self._modalities:
            s, c = all_reduce_sum(sums[m]), all_reduce_sum(counts[m])
            previous = self.prototypes(m) if self.have_prototypes else None
            self.prototypes(m).copy_(update_prototypes(previous, s, c, self.params.momentum))
        self.have_prototypes = True

    def on_epoch_start(self, epoch: int, loader: DataLoader) -> DataLoader | None:
        if self.active(epoch) or epoch < self.params.entropy_epochs:
            self.compute_prototypes()
        return None

    def per_batch_decision(self) -> str | None:
        return "computes its prototype ratios and loss coefficients"

    # ---- the loss ---------------------------------------------------------------------------------
    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        assert self.ctx is not None, "setup() must run before training"
        terms = {"ce": F.cross_entropy(output.logits, batch.labels)}
        epoch = self.ctx.epoch
        modulate = self.active(epoch) and self.have_prototypes
        regularise = epoch < self.params.entropy_epochs and self.params.entropy_weight > 0 and self.have_prototypes
        if not (modulate or regularise):
            return terms
        logits, rows, scores = {}, {}, {}
        for m in self._modalities:
            logits[m] = prototype_logits(output.features[m], self.prototypes(m))
            rows[m] = batch.present_of(m)
            p_true = torch.softmax(logits[m].detach(), 1).gather(1, batch.labels.view(-1, 1)).squeeze(1)
            # sums over every process's present samples: one ratio for the whole (global) batch
            scores[m] = all_reduce_sum((p_true * rows[m]).sum()) / all_reduce_sum(rows[m].sum().float()).clamp_min(1)
        ratios = stack_ratios(scores)
        for i, m in enumerate(self._modalities):
            self.record(f"ratio/{m}", ratios[i])
            r = rows[m]
            n = r.sum().clamp_min(1)
            # what the ratio is made of: the present samples' distance to their class's prototype and
            # the mean distance to the other classes' prototypes
            distances = -logits[m].detach().float()
            own = distances.gather(1, batch.labels.view(-1, 1)).squeeze(1)
            other = (distances.sum(1) - own) / max(distances.shape[1] - 1, 1)
            self.record(f"distance_own/{m}", (own * r).sum() / n)
            self.record(f"distance_other/{m}", (other * r).sum() / n)
            if modulate:
                beta = self.params.alpha * (ratios[i] < 1).float()
                # over the present rows only: a missing sample's zero features say nothing about m
                pce = F.cross_entropy(logits[m][r], batch.labels[r], reduction="sum") / n
                terms[f"pce_{m}"] = beta * pce
                self.record(f"beta/{m}", beta)
            if regularise:
                dominant = (ratios[i] > 1).float()
                entropy = prototype_entropy(output.features[m][r], self.prototypes(m)) if bool(r.any()) else output.logits.new_zeros(())
                terms[f"entropy_{m}"] = -self.params.entropy_weight * dominant * entropy
        return terms
