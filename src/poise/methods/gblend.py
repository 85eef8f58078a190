"""Gradient-Blending (Wang, Tran and Feiszli, CVPR 2020).

The loss is ``L = sum_i w_i CE_i`` over one linear head per modality on its feature ``h_m`` and the fused
head. The unimodal logits of a concat model are slices of the fused head, not independent heads, so the
method owns one ``Linear(d_m, C)`` per modality, created in ``setup`` and trained by the run's optimizer
(an added parameter group). Predictions use the fused head only.

The weights come from GB-Estimate: from the current state (checkpoint N), a copy of each unimodal
network (encoder + its head) and of the naive fused network (the whole model trained on the fused
cross-entropy) is trained for n epochs on a subset T' of the training data; the mean losses of every
copy on T' and on a held-out split V at N and N + n give the weights
(:func:`poise.functional.gblend.gblend_weights`). V is carved from the training split once per run and
never trained on; the model-selection validation split and the test split are never touched. The copies
have their own optimizers; the real model, its heads and its optimizer are left as they were. The copies
train with the training augmentation, but the four losses are measured on the evaluation-time views of
the samples (no random crop, flip or frame choice), so that they change only because the copies learned.

The copies start at the run's current learning rate with fresh optimizer state. The estimated weights
can be mixed with uniform (``min_weight``) so that no head, the fused one above all, stops training.

The schedule and the window n follow the paper's two algorithms. Offline (Algorithm 1): one estimate
from the initial model, GB-Estimate(phi_0, N), whose copies train for the whole run (n = N =
``trainer.epochs``), then training with those fixed weights. Online (Algorithm 2): training is cut into
super-epochs of ``super_epoch`` epochs; at the start of each (epochs 0, s, 2s, ...) the weights are
re-estimated from the current model over the super-epoch's window, GB-Estimate(phi_{i s}, s).
``estimate_epochs`` fixes n instead (poise's earlier default was 2); ``warmup_epochs`` moves the first
re-estimate (estimates at 0, w, w + s, w + 2s, ...). An estimate runs inside ``on_epoch_start``, so its
time counts in the epoch's time.

Samples without a modality count in neither that modality's loss term nor its estimation losses. Mean
losses are reduced over ranks as (sum of losses, count); the copies themselves are not synchronised.
"""

from __future__ import annotations

import copy
import math
import time
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset

from poise.config import Choice, IntRange
from poise.data.base import evaluation_view, stratified_split
from poise.errors import IncompatibleError
from poise.functional.gblend import (
    DEFAULT_OVERFITTING_FLOOR,
    gblend_raw_weights,
    mix_with_uniform,
    normalise_blend_weights,
)
from poise.methods.base import Method, MethodParams
from poise.models.encoders import init_weights
from poise.train.distributed import all_reduce_sum, average_gradients, is_distributed

if TYPE_CHECKING:
    from poise.data.base import DatasetInfo
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput
    from poise.train.context import TrainContext

FUSED = "fused"


class GBlendParams(MethodParams):
    mode: Literal["offline", "online"] = Field(
        "offline",
        description="offline: estimate the weights once, from the initial model, then train with them; "
                    "online: re-estimate at the start of every super-epoch",
    )
    super_epoch: int = Field(5, ge=1, description="online: super-epoch length s, estimates at epochs 0, s, 2s, ...")
    warmup_epochs: int | None = Field(
        None, ge=1,
        description="online: epoch of the first re-estimate (None: one super-epoch, as in the paper's algorithm)",
    )
    holdout_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of the training split held out as V (not trained on); the paper uses 8-13%"
    )
    estimate_epochs: int | None = Field(
        None, ge=1,
        description="n: epochs each estimation copy trains for (None: the paper's window, the whole run offline "
                    "and the epochs to the next estimate online)",
    )
    estimate_subset: float = Field(
        1.0, gt=0, description="training data T' used for estimation: a fraction if <= 1, else a sample count"
    )
    weight_form: Literal["paper", "multibench"] = Field(
        "paper", description="paper: w ~ dG / dO^2; multibench: w ~ L^V_{N+n} / O_{N+n}^2 with O floored"
    )
    overfitting_floor: float = Field(
        DEFAULT_OVERFITTING_FLOOR, gt=0,
        description="paper: guard on |dO| (only |dO| below it is raised to it); multibench: floor of O",
    )
    min_weight: float = Field(
        0.0, ge=0, lt=0.5,
        description="mix the estimate with uniform so every head keeps at least this weight (0: the paper's weights)",
    )

    tunable = {"mode": Choice(("offline", "online")), "super_epoch": IntRange(2, 10)}

    @field_validator("estimate_subset")
    @classmethod
    def _fraction_or_count(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError("a value above 1 is a sample count and must be a whole number")
        return value


class _UnimodalNetwork(nn.Module):
    """One modality's encoder and head, fed only the samples that have the modality."""

    def __init__(self, modality: str, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.modality = modality
        self.encoder = encoder
        self.head = head

    def forward(self, batch: MultimodalBatch) -> tuple[Tensor, Tensor]:
        rows = batch.present_of(self.modality)
        return self.head(self.encoder(batch.inputs[self.modality][rows])), batch.labels[rows]


class _FusedNetwork(nn.Module):
    """The whole multimodal model, read through its fused logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: MultimodalBatch) -> tuple[Tensor, Tensor]:
        return self.model(batch).logits, batch.labels


@torch.no_grad()
def mean_losses(networks: dict[str, nn.Module], loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Mean cross-entropy of each network over a loader, summed over ranks as (loss * count, count)."""
    sums = torch.zeros(len(networks), device=device, dtype=torch.float64)
    counts = torch.zeros(len(networks), device=device, dtype=torch.float64)
    modes = {name: net.training for name, net in networks.items()}
    for net in networks.values():
        net.eval()
    for batch in loader:
        batch = batch.to(device)
        for i, net in enumerate(networks.values()):
            logits, labels = net(batch)
            sums[i] += F.cross_entropy(logits.float(), labels, reduction="sum").double()
            counts[i] += labels.numel()
    for name, net in networks.items():
        net.train(modes[name])
    totals = all_reduce_sum(torch.cat([sums, counts])).cpu()
    k = len(networks)
    return {name: float(totals[i] / totals[k + i]) if totals[k + i] > 0 else float("nan") for i, name in enumerate(networks)}


def train_networks(
    networks: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer], loader: DataLoader,
    device: torch.device, grad_clip: float | None,
) -> None:
    """One epoch of every network on its own cross-entropy, one pass over the data. The networks share
    no parameter, so one backward of the summed losses gives each exactly its own gradient.

    In a multi-process run every rank holds the same copies and trains them on its share of each batch;
    the gradients are averaged over ranks before each step, so the copies stay identical and train as
    one process would on whole batches. Estimation runs in full precision (no autocast)."""
    for net in networks.values():
        net.train()
    params = [p for net in networks.values() for p in net.parameters() if p.requires_grad]
    distributed = is_distributed()
    for batch in loader:
        batch = batch.to(device)
        losses = []
        for net in networks.values():
            logits, labels = net(batch)
            if labels.numel():
                losses.append(F.cross_entropy(logits, labels))
        if losses:
            torch.stack(losses).sum().backward()
        elif not distributed:
            continue
        average_gradients(params)  # every rank, even one without samples: the reduction is collective
        for name, net in networks.items():
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)


class GradientBlending(Method):
    """Gradient-Blending: ``L = sum_i w_i CE_i`` over per-modality heads and the fused head, with
    weights estimated from each head's generalisation and overfitting on held-out training data."""

    name = "gblend"
    family = "losses"
    Params: ClassVar[type[MethodParams]] = GBlendParams
    min_modalities = 2

    def __init__(self, params: MethodParams | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self.heads: nn.ModuleDict | None = None
        self.weights: dict[str, float] = {}
        #: whether the weights in force came from the uniform fallback (no head's held-out loss fell)
        self.fallback_uniform = False
        #: one entry per estimate: epoch, window, weights, fallback, the four loss tables, seconds
        self.history: list[dict[str, Any]] = []
        self.train_rows = np.zeros(0, dtype=np.int64)
        self.holdout_rows = np.zeros(0, dtype=np.int64)
        self.estimate_rows = np.zeros(0, dtype=np.int64)
        self._weight_tensor: Tensor | None = None
        self._fallback_tensor: Tensor | None = None

    # ---- start-up --------------------------------------------------------------------------------
    def check(self, info: DatasetInfo, modalities: tuple[str, ...], fusion: str) -> None:
        if len(modalities) < 2:
            raise IncompatibleError(
                f"method 'gblend' blends unimodal heads with the fused head and needs at least 2 modalities, "
                f"the data has {len(modalities)} ({', '.join(modalities)})"
            )
        super().check(info, modalities, fusion)
        heads = len(modalities) + 1
        if self.params.min_weight * heads > 1:
            raise IncompatibleError(
                f"gblend min_weight {self.params.min_weight} is more than 1/{heads}, the uniform weight of {heads} heads"
            )

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        model = ctx.model
        self.trained_modalities = tuple(model.modalities)
        self.head_names = (*self.trained_modalities, FUSED)
        feature_dims = model.fusion.feature_dims
        self.heads = nn.ModuleDict({m: nn.Linear(feature_dims[m], ctx.info.num_classes) for m in self.trained_modalities})
        init_weights(self.heads)
        self.heads.to(ctx.device)
        ctx.optimizer.add_param_group({"params": list(self.heads.parameters())})

        self.train_rows, self.holdout_rows = self._split_holdout(ctx)
        self._check_coverage(ctx, self.holdout_rows, "the held-out split V")
        self._check_coverage(ctx, self.train_rows, "the training part")
        self._train_loader = ctx.make_loader(Subset(ctx.splits.train, self.train_rows.tolist()), True)
        # L^V and L^T are measurements: read without the training augmentation
        self._measured = evaluation_view(ctx.splits.train)
        self._holdout_loader = ctx.make_loader(Subset(self._measured, self.holdout_rows.tolist()), False)
        self._set_weights({h: 1.0 / len(self.head_names) for h in self.head_names})

    def _split_holdout(self, ctx: TrainContext) -> tuple[np.ndarray, np.ndarray]:
        """Stratified by class when the dataset exposes its labels; fixed by ``data.split_seed``."""
        dataset = ctx.splits.train
        n = len(dataset)
        seed = ctx.config.data.split_seed * 7919 + 104729
        labels = getattr(dataset, "labels", None)
        if labels is not None:
            train_rows, holdout_rows = stratified_split(
                np.asarray(labels), (1.0 - self.params.holdout_fraction, self.params.holdout_fraction), seed
            )
        else:
            order = np.random.default_rng(seed).permutation(n)
            cut = int(round(n * self.params.holdout_fraction))
            holdout_rows, train_rows = np.sort(order[:cut]), np.sort(order[cut:])
        if len(holdout_rows) == 0 or len(train_rows) == 0:
            raise IncompatibleError(
                f"gblend holdout_fraction {self.params.holdout_fraction} splits the {n} training samples into "
                f"{len(train_rows)} for training and {len(holdout_rows)} held out; both need at least one"
            )
        return train_rows, holdout_rows

    def _check_coverage(self, ctx: TrainContext, rows: np.ndarray, what: str) -> None:
        dataset = ctx.splits.train
        present = getattr(dataset, "present", None)
        if present is None:
            return
        counts = present[torch.as_tensor(rows, dtype=torch.long)].sum(0)
        for j, m in enumerate(getattr(dataset, "modalities", tuple(ctx.info.modalities))):
            if m in self.trained_modalities and int(counts[j]) == 0:
                raise IncompatibleError(f"gblend cannot estimate weights: no sample of {what} has modality '{m}'")

    # ---- schedule and estimation -----------------------------------------------------------------
    def _first_reestimate(self) -> int:
        p = self.params
        return p.super_epoch if p.warmup_epochs is None else p.warmup_epochs

    def is_estimation_epoch(self, epoch: int) -> bool:
        """Offline: epoch 0 only. Online: 0, then the first re-estimate w (one super-epoch unless
        ``warmup_epochs``) and every ``super_epoch`` after it."""
        if epoch == 0:
            return True
        p = self.params
        first = self._first_reestimate()
        return p.mode == "online" and epoch >= first and (epoch - first) % p.super_epoch == 0

    def estimation_window(self, epoch: int, total_epochs: int) -> int:
        """n for an estimate at ``epoch`` of a ``total_epochs`` run: ``estimate_epochs`` when set; else
        offline the whole run (Algorithm 1: GB-Estimate(phi_0, N)) and online the epochs until the next
        estimate (Algorithm 2: GB-Estimate(phi_{N_i}, n), n the super-epoch)."""
        p = self.params
        if p.estimate_epochs is not None:
            return p.estimate_epochs
        if p.mode == "offline":
            return total_epochs
        return self._first_reestimate() if epoch == 0 else p.super_epoch

    def on_epoch_start(self, epoch: int, loader: DataLoader) -> DataLoader | None:
        if self.is_estimation_epoch(epoch):
            self.estimate(epoch)
        return self._train_loader

    def epoch_loader(self, epoch: int, loader: DataLoader) -> DataLoader | None:
        return self._train_loader

    def _estimation_rows(self, round_index: int) -> np.ndarray:
        """T': all of the training part, or a random subset drawn anew (and reproducibly) each estimate."""
        size = self.params.estimate_subset
        n = len(self.train_rows)
        k = max(1, int(round(size * n))) if size <= 1 else min(int(size), n)
        if k >= n:
            return self.train_rows
        g = torch.Generator().manual_seed(self.ctx.seed * 1_000_003 + 7919 * round_index + 1)
        pick = torch.randperm(n, generator=g)[:k].numpy()
        return np.sort(self.train_rows[pick])

    def estimation_copies(self) -> dict[str, nn.Module]:
        """Deep copies of each unimodal network (encoder + own head) and of the whole model."""
        model = self.ctx.model
        copies: dict[str, nn.Module] = {
            m: _UnimodalNetwork(m, copy.deepcopy(model.encoders[m]), copy.deepcopy(self.heads[m]))
            for m in self.trained_modalities
        }
        copies[FUSED] = _FusedNetwork(copy.deepcopy(model))
        for net in copies.values():
            for param in net.parameters():
                param.grad = None
        return copies

    def estimate(self, epoch: int | None = None) -> dict[str, float]:
        """GB-Estimate from the current state; sets and returns the new weights."""
        ctx = self.ctx
        start = time.perf_counter()
        epoch = ctx.epoch if epoch is None else epoch
        window = self.estimation_window(epoch, ctx.config.trainer.epochs)
        self.estimate_rows = self._estimation_rows(len(self.history))
        rows = self.estimate_rows.tolist()
        # the copies' own loop, whole batches, with the training augmentation
        fit_loader = ctx.make_loader(Subset(ctx.splits.train, rows), True, micro_batches=1)
        measure_loader = ctx.make_loader(Subset(self._measured, rows), False)
        networks = self.estimation_copies()
        lr = ctx.optimizer.param_groups[0]["lr"]
        optimizers = {}
        for name, net in networks.items():
            optimizers[name] = ctx.build_optimizer(list(net.parameters()))
            for group in optimizers[name].param_groups:
                group["lr"] = lr  # continue at the run's current learning rate
        train_start = mean_losses(networks, measure_loader, ctx.device)
        val_start = mean_losses(networks, self._holdout_loader, ctx.device)
        for _ in range(window):
            train_networks(networks, optimizers, fit_loader, ctx.device, ctx.config.trainer.grad_clip)
        train_end = mean_losses(networks, measure_loader, ctx.device)
        val_end = mean_losses(networks, self._holdout_loader, ctx.device)
        tables = (train_start, val_start, train_end, val_end)
        usable = all(math.isfinite(v) for table in tables for v in table.values())
        fallback = self.fallback_uniform
        if usable:
            raw = gblend_raw_weights(*tables, form=self.params.weight_form, floor=self.params.overfitting_floor)
            estimated, fallback = normalise_blend_weights(raw)
            weights = mix_with_uniform(estimated, self.params.min_weight)
        else:
            # a head had no sample in T' (a small subset with missing modalities) or a copy diverged:
            # no estimate, the weights in force stay
            estimated, weights = {}, dict(self.weights)
        self._set_weights(weights, fallback)
        self.history.append({
            "epoch": epoch,
            "window": window,
            "weights": dict(weights),
            "estimated": dict(estimated),
            "fallback_uniform": fallback,
            "train_start": train_start, "val_start": val_start, "train_end": train_end, "val_end": val_end,
            "seconds": time.perf_counter() - start,
        })
        return weights

    def _set_weights(self, weights: dict[str, float], fallback: bool = False) -> None:
        self.weights = {h: float(weights[h]) for h in self.head_names}
        self.fallback_uniform = bool(fallback)
        device = self.ctx.device if self.ctx is not None else None
        self._weight_tensor = torch.tensor([self.weights[h] for h in self.head_names], device=device)
        self._fallback_tensor = torch.tensor(float(fallback), device=device)

    # ---- training --------------------------------------------------------------------------------
    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        """``w_fused * CE(fused) + sum_m w_m * CE(head_m(h_m))``; a modality's term averages over the
        samples that have it (masked, so no host sync)."""
        w = self._weight_tensor
        labels = batch.labels
        terms = {f"ce_{FUSED}": w[-1] * F.cross_entropy(output.logits, labels)}
        for i, m in enumerate(self.trained_modalities):
            mask = batch.present_of(m).to(output.features[m].dtype)
            per_sample = F.cross_entropy(self.heads[m](output.features[m]), labels, reduction="none")
            terms[f"ce_{m}"] = w[i] * (per_sample * mask).sum() / mask.sum().clamp_min(1.0)
        for i, h in enumerate(self.head_names):
            self.record(f"weight/{h}", w[i])
        self.record("fallback_uniform", self._fallback_tensor)
        return terms

    def after_backward(self, output: ModelOutput, batch: MultimodalBatch) -> None:
        # the run's clipping covers the model's parameters only; the method's heads get the same limit
        clip = self.ctx.config.trainer.grad_clip
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(self.heads.parameters(), clip)

    # ---- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"weights": dict(self.weights), "fallback_uniform": self.fallback_uniform,
                                 "history": copy.deepcopy(self.history)}
        if self.heads is not None:
            state["heads"] = {k: v.detach().clone() for k, v in self.heads.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "heads" in state:
            self.heads.load_state_dict(state["heads"])
        if state.get("weights"):
            self._set_weights(state["weights"], state.get("fallback_uniform", False))
        self.history = copy.deepcopy(state.get("history", []))


__all__ = ["GBlendParams", "GradientBlending", "mean_losses", "train_networks"]
