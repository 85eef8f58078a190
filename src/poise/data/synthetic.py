"""``synthetic``: Gaussian class prototypes per modality with a signal-strength knob each (fast tests)."""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from poise.data.base import DatasetInfo, DataSplits, ModalitySpec, TensorMultimodalDataset, stratified_split


class SyntheticModality(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dim: int = Field(16, ge=1)
    signal: float = Field(1.0, ge=0, description="distance of class prototypes relative to unit noise")


class SyntheticOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_samples: int = Field(1200, ge=30)
    num_classes: int = Field(4, ge=2)
    test_fraction: float = Field(0.25, gt=0, lt=1)
    modalities: dict[str, SyntheticModality] = Field(
        default_factory=lambda: {"audio": SyntheticModality(signal=2.0), "visual": SyntheticModality(signal=1.0)}
    )


def build_synthetic(arg: str | None, options: SyntheticOptions, val_fraction: float, split_seed: int) -> DataSplits:
    rng = np.random.default_rng(1234)  # the task itself is fixed; split_seed only moves the splits
    n, c = options.num_samples, options.num_classes
    labels = np.arange(n) % c
    rng.shuffle(labels)
    inputs = {}
    for name, mod in options.modalities.items():
        prototypes = rng.standard_normal((c, mod.dim)) / np.sqrt(mod.dim) * mod.signal
        x = prototypes[labels] + rng.standard_normal((n, mod.dim))
        inputs[name] = torch.from_numpy(x.astype(np.float32))
    full = TensorMultimodalDataset(inputs, torch.from_numpy(labels))
    test_f = options.test_fraction
    train, val, test = stratified_split(labels, ((1 - test_f) * (1 - val_fraction), (1 - test_f) * val_fraction, test_f), split_seed)
    info = DatasetInfo(
        name="synthetic",
        modalities={m: ModalitySpec("vector", (mod.dim,)) for m, mod in options.modalities.items()},
        num_classes=c,
        class_names=tuple(f"class{i}" for i in range(c)),
    )
    return DataSplits(info, full.subset(train), full.subset(val), full.subset(test))
