"""Encoders: one per modality, each mapping a batch of inputs to (B, feature_dim) features.

Initialisation follows the seed papers: Kaiming (fan-out, ReLU) for convolutions, Xavier for linear
layers.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from poise.data.base import ModalitySpec
from poise.errors import IncompatibleError
from poise.models.init import init_weights  # noqa: F401  (also importable from here)
from poise.registry import Registry


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
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.float())


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
        for i in range(depth):
            blocks += [
                nn.Conv2d(channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
            ]
            if i < depth - 1:
                blocks.append(nn.MaxPool2d(2, ceil_mode=True))
            channels, width = width, width * 2 if i < depth - 1 else width
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.project = nn.Sequential(nn.Linear(channels, feature_dim), nn.ReLU())
        self.feature_dim = feature_dim
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.features(x.float()))


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


from poise.models.resnet import ResNet18Encoder, TextEncoder, TransformerSequenceEncoder  # noqa: E402

ENCODERS: Registry[type[nn.Module]] = Registry(
    "encoder",
    {"mlp": MLPEncoder, "conv": ConvEncoder, "sequence": SequenceEncoder, "tokens": TokenEncoder,
     "resnet18": ResNet18Encoder, "transformer": TransformerSequenceEncoder, "text": TextEncoder},
)

DEFAULT_ENCODER = {"vector": "mlp", "sequence": "sequence", "image": "conv", "spectrogram": "conv", "tokens": "tokens",
                   "frames": "resnet18"}
