"""MMCosine, PMR, MMPareto and AGM under fp16 with the loss scaler and under gradient accumulation."""

import math

import pytest

from conftest import fast_config, synthetic
from poise.methods import make_method
from poise.train import Trainer


@pytest.mark.parametrize("name,options", [("mmcosine", {}), ("pmr", {}), ("mmpareto", {}), ("agm", {}),
                                          ("agm", {"formulation": "released"})])
@pytest.mark.parametrize("trainer", [{"amp": "fp16"}, {"accumulate": 2}])
def test_trains_under_fp16_and_accumulation(name, options, trainer):
    splits, _ = synthetic(2, num_samples=160)
    cfg = fast_config(trainer={"epochs": 2, **trainer})
    if trainer.get("accumulate") and name in ("pmr", "mmpareto"):  # they decide per batch: refused in one sentence
        from poise.errors import IncompatibleError

        with pytest.raises(IncompatibleError, match=f"'{name}'.*trainer.accumulate"):
            Trainer(splits, make_method(name, options), cfg, seed=0)
        return
    tr = Trainer(splits, make_method(name, options), cfg, seed=0)
    result = tr.fit()
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert result.test["accuracy"] > 0.4  # 4 classes: chance is 0.25
    if trainer.get("amp") == "fp16":
        assert tr.engine.scaler.get_scale() > 1000.0  # steps were taken, not all skipped for overflow
