"""The step's finiteness check names the modality whose gradient is not finite (NaN, +inf or -inf), with
small gradients summed in one copy and large ones reduced per tensor, and lets finite gradients pass even
where their sum or norm overflows."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import fast_config
from poise.data.base import ModalitySpec
from poise.data.batch import MultimodalBatch
from poise.models.encoders import MLPEncoder
from poise.models.fusion import ConcatFusion
from poise.models.model import MultimodalModel
from poise.train import engine as engine_module
from poise.train.engine import NonFiniteError, StepEngine


def step_with_gradients(small: bool, edit):
    torch.manual_seed(0)
    encoders = {m: MLPEncoder(ModalitySpec("vector", (6,)), 4) for m in ("audio", "visual")}
    model = MultimodalModel(encoders, ConcatFusion({"audio": 4, "visual": 4}, 3))
    params = list(model.parameters())
    engine = StepEngine(model, torch.optim.SGD(params, lr=0.1), fast_config(), torch.device("cpu"), "test",
                        owns_optimizer_step=False)
    engine._concat_check = small
    batch = MultimodalBatch({"audio": torch.randn(5, 6), "visual": torch.randn(5, 6)}, torch.tensor([0, 1, 2, 0, 1]),
                            torch.ones(5, 2, dtype=torch.bool), torch.arange(5))
    engine.backward(F.cross_entropy(model(batch).logits, batch.labels))
    engine.finish_gradients()
    edit(model)
    before = [p.detach().clone() for p in params]
    return engine, params, before


@pytest.mark.parametrize("small", [True, False])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_non_finite_gradient_is_named_by_its_modality(small, value):
    def edit(model):
        model.encoders["visual"].net[1].weight.grad[1, 2] = value

    engine, params, before = step_with_gradients(small, edit)
    with pytest.raises(NonFiniteError, match="the gradient of modality 'visual' \\(its encoder\\) is not finite"):
        engine.optimizer_step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))  # no step taken


@pytest.mark.parametrize("small", [True, False])
def test_finite_gradients_pass_even_where_their_sum_overflows(small):
    def edit(model):
        model.encoders["audio"].net[1].weight.grad.fill_(3e38)  # finite; the sum and the norm are not

    engine, params, before = step_with_gradients(small, edit)
    engine.optimizer_step()
    assert any(not torch.equal(p, b) for p, b in zip(params, before))


def test_small_and_large_gradients_choose_their_check():
    torch.manual_seed(0)
    small = torch.nn.Linear(8, 3)
    large = torch.nn.Linear(engine_module.SMALL_TENSOR, 8)
    for model, expected in ((small, True), (large, False)):
        params = list(model.parameters())
        engine = StepEngine(model, torch.optim.SGD(params, lr=0.1), fast_config(), torch.device("cpu"), "test",
                            owns_optimizer_step=False)
        assert engine._concat_check is expected
