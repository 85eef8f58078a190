"""Fusion modules: per-modality features -> fused logits, plus unimodal logits for every modality.

Concat and sum fusion decompose exactly into per-modality logits. Gated, FiLM and MFB fusion do not, so
they carry auxiliary per-modality heads (one linear layer each) that give the unimodal logits; the
model trains those heads as probes on detached features, so they never steer the encoders unless a
method puts the unimodal logits in its loss.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from poise.errors import IncompatibleError
from poise.models.encoders import init_weights
from poise.registry import Registry


class Fusion(nn.Module):
    """Base class. ``forward(features)`` returns ``(fused_logits, unimodal_logits)``."""

    decomposable: bool = True
    #: the fusion treats every modality's features as points of one space (one head for all, or a sum of
    #: per-modality heads): the modality gap between them is meaningful and is logged
    shares_feature_space: bool = False
    #: the number of modalities the fusion combines (None: any)
    exact_modalities: int | None = None

    @classmethod
    def check_modalities(cls, name: str, modalities: tuple[str, ...]) -> None:
        if cls.exact_modalities is not None and len(modalities) != cls.exact_modalities:
            raise IncompatibleError(
                f"{name} fusion combines exactly two modalities, got {len(modalities)} ({', '.join(modalities)}); "
                "use concat, sum or shared for other counts"
            )

    def __init__(self, feature_dims: dict[str, int], num_classes: int):
        super().__init__()
        self.modalities = tuple(feature_dims)
        self.feature_dims = dict(feature_dims)
        self.num_classes = num_classes

    def forward(self, features: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def unimodal(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """Per-modality logits from per-modality features (used for unimodal reads and probes)."""
        raise NotImplementedError


class ConcatFusion(Fusion):
    """``Linear(sum d_m, C)`` on the concatenated features; ``z_m = h_m W[:, slice_m]^T + b / M``, so the
    fused logits are exactly the sum of the unimodal logits."""

    def __init__(self, feature_dims: dict[str, int], num_classes: int):
        super().__init__(feature_dims, num_classes)
        self.fc = nn.Linear(sum(feature_dims.values()), num_classes)
        init_weights(self)

    def _slices(self):
        start = 0
        for m in self.modalities:
            yield m, slice(start, start + self.feature_dims[m])
            start += self.feature_dims[m]

    def unimodal(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        bias = self.fc.bias / len(self.modalities)
        return {m: features[m] @ self.fc.weight[:, sl].T + bias for m, sl in self._slices() if m in features}

    def forward(self, features):
        fused = self.fc(torch.cat([features[m] for m in self.modalities], dim=1))
        return fused, self.unimodal(features)


class SumFusion(Fusion):
    """``sum_m fc_m(h_m)``; ``z_m = fc_m(h_m)`` with its full bias."""

    shares_feature_space = True

    def __init__(self, feature_dims: dict[str, int], num_classes: int):
        super().__init__(feature_dims, num_classes)
        self.fc = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in feature_dims.items()})
        init_weights(self)

    def unimodal(self, features):
        return {m: self.fc[m](h) for m, h in features.items()}

    def forward(self, features):
        uni = self.unimodal(features)
        return torch.stack([uni[m] for m in self.modalities]).sum(0), uni


class SharedHeadFusion(Fusion):
    """One linear head shared by every modality (MLA): ``z_m = g(h_m)``, fused = mean over modalities.
    All modalities must have the same feature size."""

    shares_feature_space = True

    def __init__(self, feature_dims: dict[str, int], num_classes: int):
        super().__init__(feature_dims, num_classes)
        dims = set(feature_dims.values())
        if len(dims) != 1:
            raise IncompatibleError(f"the shared head needs equal feature sizes for all modalities, got {feature_dims}")
        self.head = nn.Linear(dims.pop(), num_classes)
        init_weights(self)

    def unimodal(self, features):
        return {m: self.head(h) for m, h in features.items()}

    def forward(self, features):
        uni = self.unimodal(features)
        return torch.stack([uni[m] for m in self.modalities]).mean(0), uni


class _AuxiliaryHeads(Fusion):
    decomposable = False

    def __init__(self, feature_dims: dict[str, int], num_classes: int):
        super().__init__(feature_dims, num_classes)
        self.aux_heads = nn.ModuleDict({m: nn.Linear(d, num_classes) for m, d in feature_dims.items()})

    def unimodal(self, features):
        return {m: self.aux_heads[m](h) for m, h in features.items()}


def _two(name: str, feature_dims: dict[str, int]) -> tuple[str, str]:
    if len(feature_dims) != 2:
        raise IncompatibleError(
            f"{name} fusion combines exactly two modalities, got {len(feature_dims)} ({', '.join(feature_dims)}); "
            "use concat, sum or shared for other counts"
        )
    a, b = feature_dims
    return a, b


class GatedFusion(_AuxiliaryHeads):
    """``fc_out(sigmoid(fc_a(h_a)) * fc_b(h_b))``: the first modality gates the second."""

    exact_modalities = 2

    def __init__(self, feature_dims: dict[str, int], num_classes: int, hidden: int = 64):
        super().__init__(feature_dims, num_classes)
        self.gate_modality, self.value_modality = _two("gated", feature_dims)
        self.fc_gate = nn.Linear(feature_dims[self.gate_modality], hidden)
        self.fc_value = nn.Linear(feature_dims[self.value_modality], hidden)
        self.fc_out = nn.Linear(hidden, num_classes)
        init_weights(self)

    def forward(self, features):
        gate = torch.sigmoid(self.fc_gate(features[self.gate_modality]))
        fused = self.fc_out(gate * self.fc_value(features[self.value_modality]))
        return fused, self.unimodal(features)


class FiLMFusion(_AuxiliaryHeads):
    """``fc_out(gamma(h_a) * h_b + beta(h_a))``: the first modality conditions the second."""

    exact_modalities = 2

    def __init__(self, feature_dims: dict[str, int], num_classes: int):
        super().__init__(feature_dims, num_classes)
        self.cond_modality, self.value_modality = _two("film", feature_dims)
        d_value = feature_dims[self.value_modality]
        self.film = nn.Linear(feature_dims[self.cond_modality], 2 * d_value)
        self.fc_out = nn.Linear(d_value, num_classes)
        init_weights(self)

    def forward(self, features):
        gamma, beta = self.film(features[self.cond_modality]).chunk(2, dim=1)
        fused = self.fc_out(gamma * features[self.value_modality] + beta)
        return fused, self.unimodal(features)


def mfb_pool(projections: list[Tensor], factors: int, root_eps: float = 1e-8) -> Tensor:
    """Factorised bilinear pooling of per-modality projections, each (B, factors * out_dim).

    The element-wise product across modalities (for M modalities, the product of M projections: the
    low-rank form of an M-way multilinear pooling), sum pooling over each group of ``factors``
    consecutive entries, signed square root, then L2 normalisation. Returns (B, out_dim).

    Inside the signed square root ``|z|`` is floored at ``root_eps``: the exact root has an infinite
    derivative at 0, the floored one at most ``1 / (2 sqrt(root_eps))``; values change by less than
    ``sqrt(root_eps)`` and exact zeros stay zero.
    """
    product = projections[0]
    for p in projections[1:]:
        product = product * p
    batch, width = product.shape
    if width % factors:
        raise ValueError(f"projection width {width} is not a multiple of factors={factors}")
    pooled = product.view(batch, width // factors, factors).sum(dim=2)
    signed_root = torch.sign(pooled) * torch.sqrt(pooled.abs().clamp_min(root_eps))
    return nn.functional.normalize(signed_root, dim=1)


class MFBFusion(_AuxiliaryHeads):
    """Multi-modal factorised bilinear pooling (Yu et al., ICCV 2017) of two modalities (``mfb_pool`` and
    this module compute the M-modality product too, but a run refuses other counts: the method is defined
    and tested for pairs).

    Each modality's feature is projected to ``factors * output_dim`` dims; the projections are multiplied
    element-wise across modalities (two modalities: the paper's low-rank bilinear form; M modalities: a
    product of M projections), summed over the ``factors`` of each output unit, power-normalised (signed
    square root), L2-normalised, and classified by one linear layer. Dropout (paper: 0.1) acts on the
    product during training. Defaults: ``factors`` 5 as in the paper, ``output_dim`` 256 (paper: 1000,
    sized here for the small encoders of poise).

    A missing modality (zero feature) contributes its projection's bias to the product: zero at
    initialisation, so such samples start from the classifier's bias alone, then a learnt stand-in.
    (Starting the biases at 1, the product's identity, keeps the others' product for missing samples
    but buries the bilinear signal under a constant after normalisation: training barely moves.)
    Not decomposable: auxiliary per-modality heads give the unimodal logits.
    """

    exact_modalities = 2

    def __init__(self, feature_dims: dict[str, int], num_classes: int, factors: int = 5, output_dim: int = 256,
                 dropout: float = 0.1):
        super().__init__(feature_dims, num_classes)
        if factors < 1 or output_dim < 1:
            raise IncompatibleError(f"mfb fusion needs factors >= 1 and output_dim >= 1, got {factors} and {output_dim}")
        if not 0.0 <= dropout < 1.0:
            raise IncompatibleError(f"mfb fusion dropout must be in [0, 1), got {dropout}")
        self.factors, self.output_dim = factors, output_dim
        self.project = nn.ModuleDict({m: nn.Linear(d, factors * output_dim) for m, d in feature_dims.items()})
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(output_dim, num_classes)
        init_weights(self)

    def pooled(self, features: dict[str, Tensor]) -> Tensor:
        """The normalised (B, output_dim) bilinear representation, before the classifier."""
        projections = [self.project[m](features[m]) for m in self.modalities]
        if self.dropout.p > 0:
            # dropout on the product, as in the paper; masking one factor of it is the same operation
            projections[0] = self.dropout(projections[0])
        return mfb_pool(projections, self.factors)

    def forward(self, features):
        return self.classifier(self.pooled(features)), self.unimodal(features)


FUSIONS: Registry[type[Fusion]] = Registry(
    "fusion",
    {"concat": ConcatFusion, "sum": SumFusion, "shared": SharedHeadFusion, "gated": GatedFusion, "film": FiLMFusion,
     "mfb": MFBFusion},
)
