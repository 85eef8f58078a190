"""The trainer-overhead benchmark runs and writes its JSON (tiny settings: one round of one step)."""

import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def trainer_overhead(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import trainer_overhead

    return trainer_overhead


def test_every_registered_method_gets_a_row_unless_skipped(trainer_overhead):
    from poise.methods.registry import BASELINES, METHODS

    names = trainer_overhead.method_names("all", {"umt", "ume"})
    assert names == [m for m in METHODS if m not in BASELINES and m not in ("umt", "ume")]
    assert trainer_overhead.method_names("ogm,joint,opm", set()) == ["ogm", "opm"]


def test_trainer_overhead_runs_and_writes_its_json(trainer_overhead, tmp_path, capsys):
    out = tmp_path / "overhead.json"
    assert trainer_overhead.main(["--settings", "avdigits", "--methods", "ogm_ge,opm", "--rounds", "2", "--steps", "1",
                                  "--warmup", "0", "--threads", "1", "--clock", "cpu", "--json", str(out)]) == 0
    result = json.loads(out.read_text())["settings"]["avdigits"]
    assert result["trainer_vs_plain"] > 0 and 0 < result["finite_check_share"] < 1
    assert set(result["methods_vs_joint"]) == {"ogm_ge", "opm", "opm[extra_pass]"}
    assert all(r > 0 for r in result["methods_vs_joint"].values())
    text = capsys.readouterr().out
    assert "| `plain` |" in text and "| `ogm_ge` |" in text


def test_unknown_setting_and_method_are_refused(trainer_overhead):
    with pytest.raises(SystemExit, match="unknown setting 'imagenet'"):
        trainer_overhead.main(["--settings", "imagenet"])
    with pytest.raises(SystemExit, match="unknown method 'ogmx'"):
        trainer_overhead.main(["--settings", "avdigits", "--methods", "ogmx"])


def test_ge_noise_benchmark_times_poise_the_released_form_and_the_samplers(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import ge_noise

    groups = ge_noise.cremad_gradients()
    assert sum(p.numel() for g in groups for p in g) > 22_000_000  # both ResNet-18s' weight tensors
    assert ge_noise.main(["--rounds", "1"]) == 0
    text = capsys.readouterr().out
    for row in ("| poise GE step |", "| released form |", "| torch normal_ |", "| torch uniform_ |"):
        assert row in text
    assert "drawing 22.3 M numbers with torch's normal_ alone" in text
