"""Dataset containers shared by every dataset kind."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from poise.data.batch import MultimodalBatch
from poise.errors import DataError

ModalityKind = Literal["vector", "sequence", "image", "spectrogram", "tokens", "frames"]


@dataclass(frozen=True)
class ModalitySpec:
    """What one modality's input looks like, so that a default encoder can be chosen for it.

    kind:  vector (D,), sequence (T, D), image (C, H, W), spectrogram (1, F, T), tokens (T,) int,
           frames (T, C, H, W): several images of one clip.
    shape: the per-sample shape.
    vocab_size: for ``tokens`` only.
    """

    kind: ModalityKind
    shape: tuple[int, ...]
    vocab_size: int | None = None


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    modalities: dict[str, ModalitySpec]
    num_classes: int
    class_names: tuple[str, ...] = ()


class TensorMultimodalDataset(Dataset):
    """In-memory samples: one tensor per modality with the samples in dimension 0.

    ``present`` (N, M) marks missing modalities; missing inputs are zero-filled here, once, so that no
    encoder ever sees the original values of a modality declared missing.
    """

    def __init__(self, inputs: dict[str, Tensor], labels: Tensor, present: Tensor | None = None):
        if not inputs:
            raise DataError("a dataset needs at least one modality")
        n = int(labels.shape[0])
        for m, x in inputs.items():
            if int(x.shape[0]) != n:
                raise DataError(f"modality '{m}' has {x.shape[0]} samples but there are {n} labels")
        self.modalities = tuple(inputs)
        if present is None:
            present = torch.ones(n, len(inputs), dtype=torch.bool)
        present = present.bool()
        if tuple(present.shape) != (n, len(inputs)):
            raise DataError(f"present mask has shape {tuple(present.shape)}, expected {(n, len(inputs))}")
        self.inputs = {
            m: x * present[:, j].view(-1, *([1] * (x.dim() - 1))).to(x.dtype) if not bool(present[:, j].all()) else x
            for j, (m, x) in enumerate(inputs.items())
        }
        self.labels = labels.long()
        self.present = present

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int):
        return {m: x[i] for m, x in self.inputs.items()}, int(self.labels[i]), self.present[i], i

    def __getitems__(self, indices: list[int]) -> MultimodalBatch:
        """A whole batch with one indexing per tensor: the DataLoader calls this instead of ``__getitem__``
        per sample, and :func:`poise.data.batch.collate` passes the batch through."""
        rows = torch.as_tensor(indices, dtype=torch.long)
        return MultimodalBatch(
            inputs={m: x[rows] for m, x in self.inputs.items()}, labels=self.labels[rows], present=self.present[rows],
            index=rows,
        )

    def subset(self, rows: np.ndarray | Tensor) -> TensorMultimodalDataset:
        rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        return TensorMultimodalDataset(
            {m: x[rows] for m, x in self.inputs.items()}, self.labels[rows], self.present[rows]
        )

    def with_present(self, present: Tensor) -> TensorMultimodalDataset:
        return TensorMultimodalDataset(self.inputs, self.labels, self.present & present.bool())


@dataclass
class DataSplits:
    """The three splits of a dataset. ``val`` is always carved from the training data, never from test.

    Each split is a Dataset of ``(inputs, label, present, index)`` items (in memory:
    :class:`TensorMultimodalDataset`; read from files: ``poise.data.lazy.LazyMultimodalDataset``);
    missing-modality masks are applied through its ``with_present(present)``."""

    info: DatasetInfo
    train: Dataset
    val: Dataset
    test: Dataset
    notes: dict[str, object] = field(default_factory=dict)
    #: the ``--dataset`` text these splits were loaded from (``load_dataset``), for ``run.json``
    source: str | None = None
    #: the per-feature statistics applied by ``data.standardize`` (None: features as they come)
    standardization: dict[str, dict[str, list[float]]] | None = None

    def split(self, name: str) -> Dataset:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def evaluation_view(dataset: Dataset) -> Dataset:
    """The same samples read with the deterministic evaluation-time transforms (no random crop, flip or
    frame choice), for measurements taken on the training split: the linear probe's features, G-Blend's
    losses. A dataset that draws training augmentation offers ``evaluation_view()``; in-memory tensors
    have none and come back as they are. A ``Subset`` keeps its indices over the view of its dataset."""
    if isinstance(dataset, Subset):
        return Subset(evaluation_view(dataset.dataset), dataset.indices)
    view = getattr(dataset, "evaluation_view", None)
    return view() if callable(view) else dataset


def split_labels(dataset: Dataset) -> np.ndarray | None:
    """The labels of a split when it holds them in memory (None for a split that reads them lazily)."""
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, Tensor):
        return labels.numpy()
    if isinstance(labels, np.ndarray):
        return labels
    if isinstance(labels, (list, tuple)) and all(isinstance(v, (int, np.integer)) for v in labels):
        return np.asarray(labels, dtype=np.int64)
    return None


def check_splits(splits: DataSplits, where: str, empty_val: bool = False) -> None:
    """Refuse, before any training, a split that is empty or holds a single class: nothing can be
    trained, selected or probed on it. ``empty_val``: the released protocol, which has no validation split."""
    for name in ("train", "val", "test"):
        ds = splits.split(name)
        n = len(ds)
        if n == 0 and name == "val" and empty_val:
            continue
        if n == 0:
            raise DataError(f"{where}: the {name} split is empty; the data is too small for a train / val / test "
                            "split (add samples, or lower data.val_fraction / dataset.test_fraction)")
        labels = split_labels(ds)
        if labels is None:
            continue
        classes = np.unique(labels)
        if len(classes) < 2:
            raise DataError(f"{where}: the {name} split holds only class {int(classes[0])} ({n} samples); every split "
                            "needs at least two classes to train, select an epoch and fit the probe")


def stratified_split(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Split sample indices into len(fractions) disjoint parts, class by class, deterministically."""
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    total = float(sum(fractions))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        bounds = np.round(np.cumsum(fractions) / total * len(idx)).astype(int)
        start = 0
        for k, end in enumerate(bounds):
            parts[k].extend(idx[start:end].tolist())
            start = end
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def grouped_split(groups: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held) sample indices with whole groups held out (UCF-101's ``gXX`` actor-and-scene
    groups, IEMOCAP's sessions), so that no group is on both sides. Groups are taken in an order
    fixed by ``seed`` while each brings the held-out count closer to ``fraction`` of the samples
    (at least one group; never all of them)."""
    groups = np.asarray(groups)
    if fraction <= 0:
        return np.arange(len(groups)), np.zeros(0, dtype=np.int64)
    names, sizes = np.unique(groups, return_counts=True)
    if len(names) < 2:
        raise DataError(f"a grouped validation split needs at least two groups; the training data has {len(names)}")
    order = np.random.default_rng(seed).permutation(len(names))
    target = fraction * len(groups)
    held, count = [], 0
    for k in order[:-1]:  # the last group always stays in training
        if held and abs(count + sizes[k] - target) >= abs(count - target):
            continue
        held.append(names[k])
        count += int(sizes[k])
    mask = np.isin(groups, held)
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def missing_mask(n: int, num_modalities: int, rate: float, seed: int) -> Tensor:
    """(n, M) presence mask: each modality of each sample missing with probability ``rate``,
    never all modalities of a sample at once (one of the dropped ones is restored at random)."""
    if not 0.0 <= rate < 1.0:
        raise DataError(f"missing_rate must be in [0, 1), got {rate}")
    g = torch.Generator().manual_seed(seed)
    present = torch.rand(n, num_modalities, generator=g) >= rate
    empty = ~present.any(dim=1)
    if empty.any():
        restore = torch.randint(num_modalities, (int(empty.sum()),), generator=g)
        present[empty.nonzero().squeeze(1), restore] = True
    return present
