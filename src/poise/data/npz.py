"""``npz:PATH``: a feature file with one array per modality, ``labels`` and an optional ``split``.

Arrays: ``labels`` (N,) integer classes; ``split`` (N,) strings in {train, val, test} (optional;
without it a stratified split by ``data.split_seed``); every other array is a modality, ``N x D``
vectors or ``N x T x D`` sequences, named by its array name. The classes are ``0..C-1``: either every
one of them occurs in ``labels`` (C = the largest label + 1), or an optional ``classes`` array (C,) names
them and every label indexes it. Anything else (a gap, a stray large label) is refused, never a model
with empty classes.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from poise.data.base import DatasetInfo, DataSplits, ModalitySpec, TensorMultimodalDataset, stratified_split
from poise.errors import DataError

RESERVED = ("labels", "split", "classes")
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
    arrays = read_npz(path)
    if "labels" not in arrays:
        raise DataError(f"'{path}' has no 'labels' array (arrays found: {', '.join(sorted(arrays)) or 'none'})")
    labels = arrays["labels"]
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"'{path}': 'labels' must be a 1-D integer array, got shape {labels.shape} dtype {labels.dtype}")
    n = len(labels)
    if n == 0:
        raise DataError(f"'{path}' holds no samples: 'labels' is empty")
    class_names = class_list(path, labels, arrays.get("classes"))
    modalities = {k: v for k, v in arrays.items() if k not in RESERVED}
    if not modalities:
        raise DataError(f"'{path}' has no modality arrays besides {', '.join(k for k in RESERVED if k in arrays)}")
    specs = {}
    for name, x in modalities.items():
        if x.ndim not in (2, 3) or not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
            raise DataError(f"'{path}': array '{name}' must be numeric N x D or N x T x D, got shape {x.shape} dtype {x.dtype}")
        if x.shape[0] != n:
            raise DataError(f"'{path}': array '{name}' has {x.shape[0]} rows but 'labels' has {n}")
        if not np.isfinite(x).all():
            raise DataError(f"'{path}': array '{name}' contains NaN or infinite values")
        specs[name] = ModalitySpec("vector" if x.ndim == 2 else "sequence", tuple(x.shape[1:]))
    num_classes = len(class_names)
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
    info = DatasetInfo(name=path.stem, modalities=specs, num_classes=num_classes, class_names=class_names)
    return DataSplits(info, *(full.subset(p) for p in parts))


#: the first bytes of a zip archive (what numpy.savez writes) and of a single .npy array
ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
NPY_MAGIC = b"\x93NUMPY"


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of a .npz archive; one sentence (never numpy's own advice) when the file is not one."""
    with open(path, "rb") as f:
        head = f.read(6)
    if not head:
        raise DataError(f"'{path}' is empty (0 bytes); expected a .npz archive written by numpy.savez")
    if head.startswith(NPY_MAGIC):
        raise DataError(f"'{path}' is a single .npy array, not a .npz archive; save the arrays with "
                        "numpy.savez(path, labels=..., <modality>=...)")
    if not head.startswith(ZIP_MAGIC):
        raise DataError(f"'{path}' is not a .npz archive (numpy.savez writes a zip file of .npy arrays)")
    arrays = {}
    try:
        with np.load(path, allow_pickle=False) as f:
            for key in f.files:
                try:
                    arrays[key] = f[key]
                except ValueError:
                    raise DataError(f"'{path}': array '{key}' holds Python objects; poise reads numeric arrays "
                                    "(and strings for 'split' and 'classes') only") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        raise DataError(f"'{path}' is a damaged .npz archive (truncated or not written by numpy.savez)") from None
    return arrays


def _spans(values: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``'1..3, 7'`` (at most six spans shown)."""
    spans: list[tuple[int, int]] = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], v)
        else:
            spans.append((v, v))
    text = [f"{a}..{b}" if b > a + 1 else (f"{a}, {b}" if b == a + 1 else f"{a}") for a, b in spans[:6]]
    return ", ".join(text) + (", ..." if len(spans) > 6 else "")


def class_list(path: Path, labels: np.ndarray, classes: np.ndarray | None) -> tuple[str, ...]:
    """The class names: the ``classes`` array, or ``0..C-1`` when the labels are exactly those."""
    present = np.unique(labels)
    if classes is not None:
        if classes.ndim != 1 or len(classes) < 2:
            raise DataError(f"'{path}': 'classes' must be a 1-D array naming at least two classes, got shape {classes.shape}")
        names = tuple(str(c) for c in classes.tolist())
        if len(set(names)) != len(names):
            twice = sorted({c for c in names if names.count(c) > 1})
            raise DataError(f"'{path}': 'classes' names {', '.join(repr(c) for c in twice)} more than once")
        bad = present[(present < 0) | (present >= len(names))]
        if len(bad):
            raise DataError(f"'{path}': labels {_spans(bad.tolist())} do not index the {len(names)} names of 'classes' "
                            f"(labels must be 0..{len(names) - 1})")
        return names
    if present[0] < 0:
        raise DataError(f"'{path}': 'labels' must be class indices 0..C-1, found negative labels "
                        f"{_spans(present[present < 0].tolist())}")
    top = int(present[-1])
    if len(present) != top + 1:
        absent = sorted(set(range(top + 1)) - set(present.tolist()))
        missing = f"label {absent[0]} never occurs" if len(absent) == 1 else f"labels {_spans(absent)} never occur"
        raise DataError(f"'{path}': 'labels' must be the contiguous classes 0..C-1, but {missing} below the largest "
                        f"label {top}; renumber the labels, or name every class in a 'classes' array that the labels "
                        "index")
    if top == 0:
        raise DataError(f"'{path}': every label is 0; classification needs at least two classes")
    return tuple(str(c) for c in range(top + 1))
