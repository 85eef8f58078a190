"""Gradient-Blending: the weight formula (paper and MultiBench forms, guard rules), the held-out split,
the estimation copies, the schedule, the blended loss and end-to-end training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import poise.methods.gblend as gblend_module
from poise.config import PRESET_DIR, build_config
from poise.data import load_dataset
from poise.errors import ConfigError, IncompatibleError
from poise.functional import gblend_weights
from poise.functional.gblend import (
    gblend_raw_weights,
    mix_with_uniform,
    normalise_blend_weights,
    overfitting_to_generalization,
)
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


def test_negative_overfitting_uses_its_magnitude():
    # the paper's OGR is |dO / dG|: a gap that shrank by 0.3 weighs as one that grew by 0.3
    train_end = dict(TRAIN_END, visual=1.4)  # visual: dO = (1.2 - 1.4) - (1.3 - 1.2) = -0.3
    # audio 0.3 / 0.2^2 = 7.5, visual 0.1 / 0.3^2 = 1.1111, fused 0.3 / 0.4^2 = 1.875
    raw = gblend_raw_weights(TRAIN_START, VAL_START, train_end, VAL_END)
    assert raw == pytest.approx({"audio": 7.5, "visual": 0.1 / 0.09, "fused": 1.875})
    total = 7.5 + 0.1 / 0.09 + 1.875
    w = gblend_weights(TRAIN_START, VAL_START, train_end, VAL_END)
    assert w == pytest.approx({"audio": 7.5 / total, "visual": (0.1 / 0.09) / total, "fused": 1.875 / total})
    # the sign of dO changes nothing: dO = +0.3 (train_end 0.8) gives the same raw weight
    assert gblend_raw_weights(TRAIN_START, VAL_START, dict(TRAIN_END, visual=0.8), VAL_END)["visual"] == pytest.approx(
        0.1 / 0.09)


def test_every_head_with_negative_overfitting():
    # avdigits seed 0 of the 2-epoch window: all three dO negative
    # visual dG 1.5537 dO -0.0006, audio dG 0.0323 dO -0.0169, fused dG 1.3396 dO -0.0268
    val_start = {"visual": 2.0, "audio": 2.0, "fused": 2.0}
    val_end = {"visual": 2.0 - 1.5537, "audio": 2.0 - 0.0323, "fused": 2.0 - 1.3396}
    train_start = {"visual": 2.0, "audio": 2.0, "fused": 2.0}
    # O_end = O_start + dO = dO, so L^T_end = L^V_end - dO
    train_end = {"visual": val_end["visual"] + 0.0006, "audio": val_end["audio"] + 0.0169,
                 "fused": val_end["fused"] + 0.0268}
    raw = {"visual": 1.5537 / 0.0006**2, "audio": 0.0323 / 0.0169**2, "fused": 1.3396 / 0.0268**2}
    total = sum(raw.values())
    w = gblend_weights(train_start, val_start, train_end, val_end)
    assert w == pytest.approx({h: raw[h] / total for h in raw}, rel=1e-6)
    # by hand: 4315833.3, 113.09, 1865.1 -> visual 0.99954, audio 0.0000262, fused 0.000432
    assert w["visual"] == pytest.approx(0.99954, abs=1e-5) and w["fused"] == pytest.approx(0.000432, abs=2e-6)


@pytest.mark.parametrize("train_end_visual", [1.1, 1.1 - 1e-6, 1.1 + 5e-5])  # dO ~ 0, 1e-6, -5e-5
def test_overfitting_near_zero_is_guarded(train_end_visual):
    train_end = dict(TRAIN_END, visual=train_end_visual)
    raw = gblend_raw_weights(TRAIN_START, VAL_START, train_end, VAL_END)
    assert raw["visual"] == pytest.approx(0.1 / 1e-4**2)
    assert raw["audio"] == pytest.approx(7.5)
    raw = gblend_raw_weights(TRAIN_START, VAL_START, train_end, VAL_END, floor=0.05)
    assert raw["visual"] == pytest.approx(0.1 / 0.05**2)
    # dO exactly 0 (losses exact in binary): dG / floor^2, no division by zero
    # a: dG = 0.5, dO = (1.0 - 0.5) - (1.5 - 1.0) = 0; fused: dG = 0.5, dO = (1.0 - 0.75) - 0.5 = -0.25
    exact = gblend_raw_weights({"a": 1.0, "fused": 1.0}, {"a": 1.5, "fused": 1.5}, {"a": 0.5, "fused": 0.75},
                               {"a": 1.0, "fused": 1.0})
    assert exact == pytest.approx({"a": 0.5 / 1e-8, "fused": 8.0})
    # above the guard, |dO| is used as it is: dO = -0.06 with floor 0.05
    train_end = dict(TRAIN_END, visual=1.16)
    assert gblend_raw_weights(TRAIN_START, VAL_START, train_end, VAL_END, floor=0.05)["visual"] == pytest.approx(
        0.1 / 0.06**2)


def test_every_head_without_gain_gives_uniform_weights():
    val_end = {h: v + 0.5 for h, v in VAL_START.items()}
    w = gblend_weights(TRAIN_START, VAL_START, TRAIN_END, val_end)
    assert w == pytest.approx({"audio": 1 / 3, "visual": 1 / 3, "fused": 1 / 3})
    raw = gblend_raw_weights(TRAIN_START, VAL_START, TRAIN_END, val_end)
    assert raw == {"audio": 0.0, "visual": 0.0, "fused": 0.0}
    assert normalise_blend_weights(raw) == ({"audio": 1 / 3, "visual": 1 / 3, "fused": 1 / 3}, True)
    # one head with a gain: no fallback, it takes all the weight
    assert normalise_blend_weights(dict(raw, fused=2.0)) == ({"audio": 0.0, "visual": 0.0, "fused": 1.0}, False)


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


def _schedule(method: GradientBlending, epochs: int) -> list[tuple[int, int]]:
    """(epoch, window) of every estimate of an ``epochs``-epoch run."""
    return [(e, method.estimation_window(e, epochs)) for e in range(epochs) if method.is_estimation_epoch(e)]


def test_schedule_and_window_follow_the_papers_algorithms():
    # Algorithm 1 (offline): one estimate from the initial model, its copies trained for the whole run
    assert _schedule(GradientBlending({"mode": "offline"}), 20) == [(0, 20)]
    # Algorithm 2 (online): an estimate at the start of every super-epoch, over that super-epoch
    assert _schedule(GradientBlending({"mode": "online", "super_epoch": 5}), 20) == [(0, 5), (5, 5), (10, 5), (15, 5)]
    # options: a fixed window (poise's earlier 2-epoch default) and a later first re-estimate
    assert _schedule(GradientBlending({"mode": "offline", "estimate_epochs": 2}), 20) == [(0, 2)]
    online = GradientBlending({"mode": "online", "warmup_epochs": 10, "super_epoch": 5})
    assert _schedule(online, 30) == [(0, 10), (10, 5), (15, 5), (20, 5), (25, 5)]


def test_the_shipped_preset_estimates_when_its_comment_says():
    from poise.config import load_config_file

    preset = load_config_file("cremad_gblend")
    method = make_method("gblend", preset["method"]["gblend"])
    epochs = preset["trainer"]["epochs"]
    assert _schedule(method, epochs) == [(e, 5) for e in range(0, epochs, 5)]
    assert "epochs 0, 5, ..., 95" in (Path(PRESET_DIR) / "cremad_gblend.yaml").read_text()


def test_estimates_happen_at_the_scheduled_epochs_for_their_window(monkeypatch):
    calls: list[int] = []  # the epoch of each estimation-copy training epoch
    original = gblend_module.train_networks

    def counting(networks, optimizers, loader, device, grad_clip):
        calls.append(ctx_epoch[0])
        original(networks, optimizers, loader, device, grad_clip)

    monkeypatch.setattr(gblend_module, "train_networks", counting)
    cfg = _config(epochs=6)
    splits = _splits(cfg, num_samples=120)

    class Tracked(GradientBlending):
        def estimate(self, epoch=None):
            ctx_epoch[0] = epoch
            return super().estimate(epoch)

    ctx_epoch = [None]
    method = Tracked({"mode": "online", "super_epoch": 2})
    result = Trainer(splits, method, cfg, seed=0).fit()
    assert [(h["epoch"], h["window"]) for h in method.history] == [(0, 2), (2, 2), (4, 2)]
    assert calls == [0, 0, 2, 2, 4, 4]
    # the weights in force each epoch are the ones estimated last
    for entry in result.history:
        last = [h for h in method.history if h["epoch"] <= entry["epoch"]][-1]
        for head, w in last["weights"].items():
            assert entry["method"][f"weight/{head}"] == pytest.approx(w, abs=1e-6)

    calls.clear()
    method = Tracked({"mode": "offline"})
    Trainer(splits, method, cfg, seed=0).fit()
    assert [(h["epoch"], h["window"]) for h in method.history] == [(0, 6)]
    assert calls == [0] * 6


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
        assert set(entry["method"]) == {f"weight/{h}" for h in heads} | {"fallback_uniform"}
        assert sum(entry["method"][f"weight/{h}"] for h in heads) == pytest.approx(1.0, abs=1e-5)
        assert entry["method"]["fallback_uniform"] == 0.0
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
