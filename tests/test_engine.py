"""StepEngine directly: accumulation weighting, the carried auxiliary loss, frozen parameters and the
finiteness check's message (fp16 unscaling: test_amp.py; gradients of one loss: test_context.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import fast_config
from poise.train.engine import NonFiniteError, StepEngine


def setup(**trainer):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    params = list(model.parameters())
    engine = StepEngine(model, torch.optim.SGD(params, lr=0.5), fast_config(trainer=trainer), torch.device("cpu"),
                        "test", owns_optimizer_step=False)
    g = torch.Generator().manual_seed(1)
    return model, params, engine, torch.randn(6, 4, generator=g), torch.randint(0, 3, (6,), generator=g)


def test_accumulated_micro_batches_give_the_whole_batch_gradient():
    model, params, engine, x, y = setup(accumulate=2)
    reference = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    for half in (slice(0, 3), slice(3, 6)):
        engine.backward(F.cross_entropy(model(x[half]), y[half]))
    engine.finish_gradients()
    for p, r in zip(params, reference):
        assert torch.allclose(p.grad, r, atol=1e-6)


def test_carried_loss_joins_the_next_backward_once():
    model, params, engine, x, y = setup()
    out = model(x)
    extra = (out ** 2).mean()
    reference = torch.autograd.grad(F.cross_entropy(out, y) + extra, params, retain_graph=True)
    engine.carry(extra)
    engine.backward(F.cross_entropy(out, y), retain_graph=True)
    engine.flush_carried()  # nothing left: no second backward
    assert engine.backward_calls == 1
    for p, r in zip(params, reference):
        assert torch.allclose(p.grad, r, atol=1e-6)


def test_carried_loss_is_backpropagated_when_the_method_skips_the_batch():
    model, params, engine, x, y = setup()
    extra = (model(x) ** 2).mean()
    reference = torch.autograd.grad(extra, params, retain_graph=True)
    engine.carry(extra)
    engine.flush_carried()
    for p, r in zip(params, reference):
        assert torch.allclose(p.grad, r, atol=1e-6)


def test_frozen_parameters_are_not_updated():
    model, params, engine, x, y = setup()
    engine.frozen = [model.bias]
    bias, weight = model.bias.detach().clone(), model.weight.detach().clone()
    engine.backward(F.cross_entropy(model(x), y))
    engine.optimizer_step()
    assert torch.equal(model.bias, bias) and not torch.equal(model.weight, weight)


def test_non_finite_loss_term_is_named():
    model, params, engine, x, y = setup()
    loss = F.cross_entropy(model(x), y)
    engine.note_loss({"ce": loss, "bad": loss * float("nan")})
    engine.backward(loss)
    with pytest.raises(NonFiniteError, match="loss term 'bad' of method 'test' is not finite"):
        engine.optimizer_step()
