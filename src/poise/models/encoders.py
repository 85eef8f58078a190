"""Encoders: one per modality, each mapping a batch of inputs to (B, feature_dim) features.

Initialisation follows the seed papers: Kaiming (fan-out, ReLU) for convolutions, Xavier for linear
layers.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor, nn

from poise.data.base import ModalitySpec
from poise.errors import IncompatibleError
from poise.models.init import init_weights  # noqa: F401  (also importable from here)
from poise.registry import Registry


class StagedEncoder(Protocol):
    """An encoder that exposes its intermediate feature maps, for mid-fusion modules (MMTM) that act between
    the stages of several encoders: ``forward(x) == readout(stage(n - 1, ... stage(1, stage(0, x))))``.

    ``stage_channels[i]``: the channels C_i of the map that ``stage(i, h)`` returns, shaped (B, C_i, *positions)
    (no positions for vector layers). ``stage(0, x)`` takes the raw input; ``readout`` maps the last stage's
    map to the (B, feature_dim) features."""

    stage_channels: tuple[int, ...]

    def stage(self, index: int, h: Tensor) -> Tensor: ...

    def readout(self, h: Tensor) -> Tensor: ...


def is_staged(encoder: nn.Module) -> bool:
    """Whether ``encoder`` implements :class:`StagedEncoder`."""
    return all(hasattr(encoder, name) for name in ("stage_channels", "stage", "readout"))


class MLPEncoder(nn.Module):
    """Flattens any per-sample shape and applies Linear-ReLU layers."""

    def __init__(self, spec: ModalitySpec, feature_dim: int, hidden: int = 128, depth: int = 2):
        super().__init__()
        in_dim = math.prod(spec.shape)
        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden] * (depth - 1) + [feature_dim]
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(nn.Flatten(), *layers)
        self.feature_dim = feature_dim
        #: stage i is the i-th Linear-ReLU layer (stage 0 also flattens); its map is the (B, width) vector
        self.stage_channels = tuple(dims[1:])
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.float())

    def stage(self, index: int, h: Tensor) -> Tensor:
        if index == 0:
            return self.net[2](self.net[1](self.net[0](h.float())))
        return self.net[2 * index + 2](self.net[2 * index + 1](h))

    def readout(self, h: Tensor) -> Tensor:
        return h


class ConvEncoder(nn.Module):
    """A small 2-D CNN for images (C, H, W) and spectrograms (1, F, T): conv-BN-ReLU blocks, the
    spatial size halved after every block but the first, global average pooling, then a linear
    projection to ``feature_dim``."""

    def __init__(self, spec: ModalitySpec, feature_dim: int, hidden: int = 32, depth: int = 3):
        super().__init__()
        if len(spec.shape) != 3:
            raise IncompatibleError(
                f"the conv encoder needs (channels, height, width) inputs, got per-sample shape {spec.shape}"
            )
        channels = spec.shape[0]
        blocks: list[nn.Module] = []
        width = hidden
        bounds, widths = [], []
        for i in range(depth):
            start = len(blocks)
            blocks += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
            if i < depth - 1:
                blocks.append(nn.MaxPool2d(2, ceil_mode=True))
            bounds.append((start, len(blocks)))
            widths.append(width)
            channels, width = width, width * 2 if i < depth - 1 else width
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.project = nn.Sequential(nn.Linear(channels, feature_dim), nn.ReLU())
        self.feature_dim = feature_dim
        #: stage i is block i (conv-BN-ReLU and its max-pool); a per-channel gate commutes with the max-pool
        self.stage_channels = tuple(widths)
        self._stage_bounds = tuple(bounds)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.features(x.float()))

    def stage(self, index: int, h: Tensor) -> Tensor:
        if index == 0:
            h = h.float()
        start, end = self._stage_bounds[index]
        for i in range(start, end):
            h = self.features[i](h)
        return h

    def readout(self, h: Tensor) -> Tensor:
        return self.project(self.features[-1](self.features[-2](h)))


class SequenceEncoder(nn.Module):
    """A one-layer GRU over (T, D) sequences, mean-pooled over time, projected to ``feature_dim``."""

    def __init__(self, spec: ModalitySpec, feature_dim: int, hidden: int = 64):
        super().__init__()
        if len(spec.shape) != 2:
            raise IncompatibleError(f"the sequence encoder needs (time, dim) inputs, got per-sample shape {spec.shape}")
        self.rnn = nn.GRU(spec.shape[1], hidden, batch_first=True)
        self.project = nn.Sequential(nn.Linear(hidden, feature_dim), nn.ReLU())
        self.feature_dim = feature_dim
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x.float())
        return self.project(out.mean(dim=1))

    #: one stage: the GRU's outputs as a (B, hidden, T) map
    @property
    def stage_channels(self) -> tuple[int, ...]:
        return (self.rnn.hidden_size,)

    def stage(self, index: int, h: Tensor) -> Tensor:
        return self.rnn(h.float())[0].transpose(1, 2)

    def readout(self, h: Tensor) -> Tensor:
        return self.project(h.mean(dim=2))


class TokenEncoder(nn.Module):
    """Token ids (T,) -> embedding -> 1-D convolution -> max-pool over time -> ``feature_dim``.
    Token 0 is padding."""

    def __init__(self, spec: ModalitySpec, feature_dim: int, hidden: int = 64, embed_dim: int = 32):
        super().__init__()
        if spec.vocab_size is None:
            raise IncompatibleError("the token encoder needs a vocabulary size in the modality spec")
        self.embed = nn.Embedding(spec.vocab_size, embed_dim, padding_idx=0)
        self.conv = nn.Conv1d(embed_dim, hidden, 3, padding=1)
        self.project = nn.Sequential(nn.Linear(hidden, feature_dim), nn.ReLU())
        self.feature_dim = feature_dim
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.conv(self.embed(x.long()).transpose(1, 2)))
        return self.project(h.amax(dim=2))

    #: one stage: the convolution's (B, hidden, T) map
    @property
    def stage_channels(self) -> tuple[int, ...]:
        return (self.conv.out_channels,)

    def stage(self, index: int, h: Tensor) -> Tensor:
        return torch.relu(self.conv(self.embed(h.long()).transpose(1, 2)))

    def readout(self, h: Tensor) -> Tensor:
        return self.project(h.amax(dim=2))


from poise.models.resnet import ResNet18Encoder, TextEncoder, TransformerSequenceEncoder  # noqa: E402

ENCODERS: Registry[type[nn.Module]] = Registry(
    "encoder",
    {"mlp": MLPEncoder, "conv": ConvEncoder, "sequence": SequenceEncoder, "tokens": TokenEncoder,
     "resnet18": ResNet18Encoder, "transformer": TransformerSequenceEncoder, "text": TextEncoder},
)

DEFAULT_ENCODER = {"vector": "mlp", "sequence": "sequence", "image": "conv", "spectrogram": "conv", "tokens": "tokens",
                   "frames": "resnet18"}
