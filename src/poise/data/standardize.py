"""Per-feature standardisation of vector and sequence features, fitted on the training split only.

Features from different extractors come on very different scales (one view in the unit range, another
in the thousands); a network initialised for unit-scale inputs then trains the large one at chance or
overflows. ``data.standardize`` maps every feature ``d`` of a vector (N, D) or sequence (N, T, D)
modality to ``(x_d - mean_d) / std_d``, with the mean and the population standard deviation taken over
the training split's samples (and time steps), never over validation or test. A constant feature keeps
scale 1. The statistics are plain lists so that ``run.json`` records them and ``poise eval`` and
``--resume`` apply the very same ones.
"""

from __future__ import annotations

import torch

from poise.errors import DataError

STANDARDIZED_KINDS = ("vector", "sequence")

#: modality -> {"mean": [D floats], "std": [D floats]}
Statistics = dict[str, dict[str, list[float]]]


def standardizable(splits) -> list[str]:
    """The modalities ``data.standardize`` applies to: vector and sequence features held in memory."""
    from poise.data.base import TensorMultimodalDataset

    if not isinstance(splits.train, TensorMultimodalDataset):
        return []
    return [m for m, spec in splits.info.modalities.items() if spec.kind in STANDARDIZED_KINDS]


def fit_statistics(inputs: dict[str, torch.Tensor], modalities: list[str]) -> Statistics:
    """Mean and population std of every feature (the last dimension), over all other dimensions,
    accumulated in float64."""
    stats: Statistics = {}
    for m in modalities:
        x = inputs[m].to(torch.float64)
        x = x.reshape(-1, x.shape[-1])
        if x.shape[0] == 0:
            raise DataError(f"cannot standardise modality '{m}': the training split has no samples")
        mean = x.mean(dim=0)
        std = (x - mean).pow(2).mean(dim=0).sqrt()
        std = torch.where(std > 0, std, torch.ones_like(std))
        stats[m] = {"mean": mean.float().tolist(), "std": std.float().tolist()}
    return stats


def apply_statistics(x: torch.Tensor, stats: dict[str, list[float]]) -> torch.Tensor:
    mean = torch.tensor(stats["mean"], dtype=torch.float64)
    std = torch.tensor(stats["std"], dtype=torch.float64)
    return ((x.to(torch.float64) - mean) / std).to(torch.float32)


def standardize_splits(splits, statistics: Statistics | None = None, where: str = "") -> Statistics:
    """Standardise ``splits`` in place with ``statistics`` (fitted on its training split when None);
    returns the statistics used."""
    from poise.data.base import TensorMultimodalDataset

    modalities = standardizable(splits)
    if not modalities:
        kinds = ", ".join(f"{m} ({s.kind})" for m, s in splits.info.modalities.items())
        raise DataError(f"data.standardize applies to vector and sequence features held in memory; {where or 'the dataset'} "
                        f"has none ({kinds}): set data.standardize=false")
    if statistics is None:
        train = splits.train
        present = {m: train.inputs[m][train.present[:, j]] for j, m in enumerate(train.modalities)}
        statistics = fit_statistics(present, modalities)
    for m in modalities:
        if m not in statistics or len(statistics[m]["mean"]) != splits.info.modalities[m].shape[-1]:
            raise DataError(f"the stored standardisation statistics do not fit modality '{m}' of {where or 'the dataset'} "
                            f"(expected {splits.info.modalities[m].shape[-1]} features)")
    for name in ("train", "val", "test"):
        ds: TensorMultimodalDataset = splits.split(name)
        inputs = {m: apply_statistics(x, statistics[m]) if m in modalities else x for m, x in ds.inputs.items()}
        setattr(splits, name, TensorMultimodalDataset(inputs, ds.labels, ds.present))
    return statistics


__all__ = ["STANDARDIZED_KINDS", "Statistics", "apply_statistics", "fit_statistics",
           "standardizable", "standardize_splits"]
