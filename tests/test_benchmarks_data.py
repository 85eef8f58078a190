"""The data benchmarks still run (tiny settings; `make test-slow`)."""

from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def benchmarks(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))


@pytest.mark.slow
def test_prepare_speed_runs_for_every_dataset(benchmarks, capsys):
    import prepare_speed

    assert prepare_speed.main(["--dataset", "all", "--clips", "4", "--repeats", "1", "--image-size", "32"]) == 0
    out = capsys.readouterr().out
    for dataset in ("cremad", "kinetics_sounds", "ucf101", "food101"):
        assert f"{dataset}: 4 clips" in out
    assert out.count("speed-up of the prepared cache over raw") == 4


@pytest.mark.slow
def test_loader_throughput_runs(benchmarks, capsys):
    import loader_throughput

    assert loader_throughput.main(["--rounds", "1", "--clips", "14", "--batch", "2", "--steps", "1", "--passes", "1",
                                   "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "the loader delivers" in out and "loader, 2 workers" in out and "joint ResNet-18 step" in out
