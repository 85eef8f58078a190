"""Honest statistics: every run of a bench is a distinct (method, seed), and the spread is the sample std."""

import math
import statistics

import pytest

from poise.cli import main
from poise.eval.report import mean_std, summary_table


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--seeds", "0,1,0"], "--seeds lists seed 0 more than once ('0,1,0'); give each seed once"),
        (["--methods", "joint,ogm,joint"], "--methods lists 'joint' more than once; give each method once"),
        (["--methods", "all,ogm_ge"], "--methods lists 'ogm_ge' more than once (once through 'all')"),
        (["--methods", "joint[trainer.lr=0.1],joint[trainer.lr= 0.1]"],
         "entries 'joint[trainer.lr=0.1]' and 'joint[trainer.lr= 0.1]' would share the run folder"),
    ],
)
def test_a_run_listed_twice_is_refused_before_anything_is_written(argv, message, capsys, tmp_path):
    out = tmp_path / "X"
    assert main(["bench", "--dataset", "synthetic", "--out", str(out), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_spread_is_the_sample_standard_deviation():
    values = [0.91, 0.95, 0.97, 0.90]
    m, s = mean_std(values)
    assert m == pytest.approx(sum(values) / 4)
    naive = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    assert s == pytest.approx(naive) and s == pytest.approx(statistics.stdev(values))


def _run(method, seed, acc):
    return {"method": method, "seed": seed, "train_seconds": 1.0,
            "test": {"accuracy": acc, "macro_f1": acc, "unimodal_accuracy": {}, "probe_accuracy": {}}}


def test_table_counts_seeds_and_shows_no_spread_for_one_seed():
    table = summary_table({"dataset": "d", "runs": [_run("a", 0, 0.5), _run("a", 1, 0.7), _run("b", 0, 0.8)]})
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()[2:]}
    assert rows["a"][:2] == ["2", f"60.00 ± {statistics.stdev([50, 70]):.2f}"]
    assert rows["b"][:2] == ["1", "80.00"]
