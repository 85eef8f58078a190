"""CML: confidences, the batch and per-sample hinges and the removal chain by hand; the method's loss
against a plain loop over the concat head's slices; training end to end and its refusals."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import fast_config, make_context, synthetic
from poise.errors import IncompatibleError
from poise.functional import cml_confidence_penalty, prediction_confidence, removal_chain
from poise.methods import make_method
from poise.train import Trainer


def two_class(confidences):
    """Logits (B, 2) whose largest softmax probability is each given confidence (class 1 predicted)."""
    return torch.tensor([[0.0, math.log(c / (1 - c))] for c in confidences])


def test_confidence_and_penalties_by_hand():
    assert prediction_confidence(two_class([0.5, 0.9])).tolist() == pytest.approx([0.5, 0.9], rel=1e-6)
    reference, partial = two_class([0.5, 0.9]), two_class([0.7, 0.6])  # gaps +0.2, -0.3
    assert cml_confidence_penalty(reference, partial, "batch").item() == pytest.approx(0.0, abs=1e-7)  # max(0, -0.1)
    assert cml_confidence_penalty(reference, partial, "sample").item() == pytest.approx(0.2, rel=1e-5)
    assert cml_confidence_penalty(reference, two_class([0.8, 0.95]), "batch").item() == pytest.approx(0.35, rel=1e-5)
    # over two processes: the hinge decided on the total, the local sum doubled
    local = cml_confidence_penalty(reference, partial, "batch", reduce=lambda t: t + 1.0, processes=2)
    assert local.item() == pytest.approx(2 * -0.1, rel=1e-5)
    with pytest.raises(ValueError, match="hinge"):
        cml_confidence_penalty(reference, partial, "mean")


def test_removal_chain_by_hand():
    assert removal_chain(("a", "v", "t")) == [("a", "v"), ("a",)]
    assert removal_chain(["v", "a"]) == [("v",)]


def test_loss_matches_a_plain_loop_over_the_concat_head():
    splits, _ = synthetic(3)
    method = make_method("cml", {"lam": 0.1})
    ctx, batch = make_context(method, splits, fast_config())
    method.on_epoch_start(0, None)
    output = ctx.model(batch)
    terms = method.loss(output, batch)
    fc = ctx.model.fusion.fc
    slices = dict(ctx.model.fusion._slices())

    def logits_of(kept):
        out = fc.bias.expand(len(batch), -1).clone()
        for m in kept:
            out = out + output.features[m] @ fc.weight[:, slices[m]].T
        return out

    order = list(method.order)
    chain = [order[:2], order[:1]]
    ces = [F.cross_entropy(output.logits, batch.labels)] + [F.cross_entropy(logits_of(k), batch.labels) for k in chain]
    penalty, reference = 0.0, output.logits
    for kept in chain:
        partial = logits_of(kept)
        gap = sum(float(partial[i].detach().softmax(0).max() - reference[i].detach().softmax(0).max()) for i in range(len(batch)))
        penalty += max(0.0, gap)
        reference = partial
    assert terms["ce"].item() == pytest.approx(float(sum(ces).detach()) / 3, rel=1e-5)
    assert terms["confidence"].item() == pytest.approx(0.1 * penalty, rel=1e-4, abs=1e-6)


def test_order_is_drawn_each_epoch_from_the_seed():
    splits, _ = synthetic(3)
    orders = []
    for _ in range(2):
        method = make_method("cml")
        make_context(method, splits, fast_config())
        drawn = []
        for epoch in range(6):
            method.on_epoch_start(epoch, None)
            drawn.append(tuple(method.order))
        orders.append(drawn)
    assert orders[0] == orders[1] and len(set(orders[0])) > 1


@pytest.mark.parametrize(("modalities", "missing", "options"), [(2, 0.0, {}), (3, 0.3, {}), (2, 0.0, {"hinge": "sample"})])
def test_trains_end_to_end(modalities, missing, options):
    splits, _ = synthetic(modalities, missing_rate=missing, num_samples=240)
    cfg = fast_config(trainer={"epochs": 3}, data={"missing_rate": missing})
    result = Trainer(splits, make_method("cml", options), cfg, seed=0).fit()
    assert result.test["accuracy"] > 0.5  # 4 classes: chance 0.25
    assert all(math.isfinite(h["method"]["penalty"]) for h in result.history)


def test_refuses_accumulation_and_trains_under_fp16():
    splits, _ = synthetic(2, num_samples=160)
    with pytest.raises(IncompatibleError, match="method 'cml' .*set trainer.accumulate to 1"):
        Trainer(splits, make_method("cml"), fast_config(trainer={"accumulate": 2}), seed=0)
    trainer = Trainer(splits, make_method("cml"), fast_config(trainer={"epochs": 2, "amp": "fp16"}), seed=0)
    result = trainer.fit()
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert trainer.engine.scaler.get_scale() > 1000.0
