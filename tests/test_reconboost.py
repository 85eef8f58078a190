"""ReconBoost: the losses and the schedule against hand computations, and the alternating phases in a run."""

import math

import pytest
import torch

from conftest import fast_config, synthetic
from method_checks import check_accumulation, check_fp16, check_resume
from poise.functional.reconboost import boosting_loss, ensemble_logits, ga_loss, reconboost_schedule
from poise.methods import make_method
from poise.train import Trainer


def softmax(row):
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def test_boosting_loss_by_hand():
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
    ensemble = torch.tensor([[0.0, 2.0, 0.0], [1.0, 1.0, 1.0]])
    labels = torch.tensor([0, 2])
    got = boosting_loss(logits, ensemble, labels, w1=5.0, w2=1.0)
    for i, (z, e, y) in enumerate(zip(logits.tolist(), ensemble.tolist(), labels.tolist())):
        log_p, p_bar = math.log(softmax(z)[y]), softmax(e)[y]
        assert float(got[i]) == pytest.approx((-5.0 * log_p + 1.0 * p_bar * log_p) / 3)


def test_ga_loss_by_hand_and_detached_has_no_gradient():
    z = torch.tensor([[1.0, 0.0]], requires_grad=True)
    prev = torch.tensor([[0.0, 1.0]])
    p, q = softmax([1.0, 0.0]), softmax([0.0, 1.0])
    loss = ga_loss(z, prev)
    assert loss.item() == pytest.approx(((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2) / 2)
    loss.backward()
    assert z.grad.abs().sum() > 0
    assert not ga_loss(z, prev, detached=True).requires_grad


def test_ensemble_and_schedule():
    uni = {"audio": torch.tensor([[1.0, 2.0]]), "visual": torch.tensor([[3.0, -1.0]])}
    b = torch.tensor(0.5)
    assert ensemble_logits(uni, ["audio", "visual"], b).tolist() == [[2.0, 0.5]]
    assert ensemble_logits(uni, ["audio", "visual"], b, {"audio": torch.tensor([False]),
                                                         "visual": torch.tensor([True])}).tolist() == [[1.5, -0.5]]
    assert ensemble_logits(uni, [], b).tolist() == [[0.0, 0.0]]
    mods = ("audio", "visual")
    assert [reconboost_schedule(e, mods, 2) for e in range(9)] == [
        (0, "audio", "boost"), (0, "audio", "boost"), (0, "audio", "rectify"), (0, "audio", "rectify"),
        (1, "visual", "boost"), (1, "visual", "boost"), (1, "visual", "rectify"), (1, "visual", "rectify"),
        (2, "audio", "boost")]


def test_phases_freeze_the_other_encoders_and_learners_join():
    splits, _ = synthetic(2, num_samples=240)
    cfg = fast_config(trainer={"epochs": 4})
    method = make_method("reconboost", {"epochs_per_phase": 1})
    snapshots = []
    original = method.on_epoch_end

    def on_epoch_end(epoch):
        model = method.ctx.model
        snapshots.append(({m: [p.detach().clone() for p in model.modality_parameters(m)] for m in ("audio", "visual")},
                          float(method.boost_rate.detach()), list(method.learners)))
        original(epoch)

    method.on_epoch_end = on_epoch_end
    trainer = Trainer(splits, method, cfg, seed=0, method_name="reconboost")
    result = trainer.fit()
    assert result.test["accuracy"] > 0.5
    # epoch 0 boosts audio: visual and b unchanged; epoch 1 rectifies: both move, b too
    (w0, b0, l0), (w1, b1, l1), (w2, b2, l2), _ = snapshots
    assert b0 == 1.0 and b1 != 1.0 and b2 == b1
    assert all(torch.equal(a, b) for a, b in zip(w1["audio"], w2["audio"]))  # epoch 2 boosts visual
    assert not all(torch.equal(a, b) for a, b in zip(w1["visual"], w2["visual"]))
    assert l0 == [] and method.learners == ["audio", "visual"]
    assert [h["method"]["learners"] for h in result.history] == [1.0, 1.0, 2.0, 2.0]
    # each epoch's entry names the phase it trained in (the decision plot shades them)
    assert [h["phase"] for h in result.history] == ["boost/audio", "rectify", "boost/visual", "rectify"]


def test_three_modalities_missing_resume_fp16_and_accumulation(tmp_path):
    splits, _ = synthetic(3, missing_rate=0.3, num_samples=200)
    cfg = fast_config(trainer={"epochs": 4}, data={"missing_rate": 0.3})
    method = make_method("reconboost", {"epochs_per_phase": 1})
    result = Trainer(splits, method, cfg, seed=0, method_name="reconboost").fit()
    assert all(math.isfinite(h["train_loss"]) for h in result.history) and method.learners == ["audio", "visual"]
    check_resume("reconboost", {"epochs_per_phase": 1}, tmp_path)
    check_fp16("reconboost", {"epochs_per_phase": 1}, epochs=2)
    check_accumulation("reconboost", {"epochs_per_phase": 1}, epochs=3)
