"""Assembling one run: its configuration (defaults < dataset defaults < file < --set), its data splits,
its method, the ``run.json`` description (:class:`RunDescription`) that ``poise train --resume`` and
``poise eval`` rebuild it from, and :func:`train_one`, the plain function that trains it (what ``poise
train`` and each run of ``poise bench`` call). This is the library's run-assembly API."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from poise.config import RunConfig, build_config
from poise.data.registry import dataset_kind, load_dataset
from poise.errors import ConfigError, DataError, closest
from poise.methods.registry import METHODS, make_method
from poise.train.run_files import RUN_FILE, stored_statistics


def run_config(dataset: str, file_layer: dict | None = None, set_layer: dict | None = None) -> RunConfig:
    """Defaults < the dataset's own defaults < config file < --set overrides."""
    kind, _ = dataset_kind(dataset)
    cfg = build_config(kind.defaults, file_layer or {}, set_layer or {})
    for name in cfg.method:
        if name not in METHODS:
            raise ConfigError(f"config section 'method.{name}' names an unknown method{closest(name, METHODS)}")
    return cfg


def method_options(cfg: RunConfig, spec: str) -> dict[str, Any]:
    if "+" in spec:  # a combination: each part's own section
        return {p.partition(":")[0]: dict(cfg.method.get(p.strip().partition(":")[0], {})) for p in spec.split("+")}
    return dict(cfg.method.get(spec.partition(":")[0], {}))


def resolve_method(spec: str, cfg: RunConfig) -> str:
    """``unimodal`` with ``method.unimodal.modality`` set is ``unimodal:<modality>``."""
    given = cfg.method.get("unimodal", {}).get("modality")
    if spec.strip() == "unimodal" and given:
        return f"unimodal:{given}"
    return spec


@lru_cache(maxsize=4)
def _cached_splits(dataset: str, dataset_options: str, data_config: str, statistics: str):
    from poise.config import DataConfig

    return load_dataset(dataset, json.loads(dataset_options), DataConfig(**json.loads(data_config)),
                        json.loads(statistics) if statistics else None)


def splits_for(dataset: str, cfg: RunConfig, statistics: dict | None = None):
    """The splits of ``dataset`` under ``cfg``; ``statistics``: a run's stored standardisation statistics
    (``run.json``), applied instead of fitting them again."""
    return _cached_splits(dataset, json.dumps(cfg.dataset, sort_keys=True), json.dumps(cfg.data.model_dump(), sort_keys=True),
                          json.dumps(statistics, sort_keys=True) if statistics else "")


@dataclass
class RunDescription:
    """What ``run.json`` holds (the :class:`~poise.train.trainer.Trainer` writes it): the dataset, the
    method (and the run's name in a bench), the seed, the folder of pre-trained encoders (or None), the
    full configuration and the standardisation statistics fitted on the training split (or None)."""

    dataset: str
    method: str
    seed: int
    config: dict[str, Any]
    name: str | None = None
    init: str | None = None
    standardization: dict | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "method": self.method, "name": self.name or self.method, "seed": self.seed,
                "init": self.init, "config": self.config, "standardization": self.standardization}

    @classmethod
    def read(cls, run_dir: Path) -> RunDescription:
        """The description in ``run_dir/run.json``; a missing or malformed file is refused in one sentence."""
        path = Path(run_dir) / RUN_FILE
        if not path.is_file():
            raise DataError(f"'{path}' does not exist; poise eval takes a run folder written by 'poise train' or "
                            "one of the run folders of 'poise bench' (DIR/runs/<method>/seed<S>)")
        try:
            raw = json.loads(path.read_text())
            description = cls(dataset=raw["dataset"], method=raw["method"], seed=int(raw["seed"]),
                              config=dict(raw["config"]), name=raw.get("name"), init=raw.get("init"),
                              standardization=raw.get("standardization"))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise DataError(f"'{path}' is not a poise run description ({err})") from None
        if not isinstance(description.dataset, str):
            raise DataError(f"'{path}' names no dataset: the run was trained on splits built in Python, not loaded by "
                            "name (--dataset), so poise eval cannot rebuild its data")
        return description


def train_one(dataset: str, spec: str, cfg_dict: dict, seed: int, out_dir: str | None, threads: int | None = None,
              init_dir: str | None = None, resume: bool = False, name: str | None = None,
              pretrain: str | None = None, epoch_lines: bool = False, epoch_callback=None) -> dict:
    """One run; a plain function of plain arguments so that it can run in a worker process. ``cfg_dict``
    is the run's full configuration; ``pretrain`` pre-trains the encoders first (into ``out_dir/pretrain``)
    and counts that time in ``train_seconds``; ``epoch_callback(epoch, entry)``: the trainer's per-epoch hook
    (:class:`~poise.train.trainer.Trainer`). The run folder gets ``run.json`` and ``result.json``; a
    resumed run applies the standardisation statistics its ``run.json`` recorded."""
    import tempfile
    import time

    import torch

    from poise.train.factory import join_process_group
    from poise.train.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    cfg = RunConfig(**cfg_dict)
    join_process_group(cfg)  # under torchrun: this process joins the run's group (no-op elsewhere)
    splits = splits_for(dataset, cfg, stored_statistics(out_dir) if resume else None)
    pretrain_seconds = 0.0
    with tempfile.TemporaryDirectory() as scratch:
        if pretrain is not None:
            from poise.train.pretrain import ENCODERS_FILE, run_pretrain

            init_dir = str(Path(out_dir or scratch) / "pretrain")
            if not (resume and (Path(init_dir) / ENCODERS_FILE).is_file()):  # a resumed run keeps its encoders
                start = time.perf_counter()
                run_pretrain(splits, cfg, Path(init_dir), seed, pretrain)
                pretrain_seconds = time.perf_counter() - start
        method = make_method(spec, method_options(cfg, spec))
        trainer = Trainer(splits, method, cfg, seed=seed, out_dir=out_dir, method_name=name or spec, init_dir=init_dir,
                          resume=resume, epoch_lines=epoch_lines, epoch_callback=epoch_callback)
        result = trainer.fit()
    if pretrain_seconds:
        from poise.train.distributed import is_main_process

        result.train_seconds += pretrain_seconds
        if out_dir is not None and is_main_process():
            trainer.write_result(result)
    return result.to_dict()


__all__ = ["RUN_FILE", "RunDescription", "method_options", "resolve_method", "run_config", "splits_for", "train_one"]
