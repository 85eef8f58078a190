"""Diagnosing & Re-learning (Wei et al., ECCV 2024): joint training; every ``interval`` epochs (at most
``max_times`` times) each encoder's features on the training split and on the validation split are
clustered, and the encoder is pulled back towards its initial weights by ``alpha_m = tanh(lambda gap_m)``,
``gap_m`` the difference of the two clustering purities. The mathematics is in
:mod:`poise.functional.relearning`."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
from pydantic import Field

from poise.config import FloatRange
from poise.functional.relearning import kmeans_purity, reinitialise, relearning_strength
from poise.methods.base import Method, MethodParams
from poise.train.distributed import broadcast_buffers

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from poise.train.context import TrainContext

_SNAPSHOT = "relearning/initial/{}"


class RelearningParams(MethodParams):
    lam: float = Field(3.0, ge=0, description="lambda of alpha = tanh(lambda |P_train - P_val|) (released 3)")
    interval: int = Field(20, ge=1, description="K: epochs between diagnoses (released 20; BalanceBenchmark 15)")
    max_times: int = Field(3, ge=0, description="N: most re-initialisations (released 3; BalanceBenchmark 2)")
    kmeans_seed: int = Field(0, description="random_state of KMeans (released 0)")

    tunable = {"lam": FloatRange(0.5, 5.0, log=True)}


class Relearning(Method):
    """Diagnose each modality by its train/validation clustering-purity gap and re-initialise its encoder."""

    name = "relearning"
    family = "gradients"  # re-initialisation edits the encoders' weights, as an update does
    Params: ClassVar[type[MethodParams]] = RelearningParams
    min_modalities = 2

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        model = ctx.model
        self._modalities = tuple(model.modalities)
        for m in self._modalities:
            ctx.snapshot(_SNAPSHOT.format(m), model.modality_parameters(m))
        self.add_state("times", 0)

    def due(self, epoch: int) -> bool:
        assert self.ctx is not None
        done = epoch + 1
        return (done % self.params.interval == 0 and self.times < self.params.max_times
                and done < self.ctx.config.trainer.epochs)

    @torch.no_grad()
    def _features(self, dataset: Dataset) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Encoder features and labels of the samples that have each modality, in eval mode, the whole
        split in every process (so that every process decides the same)."""
        assert self.ctx is not None
        model = getattr(self.ctx.model, "module", self.ctx.model)
        was_training = model.training
        model.eval()
        feats: dict[str, list] = {m: [] for m in self._modalities}
        labels: dict[str, list] = {m: [] for m in self._modalities}
        try:
            for batch in self.ctx.make_loader(dataset, False, sharded=False):
                batch = batch.to(self.ctx.device)
                with self.ctx.autocast():
                    h = model.encode(batch)
                for m in self._modalities:
                    rows = batch.present_of(m)
                    feats[m].append(h[m][rows].float().cpu())
                    labels[m].append(batch.labels[rows].cpu())
        finally:
            model.train(was_training)
        return ({m: torch.cat(v).numpy() for m, v in feats.items()}, {m: torch.cat(v).numpy() for m, v in labels.items()})

    def on_epoch_end(self, epoch: int) -> None:
        assert self.ctx is not None
        if not self.due(epoch):
            return
        model = getattr(self.ctx.model, "module", self.ctx.model)
        k = self.ctx.info.num_classes
        # rank 0's norm statistics everywhere (the trainer does it next anyway): every process then
        # extracts the same features and takes the same decision
        broadcast_buffers(model)
        train_x, train_y = self._features(self.ctx.splits.train)
        val_x, val_y = self._features(self.ctx.splits.val)
        for m in self._modalities:
            if len(train_y[m]) < k or len(val_y[m]) < k:
                continue  # too few samples with the modality to form the clusters
            p_train = kmeans_purity(train_x[m], train_y[m], k, self.params.kmeans_seed)
            p_val = kmeans_purity(val_x[m], val_y[m], k, self.params.kmeans_seed)
            alpha = relearning_strength(p_train, p_val, self.params.lam)
            reinitialise(model.modality_parameters(m), self.ctx.snapshots[_SNAPSHOT.format(m)], alpha)
            self.record(f"purity_train/{m}", p_train)
            self.record(f"purity_val/{m}", p_val)
            self.record(f"purity_gap/{m}", p_train - p_val)
            self.record(f"alpha/{m}", alpha)
        self.times += 1
