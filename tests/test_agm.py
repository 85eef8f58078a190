"""AGM: exact Shapley responses against a brute force over permutations, the coefficients by hand, the
method's gradient edit against a naive recomputation, training end to end."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import fast_config, synthetic
from poise.functional import agm_coefficients, shapley_responses
from poise.methods import make_method
from poise.train import Trainer


def brute_force_shapley(value, modalities):
    """Average over every order of arrival of the marginal contribution of each modality."""
    out = {m: 0.0 for m in modalities}
    orders = list(itertools.permutations(modalities))
    for order in orders:
        seen = frozenset()
        for m in order:
            out[m] = out[m] + (value(seen | {m}) - value(seen))
            seen = seen | {m}
    return {m: v / len(orders) for m, v in out.items()}


@pytest.mark.parametrize("M", [2, 3, 4])
@pytest.mark.parametrize("empty", ["zero", "output"])
def test_shapley_responses_match_permutations(M, empty):
    mods = ("a", "v", "t", "x")[:M]
    g = torch.Generator().manual_seed(M)
    outputs = {frozenset(s): torch.randn(3, 5, generator=g) for r in range(M + 1) for s in itertools.combinations(mods, r)}
    got = shapley_responses(outputs, mods, empty)
    value = (lambda s: outputs[s] if s else torch.zeros(3, 5)) if empty == "zero" else (lambda s: outputs[s])
    expected = brute_force_shapley(value, mods)
    for m in mods:
        assert torch.allclose(got[m], expected[m], atol=1e-5)
    total = sum(got.values())
    full = outputs[frozenset(mods)]
    assert torch.allclose(total, full if empty == "zero" else full - outputs[frozenset()], atol=1e-5)


def test_two_modality_responses_by_hand():
    fav, fv, fa = torch.tensor([[4.0]]), torch.tensor([[1.0]]), torch.tensor([[2.0]])
    got = shapley_responses({frozenset("av"): fav, frozenset("v"): fv, frozenset("a"): fa}, ("a", "v"))
    assert float(got["a"]) == pytest.approx(0.5 * (4 - 1 + 2)) and float(got["v"]) == pytest.approx(0.5 * (4 - 2 + 1))


def test_shapley_responses_refuse_missing_subsets():
    with pytest.raises(ValueError, match="subset"):
        shapley_responses({frozenset("av"): torch.ones(1, 1)}, ("a", "v"))
    with pytest.raises(ValueError, match="empty"):
        shapley_responses({frozenset("av"): torch.ones(1, 1), frozenset("a"): torch.ones(1, 1),
                           frozenset("v"): torch.ones(1, 1)}, ("a", "v"), empty="output")


def test_coefficients_by_hand():
    scores, running = torch.tensor([1.0, 2.0]), torch.tensor([1.5, 1.5])
    # M = 2: r = exp(2 (1.5 - s)) = (e, 1/e); r* = (1, 1)
    k = agm_coefficients(scores, running, 1.5)
    assert k.tolist() == pytest.approx([math.exp(1.5 * (1 - math.e)), math.exp(1.5 * (1 - math.exp(-1)))], rel=1e-5)
    assert float(k[0]) < 1 < float(k[1])  # the modality that is more confident now is slowed
    # the clamp: r* - r = e^4 - e^-4 > 10
    big = agm_coefficients(torch.tensor([5.0, 1.0]), torch.tensor([1.0, 5.0]), 0.1, clamp=10.0)
    assert float(big[0]) == pytest.approx(math.exp(0.1 * 10.0), rel=1e-5)


def test_gradient_form_scales_each_encoder_by_its_coefficient():
    splits, _ = synthetic(2, num_samples=128)
    cfg = fast_config(trainer={"epochs": 1})
    method = make_method("agm", {"alpha": 1.5})
    trainer = Trainer(splits, method, cfg, seed=0)
    ctx = trainer.setup()
    model = trainer.model
    batches = iter(ctx.make_loader(splits.train, True))
    naive_scores = []
    for step in range(2):
        batch = next(batches)
        ctx.optimizer.zero_grad(set_to_none=True)
        output = model(batch)
        method.backward(method.loss(output, batch), output, batch)
        trainer.engine.finish_gradients()
        before = {m: [p.grad.clone() for p in model.modality_parameters(m)] for m in model.modalities}
        method.after_backward(output, batch)
        # naive: the responses from two masked passes in eval mode, by the two-modality formula
        with torch.no_grad():
            model.eval()
            zeros = {m: torch.zeros_like(x) for m, x in batch.inputs.items()}
            f_v = model(type(batch)(**{**batch.__dict__, "inputs": {**batch.inputs, "audio": zeros["audio"]}})).logits
            f_a = model(type(batch)(**{**batch.__dict__, "inputs": {**batch.inputs, "visual": zeros["visual"]}})).logits
            model.train()
            f = output.logits.detach()
            o = {"audio": 0.5 * (f - f_v + f_a), "visual": 0.5 * (f - f_a + f_v)}
            s = [float(-torch.log(torch.softmax(o[m], 1)[torch.arange(len(batch)), batch.labels].clamp_min(1e-8)).mean())
                 for m in ("audio", "visual")]
        naive_scores.append(s)
        running = [sum(x[i] for x in naive_scores) / len(naive_scores) for i in range(2)]
        r = [math.exp(2 * (sum(s) / 2 - s[i])) for i in range(2)]
        r_star = [math.exp(2 * (sum(running) / 2 - running[i])) for i in range(2)]
        for i, m in enumerate(("audio", "visual")):
            k = math.exp(1.5 * min(r_star[i] - r[i], 10.0))
            assert float(method._records[f"coef/{m}"][-1]) == pytest.approx(k, rel=1e-4)
            for p, g in zip(model.modality_parameters(m), before[m]):
                assert torch.allclose(p.grad, k * g, atol=1e-7, rtol=1e-4)
        ctx.optimizer.step()
    assert float(method._records["coef/audio"][0]) == pytest.approx(1.0)  # the first step: running mean = scores


def test_released_form_loss_equals_the_fused_ce_in_value():
    splits, _ = synthetic(2, num_samples=64)
    method = make_method("agm", {"formulation": "released"})
    trainer = Trainer(splits, method, fast_config(), seed=0)
    ctx = trainer.setup()
    batch = next(iter(ctx.make_loader(splits.train, True)))
    output = trainer.model(batch)
    ce = method.loss(output, batch)["ce"]
    assert float(ce.detach()) == pytest.approx(float(F.cross_entropy(output.logits.detach(), batch.labels)), rel=1e-5)
    assert method.multiple_backward and not make_method("agm").multiple_backward


@pytest.mark.parametrize(("modalities", "missing", "options"),
                         [(2, 0.0, {}), (3, 0.3, {}), (2, 0.3, {"formulation": "released"}),
                          (3, 0.0, {"formulation": "released", "empty": "output"})])
def test_agm_trains(modalities, missing, options):
    splits, _ = synthetic(modalities, missing_rate=missing, num_samples=240)
    cfg = fast_config(trainer={"epochs": 3}, data={"missing_rate": missing})
    result = Trainer(splits, make_method("agm", options), cfg, seed=0).fit()
    assert result.test["accuracy"] > 0.5  # 4 classes: chance is 0.25
    records = result.history[-1]["method"]
    assert all(math.isfinite(v) for v in records.values()) and "coef/audio" in records
