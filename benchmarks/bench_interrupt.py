"""How long ``poise bench --workers 2`` takes to stop after Ctrl-C or SIGTERM, and what it leaves behind.

    .venv/bin/python benchmarks/bench_interrupt.py [--signal INT|TERM] [--twice] [--dataset avdigits]

Starts a bench in its own process group, waits until its first run is in ``results.json``, then sends the
signal: SIGINT to the whole group, as a terminal's Ctrl-C does (``--twice``: a second one 0.3 s later), or
SIGTERM to the bench process alone, as ``kill`` does. Prints the seconds from the signal to the exit of
the bench process, its exit status, the runs kept in ``results.json`` and whether processes of its
group (the workers) were still alive 10 s after that exit.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def interrupt_bench(out: Path, bench_args: list[str], signum: int = signal.SIGINT, twice: bool = False,
                    start_timeout: float = 300.0, stop_timeout: float = 60.0) -> dict:
    """Run ``poise bench BENCH_ARGS --workers 2 --out OUT``, signal it after its first finished run and
    report what happened."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "poise", "bench", *bench_args, "--workers", "2", "--out", str(out)]
    out.parent.mkdir(parents=True, exist_ok=True)
    # files, not pipes: a worker left running would hold a pipe open
    with open(out.parent / "stdout.txt", "w+") as stdout, open(out.parent / "stderr.txt", "w+") as stderr:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=stdout, stderr=stderr, text=True)
        results = out / "results.json"
        deadline = time.monotonic() + start_timeout
        while not results.is_file():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                stderr.seek(0)
                raise RuntimeError(f"the bench finished no run in time (exit {proc.poll()}): {stderr.read()}")
            time.sleep(0.1)
        start = time.monotonic()
        if signum == signal.SIGINT:
            os.killpg(proc.pid, signal.SIGINT)
            if twice:
                time.sleep(0.3)
                if group_alive(proc.pid):
                    os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(signum)
        try:
            proc.wait(timeout=stop_timeout)
            seconds = time.monotonic() - start
        except subprocess.TimeoutExpired:
            seconds = float("inf")
        left = time.monotonic() + 10
        while group_alive(proc.pid) and time.monotonic() < left:
            time.sleep(0.1)
        leftover = group_alive(proc.pid)
        if leftover:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        stdout.seek(0)
        stderr.seek(0)
        stdout, stderr = stdout.read(), stderr.read()
    runs = json.loads(results.read_text())["runs"]
    return {"seconds": seconds, "returncode": proc.returncode, "runs_kept": len(runs), "processes_left": leftover,
            "stdout": stdout, "stderr": stderr}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signal", choices=("INT", "TERM"), default="INT")
    parser.add_argument("--twice", action="store_true", help="a second Ctrl-C 0.3 s after the first")
    parser.add_argument("--dataset", default="avdigits")
    parser.add_argument("--methods", default="joint,ogm_ge,mla,opm")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--stop-timeout", type=float, default=60.0, help="seconds to wait for the exit, then kill")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        report = interrupt_bench(Path(scratch) / "bench", ["--dataset", args.dataset, "--methods", args.methods,
                                                           "--seeds", args.seeds],
                                 getattr(signal, f"SIG{args.signal}"), args.twice, stop_timeout=args.stop_timeout)
    jobs = len(args.methods.split(",")) * len(args.seeds.split(","))
    after = f"{report['seconds']:.1f} s" if report["seconds"] < float("inf") else \
        f"not stopped after {args.stop_timeout:.0f} s, killed,"
    print(f"SIG{args.signal}{' twice' if args.twice else ''}: exit {report['returncode']} after {after} {report['runs_kept']} of {jobs} runs kept in results.json, "
          f"{'processes left behind' if report['processes_left'] else 'no process left'}")
    print("last lines of stderr:", *report["stderr"].strip().splitlines()[-3:], sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
