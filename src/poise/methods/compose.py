"""Methods that act at different points of the step, run together: ``ogm_ge+modality_dropout`` masks
features in ``on_step_start`` (modality dropout) and edits gradients in ``after_backward`` (OGM-GE).

Each hook that acts on the training (the loader, the step's feature masks, the loss terms, the
backward, the gradient edits, the test-time fusion) may be taken by one part only; two parts that both
act at one point are refused at construction with one sentence. Set-up, checks and ``on_epoch_end`` run
for every part, in order. Each part keeps its own options, records and state (saved under its name).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from poise.errors import IncompatibleError
from poise.methods.base import Method, StepPlan

if TYPE_CHECKING:
    from torch import Tensor
    from torch.utils.data import DataLoader

    from poise.data.base import DatasetInfo
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput
    from poise.train.context import TrainContext

#: hook -> what a method that overrides it acts on
ACTS_ON = {
    "on_epoch_start": "the epoch's loader (resampling)",
    "on_step_start": "the step's feature masks",
    "loss": "the loss terms",
    "backward": "the backward pass",
    "after_backward": "the gradients",
    "predict": "the test-time fusion",
    "modalities": "the modalities trained on",
}


def acts_on(method: Method, hook: str) -> bool:
    return method.acts_at(hook)


class Combined(Method):
    """Several methods as one: see the module's description."""

    def __init__(self, parts: list[Method]):
        super().__init__()
        if len(parts) < 2:
            raise IncompatibleError("a combination needs at least two methods, as in 'ogm_ge+modality_dropout'")
        names = [p.name for p in parts]
        if len(set(names)) != len(names):
            raise IncompatibleError(f"'{'+'.join(names)}' names a method twice")
        self.parts = parts
        self.name = "+".join(names)  # type: ignore[misc]
        families = list(dict.fromkeys(getattr(p, "family", "unclassified") for p in parts))
        self.family = " + ".join(families)  # type: ignore[misc]
        self._owner: dict[str, Method | None] = {}
        for hook, what in ACTS_ON.items():
            owners = [p for p in parts if acts_on(p, hook)]
            if len(owners) > 1:
                raise IncompatibleError(f"methods '{owners[0].name}' and '{owners[1].name}' both act on {what} "
                                        f"({hook}), so they cannot run together")
            self._owner[hook] = owners[0] if owners else None
        self.min_modalities = max(p.min_modalities for p in parts)  # type: ignore[misc]
        bounds = [p.max_modalities for p in parts if p.max_modalities is not None]
        self.max_modalities = min(bounds) if bounds else None  # type: ignore[misc]
        self.owns_optimizer_step = any(p.owns_optimizer_step for p in parts)  # type: ignore[misc]
        self.multiple_backward = any(p.multiple_backward for p in parts)  # type: ignore[misc]
        self.partial_graph = any(p.partial_graph for p in parts)  # type: ignore[misc]
        self.per_batch_decisions = all(p.per_batch_decisions for p in parts)  # type: ignore[misc]
        fusions = [set(p.fusions) for p in parts if p.fusions is not None]
        if fusions:
            common = set.intersection(*fusions)
            if not common:
                raise IncompatibleError(f"methods {' and '.join(repr(n) for n in names)} need different fusions "
                                        f"({'; '.join(', '.join(sorted(f)) for f in fusions)})")
            self.fusions = tuple(sorted(common))  # type: ignore[misc]
        defaults = {p.default_fusion for p in parts if p.default_fusion != Method.default_fusion}
        if len(defaults) > 1:
            raise IncompatibleError(f"methods {' and '.join(repr(n) for n in names)} default to different fusions "
                                    f"({', '.join(sorted(defaults))}); set model.fusion")
        self.default_fusion = defaults.pop() if defaults else Method.default_fusion  # type: ignore[misc]

    def _call(self, hook: str, *args: Any, default: Any = None) -> Any:
        owner = self._owner[hook]
        return getattr(owner, hook)(*args) if owner is not None else default

    # ---- start-up --------------------------------------------------------------------------------
    def modalities(self, available: tuple[str, ...]) -> tuple[str, ...]:
        return self._call("modalities", available, default=available)

    def check(self, info: DatasetInfo, modalities: tuple[str, ...], fusion: str) -> None:
        super().check(info, modalities, fusion)
        for p in self.parts:
            p.check(info, modalities, fusion)

    def per_batch_decision(self) -> str | None:
        reasons = [f"{p.name} {r}" for p in self.parts if (r := p.per_batch_decision()) is not None]
        return "; ".join(reasons) or None

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        for p in self.parts:
            p.setup(ctx)

    # ---- training --------------------------------------------------------------------------------
    def on_epoch_start(self, epoch: int, loader: DataLoader) -> DataLoader | None:
        return self._call("on_epoch_start", epoch, loader)

    def epoch_loader(self, epoch: int, loader: DataLoader) -> DataLoader | None:
        owner = self._owner["on_epoch_start"]
        return owner.epoch_loader(epoch, loader) if owner is not None else None

    def on_step_start(self, batch: MultimodalBatch) -> StepPlan | None:
        return self._call("on_step_start", batch)

    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        owner = self._owner["loss"]
        return owner.loss(output, batch) if owner is not None else super().loss(output, batch)

    def backward(self, terms: dict[str, Tensor], output: ModelOutput, batch: MultimodalBatch) -> None:
        owner = self._owner["backward"]
        if owner is not None:
            owner.backward(terms, output, batch)
        else:
            super().backward(terms, output, batch)

    def after_backward(self, output: ModelOutput, batch: MultimodalBatch) -> None:
        self._call("after_backward", output, batch)

    def on_epoch_end(self, epoch: int) -> None:
        for p in self.parts:
            p.on_epoch_end(epoch)

    def predict(self, output: ModelOutput, batch: MultimodalBatch) -> Tensor:
        owner = self._owner["predict"]
        return owner.predict(output, batch) if owner is not None else super().predict(output, batch)

    # ---- records and state -----------------------------------------------------------------------
    def pop_records(self) -> dict[str, float]:
        """Every part's records; a name that several parts record is prefixed with each part's name."""
        out = super().pop_records()
        by_part = [(p.name, p.pop_records()) for p in self.parts]
        seen: dict[str, int] = {}
        for _, records in by_part:
            for k in records:
                seen[k] = seen.get(k, 0) + 1
        for name, records in by_part:
            out.update({(f"{name}/{k}" if seen[k] > 1 else k): v for k, v in records.items()})
        return out

    def records_state(self) -> dict[str, Tensor]:
        return {f"{p.name}/{k}": v for p in self.parts for k, v in p.records_state().items()}

    def load_records_state(self, state: dict[str, Tensor], device: Any = None) -> None:
        for p in self.parts:
            prefix = f"{p.name}/"
            p.load_records_state({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, device)

    def state_dict(self) -> dict[str, Any]:
        return {p.name: p.state_dict() for p in self.parts}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for p in self.parts:
            p.load_state_dict(state.get(p.name, {}))


__all__ = ["ACTS_ON", "Combined", "acts_on"]
