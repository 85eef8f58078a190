"""Methods that act at different points run together (``ogm_ge+modality_dropout``); two that act at the
same point are refused in one sentence; combining with a method that acts nowhere changes nothing."""

from __future__ import annotations

import pytest

from conftest import fast_config, synthetic
from poise.errors import IncompatibleError
from poise.methods import make_method
from poise.methods.compose import Combined
from poise.train import Trainer


def test_ogm_ge_with_modality_dropout_trains_with_both_parts_acting():
    splits, _ = synthetic(2, num_samples=160)
    method = make_method("ogm_ge+modality_dropout", {"modality_dropout": {"p": 0.5}, "ogm_ge": {"alpha": 0.5}})
    assert isinstance(method, Combined) and method.name == "ogm_ge+modality_dropout"
    assert method.parts[0].params.alpha == 0.5 and method.parts[1].params.p == 0.5
    masks = []
    step = method.parts[1].on_step_start
    method.parts[1].on_step_start = lambda batch: masks.append(step(batch)) or masks[-1]
    result = Trainer(splits, method, fast_config(trainer={"epochs": 1}), seed=0, method_name=method.name).fit()
    assert any(k.startswith("coef/") for k in result.history[0]["method"])  # OGM-GE edited gradients
    assert masks and any(bool((s == 0).any()) for plan in masks for s in plan.feature_scale.values())  # dropout masked
    state = method.state_dict()
    assert set(state) == {"ogm_ge", "modality_dropout"} and "noise_generator" in state["ogm_ge"]


def test_methods_acting_at_the_same_point_are_refused_in_one_sentence():
    with pytest.raises(IncompatibleError, match="methods 'ogm_ge' and 'boost_weak' both act on the gradients"):
        make_method("ogm_ge+boost_weak")
    with pytest.raises(IncompatibleError, match="names a method twice"):
        make_method("ogm+ogm")


def test_combining_with_a_method_that_acts_nowhere_changes_no_number():
    splits, _ = synthetic(2, num_samples=160)
    cfg = fast_config(trainer={"epochs": 2})
    alone = Trainer(splits, make_method("ogm_ge"), cfg, seed=0).fit()
    combined = make_method("ogm_ge+joint")
    together = Trainer(splits, combined, cfg, seed=0).fit()
    assert together.test == alone.test
    assert [h["method"] for h in together.history] == [h["method"] for h in alone.history]
    assert [h["train_loss"] for h in together.history] == [h["train_loss"] for h in alone.history]


def test_a_combined_run_resumes_with_each_parts_state(tmp_path):
    from test_resume import Interrupt, interrupt_at, one_thread, without_seconds

    splits, _ = synthetic(2, num_samples=128)
    cfg = fast_config(trainer={"batch_size": 32, "checkpoint_every_steps": 1})
    spec = "ogm_ge+modality_dropout"
    with one_thread():
        expected = Trainer(splits, make_method(spec), cfg, seed=1, out_dir=tmp_path / "a", method_name=spec).fit()
        with pytest.raises(Interrupt):
            Trainer(splits, interrupt_at(make_method(spec), epoch=1, micro_batch=1), cfg, seed=1,
                    out_dir=tmp_path / "b", method_name=spec).fit()
        got = Trainer(splits, make_method(spec), cfg, seed=1, out_dir=tmp_path / "b", method_name=spec, resume=True).fit()
    assert without_seconds(got.to_dict()) == without_seconds(expected.to_dict())


def test_the_cli_trains_a_combination_with_each_parts_options(tmp_path):
    import json

    from poise.cli import main

    out = tmp_path / "run"
    assert main(["train", "--dataset", "synthetic", "--method", "ogm_ge+modality_dropout", "--out", str(out),
                 "--set", "trainer.epochs=1", "--set", "trainer.progress=false", "--set", "trainer.tensorboard=false",
                 "--set", "trainer.probe=false", "--set", "dataset.num_samples=160",
                 "--set", "method.modality_dropout.p=0.3"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["method"] == "ogm_ge+modality_dropout"
    assert any(k.startswith("coef/") for k in result["history"][0]["method"])


def test_a_combination_names_the_families_of_its_parts():
    assert make_method("ogm_ge+modality_dropout").family == "gradients + features"
