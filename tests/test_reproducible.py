"""The same command gives the same numbers: the thread count is a run setting that train and bench apply."""

import json

import torch

from poise.cli import main

AVDIGITS_SHORT = ["--set", "trainer.epochs=3", "--set", "trainer.progress=false", "--set", "trainer.tensorboard=false"]


def test_a_bench_row_is_reproduced_exactly_by_poise_train_whatever_the_process_threads(tmp_path):
    # The process runs the bench with three threads and poise train with two: either changes avdigits'
    # numbers from the second epoch on unless the run's own setting (1 thread) is applied.
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        assert main(["bench", "--dataset", "avdigits", "--methods", "ogm_ge", "--seeds", "0",
                     "--out", str(tmp_path / "bench"), *AVDIGITS_SHORT]) == 0
        torch.set_num_threads(2)
        assert main(["train", "--dataset", "avdigits", "--method", "ogm_ge", "--seed", "0",
                     "--out", str(tmp_path / "train"), *AVDIGITS_SHORT]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    bench = json.loads((tmp_path / "bench" / "results.json").read_text())["runs"][0]
    train = json.loads((tmp_path / "train" / "result.json").read_text())
    assert train["test"] == bench["test"]
    assert [h["train_loss"] for h in train["history"]] == [h["train_loss"] for h in bench["history"]]
    assert [h["val"] for h in train["history"]] == [h["val"] for h in bench["history"]]
    stored = json.loads((tmp_path / "train" / "run.json").read_text())
    assert stored["config"]["trainer"]["threads"] == bench["config"]["trainer"]["threads"] == 1


def test_threads_zero_leaves_the_process_setting(tmp_path):
    from poise.train.trainer import set_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        set_threads(0)
        assert torch.get_num_threads() == 3
        set_threads(2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
