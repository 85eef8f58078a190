"""The Method base class: a small object whose hooks the trainer calls in one fixed order.

Per run:    check(info, modalities, fusion) -> setup(ctx)
Per epoch:  on_epoch_start(epoch, loader) -> [per step] -> on_epoch_end(epoch)
Per step:   [per micro-batch: on_step_start(batch) -> model(batch, plan.feature_scale) -> loss(output, batch)
            -> backward(terms, output, batch)] -> gradients averaged over processes and unscaled
            -> after_backward(output, batch) -> finiteness check -> gradient clipping -> optimizer step
            (unless the method owns it)
Evaluation: model(batch) -> predict(output, batch)

With ``trainer.accumulate`` = 1 (the default) a step has one micro-batch. With more, ``after_backward``
sees the accumulated gradient once per step, with the step's micro-batches concatenated into one output
and one batch; a method that decides something from each batch before that (``per_batch_decision``)
refuses ``accumulate`` > 1, since it would decide once per micro-batch. In a multi-process run every statistic that decides a coefficient or weight is reduced
across processes (``poise.train.distributed``), so that N processes decide as one would on the whole
batch. ``backward`` goes through ``ctx.backward``; a forward pass a method runs by itself goes under
``ctx.autocast()``. A resumed run re-enters an epoch through ``epoch_loader`` instead of
``on_epoch_start``; ``state_dict`` holds tensors and plain values only (checkpoints load with
``torch.load(weights_only=True)``).

State: a method declares what it keeps across steps with ``add_state(name, default, reduce=...,
persistent=...)`` (in ``__init__`` or in ``setup``, the way a torchmetrics metric does); the base class
saves it (``state_dict``), loads it (``load_state_dict``) and reduces it across processes
(``reduce_state``). ``setup`` always runs before ``load_state_dict`` (in training, on resume, when the best
epoch is loaded back and in ``poise eval``), so state created in ``setup`` (generators seeded from the
run's seed, heads sized by the model) exists when it is loaded.

A method declares what it needs (class attributes below) so that an incompatible combination fails
in ``check`` with one sentence, before any training. What it decides each step (ratios,
coefficients, weights) goes through ``record``; the trainer averages the records over each epoch and
logs them.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from poise.errors import IncompatibleError

if TYPE_CHECKING:
    from torch.utils.data import DataLoader

    from poise.data.base import DatasetInfo
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput
    from poise.train.context import TrainContext


class MethodParams(BaseModel):
    """Options of a method. Subclasses add fields; unknown keys are refused. ``tunable`` declares the
    options ``poise tune`` searches and their ranges (:class:`poise.config.FloatRange`, ``IntRange``,
    ``Choice``), keyed by field name."""

    model_config = ConfigDict(extra="forbid")

    tunable: ClassVar[dict[str, Any]] = {}


@dataclass
class StepPlan:
    """What a method decides before the forward pass of a step.

    feature_scale: modality -> (B,) multipliers applied to that modality's features before fusion
                   (0 drops the modality for a sample: OPM, modality dropout); or a function
                   ``(features, unimodal_logits) -> multipliers`` that the model calls inside the forward,
                   on the features before any scaling (OPM's ratio from the training forward itself).
    """

    feature_scale: dict[str, Tensor] | Callable[[dict[str, Tensor], dict[str, Tensor]], dict[str, Tensor] | None] | None = None


#: what a method acts on, which groups the methods in the reports' tables (``baseline``: joint, unimodal)
FAMILIES = ("baseline", "gradients", "losses", "features", "data", "architecture", "test-time fusion")


class Method:
    name: ClassVar[str] = "method"
    #: one of ``FAMILIES``; every registered method declares it (the conformance test checks it)
    family: ClassVar[str]
    Params: ClassVar[type[MethodParams]] = MethodParams
    #: fewest / most modalities the method supports (None: no upper bound)
    min_modalities: ClassVar[int] = 1
    max_modalities: ClassVar[int | None] = None
    #: fusion used when the configuration names none; ``fusions`` restricts the choice when set
    default_fusion: ClassVar[str] = "concat"
    fusions: ClassVar[tuple[str, ...] | None] = None
    #: mid-fusion (``poise.models.midfusion``) used when ``model.mid_fusion`` is unset
    default_mid_fusion: ClassVar[str | None] = None
    #: the method calls ``ctx.optimizer_step()`` itself inside ``backward`` (multi-step methods)
    owns_optimizer_step: ClassVar[bool] = False
    #: the method backpropagates more than once per step (``ctx.backward`` several times, ``ctx.gradients``,
    #: a backward through ``ctx.masked_forward``): gradients are then averaged across processes once, at
    #: the step, instead of by DistributedDataParallel during the backward
    multiple_backward: ClassVar[bool] = False
    #: some trainable parameters take no part in a step's loss (a branch trained alone, gates held fixed, a
    #: stage that trains only a head): gradients are then averaged across processes at the step, as for
    #: ``multiple_backward``, since DistributedDataParallel's reduction waits for every parameter
    partial_graph: ClassVar[bool] = False
    #: every decision is made once per step from the step's whole batch (``after_backward``), so that
    #: accumulating micro-batches changes none of them (the conformance test checks it)
    per_batch_decisions: ClassVar[bool] = False

    @classmethod
    def family_for(cls, options: dict[str, Any]) -> str:
        """The family of this method with ``options`` (its ``method.<name>`` options as a run records them):
        ``family`` unless what the method acts on depends on an option."""
        return cls.family

    def __init__(self, params: MethodParams | dict[str, Any] | None = None, **kwargs: Any):
        if isinstance(params, MethodParams):
            self.params = params
        else:
            self.params = self.Params(**{**(params or {}), **kwargs})
        self._records: dict[str, list[Tensor]] = defaultdict(list)
        self._states: dict[str, StateSpec] = {}
        self.ctx: TrainContext | None = None

    @property
    def spec(self) -> str:
        """The name ``make_method`` builds this method from (``unimodal:<modality>`` for the baseline)."""
        return self.name

    # ---- start-up --------------------------------------------------------------------------------
    def modalities(self, available: tuple[str, ...]) -> tuple[str, ...]:
        """The modalities this method trains on (default: all the dataset has)."""
        return available

    def check(self, info: DatasetInfo, modalities: tuple[str, ...], fusion: str) -> None:
        """Refuse an incompatible set-up with one clear sentence (raise IncompatibleError)."""
        n = len(modalities)
        if n < self.min_modalities:
            raise IncompatibleError(f"method '{self.name}' needs at least {self.min_modalities} modalities, the data has {n}")
        if self.max_modalities is not None and n > self.max_modalities:
            raise IncompatibleError(f"method '{self.name}' supports at most {self.max_modalities} modalities, the data has {n}")
        if self.fusions is not None and fusion not in self.fusions:
            raise IncompatibleError(f"method '{self.name}' works with fusion {' or '.join(self.fusions)}, not '{fusion}'")

    def per_batch_decision(self) -> str | None:
        """What the method decides from each batch it sees before the optimizer step (a coin, a ratio
        read ahead of the forward, a teacher), in words; None when it decides nothing from a single
        batch, or only in ``after_backward``, which sees the whole step. Under ``trainer.accumulate`` > 1
        such a decision would be taken once per micro-batch, so the trainer refuses the set-up."""
        return None

    def acts_at(self, hook: str) -> bool:
        """Whether the method acts on the training at ``hook`` (a combination refuses two methods that act
        at the same hook). Default: the hook is overridden; a method whose options choose where it acts
        (``modulate``'s actuator) says so itself."""
        return getattr(type(self), hook) is not getattr(Method, hook)

    def setup(self, ctx: TrainContext) -> None:
        self.ctx = ctx

    # ---- training --------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, loader: DataLoader) -> DataLoader | None:
        """Return a different loader for this epoch (resampling), or None to keep it."""
        return None

    def on_step_start(self, batch: MultimodalBatch) -> StepPlan | None:
        return None

    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        """Named loss terms; the default backward sums them."""
        return {"ce": F.cross_entropy(output.logits, batch.labels)}

    def backward(self, terms: dict[str, Tensor], output: ModelOutput, batch: MultimodalBatch) -> None:
        """Backpropagate the loss through ``ctx.backward`` (mixed-precision scaling, accumulation,
        gradient averaging across processes); a method that overrides this does the same."""
        values = list(terms.values())
        loss = values[0] if len(values) == 1 else torch.stack(values).sum()
        if self.ctx is not None:
            self.ctx.backward(loss)
        else:
            loss.backward()

    def after_backward(self, output: ModelOutput, batch: MultimodalBatch) -> None:
        """Edit gradients in place (OGM, AGM, ...) before the optimizer step."""

    def on_epoch_end(self, epoch: int) -> None:
        pass

    def epoch_loader(self, epoch: int, loader: DataLoader) -> DataLoader | None:
        """The loader of an epoch that a resumed run re-enters in its middle: ``on_epoch_start`` ran
        before the checkpoint and is not called again, so a method whose ``on_epoch_start`` returns a
        loader of its own returns that same loader here (None: the trainer's)."""
        return None

    # ---- evaluation ------------------------------------------------------------------------------
    def predict(self, output: ModelOutput, batch: MultimodalBatch) -> Tensor:
        """Test-time fused logits (dynamic fusion methods override)."""
        return output.logits

    # ---- records and state -----------------------------------------------------------------------
    def record(self, name: str, value: Tensor | float) -> None:
        """Remember one value decided this step; kept as a tensor so the hot path never syncs."""
        if isinstance(value, Tensor):
            value = value.detach().float().reshape(())
        else:
            value = torch.tensor(float(value))
        self._records[name].append(value)

    def pop_records(self) -> dict[str, float]:
        """Mean of each recorded value since the last call."""
        out = {k: float(torch.stack([v.cpu() for v in vs]).mean()) for k, vs in self._records.items() if vs}
        self._records.clear()
        return out

    def records_state(self) -> dict[str, Tensor]:
        """The values recorded since the last ``pop_records``, one stacked CPU tensor per name (checkpoints)."""
        return {k: torch.stack([v.cpu() for v in vs]) for k, vs in self._records.items() if vs}

    def load_records_state(self, state: dict[str, Tensor], device: torch.device | str | None = None) -> None:
        """Replace the pending records by those of ``records_state``."""
        self._records.clear()
        for k, values in state.items():
            self._records[k] = list(values.to(device).unbind(0) if device is not None else values.unbind(0))

    # ---- declared state --------------------------------------------------------------------------
    def add_state(self, name: str, default: Any, reduce: str | Callable[[Tensor], Tensor] | None = None,
                  persistent: bool = True) -> Any:
        """Declare ``self.<name>`` as method state, set to ``default`` (returned).

        ``default``: a tensor, a ``torch.Generator`` or a plain value (number, string, list, dict of those).
        ``reduce``: how ``reduce_state`` combines the ranks' values: ``"sum"``, ``"mean"``, ``"max"``,
        ``"min"``, ``"cat"`` (along dimension 0) or a function of the local tensor that returns the reduced
        one; None: every rank keeps its own. ``persistent``: saved by ``state_dict``. Loading keeps the
        object: a tensor of the same shape is copied in place and a generator gets the saved state, so other
        references to it see the loaded value."""
        if reduce is not None and not callable(reduce) and reduce not in STATE_REDUCTIONS:
            raise ValueError(f"state '{name}' of method '{self.name}': reduce must be one of "
                             f"{', '.join(STATE_REDUCTIONS)} or a function, not '{reduce}'")
        if reduce is not None and not isinstance(default, Tensor):
            raise ValueError(f"state '{name}' of method '{self.name}': only tensor state can be reduced across processes")
        self._states[name] = StateSpec(_copy_state(default), reduce, persistent)
        setattr(self, name, default)
        return default

    def reset_state(self, *names: str) -> None:
        """Set the named states (all when none is named) back to their defaults."""
        for name in names or tuple(self._states):
            default, current = self._states[name].default, getattr(self, name)
            if isinstance(current, torch.Generator):
                current.set_state(default)
            else:
                setattr(self, name, _copy_state(default))

    def reduce_state(self, *names: str) -> None:
        """Replace the named states (all reducible ones when none is named) by their reduction over the
        processes of the run (nothing changes in one process)."""
        from poise.train.distributed import all_gather_cat, all_reduce_mean, all_reduce_sum, is_distributed

        if not is_distributed():
            return
        import torch.distributed as dist

        reducers = {"sum": all_reduce_sum, "mean": all_reduce_mean, "cat": all_gather_cat}
        for name in names or tuple(self._states):
            spec = self._states[name]
            if spec.reduce is None:
                continue
            value = getattr(self, name)
            if callable(spec.reduce):
                value = spec.reduce(value)
            elif spec.reduce in reducers:
                value = reducers[spec.reduce](value)
            else:
                value = value.clone()
                dist.all_reduce(value, op=dist.ReduceOp.MAX if spec.reduce == "max" else dist.ReduceOp.MIN)
            setattr(self, name, value)

    def state_dict(self) -> dict[str, Any]:
        """Method state to checkpoint (tensors and plain values only): every persistent declared state;
        a method with state of another kind adds it to this dictionary."""
        out: dict[str, Any] = {}
        for name, spec in self._states.items():
            if spec.persistent:
                value = getattr(self, name)
                out[name] = value.get_state() if isinstance(value, torch.Generator) else _copy_state(value)
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load what ``state_dict`` saved. Runs after ``setup``; a declared state missing from ``state``
        (a checkpoint of an older version) keeps its current value."""
        for name, spec in self._states.items():
            if not spec.persistent or name not in state:
                continue
            current, saved = getattr(self, name), state[name]
            if isinstance(current, torch.Generator):
                current.set_state(saved)
            elif isinstance(current, Tensor) and isinstance(saved, Tensor) and current.shape == saved.shape:
                with torch.no_grad():
                    current.copy_(saved.to(current.device, current.dtype))
            elif isinstance(saved, Tensor):
                device = current.device if isinstance(current, Tensor) else None
                setattr(self, name, saved.detach().clone().to(device) if device is not None else saved.detach().clone())
            else:
                setattr(self, name, copy.deepcopy(saved))


STATE_REDUCTIONS = ("sum", "mean", "max", "min", "cat")


@dataclass
class StateSpec:
    """One declared piece of method state (see ``Method.add_state``)."""

    default: Any
    reduce: str | Callable[[Tensor], Tensor] | None
    persistent: bool


def _copy_state(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, torch.Generator):
        return value.get_state()  # a generator's default is its starting state
    return copy.deepcopy(value)
