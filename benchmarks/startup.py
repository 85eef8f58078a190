"""Start-up time of the CLI against ``python -c "import torch"``.

    .venv/bin/python benchmarks/startup.py [--repeats 9]

Each command runs as a fresh process; the commands take turns (one round runs each once), so that a busy
machine slows them alike. Prints the median wall-clock seconds over the rounds and its ratio to the
median of ``import torch`` (the target: at most 1.5 for each poise command).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def commands(scratch: str) -> dict[str, list[str]]:
    poise = [sys.executable, "-m", "poise"]
    return {
        'python -c "import torch"': [sys.executable, "-c", "import torch"],
        "poise list": [*poise, "list"],
        "poise train --help": [*poise, "train", "--help"],
        "usage error: poise bench --dataset avdigits (no --out)": [*poise, "bench", "--dataset", "avdigits"],
        "unknown method: poise train --dataset avdigits --method ogmge": [
            *poise, "train", "--dataset", "avdigits", "--method", "ogmge", "--out", os.path.join(scratch, "run")],
    }


def timed(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=False)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9, help="rounds (each runs every command once)")
    args = parser.parse_args(argv)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as scratch:
        cmds = commands(scratch)
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for name, cmd in cmds.items():  # once untimed: the first start reads the files from disk
            timed(cmd, env)
        for _ in range(args.repeats):
            for name, cmd in cmds.items():
                times[name].append(timed(cmd, env))
    base = statistics.median(times['python -c "import torch"'])
    print(f"median of {args.repeats} interleaved runs, seconds (ratio to import torch)\n")
    print("| command | seconds | x import torch |")
    print("|---|---|---|")
    for name, values in times.items():
        print(f"| `{name}` | {statistics.median(values):.2f} | {statistics.median(values) / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
