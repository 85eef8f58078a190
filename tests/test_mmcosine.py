"""MMCosine: cosine logits against a plain loop, the method's loss and prediction, training end to end."""

import math

import pytest
import torch

from conftest import fast_config, synthetic
from poise.errors import IncompatibleError
from poise.functional import cosine_logits
from poise.methods import make_method
from poise.train import Trainer


def naive_cosine_logits(features, weights, scale):
    B = next(iter(features.values())).shape[0]
    C = next(iter(weights.values())).shape[0]
    out = torch.zeros(B, C, dtype=torch.float64)
    for m in features:
        for i in range(B):
            for k in range(C):
                x, w = features[m][i].double(), weights[m][k].double()
                nx, nw = math.sqrt(float(x @ x)), math.sqrt(float(w @ w))
                out[i, k] += 0.0 if nx == 0 or nw == 0 else float(x @ w) / (nx * nw)
    return scale * out


def test_cosine_logits_match_a_plain_loop_and_ignore_norms():
    g = torch.Generator().manual_seed(0)
    features = {"a": torch.randn(5, 3, generator=g), "v": torch.randn(5, 4, generator=g)}
    weights = {"a": torch.randn(6, 3, generator=g), "v": torch.randn(6, 4, generator=g)}
    features["v"][2] = 0.0  # a missing modality: cosine 0 with every class
    got = cosine_logits(features, weights, 10.0)
    assert got.shape == (5, 6)
    assert torch.allclose(got.double(), naive_cosine_logits(features, weights, 10.0), atol=1e-5)
    scaled = cosine_logits({"a": features["a"] * 7.0, "v": features["v"]}, {"a": weights["a"], "v": weights["v"] * 0.1}, 10.0)
    assert torch.allclose(scaled, got, atol=1e-5)
    # hand value: one sample, one class, parallel and orthogonal vectors
    one = cosine_logits({"a": torch.tensor([[1.0, 0.0]]), "v": torch.tensor([[0.0, 2.0]])},
                        {"a": torch.tensor([[3.0, 0.0]]), "v": torch.tensor([[1.0, 0.0]])}, 15.0)
    assert one.item() == pytest.approx(15.0)


def test_cosine_logits_refuse_mismatched_modalities():
    with pytest.raises(ValueError, match="modalities"):
        cosine_logits({"a": torch.ones(1, 2)}, {"v": torch.ones(1, 2)}, 1.0)


@pytest.mark.parametrize(("modalities", "missing"), [(2, 0.0), (3, 0.3)])
def test_mmcosine_trains_and_predicts_with_cosine_logits(modalities, missing):
    splits, cfg = synthetic(modalities, missing_rate=missing, num_samples=240)
    cfg = fast_config(trainer={"epochs": 3}, data={"missing_rate": missing})
    method = make_method("mmcosine", {"scale": 10.0})
    trainer = Trainer(splits, method, cfg, seed=0)
    result = trainer.fit()
    assert result.test["accuracy"] > 0.5  # 4 classes: chance is 0.25
    records = result.history[-1]["method"]
    assert {f"cos_true/{m}" for m in trainer.model.modalities} <= set(records)
    batch = next(iter(trainer.ctx.make_loader(splits.test, False)))
    with torch.no_grad():
        output = trainer.model(batch)
        fusion = trainer.model.fusion
        weights = {m: fusion.fc.weight[:, sl] for m, sl in fusion._slices()}
        expected = naive_cosine_logits(output.features, weights, 10.0)
        assert torch.allclose(method.predict(output, batch).double(), expected, atol=1e-4)
        linear = make_method("mmcosine", {"predict": "linear"})
        linear.setup(trainer.ctx)
        assert torch.equal(linear.predict(output, batch), output.logits)


def test_mmcosine_refuses_a_fusion_without_per_modality_weights():
    splits, _ = synthetic(2)
    cfg = fast_config(model={"fusion": "film"})
    with pytest.raises(IncompatibleError, match="mmcosine.*concat"):
        Trainer(splits, make_method("mmcosine"), cfg, seed=0)
