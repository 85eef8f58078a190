"""Checks shared by the tests of the methods added with the field's methods (issue 12): interrupted and
resumed equals uninterrupted, fp16 with the scaler trains, two accumulated micro-batches equal one batch."""

import math

import pytest
import torch

import test_resume
from conftest import fast_config, synthetic
from poise.methods import make_method
from poise.train import Trainer


def check_resume(name, options, tmp_path, trainer_options=None):
    test_resume.CASES[name] = (options, trainer_options or {})
    try:
        test_resume.test_interrupted_in_mid_epoch_and_resumed_equals_uninterrupted(name, tmp_path)
    finally:
        del test_resume.CASES[name]


def check_fp16(name, options, epochs=1):
    splits, _ = synthetic(2, num_samples=160)
    cfg = fast_config(trainer={"epochs": epochs, "amp": "fp16"})
    trainer = Trainer(splits, make_method(name, options), cfg, seed=0, method_name=name)
    result = trainer.fit()
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert trainer.engine.scaler.get_scale() > 1000.0


def check_accumulation(name, options, epochs=1, atol=1e-5, weights=True):
    """``weights=False``: compare the method's state and records only (a resampled split whose last batch
    has an odd size splits into unequal micro-batches, whose mean differs from the batch's)."""
    splits, _ = synthetic(2, num_samples=256)
    states, methods, histories = {}, {}, {}
    for accumulate in (1, 2):
        cfg = fast_config(trainer={"epochs": epochs, "accumulate": accumulate})
        methods[accumulate] = make_method(name, options)
        trainer = Trainer(splits, methods[accumulate], cfg, seed=0, method_name=name)
        histories[accumulate] = trainer.fit().history
        states[accumulate] = trainer.model.state_dict()
    for k, v in methods[1].state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.allclose(v.float(), methods[2].state_dict()[k].float(), atol=atol), k
        elif isinstance(v, float) or (isinstance(v, list) and all(isinstance(x, float) for x in v)):
            assert v == pytest.approx(methods[2].state_dict()[k], rel=1e-4), k
        else:
            assert v == methods[2].state_dict()[k], k
    for one, two in zip(histories[1], histories[2]):
        assert one["method"].keys() == two["method"].keys()
        for k in one["method"]:
            assert one["method"][k] == pytest.approx(two["method"][k], abs=1e-4), k
    if weights:
        for k, v in states[1].items():
            if v.is_floating_point():
                assert torch.allclose(v, states[2][k], atol=atol), k
