"""Declared method state (``Method.add_state``): saved, loaded in place, reset and reduced across processes
by the base class; ``setup`` runs before ``load_state_dict`` wherever state is loaded (resume, the best
epoch, ``poise eval``); the records API; the registry refuses a class whose name is not its key."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import fast_config, free_port, synthetic
from poise.methods.base import Method
from poise.methods.baselines import Joint
from poise.methods.registry import METHODS
from poise.registry import Registry
from poise.train import Trainer


class Stateful(Method):
    name = "stateful"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.add_state("counts", torch.zeros(3), reduce="sum")
        self.add_state("steps", 0)
        self.add_state("scratch", torch.zeros(2), persistent=False)


def test_declared_state_saves_loads_in_place_and_resets():
    m = Stateful()
    generator = m.add_state("generator", torch.Generator().manual_seed(5))
    alias = m.counts
    m.counts += torch.tensor([1.0, 2.0, 3.0])
    m.steps = 4
    torch.rand(3, generator=generator)
    state = m.state_dict()
    assert set(state) == {"counts", "steps", "generator"}  # scratch is not persistent
    expected_next = torch.rand(2, generator=torch.Generator().set_state(state["generator"]))

    fresh = Stateful()
    fresh_generator = fresh.add_state("generator", torch.Generator().manual_seed(5))
    fresh_alias = fresh.counts
    fresh.load_state_dict(state)
    assert torch.equal(fresh_alias, torch.tensor([1.0, 2.0, 3.0]))  # copied into the same tensor
    assert fresh.steps == 4
    assert torch.equal(torch.rand(2, generator=fresh_generator), expected_next)
    state["counts"].add_(100.0)  # the loaded state is a copy
    assert torch.equal(fresh.counts, torch.tensor([1.0, 2.0, 3.0]))

    m.reset_state()
    assert torch.equal(m.counts, torch.zeros(3)) and m.steps == 0 and alias is not m.counts
    assert torch.equal(torch.rand(3, generator=generator), torch.rand(3, generator=torch.Generator().manual_seed(5)))


def test_declared_state_refuses_bad_reductions():
    m = Method()
    with pytest.raises(ValueError, match="reduce must be one of"):
        m.add_state("x", torch.zeros(1), reduce="median")
    with pytest.raises(ValueError, match="only tensor state"):
        m.add_state("y", 0, reduce="sum")


def _reduce_worker(rank: int, world: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        m = Method()
        for how in ("sum", "mean", "max", "min", "cat"):
            m.add_state(how, torch.tensor([1.0 + rank, 10.0 * rank]), reduce=how)
        m.add_state("own", torch.tensor([float(rank)]))
        m.add_state("double", torch.tensor([float(rank)]), reduce=lambda t: t * 2)
        m.reduce_state()
        torch.save({k: getattr(m, k) for k in ("sum", "mean", "max", "min", "cat", "own", "double")}, f"{path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_reduce_state_over_two_processes(tmp_path):
    path = str(tmp_path / "r")
    mp.start_processes(_reduce_worker, args=(2, free_port(), path), nprocs=2, join=True, start_method="spawn")
    for rank in range(2):
        got = torch.load(f"{path}.{rank}")
        assert torch.equal(got["sum"], torch.tensor([3.0, 10.0]))
        assert torch.equal(got["mean"], torch.tensor([1.5, 5.0]))
        assert torch.equal(got["max"], torch.tensor([2.0, 10.0]))
        assert torch.equal(got["min"], torch.tensor([1.0, 0.0]))
        assert torch.equal(got["cat"], torch.tensor([1.0, 0.0, 2.0, 10.0]))
        assert torch.equal(got["own"], torch.tensor([float(rank)]))  # reduce=None: each rank its own
        assert torch.equal(got["double"], torch.tensor([2.0 * rank]))


def test_reduce_state_is_a_no_op_in_one_process():
    m = Stateful()
    m.counts += 1
    m.reduce_state()
    assert torch.equal(m.counts, torch.ones(3))


def test_records_api_round_trips():
    m = Method()
    m.record("a", 1.0)
    m.record("a", 3.0)
    state = m.records_state()
    other = Method()
    other.load_records_state(state)
    assert other.pop_records() == {"a": 2.0}
    assert m.pop_records() == {"a": 2.0}


def test_registry_asserts_each_class_name_is_its_key():
    assert all(cls.name == key for key, cls in METHODS.items())

    class Misnamed(Method):
        name = "something_else"

    with pytest.raises(ValueError, match="registered as 'misnamed' but its name is 'something_else'"):
        Registry("method", {"misnamed": Misnamed}, check=METHODS.check)
    with pytest.raises(ValueError, match="its name is 'something_else'"):
        METHODS.register("misnamed", Misnamed)


class Shifted(Joint):
    """A method whose prediction depends on its state: from the first epoch's end on it adds a large
    bias to class 0, so every prediction is class 0."""

    def setup(self, ctx):
        Method.setup(self, ctx)  # patched onto Joint below: no super()
        self.calls.append("setup")
        self.add_state("shift", torch.zeros(ctx.info.num_classes, device=ctx.device))

    def on_epoch_end(self, epoch):
        self.shift[0] = 1e4

    def load_state_dict(self, state):
        self.calls.append("load")
        Method.load_state_dict(self, state)

    def predict(self, output, batch):
        return output.logits + self.shift


def test_setup_runs_before_load_state_dict_in_training_resume_and_eval(tmp_path, monkeypatch):
    from poise.cli import main

    calls: list[str] = []
    monkeypatch.setattr(Joint, "calls", calls, raising=False)
    for name in ("setup", "on_epoch_end", "load_state_dict", "predict"):
        monkeypatch.setattr(Joint, name, getattr(Shifted, name))
    out = tmp_path / "run"
    run = ["--dataset", "synthetic", "--method", "joint", "--set", "trainer.epochs=1", "--set", "trainer.progress=false",
           "--set", "trainer.tensorboard=false", "--set", "trainer.probe=false", "--set", "dataset.num_samples=200"]
    assert main(["train", *run, "--out", str(out)]) == 0
    assert calls == ["setup", "load"]  # the best epoch's state is loaded back after setup
    result = json.loads((out / "result.json").read_text())
    calls.clear()
    assert main(["train", "--resume", str(out)]) == 0
    assert calls[:2] == ["setup", "load"]
    calls.clear()
    assert main(["eval", str(out), "--no-drop-each"]) == 0
    assert calls == ["setup", "load"]
    rows = json.loads((out / "eval_test.json").read_text())["results"]
    # predict used the loaded shift: every test prediction is class 0, as in training's own test score
    assert rows[0]["accuracy"] == result["test"]["accuracy"]
    assert result["test"]["accuracy"] < 0.5


def test_old_pending_state_workarounds_are_gone():
    """OGM, OPM and G-Blend load state after setup without keeping it aside."""
    from poise.methods import make_method

    splits, _ = synthetic(2, num_samples=128)
    for name in ("ogm_ge", "opm"):
        method = make_method(name)
        Trainer(splits, method, fast_config(), seed=0).setup()
        state = method.state_dict()
        assert state and not hasattr(method, "_pending_state")
        method.load_state_dict(state)
