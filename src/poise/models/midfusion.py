"""Mid-fusion modules: they act between the stages of the encoders (``StagedEncoder``), before the
features reach the fusion head.

``mmtm``: the multimodal transfer module (Joze et al., CVPR 2020) after each of the last ``stages`` stages
of every encoder (stages are aligned from the end: encoders of different depths meet at their last
stages). Defaults: ``stages`` = all but the first stage of the shallowest encoder (the greedy paper's
ResNet-18 places MMTM after layers 2, 3 and 4), bottleneck width ``2 * sum(C_m) / ratio`` with ``ratio``
4 (the released MMTM and greedy code), ``gate_scale`` 2 (the paper's ``2 sigmoid``; the greedy repository
uses 1).

It keeps the sample-weighted mean of every gate over the training forwards (buffers, checkpointed with
the model): ``cut`` names modalities whose gates are replaced by that mean, so that no information from
the other modalities reaches their branch (the greedy method's re-balancing steps). With
``reduce_gate_sums`` (set by a method that reads the means) and several processes, every training
forward adds the gate sums of all processes' samples, so each process keeps the mean over the whole
batch, as one process would.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch import distributed as dist

from poise.errors import IncompatibleError
from poise.functional.greedy import mmtm
from poise.models.encoders import is_staged
from poise.models.init import init_weights
from poise.registry import Registry


class MMTM(nn.Module):
    """One transfer module over the maps of every modality at one stage."""

    def __init__(self, channels: dict[str, int], ratio: float = 4.0, gate_scale: float = 2.0):
        super().__init__()
        total = sum(channels.values())
        self.modalities = tuple(channels)
        self.gate_scale = gate_scale
        self.squeeze = nn.Linear(total, max(1, int(2 * total / ratio)))
        self.excite = nn.ModuleDict({m: nn.Linear(self.squeeze.out_features, c) for m, c in channels.items()})
        for m, c in channels.items():
            self.register_buffer(f"gate_sum_{m}", torch.zeros(c))
        self.register_buffer("gate_count", torch.zeros(()))

    def mean_gate(self, modality: str) -> Tensor:
        """The mean gate of ``modality`` over the training forwards so far (1 before any: the identity)."""
        count = self.gate_count
        total = getattr(self, f"gate_sum_{modality}")
        return torch.where(count > 0, total / count.clamp_min(1), torch.ones_like(total))

    def forward(self, maps: dict[str, Tensor], present: dict[str, Tensor] | None = None,
                cut: tuple[str, ...] = (), reduce_gate_sums: bool = False) -> dict[str, Tensor]:
        order = self.modalities
        fixed = {i: self.mean_gate(m) for i, m in enumerate(order) if m in cut}
        gated, gates = mmtm(
            [maps[m] for m in order], self.squeeze.weight, self.squeeze.bias,
            [self.excite[m].weight for m in order], [self.excite[m].bias for m in order], self.gate_scale,
            present=[None if present is None else present[m] for m in order], fixed_gates=fixed,
        )
        if self.training and not cut:
            with torch.no_grad():
                sums = [g.detach().float().sum(0) for g in gates]
                count: Tensor | int = gates[0].shape[0]
                if reduce_gate_sums and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                    flat = torch.cat([*sums, sums[0].new_full((1,), count)])
                    dist.all_reduce(flat)
                    *sums, total = flat.split([*(s.numel() for s in sums), 1])
                    count = total[0]
                for m, s in zip(order, sums):
                    getattr(self, f"gate_sum_{m}").add_(s)
                self.gate_count.add_(count)
        return dict(zip(order, gated))


class MMTMFusion(nn.Module):
    """MMTM after each of the last ``stages`` stages of the encoders. ``cut``: modalities whose branch
    gets no information from the others in the next forwards (their gates are the running means)."""

    def __init__(self, encoders: dict[str, nn.Module], stages: int | None = None, ratio: float = 4.0,
                 gate_scale: float = 2.0):
        super().__init__()
        counts = {m: len(e.stage_channels) for m, e in encoders.items()}
        shallowest = min(counts.values())
        stages = max(1, shallowest - 1) if stages is None else stages
        if not 1 <= stages <= shallowest:
            raise IncompatibleError(f"model.mid_fusion_options.stages must be between 1 and {shallowest} (the "
                                    f"stages of the shallowest encoder), got {stages}")
        if ratio <= 0 or gate_scale <= 0:
            raise IncompatibleError(f"mmtm needs ratio > 0 and gate_scale > 0, got {ratio} and {gate_scale}")
        self.stages = stages
        self.counts = counts
        self.modules_by_stage = nn.ModuleList(
            MMTM({m: encoders[m].stage_channels[counts[m] - stages + j] for m in encoders}, ratio, gate_scale)
            for j in range(stages)
        )
        self.cut: tuple[str, ...] = ()
        #: add every process's gate sums in each training forward (a collective: set only where every
        #: process runs the same training forwards, as a method's training steps do)
        self.reduce_gate_sums = False
        init_weights(self)

    def excitation_parameters(self, modality: str) -> list[nn.Parameter]:
        """The parameters that carry the others' information into ``modality``'s branch alone."""
        return [p for module in self.modules_by_stage for p in module.excite[modality].parameters()]

    def shared_parameters(self) -> list[nn.Parameter]:
        """The squeeze layers, shared by every modality's gates."""
        return [p for module in self.modules_by_stage for p in module.squeeze.parameters()]

    def encode(self, encoders: dict[str, nn.Module], inputs: dict[str, Tensor],
               present: dict[str, Tensor]) -> dict[str, Tensor]:
        """Every encoder's features, the encoders run stage by stage with MMTM after the fused stages."""
        maps = {}
        for m, x in inputs.items():
            h = x
            for i in range(self.counts[m] - self.stages):
                h = encoders[m].stage(i, h)
            maps[m] = h
        for j, module in enumerate(self.modules_by_stage):
            maps = {m: encoders[m].stage(self.counts[m] - self.stages + j, h) for m, h in maps.items()}
            maps = module(maps, present, self.cut, self.reduce_gate_sums)
        return {m: encoders[m].readout(h) for m, h in maps.items()}


def build_mmtm(encoders: dict[str, nn.Module], **options) -> MMTMFusion:
    for m, encoder in encoders.items():
        if not is_staged(encoder):
            raise IncompatibleError(
                f"the mmtm mid-fusion needs encoders that expose their intermediate feature maps, and modality "
                f"'{m}' uses {type(encoder).__name__}, which does not (mlp, conv, sequence, tokens and resnet18 do)"
            )
    return MMTMFusion(encoders, **options)


MID_FUSIONS: Registry[Callable[..., nn.Module]] = Registry("mid-fusion", {"mmtm": build_mmtm})

__all__ = ["MID_FUSIONS", "MMTM", "MMTMFusion", "build_mmtm"]
