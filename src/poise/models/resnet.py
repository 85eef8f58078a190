"""The encoders of the seed papers' released code, written in plain PyTorch (no torchvision here).

``resnet18``: ResNet-18 trained from scratch. The input channels follow the modality: 1 for audio
spectrograms (1, F, T), 3 for an image (3, H, W), C per frame for a stack of frames (T, C, H, W) --
3 for RGB, 2 for optical flow (u, v). Frames are folded into the batch, run through the 2-D trunk
one by one, then pooled over time and space together with a 3-D adaptive average pool to 512-d,
as in OGM-GE's ``AVClassifier``.

``transformer``: a transformer encoder over pre-extracted feature sequences (T, D).

``text``: token ids (T,) -> embedding -> transformer (or GRU) -> mean over the non-padding tokens.

Every encoder ends in ``feature_dim`` features: a linear projection is added only where
``feature_dim`` differs from the trunk's width (512 for ResNet-18), so that ``feature_dim: 512``
gives exactly the released architecture. Kaiming (fan-out) init for convolutions, Xavier for
linear layers, BatchNorm at weight 1 / bias 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from poise.data.base import ModalitySpec
from poise.errors import IncompatibleError
from poise.models.init import init_weights

RESNET18_WIDTH = 512


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + identity)


class ResNet18Trunk(nn.Module):
    """conv 7x7/2 - BN - ReLU - maxpool 3/2 - four stages of two basic blocks (64, 128, 256, 512);
    no pooling and no classifier: (N, C, H, W) -> (N, 512, H/32, W/32)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        stages = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def _projection(width: int, feature_dim: int) -> nn.Module:
    return nn.Identity() if feature_dim == width else nn.Sequential(nn.Linear(width, feature_dim), nn.ReLU())


class ResNet18Encoder(nn.Module):
    """ResNet-18 for spectrograms (1, F, T), images (C, H, W) and frame stacks (T, C, H, W)."""

    def __init__(self, spec: ModalitySpec, feature_dim: int):
        super().__init__()
        if spec.kind == "frames" and len(spec.shape) == 4:
            in_channels = spec.shape[1]
        elif spec.kind in ("image", "spectrogram") and len(spec.shape) == 3:
            in_channels = spec.shape[0]
        else:
            raise IncompatibleError(
                "the resnet18 encoder needs a spectrogram (1, F, T), an image (C, H, W) or frames (T, C, H, W), "
                f"got a {spec.kind} of per-sample shape {spec.shape}"
            )
        self.frames = spec.kind == "frames"
        self.trunk = ResNet18Trunk(in_channels)
        self.project = _projection(RESNET18_WIDTH, feature_dim)
        self.feature_dim = feature_dim
        init_weights(self.project)

    def forward(self, x: Tensor) -> Tensor:
        x = x.float()
        if not self.frames:
            return self.project(F.adaptive_avg_pool2d(self.trunk(x), 1).flatten(1))
        b, t = x.shape[:2]
        maps = self.trunk(x.reshape(b * t, *x.shape[2:]))  # frames folded into the batch
        maps = maps.view(b, t, *maps.shape[1:]).transpose(1, 2)  # (B, 512, T, h, w)
        return self.project(F.adaptive_avg_pool3d(maps, 1).flatten(1))

    #: the four residual stages (the stem runs with the first); frame stacks give (B, C, T, h, w) maps
    stage_channels = (64, 128, 256, 512)

    def stage(self, index: int, h: Tensor) -> Tensor:
        trunk = self.trunk
        t = (h.shape[1] if index == 0 else h.shape[2]) if self.frames else 1
        if self.frames:  # frames folded into the batch
            h = h.reshape(-1, *h.shape[2:]) if index == 0 else h.transpose(1, 2).reshape(-1, h.shape[1], *h.shape[3:])
        if index == 0:
            h = trunk.layer1(trunk.maxpool(F.relu(trunk.bn1(trunk.conv1(h.float())))))
        else:
            h = (trunk.layer2, trunk.layer3, trunk.layer4)[index - 1](h)
        return h.view(-1, t, *h.shape[1:]).transpose(1, 2) if self.frames else h

    def readout(self, h: Tensor) -> Tensor:
        return self.project((F.adaptive_avg_pool3d if self.frames else F.adaptive_avg_pool2d)(h, 1).flatten(1))


class SinusoidalPositions(nn.Module):
    """Fixed sine/cosine position codes (Vaswani et al.), added to the inputs; any length up to ``max_len``."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        position = torch.arange(max_len).unsqueeze(1)
        div = torch.exp(torch.arange(0, dim, 2) * (-math.log(10000.0) / dim))
        table = torch.zeros(max_len, dim)
        table[:, 0::2] = torch.sin(position * div)
        table[:, 1::2] = torch.cos(position * div[: dim // 2])
        self.register_buffer("table", table, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.table[: x.shape[1]]


def _transformer(d_model: int, heads: int, layers: int, dropout: float) -> nn.TransformerEncoder:
    if d_model % heads:
        raise IncompatibleError(f"the transformer width d_model={d_model} must be a multiple of heads={heads}")
    layer = nn.TransformerEncoderLayer(d_model, heads, dim_feedforward=4 * d_model, dropout=dropout, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def _masked_mean(h: Tensor, keep: Tensor) -> Tensor:
    keep = keep.unsqueeze(2).to(h.dtype)
    return (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)


class TransformerSequenceEncoder(nn.Module):
    """Feature sequences (T, D): linear input projection, sine positions, a transformer encoder, mean
    over time. Rows that are all zero (a missing modality, zero-filled) are pooled over every step."""

    def __init__(self, spec: ModalitySpec, feature_dim: int, d_model: int = 64, heads: int = 4, layers: int = 2,
                 dropout: float = 0.1):
        super().__init__()
        if len(spec.shape) != 2:
            raise IncompatibleError(f"the transformer encoder needs (time, dim) inputs, got per-sample shape {spec.shape}")
        self.input = nn.Linear(spec.shape[1], d_model)
        self.positions = SinusoidalPositions(d_model, spec.shape[0])
        self.encoder = _transformer(d_model, heads, layers, dropout)
        self.project = nn.Sequential(nn.Linear(d_model, feature_dim), nn.ReLU())
        self.feature_dim = feature_dim
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        h = self.encoder(self.positions(self.input(x.float())))
        return self.project(h.mean(dim=1))


class TextEncoder(nn.Module):
    """Token ids (T,), 0 for padding: embedding, then a transformer encoder (``rnn: transformer``) or
    a bidirectional GRU (``rnn: gru``), mean over the non-padding tokens, projection.
    A row with no token at all (a missing text, zero-filled) reads its first position so that the
    attention never sees an all-masked row."""

    def __init__(self, spec: ModalitySpec, feature_dim: int, embed_dim: int = 128, heads: int = 4, layers: int = 2,
                 dropout: float = 0.1, rnn: str = "transformer"):
        super().__init__()
        if spec.vocab_size is None or len(spec.shape) != 1:
            raise IncompatibleError(
                f"the text encoder needs token ids (T,) with a vocabulary size, got per-sample shape {spec.shape} "
                f"and vocabulary {spec.vocab_size}"
            )
        if rnn not in ("transformer", "gru"):
            raise IncompatibleError(f"text encoder rnn must be 'transformer' or 'gru', got '{rnn}'")
        self.embed = nn.Embedding(spec.vocab_size, embed_dim, padding_idx=0)
        self.rnn = rnn
        if rnn == "transformer":
            self.positions = SinusoidalPositions(embed_dim, spec.shape[0])
            self.encoder = _transformer(embed_dim, heads, layers, dropout)
            width = embed_dim
        else:
            self.encoder = nn.GRU(embed_dim, embed_dim, num_layers=layers, batch_first=True, bidirectional=True,
                                  dropout=dropout if layers > 1 else 0.0)
            width = 2 * embed_dim
        self.project = nn.Sequential(nn.Linear(width, feature_dim), nn.ReLU())
        self.feature_dim = feature_dim
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        tokens = x.long()
        keep = tokens != 0
        empty = ~keep.any(dim=1)
        if bool(empty.any()):
            keep = keep.clone()
            keep[empty, 0] = True
        h = self.embed(tokens)
        if self.rnn == "transformer":
            h = self.encoder(self.positions(h), src_key_padding_mask=~keep)
        else:
            h, _ = self.encoder(h)
        return self.project(_masked_mean(h, keep))


__all__ = ["ResNet18Encoder", "ResNet18Trunk", "TextEncoder", "TransformerSequenceEncoder"]
