"""AMCo: the functional core against hand computations, and the method in training."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import fast_config, synthetic
from method_checks import check_fp16, check_resume
from poise.errors import IncompatibleError
from poise.functional.amco import amco_class_mask, amco_mask_fraction, amco_softmax_mass
from poise.methods import make_method
from poise.train import Trainer


def test_mask_fraction_by_hand():
    assert amco_mask_fraction(0.0) == 0.0
    assert amco_mask_fraction(0.1) == pytest.approx(0.5)  # sin(pi/6)
    assert amco_mask_fraction(0.2) == pytest.approx(math.sqrt(3) / 2)  # sin(pi/3)
    assert amco_mask_fraction(0.3) == pytest.approx(1.0)
    assert amco_mask_fraction(5.0) == pytest.approx(1.0)
    assert amco_mask_fraction(0.25, eps=0.5) == pytest.approx(math.sin(math.pi / 4))
    with pytest.raises(ValueError, match="level must be >= 0"):
        amco_mask_fraction(-0.1)


def test_class_mask_masks_int_fraction_of_classes():
    g = torch.Generator().manual_seed(0)
    for fraction, zeros in [(0.0, 0), (0.5, 3), (0.55, 3), (0.99, 5), (1.0, 6)]:
        mask = amco_class_mask(6, fraction, g)
        assert mask.shape == (6,) and int((mask == 0).sum()) == zeros and set(mask.tolist()) <= {0.0, 1.0}
    draws = {tuple(amco_class_mask(6, 0.5, g).tolist()) for _ in range(20)}
    assert len(draws) > 1  # the masked classes are drawn at random


def test_softmax_mass_against_a_loop():
    logits = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[0.0, 0.0], [3.0, 1.0]]])  # (B=2, M=2, C=2)
    present = torch.tensor([[True, True], [False, True]])
    mass = amco_softmax_mass(logits, present)
    e = [math.exp(1), 1.0, 1.0, math.exp(2)]
    assert mass[0].tolist() == pytest.approx([(e[0] + e[1]) / sum(e), (e[2] + e[3]) / sum(e)])
    assert mass[1].tolist() == pytest.approx([0.0, 1.0])  # audio absent: visual holds the whole softmax


def test_step_masks_the_dominant_modality_and_fuses_through_the_head():
    """One loss call by hand: the dominant audio's logits are masked at the drawn classes, the fused CE is
    CE(head(masked audio + visual)), the unimodal CEs use the unmasked logits."""
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput

    splits, cfg = synthetic(2, num_samples=64)
    method = make_method("amco")
    trainer = Trainer(splits, method, fast_config(trainer={"epochs": 2}), seed=0, method_name="amco")
    trainer.setup()
    method.ctx.epoch = 1  # half-way through 2 epochs: level 0.5 > eps, every class of the dominant masked
    method.epoch_step, method.steps_per_epoch = 0, 4
    za = torch.tensor([[6.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0]])
    zv = torch.tensor([[0.1, 0.0, 0.2, 0.0], [0.0, 0.3, 0.0, 0.1]])
    labels = torch.tensor([0, 1])
    batch = MultimodalBatch(inputs={"audio": torch.zeros(2, 1), "visual": torch.zeros(2, 1)}, labels=labels,
                            present=torch.ones(2, 2, dtype=torch.bool), index=torch.arange(2))
    output = ModelOutput(features={}, unimodal_logits={"audio": za, "visual": zv}, logits=za + zv)
    terms = method.loss(output, batch)
    head = method.head.requires_grad_(False)
    assert float(terms["ce"].detach()) == pytest.approx(float(F.cross_entropy(head(zv), labels)), rel=1e-6)
    assert float(terms["ce_audio"].detach()) == pytest.approx(float(F.cross_entropy(za, labels)), rel=1e-6)
    records = method.pop_records()
    assert records["dominant/audio"] == 1.0 and records["dominant/visual"] == 0.0 and records["mask_fraction"] == 1.0
    assert torch.allclose(method.predict(output, batch), head(za + zv))


@pytest.mark.parametrize(("modalities", "missing", "options"),
                         [(2, 0.0, {}), (3, 0.3, {}), (2, 0.2, {"formulation": "released"})])
def test_trains(modalities, missing, options):
    splits, _ = synthetic(modalities, missing_rate=missing, num_samples=240)
    cfg = fast_config(trainer={"epochs": 3}, data={"missing_rate": missing})
    result = Trainer(splits, make_method("amco", options), cfg, seed=0, method_name="amco").fit()
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    # four classes: chance is 0.25 (3 epochs: the strongest modality is wholly masked from the first third on)
    assert result.test["accuracy"] > 0.4
    last = result.history[-1]["method"]
    assert last["mask_fraction"] > 0.0 and 0.0 <= last["dominant/audio"] <= 1.0


def test_released_schedule_resets_every_epoch():
    splits, _ = synthetic(2, num_samples=128)
    method = make_method("amco", {"formulation": "released"})
    levels = []
    level = method._level
    method._level = lambda: (levels.append((method.ctx.epoch, level())), levels[-1][1])[1]
    Trainer(splits, method, fast_config(trainer={"epochs": 2, "batch_size": 32}), seed=0, method_name="amco").fit()
    # epoch 0: l stays 0; epoch 1: 0, 0.1, 0.2, ... (l += epoch / 10 per step)
    first, second = [v for e, v in levels if e == 0], [v for e, v in levels if e == 1]
    assert len(first) == len(second) >= 3
    assert first == [0.0] * len(first)
    assert second == pytest.approx([0.1 * k for k in range(len(second))])


def test_refuses_fusions_it_cannot_decompose_and_accumulation():
    splits, _ = synthetic(2, num_samples=64)
    with pytest.raises(IncompatibleError, match="method 'amco' works with fusion concat or sum"):
        Trainer(splits, make_method("amco"), fast_config(model={"fusion": "gated"}), seed=0)
    with pytest.raises(IncompatibleError, match="method 'amco' decides the dominant modality .*set trainer.accumulate to 1"):
        Trainer(splits, make_method("amco"), fast_config(trainer={"accumulate": 2}), seed=0, method_name="amco")


def test_resumed_and_fp16(tmp_path):
    check_resume("amco", {}, tmp_path)
    check_fp16("amco", {})
