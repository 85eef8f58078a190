"""The multimodal model: per-modality encoders + fusion (which holds the head)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from poise.data.base import DatasetInfo
from poise.data.batch import MultimodalBatch
from poise.errors import ConfigError, closest
from poise.models.encoders import DEFAULT_ENCODER, ENCODERS
from poise.models.fusion import FUSIONS, Fusion


@dataclass
class ModelOutput:
    """features: modality -> (B, d_m) encoder output (before any feature scaling);
    unimodal_logits: modality -> (B, C); logits: (B, C) fused;
    probe_logits: modality -> (B, C) auxiliary-head logits on detached features (only for fusions
    with auxiliary heads; the trainer trains those heads on them)."""

    features: dict[str, Tensor]
    unimodal_logits: dict[str, Tensor]
    logits: Tensor
    probe_logits: dict[str, Tensor] = field(default_factory=dict)


#: per-modality (B,) feature multipliers, or a function of the unscaled features and unimodal logits that gives them
FeatureScale = dict[str, Tensor] | Callable[[dict[str, Tensor], dict[str, Tensor]], dict[str, Tensor] | None]


class MultimodalModel(nn.Module):
    """``mid_fusion`` (optional): a module that runs the encoders together, acting between their stages
    (``poise.models.midfusion``, e.g. MMTM); its parameters count with the head's."""

    def __init__(self, encoders: dict[str, nn.Module], fusion: Fusion, mid_fusion: nn.Module | None = None):
        super().__init__()
        self.encoders = nn.ModuleDict(encoders)
        self.fusion = fusion
        self.mid_fusion = mid_fusion
        self.modalities = tuple(encoders)

    def modality_parameters(self, modality: str) -> list[nn.Parameter]:
        """The parameters of one modality's encoder (an explicit group; never chosen by name)."""
        return list(self.encoders[modality].parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        mid = list(self.mid_fusion.parameters()) if self.mid_fusion is not None else []
        return list(self.fusion.parameters()) + mid

    def encode(self, batch: MultimodalBatch, modalities: tuple[str, ...] | None = None) -> dict[str, Tensor]:
        """Encoder features, zeroed for samples where the modality is missing."""
        features = {}
        columns = batch.modalities
        present = {m: batch.present[:, columns.index(m)] for m in self.modalities}
        encoded = None
        if self.mid_fusion is not None:  # every encoder runs: the mid-fusion mixes them
            encoded = self.mid_fusion.encode(self.encoders, {m: batch.inputs[m] for m in self.modalities}, present)
        # a batch held on the CPU with every modality present skips the masks: h * 1 is h, bit for bit
        # (values and gradients); elsewhere reading the mask would wait for the device
        complete = batch.present.device.type == "cpu" and bool(batch.present.all())
        for m in modalities or self.modalities:
            h = encoded[m] if encoded is not None else self.encoders[m](batch.inputs[m])
            features[m] = h if complete else h * present[m].unsqueeze(1).to(h.dtype)
        return features

    def forward(self, batch: MultimodalBatch, feature_scale: FeatureScale | None = None) -> ModelOutput:
        """``feature_scale``: modality -> (B,) multipliers of the features before fusion, or a function
        ``(features, unimodal_logits) -> multipliers`` that decides them from this forward's own features."""
        features = self.encode(batch)
        unimodal = None
        if callable(feature_scale):
            unimodal = self.fusion.unimodal(features)
            feature_scale = feature_scale(features, unimodal)
        fused_in = features
        if feature_scale:
            fused_in = {
                m: h * feature_scale[m].view(-1, 1).to(h.dtype) if m in feature_scale else h for m, h in features.items()
            }
        logits, fused_unimodal = self.fusion(fused_in)
        if not feature_scale:
            unimodal = fused_unimodal
        elif unimodal is None:
            unimodal = self.fusion.unimodal(features)
        probe = {}
        if not self.fusion.decomposable:
            probe = self.fusion.unimodal({m: h.detach() for m, h in features.items()})
        return ModelOutput(features=features, unimodal_logits=unimodal, logits=logits, probe_logits=probe)


def build_model(
    info: DatasetInfo,
    modalities: tuple[str, ...],
    fusion: str,
    feature_dim: int = 64,
    encoders: dict[str, str] | None = None,
    encoder_options: dict[str, dict] | None = None,
    fusion_options: dict[str, Any] | None = None,
    mid_fusion: str | None = None,
    mid_fusion_options: dict[str, Any] | None = None,
) -> MultimodalModel:
    """Encoders chosen by each modality's kind unless named in ``encoders``; all produce ``feature_dim``.
    ``fusion_options`` are keyword arguments of the fusion's constructor; ``mid_fusion`` names a module of
    ``poise.models.midfusion`` (None: none), ``mid_fusion_options`` its keyword arguments."""
    encoders = dict(encoders or {})
    for m in encoders:
        if m not in info.modalities:
            raise ConfigError(f"model.encoders names unknown modality '{m}'{closest(m, info.modalities)}")
    modules = {}
    for m in modalities:
        spec = info.modalities[m]
        cls = ENCODERS[encoders.get(m, DEFAULT_ENCODER[spec.kind])]
        modules[m] = cls(spec, feature_dim, **(encoder_options or {}).get(m, {}))
    fusion_cls = FUSIONS[fusion]
    fusion_cls.check_modalities(fusion, modalities)
    valid = [p for p in inspect.signature(fusion_cls.__init__).parameters if p not in ("self", "feature_dims", "num_classes")]
    for key in fusion_options or {}:
        if key not in valid:
            hint = closest(key, valid) if valid else " (it takes none)"
            raise ConfigError(f"model.fusion_options: fusion '{fusion}' has no option '{key}'{hint}")
    fusion_module = fusion_cls({m: feature_dim for m in modalities}, info.num_classes, **(fusion_options or {}))
    mid = None
    if mid_fusion is not None:
        from poise.models.midfusion import MID_FUSIONS, MMTMFusion

        builder = MID_FUSIONS[mid_fusion]
        valid = [p for p in inspect.signature(MMTMFusion.__init__).parameters if p not in ("self", "encoders")]
        for key in mid_fusion_options or {}:
            if key not in valid:
                raise ConfigError(f"model.mid_fusion_options: mid-fusion '{mid_fusion}' has no option '{key}'"
                                  f"{closest(key, valid)}")
        mid = builder(modules, **(mid_fusion_options or {}))
    return MultimodalModel(modules, fusion_module, mid)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["FeatureScale", "ModelOutput", "MultimodalModel", "build_model", "count_parameters"]
