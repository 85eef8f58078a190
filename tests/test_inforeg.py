"""InfoReg: the functional core against hand computations, and the method inside the training step."""

import math

import pytest
import torch

from conftest import fast_config, synthetic
from method_checks import check_accumulation, check_fp16, check_resume
from poise.errors import IncompatibleError
from poise.functional.inforeg import add_proximal_gradient, fisher_trace, inforeg_coefficients, prime_window_slope
from poise.methods import make_method
from poise.train import Trainer


def test_fisher_trace_is_sum_of_mean_squares():
    grads = [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([2.0, 0.0, 0.0, 0.0])]
    # (1 + 4 + 9 + 16) / 4 + 4 / 4 = 7.5 + 1
    assert float(fisher_trace(grads)) == pytest.approx(8.5)


def test_prime_window_slope_with_zero_prefill():
    # after one epoch: last ten = [0]*9 + [5] -> 0.5; previous ten all zeros -> k = 1
    assert prime_window_slope([5.0]) == pytest.approx(1.0)
    # after two: recent mean (5 + 3) / 10 = 0.8, previous 0.5 -> (0.8 - 0.5) / 0.8
    assert prime_window_slope([5.0, 3.0]) == pytest.approx(0.375)
    history = [float(t) for t in range(1, 14)]  # 13 epochs: recent 4..13, previous 3..12
    assert prime_window_slope(history) == pytest.approx((8.5 - 7.5) / 8.5)
    assert prime_window_slope([]) == 0.0
    assert prime_window_slope([2.0, 2.0, 2.0], window=2) == pytest.approx(0.0)


def test_coefficients_released_two_modality_rule():
    strengths = torch.tensor([0.95, 0.1])
    # s_a > s_v: beta_a = 0.95 exp(tanh(s_a - s_v)), beta_v = 0
    beta = inforeg_coefficients(torch.tensor([3.0, 2.5]), strengths)
    assert beta.tolist() == pytest.approx([0.95 * math.exp(math.tanh(0.5)), 0.0])
    # otherwise (a tie included) the visual branch: beta_v = 0.1 exp(tanh(s_v - s_a))
    beta = inforeg_coefficients(torch.tensor([1.0, 2.2]), strengths)
    assert beta.tolist() == pytest.approx([0.0, 0.1 * math.exp(math.tanh(1.2))])
    beta = inforeg_coefficients(torch.tensor([2.0, 2.0]), strengths)
    assert beta.tolist() == pytest.approx([0.0, 0.1])


def test_coefficients_three_modalities_lead_over_runner_up():
    beta = inforeg_coefficients(torch.tensor([1.0, 4.0, 3.5]), torch.tensor([0.9, 0.5, 0.1]))
    assert beta.tolist() == pytest.approx([0.0, 0.5 * math.exp(math.tanh(0.5)), 0.0])


def test_proximal_gradient_adds_beta_times_distance():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    p.grad = torch.tensor([0.5, 0.5])
    q = torch.nn.Parameter(torch.tensor([3.0]))  # no gradient: left alone
    add_proximal_gradient([p, q], [torch.tensor([0.0, 0.0]), torch.tensor([0.0])], 2.0)
    assert p.grad.tolist() == pytest.approx([2.5, -3.5]) and q.grad is None


def test_refuses_unknown_trace_modality_and_fusion():
    splits, cfg = synthetic(2, num_samples=64)
    with pytest.raises(IncompatibleError, match="trace_of 'speech'"):
        Trainer(splits, make_method("inforeg", {"trace_of": "speech"}), cfg, seed=0, method_name="inforeg")


def test_trains_regulates_the_dominant_modality_and_records_window():
    splits, cfg = synthetic(2, num_samples=240)
    cfg = fast_config(trainer={"epochs": 3})
    method = make_method("inforeg")
    result = Trainer(splits, method, cfg, seed=0, method_name="inforeg").fit()
    assert result.test["accuracy"] > 0.5
    records = result.history[0]["method"]
    # audio carries the stronger signal in the synthetic set: it is the one regulated
    assert records["window"] == 1.0 and records["beta/audio"] > 0.9 and records["trace_slope"] == pytest.approx(1.0)
    assert len(method.trace_history) == 3
    second = result.history[1]["method"]["trace_slope"]
    t0, t1 = method.trace_history[:2]
    assert second == pytest.approx(((t0 + t1) / 10 - t0 / 10) / ((t0 + t1) / 10))


def test_anchor_is_the_epoch_start_weights():
    splits, _ = synthetic(2, num_samples=128)
    cfg = fast_config(trainer={"epochs": 2})
    method = make_method("inforeg")
    seen = {}
    original = method.on_epoch_start

    def on_epoch_start(epoch, loader):
        out = original(epoch, loader)
        seen[epoch] = [p.detach().clone() for p in method._groups["audio"]]
        return out

    method.on_epoch_start = on_epoch_start
    Trainer(splits, method, cfg, seed=0, method_name="inforeg").fit()
    anchor = method.ctx.snapshots["inforeg/audio"]
    assert all(torch.equal(a, s) for a, s in zip(anchor, seen[1]))
    assert not all(torch.equal(a, s) for a, s in zip(anchor, seen[0]))


def test_resumed_in_mid_epoch_equals_uninterrupted(tmp_path):
    check_resume("inforeg", {"window": 1, "threshold": -1.0}, tmp_path)


def test_fp16_and_accumulation():
    check_fp16("inforeg", {})
    check_accumulation("inforeg", {})
