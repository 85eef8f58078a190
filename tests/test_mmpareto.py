"""MMPareto: the two-gradient Pareto weights against hand values and a grid search, the method's
encoder gradients against a naive recomputation, training end to end."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import fast_config, synthetic
from poise.functional import pareto_combine, pareto_weights
from poise.methods import make_method
from poise.train import Trainer


def grid_min_norm(g1, g2, steps=200_001):
    # |a g1 + (1 - a) g2|^2 expanded into the three inner products, evaluated on a fine grid of a
    g1, g2 = g1.double(), g2.double()
    n11, n12, n22 = float(g1 @ g1), float(g1 @ g2), float(g2 @ g2)
    a = torch.linspace(0.0, 1.0, steps, dtype=torch.float64)
    norms = a**2 * n11 + 2 * a * (1 - a) * n12 + (1 - a) ** 2 * n22
    return float(a[norms.argmin()])


def test_agreeing_gradients_are_averaged():
    assert pareto_weights(torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0])) == (0.5, 0.5)  # cosine 1/ (sqrt5 sqrt10) > 0


def test_conflicting_gradients_get_the_min_norm_point():
    # by hand: |a (1,0) + (1-a)(-1,1)|^2 = (2a-1)^2 + (1-a)^2, minimal at a = 0.6
    a1, a2 = pareto_weights(torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0]))
    assert (a1, a2) == pytest.approx((0.6, 0.4))
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        g1 = torch.randn(20, generator=g)
        g2 = -g1 + 0.5 * torch.randn(20, generator=g)
        assert float(g1 @ g2) < 0
        a1, a2 = pareto_weights(g1, g2)
        assert a1 == pytest.approx(grid_min_norm(g1, g2), abs=1e-4) and a1 + a2 == pytest.approx(1.0)


def test_the_min_norm_weight_is_clipped_as_the_released_solver_does():
    # the unclipped optimum is 1.0001e-4 / 1.0002, below the clip
    assert pareto_weights(torch.tensor([1.0, 0.0]), torch.tensor([-1e-4, 0.0]))[0] == pytest.approx(0.001)
    assert pareto_weights(torch.tensor([-1e-4, 0.0]), torch.tensor([1.0, 0.0]))[0] == pytest.approx(0.999)


def test_a_zero_gradient_leaves_the_average():
    assert pareto_weights(torch.zeros(3), torch.tensor([1.0, -1.0, 0.0])) == (0.5, 0.5)


def test_combination_and_magnitude_by_hand():
    gm = [torch.tensor([1.0, 0.0]), torch.tensor([0.0])]
    gu = [torch.tensor([-1.0, 1.0]), torch.tensor([2.0])]
    w = (0.6, 0.4)
    # 2 (0.6 gm + 0.4 gu) = [(0.4, 0.8), (1.6,)]; g_sum = [(0, 1), (2,)]
    none = pareto_combine(gm, gu, w, "none")
    assert torch.allclose(none[0], torch.tensor([0.4, 0.8])) and torch.allclose(none[1], torch.tensor([1.6]))
    # per tensor: |g_sum_0| = 1 < |(0.4, 0.8)| = 0.894..? no: 0.894 < 1, so raised by 1 / 0.894; |2| / |1.6| = 1.25
    tensor = pareto_combine(gm, gu, w, "tensor", gamma=1.5)
    k0 = 1.5 * 1.0 / math.hypot(0.4, 0.8)
    assert torch.allclose(tensor[0], k0 * torch.tensor([0.4, 0.8])) and torch.allclose(tensor[1], torch.tensor([1.5 * 2.0]))
    # per encoder: |g_sum| = sqrt(1 + 4), |combined| = sqrt(0.16 + 0.64 + 2.56)
    enc = pareto_combine(gm, gu, w, "encoder")
    k = math.sqrt(5.0) / math.sqrt(3.36)
    assert torch.allclose(enc[0], k * none[0]) and torch.allclose(enc[1], k * none[1])
    zero = pareto_combine([torch.zeros(2)], [torch.zeros(2)], (0.5, 0.5), "tensor", gamma=1.5)
    assert torch.equal(zero[0], torch.zeros(2))  # the released code's 0 / 0 gives NaN here


def test_method_gradients_equal_a_naive_recomputation():
    splits, _ = synthetic(2, num_samples=64)
    cfg = fast_config(trainer={"epochs": 1})
    method = make_method("mmpareto", {"magnitude": "encoder"})
    trainer = Trainer(splits, method, cfg, seed=0)
    ctx = trainer.setup()
    model = trainer.model
    batch = next(iter(ctx.make_loader(splits.train, True)))
    ctx.optimizer.zero_grad(set_to_none=True)
    output = model(batch)
    terms = method.loss(output, batch)
    method.backward(terms, output, batch)
    trainer.engine.finish_gradients()
    got = {id(p): p.grad.clone() for p in model.parameters()}
    # naive: a fresh forward, one autograd.grad per loss, the weights from a grid search
    output = model(batch)
    fused = F.cross_entropy(output.logits, batch.labels)
    uni = {m: F.cross_entropy(method.heads[m](output.features[m]), batch.labels) for m in model.modalities}
    for m in model.modalities:
        params = model.modality_parameters(m)
        gm = torch.autograd.grad(fused, params, retain_graph=True)
        gu = torch.autograd.grad(uni[m], params, retain_graph=True)
        vm, vu = torch.cat([g.flatten() for g in gm]), torch.cat([g.flatten() for g in gu])
        a = 0.5 if float(vm @ vu) > 0 else min(max(grid_min_norm(vm, vu), 0.001), 0.999)
        combined = [2 * (a * x + (1 - a) * y) for x, y in zip(gm, gu)]
        norm = torch.cat([c.flatten() for c in combined]).norm()
        norm_sum = (vm + vu).norm()
        k = max(float(norm_sum / norm), 1.0)
        for p, c in zip(params, combined):
            assert torch.allclose(got[id(p)], k * c, atol=1e-5, rtol=1e-3)
    total = fused + sum(uni.values())
    for p, g in zip(model.head_parameters(), torch.autograd.grad(total, model.head_parameters(), retain_graph=True)):
        assert torch.allclose(got[id(p)], g, atol=1e-6)


@pytest.mark.parametrize(("modalities", "missing", "options"),
                         [(2, 0.0, {}), (3, 0.3, {}), (2, 0.3, {"magnitude": "tensor", "gamma": 1.5})])
def test_mmpareto_trains(modalities, missing, options):
    splits, _ = synthetic(modalities, missing_rate=missing, num_samples=240)
    cfg = fast_config(trainer={"epochs": 3}, data={"missing_rate": missing})
    result = Trainer(splits, make_method("mmpareto", options), cfg, seed=0).fit()
    assert result.test["accuracy"] > 0.5  # 4 classes: chance is 0.25
    records = result.history[-1]["method"]
    assert all(math.isfinite(v) for v in records.values())
    assert {"cos/audio", "weight_uni/audio", "conflict/audio"} <= set(records)
