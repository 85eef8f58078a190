"""The shared present-rows cross-entropy against a plain per-sample loop."""

import math

import torch

from poise.functional import present_cross_entropy


def test_present_cross_entropy_averages_over_present_rows_only():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
    labels = torch.tensor([0, 0, 1])
    rows = torch.tensor([True, False, True])
    expected = 0.0
    for z, y in [(logits[0], 0), (logits[2], 1)]:
        expected += -(z[y] - math.log(sum(math.exp(v) for v in z.tolist())))
    assert math.isclose(float(present_cross_entropy(logits, labels, rows)), expected / 2, rel_tol=1e-6)


def test_present_cross_entropy_is_zero_without_any_present_row_and_keeps_the_graph():
    logits = torch.randn(4, 3, requires_grad=True)
    loss = present_cross_entropy(logits, torch.zeros(4, dtype=torch.long), torch.zeros(4))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(4, 3))
