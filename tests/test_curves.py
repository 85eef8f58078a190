"""Learning curves per head with G-Blend's overfitting-to-generalisation ratio, and the modality gap:
functional cores against hand-computed values, then what the trainer logs."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import synthetic
from poise.functional.curves import (
    centroid_gaps,
    modality_gap,
    normalized_feature_sums,
    overfitting_to_generalization_ratio,
    overfitting_to_generalization_ratios,
)
from poise.methods import make_method
from poise.train import Trainer
from poise.train.curves import head_loss_sums, ogr_entry


# ---- OGR ----------------------------------------------------------------------------------------------
def test_ogr_by_hand():
    # O_before = 1.0 - 0.5 = 0.5; O_after = 0.8 - 0.2 = 0.6; dO = 0.1; dG = 1.0 - 0.8 = 0.2 -> 0.5
    assert overfitting_to_generalization_ratio(0.5, 1.0, 0.2, 0.8) == pytest.approx(0.5)
    # validation loss rose: dG = -0.1, O: 0.5 -> 0.9, dO = 0.4 -> |0.4 / -0.1| = 4
    assert overfitting_to_generalization_ratio(0.5, 1.0, 0.2, 1.1) == pytest.approx(4.0)
    # undefined: dG = 0, or a loss that is not finite
    assert overfitting_to_generalization_ratio(0.5, 1.0, 0.2, 1.0) is None
    assert overfitting_to_generalization_ratio(0.5, math.nan, 0.2, 1.0) is None
    assert overfitting_to_generalization_ratio(None, 1.0, 0.2, 0.9) is None


def test_ogr_per_epoch_marks_the_first_epoch_undefined():
    train, val = [2.0, 1.5, 1.0, 0.8], [2.2, 1.8, 1.8, 1.7]
    # epoch 1: O 0.2 -> 0.3, dO 0.1, dG 0.4 -> 0.25; epoch 2: dG 0 -> None; epoch 3: O 0.8 -> 0.9, dG 0.1 -> 1
    out = overfitting_to_generalization_ratios(train, val)
    assert out[0] is None and out[2] is None
    assert out[1] == pytest.approx(0.25) and out[3] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one of each per epoch"):
        overfitting_to_generalization_ratios([1.0], [1.0, 2.0])


def test_ogr_entry_reads_the_previous_history_entry():
    previous = {"head_train_loss": {"fused": 0.5, "audio": 1.0}, "val": {"head_loss": {"fused": 1.0, "audio": 2.0}}}
    out = ogr_entry(previous, {"fused": 0.2, "audio": 0.9, "visual": 0.3}, {"fused": 0.8, "audio": 2.0, "visual": 0.4})
    assert out["fused"] == pytest.approx(0.5) and out["audio"] is None and out["visual"] is None
    assert ogr_entry(None, {"fused": 0.2}, {"fused": 0.8}) == {"fused": None}


# ---- modality gap -------------------------------------------------------------------------------------
def test_modality_gap_by_hand():
    # a: unit vectors (1, 0) and (0, 1) after normalising (3, 0), (0, 2): centroid (0.5, 0.5)
    # b: (-1, 0) only (the second sample is absent): centroid (-1, 0); gap sqrt(1.5^2 + 0.5^2)
    features = {"a": torch.tensor([[3.0, 0.0], [0.0, 2.0]]), "b": torch.tensor([[-5.0, 0.0], [7.0, 7.0]])}
    present = {"a": torch.tensor([True, True]), "b": torch.tensor([True, False])}
    gaps = modality_gap(features, present)
    assert list(gaps) == ["a-b"] and gaps["a-b"] == pytest.approx(math.sqrt(1.5**2 + 0.5**2))
    # identical directions: no gap, whatever the norms
    same = {"a": torch.tensor([[1.0, 1.0]]), "b": torch.tensor([[4.0, 4.0]]), "c": torch.tensor([[0.0, -2.0]])}
    gaps = modality_gap(same)
    assert gaps["a-b"] == pytest.approx(0.0, abs=1e-7)
    # (1, 1)/sqrt2 against (0, -1): squared distance 0.5 + (1/sqrt2 + 1)^2
    assert gaps["a-c"] == pytest.approx(math.sqrt(0.5 + (1 / math.sqrt(2) + 1) ** 2))


def test_sums_over_batches_give_the_same_gap_and_an_empty_modality_gives_nan():
    g = torch.Generator().manual_seed(0)
    features = {"a": torch.randn(10, 4, generator=g), "b": torch.randn(10, 4, generator=g)}
    s1, c1 = normalized_feature_sums({m: h[:6] for m, h in features.items()})
    s2, c2 = normalized_feature_sums({m: h[6:] for m, h in features.items()})
    assert centroid_gaps(s1 + s2, c1 + c2, ["a", "b"])["a-b"] == pytest.approx(modality_gap(features)["a-b"], rel=1e-6)
    assert math.isnan(centroid_gaps(s1, torch.tensor([6.0, 0.0]), ["a", "b"])["a-b"])


# ---- what the trainer logs -----------------------------------------------------------------------------
def test_head_loss_sums_count_only_present_samples():
    splits, cfg = synthetic(2, missing_rate=0.3)
    trainer = Trainer(splits, make_method("joint"), cfg)
    model = trainer.build_model()
    batch = next(iter(trainer.make_loader(splits.train, False)))
    out = model(batch)
    sums = head_loss_sums(out, batch)
    assert sums[0, 1].item() == len(batch)
    assert sums[0, 0].item() == pytest.approx(F.cross_entropy(out.logits, batch.labels, reduction="sum").item(), rel=1e-5)
    rows = batch.present_of("audio")
    assert sums[1, 1].item() == rows.sum().item()
    expected = F.cross_entropy(out.unimodal_logits["audio"][rows], batch.labels[rows], reduction="sum")
    assert sums[1, 0].item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("fusion, gap", [("concat", False), ("sum", True)])
def test_trainer_logs_curves_ogr_and_the_gap_where_features_share_a_space(fusion, gap):
    splits, cfg = synthetic(2, trainer={"epochs": 3}, model={"fusion": fusion})
    result = Trainer(splits, make_method("joint"), cfg, seed=0).fit()
    first, *rest = result.history
    for entry in result.history:
        assert set(entry["head_train_loss"]) == set(entry["val"]["head_loss"]) == {"fused", "audio", "visual"}
        # joint predicts with the fused head: its validation loss is the split's loss
        assert entry["val"]["head_loss"]["fused"] == pytest.approx(entry["val"]["loss"], rel=1e-5)
        assert ("modality_gap" in entry["val"]) == gap
    assert all(v is None for v in first["ogr"].values())
    for before, entry in zip(result.history, rest):
        for head, value in entry["ogr"].items():
            expected = overfitting_to_generalization_ratio(
                before["head_train_loss"][head], before["val"]["head_loss"][head],
                entry["head_train_loss"][head], entry["val"]["head_loss"][head])
            assert value == expected
    if gap:
        assert 0.0 <= first["val"]["modality_gap"]["audio-visual"] <= 2.0


def test_mla_logs_the_gap_of_its_shared_head():
    splits, cfg = synthetic(2, trainer={"epochs": 1})
    result = Trainer(splits, make_method("mla"), cfg, seed=0).fit()
    assert set(result.history[0]["val"]["modality_gap"]) == {"audio-visual"}


def test_report_draws_learning_curves_and_the_gap_only_from_runs_that_logged_them(tmp_path):
    from poise.eval.report import write_learning_curves

    def entry(epoch, gap):
        val = {"accuracy": 0.5, "head_loss": {"fused": 1.0 - 0.1 * epoch, "a": 2.0}}
        if gap:
            val["modality_gap"] = {"a-b": 0.9 - 0.1 * epoch}
        return {"epoch": epoch, "head_train_loss": {"fused": 1.2 - 0.2 * epoch, "a": 2.1}, "val": val}

    runs = [{"method": "mla", "history": [entry(e, True) for e in range(3)]},
            {"method": "joint", "history": [entry(e, False) for e in range(3)]}]
    assert write_learning_curves({"runs": runs}, tmp_path) == ["learning_curves.png", "modality_gap.png"]
    from PIL import Image

    for name, min_width in (("learning_curves.png", 700), ("modality_gap.png", 700)):
        width, height = Image.open(tmp_path / name).size
        assert width >= min_width and height >= 350, name  # readable at 100 %, not a thumbnail
    old = [{"method": "joint", "history": [{"epoch": 0, "val": {"accuracy": 0.5}}]}]
    assert write_learning_curves({"runs": old}, tmp_path / "none") == []
