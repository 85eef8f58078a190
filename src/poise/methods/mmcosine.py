"""MMCosine (Xu et al., ICASSP 2023): the concat head's logits replaced by a scaled sum of per-modality
cosine similarities, so that no modality wins through the norm of its features or weights."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from poise.config import FloatRange
from poise.functional.cosine import cosine_logits
from poise.methods.base import Method, MethodParams

if TYPE_CHECKING:
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput
    from poise.train.context import TrainContext


class MMCosineParams(MethodParams):
    scale: float = Field(10.0, gt=0, description="s: the cosine logits' scale (released README 10; BalanceBenchmark 15)")
    predict: Literal["cosine", "linear"] = Field(
        "cosine",
        description="cosine: evaluate with the cosine logits the model is trained on (paper); linear: the plain "
        "concat head's logits, as the released valid() scores the fused accuracy",
    )

    tunable = {"scale": FloatRange(5.0, 30.0, log=True)}


class MMCosine(Method):
    """Fused logits ``s * sum_m cos(x_m, W_m[k])`` (no bias), ``W_m`` modality m's slice of the concat head."""

    name = "mmcosine"
    family = "losses"
    Params: ClassVar[type[MethodParams]] = MMCosineParams
    min_modalities = 2
    fusions = ("concat",)

    def __init__(self, params: MethodParams | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self._modalities: tuple[str, ...] = ()

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        self._modalities = tuple(ctx.model.modalities)
        # the cosine logits have no bias: the head's bias is fixed at zero, so that it takes no gradient
        # (a parameter without one would also stall a multi-process run)
        bias = ctx.model.fusion.fc.bias
        with torch.no_grad():
            bias.zero_()
        bias.requires_grad_(False)

    def _logits(self, output: ModelOutput) -> Tensor:
        assert self.ctx is not None, "setup() must run before training"
        fusion = self.ctx.model.fusion
        weights = {m: fusion.fc.weight[:, sl] for m, sl in fusion._slices()}
        features = {m: output.features[m] for m in self._modalities}
        return cosine_logits(features, weights, self.params.scale)

    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        logits = self._logits(output)
        fusion = self.ctx.model.fusion
        for m, sl in fusion._slices():
            # mean cosine with the true class over the present samples: how well m separates alone
            rows = batch.present_of(m).float()
            cos = F.normalize(output.features[m].detach().float(), dim=1) @ F.normalize(
                fusion.fc.weight[:, sl].detach().float(), dim=1).T
            true = cos.gather(1, batch.labels.view(-1, 1)).squeeze(1)
            self.record(f"cos_true/{m}", (true * rows).sum() / rows.sum().clamp_min(1))
        return {"ce": F.cross_entropy(logits.float(), batch.labels)}

    def predict(self, output: ModelOutput, batch: MultimodalBatch) -> Tensor:
        if self.params.predict == "linear":
            return output.logits
        return self._logits(output)
