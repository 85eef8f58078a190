"""DI-MML: the functional core against naive loops and hand values, the scaled schedule, stage 2 (frozen
encoders, confidence-weighted prediction), refusals, and the method end to end."""

import math

import pytest
import torch

from conftest import fast_config, synthetic
from method_checks import check_fp16, check_resume
from poise.errors import IncompatibleError
from poise.functional.dimml import (
    confidence_weighted_logits,
    decoupled_dimensions,
    dimension_decoupled_contrastive,
    dimension_discriminability,
    discriminative_dimensions,
)
from poise.methods import make_method
from poise.train import Trainer


def test_dimension_discriminability_matches_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(30, 5, generator=g)
    labels = torch.randint(0, 3, (30,), generator=g)
    labels[:3] = torch.tensor([0, 1, 2])
    got = dimension_discriminability(features, labels, num_classes=4)  # class 3 has no sample
    for d in range(5):
        centroids = {}
        for k in range(3):
            values = [float(features[i, d]) for i in range(30) if int(labels[i]) == k]
            centroids[k] = sum(values) / len(values)
        hits = 0
        for i in range(30):
            nearest = min(centroids, key=lambda k: abs(float(features[i, d]) - centroids[k]))
            hits += nearest == int(labels[i])
        assert float(got[d]) == pytest.approx(hits / 30)


def test_dimension_selection_hand_values():
    # dimension 0 separates the classes (centroids 0 and 10), dimension 1 does not (both centroids 0.5)
    features = torch.tensor([[0.0, 0.0], [0.0, 1.0], [10.0, 1.0], [10.0, 0.0]])
    labels = torch.tensor([0, 0, 1, 1])
    accuracy = dimension_discriminability(features, labels, 2)
    assert accuracy.tolist() == [1.0, 0.5]  # a tie goes to the first class: half of dimension 1 is right
    assert discriminative_dimensions(accuracy).tolist() == [True, False]
    chosen = {"a": torch.tensor([True, True, False]), "v": torch.tensor([False, True, True])}
    assert decoupled_dimensions(chosen, "a", "v").tolist() == [True, False, False]
    assert decoupled_dimensions(chosen, "v", "a").tolist() == [False, False, True]


def test_contrastive_loss_matches_the_released_loop_and_leaves_the_teacher_alone():
    g = torch.Generator().manual_seed(1)
    student = torch.randn(4, 6, generator=g, requires_grad=True)
    teacher = torch.randn(4, 6, generator=g, requires_grad=True)
    dims = torch.tensor([True, False, True, True, False, False])
    T = 0.5
    got = dimension_decoupled_contrastive(student, teacher, dims, T)
    s, t = student.detach()[:, dims], teacher.detach()[:, dims]
    want = 0.0
    for i in range(4):
        num = math.exp(float(s[i] @ t[i]) / T)
        den = sum(math.exp(float(s[i] @ t[j]) / T) for j in range(4))
        want += -math.log(num / den)
    assert float(got.detach()) == pytest.approx(want / 4, rel=1e-5)
    got.backward()
    assert teacher.grad is None and student.grad is not None
    assert bool((student.grad[:, ~dims] == 0).all())
    valid = torch.tensor([True, False, True, True])
    sub = dimension_decoupled_contrastive(student[valid], teacher[valid], dims, T)
    assert float(dimension_decoupled_contrastive(student, teacher, dims, T, valid).detach()) == pytest.approx(float(sub.detach()))
    assert float(dimension_decoupled_contrastive(student, teacher, torch.zeros(6, dtype=torch.bool)).detach()) == 0.0


def test_confidence_weighted_logits_matches_a_naive_loop():
    g = torch.Generator().manual_seed(2)
    heads = [torch.randn(3, 4, generator=g) for _ in range(3)]
    got = confidence_weighted_logits(heads, temperature=0.7)
    for i in range(3):
        conf = [max(torch.softmax(h[i], 0).tolist()) for h in heads]
        e = [math.exp(c / 0.7) for c in conf]
        w = [x / sum(e) for x in e]
        want = sum(wk * h[i] for wk, h in zip(w, heads))
        assert torch.allclose(got[i], want, atol=1e-6)


def test_schedule_scales_the_released_one():
    m = make_method("dimml")
    assert (m.fusion_epochs(170), m.contrast_epoch(170)) == (20, 20)  # released: 150 + 20, contrast from 20
    assert (m.fusion_epochs(20), m.contrast_epoch(20)) == (2, 2)  # the demo's 20 epochs
    assert (m.fusion_epochs(1), m.contrast_epoch(1)) == (0, 0)  # a one-epoch run still contrasts
    m = make_method("dimml", {"contrast_epoch": 20, "fusion_epochs": 5})
    assert (m.fusion_epochs(10), m.contrast_epoch(10)) == (5, 20)


def test_dimml_refuses_other_fusions():
    splits, _ = synthetic(2)
    with pytest.raises(IncompatibleError, match="^method 'dimml' works with fusion sum, not 'concat'$"):
        Trainer(splits, make_method("dimml"), fast_config(model={"fusion": "concat"}), seed=0)


def test_stage_two_freezes_the_encoders_and_fuses_by_confidence():
    splits, _ = synthetic(2)
    method = make_method("dimml", {"fusion_epochs": 1})
    trainer = Trainer(splits, method, fast_config(trainer={"epochs": 2}), seed=0)
    trainer.setup()
    trainer.train_epoch(0)
    assert method.stage == 1 and method.have_dimensions  # contrast from round(1 * 20 / 150) = 0
    encoders = [p.detach().clone() for p in trainer.model.parameters()]
    head = method.fusion_head.weight.detach().clone()
    trainer.train_epoch(1)
    assert method.stage == 2
    assert all(torch.equal(a, p) for a, p in zip(encoders, trainer.model.parameters()))
    assert not torch.equal(head, method.fusion_head.weight)
    batch = next(iter(trainer.make_loader(splits.test, False)))
    trainer.model.eval()
    with torch.no_grad():
        out = trainer.model(batch)
        fused = method.fusion_head(torch.cat([out.features[m] for m in trainer.model.modalities], 1))
        want = confidence_weighted_logits([out.unimodal_logits[m] for m in trainer.model.modalities] + [fused])
        assert torch.allclose(method.predict(out, batch), want)


@pytest.mark.parametrize("n,missing", [(2, 0.3), (3, 0.0)])
def test_dimml_trains_end_to_end(n, missing):
    splits, _ = synthetic(n, missing_rate=missing)
    cfg = fast_config(trainer={"epochs": 3}, data={"missing_rate": missing})
    result = Trainer(splits, make_method("dimml"), cfg, seed=0).fit()
    assert result.test["accuracy"] > 0.6  # four classes: chance is 0.25
    assert any(k.startswith("dimensions/") for h in result.history for k in h["method"])


def test_dimml_fp16_and_resume(tmp_path):
    check_fp16("dimml", {})
    check_resume("dimml", {}, tmp_path)
