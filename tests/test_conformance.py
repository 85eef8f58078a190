"""Every registered method trains end to end on 2 and 3 modalities and with missing modalities, or
refuses the set-up at start-up with one clear sentence."""

import math

import pytest

from conftest import synthetic
from poise.errors import IncompatibleError
from poise.methods import METHODS, make_method
from poise.train import Trainer


def specs():
    return [("unimodal:audio" if name == "unimodal" else name) for name in METHODS]


@pytest.mark.parametrize("case", ["two", "three", "missing"])
@pytest.mark.parametrize("spec", specs())
def test_method_trains_or_refuses_at_start(spec, case):
    splits, cfg = synthetic(3 if case == "three" else 2, missing_rate=0.3 if case == "missing" else 0.0, num_samples=160)
    method = make_method(spec)
    try:
        trainer = Trainer(splits, method, cfg, seed=0, method_name=spec)
    except IncompatibleError as e:
        assert spec.split(":")[0] in str(e) or "modalit" in str(e) or "fusion" in str(e)
        return
    result = trainer.fit()
    assert math.isfinite(result.test["accuracy"]) and 0 <= result.test["accuracy"] <= 1
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert method.load_state_dict(method.state_dict()) is None
