"""The run factory and io: building is explicit (no process group joined by a constructor), the factory
builds what the trainer builds, run.json is a typed description, writes are atomic."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import fast_config, synthetic
from poise.errors import ConfigError, DataError
from poise.io import atomic_write_text, seed_everything
from poise.methods import make_method
from poise.runs import RunDescription
from poise.train import Trainer, factory


def test_a_torchrun_process_must_join_its_group_explicitly(monkeypatch):
    splits, cfg = synthetic(2, num_samples=64)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="has not joined the process group: call .*join_process_group"):
        Trainer(splits, make_method("joint"), cfg, seed=0)


def test_join_outside_torchrun_is_the_configured_device():
    assert factory.join_process_group(fast_config()) == torch.device("cpu")
    assert not torch.distributed.is_initialized()


def test_factory_builds_what_the_trainer_builds():
    splits, cfg = synthetic(2, num_samples=64)
    trainer = Trainer(splits, make_method("joint"), cfg, seed=0)
    seed_everything(3)
    a = trainer.build_model()
    seed_everything(3)
    b = factory.build_model(cfg, splits.info, tuple(splits.info.modalities), "concat", torch.device("cpu"))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    one = [list(x.index) for x in trainer.make_loader(splits.train, shuffle=True)]
    two = [list(x.index) for x in factory.make_loader(cfg, splits.train, 0, torch.device("cpu"), shuffle=True)]
    assert one == two


def test_run_description_round_trips_and_refuses_a_bad_file(tmp_path):
    description = RunDescription("synthetic", "ogm_ge", 2, {"trainer": {"epochs": 1}}, name="ogm_ge[x=1]")
    atomic_write_text(json.dumps(description.to_dict()), tmp_path / "run.json")
    assert RunDescription.read(tmp_path) == description
    (tmp_path / "run.json").write_text(json.dumps({"dataset": "synthetic"}))
    with pytest.raises(DataError, match="is not a poise run description"):
        RunDescription.read(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        RunDescription.read(tmp_path / "nowhere")


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    atomic_write_text("a", tmp_path / "sub" / "f.txt")
    atomic_write_text("b", tmp_path / "sub" / "f.txt")
    assert (tmp_path / "sub" / "f.txt").read_text() == "b"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["f.txt"]
