"""Estimator x actuator: ogm, ogm_ge and boost_weak are pairings of ``modulate``'s parts (bit for bit); the
shapley estimator, the loss-weight and feature-drop actuators against naive computations; pairings that
cannot work are refused in one sentence."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from conftest import fast_config, make_context, synthetic
from poise.errors import ConfigError, IncompatibleError
from poise.methods import make_method
from poise.methods.modulation import feature_drop_scale
from poise.train import Trainer


def final_weights(method, num_modalities=2, **trainer):
    splits, _ = synthetic(num_modalities)
    cfg = fast_config(trainer={"epochs": 2, **trainer})
    t = Trainer(splits, method, cfg, seed=5)
    result = t.fit()
    return {k: v.detach().clone() for k, v in t.model.state_dict().items()}, result


@pytest.mark.parametrize("named, options", [
    ("ogm", {}),
    ("ogm_ge", {"actuator": "grad_noise"}),
    ("boost_weak", {"direction": "boost_weak", "params": "all"}),
    ("boost_weak[lr]", {"direction": "boost_weak", "actuator": "lr"}),
])
def test_named_methods_are_pairings_of_modulate_bit_for_bit(named, options, one_thread):
    name, _, variant = named.partition("[")
    named_options = {"mode": "lr"} if variant else {}
    expected, r1 = final_weights(make_method(name, named_options))
    got, r2 = final_weights(make_method("modulate", options))
    for key in expected:
        assert torch.equal(expected[key], got[key]), key
    assert r1.history[-1]["method"] == r2.history[-1]["method"]
    assert r1.test == r2.test


def test_the_named_methods_keep_their_checkpoint_keys():
    splits, cfg = synthetic(2)
    method = make_method("ogm_ge")
    make_context(method, splits, cfg)
    assert set(method.state_dict()) == {"noise_generator"}


def naive_shapley_ratio(model, batch):
    """Two modalities, empty subset counted as 0: phi_a = (f(a,v) - f(v) + f(a)) / 2; the ratio of the
    summed true-class probabilities of the two responses."""
    def zeroed(drop):
        inputs = {m: (torch.zeros_like(x) if m == drop else x) for m, x in batch.inputs.items()}
        return model(replace(batch, inputs=inputs)).logits

    model.eval()
    with torch.no_grad():
        full, only_a, only_v = model(batch).logits, zeroed("visual"), zeroed("audio")
    model.train()
    phi = {"audio": (full - only_v + only_a) / 2, "visual": (full - only_a + only_v) / 2}
    s = {m: torch.softmax(p.double(), 1)[torch.arange(len(batch)), batch.labels].sum() for m, p in phi.items()}
    return torch.stack([s["audio"] / s["visual"], s["visual"] / s["audio"]])


def test_the_shapley_estimator_matches_a_naive_two_modality_computation():
    splits, cfg = synthetic(2)
    method = make_method("modulate", {"estimator": "shapley"})
    ctx, batch = make_context(method, splits, cfg)
    with torch.no_grad():
        output = ctx.model(batch)
    ratios, valid = method._estimator.estimate(output.unimodal_logits, batch, ("audio", "visual"), ctx, output.logits)
    assert bool(valid)
    expected = naive_shapley_ratio(ctx.model, batch)
    assert torch.allclose(ratios.double(), expected, rtol=1e-4)
    assert not torch.allclose(ratios, torch.ones(2))


def test_loss_weight_adds_unimodal_terms_weighted_by_the_slow_dominant_coefficients():
    splits, cfg = synthetic(2)
    method = make_method("modulate", {"actuator": "loss_weight", "alpha": 0.5})
    ctx, batch = make_context(method, splits, cfg)
    output = ctx.model(batch)
    terms = method.loss(output, batch)
    assert set(terms) == {"ce", "uni/audio", "uni/visual"}
    z = {m: output.unimodal_logits[m].detach().double() for m in ("audio", "visual")}
    s = {m: torch.softmax(v, 1)[torch.arange(len(batch)), batch.labels].sum() for m, v in z.items()}
    rho = {"audio": s["audio"] / s["visual"], "visual": s["visual"] / s["audio"]}
    for m in z:
        k = 1 - torch.tanh(0.5 * rho[m]) if rho[m] > 1 else torch.tensor(1.0, dtype=torch.float64)
        ce = F.cross_entropy(z[m], batch.labels)
        assert float(terms[f"uni/{m}"].detach()) == pytest.approx(float(k * ce), rel=1e-5)
    assert float(terms["ce"].detach()) == pytest.approx(float(F.cross_entropy(output.logits.detach(), batch.labels)), rel=1e-6)


def test_feature_drop_keeps_each_modality_with_probability_k_and_rescales_by_one_over_k():
    k = torch.tensor([0.3, 1.0])
    keep, scale = feature_drop_scale(k, 20_000, torch.Generator().manual_seed(0))
    assert keep[:, 1].all()
    assert float(keep[:, 0].float().mean()) == pytest.approx(0.3, abs=0.01)
    assert torch.allclose(scale[keep[:, 0], 0], torch.full((int(keep[:, 0].sum()),), 1 / 0.3))
    assert (scale[~keep[:, 0], 0] == 0).all()
    # inverted dropout: the expected multiplier is 1
    assert float(scale[:, 0].mean()) == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("options", [
    {"actuator": "feature_drop"},
    {"actuator": "loss_weight", "estimator": "shapley"},
    {"actuator": "lr", "direction": "boost_weak"},
])
def test_other_pairings_train_and_record_their_decisions(options, one_thread):
    _, result = final_weights(make_method("modulate", options), 3)
    records = result.history[-1]["method"]
    assert {"ratio/audio", "coef/visual", "ratio/text"} <= set(records)
    assert all(torch.isfinite(torch.tensor(v)) for v in records.values())
    if options["actuator"] == "feature_drop":
        # the strongest modality is dropped now and then; the weakest never
        assert records["kept/text"] == 1.0
        assert records["kept/audio"] < 1.0


@pytest.mark.parametrize("options, words", [
    ({"actuator": "feature_drop", "direction": "boost_weak"}, "feature_drop can only slow"),
    ({"actuator": "feature_drop", "estimator": "shapley"}, "needs the fused output"),
])
def test_impossible_pairings_are_refused_in_one_sentence(options, words):
    with pytest.raises(ConfigError, match=words) as err:
        make_method("modulate", options)
    assert "\n" not in str(err.value)


def test_a_loss_weight_pairing_runs_with_ogm_and_a_feature_drop_one_conflicts_with_modality_dropout():
    combined = make_method("modulate+ogm_ge", {"modulate": {"actuator": "loss_weight"}})
    splits, _ = synthetic(2)
    result = Trainer(splits, combined, fast_config(trainer={"epochs": 1}), seed=0).fit()
    assert {"ce", "uni/audio", "uni/visual"} == set(result.history[0]["train_terms"])
    # both parts record ratios and coefficients: each under its own name
    assert {"modulate/coef/audio", "ogm_ge/coef/audio"} <= set(result.history[0]["method"])
    with pytest.raises(IncompatibleError, match="both act on the step's feature masks"):
        make_method("modulate+modality_dropout", {"modulate": {"actuator": "feature_drop"}})
    # with its gradient actuator modulate acts after the backward and pairs with modality dropout
    make_method("modulate+modality_dropout")


def test_per_batch_actuators_refuse_accumulation_in_one_sentence():
    splits, _ = synthetic(2)
    cfg = fast_config(trainer={"epochs": 1, "accumulate": 2})
    with pytest.raises(IncompatibleError, match="loss_weight|reads its confidence ratio") as err:
        Trainer(splits, make_method("modulate", {"actuator": "loss_weight"}), cfg, seed=0).fit()
    assert "\n" not in str(err.value)


def test_the_cli_pairs_an_estimator_with_another_actuator(tmp_path):
    from poise.cli import main

    out = tmp_path / "run"
    assert main(["train", "--dataset", "synthetic", "--method", "modulate", "--out", str(out),
                 "--set", "trainer.epochs=1", "--set", "trainer.progress=false", "--set", "trainer.tensorboard=false",
                 "--set", "trainer.probe=false", "--set", "dataset.num_samples=160",
                 "--set", "method.modulate.actuator=loss_weight", "--set", "method.modulate.alpha=0.3"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "modulate"
    assert any(k.startswith("coef/") for k in result["history"][0]["method"])
