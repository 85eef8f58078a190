import math

import pytest
import torch
import torch.nn.functional as F

from conftest import synthetic
from poise.data import DatasetInfo, ModalitySpec, MultimodalBatch
from poise.errors import ConfigError, IncompatibleError
from poise.methods import Method
from poise.models import FUSIONS, build_model
from poise.models.fusion import MFBFusion, mfb_pool
from poise.train import Trainer


def naive_mfb(projections: list[torch.Tensor], factors: int) -> torch.Tensor:
    """Explicit loops: z_ij = sum_f prod_m p_m[i, j*k + f], signed root, L2 norm per sample."""
    b, width = projections[0].shape
    out = torch.zeros(b, width // factors, dtype=torch.float64)
    for i in range(b):
        for j in range(width // factors):
            total = 0.0
            for f in range(factors):
                term = 1.0
                for p in projections:
                    term *= float(p[i, j * factors + f])
                total += term
            out[i, j] = math.copysign(math.sqrt(abs(total)), total)
        out[i] /= out[i].norm()
    return out


@pytest.mark.parametrize("num_modalities", [2, 3])
def test_mfb_pool_matches_naive_loops(num_modalities):
    g = torch.Generator().manual_seed(num_modalities)
    projections = [torch.randn(4, 6 * 3, generator=g) for _ in range(num_modalities)]
    assert torch.allclose(mfb_pool(projections, factors=3).double(), naive_mfb(projections, 3), atol=1e-5)


def test_two_modality_mfb_is_a_rank_k_bilinear_form():
    # with zero biases, z_j = h_a^T (sum_f u_jf v_jf^T) h_b: the low-rank bilinear pooling of the paper
    torch.manual_seed(0)
    fusion = MFBFusion({"a": 5, "b": 7}, num_classes=3, factors=4, output_dim=2, dropout=0.0)
    h_a, h_b = torch.randn(3, 5), torch.randn(3, 7)
    U, V = fusion.project["a"].weight, fusion.project["b"].weight  # (k*o, d)
    with torch.no_grad():
        for layer in fusion.project.values():
            layer.bias.zero_()
        z = torch.zeros(3, 2)
        for j in range(2):
            W_j = sum(torch.outer(U[j * 4 + f], V[j * 4 + f]) for f in range(4))
            z[:, j] = torch.einsum("bi,ij,bj->b", h_a, W_j, h_b)
        expected = F.normalize(torch.sign(z) * z.abs().sqrt(), dim=1)
        assert torch.allclose(fusion.pooled({"a": h_a, "b": h_b}), expected, atol=1e-5)


def test_forward_matches_naive_reference_with_biases_and_three_modalities():
    torch.manual_seed(1)
    dims = {"a": 4, "b": 3, "c": 5}
    fusion = MFBFusion(dims, num_classes=3, factors=2, output_dim=3, dropout=0.5).eval()
    with torch.no_grad():
        for layer in fusion.project.values():
            layer.bias.normal_()
    features = {m: torch.randn(2, d) for m, d in dims.items()}
    logits, unimodal = fusion(features)
    projections = [features[m] @ fusion.project[m].weight.T + fusion.project[m].bias for m in dims]
    pooled = naive_mfb([p.detach() for p in projections], 2).float()
    assert torch.allclose(logits, pooled @ fusion.classifier.weight.T + fusion.classifier.bias, atol=1e-5)
    for m in dims:  # not decomposable: the unimodal logits come from the auxiliary heads
        assert torch.allclose(unimodal[m], fusion.aux_heads[m](features[m]))


def test_normalisation_unit_norm_signs_and_power():
    g = torch.Generator().manual_seed(2)
    projections = [torch.randn(8, 10 * 5, generator=g) for _ in range(2)]
    out = mfb_pool(projections, factors=5)
    z = (projections[0] * projections[1]).view(8, 10, 5).sum(2)
    assert torch.allclose(out.norm(dim=1), torch.ones(8), atol=1e-6)
    assert torch.equal(torch.sign(out), torch.sign(z))
    # signed square root then L2: out_j^2 = |z_j| / sum_i |z_i|
    assert torch.allclose(out**2, z.abs() / z.abs().sum(1, keepdim=True), atol=1e-6)


def test_zero_rows_stay_zero_with_finite_gradients():
    a = torch.zeros(2, 12, requires_grad=True)
    b = torch.randn(2, 12, requires_grad=True)
    out = mfb_pool([a, b], factors=3)
    assert torch.equal(out, torch.zeros(2, 4))
    out.sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    # tiny products: the floored root keeps the derivative bounded
    tiny = torch.full((1, 4), 1e-30, requires_grad=True)
    (mfb_pool([tiny, torch.ones(1, 4)], factors=1) * torch.arange(4.0)).sum().backward()
    assert torch.isfinite(tiny.grad).all() and tiny.grad.abs().max() < 1e5


def test_dropout_acts_in_training_only():
    torch.manual_seed(3)
    fusion = MFBFusion({"a": 4, "b": 4}, num_classes=2, factors=2, output_dim=8, dropout=0.5)
    features = {"a": torch.randn(6, 4), "b": torch.randn(6, 4)}
    fusion.eval()
    assert torch.equal(fusion(features)[0], fusion(features)[0])
    fusion.train()
    assert not torch.equal(fusion(features)[0], fusion(features)[0])


INFO = DatasetInfo("toy", {"a": ModalitySpec("vector", (5,)), "b": ModalitySpec("vector", (3,))}, num_classes=4)


def test_options_reach_the_fusion_and_bad_ones_are_refused():
    assert "mfb" in FUSIONS
    model = build_model(INFO, ("a", "b"), "mfb", feature_dim=6, fusion_options={"factors": 3, "output_dim": 7})
    assert model.fusion.project["a"].out_features == 21 and model.fusion.classifier.in_features == 7
    with pytest.raises(ConfigError, match="factors"):
        build_model(INFO, ("a", "b"), "mfb", fusion_options={"factor": 3})
    with pytest.raises(IncompatibleError, match="factors"):
        build_model(INFO, ("a", "b"), "mfb", fusion_options={"factors": 0})
    with pytest.raises(ConfigError, match="concat"):
        build_model(INFO, ("a", "b"), "concat", fusion_options={"factors": 3})
    # a run combines exactly two modalities with mfb (the module computes the M-way product, tested above)
    with pytest.raises(IncompatibleError, match="exactly two modalities, got 1"):
        build_model(INFO, ("a",), "mfb")


def test_auxiliary_heads_train_as_probes_without_steering_encoders():
    torch.manual_seed(4)
    model = build_model(INFO, ("a", "b"), "mfb", feature_dim=6)
    batch = MultimodalBatch({"a": torch.randn(5, 5), "b": torch.randn(5, 3)}, torch.arange(5) % 4,
                            torch.ones(5, 2, dtype=torch.bool), torch.arange(5))
    out = model(batch)
    sum(F.cross_entropy(z, batch.labels) for z in out.probe_logits.values()).backward()
    assert all(p.grad is None for m in ("a", "b") for p in model.modality_parameters(m))
    assert all(p.grad is not None for p in model.fusion.aux_heads.parameters())


class FusedPlusUnimodalCE(Method):
    """CE on the fused logits plus CE on every unimodal logit: puts the auxiliary heads in the loss."""

    name = "fused_plus_unimodal"

    def loss(self, output, batch):
        terms = super().loss(output, batch)
        for m, z in output.unimodal_logits.items():
            rows = batch.present_of(m)
            terms[f"ce/{m}"] = F.cross_entropy(z[rows], batch.labels[rows])
        return terms


@pytest.mark.parametrize(("num_modalities", "missing_rate", "drop"), [(2, 0.0, 0.7), (2, 0.2, 0.85)])
def test_training_with_joint_and_with_unimodal_logits(num_modalities, missing_rate, drop):
    splits, cfg = synthetic(num_modalities, missing_rate, num_samples=300, trainer={"epochs": 4, "lr": 0.2},
                            model={"fusion": "mfb", "fusion_options": {"output_dim": 32}})
    joint = Trainer(splits, Method(), cfg, seed=0).fit()
    ce = [h["train_terms"]["ce"] for h in joint.history]
    assert ce[-1] < drop * ce[0]
    assert joint.test["accuracy"] > 0.4  # chance: 0.25
    assert "aux_heads" in joint.history[0]["train_terms"]
    both = Trainer(splits, FusedPlusUnimodalCE(), cfg, seed=0).fit()
    terms = both.history[-1]["train_terms"]
    assert all(f"ce/{m}" in terms for m in splits.info.modalities)
    assert all(math.isfinite(h["train_loss"]) for h in both.history)
    assert both.test["unimodal_accuracy"]["audio"] > 0.4
