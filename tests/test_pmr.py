"""PMR: prototype logits and prototypes against plain loops, the coefficient rule, training end to end."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import fast_config, synthetic
from poise.functional import prototype_entropy, prototype_logits, update_prototypes
from poise.functional.prototypes import class_feature_sums
from poise.methods import make_method
from poise.train import Trainer


def test_prototype_logits_are_negative_euclidean_distances():
    g = torch.Generator().manual_seed(0)
    z, c = torch.randn(4, 3, generator=g), torch.randn(5, 3, generator=g)
    got = prototype_logits(z, c)
    assert got.shape == (4, 5)
    for i in range(4):
        for k in range(5):
            d = math.sqrt(sum((float(z[i, j]) - float(c[k, j])) ** 2 for j in range(3)))
            assert float(got[i, k]) == pytest.approx(-d, abs=1e-5)
    # hand value: a 3-4-5 triangle
    assert float(prototype_logits(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 0.0]]))) == pytest.approx(-5.0)


def test_prototypes_are_smoothed_class_means_and_unseen_classes_keep_theirs():
    z = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [9.0, 9.0]])
    y = torch.tensor([0, 0, 1, 1])
    rows = torch.tensor([True, True, True, False])  # the last sample lacks the modality
    sums, counts = class_feature_sums(z, y, 3, rows)
    assert counts.tolist() == [2.0, 1.0, 0.0]
    first = update_prototypes(None, sums, counts, 0.2)
    assert first.tolist() == [[2.0, 0.0], [0.0, 2.0], [0.0, 0.0]]
    old = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]])
    new = update_prototypes(old, sums, counts, 0.2)
    assert torch.allclose(new, torch.tensor([[1.6, 0.0], [0.2, 1.8], [5.0, 5.0]]))


def test_prototype_entropy_matches_its_definition():
    z, c = torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    total = 0.0
    for i in range(2):
        d = [-math.dist(z[i].tolist(), c[k].tolist()) for k in range(2)]
        p = [math.exp(v) / sum(math.exp(u) for u in d) for v in d]
        total += -sum(q * math.log(q) for q in p)
    assert float(prototype_entropy(z, c)) == pytest.approx(total / 2, abs=1e-6)


def test_only_the_slow_modality_gets_the_prototypical_term():
    splits, _ = synthetic(2, num_samples=160)  # audio carries more signal than visual
    cfg = fast_config(trainer={"epochs": 2})
    method = make_method("pmr", {"entropy_weight": 0.0})
    trainer = Trainer(splits, method, cfg, seed=0)
    result = trainer.fit()
    records = result.history[-1]["method"]
    assert records["ratio/audio"] > 1 > records["ratio/visual"]
    assert records["beta/audio"] == 0.0 and records["beta/visual"] == 1.0
    # the term the method added equals a naive PCE of the visual features against its prototypes
    batch = next(iter(trainer.ctx.make_loader(splits.train, False)))
    output = trainer.model(batch)
    terms = method.loss(output, batch)
    proto = method.prototypes("visual")
    d = torch.stack([torch.stack([-(output.features["visual"][i] - proto[k]).norm() for k in range(len(proto))])
                     for i in range(len(batch))])
    assert float(terms["pce_visual"].detach()) == pytest.approx(float(F.cross_entropy(d.detach(), batch.labels)), rel=1e-4)
    assert float(terms["pce_audio"].detach()) == 0.0 and "entropy_audio" not in terms
    # the recorded distances of that batch: to the sample's own class prototype, and the mean to the others
    records = method.pop_records()
    C, d = len(proto), d.detach()
    own = [-float(d[i, int(batch.labels[i])]) for i in range(len(batch))]
    other = [-sum(float(d[i, k]) for k in range(C) if k != int(batch.labels[i])) / (C - 1) for i in range(len(batch))]
    assert records["distance_own/visual"] == pytest.approx(sum(own) / len(own), rel=1e-5)
    assert records["distance_other/visual"] == pytest.approx(sum(other) / len(other), rel=1e-5)


@pytest.mark.parametrize(("modalities", "missing", "options"),
                         [(2, 0.0, {}), (3, 0.3, {}), (2, 0.3, {"entropy_weight": 0.0})])
def test_pmr_trains(modalities, missing, options):
    splits, _ = synthetic(modalities, missing_rate=missing, num_samples=240)
    cfg = fast_config(trainer={"epochs": 3}, data={"missing_rate": missing})
    method = make_method("pmr", options)
    result = Trainer(splits, method, cfg, seed=0).fit()
    assert result.test["accuracy"] > 0.5  # 4 classes: chance is 0.25
    assert all(math.isfinite(v) for v in result.history[-1]["train_terms"].values())
    if options.get("entropy_weight", 0.1) > 0:
        assert any(k.startswith("entropy_") for k in result.history[0]["train_terms"])
