"""Building a run: device, process group, model, optimizer, scheduler and loaders, from a configuration.

The trainer, pre-training, ``poise eval``, bench and the CLI all build through these functions, so a
model pre-trained or evaluated is built exactly as a training run builds it. Joining the process group
of a ``torchrun`` launch is the explicit call :func:`join_process_group`, never a side effect.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.utils.data import DataLoader, Dataset

from poise.config import RunConfig
from poise.data.base import DatasetInfo
from poise.data.batch import collate
from poise.errors import ConfigError
from poise.models.model import MultimodalModel
from poise.models.model import build_model as _build_model
from poise.train.distributed import init_distributed, is_distributed, launched_by_torchrun, rank, world_size
from poise.train.sampler import ShardedBatchSampler


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device is '{name}' but CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"trainer.device '{name}' is not a device name (expected cpu, cuda or cuda:N)") from None


def join_process_group(config: RunConfig) -> torch.device:
    """In a process that torchrun started, join the run's process group (once); return this process's
    device (``cuda:LOCAL_RANK`` on GPUs). Elsewhere just the configured device."""
    device = resolve_device(config.trainer.device)
    if launched_by_torchrun() or is_distributed():
        device = init_distributed(device, config.trainer.dist_backend)
    return device


def run_device(config: RunConfig) -> torch.device:
    """This process's device for a run; refuses a torchrun process that has not joined its group."""
    if launched_by_torchrun() and not is_distributed():
        raise ConfigError("this process was started by torchrun but has not joined the process group: call "
                          "poise.train.factory.join_process_group(config) before building the run (poise train does)")
    device = resolve_device(config.trainer.device)
    if is_distributed():
        device = init_distributed(device, config.trainer.dist_backend)  # already joined: this rank's device
    t = config.trainer
    if t.amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("trainer.amp bf16 needs a GPU with bfloat16 support; use fp16 on this one")
    return device


def build_model(config: RunConfig, info: DatasetInfo, modalities: tuple[str, ...], fusion: str,
                device: torch.device, fusion_options: bool = True, mid_fusion: str | None = None) -> MultimodalModel:
    """The run's model; ``fusion_options=False`` leaves out ``model.fusion_options`` (a model with another
    fusion than the configured one). ``mid_fusion``: the mid-fusion when ``model.mid_fusion`` is unset
    (the method's default); ``model.mid_fusion: none`` turns it off."""
    mc = config.model
    mid = mc.mid_fusion or mid_fusion
    return _build_model(
        info, modalities, fusion, feature_dim=mc.feature_dim, encoders=mc.encoders, encoder_options=mc.encoder_options,
        fusion_options=mc.fusion_options if fusion_options else None,
        mid_fusion=None if mid in (None, "none") else mid, mid_fusion_options=mc.mid_fusion_options,
    ).to(device)


def build_optimizer(config: RunConfig, params: Iterable[torch.nn.Parameter]) -> torch.optim.Optimizer:
    t = config.trainer
    params = [p for p in params if p.requires_grad]
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)


def build_scheduler(config: RunConfig, optimizer: torch.optim.Optimizer):
    t = config.trainer
    if t.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.step_size, gamma=t.gamma)
    if t.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.epochs)
    return None


def make_loader(config: RunConfig, dataset: Dataset, seed: int, device: torch.device, shuffle: bool,
                micro_batches: int | None = None, sharded: bool = True) -> DataLoader:
    """A loader over ``dataset`` whose batch order depends on the seed and the epoch only.

    ``shuffle=True`` (training): each batch of ``batch_size`` is split over the processes and into
    ``micro_batches`` micro-batches (default ``trainer.accumulate``; a method's own training loop
    passes 1). ``shuffle=False`` (evaluation): whole batches in order, process r taking every W-th.
    ``sharded=False``: all of the data in this process (the linear probe on rank 0)."""
    t = config.trainer
    num_shards, shard = (world_size(), rank()) if sharded else (1, 0)
    sampler = ShardedBatchSampler(
        len(dataset), t.batch_size, shuffle, seed=seed * 1_000_003 + 17, split=shuffle,
        num_shards=num_shards, shard=shard, micro_batches=t.accumulate if micro_batches is None else micro_batches,
    )
    # the loader's own generator only seeds its workers; the order comes from the sampler
    g = torch.Generator().manual_seed(seed * 1_000_003 + 17) if shuffle else None
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=t.num_workers, generator=g,
        pin_memory=device.type == "cuda",
    )


def loader_batches(loader: Iterable) -> Iterable:
    """The batches of ``loader``. A DataLoader that would only, in this process and without pinning, hand each
    batch of indices to a dataset that indexes a whole batch at once (``__getitems__``) and pass the result
    through ``collate`` is read without its iterator machinery: the same batches, in the same order, for less
    per-batch overhead (what small models at large batch notice). Any other loader is returned as it is."""
    if (isinstance(loader, DataLoader) and loader.num_workers == 0 and not loader.pin_memory
            and loader.batch_sampler is not None and loader.collate_fn is collate
            and callable(getattr(loader.dataset, "__getitems__", None))):
        dataset = loader.dataset
        return (collate(dataset.__getitems__(indices)) for indices in loader.batch_sampler)
    return loader


__all__ = ["build_model", "build_optimizer", "build_scheduler", "join_process_group", "loader_batches", "make_loader",
           "resolve_device", "run_device"]
