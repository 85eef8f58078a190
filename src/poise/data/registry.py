"""The explicit registry of dataset kinds, and the one entry point that builds splits from a name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError
from torch import Tensor

from poise.config import DataConfig, describe_validation_error
from poise.data.avdigits import AVDIGITS_DEFAULTS, AvDigitsOptions, build_avdigits
from poise.data.audiovisual import (
    AveOptions,
    CremadOptions,
    KineticsSoundsOptions,
    Ucf101Options,
    VggSoundOptions,
    build_ave,
    build_cremad,
    build_kinetics_sounds,
    build_ucf101,
    build_vggsound,
)
from poise.data.base import DataSplits, missing_mask
from poise.data.features import IemocapOptions, MoseiOptions, build_iemocap, build_mosei
from poise.data.iemocap_mla import IemocapMlaOptions, build_iemocap_mla
from poise.data.imagetext import Food101Options, MvsaOptions, build_food101, build_mvsa
from poise.data.npz import NpzOptions, build_npz
from poise.data.standardize import standardize_splits
from poise.data.synthetic import SyntheticOptions, build_synthetic
from poise.errors import ConfigError
from poise.registry import Registry


@dataclass(frozen=True)
class DatasetKind:
    """builder(arg, options, val_fraction, split_seed) -> DataSplits. ``defaults`` is a config layer
    (trainer, model, method options) tuned for this dataset, applied under the user's config."""

    builder: Callable[..., DataSplits]
    Options: type[BaseModel]
    defaults: dict[str, Any] = field(default_factory=dict)
    needs_arg: bool = False


# the seed papers' encoders for the real datasets: ResNet-18 (512-d) from scratch, transformers for sequences
RESNET_AV = {"model": {"feature_dim": 512, "encoders": {"audio": "resnet18", "visual": "resnet18"}}}
RESNET_UCF = {"model": {"feature_dim": 512, "encoders": {"visual": "resnet18", "flow": "resnet18"}}}
IMAGE_TEXT = {"model": {"feature_dim": 512, "encoders": {"visual": "resnet18", "text": "text"}}}
IEMOCAP_MLA = {"model": {"feature_dim": 512, "encoders": {"audio": "resnet18", "visual": "resnet18", "text": "text"}}}
FEATURE_SEQUENCES = {"model": {"encoders": {"audio": "transformer", "visual": "transformer", "text": "transformer"}}}

DATASETS: Registry[DatasetKind] = Registry(
    "dataset",
    {
        "synthetic": DatasetKind(build_synthetic, SyntheticOptions, {"trainer": {"epochs": 15, "lr": 0.05}}),
        "npz": DatasetKind(build_npz, NpzOptions, {"data": {"standardize": True}}, needs_arg=True),
        "avdigits": DatasetKind(build_avdigits, AvDigitsOptions, AVDIGITS_DEFAULTS),
        "cremad": DatasetKind(build_cremad, CremadOptions, RESNET_AV, needs_arg=True),
        "kinetics_sounds": DatasetKind(build_kinetics_sounds, KineticsSoundsOptions, RESNET_AV, needs_arg=True),
        "ave": DatasetKind(build_ave, AveOptions, RESNET_AV, needs_arg=True),
        "vggsound": DatasetKind(build_vggsound, VggSoundOptions, RESNET_AV, needs_arg=True),
        "ucf101": DatasetKind(build_ucf101, Ucf101Options, RESNET_UCF, needs_arg=True),
        "food101": DatasetKind(build_food101, Food101Options, IMAGE_TEXT, needs_arg=True),
        "mvsa": DatasetKind(build_mvsa, MvsaOptions, IMAGE_TEXT, needs_arg=True),
        "mosei": DatasetKind(build_mosei, MoseiOptions, FEATURE_SEQUENCES, needs_arg=True),
        "iemocap": DatasetKind(build_iemocap, IemocapOptions, FEATURE_SEQUENCES, needs_arg=True),
        "iemocap_mla": DatasetKind(build_iemocap_mla, IemocapMlaOptions, IEMOCAP_MLA, needs_arg=True),
    },
)


def dataset_kind(spec: str) -> tuple[DatasetKind, str | None]:
    name, sep, arg = spec.partition(":")
    kind = DATASETS[name]
    if kind.needs_arg and not arg:
        raise ConfigError(f"dataset '{name}' needs a path: --dataset {name}:PATH")
    return kind, arg or None


def split_missing_mask(n: int, num_modalities: int, rate: float, split_seed: int, split: str) -> Tensor:
    """The missing-modality mask that ``load_dataset`` gives one split at ``rate`` (fixed by the split seed)."""
    return missing_mask(n, num_modalities, rate, seed=split_seed * 7919 + ("train", "val", "test").index(split))


def load_dataset(spec: str, options: dict[str, Any], data: DataConfig,
                 statistics: dict[str, dict[str, list[float]]] | None = None) -> DataSplits:
    """Build the train / val / test splits of ``spec`` (``name`` or ``name:ARG``), standardise
    their vector and sequence features (``data.standardize``: with ``statistics`` when given, a run's stored
    ones, else fitted on the training split), then apply the missing-modality masks of ``data`` (fixed by
    ``data.split_seed``)."""
    kind, arg = dataset_kind(spec)
    try:
        opts = kind.Options(**options)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, prefix="dataset")) from None
    splits = kind.builder(arg, opts, data.val_fraction, data.split_seed)
    splits.source = spec
    if data.standardize:
        splits.standardization = standardize_splits(splits, statistics, f"dataset '{spec}'")
    m = len(splits.info.modalities)
    rates = {"train": data.missing_rate, "val": data.missing_rate, "test": data.missing_rate if data.missing_rate_test is None else data.missing_rate_test}
    for split_name, rate in rates.items():
        if rate > 0:
            ds = splits.split(split_name)
            present = split_missing_mask(len(ds), m, rate, data.split_seed, split_name)
            setattr(splits, split_name, ds.with_present(present))
    return splits
