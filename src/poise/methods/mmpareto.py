"""MMPareto (Wei & Hu, ICML 2024): each encoder's gradient is the Pareto integration of the gradients of
the fused loss and of its own unimodal loss: their average when they agree (positive cosine), MGDA's
min-norm combination when they conflict, with the magnitude of their sum kept."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from poise.config import FloatRange
from poise.functional.pareto import pareto_combine, pareto_weights
from poise.functional.losses import present_cross_entropy
from poise.methods.base import Method, MethodParams

if TYPE_CHECKING:
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput
    from poise.train.context import TrainContext


class MMParetoParams(MethodParams):
    magnitude: Literal["encoder", "tensor", "none"] = Field(
        "encoder",
        description="encoder: the combined gradient keeps at least the norm of the summed gradient over the whole "
        "encoder; tensor: tensor by tensor, as the released code does; none: 2 (a_1 g_mm + a_2 g_m) as it is",
    )
    gamma: float = Field(1.0, gt=0, description="multiplier of the encoder gradients (the released code hard-codes 1.5)")

    tunable = {"gamma": FloatRange(0.5, 2.0, log=True)}


class MMPareto(Method):
    """Losses ``CE(fused)`` and ``CE(head_m(h_m))`` on a unimodal linear head per modality (the method's
    own); the encoders get the Pareto-integrated gradient, every other parameter the summed one."""

    name = "mmpareto"
    family = "gradients"
    Params: ClassVar[type[MethodParams]] = MMParetoParams
    min_modalities = 2
    multiple_backward = True

    def __init__(self, params: MethodParams | dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(params, **kwargs)
        self._modalities: tuple[str, ...] = ()
        self.heads: nn.ModuleDict | None = None

    def setup(self, ctx: TrainContext) -> None:
        super().setup(ctx)
        model = ctx.model
        self._modalities = tuple(model.modalities)
        torch.manual_seed(ctx.seed * 1_000_003 + 7_307)  # the heads' initialisation depends on the run's seed only
        self.heads = nn.ModuleDict({m: nn.Linear(model.fusion.feature_dims[m], ctx.info.num_classes)
                                    for m in self._modalities}).to(ctx.device)
        for m, head in self.heads.items():
            self.add_state(f"head_{m}_weight", head.weight)
            self.add_state(f"head_{m}_bias", head.bias)
        ctx.optimizer.add_param_group({"params": list(self.heads.parameters())})

    def per_batch_decision(self) -> str | None:
        return "combines each encoder's fused and unimodal gradients with Pareto weights"

    def loss(self, output: ModelOutput, batch: MultimodalBatch) -> dict[str, Tensor]:
        assert self.heads is not None, "setup() must run before training"
        terms = {"ce": F.cross_entropy(output.logits, batch.labels)}
        for m in self._modalities:
            terms[f"ce_{m}"] = present_cross_entropy(self.heads[m](output.features[m]), batch.labels, batch.present_of(m))
        return terms

    def backward(self, terms: dict[str, Tensor], output: ModelOutput, batch: MultimodalBatch) -> None:
        ctx = self.ctx
        assert ctx is not None, "setup() must run before training"
        model = ctx.model
        encoders = {m: [p for p in model.modality_parameters(m) if p.requires_grad] for m in self._modalities}
        in_encoders = {id(p) for ps in encoders.values() for p in ps}
        rest = [p for g in ctx.optimizer.param_groups for p in g["params"] if p.requires_grad and id(p) not in in_encoders]
        flat = [p for m in self._modalities for p in encoders[m]]
        # M + 2 gradient computations on one graph: the fused loss on every encoder, each unimodal loss on
        # its own encoder, the summed loss on everything else
        g_multi = ctx.gradients(terms["ce"], flat, retain_graph=True)
        combined: list[Tensor] = []
        start = 0
        for m in self._modalities:
            params = encoders[m]
            gm = g_multi[start:start + len(params)]
            start += len(params)
            gu = ctx.gradients(terms[f"ce_{m}"], params, retain_graph=True)
            vm = torch.cat([g.reshape(-1) for g in gm])
            vu = torch.cat([g.reshape(-1) for g in gu])
            weights = pareto_weights(vm, vu)
            combined += pareto_combine(gm, gu, weights, self.params.magnitude, self.params.gamma)
            cos = torch.dot(vm.float(), vu.float()) / (vm.float().norm() * vu.float().norm()).clamp_min(1e-12)
            self.record(f"cos/{m}", cos)
            self.record(f"weight_uni/{m}", weights[1])
            self.record(f"conflict/{m}", float(weights != (0.5, 0.5)))
        total = torch.stack(list(terms.values())).sum()
        g_rest = ctx.gradients(total, rest) if rest else []
        ctx.add_gradients(flat + rest, combined + g_rest)
