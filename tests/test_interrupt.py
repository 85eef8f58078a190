"""Ctrl-C and SIGTERM on `poise bench --workers 2`: queued runs cancelled, running ones stopped within
seconds, finished ones kept in results.json, a hint to --resume, no process left behind."""

import importlib.util
import json
import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_interrupt", ROOT / "benchmarks" / "bench_interrupt.py")
bench_interrupt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_interrupt)

# short runs first, so that one is in results.json soon, then runs that would take minutes
ARGS = ["--dataset", "synthetic", "--methods", "joint[trainer.epochs=1],ogm_ge[trainer.epochs=500]", "--seeds", "0,1",
        "--set", "dataset.num_samples=300", "--set", "trainer.progress=false", "--set", "trainer.probe=false"]


@pytest.mark.parametrize("signum,twice", [(signal.SIGINT, True),
                                          pytest.param(signal.SIGTERM, False, marks=pytest.mark.slow)])
def test_an_interrupted_bench_stops_at_once_keeps_its_finished_runs_and_leaves_no_process(tmp_path, signum, twice):
    out = tmp_path / "bench"
    report = bench_interrupt.interrupt_bench(out, ARGS, signum, twice, stop_timeout=60)
    assert report["returncode"] == 128 + signum, report["stderr"]
    # the queued runs were not run: before, the bench went on with every one of them
    assert report["seconds"] < 20
    assert 1 <= report["runs_kept"] <= 2
    assert not report["processes_left"]
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert all(r["test"]["accuracy"] > 0 for r in runs)
    last = report["stderr"].strip().splitlines()[-1]
    assert last.startswith(f"poise: interrupted: {len(runs)} of 4 runs finished and are kept in {out / 'results.json'}")
    assert last.endswith(f"--workers 2 --out {out} --resume")
    assert "Traceback" not in report["stderr"]
