"""CGGM: coefficients, the fused head's weight gradient, cosines and the direction loss against hand values
and autograd; the method scales encoder gradients by rho * c_m, trains, and refuses what it cannot do."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import fast_config, make_context, synthetic
from poise.errors import IncompatibleError
from poise.functional import cggm_coefficients, cggm_direction_loss, gradient_cosines, head_weight_gradient
from poise.methods import make_method
from poise.train import Trainer


def test_coefficients_by_hand():
    assert cggm_coefficients(torch.tensor([0.1, 0.3])).tolist() == pytest.approx([0.75, 0.25], rel=1e-6)
    assert cggm_coefficients(torch.tensor([0.1, 0.2, 0.3])).tolist() == pytest.approx([5 / 6, 4 / 6, 3 / 6], rel=1e-6)
    # nearly cancelling improvements: the released formula explodes (what bound_coefficients clamps)
    assert cggm_coefficients(torch.tensor([0.1, -0.0999])).abs().max() > 100


def test_head_weight_gradient_matches_autograd_of_the_fused_loss():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 3, generator=g)
    other = torch.randn(6, 4, generator=g)
    W = torch.randn(4, 3, generator=g, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 1, 0])
    logits = h @ W.T + other
    (expected,) = torch.autograd.grad(F.cross_entropy(logits, labels), W)
    assert torch.allclose(head_weight_gradient(logits, labels, h), expected, atol=1e-6)
    rows = torch.tensor([True, False, True, True, False, True])
    logits_rows = h[rows] @ W.T + other[rows]
    (expected_rows,) = torch.autograd.grad(F.cross_entropy(logits_rows, labels[rows]), W)
    assert torch.allclose(head_weight_gradient(logits, labels, h, rows), expected_rows, atol=1e-6)


def test_cosines_and_direction_loss_by_hand():
    cos = gradient_cosines([torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]])],
                           [torch.tensor([[2.0, 0.0]]), torch.tensor([[-1.0, 0.0]])])
    assert cos.tolist() == pytest.approx([1.0, -1 / math.sqrt(2)], rel=1e-6)
    # (|0.75| + |0.25| - (0.75 * 1 + 0.25 * -1)) / 2
    assert cggm_direction_loss(torch.tensor([0.75, 0.25]), torch.tensor([1.0, -1.0])).item() == pytest.approx(0.25)


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_encoder_gradients_are_scaled_by_rho_times_the_coefficients(fusion):
    splits, cfg = synthetic(2)
    cfg = fast_config(model={"fusion": fusion})
    method = make_method("cggm", {"rho": 1.3})
    ctx, batch = make_context(method, splits, cfg)
    output = ctx.model(batch)
    terms = method.loss(output, batch)
    assert terms["direction"].requires_grad  # the paper's L_gm reaches the model this step
    sum(terms.values()).backward()
    before = {m: [p.grad.clone() for p in ctx.model.modality_parameters(m)] for m in ctx.model.modalities}
    method.after_backward(output, batch)
    records = method.pop_records()
    acc = torch.tensor([records[f"accuracy/{m}"] for m in ctx.model.modalities])
    # from accuracies of 0 at the start: c_m = (sum - acc_m) / sum, clamped to [0, 1]
    expected = ((acc.sum() - acc) / (acc.sum() + 1e-8)).clamp(0, 1) if acc.sum() > 0 else torch.zeros(2)
    for i, m in enumerate(ctx.model.modalities):
        assert records[f"coef/{m}"] == pytest.approx(float(expected[i]), abs=1e-6)
        for g0, p in zip(before[m], ctx.model.modality_parameters(m)):
            assert torch.allclose(p.grad, g0 * 1.3 * expected[i], atol=1e-7)


def test_released_direction_is_the_previous_steps_constant():
    splits, cfg = synthetic(2)
    method = make_method("cggm", {"direction": "released"})
    ctx, batch = make_context(method, splits, fast_config())
    first = method.loss(ctx.model(batch), batch)
    assert "direction" not in first  # no previous step yet
    second = method.loss(ctx.model(batch), batch)
    assert not second["direction"].requires_grad


@pytest.mark.parametrize(("modalities", "missing", "options"), [(2, 0.0, {}), (3, 0.3, {}),
                                                                 (2, 0.0, {"direction": "released"})])
def test_trains_end_to_end(modalities, missing, options):
    splits, _ = synthetic(modalities, missing_rate=missing, num_samples=240)
    cfg = fast_config(trainer={"epochs": 3}, data={"missing_rate": missing})
    result = Trainer(splits, make_method("cggm", options), cfg, seed=0).fit()
    assert result.test["accuracy"] > 0.5  # 4 classes: chance 0.25
    for entry in result.history:
        assert all(0.0 <= entry["method"][f"coef/{m}"] <= 1.0 for m in ("audio", "visual"))


def test_refusals():
    splits, _ = synthetic(2)
    with pytest.raises(IncompatibleError, match="method 'cggm' works with fusion concat or sum, not 'film'"):
        Trainer(splits, make_method("cggm"), fast_config(model={"fusion": "film"}), seed=0)
    with pytest.raises(IncompatibleError, match="method 'cggm' .*set trainer.accumulate to 1"):
        Trainer(splits, make_method("cggm"), fast_config(trainer={"accumulate": 2}), seed=0)


def test_trains_under_fp16():
    splits, _ = synthetic(2, num_samples=160)
    trainer = Trainer(splits, make_method("cggm"), fast_config(trainer={"epochs": 2, "amp": "fp16"}), seed=0)
    result = trainer.fit()
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert trainer.engine.scaler.get_scale() > 1000.0
