"""Every registered method trains end to end on 2 and 3 modalities and with missing modalities, or
refuses the set-up at start-up with one clear sentence; its state survives a save and load."""

import math

import pytest
import torch

from conftest import synthetic
from poise.errors import IncompatibleError
from poise.methods import METHODS, make_method
from poise.train import Trainer


def specs():
    return [("unimodal:audio" if name == "unimodal" else name) for name in METHODS]


def expected_to_refuse(spec: str, modalities: int) -> bool:
    """Set-ups a method must refuse: fewer modalities than it compares."""
    return modalities < METHODS[spec.split(":")[0]].min_modalities


def same_state(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    return a == b


def snapshot_at_setup(method, store: dict):
    """The model's parameters as the run builds them, before the method's setup touches them."""
    setup = method.setup

    def wrapped(ctx):
        store.update({n: p.detach().clone() for n, p in ctx.model.named_parameters()})
        setup(ctx)

    method.setup = wrapped


@pytest.mark.parametrize("case", ["one", "two", "three", "missing"])
@pytest.mark.parametrize("spec", specs())
def test_method_trains_or_refuses_at_start(spec, case):
    modalities = {"one": 1, "three": 3}.get(case, 2)
    splits, cfg = synthetic(modalities, missing_rate=0.3 if case == "missing" else 0.0, num_samples=160)
    name = spec.split(":")[0]
    method = make_method(spec)
    if expected_to_refuse(spec, modalities):
        with pytest.raises(IncompatibleError) as refused:
            Trainer(splits, method, cfg, seed=0, method_name=spec)
        sentence = str(refused.value)
        assert f"'{name}'" in sentence and "modalities" in sentence and "\n" not in sentence
        return
    initial: dict = {}
    snapshot_at_setup(method, initial)
    trainer = Trainer(splits, method, cfg, seed=0, method_name=spec)  # must not refuse
    result = trainer.fit()
    assert math.isfinite(result.test["accuracy"]) and 0 <= result.test["accuracy"] <= 1
    assert len(result.history) == cfg.trainer.epochs
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    for m in trainer.model.modalities:  # every encoder the method trains has moved
        moved = [n for n, p in trainer.model.named_parameters()
                 if n.startswith(f"encoders.{m}.") and not torch.equal(p.detach(), initial[n])]
        assert moved, f"{spec}: the {m} encoder never changed"
    if case != "two":
        return
    # the state survives a save and load into a fresh run's method
    state = method.state_dict()
    fresh = make_method(spec)
    Trainer(splits, fresh, cfg, seed=0, method_name=spec).setup()
    untrained = fresh.state_dict()
    fresh.load_state_dict(state)
    assert same_state(fresh.state_dict(), state)
    if state and not same_state(untrained, state):
        assert not same_state(untrained, fresh.state_dict())
