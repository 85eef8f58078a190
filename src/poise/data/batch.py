"""The one batch type that flows from a dataset through the model, the method and the trainer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor


@dataclass
class MultimodalBatch:
    """A batch of B samples over M modalities.

    inputs:  modality name -> tensor with the batch in dimension 0.
    labels:  (B,) int64 class indices.
    present: (B, M) bool, column j for ``modalities[j]``; False where a sample lacks that modality
             (its input is zero-filled and must not be used).
    index:   (B,) int64 sample indices into the dataset the batch came from.
    """

    inputs: dict[str, Tensor]
    labels: Tensor
    present: Tensor
    index: Tensor

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.inputs)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def present_of(self, modality: str) -> Tensor:
        """(B,) bool mask of the samples that have ``modality``."""
        return self.present[:, self.modalities.index(modality)]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MultimodalBatch:
        return MultimodalBatch(
            inputs={m: x.to(device, non_blocking=non_blocking) for m, x in self.inputs.items()},
            labels=self.labels.to(device, non_blocking=non_blocking),
            present=self.present.to(device, non_blocking=non_blocking),
            index=self.index.to(device, non_blocking=non_blocking),
        )

    def select(self, rows: Tensor) -> MultimodalBatch:
        """The sub-batch of the given rows (bool mask or indices)."""
        return MultimodalBatch(
            inputs={m: x[rows] for m, x in self.inputs.items()},
            labels=self.labels[rows],
            present=self.present[rows],
            index=self.index[rows],
        )

    def with_inputs(self, inputs: dict[str, Tensor]) -> MultimodalBatch:
        return replace(self, inputs=inputs)


def collate(items: Sequence[tuple[dict[str, Tensor], int, Tensor, int]] | MultimodalBatch) -> MultimodalBatch:
    """Stack dataset items ``(inputs, label, present, index)`` into a :class:`MultimodalBatch`; a batch that
    a dataset indexed as a whole (``__getitems__``) passes through."""
    if isinstance(items, MultimodalBatch):
        return items
    modalities = list(items[0][0])
    return MultimodalBatch(
        inputs={m: torch.stack([it[0][m] for it in items]) for m in modalities},
        labels=torch.as_tensor([it[1] for it in items], dtype=torch.long),
        present=torch.stack([it[2] for it in items]).bool(),
        index=torch.as_tensor([it[3] for it in items], dtype=torch.long),
    )
