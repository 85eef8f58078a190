"""Data Remixing (Ma, Chen and Deng, ICML 2025; MatthewMaxy/Remix_ICML2025).

Warm-up epochs train jointly with unimodal losses: ``CE(f) + warmup_weight * sum_m CE(o_m)``. After them,
at the start of every epoch, each training sample is scored (eval mode, evaluation-time transforms) by
how far each modality's prediction is from uniform, and given to the modality closest to uniform
(decoupling: every modality trains on the samples it finds hard). The epoch then trains every sample once,
with only its assigned modality present (the others' features are zeroed, as for a missing modality),
the samples of one modality batched together (reassembling): ``CE(f) + weight * CE(o_m)``, m the sample's
modality. The mathematics is in :mod:`poise.functional.remix`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from poise.config import FloatRange, IntRange
from poise.data.base import evaluation_view
from poise.data.batch import collate
from poise.functional.remix import remix_assignment, remix_order
from poise.methods.base import Method, MethodParams
from poise.train.distributed import broadcast_buffers, rank, world_size
from poise.train.sampler import ShardedBatchSampler

if TYPE_CHECKING:
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput
    from poise.train.context import TrainContext

_ORDER_STREAM = 9_413


class RemixParams(MethodParams):
    warmup_epochs: int = Field(10, ge=0, description="epochs of joint training before the first remix (released 10 of 60)")
    warmup_weight: float = Field(0.5, ge=0, description="weight of each unimodal CE during warm-up (released alpha = beta = 0.5)")
    weight: float = Field(1.0, ge=0, description="weight of the assigned modality's unimodal CE after warm-up "
                          "(released gamma1 = gamma2 = 1)")
    batch_order: Literal["shuffled", "blocks"] = Field(
        "shuffled", description="shuffled: the one-modality batches in a random order; blocks: every batch of one "
        "modality, then the next modality's (released: the video subset, then the audio subset)")
    reassemble: bool = Field(True, description="batch the samples of each modality together (the paper's reassembling); "
                             "false: the split's own shuffled batches, each sample still with its one modality "
                             "(decoupling alone, the paper's ablation)")

    tunable = {"warmup_epochs": IntRange(1, 10), "weight": FloatRange(0.25, 4.0, log=True)}


class _Remixed(Dataset):
    """The training split in the epoch's order, each sample with only its assigned modality present."""

    def __init__(self, base: Dataset, order: Tensor, assignment: Tensor, columns: list[int]):
        self.base, self.order, self.assignment, self.columns = base, order.tolist(), assignment.cpu(), columns

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, i: int):
        row = self.order[i]
        inputs, label, present, index = self.base[row]
        keep = torch.zeros_like(present, dtype=torch.bool)
        column = self.columns[int(self.assignment[row])]
        keep[column] = bool(present[column])
        return inputs, label, keep, index


class Remix(Method):
    """Train each sample on the one modality least sure of it, one modality per batch (Data Remixing)."""

    name = "remix"
    family = "data"
    Params: ClassVar[type[MethodParams]] = RemixParams
    min_modalities = 2

    def __init__(self, params: MethodParams | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self._modalities: tuple[str, ...] = ()

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        self._modalities = tuple(ctx.model.modalities)
        # the assignment of the epoch in progress: a resumed run rebuilds that epoch's loader from it
        self.add_state("assignment", torch.zeros(0, dtype=torch.long))

    # ---- decoupling -------------------------------------------------------------------------------
    @torch.no_grad()
    def assign(self, dataset: Dataset) -> Tensor:
        """(N,) assigned modality of every sample of ``dataset``, in its order (eval mode)."""
        assert self.ctx is not None
        model = self.ctx.model
        was_training = model.training
        model.eval()
        parts = []
        try:
            for batch in self.ctx.make_loader(evaluation_view(dataset), False, sharded=False):
                batch = batch.to(self.ctx.device)
                with self.ctx.autocast():
                    output = model(batch)
                present = torch.stack([batch.present_of(m) for m in output.unimodal_logits], dim=1)
                parts.append(remix_assignment(output.unimodal_logits, present).cpu())
        finally:
            model.train(was_training)
        return torch.cat(parts)

    # ---- hooks ------------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, loader: DataLoader) -> DataLoader | None:
        assert self.ctx is not None
        if epoch < self.params.warmup_epochs:
            return None
        # rank 0's norm statistics everywhere: every process assigns the same way and builds the same order
        broadcast_buffers(self.ctx.model)
        self.assignment = self.assign(self.ctx.splits.train)
        for k, m in enumerate(self._modalities):
            self.record(f"assigned/{m}", (self.assignment == k).float().mean())
        return self._build_loader(epoch)

    def epoch_loader(self, epoch: int, loader: DataLoader) -> DataLoader | None:
        if epoch < self.params.warmup_epochs or len(self.assignment) == 0:
            return None
        return self._build_loader(epoch)

    def _build_loader(self, epoch: int) -> DataLoader:
        assert self.ctx is not None
        train = self.ctx.splits.train
        # the dataset's present columns follow the dataset's modalities
        columns = [list(self.ctx.info.modalities).index(m) for m in self._modalities]
        if not self.params.reassemble:
            identity = torch.arange(len(train))
            return self.ctx.make_loader(_Remixed(train, identity, self.assignment, columns), True)
        generator = torch.Generator().manual_seed(self.ctx.seed * 1_000_003 + _ORDER_STREAM + epoch)
        t = self.ctx.config.trainer
        order = remix_order(self.assignment, len(self._modalities), generator,
                            t.batch_size if self.params.batch_order == "shuffled" else None)
        dataset = _Remixed(train, order, self.assignment, columns)
        # the order is the method's: batches are cut from it in sequence, split over processes and
        # micro-batches exactly as the trainer's own loader splits its shuffled batches
        sampler = ShardedBatchSampler(len(dataset), t.batch_size, shuffle=False, seed=0, split=True,
                                      num_shards=world_size(), shard=rank(), micro_batches=t.accumulate)
        sampler.set_epoch(epoch)
        return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=t.num_workers,
                          pin_memory=self.ctx.device.type == "cuda")

    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        assert self.ctx is not None
        terms = {"ce": F.cross_entropy(output.logits, batch.labels)}
        weight = self.params.warmup_weight if self.ctx.epoch < self.params.warmup_epochs else self.params.weight
        for m, z in output.unimodal_logits.items():
            # after warm-up a sample has one modality present: each term sums its modality's samples,
            # divided by the whole batch, so that the terms add up to the batch mean of CE(o_m(i))
            rows = batch.present_of(m).to(z.dtype)
            terms[f"ce/{m}"] = weight * (F.cross_entropy(z.float(), batch.labels, reduction="none") * rows).sum() / len(batch)
        return terms


__all__ = ["Remix", "RemixParams"]
