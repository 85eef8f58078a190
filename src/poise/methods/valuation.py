"""Sample- and modality-level valuation (Wei et al., CVPR 2024, "Enhancing multimodal cooperation via
sample-level modality valuation").

After ``warmup_epochs``, at the start of every epoch each training sample is evaluated (eval mode) with
every subset of its modalities (the others' features zeroed before the head) and each modality gets its
per-sample Shapley value for ``v(S) = |S| * 1[prediction from S correct]``. ``level=sample``: a sample
whose modality ``m`` contributes little gets copies that train ``m`` alone (the others' features zeroed);
``level=modality``: the mean values on a random share of the samples set how many random samples get a
copy with the strongest modality zeroed. The epoch trains on the split plus its copies.
The mathematics is in :mod:`poise.functional.valuation`."""

from __future__ import annotations

from itertools import combinations
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from pydantic import Field
from torch.utils.data import Dataset, Subset

from poise.config import IntRange
from poise.functional.valuation import modality_copies, sample_copies, sample_shapley_values
from poise.methods.base import Method, MethodParams
from poise.train.distributed import broadcast_buffers

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from poise.train.context import TrainContext

_SUBSET_STREAM = 7_211


class ValuationParams(MethodParams):
    level: Literal["sample", "modality"] = Field("sample", description="sample: per-sample copies (sample_level.py); "
                                                 "modality: copies with the strongest modality zeroed (modality_level.py)")
    warmup_epochs: int = Field(5, ge=0, description="epochs of plain joint training before the first valuation")
    alpha: float = Field(1.0, ge=0, description="modality level: share of copies (released 1, BalanceBenchmark 0.5)")
    estimate_fraction: float = Field(0.2, gt=0, le=1, description="modality level: share of the samples valued")
    max_copies: int = Field(3, ge=0, description="sample level: most copies per sample and modality")

    tunable = {"warmup_epochs": IntRange(1, 10), "max_copies": IntRange(1, 5)}


class _Resampled(Dataset):
    """The training split followed by copies of some of its samples with some modalities marked absent
    (their features are then zeroed by the model, and every statistic skips them)."""

    def __init__(self, base: Dataset, rows: torch.Tensor, drop: torch.Tensor, modalities: tuple[str, ...]):
        self.base, self.rows, self.drop, self.modalities = base, rows.tolist(), drop.cpu(), modalities

    def __len__(self) -> int:
        return len(self.base) + len(self.rows)

    def __getitem__(self, i: int):
        if i < len(self.base):
            return self.base[i]
        j = i - len(self.base)
        inputs, label, present, index = self.base[self.rows[j]]
        present = present.clone().bool()
        columns = list(inputs)
        for k, m in enumerate(self.modalities):
            if self.drop[j, k]:
                present[columns.index(m)] = False
        return inputs, label, present, index


class Valuation(Method):
    """Resample the training split by each modality's Shapley contribution (sample or modality level)."""

    name = "valuation"
    family = "data"
    Params: ClassVar[type[MethodParams]] = ValuationParams
    min_modalities = 2

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        model = ctx.model
        self._modalities = tuple(model.modalities)
        self.add_state("copy_rows", torch.zeros(0, dtype=torch.long))
        self.add_state("copy_drop", torch.zeros(0, len(self._modalities), dtype=torch.bool))

    # ---- valuation --------------------------------------------------------------------------------
    @torch.no_grad()
    def values(self, dataset: Dataset) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(N,) Shapley values and presence of each modality over ``dataset``, in its order, eval mode."""
        assert self.ctx is not None
        model = getattr(self.ctx.model, "module", self.ctx.model)
        subsets = [frozenset(s) for k in range(1, len(self._modalities) + 1) for s in combinations(self._modalities, k)]
        was_training = model.training
        model.eval()
        phis: dict[str, list] = {m: [] for m in self._modalities}
        present: dict[str, list] = {m: [] for m in self._modalities}
        try:
            for batch in self.ctx.make_loader(dataset, False, sharded=False):
                batch = batch.to(self.ctx.device)
                with self.ctx.autocast():
                    h = model.encode(batch)
                    correct = {}
                    for s in subsets:
                        logits, _ = model.fusion({m: h[m] if m in s else torch.zeros_like(h[m]) for m in self._modalities})
                        correct[s] = logits.argmax(1) == batch.labels
                mask = {m: batch.present_of(m) for m in self._modalities}
                phi = sample_shapley_values(correct, mask)
                for m in self._modalities:
                    phis[m].append(phi[m].cpu())
                    present[m].append(mask[m].cpu())
        finally:
            model.train(was_training)
        return {m: torch.cat(v) for m, v in phis.items()}, {m: torch.cat(v) for m, v in present.items()}

    def _sample_level(self) -> None:
        assert self.ctx is not None
        phi, present = self.values(self.ctx.splits.train)
        rows, drops = [], []
        for k, m in enumerate(self._modalities):
            copies = sample_copies(phi[m], self.params.max_copies) * present[m].long()
            r = torch.repeat_interleave(torch.arange(len(copies)), copies)
            d = torch.ones(len(r), len(self._modalities), dtype=torch.bool)
            d[:, k] = False  # only m is kept in its copies
            rows.append(r)
            drops.append(d)
            self.record(f"phi/{m}", (phi[m][present[m]]).mean() if present[m].any() else 0.0)
            self.record(f"copies/{m}", int(copies.sum()))
        self.copy_rows, self.copy_drop = torch.cat(rows), torch.cat(drops)

    def _modality_level(self, epoch: int) -> None:
        assert self.ctx is not None
        n = len(self.ctx.splits.train)
        generator = torch.Generator().manual_seed(self.ctx.seed * 1_000_003 + _SUBSET_STREAM + epoch)
        k = max(1, round(self.params.estimate_fraction * n))
        chosen = torch.randperm(n, generator=generator)[:k].sort().values
        phi, present = self.values(Subset(self.ctx.splits.train, chosen.tolist()))
        mean = {m: float(phi[m][present[m]].mean()) if present[m].any() else 0.0 for m in self._modalities}
        strong, count = modality_copies(mean, self.params.alpha, n)
        self.copy_rows = torch.randint(n, (count,), generator=generator)
        drop = torch.zeros(count, len(self._modalities), dtype=torch.bool)
        drop[:, self._modalities.index(strong)] = True
        self.copy_drop = drop
        for m in self._modalities:
            self.record(f"phi/{m}", mean[m])
        self.record("copies", count)

    # ---- hooks ------------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, loader: DataLoader) -> DataLoader | None:
        assert self.ctx is not None
        if epoch < self.params.warmup_epochs:
            return None
        # rank 0's norm statistics everywhere: every process values the same way and builds the same split
        broadcast_buffers(getattr(self.ctx.model, "module", self.ctx.model))
        if self.params.level == "sample":
            self._sample_level()
        else:
            self._modality_level(epoch)
        return self._build_loader()

    def epoch_loader(self, epoch: int, loader: DataLoader) -> DataLoader | None:
        if epoch < self.params.warmup_epochs:
            return None
        return self._build_loader()

    def _build_loader(self) -> DataLoader | None:
        assert self.ctx is not None
        if len(self.copy_rows) == 0:
            return None
        dataset = _Resampled(self.ctx.splits.train, self.copy_rows, self.copy_drop, self._modalities)
        return self.ctx.make_loader(dataset, True)
