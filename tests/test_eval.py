"""poise eval: a finished run's best checkpoint scored as trained, under missing-modality rates and with
each modality dropped; compared against a direct evaluation and a run trained with the same test masks."""

from __future__ import annotations

import json

import pytest
import torch

from poise.cli import main

RUN = ["--dataset", "synthetic", "--seed", "0", "--set", "trainer.epochs=3", "--set", "trainer.progress=false",
       "--set", "trainer.tensorboard=false", "--set", "trainer.probe=false", "--set", "dataset.num_samples=400"]


@pytest.fixture(scope="module")
def mla_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "mla"
    assert main(["train", *RUN, "--method", "mla", "--out", str(out)]) == 0
    return out


def test_eval_as_configured_equals_the_run_result_and_missing_rates_match_a_trained_mask(mla_run, tmp_path, capsys):
    assert main(["eval", str(mla_run), "--missing-rates", "0.3"]) == 0
    printed = capsys.readouterr().out
    assert "| without audio |" in printed and "| missing rate 0.3 |" in printed
    report = json.loads((mla_run / "eval_test.json").read_text())
    rows = {r["condition"]: r for r in report["results"]}
    result = json.loads((mla_run / "result.json").read_text())
    as_run = rows["as configured"]
    assert as_run["accuracy"] == result["test"]["accuracy"]
    assert as_run["unimodal_accuracy"] == result["test"]["unimodal_accuracy"]

    # the 0.3 row uses the masks of a run configured with data.missing_rate_test=0.3: evaluating that
    # configuration "as configured" gives the same numbers
    assert main(["eval", str(mla_run), "--set", "data.missing_rate_test=0.3", "--no-drop-each"]) == 0
    configured = json.loads((mla_run / "eval_test.json").read_text())["results"]
    assert len(configured) == 1 and configured[0]["missing_rate"] == 0.3
    assert configured[0]["accuracy"] == rows["missing rate 0.3"]["accuracy"]

    # MLA fuses only what is present: without audio its prediction is the visual head's
    without_audio = rows["without audio"]
    assert without_audio["dropped"] == "audio"
    assert without_audio["accuracy"] == pytest.approx(without_audio["unimodal_accuracy"]["visual"])


def test_eval_refuses_what_would_not_fit_the_weights(mla_run, capsys):
    assert main(["eval", str(mla_run), "--set", "model.fusion=concat"]) == 2
    assert "poise eval cannot change 'model.fusion'" in capsys.readouterr().err
    assert main(["eval", str(mla_run), "--missing-rates", "0.3,x"]) == 2
    assert "--missing-rates expects comma-separated numbers" in capsys.readouterr().err
    assert main(["eval", str(mla_run), "--missing-rates", "1.0"]) == 2
    assert "missing rates must be in [0, 1)" in capsys.readouterr().err
    assert main(["eval", str(mla_run), "--split", "train"]) == 2
    assert "--split must be one of test, val" in capsys.readouterr().err
    assert main(["eval", str(mla_run / "nowhere")]) == 2
    assert "run.json' does not exist" in capsys.readouterr().err


def test_eval_of_a_bench_run_and_an_unfinished_run(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--dataset", "synthetic", "--methods", "joint[model.fusion=sum]", "--seeds", "1",
                 "--out", str(out), *RUN[4:]]) == 0
    run_dir = out / "runs" / "joint_model.fusion_sum" / "seed1"
    assert main(["eval", str(run_dir), "--split", "val"]) == 0
    report = json.loads((run_dir / "eval_val.json").read_text())
    assert report["method"] == "joint[model.fusion=sum]" and report["seed"] == 1
    history = json.loads((out / "results.json").read_text())["runs"][0]
    assert report["results"][0]["accuracy"] == history["history"][history["best_epoch"]]["val"]["accuracy"]
    (run_dir / "best.pt").unlink()
    assert main(["eval", str(run_dir)]) == 2
    assert "the run has not finished" in capsys.readouterr().err
    (run_dir / "best.pt").write_bytes(b"not a checkpoint")
    assert main(["eval", str(run_dir)]) == 2
    assert "cannot be read as a poise checkpoint" in capsys.readouterr().err


def test_eval_of_a_whole_bench_summarises_over_seeds(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--dataset", "synthetic", "--methods", "joint,mla", "--seeds", "0,1",
                 "--out", str(out), *RUN[4:]]) == 0
    capsys.readouterr()
    assert main(["eval", str(out), "--missing-rates", "0.5"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "eval_test.json").read_text())
    assert [(r["method"], r["seed"]) for r in summary["runs"]] == [("joint", 0), ("joint", 1), ("mla", 0), ("mla", 1)]
    results = json.loads((out / "results.json").read_text())["runs"]
    for report, run in zip(summary["runs"], results):
        assert report["results"][0]["accuracy"] == run["test"]["accuracy"]
    # the table's cell is the mean and sample std of the per-seed values
    values = [100 * r["results"][1]["accuracy"] for r in summary["runs"][2:]]
    mean = sum(values) / 2
    std = (sum((v - mean) ** 2 for v in values)) ** 0.5
    line = next(l for l in printed.splitlines() if l.startswith("| mla |"))
    assert f"{mean:.2f} ± {std:.2f}" in line.split("|")[4]
    assert "| method | seeds | as configured | missing rate 0.5 | without audio | without visual |" in printed
    assert (out / "eval_test.md").read_text().count("| joint | 2 |") == 1
