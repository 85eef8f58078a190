"""Checkpoints and --resume: a run killed at any moment and resumed ends exactly as an uninterrupted one
(on CPU, same thread count); checkpoints are written atomically and load with weights_only=True; a
non-finite value stops the run with a message naming the step, the method and the modality, and the
last checkpoint stays intact."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import fast_config, synthetic
from poise.cli import main
from poise.methods import make_method
from poise.methods.baselines import Joint
from poise.methods.registry import METHODS
from poise.train import Trainer
from poise.train.checkpoint import CHECKPOINT_FILE, atomic_save
from poise.train.trainer import NonFiniteError

RUN = ["--dataset", "synthetic", "--method", "ogm_ge", "--seed", "1",
       "--set", "dataset.num_samples=900", "--set", "trainer.batch_size=16", "--set", "trainer.epochs=4",
       "--set", "trainer.checkpoint_every_steps=5", "--set", "trainer.progress=false",
       "--set", "trainer.tensorboard=false", "--set", "trainer.probe=false"]


@contextmanager
def one_thread():
    """Bit-exact comparisons need the same intra-op thread count in every process."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _child(argv: list[str]) -> None:
    torch.set_num_threads(1)
    os._exit(main(argv))


def without_seconds(result: dict) -> dict:
    result = json.loads(json.dumps(result))
    result.pop("train_seconds")
    for entry in result["history"]:
        entry.pop("seconds")
    return result


def test_sigkilled_run_resumes_to_the_same_result(tmp_path, capsys):
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    with one_thread():
        start = time.perf_counter()
        assert main(["train", *RUN, "--out", str(reference)]) == 0
        duration = time.perf_counter() - start
    # a separate process (forked: it starts with everything imported) killed with SIGKILL at a random
    # moment after its first checkpoint
    child = multiprocessing.get_context("fork").Process(target=_child, args=(["train", *RUN, "--out", str(killed)],))
    child.start()
    while not (killed / CHECKPOINT_FILE).exists() and child.is_alive():
        time.sleep(0.005)
    delay = random.uniform(0.0, 0.4 * duration)
    time.sleep(delay)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL, f"the run ended before the kill ({delay:.2f}s after its first checkpoint)"
    assert not (killed / "result.json").exists()
    position = torch.load(killed / CHECKPOINT_FILE, weights_only=True)["position"]
    with one_thread():
        assert main(["train", "--resume", str(killed)]) == 0
    expected = json.loads((reference / "result.json").read_text())
    got = json.loads((killed / "result.json").read_text())
    assert got["test"] == expected["test"], f"killed {delay:.2f}s after the first checkpoint, at {position}"
    assert without_seconds(got) == without_seconds(expected)
    lines = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in lines] == [0, 1, 2, 3]


def test_resume_refuses_a_missing_checkpoint_or_a_different_config(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "run.json' does not exist" in capsys.readouterr().err
    out = tmp_path / "run"
    argv = ["train", "--dataset", "synthetic", "--method", "joint", "--out", str(out), "--set", "trainer.epochs=1",
            "--set", "dataset.num_samples=200", "--set", "trainer.progress=false", "--set", "trainer.tensorboard=false",
            "--set", "trainer.probe=false", "--set", "trainer.checkpoint=false"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out)]) == 2
    assert "checkpoint.pt' does not exist" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--set", "trainer.epochs=3"]) == 2
    assert "differs from the run's own at 'trainer.epochs'" in capsys.readouterr().err
    assert main(["train", "--resume", str(out), "--method", "ogm_ge"]) == 2
    assert "started with --method joint, not ogm_ge" in capsys.readouterr().err


class Interrupt(Exception):
    pass


def interrupt_at(method, epoch: int, micro_batch: int):
    """Make ``method`` raise at a micro-batch of an epoch, as if the process died there."""
    original = method.on_step_start
    seen = []

    def on_step_start(batch):
        if method.ctx.epoch == epoch:
            seen.append(1)
            if len(seen) == micro_batch + 1:
                raise Interrupt
        return original(batch)

    method.on_step_start = on_step_start
    return method


CASES = {
    "joint": ({}, {"accumulate": 2}),
    "opm": ({"warmup_epochs": 1, "p_exe": 0.8}, {}),
    "gblend": ({"mode": "online", "warmup_epochs": 1, "super_epoch": 1, "estimate_epochs": 1}, {"optimizer": "adamw", "lr": 0.003}),
    "mla": ({}, {"scheduler": "step", "step_size": 1, "gamma": 0.5}),
    "uncertainty": ({}, {}),
    "mmcosine": ({}, {}),
    "pmr": ({}, {}),
    "mmpareto": ({}, {}),
    "agm": ({}, {"accumulate": 2}),
    "agm[released]": ({"formulation": "released"}, {}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_interrupted_in_mid_epoch_and_resumed_equals_uninterrupted(name, tmp_path):
    options, trainer_options = CASES[name]
    name = name.split("[")[0]
    splits, _ = synthetic(2, num_samples=300, missing_rate=0.1)
    cfg = fast_config(trainer={"epochs": 3, "batch_size": 32, "checkpoint_every_steps": 2, **trainer_options},
                      data={"missing_rate": 0.1})
    accumulate = cfg.trainer.accumulate
    with one_thread():
        expected = Trainer(splits, make_method(name, options), cfg, seed=2, out_dir=tmp_path / "a", method_name=name).fit()
        # six steps per epoch: stopped in the fourth step of epoch 1, after the checkpoint at its second
        method = interrupt_at(make_method(name, options), epoch=1, micro_batch=3 * accumulate + 1)
        with pytest.raises(Interrupt):
            Trainer(splits, method, cfg, seed=2, out_dir=tmp_path / "b", method_name=name).fit()
        checkpoint = torch.load(tmp_path / "b" / CHECKPOINT_FILE, weights_only=True)
        assert checkpoint["position"]["epoch"] == 1 and checkpoint["position"]["steps_in_epoch"] > 0
        got = Trainer(splits, make_method(name, options), cfg, seed=2, out_dir=tmp_path / "b", method_name=name,
                      resume=True).fit()
    assert got.test == expected.test
    assert without_seconds(got.to_dict()) == without_seconds(expected.to_dict())


@pytest.mark.parametrize("spec", ["unimodal:audio", *[m for m in METHODS if m != "unimodal"]])
def test_every_method_checkpoint_loads_with_weights_only(spec, tmp_path):
    splits, _ = synthetic(2, num_samples=120)
    options = {"umt": {"teacher_epochs": 1}, "ume": {"member_epochs": 1}}.get(spec, {})
    cfg = fast_config(trainer={"epochs": 1, "batch_size": 32})
    Trainer(splits, make_method(spec, options), cfg, seed=0, out_dir=tmp_path, method_name=spec).fit()
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)
    for key in ("model", "optimizer", "scheduler", "scaler", "method", "ranks", "best", "history", "position"):
        assert key in state
    assert state["position"] == {"epoch": 1, "steps_in_epoch": 0, "micro_batches": state["position"]["micro_batches"],
                                 "optimizer_steps": state["position"]["optimizer_steps"]}
    assert isinstance(state["ranks"][0]["rng"]["torch"], torch.Tensor)
    assert state["best"]["epoch"] == 0 and len(json.loads(state["history"])) == 1
    torch.load(tmp_path / "best.pt", weights_only=True)


def test_checkpoint_is_never_half_written(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_FILE
    atomic_save({"weights": torch.arange(4.0)}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save({"weights": torch.zeros(4)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["weights"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_FILE]  # no temporary file left behind


class NanInput(Joint):
    """Joint training that poisons the visual input at one step."""

    name = "nan_input"

    def __init__(self, step: int, where: str = "input"):
        super().__init__()
        self.step, self.where = step, where

    def on_step_start(self, batch):
        if self.ctx.step == self.step:
            if self.where == "input":
                batch.inputs["visual"][0, 0] = float("nan")
            else:
                with torch.no_grad():
                    self.ctx.model.encoders["visual"].net[1].weight[0, 0] = float("nan")
        return None


@pytest.mark.parametrize("where,message", [("input", "the input of modality 'visual' is not finite"),
                                           ("weights", "the encoder weights of modality 'visual' are not finite")])
def test_non_finite_value_stops_with_step_method_and_modality(where, message, tmp_path):
    splits, _ = synthetic(2, num_samples=240)
    cfg = fast_config(trainer={"epochs": 3, "batch_size": 32, "checkpoint_every_steps": 2})
    with pytest.raises(NonFiniteError) as err:
        Trainer(splits, NanInput(step=9, where=where), cfg, out_dir=tmp_path, method_name="nan_input").fit()
    text = str(err.value)
    assert "method 'nan_input'" in text and "epoch 1, step 9" in text and message in text, text
    state = torch.load(tmp_path / CHECKPOINT_FILE, weights_only=True)  # the last good checkpoint is intact
    assert state["position"]["micro_batches"] <= 9
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not list(Path(tmp_path).glob(".*tmp*"))


def test_an_interrupted_bench_resumes_keeping_finished_runs(tmp_path, monkeypatch, capsys):
    from poise import bench, runs

    args = ["--dataset", "synthetic", "--methods", "joint,ogm_ge", "--seeds", "0", "--set", "dataset.num_samples=300",
            "--set", "trainer.epochs=3", "--set", "trainer.batch_size=32", "--set", "trainer.progress=false",
            "--set", "trainer.tensorboard=false", "--set", "trainer.probe=false"]
    with one_thread():
        assert main(["bench", *args, "--out", str(tmp_path / "reference")]) == 0
        # the same bench stopped during ogm_ge's second epoch
        real_train_one = bench.train_one

        def stopped(dataset, spec, *rest, **options):
            if spec == "ogm_ge":
                method = interrupt_at(make_method("ogm_ge"), epoch=1, micro_batch=2)
                monkeypatch.setattr(runs, "make_method", lambda *a, **k: method)  # what train_one builds with
            return real_train_one(dataset, spec, *rest, **options)

        monkeypatch.setattr(bench, "train_one", stopped)
        with pytest.raises(Interrupt):
            main(["bench", *args, "--out", str(tmp_path / "stopped")])
        monkeypatch.undo()
        kept = json.loads((tmp_path / "stopped" / "results.json").read_text())["runs"]
        assert [r["method"] for r in kept] == ["joint"]
        assert (tmp_path / "stopped" / "runs" / "ogm_ge" / "seed0" / CHECKPOINT_FILE).is_file()

        calls = []
        monkeypatch.setattr(bench, "train_one", lambda *a, **k: calls.append((a[1], k["resume"])) or real_train_one(*a, **k))
        assert main(["bench", *args, "--out", str(tmp_path / "stopped"), "--resume"]) == 0
    assert calls == [("ogm_ge", True)]  # joint kept, ogm_ge continued from its checkpoint
    assert "1 finished runs kept, 1 continue from their checkpoints, 0 start" in capsys.readouterr().out
    expected = json.loads((tmp_path / "reference" / "results.json").read_text())["runs"]
    got = json.loads((tmp_path / "stopped" / "results.json").read_text())["runs"]
    assert got[0] == kept[0]
    assert [without_seconds(r) for r in got] == [without_seconds(r) for r in expected]

    # another configuration is refused, naming the difference
    assert main(["bench", *args, "--set", "trainer.lr=0.5", "--out", str(tmp_path / "stopped"), "--resume"]) == 2
    assert "first difference: 'trainer.lr'" in capsys.readouterr().err
