"""LFM (Yang et al., NeurIPS 2024): separate unimodal heads whose averaged logits are trained with the
cross-entropy, plus a Jensen-Shannon alignment of the modalities' predictions; the two are mixed by weights
that start mostly on alignment and move towards classification, either on a fitted polynomial of the
epoch or learned once per epoch from a Hessian-vector product on a few held-out training samples."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor
from torch.utils.data import DataLoader, Subset

from poise.config import FloatRange
from poise.data.base import evaluation_view
from poise.errors import IncompatibleError
from poise.functional.lfm import (
    hessian_vector_product,
    lfm_alpha_lr,
    lfm_alpha_update,
    lfm_loss,
    lfm_schedule,
    pairwise_alignment,
)
from poise.methods.base import Method, MethodParams
from poise.train.distributed import all_reduce_sum

if TYPE_CHECKING:
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput
    from poise.train.context import TrainContext


class LFMParams(MethodParams):
    schedule: Literal["fitted", "learnable"] = Field(
        "fitted",
        description="fitted: alpha_cls(e) = the released degree-5 polynomial of the epoch (Crema_epoch.py); "
        "learnable: alpha_align updated once per epoch from a Hessian-vector product on held-out training samples "
        "(Crema_epoch_learnable.py)",
    )
    alignment: Literal["js", "released"] = Field(
        "js",
        description="js: the Jensen-Shannon divergence (KL(p||m) + KL(q||m)) / 2 (paper); released: (KL(m||p) + "
        "KL(m||q)) / 2, what the released Alignment computes with F.kl_div",
    )
    epoch_scale: float = Field(
        1.0, gt=0, description="the fitted polynomial is read at epoch * epoch_scale (200 / epochs maps a shorter run "
                               "onto the released 200-epoch curve)")
    clip_fitted: bool = Field(
        True, description="clip the fitted alpha_cls to [0.05, 0.95], the learnable schedule's range (the released "
                          "polynomial exceeds 1 near epoch 180, making alpha_align negative)")
    initial_alpha_align: float = Field(
        0.95, ge=0.05, le=0.95,
        description="learnable: alpha_align at the start (released 0.95; BalanceBenchmark starts at 0.05, reversed)")
    alpha_lr: float = Field(1e-4, ge=0, description="learnable: step size of alpha_align, halved every halve_every epochs")
    halve_every: int = Field(20, gt=0, description="learnable: epochs between halvings of alpha_lr (released 20)")
    holdout_samples: int = Field(
        16, gt=0, description="learnable: training samples held out of training for the update (released 16)")
    hvp_samples: int = Field(8, gt=0, description="learnable: how many of them the update reads (released: half, 8)")
    hvp_parameters: Literal["all", "first"] = Field(
        "all",
        description="learnable: the hypergradient is the mean of the Hessian-vector product over every parameter "
        "(all) or over the model's first parameter tensor only (first: the released code)",
    )

    @model_validator(mode="after")
    def _samples(self) -> LFMParams:
        if self.hvp_samples > self.holdout_samples:
            raise ValueError(f"hvp_samples ({self.hvp_samples}) exceeds holdout_samples ({self.holdout_samples})")
        return self

    tunable = {"epoch_scale": FloatRange(1.0, 20.0, log=True)}


class LFM(Method):
    """Loss ``2 (alpha_cls CE(mean_m o_m) + alpha_align JS)``, JS averaged over pairs of modalities and over
    the samples that have both; prediction: the fused logits ``sum_m o_m``."""

    name = "lfm"
    family = "losses"
    Params: ClassVar[type[MethodParams]] = LFMParams
    min_modalities = 2
    default_fusion = "sum"
    # the loss needs fused logits that are the sum of the unimodal ones
    fusions = ("sum", "concat")
    params: LFMParams

    def __init__(self, params: MethodParams | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self._modalities: tuple[str, ...] = ()
        self._train_loader: DataLoader | None = None
        self.holdout_rows = np.zeros(0, dtype=np.int64)

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        self._modalities = tuple(ctx.model.modalities)
        self.add_state("alpha_align", float(self.params.initial_alpha_align))
        if self.params.schedule != "learnable":
            return
        n = len(ctx.splits.train)
        if self.params.holdout_samples >= n:
            raise IncompatibleError(f"lfm holdout_samples ({self.params.holdout_samples}) must be fewer than the "
                                    f"{n} training samples")
        order = np.random.default_rng(ctx.config.data.split_seed * 7919 + 48611).permutation(n)
        self.holdout_rows = order[: self.params.holdout_samples]
        train_rows = np.sort(order[self.params.holdout_samples:])
        self._train_loader = ctx.make_loader(Subset(ctx.splits.train, train_rows.tolist()), True)

    # ---- the schedule -----------------------------------------------------------------------------
    def weights(self, epoch: int) -> tuple[float, float]:
        """``(alpha_cls, alpha_align)`` for ``epoch``."""
        if self.params.schedule == "learnable":
            return 1.0 - self.alpha_align, self.alpha_align
        alpha_cls, _ = lfm_schedule(epoch * self.params.epoch_scale)
        if self.params.clip_fitted:
            alpha_cls = min(0.95, max(0.05, alpha_cls))
        return alpha_cls, 1.0 - alpha_cls

    def hypergradient(self) -> float:
        """The mean of ``H_total v`` (``v`` the classification gradient) over the held-out samples the update
        reads, in eval mode (the norm statistics stay untouched) and in full precision."""
        ctx = self.ctx
        assert ctx is not None
        model = ctx.model
        alpha_cls, alpha_align = 1.0 - self.alpha_align, self.alpha_align
        rows = self.holdout_rows[: self.params.hvp_samples].tolist()
        loader = ctx.make_loader(Subset(evaluation_view(ctx.splits.train), rows), False)
        params = [p for p in model.parameters() if p.requires_grad]
        if self.params.hvp_parameters == "first":
            params = params[:1]
        total_sum = torch.zeros((), device=ctx.device, dtype=torch.float64)
        count = torch.zeros((), device=ctx.device, dtype=torch.float64)
        was_training = model.training
        model.eval()
        try:
            for batch in loader:
                batch = batch.to(ctx.device)
                with torch.enable_grad():
                    output = model(batch)
                    cls = F.cross_entropy(self.mean_logits(output).float(), batch.labels)
                    align = pairwise_alignment(output.unimodal_logits, self._rows(batch), self.params.alignment)
                    hv = hessian_vector_product(alpha_cls * cls + alpha_align * align, cls, params)
                flat = torch.cat([h.reshape(-1) for h in hv]).double()
                total_sum += flat.mean() * len(batch)
                count += len(batch)
        finally:
            model.train(was_training)
        return float(all_reduce_sum(total_sum) / all_reduce_sum(count).clamp_min(1))

    def on_epoch_start(self, epoch: int, loader: DataLoader) -> DataLoader | None:
        if self.params.schedule != "learnable":
            return None
        h = self.hypergradient()
        self.record("hypergradient", h)
        lr = lfm_alpha_lr(epoch, self.params.alpha_lr, self.params.halve_every)
        _, self.alpha_align = lfm_alpha_update(self.alpha_align, h, lr)
        return self._train_loader

    def epoch_loader(self, epoch: int, loader: DataLoader) -> DataLoader | None:
        return self._train_loader

    # ---- the loss ---------------------------------------------------------------------------------
    def _rows(self, batch: MultimodalBatch) -> dict[str, Tensor]:
        return {m: batch.present_of(m) for m in self._modalities}

    def mean_logits(self, output: ModelOutput) -> Tensor:
        return torch.stack([output.unimodal_logits[m] for m in self._modalities]).mean(0)

    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        assert self.ctx is not None, "setup() must run before training"
        alpha_cls, alpha_align = self.weights(self.ctx.epoch)
        cls = F.cross_entropy(self.mean_logits(output).float(), batch.labels)
        align = pairwise_alignment(output.unimodal_logits, self._rows(batch), self.params.alignment)
        self.record("weight/cls", alpha_cls)
        self.record("weight/align", alpha_align)
        # the two halves of lfm_loss, named apart so that the run logs each
        return {"ce": lfm_loss(cls, align, alpha_cls, 0.0), "align": lfm_loss(cls, align, 0.0, alpha_align)}
