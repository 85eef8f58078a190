"""Datasets read from files sample by sample, for the sets too large to hold in memory.

A :class:`LazyMultimodalDataset` returns the same items as ``TensorMultimodalDataset``:
``(inputs, label, present, index)``. Each modality has a :class:`SampleReader` that turns a record
(one clip, one image-text pair) into a tensor. Training splits draw their augmentation (random
crops, flips, frame choice) from a NumPy generator seeded per item by torch's random stream, so a
run is reproducible from its seed: the trainer seeds torch, and each DataLoader worker's torch
stream is seeded from the loader's generator. A modality that a sample lacks is never read; its
input is zeros.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from poise.data.base import ModalitySpec
from poise.data.frames import frame_indices
from poise.data.media import AudioFeatures, ImageTransform, list_images, read_image
from poise.errors import DataError


class SampleReader(ABC):
    """Reads one modality of a record. ``origins[record]`` says where the record came from (file
    and line) for error messages."""

    spec: ModalitySpec

    @abstractmethod
    def read(self, record: int, rng: np.random.Generator | None) -> np.ndarray: ...


class LazyMultimodalDataset(Dataset):
    """Records ``rows`` of a listing, read through one reader per modality.

    labels: (N,) class of every record of the listing; rows: the records of this split;
    train: draw augmentation at random (else the deterministic evaluation transforms);
    present: (len(rows), M) bool, False where a modality is missing (zero input, never read).
    """

    def __init__(self, readers: dict[str, SampleReader], labels: Tensor, origins: Sequence[str],
                 rows: np.ndarray | None = None, train: bool = False, present: Tensor | None = None):
        if not readers:
            raise DataError("a dataset needs at least one modality")
        self.readers = readers
        self.modalities = tuple(readers)
        self.all_labels = labels.long()
        self.origins = origins
        self.rows = np.arange(len(labels)) if rows is None else np.asarray(rows, dtype=np.int64)
        self.train = train
        n = len(self.rows)
        self.present = torch.ones(n, len(readers), dtype=torch.bool) if present is None else present.bool()
        if tuple(self.present.shape) != (n, len(readers)):
            raise DataError(f"present mask has shape {tuple(self.present.shape)}, expected {(n, len(readers))}")

    @property
    def labels(self) -> Tensor:
        return self.all_labels[torch.from_numpy(self.rows)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        record = int(self.rows[i])
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)))) if self.train else None
        inputs = {}
        for j, (m, reader) in enumerate(self.readers.items()):
            if bool(self.present[i, j]):
                try:
                    x = reader.read(record, rng)
                except DataError as e:
                    raise DataError(f"{self.origins[record]}: {e}") from None
                inputs[m] = torch.from_numpy(np.ascontiguousarray(x))
            else:
                inputs[m] = torch.zeros(reader.spec.shape, dtype=torch.long if reader.spec.kind == "tokens" else torch.float32)
        return inputs, int(self.all_labels[record]), self.present[i], i

    def subset(self, rows: np.ndarray, train: bool | None = None) -> LazyMultimodalDataset:
        """The items ``rows`` of this dataset (indices into it, not into the listing)."""
        rows = np.asarray(rows, dtype=np.int64)
        return LazyMultimodalDataset(self.readers, self.all_labels, self.origins, self.rows[rows],
                                     self.train if train is None else train, self.present[torch.from_numpy(rows)])

    def evaluation_view(self) -> LazyMultimodalDataset:
        """The same records read with the deterministic evaluation transforms."""
        if not self.train:
            return self
        return LazyMultimodalDataset(self.readers, self.all_labels, self.origins, self.rows, False, self.present)

    def with_present(self, present: Tensor) -> LazyMultimodalDataset:
        return LazyMultimodalDataset(self.readers, self.all_labels, self.origins, self.rows, self.train,
                                     self.present & present.bool())


def _check_shape(x: np.ndarray, expected: tuple[int, ...] | None, path: Path) -> np.ndarray:
    if expected is not None and tuple(x.shape) != tuple(expected):
        raise DataError(f"'{path}' holds an array of shape {tuple(x.shape)}, expected {tuple(expected)}")
    return x


class AudioReader(SampleReader):
    """Per record either a prepared cache file (.npy, ``features.cache_array`` of the clip) or a raw
    audio file decoded and preprocessed on the fly."""

    def __init__(self, paths: Sequence[Path], features: AudioFeatures):
        self.paths = list(paths)
        self.features = features
        self.spec = ModalitySpec("spectrogram", features.shape)

    def read(self, record, rng):
        path = self.paths[record]
        if path.suffix == ".npy":
            try:
                stored = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise DataError(f"cached audio '{path}' cannot be read: {e}") from None
            x = self.features.from_cache(_check_shape(stored, self.features.cache_shape(), path), rng)
        else:
            x = self.features(self.features.read(path), rng)
        return x.astype(np.float32, copy=False)[None]


class FrameReader(SampleReader):
    """``count`` frames of a clip's frame folder (sorted), chosen by ``sampling`` (a
    :mod:`poise.data.frames` choice) among the first ``window`` files (None: all), each
    transformed: (count, C, S, S)."""

    def __init__(self, folders: Sequence[Path], count: int, sampling: str, transform: ImageTransform,
                 mode: str = "RGB", window: int | None = None):
        self.folders = list(folders)
        self.count, self.sampling, self.transform, self.mode, self.window = count, sampling, transform, mode, window
        channels = 3 if mode == "RGB" else 1
        self.spec = ModalitySpec("frames", (count, channels, transform.size, transform.size))

    def frame_paths(self, record: int, rng: np.random.Generator | None) -> list[Path]:
        folder = self.folders[record]
        names = list_images(folder)
        if len(names) < self.count:
            raise DataError(f"frame folder '{folder}' has {len(names)} frames, {self.count} needed")
        return [folder / names[k] for k in frame_indices(len(names), self.count, self.sampling, rng, self.window)]

    def read(self, record, rng):
        return np.stack([self.transform(read_image(p, self.mode), rng) for p in self.frame_paths(record, rng)])


class FlowReader(SampleReader):
    """Optical flow as two greyscale frame folders (u, v) of the same names: (count, 2, S, S).

    ``flip="joint"`` (poise): one flip decision per sample for every frame and both components;
    flipping mirrors the image and negates the horizontal component u (stored around mid-grey, so
    u -> 1 - u): the flow of the mirrored video. ``flip="independent"`` (BalanceBenchmark's
    released loader): every u and v image draws its own flip and u keeps its sign."""

    def __init__(self, u: FrameReader, v_folders: Sequence[Path], flip: str = "joint"):
        if flip not in ("joint", "independent"):
            raise DataError(f"flow flip '{flip}' is not one of joint, independent")
        self.u, self.v_folders, self.flip = u, list(v_folders), flip
        self.spec = ModalitySpec("frames", (u.count, 2, u.transform.size, u.transform.size))

    def read(self, record, rng):
        augment = rng is not None and self.u.transform.augment != "none"
        joint = self.flip == "joint"
        flip = bool(rng.random() < 0.5) if augment and joint else False
        out = []
        for path in self.u.frame_paths(record, rng):
            u = self.u.transform(read_image(path, "L"), rng, flip=flip if joint else None)
            v = self.u.transform(read_image(self.v_folders[record] / path.name, "L"), rng, flip=flip if joint else None)
            out.append(np.concatenate([1.0 - u if flip else u, v]))
        return np.stack(out)


class ArrayFileReader(SampleReader):
    """One saved array per record (``.npy``, e.g. a filter-bank computed by a paper's own scripts),
    all of ``shape``; ``kind`` is the modality's kind (spectrogram: a channel axis is added)."""

    def __init__(self, paths: Sequence[Path], shape: tuple[int, ...], kind: str = "spectrogram"):
        self.paths, self.shape, self.kind = list(paths), tuple(shape), kind
        self.spec = ModalitySpec(kind, (1, *self.shape) if kind == "spectrogram" else self.shape)

    def read(self, record, rng):
        path = self.paths[record]
        try:
            x = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise DataError(f"array file '{path}' cannot be read: {e}") from None
        x = _check_shape(x, self.shape, path).astype(np.float32, copy=False)
        return x[None] if self.kind == "spectrogram" else x


class ImageReader(SampleReader):
    """One image file per record: (C, S, S)."""

    def __init__(self, paths: Sequence[Path], transform: ImageTransform):
        self.paths, self.transform = list(paths), transform
        self.spec = ModalitySpec("image", (3, transform.size, transform.size))

    def read(self, record, rng):
        return self.transform(read_image(self.paths[record]), rng)


class ArrayReader(SampleReader):
    """Rows of an in-memory array (token ids of texts): cheap enough to keep."""

    def __init__(self, array: np.ndarray, spec: ModalitySpec):
        self.array, self.spec = array, spec

    def read(self, record, rng):
        return self.array[record]


def resolve_problems(dataset: str, problems: list[str], on_missing: str) -> list[str]:
    """Stop on unreadable entries (``on_missing: error``), or return them to be listed in the
    splits' notes under ``skipped`` (``on_missing: skip``)."""
    if problems and on_missing == "error":
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise DataError(f"{dataset}: {len(problems)} entr{'y' if len(problems) == 1 else 'ies'} cannot be used: {shown} "
                        "(dataset.on_missing: skip leaves them out and lists them)")
    return problems


def assemble_splits(name: str, readers: dict[str, SampleReader], labels: np.ndarray, origins: Sequence[str],
                    parts: dict[str, np.ndarray], classes: Sequence[str], val_fraction: float, split_seed: int,
                    skipped: Sequence[str] = (), groups: Sequence[str] | None = None):
    """DataSplits over one listing: ``parts`` gives the listing rows of train and test (and of val
    when the dataset has an official one; otherwise val is carved from train by ``split_seed``:
    stratified, or with ``groups`` (one name per listing row) whole groups at a time)."""
    from poise.data.base import DatasetInfo, DataSplits, grouped_split, stratified_split

    labels = np.asarray(labels, dtype=np.int64)
    for split in ("train", "test"):
        if len(parts.get(split, ())) == 0:
            raise DataError(f"{name}: the {split} split is empty")
    full = LazyMultimodalDataset(readers, torch.from_numpy(labels), origins)
    train_rows = np.asarray(parts["train"], dtype=np.int64)
    if "val" in parts and len(parts["val"]):
        val_rows = np.asarray(parts["val"], dtype=np.int64)
    elif groups is not None:
        keep, held = grouped_split(np.asarray(groups)[train_rows], val_fraction, split_seed)
        train_rows, val_rows = train_rows[keep], train_rows[held]
    else:
        keep, held = stratified_split(labels[train_rows], (1 - val_fraction, val_fraction), split_seed)
        train_rows, val_rows = train_rows[keep], train_rows[held]
    info = DatasetInfo(name=name, modalities={m: r.spec for m, r in readers.items()}, num_classes=len(classes),
                       class_names=tuple(classes))
    notes: dict[str, object] = {"skipped": list(skipped)} if skipped else {}
    if groups is not None and len(val_rows) and not ("val" in parts and len(parts["val"])):
        notes["validation_groups"] = sorted({str(groups[i]) for i in val_rows})
    return DataSplits(info, full.subset(train_rows, train=True), full.subset(val_rows, train=False),
                      full.subset(np.asarray(parts["test"], dtype=np.int64), train=False), notes)
