"""Checks shared by the tests of the methods added with the field's methods (issue 12): interrupted and
resumed equals uninterrupted, fp16 with the scaler trains, two accumulated micro-batches equal one batch."""

import math

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


def check_accumulation(name, options, epochs=1, atol=1e-5):
    splits, _ = synthetic(2, num_samples=256)
    states = {}
    for accumulate in (1, 2):
        cfg = fast_config(trainer={"epochs": epochs, "accumulate": accumulate})
        trainer = Trainer(splits, make_method(name, options), cfg, seed=0, method_name=name)
        trainer.fit()
        states[accumulate] = trainer.model.state_dict()
    for k, v in states[1].items():
        if v.is_floating_point():
            assert torch.allclose(v, states[2][k], atol=atol), k
