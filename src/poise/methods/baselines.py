"""Baselines: joint training of the fused model, and one modality alone."""

from __future__ import annotations

from typing import ClassVar

from poise.errors import ConfigError, closest
from poise.methods.base import Method, MethodParams


class Joint(Method):
    """Cross-entropy on the fused logits: the naive multimodal baseline every paper starts from."""

    name = "joint"
    family = "baseline"


class UnimodalParams(MethodParams):
    modality: str


class Unimodal(Method):
    """One modality alone: its encoder and a linear head, trained with cross-entropy.
    Registered as ``unimodal:<modality>``."""

    name = "unimodal"
    family = "baseline"
    Params: ClassVar[type[MethodParams]] = UnimodalParams

    @property
    def spec(self) -> str:
        return f"unimodal:{self.params.modality}"

    def modalities(self, available):
        m = self.params.modality
        if m not in available:
            raise ConfigError(f"unknown modality '{m}' for unimodal{closest(m, available)}")
        return (m,)
