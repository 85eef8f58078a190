"""Pre-extracted feature sequences: CMU-MOSEI and IEMOCAP in the MulT pickle layout.

``<name>:PATH`` is the pickle file (``mosei_senti_data.pkl`` / ``..._noalign.pkl``,
``iemocap_data.pkl``) or its folder: a dict ``{"train", "valid", "test"}`` of dicts with
``"vision"`` (N, T, 35), ``"audio"`` (N, T, 74), ``"text"`` (N, T, 300) float arrays and
``"labels"``: MOSEI (N, 1, 1) sentiment in [-3, 3]; IEMOCAP (N, 4, 2) one (negative, positive)
pair per emotion (neutral, happy, sad, angry). The official ``valid`` split is the validation split.
A pickle runs code when it is loaded: open only files you trust.

The feature sets are small, so they are held in memory (``TensorMultimodalDataset``). As in the
released loader, ``-inf`` audio values (log of silence) become 0.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from poise.data.base import DatasetInfo, DataSplits, ModalitySpec, TensorMultimodalDataset
from poise.errors import DataError

PICKLE_SPLITS = {"train": "train", "val": "valid", "test": "test"}
MODALITY_KEYS = {"audio": "audio", "visual": "vision", "text": "text"}
IEMOCAP_CLASSES = ("neutral", "happy", "sad", "angry")


class FeatureOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    audio_dim: int | None = Field(74, ge=1, description="expected audio feature size (none: any)")
    visual_dim: int | None = Field(35, ge=1, description="expected visual feature size (none: any)")
    text_dim: int | None = Field(300, ge=1, description="expected text feature size (none: any)")


class MoseiOptions(FeatureOptions):
    file: str = Field("mosei_senti_data_noalign.pkl", description="the pickle's name when the path is a folder")
    classes: Literal[2, 7] = Field(2, description="2: two sentiment classes (see zero_is); 7: the rounded score -3..3")
    zero_is: Literal["positive", "negative"] = Field(
        "positive", description="2 classes: a score of exactly 0 counts as positive (negative < 0 / non-negative, "
        "BalanceBenchmark) or as negative (non-positive / positive > 0, MulT)"
    )


class IemocapOptions(FeatureOptions):
    file: str = Field("iemocap_data.pkl", description="the pickle's name when the path is a folder")
    pair_order: Literal["detect", "negative_positive", "positive_negative"] = Field(
        "detect", description="order of each emotion's flag pair in (N, 4, 2) labels; detect: the order in which every "
        "sample has exactly one emotion"
    )
    evaluation: Literal["four_class", "binary_tasks"] = Field(
        "four_class", description="four_class: one 4-class accuracy; binary_tasks: also MulT's evaluation, each emotion "
        "a binary task (accuracy and weighted F1, under test.binary_tasks)"
    )


def load_feature_pickle(arg: str | None, name: str, file: str) -> tuple[Path, dict]:
    if not arg:
        raise DataError(f"the {name} dataset needs its pickle file: --dataset {name}:PATH")
    path = Path(arg)
    if path.is_dir():
        path = path / file
    if not path.is_file():
        raise DataError(f"{name} feature file '{path}' does not exist")
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, ValueError) as e:
        raise DataError(f"'{path}' is not a readable pickle: {e}") from None
    if not isinstance(data, dict) or any(not isinstance(data.get(k), dict) for k in PICKLE_SPLITS.values()):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise DataError(f"'{path}' must hold a dict with 'train', 'valid' and 'test' dicts, found {found}")
    return path, data


def feature_splits(name: str, path: Path, data: dict, options: FeatureOptions, labels_of, classes: tuple[str, ...]) -> DataSplits:
    dims = {"audio": options.audio_dim, "visual": options.visual_dim, "text": options.text_dim}
    splits, specs = {}, {}
    for split, key in PICKLE_SPLITS.items():
        part = data[key]
        if "labels" not in part:
            raise DataError(f"'{path}': split '{key}' has no 'labels' array")
        labels = labels_of(np.asarray(part["labels"]), f"'{path}' split '{key}'")
        inputs = {}
        for m, k in MODALITY_KEYS.items():
            if k not in part:
                raise DataError(f"'{path}': split '{key}' has no '{k}' array")
            x = np.asarray(part[k], dtype=np.float32)
            where = f"'{path}' split '{key}' array '{k}'"
            if x.ndim != 3 or x.shape[0] != len(labels) or (dims[m] is not None and x.shape[2] != dims[m]):
                expected = f"({len(labels)}, T, {dims[m] if dims[m] is not None else 'D'})"
                raise DataError(f"{where} has shape {x.shape}, expected {expected}")
            x = np.where(np.isneginf(x), 0.0, x)
            if not np.isfinite(x).all():
                raise DataError(f"{where} contains NaN or +inf values")
            if m in specs and specs[m].shape != tuple(x.shape[1:]):
                raise DataError(f"{where} has per-sample shape {x.shape[1:]}, the train split {specs[m].shape}")
            specs.setdefault(m, ModalitySpec("sequence", tuple(x.shape[1:])))
            inputs[m] = torch.from_numpy(x)
        splits[split] = TensorMultimodalDataset(inputs, torch.from_numpy(labels))
    info = DatasetInfo(name=name, modalities=specs, num_classes=len(classes), class_names=classes)
    return DataSplits(info, splits["train"], splits["val"], splits["test"])


def build_mosei(arg: str | None, options: MoseiOptions, val_fraction: float, split_seed: int) -> DataSplits:
    path, data = load_feature_pickle(arg, "mosei", options.file)

    def labels_of(y: np.ndarray, where: str) -> np.ndarray:
        score = y.reshape(len(y), -1)
        if score.shape[1] != 1 or not np.isfinite(score).all():
            raise DataError(f"{where}: 'labels' must hold one finite sentiment score per sample, got shape {y.shape}")
        score = score[:, 0]
        if options.classes == 2:
            return (score >= 0 if options.zero_is == "positive" else score > 0).astype(np.int64)
        return (np.clip(np.round(score), -3, 3) + 3).astype(np.int64)

    two = ("negative", "non-negative") if options.zero_is == "positive" else ("non-positive", "positive")
    classes = two if options.classes == 2 else tuple(str(s) for s in range(-3, 4))
    return feature_splits("mosei", path, data, options, labels_of, classes)


def build_iemocap(arg: str | None, options: IemocapOptions, val_fraction: float, split_seed: int) -> DataSplits:
    path, data = load_feature_pickle(arg, "iemocap", options.file)

    def labels_of(y: np.ndarray, where: str) -> np.ndarray:
        if y.ndim == 1 and np.issubdtype(y.dtype, np.integer):
            bad = y[(y < 0) | (y >= len(IEMOCAP_CLASSES))]
            if len(bad):
                raise DataError(f"{where}: label {bad[0]} is outside the classes 0..{len(IEMOCAP_CLASSES) - 1}")
            return y.astype(np.int64)
        if y.ndim != 3 or y.shape[1:] != (len(IEMOCAP_CLASSES), 2):
            raise DataError(f"{where}: 'labels' must be (N, 4, 2) emotion flags or (N,) classes, got shape {y.shape}")
        column = {"negative_positive": 1, "positive_negative": 0}.get(options.pair_order)
        if column is None:
            fits = [c for c in (1, 0) if ((y[:, :, c] > 0.5).sum(axis=1) == 1).all()]
            if len(fits) == 2:
                raise DataError(f"{where}: cannot tell the order of the (N, 4, 2) label pairs (both orders give every "
                                "sample exactly one emotion); set dataset.pair_order to negative_positive or positive_negative")
            column = fits[0] if fits else 1  # neither fits: MulT's (negative, positive), and the sample is named below
        positive = y[:, :, column] > 0.5
        counts = positive.sum(axis=1)
        if (counts != 1).any():
            row = int(np.flatnonzero(counts != 1)[0])
            raise DataError(f"{where}: sample {row} has {int(counts[row])} positive emotions, exactly one expected")
        return positive.argmax(axis=1).astype(np.int64)

    splits = feature_splits("iemocap", path, data, options, labels_of, IEMOCAP_CLASSES)
    if options.evaluation == "binary_tasks":
        splits.notes["evaluation"] = "binary_tasks"
    return splits
