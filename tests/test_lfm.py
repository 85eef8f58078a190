"""LFM: the fitted schedule, the JS divergence (and the released reversed form), the learnable schedule's
step and Hessian-vector product against hand values; the method trains on both schedules."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import fast_config, synthetic
from poise.errors import IncompatibleError
from poise.functional import (
    hessian_vector_product,
    js_divergence,
    lfm_alpha_lr,
    lfm_alpha_update,
    lfm_loss,
    lfm_schedule,
    pairwise_alignment,
)
from poise.methods import make_method
from poise.train import Trainer


def test_fitted_schedule_by_hand():
    assert lfm_schedule(0) == pytest.approx((0.204623704, 0.795376296))
    # 0.204623704 + 3.35472727e-3 * 10 + 1.22989557e-4 * 100 - 2.92947416e-6 * 1e3 + 2.23835486e-8 * 1e4 - 5.39717505e-11 * 1e5
    alpha_cls = 0.204623704 + 0.0335472727 + 0.0122989557 - 0.00292947416 + 0.000223835486 - 0.00000539717505
    assert lfm_schedule(10) == pytest.approx((alpha_cls, 1 - alpha_cls))
    assert lfm_schedule(180)[0] > 1.0  # the released fit leaves [0, 1]: what clip_fitted guards against


def test_js_divergence_and_the_released_reversed_form_by_hand():
    p_logits = torch.tensor([[0.0, 0.0]])  # p = (0.5, 0.5)
    q_logits = torch.tensor([[math.log(3.0), 0.0]])  # q = (0.75, 0.25)
    p, q, m = (0.5, 0.5), (0.75, 0.25), (0.625, 0.375)
    kl = lambda a, b: sum(x * math.log(x / y) for x, y in zip(a, b))  # noqa: E731
    assert js_divergence(p_logits, q_logits).item() == pytest.approx(0.5 * (kl(p, m) + kl(q, m)), rel=1e-6)
    assert js_divergence(p_logits, q_logits, "released").item() == pytest.approx(0.5 * (kl(m, p) + kl(m, q)), rel=1e-6)
    # the released Alignment: F.kl_div(p.log(), m, batchmean) on softmax outputs
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    pa, pb = a.softmax(1), b.softmax(1)
    mid = 0.5 * (pa + pb)
    released = 0.5 * (F.kl_div(pa.log(), mid, reduction="batchmean") + F.kl_div(pb.log(), mid, reduction="batchmean"))
    assert js_divergence(a, b, "released").mean().item() == pytest.approx(released.item(), rel=1e-5)
    js = js_divergence(a, b)
    assert torch.allclose(js, js_divergence(b, a)) and bool((js <= math.log(2) + 1e-6).all())
    assert js_divergence(a, a).abs().max().item() < 1e-6


def test_pairwise_alignment_is_the_mean_over_pairs_of_rows_that_have_both():
    g = torch.Generator().manual_seed(1)
    logits = {m: torch.randn(4, 3, generator=g) for m in ("a", "v", "t")}
    rows = {"a": torch.tensor([True, True, True, True]), "v": torch.tensor([True, False, True, True]),
            "t": torch.tensor([False, False, True, True])}
    expected = 0.0
    for x, y in (("a", "v"), ("a", "t"), ("v", "t")):
        values = [js_divergence(logits[x][i: i + 1], logits[y][i: i + 1]).item() for i in range(4) if rows[x][i] and rows[y][i]]
        expected += sum(values) / len(values)
    assert pairwise_alignment(logits, rows).item() == pytest.approx(expected / 3, rel=1e-5)
    with pytest.raises(ValueError, match="two modalities"):
        pairwise_alignment({"a": logits["a"]})


def test_loss_and_learnable_step_by_hand():
    assert lfm_loss(torch.tensor(1.5), torch.tensor(0.2), 0.3, 0.7).item() == pytest.approx(2 * (0.45 + 0.14))
    assert [lfm_alpha_lr(e, 1e-4) for e in (0, 19, 20, 39, 40)] == pytest.approx([1e-4, 1e-4, 5e-5, 5e-5, 2.5e-5])
    assert lfm_alpha_update(0.5, 1000.0, 1e-4) == pytest.approx((0.6, 0.4))
    assert lfm_alpha_update(0.94, -1000.0, 1e-4) == pytest.approx((0.05, 0.95))  # clipped at 0.95
    assert lfm_alpha_update(0.06, 1000.0, 1e-4) == pytest.approx((0.95, 0.05))  # clipped at 0.05


def test_hessian_vector_product_of_quadratics_by_hand():
    # total = 0.5 x'Ax (Hessian A), cls = b'x + 0.5 x'Bx (gradient b + Bx): H v = A (b + B x)
    x = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    y = torch.nn.Parameter(torch.tensor([3.0]))  # reached by neither loss's curvature: its product is 0
    A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    Bm = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([0.5, 1.0])
    total = 0.5 * x @ A @ x + 0.0 * y.sum()
    cls = b @ x + 0.5 * x @ Bm @ x
    hv = hessian_vector_product(total, cls, [x, y])
    v = [0.5 + 1.0, 1.0 + 2 * -2.0]  # b + B x = (1.5, -3)
    assert hv[0].tolist() == pytest.approx([2 * v[0] + 1 * v[1], 1 * v[0] + 3 * v[1]])
    assert hv[1].tolist() == [0.0]


def test_fitted_schedule_trains_with_its_weights_recorded():
    splits, _ = synthetic(2, num_samples=240)
    cfg = fast_config(trainer={"epochs": 6})  # mostly alignment early on: slower than joint's 3 epochs
    result = Trainer(splits, make_method("lfm"), cfg, seed=0).fit()
    assert result.test["accuracy"] > 0.5  # 4 classes: chance 0.25
    for epoch, entry in enumerate(result.history):
        assert entry["method"]["weight/cls"] == pytest.approx(lfm_schedule(epoch)[0], rel=1e-6)


@pytest.mark.parametrize("options", [{}, {"hvp_parameters": "first", "alignment": "released", "initial_alpha_align": 0.05}])
def test_learnable_schedule_moves_alpha_and_holds_its_samples_out(options):
    splits, _ = synthetic(2, num_samples=240)
    cfg = fast_config(trainer={"epochs": 2})
    method = make_method("lfm", {"schedule": "learnable", "alpha_lr": 10.0, **options})
    trainer = Trainer(splits, method, cfg, seed=0)
    result = trainer.fit()
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    start = options.get("initial_alpha_align", 0.95)
    aligns = [h["method"]["weight/align"] for h in result.history]
    assert all(0.05 <= a <= 0.95 for a in aligns)
    assert aligns[0] != pytest.approx(start) or aligns[1] != pytest.approx(start)  # the update moved it
    trained = set(method.epoch_loader(0, None).dataset.indices)
    assert len(trained) == len(splits.train) - 16 and not trained & set(method.holdout_rows.tolist())


def test_three_modalities_with_missing_samples_train():
    splits, _ = synthetic(3, missing_rate=0.3, num_samples=240)
    cfg = fast_config(trainer={"epochs": 2}, data={"missing_rate": 0.3})
    result = Trainer(splits, make_method("lfm", {"schedule": "learnable"}), cfg, seed=0).fit()
    assert all(math.isfinite(h["train_loss"]) for h in result.history)


def test_refuses_a_fusion_that_is_not_a_sum_of_unimodal_logits():
    splits, _ = synthetic(2)
    with pytest.raises(IncompatibleError, match="method 'lfm' works with fusion sum or concat, not 'gated'"):
        Trainer(splits, make_method("lfm"), fast_config(model={"fusion": "gated"}), seed=0)


def test_trains_under_fp16():
    splits, _ = synthetic(2, num_samples=160)
    trainer = Trainer(splits, make_method("lfm", {"schedule": "learnable"}), fast_config(trainer={"epochs": 2, "amp": "fp16"}), seed=0)
    result = trainer.fit()
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert trainer.engine.scaler.get_scale() > 1000.0
