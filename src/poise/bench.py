"""Run methods x seeds on one dataset and collect the results (``poise bench``).

``results.json`` schema (stable):

    {"dataset": str,
     "runs": [{"method": str,            # registered name, "unimodal:<modality>" for the baseline
               "seed": int,
               "config": {...},          # the full validated run configuration
               "best_epoch": int,        # chosen on the validation split
               "train_seconds": float,
               "test": {"accuracy": float, "macro_f1": float,
                        "unimodal_accuracy": {modality: float},
                        "probe_accuracy": {modality: float}},
               "history": [{"epoch", "lr", "train_loss", "train_terms", "train_accuracy",
                            "confidence_ratio": {modality: float}, "val": {...},
                            "method": {recorded name: float}, "seconds"}, ...]}]}
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

from poise.config import RunConfig, build_config
from poise.data.registry import dataset_kind, load_dataset
from poise.errors import ConfigError, closest
from poise.methods.registry import METHODS, balancing_methods, make_method


def run_config(dataset: str, file_layer: dict | None = None, set_layer: dict | None = None) -> RunConfig:
    """Defaults < the dataset's own defaults < config file < --set overrides."""
    kind, _ = dataset_kind(dataset)
    cfg = build_config(kind.defaults, file_layer or {}, set_layer or {})
    for name in cfg.method:
        if name not in METHODS:
            raise ConfigError(f"config section 'method.{name}' names an unknown method{closest(name, METHODS)}")
    return cfg


def expand_methods(spec: str, modalities: tuple[str, ...]) -> list[str]:
    """``all`` -> joint, every unimodal:<m>, every balancing method; otherwise a comma list, validated."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ConfigError("--methods is empty; give a comma-separated list or 'all'")
    out: list[str] = []
    for name in names:
        if name == "all":
            out += ["joint", *(f"unimodal:{m}" for m in modalities), *balancing_methods()]
            continue
        base, _, arg = name.partition(":")
        METHODS[base]  # raises with the closest name
        if base == "unimodal" and arg not in modalities:
            raise ConfigError(f"unknown modality '{arg}' in '{name}'{closest(arg, modalities)}")
        out.append(name)
    return list(dict.fromkeys(out))


def method_options(cfg: RunConfig, spec: str) -> dict[str, Any]:
    return dict(cfg.method.get(spec.partition(":")[0], {}))


@lru_cache(maxsize=4)
def _cached_splits(dataset: str, dataset_options: str, data_config: str):
    from poise.config import DataConfig

    return load_dataset(dataset, json.loads(dataset_options), DataConfig(**json.loads(data_config)))


def splits_for(dataset: str, cfg: RunConfig):
    return _cached_splits(dataset, json.dumps(cfg.dataset, sort_keys=True), json.dumps(cfg.data.model_dump(), sort_keys=True))


def train_one(dataset: str, spec: str, cfg_dict: dict, seed: int, out_dir: str | None, threads: int | None = None,
              init_dir: str | None = None, resume: bool = False) -> dict:
    """One run; a plain function of plain arguments so that it can run in a worker process."""
    import torch

    from poise.train.trainer import Trainer

    if threads:
        torch.set_num_threads(threads)
    cfg = RunConfig(**cfg_dict)
    splits = splits_for(dataset, cfg)
    method = make_method(spec, method_options(cfg, spec))
    result = Trainer(splits, method, cfg, seed=seed, out_dir=out_dir, method_name=spec, init_dir=init_dir,
                     resume=resume).fit()
    return result.to_dict()


def warm_up(threads: int | None = None) -> None:
    """Import and initialise once per process what every run uses (the optimiser machinery, TensorBoard,
    the probe's solver), so that the first run of a process is not charged for it in ``train_seconds``."""
    import torch
    from sklearn.linear_model import LogisticRegression  # noqa: F401
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401

    import poise.train.trainer  # noqa: F401

    if threads:
        torch.set_num_threads(threads)
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    (p ** 2).sum().backward()
    opt.step()


def run_bench(dataset: str, methods: list[str], seeds: list[int], cfg: RunConfig, out: Path, workers: int = 1,
              log=print) -> dict:
    from poise.train.distributed import is_main_process, launched_by_torchrun

    if workers > 1 and launched_by_torchrun():
        raise ConfigError("under torchrun every run already uses all the processes torchrun started; "
                          "leave --workers at 1")
    out.mkdir(parents=True, exist_ok=True)
    # Validate every method's options (and compatibility) before the first run starts.
    splits = splits_for(dataset, cfg)
    from poise.train.trainer import Trainer

    for spec in methods:
        Trainer(splits, make_method(spec, method_options(cfg, spec)), cfg, seed=0, method_name=spec)
    jobs = [(spec, seed) for spec in methods for seed in seeds]
    cfg_dict = cfg.model_dump()
    results: dict[tuple[str, int], dict] = {}

    def save():
        if not is_main_process():  # under torchrun only rank 0 writes
            return
        runs = [results[j] for j in jobs if j in results]
        from poise.train.trainer import atomic_write_text

        atomic_write_text(json.dumps({"dataset": dataset, "runs": runs}, indent=1), out / "results.json")

    def run_dir(spec: str, seed: int) -> str:
        return str(out / "runs" / spec.replace(":", "_") / f"seed{seed}")

    if workers <= 1:
        warm_up()
        for spec, seed in jobs:
            results[(spec, seed)] = train_one(dataset, spec, cfg_dict, seed, run_dir(spec, seed))
            log(_line(results[(spec, seed)]))
            save()
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=warm_up,
                                 initargs=(1,)) as pool:
            futures = {
                pool.submit(train_one, dataset, spec, cfg_dict, seed, run_dir(spec, seed), 1): (spec, seed)
                for spec, seed in jobs
            }
            for fut in _as_completed(futures):
                results[futures[fut]] = fut.result()
                log(_line(results[futures[fut]]))
                save()
    save()
    if not is_main_process():
        return json.loads(json.dumps({"dataset": dataset, "runs": [results[j] for j in jobs]}))
    return json.loads((out / "results.json").read_text())


def _as_completed(futures):
    from concurrent.futures import as_completed

    return as_completed(futures)


def _line(run: dict) -> str:
    probe = " ".join(f"{m}={v:.3f}" for m, v in run["test"]["probe_accuracy"].items())
    return (f"{run['method']:<22} seed {run['seed']}: acc {run['test']['accuracy']:.4f}  probe {probe}  "
            f"({run['train_seconds']:.1f}s, best epoch {run['best_epoch']})")


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))
