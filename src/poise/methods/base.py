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
and one batch. In a multi-process run every statistic that decides a coefficient or weight is reduced
across processes (``poise.train.distributed``), so that N processes decide as one would on the whole
batch. ``backward`` goes through ``ctx.backward``; a forward pass a method runs by itself goes under
``ctx.autocast()``. A resumed run re-enters an epoch through ``epoch_loader`` instead of
``on_epoch_start``; ``state_dict`` holds tensors and plain values only (checkpoints load with
``torch.load(weights_only=True)``).

A method declares what it needs (class attributes below) so that an incompatible combination fails
in ``check`` with one sentence, before any training. What it decides each step (ratios,
coefficients, weights) goes through ``record``; the trainer averages the records over each epoch and
logs them.
"""

from __future__ import annotations

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
    """Options of a method. Subclasses add fields; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class StepPlan:
    """What a method decides before the forward pass of a step.

    feature_scale: modality -> (B,) multipliers applied to that modality's features before fusion
                   (0 drops the modality for a sample: OPM, modality dropout); or a function
                   ``(features, unimodal_logits) -> multipliers`` that the model calls inside the forward,
                   on the features before any scaling (OPM's ratio from the training forward itself).
    """

    feature_scale: dict[str, Tensor] | Callable[[dict[str, Tensor], dict[str, Tensor]], dict[str, Tensor] | None] | None = None


class Method:
    name: ClassVar[str] = "method"
    Params: ClassVar[type[MethodParams]] = MethodParams
    #: fewest / most modalities the method supports (None: no upper bound)
    min_modalities: ClassVar[int] = 1
    max_modalities: ClassVar[int | None] = None
    #: fusion used when the configuration names none; ``fusions`` restricts the choice when set
    default_fusion: ClassVar[str] = "concat"
    fusions: ClassVar[tuple[str, ...] | None] = None
    #: the method reads ``output.unimodal_logits`` (every fusion provides them; kept for clarity)
    needs_unimodal_logits: ClassVar[bool] = False
    #: the method calls ``ctx.optimizer_step()`` itself inside ``backward`` (multi-step methods)
    owns_optimizer_step: ClassVar[bool] = False

    def __init__(self, params: MethodParams | dict[str, Any] | None = None, **kwargs: Any):
        if isinstance(params, MethodParams):
            self.params = params
        else:
            self.params = self.Params(**{**(params or {}), **kwargs})
        self._records: dict[str, list[Tensor]] = defaultdict(list)
        self.ctx: TrainContext | None = None

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

    def state_dict(self) -> dict[str, Any]:
        """Method state to checkpoint (tensors and plain values only)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
