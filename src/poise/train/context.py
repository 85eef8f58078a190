"""What a method may use during a run: the model, the optimizer, the data and a few helpers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from poise.config import RunConfig
from poise.data.base import DatasetInfo, DataSplits
from poise.data.batch import MultimodalBatch
from poise.errors import PoiseError
from poise.train.engine import StepEngine

MASK_LEVELS = ("input", "feature")


@dataclass
class TrainContext:
    """What a method may use during a run.

    ``model`` is always the plain :class:`~poise.models.model.MultimodalModel` (``modality_parameters``,
    ``encode``, ``fusion``, ``modalities``), also in a multi-process run; the trainer's training forward
    goes through ``forward_module``, the DistributedDataParallel wrapper there. Methods backpropagate
    with ``backward(loss)`` and, when they own the optimizer step, step with ``optimizer_step()``: both
    handle mixed precision, gradient accumulation and the averaging of gradients across processes. A
    forward pass a method runs by itself during ``backward`` goes under ``autocast()``.

    Primitives for methods that need more than one loss per step: ``gradients`` (the gradients of one
    loss on a parameter group, from a graph other losses still use) and ``add_gradients``;
    ``masked_forward`` (the model with modalities zeroed at the input or at the features); ``set_phase``
    (a named training phase that freezes parameters; a resumed run restores it); ``snapshot`` and
    ``restore_snapshot`` (the weights of a parameter group at some point of the run, checkpointed).
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
    #: the run's step machinery (set by the trainer); None in a context built by hand: plain fp32 steps
    engine: StepEngine | None = None
    #: False in ``poise eval``: ``setup`` builds what ``predict`` and the state need and may skip
    #: training-only work (teachers, estimation runs)
    training: bool = True
    #: the training phase a method set with ``set_phase`` (None: none declared)
    phase: str | None = None
    #: parameters frozen by the phase: their gradients are dropped before every step
    frozen: list = field(default_factory=list)
    #: name -> weights saved by ``snapshot`` (checkpointed with the run)
    snapshots: dict[str, list[Tensor]] = field(default_factory=dict)

    @property
    def forward_module(self) -> nn.Module:
        """The module the training forward goes through (the DDP wrapper in a multi-process run)."""
        return self.engine.forward_module if self.engine is not None else self.model

    def autocast(self) -> AbstractContextManager:
        """The run's mixed-precision context (a no-op without ``trainer.amp``)."""
        return self.engine.autocast() if self.engine is not None else nullcontext()

    def backward(self, loss: Tensor, retain_graph: bool = False) -> None:
        """Backpropagate ``loss``: divided by ``trainer.accumulate``, scaled under fp16. For a method that
        owns the step the gradients are then final (averaged over ranks, unscaled) when this returns.
        A method that backpropagates more than once per step declares ``multiple_backward``."""
        if self.engine is not None:
            self.engine.backward(loss, retain_graph=retain_graph)
        else:
            loss.backward(retain_graph=retain_graph)

    def gradients(self, loss: Tensor, params: Iterable[nn.Parameter], retain_graph: bool = False) -> list[Tensor]:
        """The gradients of ``loss`` on ``params``: unscaled under fp16, averaged across processes (once,
        here), zeros for a parameter the loss does not reach; ``.grad`` is untouched. ``retain_graph=True``
        when other losses of the same forward are still to be differentiated or backpropagated."""
        params = list(params)
        if self.engine is not None:
            return self.engine.gradients(loss, params, retain_graph=retain_graph)
        grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]

    def add_gradients(self, params: Iterable[nn.Parameter], grads: Sequence[Tensor]) -> None:
        """Add gradients from ``gradients`` (or combined from several of its results) to this step's
        gradient, weighted by 1 / ``trainer.accumulate`` like ``backward``; not averaged again."""
        params = list(params)
        if self.engine is not None:
            self.engine.add_gradients(params, list(grads))
            return
        for p, g in zip(params, grads):
            p.grad = g.detach().clone() if p.grad is None else p.grad + g.detach()

    def masked_forward(self, batch: MultimodalBatch, drop: str | Sequence[str] | dict[str, Tensor],
                       level: str = "input", grad: bool = True) -> Any:
        """The model's output with modalities zeroed: ``drop`` names a modality or several (every sample),
        or maps modalities to (B,) masks (True or 1: zeroed for that sample). ``level="input"`` zeroes the
        modality's input tensor (its encoder sees zeros); ``"feature"`` zeroes its encoder's features before
        fusion (``output.unimodal_logits`` stay those of the unmasked features). ``grad=False`` runs without
        building a graph. The forward goes through the plain model under ``autocast()``, in the model's
        current train/eval mode; a method that backpropagates through it declares ``multiple_backward``."""
        if level not in MASK_LEVELS:
            raise PoiseError(f"masked_forward level '{level}' is not one of {', '.join(MASK_LEVELS)}")
        modalities = tuple(self.model.modalities)
        if isinstance(drop, str):
            drop = [drop]
        if not isinstance(drop, dict):
            drop = {m: torch.ones(len(batch), dtype=torch.bool, device=batch.labels.device) for m in drop}
        for m, mask in drop.items():
            if m not in modalities:
                raise PoiseError(f"masked_forward: the model has no modality '{m}' (it has {', '.join(modalities)})")
            if mask.shape != (len(batch),):
                raise PoiseError(f"masked_forward: the mask of modality '{m}' has shape {tuple(mask.shape)}, "
                                 f"expected ({len(batch)},): one value per sample")
        if grad and self.engine is not None and self.engine.ddp and not self.engine.manual_average:
            raise PoiseError("masked_forward with gradients in a multi-process run needs the method to declare "
                             "multiple_backward = True (its gradients are then averaged once, at the step)")
        keep = {m: 1.0 - mask.float() for m, mask in drop.items()}
        feature_scale = None
        if level == "input":
            inputs = {}
            for m, x in batch.inputs.items():
                if m in keep:
                    x = x * keep[m].view(-1, *([1] * (x.dim() - 1))).to(x.dtype)
                inputs[m] = x
            batch = replace(batch, inputs=inputs)
        else:
            feature_scale = keep
        with (torch.enable_grad() if grad else torch.no_grad()), self.autocast():
            return self.model(batch, feature_scale=feature_scale)

    # ---- phases and snapshots ------------------------------------------------------------------------
    def _all_parameters(self) -> list[nn.Parameter]:
        own = {id(p) for p in self.model.parameters()}
        extra = [p for g in self.optimizer.param_groups for p in g["params"] if id(p) not in own]
        return list(self.model.parameters()) + extra

    def set_phase(self, name: str, frozen: Iterable[nn.Parameter] = ()) -> None:
        """Enter training phase ``name``: the parameters in ``frozen`` (and only those) get no gradient
        and no optimizer update (weight decay and momentum included) until the next phase. The method's
        ``loss`` may read ``ctx.phase``; a resumed run continues in the phase it was in."""
        self.phase = name
        self.frozen[:] = list(frozen)

    def phase_state(self) -> dict[str, Any]:
        index = {id(p): i for i, p in enumerate(self._all_parameters())}
        return {"name": self.phase, "frozen": [index[id(p)] for p in self.frozen]}

    def load_phase_state(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        params = self._all_parameters()
        self.phase = state["name"]
        self.frozen[:] = [params[i] for i in state["frozen"]]

    def snapshot(self, name: str, params: Iterable[nn.Parameter]) -> list[Tensor]:
        """Keep a copy of the current values of ``params`` under ``name`` (taken in ``setup``: the initial
        weights; in ``on_epoch_end``: that epoch's), for re-initialisation or proximal terms."""
        self.snapshots[name] = [p.detach().clone() for p in params]
        return self.snapshots[name]

    def restore_snapshot(self, name: str, params: Iterable[nn.Parameter]) -> None:
        """Copy the values saved under ``name`` back into ``params`` (the same parameters, in the same order)."""
        if name not in self.snapshots:
            raise PoiseError(f"no snapshot named '{name}' (there are: {', '.join(self.snapshots) or 'none'})")
        params = list(params)
        saved = self.snapshots[name]
        if len(params) != len(saved) or any(p.shape != s.shape for p, s in zip(params, saved)):
            raise PoiseError(f"snapshot '{name}' holds {len(saved)} tensors that do not match the {len(params)} "
                             "parameters given")
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)

    def optimizer_step(self) -> None:
        """Check, clip (when configured), step and zero the gradients: for methods that own the step."""
        if self.engine is not None:
            self.engine.optimizer_step()
            return
        for p in self.frozen:
            p.grad = None
        clip = self.config.trainer.grad_clip
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
