"""CML (Ma et al., ICML 2023, "Calibrating Multimodal Learning"), in BalanceBenchmark's form (the original
repository was not found): the modalities are removed one at a time, in an order drawn each epoch, from the
fused prediction (their features zeroed before the fusion, so the encoders run once); every prediction
adds its cross-entropy, and a prediction from fewer modalities that is more confident than the one before
it is penalised."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor
from torch.utils.data import DataLoader

from poise.config import FloatRange
from poise.functional.cml import cml_confidence_penalty, removal_chain
from poise.methods.base import Method, MethodParams
from poise.train.distributed import all_reduce_sum, world_size

if TYPE_CHECKING:
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput
    from poise.train.context import TrainContext

_ORDER_STREAM = 6_151


class CMLParams(MethodParams):
    lam: float = Field(0.1, ge=0, description="lambda, the weight of the confidence penalty (BalanceBenchmark 0.1)")
    hinge: Literal["batch", "sample"] = Field(
        "batch",
        description="batch: max(0, sum over the batch of conf_fewer - conf_more) (BalanceBenchmark); sample: the sum "
        "over the batch of max(0, conf_fewer - conf_more), each sample's own hinge",
    )
    modulation_starts: int = Field(0, ge=0, description="first epoch with the partial predictions (inclusive)")
    modulation_ends: int = Field(1_000_000, ge=0, description="last epoch with the partial predictions (inclusive)")

    @model_validator(mode="after")
    def _window(self) -> CMLParams:
        if self.modulation_ends < self.modulation_starts:
            raise ValueError(f"modulation_ends ({self.modulation_ends}) is before modulation_starts ({self.modulation_starts})")
        return self

    tunable = {"lam": FloatRange(0.01, 1.0, log=True)}


class CML(Method):
    """Loss ``[CE(full) + sum_k CE(partial_k)] / M + lam * sum_k penalty(partial_{k-1}, partial_k)``, with
    ``partial_0`` the full prediction and ``partial_k`` the one after k removals (M - 1 of them)."""

    name = "cml"
    family = "losses"
    Params: ClassVar[type[MethodParams]] = CMLParams
    min_modalities = 2
    params: CMLParams

    def __init__(self, params: MethodParams | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self._modalities: tuple[str, ...] = ()

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        self._modalities = tuple(ctx.model.modalities)
        self.add_state("order_generator", torch.Generator().manual_seed(ctx.seed * 1_000_003 + _ORDER_STREAM))
        self.add_state("order", list(self._modalities))

    def per_batch_decision(self) -> str | None:
        return "takes the hinge of its confidence penalty on sums"

    def on_epoch_start(self, epoch: int, loader: DataLoader) -> DataLoader | None:
        permutation = torch.randperm(len(self._modalities), generator=self.order_generator).tolist()
        self.order = [self._modalities[i] for i in permutation]
        return None

    def active(self, epoch: int) -> bool:
        return self.params.modulation_starts <= epoch <= self.params.modulation_ends

    def partial_logits(self, output: ModelOutput, kept: tuple[str, ...]) -> Tensor:
        """The fused logits with every modality but ``kept`` zeroed at the features."""
        assert self.ctx is not None
        features = {m: h if m in kept else torch.zeros_like(h) for m, h in output.features.items()}
        with self.ctx.autocast():
            logits, _ = self.ctx.model.fusion(features)
        return logits

    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        assert self.ctx is not None, "setup() must run before training"
        ce = F.cross_entropy(output.logits, batch.labels)
        if not self.active(self.ctx.epoch):
            return {"ce": ce}
        reference = output.logits
        penalty = output.logits.new_zeros((), dtype=torch.float32)
        for kept in removal_chain(self.order):
            partial = self.partial_logits(output, kept)
            ce = ce + F.cross_entropy(partial, batch.labels)
            penalty = penalty + cml_confidence_penalty(reference, partial, self.params.hinge, reduce=all_reduce_sum,
                                                       processes=world_size())
            reference = partial
        self.record("penalty", all_reduce_sum(penalty.detach()) / world_size())
        return {"ce": ce / len(self._modalities), "confidence": self.params.lam * penalty}
