"""What a method may use during a run: the model, the optimizer, the data and a few helpers."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from poise.config import RunConfig
from poise.data.base import DatasetInfo, DataSplits
from poise.train.engine import StepEngine


@dataclass
class TrainContext:
    """What a method may use during a run.

    ``model`` is always the plain :class:`~poise.models.model.MultimodalModel` (``modality_parameters``,
    ``encode``, ``fusion``, ``modalities``), also in a multi-process run; the trainer's training forward
    goes through ``forward_module``, the DistributedDataParallel wrapper there. Methods backpropagate
    with ``backward(loss)`` and, when they own the optimizer step, step with ``optimizer_step()``: both
    handle mixed precision, gradient accumulation and the averaging of gradients across processes. A
    forward pass a method runs by itself during ``backward`` goes under ``autocast()``.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: RunConfig
    info: DatasetInfo
    splits: DataSplits
    device: torch.device
    seed: int
    #: ``make_loader(dataset, shuffle, micro_batches=None)``: the run's loaders (sharded over processes;
    #: shuffled ones split each batch into ``trainer.accumulate`` micro-batches unless ``micro_batches``
    #: says otherwise: a method's own training loop passes 1)
    make_loader: Callable[..., DataLoader]
    #: builds a fresh model of the same architecture (G-Blend's estimation copies, teachers)
    build_model: Callable[..., nn.Module]
    #: builds an optimizer of the configured kind over the given parameters
    build_optimizer: Callable[[list], torch.optim.Optimizer]
    epoch: int = 0
    #: training batches (micro-batches) seen so far in the run
    step: int = 0
    extras: dict = field(default_factory=dict)
    #: the run's step machinery (set by the trainer); None in a context built by hand: plain fp32 steps
    engine: StepEngine | None = None

    @property
    def forward_module(self) -> nn.Module:
        """The module the training forward goes through (the DDP wrapper in a multi-process run)."""
        return self.engine.forward_module if self.engine is not None else self.model

    def autocast(self) -> AbstractContextManager:
        """The run's mixed-precision context (a no-op without ``trainer.amp``)."""
        return self.engine.autocast() if self.engine is not None else nullcontext()

    def backward(self, loss: Tensor) -> None:
        """Backpropagate ``loss``: divided by ``trainer.accumulate``, scaled under fp16. For a method that
        owns the step the gradients are then final (averaged over ranks, unscaled) when this returns."""
        if self.engine is not None:
            self.engine.backward(loss)
        else:
            loss.backward()

    def optimizer_step(self) -> None:
        """Check, clip (when configured), step and zero the gradients: for methods that own the step."""
        if self.engine is not None:
            self.engine.optimizer_step()
            return
        clip = self.config.trainer.grad_clip
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
