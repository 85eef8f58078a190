"""Gradient-Blending: the weight formula (paper and MultiBench forms, guard rules), the held-out split,
the estimation copies, the schedule, the blended loss and end-to-end training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import poise.methods.gblend as gblend_module
from poise.config import build_config
from poise.data import load_dataset
from poise.errors import ConfigError, IncompatibleError
from poise.functional import gblend_weights
from poise.functional.gblend import gblend_raw_weights, mix_with_uniform, overfitting_to_generalization
from poise.methods import make_method
from poise.methods.gblend import GradientBlending, mean_losses
from poise.train import Trainer
from poise.train.context import TrainContext

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these models are tiny: one thread is faster than several competing ones
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the weight formula ----------------------------------------------------------------------------

TRAIN_START = {"audio": 1.0, "visual": 1.2, "fused": 1.1}
VAL_START = {"audio": 1.1, "visual": 1.3, "fused": 1.2}
TRAIN_END = {"audio": 0.5, "visual": 1.0, "fused": 0.4}
VAL_END = {"audio": 0.8, "visual": 1.2, "fused": 0.9}


def test_paper_form_by_hand():
    # audio:  dG = 1.1 - 0.8 = 0.3, dO = (0.8 - 0.5) - (1.1 - 1.0) = 0.2, raw = 0.3 / 0.04 = 7.5
    # visual: dG = 1.3 - 1.2 = 0.1, dO = (1.2 - 1.0) - (1.3 - 1.2) = 0.1, raw = 0.1 / 0.01 = 10
    # fused:  dG = 1.2 - 0.9 = 0.3, dO = (0.9 - 0.4) - (1.2 - 1.1) = 0.4, raw = 0.3 / 0.16 = 1.875
    total = 7.5 + 10 + 1.875
    w = gblend_weights(TRAIN_START, VAL_START, TRAIN_END, VAL_END)
    assert list(w) == ["audio", "visual", "fused"]
    assert w["audio"] == pytest.approx(7.5 / total)
    assert w["visual"] == pytest.approx(10 / total)
    assert w["fused"] == pytest.approx(1.875 / total)
    deltas = overfitting_to_generalization(TRAIN_START, VAL_START, TRAIN_END, VAL_END)
    assert deltas["fused"] == pytest.approx((0.3, 0.4))


def test_multibench_form_by_hand():
    # G = L^V_{N+n}, O = L^V_{N+n} - L^T_{N+n}: audio 0.8 / 0.3^2, visual 1.2 / 0.2^2, fused 0.9 / 0.5^2
    raw = {"audio": 0.8 / 0.09, "visual": 1.2 / 0.04, "fused": 0.9 / 0.25}
    total = sum(raw.values())
    w = gblend_weights(TRAIN_START, VAL_START, TRAIN_END, VAL_END, form="multibench")
    for h in raw:
        assert w[h] == pytest.approx(raw[h] / total)
    # the losses at N play no part in the MultiBench form
    other_start = {"audio": 9.0, "visual": 0.1, "fused": 3.0}
    assert gblend_weights(other_start, other_start, TRAIN_END, VAL_END, form="multibench") == pytest.approx(w)


def test_multibench_floors_negative_and_zero_overfitting_only():
    train_end = {"a": 0.9, "b": 0.6, "c": 0.7, "fused": 0.5}
    val_end = {"a": 0.8, "b": 0.6, "c": 0.70005, "fused": 0.7}
    raw = gblend_raw_weights(train_end, val_end, train_end, val_end, form="multibench")
    assert raw["a"] == pytest.approx(0.8 / 1e-4**2)  # O = -0.1 -> 1e-4
    assert raw["b"] == pytest.approx(0.6 / 1e-4**2)  # O = 0 -> 1e-4 (MultiBench divides by zero)
    assert raw["c"] == pytest.approx(0.70005 / 0.00005**2, rel=1e-4)  # 0 < O < 1e-4 is kept, as in MultiBench
    assert raw["fused"] == pytest.approx(0.7 / 0.04)


@pytest.mark.parametrize("form", ["paper", "multibench"])
def test_weights_are_normalised(form):
    g = torch.Generator().manual_seed(0)
    heads = ["a", "b", "c", "fused"]
    for _ in range(20):
        tables = [dict(zip(heads, (torch.rand(4, generator=g) * 2 + 0.1).tolist())) for _ in range(4)]
        w = gblend_weights(*tables, form=form)
        assert sum(w.values()) == pytest.approx(1.0)
        assert all(v >= 0 for v in w.values())


def test_no_generalisation_gain_gets_zero_weight():
    val_end = dict(VAL_END, visual=1.3)  # dG = 0 exactly
    w = gblend_weights(TRAIN_START, VAL_START, TRAIN_END, val_end)
    assert w["visual"] == 0.0
    assert w["audio"] == pytest.approx(7.5 / (7.5 + 1.875))
    val_end = dict(VAL_END, visual=1.5)  # held-out loss rose: dG < 0
    assert gblend_weights(TRAIN_START, VAL_START, TRAIN_END, val_end)["visual"] == 0.0


@pytest.mark.parametrize("train_end_visual", [1.1, 1.3])  # dO = 0, dO = -0.2
def test_non_positive_overfitting_is_floored(train_end_visual):
    train_end = dict(TRAIN_END, visual=train_end_visual)
    raw = gblend_raw_weights(TRAIN_START, VAL_START, train_end, VAL_END)
    assert raw["visual"] == pytest.approx(0.1 / 1e-4**2)
    assert raw["audio"] == pytest.approx(7.5)
    raw = gblend_raw_weights(TRAIN_START, VAL_START, train_end, VAL_END, floor=0.05)
    assert raw["visual"] == pytest.approx(0.1 / 0.05**2)
    # a small positive dO below the floor is raised to it as well
    train_end = dict(TRAIN_END, visual=1.1 - 1e-6)
    assert gblend_raw_weights(TRAIN_START, VAL_START, train_end, VAL_END, floor=0.05)["visual"] == pytest.approx(0.1 / 0.05**2)


def test_every_head_without_gain_gives_uniform_weights():
    w = gblend_weights(TRAIN_START, VAL_START, TRAIN_END, {h: v + 0.5 for h, v in VAL_START.items()})
    assert w == pytest.approx({"audio": 1 / 3, "visual": 1 / 3, "fused": 1 / 3})


def test_mix_with_uniform():
    w = mix_with_uniform({"a": 0.0, "b": 0.25, "fused": 0.75}, 0.1)
    # m + (1 - 3 m) w: 0.1 + 0.7 * (0, 0.25, 0.75)
    assert w == pytest.approx({"a": 0.1, "b": 0.275, "fused": 0.625})
    assert mix_with_uniform({"a": 0.2, "fused": 0.8}, 0.0) == {"a": 0.2, "fused": 0.8}
    with pytest.raises(ValueError):
        mix_with_uniform({"a": 0.2, "fused": 0.8}, 0.6)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="names heads"):
        gblend_weights(TRAIN_START, VAL_START, TRAIN_END, {"audio": 1.0, "fused": 1.0})
    with pytest.raises(ValueError, match="finite"):
        gblend_weights(TRAIN_START, VAL_START, TRAIN_END, dict(VAL_END, audio=math.nan))
    with pytest.raises(ValueError, match="form"):
        gblend_weights(TRAIN_START, VAL_START, TRAIN_END, VAL_END, form="balancebenchmark")


# ---- the method --------------------------------------------------------------------------------------


def _config(**trainer):
    return build_config({
        "trainer": {
            "epochs": 2, "batch_size": 32, "lr": 0.05, "progress": False, "tensorboard": False, "probe": False, **trainer,
        },
    })


def _splits(cfg, num_samples=240, missing_rate=0.0, modalities=None):
    cfg.data.missing_rate = missing_rate
    options = {"num_samples": num_samples}
    if modalities is not None:
        options["modalities"] = modalities
    return load_dataset("synthetic", options, cfg.data)


def _context(splits, method, cfg, seed=0) -> TrainContext:
    trainer = Trainer(splits, method, cfg, seed=seed)
    model = trainer.build_model()
    optimizer = trainer.build_optimizer(model.parameters())
    return TrainContext(
        model=model, optimizer=optimizer, config=cfg, info=splits.info, splits=splits, device=trainer.device,
        seed=seed, make_loader=trainer.make_loader, build_model=trainer.build_model, build_optimizer=trainer.build_optimizer,
    )


def test_one_modality_is_refused():
    cfg = _config()
    splits = _splits(cfg, modalities={"audio": {}})
    with pytest.raises(IncompatibleError, match="at least 2 modalities"):
        Trainer(splits, make_method("gblend"), cfg)


def test_options_are_validated():
    with pytest.raises(ConfigError):
        make_method("gblend", {"mode": "sometimes"})
    with pytest.raises(ConfigError):
        make_method("gblend", {"estimate_subset": 2.5})
    with pytest.raises(ConfigError):
        make_method("gblend", {"holdout_fraction": 0.0})
    cfg = _config()
    splits = _splits(cfg, modalities={"a": {}, "b": {}, "c": {}})
    with pytest.raises(IncompatibleError, match="min_weight"):
        Trainer(splits, make_method("gblend", {"min_weight": 0.3}), cfg)


class _RecordingGBlend(GradientBlending):
    """Remembers the training-split indices of every training step."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[int] = []

    def on_step_start(self, batch):
        self.seen.extend(batch.index.tolist())
        return None


def test_holdout_is_disjoint_from_what_is_trained_on_and_from_val_and_test(monkeypatch):
    cfg = _config()
    splits = _splits(cfg)
    estimation_seen: list[int] = []
    original = gblend_module.train_networks

    def recording_train_networks(networks, optimizers, loader, device, grad_clip):
        for batch in loader:
            estimation_seen.extend(batch.index.tolist())
        original(networks, optimizers, loader, device, grad_clip)

    monkeypatch.setattr(gblend_module, "train_networks", recording_train_networks)
    method = _RecordingGBlend({"holdout_fraction": 0.1, "estimate_subset": 0.5, "estimate_epochs": 1})
    Trainer(splits, method, cfg, seed=0).fit()

    n_train = len(splits.train)
    holdout, train_rows = set(method.holdout_rows.tolist()), set(method.train_rows.tolist())
    assert len(holdout) == pytest.approx(0.1 * n_train, abs=4)
    assert holdout.isdisjoint(train_rows) and holdout | train_rows == set(range(n_train))
    # every training step drew only from the training part, and saw all of it
    assert set(method.seen) == train_rows
    assert len(method.seen) == 2 * len(train_rows)
    # the estimation copies trained on T', a subset of the training part, never on V
    assert set(estimation_seen) == set(method.estimate_rows.tolist())
    assert set(estimation_seen) <= train_rows and len(set(estimation_seen)) == round(0.5 * len(train_rows))
    # V holds no sample of the model-selection split or the test split (samples compared by content)
    held = splits.train.inputs["audio"][sorted(holdout)]
    for other in (splits.val, splits.test):
        same = (held[:, None, :] == other.inputs["audio"][None, :, :]).all(-1)
        assert not same.any()


def test_estimate_subset_as_count():
    cfg = _config()
    splits = _splits(cfg)
    method = make_method("gblend", {"estimate_subset": 50, "estimate_epochs": 1})
    method.setup(_context(splits, method, cfg))
    method.estimate(0)
    assert len(method.estimate_rows) == 50 and set(method.estimate_rows.tolist()) <= set(method.train_rows.tolist())


def test_estimation_leaves_the_real_model_heads_and_optimizer_unchanged():
    cfg = _config()
    splits = _splits(cfg)
    method = make_method("gblend", {"estimate_epochs": 2})
    ctx = _context(splits, method, cfg)
    method.setup(ctx)
    # one real step first, so that the optimizer carries momentum that the copies must not touch
    batch = next(iter(ctx.make_loader(splits.train, False)))
    output = ctx.model(batch)
    torch.stack(list(method.loss(output, batch).values())).sum().backward()
    ctx.optimizer_step()
    model_before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    heads_before = {k: v.clone() for k, v in method.heads.state_dict().items()}
    momentum_before = [ctx.optimizer.state[p]["momentum_buffer"].clone() for p in ctx.model.parameters()]

    weights = method.estimate(0)

    for k, v in ctx.model.state_dict().items():
        assert torch.equal(v, model_before[k]), k
    for k, v in method.heads.state_dict().items():
        assert torch.equal(v, heads_before[k]), k
    for p, m in zip(ctx.model.parameters(), momentum_before):
        assert torch.equal(ctx.optimizer.state[p]["momentum_buffer"], m)
        assert p.grad is None
    # the copies did train: every head's train loss fell, and the weights moved off uniform
    record = method.history[-1]
    for h in ("audio", "visual", "fused"):
        assert record["train_end"][h] < record["train_start"][h]
    assert weights != pytest.approx({h: 1 / 3 for h in weights})
    assert method.weights == weights


def test_mean_losses_reduce_sums_and_counts_across_ranks(monkeypatch):
    cfg = _config()
    splits = _splits(cfg)
    method = make_method("gblend")
    ctx = _context(splits, method, cfg)
    method.setup(ctx)
    networks = method.estimation_copies()
    loader = ctx.make_loader(splits.val, False)
    local = mean_losses(networks, loader, ctx.device)
    # a second rank that saw 10 samples of each head with summed loss 50 (mean 5)
    k = len(networks)
    other_rank = torch.tensor([50.0] * k + [10.0] * k, dtype=torch.float64)
    monkeypatch.setattr(gblend_module, "all_reduce_sum", lambda t: t + other_rank.to(t.device))
    reduced = mean_losses(networks, loader, ctx.device)
    n = len(splits.val)
    for h in networks:
        assert reduced[h] == pytest.approx((local[h] * n + 50.0) / (n + 10))


def test_an_estimate_without_usable_losses_keeps_the_weights(monkeypatch):
    cfg = _config()
    splits = _splits(cfg)
    method = make_method("gblend", {"estimate_epochs": 1})
    method.setup(_context(splits, method, cfg))
    first = method.estimate(0)
    original = gblend_module.mean_losses

    def no_visual_samples(networks, loader, device):
        return dict(original(networks, loader, device), visual=math.nan)

    monkeypatch.setattr(gblend_module, "mean_losses", no_visual_samples)
    assert method.estimate(1) == first
    assert method.weights == first and method.history[-1]["estimated"] == {}


def test_offline_estimates_once_and_online_on_schedule():
    offline = GradientBlending({"mode": "offline"})
    assert [e for e in range(20) if offline.is_estimation_epoch(e)] == [0]
    online = GradientBlending({"mode": "online", "warmup_epochs": 10, "super_epoch": 5})
    assert [e for e in range(30) if online.is_estimation_epoch(e)] == [0, 10, 15, 20, 25]

    cfg = _config(epochs=6)
    splits = _splits(cfg, num_samples=120)
    method = make_method("gblend", {"mode": "online", "warmup_epochs": 3, "super_epoch": 2, "estimate_epochs": 1})
    result = Trainer(splits, method, cfg, seed=0).fit()
    assert [h["epoch"] for h in method.history] == [0, 3, 5]
    # the weights in force each epoch are the ones estimated last
    for entry in result.history:
        last = [h for h in method.history if h["epoch"] <= entry["epoch"]][-1]
        for head, w in last["weights"].items():
            assert entry["method"][f"weight/{head}"] == pytest.approx(w, abs=1e-6)

    method = make_method("gblend", {"mode": "offline", "estimate_epochs": 1})
    Trainer(splits, method, cfg, seed=0).fit()
    assert [h["epoch"] for h in method.history] == [0]


def test_loss_is_the_weighted_sum_of_a_naive_reference():
    cfg = _config()
    splits = _splits(cfg, missing_rate=0.4)
    method = make_method("gblend")
    ctx = _context(splits, method, cfg)
    method.setup(ctx)
    weights = {"audio": 0.5, "visual": 0.2, "fused": 0.3}
    method.load_state_dict({"weights": weights})
    batch = next(iter(ctx.make_loader(splits.train, False)))
    assert not batch.present.all()
    output = ctx.model(batch)
    total = torch.stack(list(method.loss(output, batch).values())).sum()

    expected = 0.0
    for i in range(len(batch)):
        expected += weights["fused"] * F.cross_entropy(output.logits[i : i + 1], batch.labels[i : i + 1]) / len(batch)
    for j, m in enumerate(batch.modalities):
        rows = [i for i in range(len(batch)) if batch.present[i, j]]
        for i in rows:
            z = method.heads[m](output.features[m][i : i + 1])
            expected += weights[m] * F.cross_entropy(z, batch.labels[i : i + 1]) / len(rows)
    assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)


def test_state_dict_round_trip():
    cfg = _config()
    splits = _splits(cfg)
    method = make_method("gblend", {"estimate_epochs": 1})
    method.setup(_context(splits, method, cfg))
    method.estimate(0)
    state = method.state_dict()
    restored = make_method("gblend")
    restored.setup(_context(splits, restored, cfg, seed=1))
    restored.load_state_dict(state)  # setup always runs first: the heads exist
    assert restored.weights == method.weights
    for k, v in method.heads.state_dict().items():
        assert torch.equal(restored.heads.state_dict()[k], v)
    assert [h["epoch"] for h in restored.history] == [0]


THREE = {"audio": {"signal": 2.0}, "visual": {"signal": 1.0}, "text": {"signal": 0.5}}


@pytest.mark.parametrize("modalities, missing_rate", [(None, 0.0), (THREE, 0.0), (None, 0.3), (THREE, 0.3)])
def test_trains_end_to_end(modalities, missing_rate):
    cfg = _config(epochs=5)
    splits = _splits(cfg, num_samples=600, missing_rate=missing_rate, modalities=modalities)
    method = make_method("gblend", {"mode": "online", "warmup_epochs": 2, "super_epoch": 3, "estimate_epochs": 1})
    result = Trainer(splits, method, cfg, seed=0).fit()
    heads = (*splits.info.modalities, "fused")
    assert result.test["accuracy"] > 1.5 / splits.info.num_classes
    assert [h["epoch"] for h in method.history] == [0, 2]
    for entry in result.history:
        assert set(entry["method"]) == {f"weight/{h}" for h in heads}
        assert sum(entry["method"].values()) == pytest.approx(1.0, abs=1e-5)
        assert all(np.isfinite(entry["train_terms"][f"ce_{h}"]) for h in heads)


def test_non_decomposable_fusion_and_min_weight():
    # gated fusion: the method's own heads do not depend on the fusion being decomposable
    cfg = _config(epochs=2)
    cfg.model.fusion = "gated"
    splits = _splits(cfg, num_samples=200, missing_rate=0.3)
    method = make_method("gblend", {"estimate_epochs": 1, "min_weight": 0.1})
    result = Trainer(splits, method, cfg, seed=0).fit()
    record = method.history[0]
    assert record["weights"] == pytest.approx(mix_with_uniform(record["estimated"], 0.1))
    assert min(record["weights"].values()) >= 0.1 - 1e-12
    assert "aux_heads" in result.history[0]["train_terms"]
