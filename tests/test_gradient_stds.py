"""The per-tensor standard deviation of the GE noise (one-pass on the CPU) against a plain two-pass reference
in float64, and the noise it scales: mean 0 and that std per tensor."""

from __future__ import annotations

import math

import pytest
import torch

from poise.functional.ogm import GE_EPS, gradient_stds, modulate_gradients


def reference_std(x: torch.Tensor) -> float:
    values = x.double().flatten().tolist()
    n = len(values)
    if n < 2:
        return 0.0
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def as_float(s) -> float:
    return float(s) if isinstance(s, torch.Tensor) else s


def test_stds_match_the_two_pass_reference():
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(64, 3, 3, 3, generator=g) * 1e-3,  # a conv weight's gradient
        torch.randn(300, 40, generator=g).t(),  # not contiguous
        torch.randn(5000, generator=g) * 0.1 + 0.5,  # mean 5 standard deviations: still the one-pass form
        torch.randn(2000, generator=g) * 1e-4 + 1.0,  # mean 10^4 standard deviations: torch.std instead
        torch.randn(7, generator=g).double(),
        torch.zeros(100),
        torch.full((50,), 3.25),  # constant: exactly 0
        torch.tensor([2.5]),  # one element: 0, not NaN
    ]
    stds = gradient_stds(tensors)
    assert len(stds) == len(tensors)
    for x, s in zip(tensors, stds):
        assert as_float(s) == pytest.approx(reference_std(x), rel=1e-5, abs=1e-12)
    assert as_float(stds[5]) == 0.0 and as_float(stds[6]) == pytest.approx(0.0, abs=1e-6) and as_float(stds[7]) == 0.0


def test_a_non_finite_gradient_gives_a_non_finite_std():
    bad = torch.randn(100)
    bad[3] = float("nan")
    inf = torch.randn(100)
    inf[0] = float("inf")
    assert all(not math.isfinite(as_float(s)) for s in gradient_stds([bad, inf]))


def test_modulated_noise_has_mean_zero_and_each_tensors_std():
    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.zeros(400, 300)), torch.nn.Parameter(torch.zeros(64, 3, 7, 7))]
    originals = [torch.randn(400, 300, generator=g) * 0.02 + 0.01, torch.randn(64, 3, 7, 7, generator=g) * 3e-4]
    for p, o in zip(params, originals):
        p.grad = o.clone()
    modulate_gradients([[params[0]], [params[1]]], torch.tensor([0.3, 1.0]), noise=True,
                       generator=torch.Generator().manual_seed(2))
    for p, o, k in zip(params, originals, (0.3, 1.0)):
        noise = (p.grad - k * o).double()
        std = reference_std(o) + GE_EPS
        assert abs(float(noise.mean())) < 4 * std / math.sqrt(noise.numel())
        assert float(noise.std()) == pytest.approx(std, rel=0.02)
