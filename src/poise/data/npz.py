"""``npz:PATH``: a feature file with one array per modality, ``labels`` and an optional ``split``.

Arrays: ``labels`` (N,) integer classes; ``split`` (N,) strings in {train, val, test} (optional;
without it a stratified split by ``data.split_seed``); every other array is a modality, ``N x D``
vectors or ``N x T x D`` sequences, named by its array name.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from poise.data.base import DatasetInfo, DataSplits, ModalitySpec, TensorMultimodalDataset, stratified_split
from poise.errors import DataError

RESERVED = ("labels", "split")
SPLIT_NAMES = ("train", "val", "test")


class NpzOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    test_fraction: float = Field(0.2, gt=0, lt=1, description="used only when the file has no split array")


def build_npz(arg: str | None, options: NpzOptions, val_fraction: float, split_seed: int) -> DataSplits:
    if not arg:
        raise DataError("the npz dataset needs a path: --dataset npz:PATH")
    path = Path(arg)
    if not path.is_file():
        raise DataError(f"npz file '{path}' does not exist")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise DataError(f"'{path}' is not a readable .npz file: {e}") from None
    if "labels" not in arrays:
        raise DataError(f"'{path}' has no 'labels' array (arrays found: {', '.join(sorted(arrays)) or 'none'})")
    labels = arrays["labels"]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"'{path}': 'labels' must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    if labels.min() < 0:
        raise DataError(f"'{path}': 'labels' must be non-negative class indices, found {labels.min()}")
    n = len(labels)
    modalities = {k: v for k, v in arrays.items() if k not in RESERVED}
    if not modalities:
        raise DataError(f"'{path}' has no modality arrays besides {', '.join(RESERVED)}")
    specs = {}
    for name, x in modalities.items():
        if x.shape[0] != n:
            raise DataError(f"'{path}': array '{name}' has {x.shape[0]} rows but 'labels' has {n}")
        if x.ndim not in (2, 3) or not np.issubdtype(x.dtype, np.number):
            raise DataError(f"'{path}': array '{name}' must be numeric N x D or N x T x D, got shape {x.shape} dtype {x.dtype}")
        if not np.isfinite(x).all():
            raise DataError(f"'{path}': array '{name}' contains NaN or infinite values")
        specs[name] = ModalitySpec("vector" if x.ndim == 2 else "sequence", tuple(x.shape[1:]))
    num_classes = int(labels.max()) + 1
    full = TensorMultimodalDataset(
        {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in modalities.items()},
        torch.from_numpy(labels.astype(np.int64)),
    )
    if "split" in arrays:
        split = arrays["split"]
        if split.shape != (n,):
            raise DataError(f"'{path}': 'split' must have shape ({n},), got {split.shape}")
        split = split.astype(str)
        bad = sorted(set(split.tolist()) - set(SPLIT_NAMES))
        if bad:
            raise DataError(f"'{path}': 'split' holds {bad!r}; expected only train, val, test")
        parts = [np.flatnonzero(split == s) for s in SPLIT_NAMES]
        for s, rows in zip(SPLIT_NAMES, parts):
            if len(rows) == 0:
                raise DataError(f"'{path}': the split array has no '{s}' rows")
    else:
        t = options.test_fraction
        parts = stratified_split(labels, ((1 - t) * (1 - val_fraction), (1 - t) * val_fraction, t), split_seed)
    info = DatasetInfo(name=path.stem, modalities=specs, num_classes=num_classes)
    return DataSplits(info, *(full.subset(p) for p in parts))
