"""ARL: the functional core against hand computations and the released code's arithmetic, and the method
inside the training step."""

import math

import pytest
import torch

from conftest import fast_config, synthetic
from method_checks import check_accumulation, check_fp16, check_resume
from poise.functional.arl import arl_dependence_weights, logit_magnitude
from poise.methods import make_method
from poise.train import Trainer


def released_weights(h_a, h_v, c_a, c_v, T):
    """The released main_arl_variance.py arithmetic for two modalities, in plain Python."""
    h_a, h_v = max(h_a / (h_a + h_v), 0.3), max(h_v / (h_a + h_v), 0.3)
    a_w, v_w = 1 / h_a, 1 / h_v
    c_a, c_v = c_a / (c_a + c_v), c_v / (c_a + c_v)
    a_w, v_w = a_w / (a_w + v_w), v_w / (a_w + v_w)
    x, y = c_v * a_w * T, c_a * v_w * T
    return [math.exp(x) / (math.exp(x) + math.exp(y)), math.exp(y) / (math.exp(x) + math.exp(y))]


def test_two_modalities_by_hand():
    # entropy shares 0.25 / 0.75 -> floored 0.3 / 0.75 -> inverses 10/3, 4/3 -> 5/7, 2/7;
    # magnitude shares 0.75 / 0.25, so each is weighed by the other's: scores 8 * (5/7 * 1/4, 2/7 * 3/4)
    w = arl_dependence_weights(torch.tensor([1.0, 3.0]), torch.tensor([6.0, 2.0]), 8.0, 0.3)
    x, y = 8 * 5 / 28, 8 * 6 / 28
    assert w.tolist() == pytest.approx([math.exp(x) / (math.exp(x) + math.exp(y)), math.exp(y) / (math.exp(x) + math.exp(y))])
    for h_a, h_v, c_a, c_v, T in [(0.4, 1.2, 3.0, 9.0, 8.0), (1.7, 1.6, 20.0, 4.0, 1.0), (0.05, 1.5, 5.0, 5.0, 8.0)]:
        got = arl_dependence_weights(torch.tensor([h_a, h_v]), torch.tensor([c_a, c_v]), T, 0.3)
        assert got.tolist() == pytest.approx(released_weights(h_a, h_v, c_a, c_v, T), rel=1e-5)


def test_three_modalities_by_hand():
    # entropy shares 1/6, 2/6, 3/6 -> floored 0.3, 1/3, 1/2 -> inverses 10/3, 3, 2 (sum 25/3) -> 0.4, 0.36, 0.24
    # magnitude shares 0.5, 0.3, 0.2 -> mean of the others' 0.25, 0.35, 0.4
    w = arl_dependence_weights(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([5.0, 3.0, 2.0]), 2.0, 0.3)
    scores = [2 * 0.4 * 0.25, 2 * 0.36 * 0.35, 2 * 0.24 * 0.4]
    total = sum(math.exp(s) for s in scores)
    assert w.tolist() == pytest.approx([math.exp(s) / total for s in scores], rel=1e-5)
    with pytest.raises(ValueError, match="two or more modalities"):
        arl_dependence_weights(torch.tensor([1.0]), torch.tensor([1.0]))


def test_logit_magnitude():
    assert logit_magnitude(torch.tensor([[1.0, -2.0, 0.5]])).tolist() == [3.5]


def test_scales_each_encoder_gradient_by_one_plus_its_weight_after_the_warm_up():
    splits, _ = synthetic(2, num_samples=128)
    cfg = fast_config(trainer={"epochs": 2, "batch_size": 32})
    method = make_method("arl", {"start": 0, "gamma": 2.0})
    seen = []
    after = method.after_backward

    def spy_after(output, batch):
        groups = {m: method.ctx.model.modality_parameters(m) for m in output.unimodal_logits}
        before = {m: [p.grad.clone() for p in ps] for m, ps in groups.items()}
        records = len(method._records.get("scale/audio", []))
        after(output, batch)
        assert len(method._records["scale/audio"]) == records + 1
        scales = {m: float(method._records[f"scale/{m}"][-1]) for m in groups}
        seen.append((method.ctx.epoch, before, {m: [p.grad.clone() for p in ps] for m, ps in groups.items()}, scales))

    method.after_backward = spy_after
    Trainer(splits, method, cfg, seed=0, method_name="arl").fit()
    assert {e for e, *_ in seen} == {0, 1}
    for epoch, before, now, scales in seen:
        if epoch == 0:  # warm-up: nothing scaled
            assert scales == {"audio": 1.0, "visual": 1.0} and all(torch.equal(a, b) for m in now for a, b in zip(before[m], now[m]))
            continue
        assert scales is not None and all(1.0 < s < 2.0 for s in scales.values())
        assert sum(scales.values()) == pytest.approx(3.0)  # 1 + w per modality, the w sum to 1
        for m in now:
            for a, b in zip(before[m], now[m]):
                assert torch.allclose(b, a * scales[m], rtol=1e-5, atol=1e-8)


def test_unimodal_losses_weigh_one_in_the_warm_up_and_gamma_after():
    import torch.nn.functional as F

    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput

    splits, _ = synthetic(2, num_samples=64)
    method = make_method("arl", {"start": 2, "gamma": 4.0})
    Trainer(splits, method, fast_config(), seed=0, method_name="arl").setup()
    za, zv = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), torch.tensor([[0.5, 0.0], [0.0, 3.0], [2.0, 0.0]])
    labels = torch.tensor([0, 0, 1])
    present = torch.tensor([[True, True], [True, False], [True, True]])
    batch = MultimodalBatch(inputs={"audio": torch.zeros(3, 1), "visual": torch.zeros(3, 1)}, labels=labels,
                            present=present, index=torch.arange(3))
    output = ModelOutput(features={}, unimodal_logits={"audio": za, "visual": zv}, logits=za + zv)
    ce_visual = float(F.cross_entropy(zv[[0, 2]], labels[[0, 2]]))  # over the samples that have visual
    for epoch, weight in [(2, 1.0), (3, 4.0)]:  # active from epoch start + 1
        method.ctx.epoch = epoch
        terms = method.loss(output, batch)
        assert float(terms["ce"]) == pytest.approx(float(F.cross_entropy(za + zv, labels)))
        assert float(terms["ce_audio"]) == pytest.approx(weight * float(F.cross_entropy(za, labels)))
        assert float(terms["ce_visual"]) == pytest.approx(weight * ce_visual)


@pytest.mark.parametrize(("modalities", "missing"), [(2, 0.0), (3, 0.3)])
def test_trains(modalities, missing):
    splits, _ = synthetic(modalities, missing_rate=missing, num_samples=240)
    cfg = fast_config(trainer={"epochs": 3}, data={"missing_rate": missing})
    result = Trainer(splits, make_method("arl", {"start": 0}), cfg, seed=0, method_name="arl").fit()
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert result.test["accuracy"] > 0.5  # four classes: chance is 0.25
    records = result.history[-1]["method"]
    assert sum(v for k, v in records.items() if k.startswith("scale/")) == pytest.approx(modalities + 1.0, rel=1e-4)


def test_resumed_fp16_and_accumulation(tmp_path):
    check_resume("arl", {"start": 0}, tmp_path)
    check_fp16("arl", {"start": 0}, epochs=2)
    check_accumulation("arl", {"start": 0}, epochs=2)
