"""poise tune: search spaces, the trainer's epoch hook, pruning, the paired t-interval, a tune that never
reads test labels, resuming after SIGKILL, parallel trials, and the reports."""

from __future__ import annotations

import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from poise.cli import main
from poise.config import Choice, FloatRange, IntRange, TrainerConfig, build_config
from poise.eval.significance import paired_difference
from poise.methods.registry import METHODS

ROOT = Path(__file__).resolve().parents[1]
TINY = {"trainer": {"epochs": 3, "batch_size": 32, "progress": False, "tensorboard": False, "probe": False},
        "dataset": {"num_samples": 160}}


# ---- the paired t-interval, against hand-computed values -------------------------------------------------------

def test_paired_difference_by_hand():
    # d = 0.01, 0.02, 0.03: mean 0.02, sd 0.01, se 0.01 / sqrt(3); t(0.975, 2) = 4.302653 (a t table)
    d = paired_difference({0: 0.91, 1: 0.92, 2: 0.93}, {0: 0.90, 1: 0.90, 2: 0.90})
    half = 4.302653 * 0.01 / math.sqrt(3)
    assert d["n"] == 3 and d["mean"] == pytest.approx(0.02)
    assert d["low"] == pytest.approx(0.02 - half, abs=1e-6) and d["high"] == pytest.approx(0.02 + half, abs=1e-6)
    assert d["low"] < 0 < d["high"] and not d["significant"]
    # d = 0.10, 0.11, 0.11: mean 0.10667, sd sqrt(((-0.00667)^2 + 2 * 0.00333^2) / 2) = 0.0057735
    d = paired_difference({0: 0.90, 1: 0.92, 2: 0.94}, {0: 0.80, 1: 0.81, 2: 0.83})
    assert d["mean"] == pytest.approx(0.1066667, abs=1e-6)
    assert d["low"] == pytest.approx(0.1066667 - 4.302653 * 0.0057735 / math.sqrt(3), abs=1e-5)
    assert d["significant"]
    # pairs by seed: seed 5 of one side has no partner; a negative difference is marked too
    d = paired_difference({0: 0.5, 1: 0.6, 5: 0.99}, {0: 0.9, 1: 0.95, 2: 0.1})
    assert d["seeds"] == [0, 1] and d["mean"] == pytest.approx(-0.375)
    # two seeds: t(0.975, 1) = 12.7062; d = -0.4, -0.35: sd 0.035355
    assert d["high"] == pytest.approx(-0.375 + 12.7062 * 0.0353553 / math.sqrt(2), abs=1e-4)
    one = paired_difference({0: 0.5}, {0: 0.4})
    assert one["low"] is None and not one["significant"]


# ---- declared search spaces -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(METHODS))
def test_declared_ranges_are_valid_options(name):
    params = METHODS[name].Params
    for option, r in params.tunable.items():
        assert option in params.model_fields, f"{name}: tunable '{option}' is not an option"
        values = r.options if isinstance(r, Choice) else (r.low, r.high)
        assert isinstance(r, (FloatRange, IntRange, Choice))
        for value in values:
            params(**{option: value})  # each end of the range is a valid value
    for option, r in TrainerConfig.tunable.items():
        for value in (r.low, r.high):
            TrainerConfig(**{option: value})


def test_search_space_holds_the_shared_options_and_the_methods_own():
    from poise.tune import overrides, search_space

    assert list(search_space("joint")) == ["trainer.lr"]
    assert set(search_space("ogm_ge")) == {"trainer.lr", "method.ogm_ge.alpha"}
    assert "method.distill.lambda" in search_space("distill")  # the option's name as users write it
    for required in ("ogm", "ogm_ge", "opm", "gblend", "mla", "boost_weak", "pmr", "agm", "mmcosine", "mmpareto",
                     "lfm", "cggm", "cml", "amco", "arl", "greedy", "dimml", "g2d", "remix"):
        assert len(search_space(required)) > 1, required
    assert overrides({"trainer.lr": 0.1, "method.ogm.alpha": 0.3}) == {"trainer": {"lr": 0.1}, "method": {"ogm": {"alpha": 0.3}}}


# ---- the trainer's hook and pruning -----------------------------------------------------------------------------

def test_epoch_callback_sees_every_epochs_validation_accuracy_and_can_stop_the_run(synthetic2, one_thread):
    from poise.methods.registry import make_method
    from poise.train.trainer import Trainer

    splits, cfg = synthetic2
    cfg = build_config(cfg.model_dump(), {"trainer": {"epochs": 3}})
    seen = []
    trainer = Trainer(splits, make_method("joint"), cfg, epoch_callback=lambda e, entry: seen.append((e, entry["val"]["accuracy"])))
    trainer.fit()
    assert seen == [(h["epoch"], h["val"]["accuracy"]) for h in trainer.history] and len(seen) == 3

    class Stop(Exception):
        pass

    def stop_at_1(epoch, entry):
        if epoch == 1:
            raise Stop

    trainer = Trainer(splits, make_method("joint"), cfg, epoch_callback=stop_at_1)
    with pytest.raises(Stop):
        trainer.fit()
    assert len(trainer.history) == 2


class FakeTrial:
    """Records what a trial reports; prunes from ``prune_at`` on."""

    def __init__(self, prune_at):
        self.reported, self.prune_at = [], prune_at

    def report(self, value, step):
        self.reported.append((step, value))

    def should_prune(self):
        return self.reported[-1][0] >= self.prune_at


def test_a_pruned_trial_stops_at_that_epoch_with_its_best_validation_accuracy(one_thread):
    from poise.bench import run_config
    from poise.tune import _run_trial

    cfg = run_config("synthetic", TINY, {"trainer": {"epochs": 4}})
    trial = FakeTrial(prune_at=1)
    state, value, error = _run_trial(trial, "synthetic", "joint", cfg.model_dump())
    assert state == "pruned" and [s for s, _ in trial.reported] == [0, 1]
    assert value == max(v for _, v in trial.reported)
    trial = FakeTrial(prune_at=99)
    state, value, _ = _run_trial(trial, "synthetic", "joint", cfg.model_dump())
    assert state == "complete" and len(trial.reported) == 4 and value == max(v for _, v in trial.reported)


# ---- the test split is never seen -------------------------------------------------------------------------------

def _npz(path: Path, permute_test: bool) -> str:
    rng = np.random.default_rng(0)
    n, classes = 200, 3
    labels = rng.integers(0, classes, n)
    labels[:classes] = np.arange(classes)
    split = np.array(["train"] * 120 + ["val"] * 40 + ["test"] * 40)
    strong = rng.normal(size=(n, 6)) + 1.5 * np.eye(classes, 6)[labels]
    weak = rng.normal(size=(n, 4)) + 0.5 * np.eye(classes, 4)[labels]
    if permute_test:
        test = np.flatnonzero(split == "test")
        labels = labels.copy()
        labels[test] = labels[rng.permutation(test)]
    np.savez(path, audio=strong.astype(np.float32), visual=weak.astype(np.float32), labels=labels, split=split)
    return f"npz:{path}"


def _trials(results: dict) -> dict:
    return {m: [(h["number"], h["state"], h["value"], h["params"]) for h in s["history"]]
            for m, s in results["tuning"]["methods"].items()}


def test_permuting_the_test_labels_changes_no_trial_and_no_choice(tmp_path, one_thread):
    from poise.bench import run_config
    from poise.tune import run_tune

    outcomes = []
    for permute in (False, True):
        dataset = _npz(tmp_path / f"data{int(permute)}.npz", permute)
        cfg = run_config(dataset, {"trainer": TINY["trainer"]})
        outcomes.append(run_tune(dataset, ["joint", "ogm_ge"], 3, [0], cfg, tmp_path / f"tune{int(permute)}", log=lambda _: None))
    plain, permuted = outcomes
    assert _trials(plain) == _trials(permuted)
    assert all(h["value"] is not None for s in plain["tuning"]["methods"].values() for h in s["history"])
    assert {m: s["chosen"] for m, s in plain["tuning"]["methods"].items()} == \
        {m: s["chosen"] for m, s in permuted["tuning"]["methods"].items()}
    # the permutation did reach the test split: the same models score differently on it
    assert [r["test"]["accuracy"] for r in plain["runs"]] != [r["test"]["accuracy"] for r in permuted["runs"]]


# ---- storage: resume after SIGKILL, parallel trials -------------------------------------------------------------

def _states(db: Path) -> list[str]:
    try:
        with sqlite3.connect(db, timeout=1) as con:
            return [row[0] for row in con.execute("SELECT state FROM trials")]
    except sqlite3.Error:
        return []


def test_a_killed_tune_resumes_and_asks_what_an_uninterrupted_one_asks(tmp_path, one_thread):
    from poise.bench import run_config
    from poise.tune import run_tune

    sets = ["--set", "trainer.epochs=4", "--set", "trainer.batch_size=32", "--set", "dataset.num_samples=240",
            "--set", "trainer.probe=false"]
    argv = ["tune", "--dataset", "synthetic", "--methods", "joint,ogm_ge", "--trials", "4", "--seeds", "0",
            "--out", str(tmp_path / "killed"), *sets]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    process = subprocess.Popen([sys.executable, "-m", "poise", *argv], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    db = tmp_path / "killed" / "study.db"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            states = _states(db)
            if "COMPLETE" in states and states[-1] == "RUNNING":
                break
            time.sleep(0.01)
        assert process.poll() is None, "the tune ended before it could be killed in a trial"
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    assert "RUNNING" in _states(db)
    assert main([*argv, "--resume"]) == 0
    resumed = json.loads((tmp_path / "killed" / "results.json").read_text())
    cfg = run_config("synthetic", None, {"trainer": {"epochs": 4, "batch_size": 32, "probe": False},
                                         "dataset": {"num_samples": 240}})
    whole = run_tune("synthetic", ["joint", "ogm_ge"], 4, [0], cfg, tmp_path / "whole", log=lambda _: None)

    def counted(results):
        return {m: [(h["state"], h["value"], h["params"]) for h in s["history"] if h["state"] != "interrupted"]
                for m, s in results["tuning"]["methods"].items()}

    assert "RUNNING" not in _states(db)
    assert [h["state"] for s in resumed["tuning"]["methods"].values() for h in s["history"]].count("interrupted") == 1
    assert counted(resumed) == counted(whole)
    assert all(len(v) == 4 for v in counted(resumed).values())
    assert [r["test"]["accuracy"] for r in resumed["runs"]] == [r["test"]["accuracy"] for r in whole["runs"]]


def test_parallel_trials_fill_the_budget_exactly(tmp_path):
    from optuna.trial import TrialState

    from poise.bench import run_config
    from poise.tune import STUDY_FILE, storage_url, tune_method

    cfg = run_config("synthetic", TINY, {"trainer": {"epochs": 2}})
    study = tune_method("synthetic", "joint", 3, cfg, storage_url(tmp_path, None), workers=2, log=lambda _: None)
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.COMPLETE) == 3 and len(states) == 3
    assert all(len(t.intermediate_values) == 2 for t in study.get_trials())  # the workers reported every epoch
    assert (tmp_path / STUDY_FILE).is_file()


# ---- the command line and the reports ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv, message", [
    (["--methods", "all"], "not 'all'"),
    (["--methods", "joint[trainer.lr=0.1]"], "takes method names, not variants"),
    (["--methods", "jiont"], "did you mean 'joint'"),
    (["--methods", "joint", "--set", "data.protocol=released"], "data.protocol released has none"),
    (["--methods", "joint", "--trials", "0"], "--trials must be at least 1"),
])
def test_bad_input_is_one_sentence(argv, message, tmp_path, capsys):
    args = ["tune", "--dataset", "synthetic", "--out", str(tmp_path / "t"), *(["--trials", "2"] if "--trials" not in argv else []), *argv]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_study_of_another_setting_is_refused(tmp_path, capsys):
    from poise.bench import run_config
    from poise.tune import storage_url, tune_method

    url = storage_url(tmp_path, None)
    tune_method("synthetic", "joint", 1, run_config("synthetic", TINY, {"trainer": {"epochs": 1}}), url, log=lambda _: None)
    with pytest.raises(Exception, match="tunes another setting \\(first difference: 'config.trainer.epochs'\\)"):
        tune_method("synthetic", "joint", 1, run_config("synthetic", TINY, {"trainer": {"epochs": 2}}), url, log=lambda _: None)


def _run(method, seed, accuracy, seconds=1.0, probe=None):
    return {"method": method, "seed": seed, "config": {}, "best_epoch": 0, "train_seconds": seconds, "history": [],
            "test": {"accuracy": accuracy, "macro_f1": accuracy, "unimodal_accuracy": {},
                     "probe_accuracy": probe or {"a": 0.9, "b": 0.5}}}


def test_bench_report_marks_only_intervals_that_exclude_zero(tmp_path):
    from poise.eval.report import write_report

    runs = [_run("joint", s, a) for s, a in enumerate((0.80, 0.81, 0.83))]
    runs += [_run("better", s, a) for s, a in enumerate((0.90, 0.92, 0.94))]   # d = .10, .11, .11
    runs += [_run("noisy", s, a) for s, a in enumerate((0.70, 0.95, 0.85))]
    text = write_report({"dataset": "x", "runs": runs}, tmp_path).read_text()
    assert "## Against `joint`" in text
    assert "| better | 3 | +10.67 [+9.23, +12.10] * |" in text
    noisy = [line for line in text.splitlines() if line.startswith("| noisy |")][-1]  # the Against section's
    assert "*" not in noisy and "[" in noisy


def test_tune_report_and_plots(tmp_path):
    from poise.eval.leaderboard import write_tune_report

    space = {"trainer.lr": "[0.001, 0.3] log"}
    history = [{"number": 0, "state": "complete", "value": 0.8, "params": {"trainer.lr": 0.01}, "seconds": 1.0},
               {"number": 1, "state": "pruned", "value": 0.5, "params": {"trainer.lr": 0.2}, "seconds": 0.5}]
    summary = {"search_space": space, "chosen": {"trainer.lr": 0.01}, "best_value": 0.8, "best_trial": 0,
               "trials_complete": 1, "trials_pruned": 1, "trials_error": 0, "seconds": 1.5, "history": history}
    results = {
        "dataset": "x", "command": "poise tune ...",
        "runs": [_run(m, s, a + 0.05 * (m == "ogm")) for m in ("joint", "ogm") for s, a in enumerate((0.8, 0.82, 0.85))],
        "default_runs": [_run(m, s, a, probe={"a": 0.9, "b": 0.4 + 0.1 * (m == "ogm")})
                         for m in ("joint", "ogm") for s, a in enumerate((0.8, 0.8, 0.81))],
        "tuning": {"trials": 2, "seeds": [0, 1, 2], "trial_seed": 0, "storage": "sqlite:///x",
                   "sampler": {"seed": 0, "n_startup_trials": 3}, "pruner": {"n_startup_trials": 3, "n_warmup_steps": 1},
                   "methods": {"joint": summary, "ogm": summary}},
    }
    text = write_tune_report(results, tmp_path).read_text()
    assert "probe b: default → tuned" in text  # b is the weak modality under joint
    ogm = next(line for line in text.splitlines() if line.startswith("| ogm |"))
    assert "+5.00 [+5.00, +5.00] *" in ogm and "1 / 1 / 0" in ogm and "`lr`=0.01" in ogm
    for png in ("accuracy_vs_overhead.png", "trial_history.png"):
        assert (tmp_path / png).stat().st_size > 1000 and f"![{png}]({png})" in text
    (tmp_path / "report.md").unlink()
    (tmp_path / "results.json").write_text(json.dumps(results))
    assert main(["report", str(tmp_path)]) == 0  # poise report rewrites a tune folder's own report
    assert (tmp_path / "report.md").read_text() == text
