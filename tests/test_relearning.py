"""Diagnosing & Re-learning: purity, scaling and re-initialisation against hand computations and naive
loops, and the method's schedule inside a run."""

import math

import numpy as np
import pytest
import torch

from conftest import fast_config, synthetic
from method_checks import check_accumulation, check_fp16, check_resume
from poise.functional.relearning import (
    clustering_purity,
    kmeans_purity,
    minmax_scale,
    reinitialise,
    relearning_strength,
)
from poise.methods import make_method
from poise.train import Trainer


def naive_purity(assignments, labels):
    total = 0
    for k in set(assignments):
        members = [y for a, y in zip(assignments, labels) if a == k]
        total += max(members.count(c) for c in set(members))
    return total / len(labels)


def test_purity_by_hand_and_against_a_loop():
    # cluster 0: labels 1, 1, 2 -> 2; cluster 1: 0, 0 -> 2; cluster 2: 2 -> 1; purity 5 / 6
    assert clustering_purity(np.array([0, 0, 0, 1, 1, 2]), np.array([1, 1, 2, 0, 0, 2])) == pytest.approx(5 / 6)
    rng = np.random.default_rng(0)
    for _ in range(5):
        a, y = rng.integers(0, 4, 50), rng.integers(0, 3, 50)
        assert clustering_purity(a, y) == pytest.approx(naive_purity(list(a), list(y)))


def test_minmax_scale_to_minus_one_one():
    x = np.array([[0.0, 5.0, 1.0], [2.0, 5.0, 3.0], [1.0, 5.0, 2.0]])
    assert minmax_scale(x).tolist() == [[-1.0, -1.0, -1.0], [1.0, -1.0, 1.0], [0.0, -1.0, 0.0]]


def test_kmeans_purity_of_separated_clusters_is_one():
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    y = np.repeat(np.arange(3), 20)
    x = centres[y] + rng.normal(scale=0.1, size=(60, 2))
    assert kmeans_purity(x, y, 3) == 1.0
    assert kmeans_purity(x, rng.permutation(y), 3) < 0.7


def test_strength_and_reinitialisation_by_hand():
    assert relearning_strength(0.9, 0.6, 3.0) == pytest.approx(math.tanh(0.9))
    assert relearning_strength(0.6, 0.9, 3.0) == pytest.approx(math.tanh(0.9))
    p = torch.tensor([4.0, -2.0])
    reinitialise([p], [torch.tensor([0.0, 2.0])], 0.25)  # 0.25 * theta0 + 0.75 * theta
    assert p.tolist() == pytest.approx([3.0, -1.0])


def test_reinitialises_on_schedule_towards_the_initial_weights():
    splits, _ = synthetic(2, num_samples=240)
    cfg = fast_config(trainer={"epochs": 5})
    method = make_method("relearning", {"interval": 2, "max_times": 1})
    calls = []
    original = method.on_epoch_end

    def on_epoch_end(epoch):
        model = method.ctx.model
        before = [p.detach().clone() for p in model.modality_parameters("audio")]
        original(epoch)
        after = [p.detach().clone() for p in model.modality_parameters("audio")]
        calls.append((epoch, before, after))

    method.on_epoch_end = on_epoch_end
    result = Trainer(splits, method, cfg, seed=0, method_name="relearning").fit()
    records = [h["method"] for h in result.history]
    assert [bool(r) for r in records] == [False, True, False, False, False]  # after epoch 2 only, once
    r = records[1]
    alpha = r["alpha/audio"]
    assert alpha == pytest.approx(math.tanh(3.0 * abs(r["purity_train/audio"] - r["purity_val/audio"])))
    assert r["purity_gap/audio"] == pytest.approx(r["purity_train/audio"] - r["purity_val/audio"])
    _, before, after = calls[1]
    initial = method.ctx.snapshots["relearning/initial/audio"]
    for b, a, p0 in zip(before, after, initial):
        assert torch.allclose(a, alpha * p0 + (1 - alpha) * b, atol=1e-6)
    assert method.times == 1


def test_missing_three_modalities_resume_fp16_and_accumulation(tmp_path):
    splits, cfg = synthetic(3, missing_rate=0.3, num_samples=200)
    cfg = fast_config(trainer={"epochs": 3}, data={"missing_rate": 0.3})
    result = Trainer(splits, make_method("relearning", {"interval": 1}), cfg, seed=0, method_name="relearning").fit()
    assert {"alpha/audio", "alpha/visual", "alpha/text"} <= set(result.history[0]["method"])
    check_resume("relearning", {"interval": 1}, tmp_path)
    check_fp16("relearning", {"interval": 1}, epochs=2)
    check_accumulation("relearning", {"interval": 1}, epochs=2)
