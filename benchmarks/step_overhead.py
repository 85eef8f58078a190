"""Training-time overhead of each method relative to ``joint``, measured in one run.

Every method trains the same model on the same data; epochs are timed round-robin (one epoch of
each method in turn, several rounds) so that machine noise hits all methods alike, and the median
epoch time of each method is divided by joint's. An epoch includes the method's epoch hooks, so
G-Blend's online re-estimation passes and MLA's per-modality steps are counted where they happen.
One-off work before training (G-Blend's offline estimation, UMT/UME's teachers) is reported apart, as
the time of ``setup`` plus the first epoch in units of joint's median epoch.

    python benchmarks/step_overhead.py [--dataset avdigits] [--methods ...] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from poise.bench import run_config, splits_for
from poise.config import parse_set
from poise.methods.registry import balancing_methods, make_method
from poise.train.trainer import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="avdigits")
    parser.add_argument("--methods", default="all", help="comma list, or 'all' for every balancing method")
    parser.add_argument("--rounds", type=int, default=10, help="timed epochs per method")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = run_config(args.dataset, {}, parse_set(["trainer.progress=false", "trainer.tensorboard=false", *args.sets]))
    methods = ["joint"] + (balancing_methods() if args.methods == "all" else [m for m in args.methods.split(",") if m != "joint"])
    splits = splits_for(args.dataset, cfg)
    trainers = {}
    first: dict[str, float] = {}
    for name in ["joint", *methods]:  # joint twice: its first pass warms up the process, the second is timed
        start = time.perf_counter()
        trainer = Trainer(splits, make_method(name, cfg.method.get(name, {})), cfg, seed=0, method_name=name)
        trainer.setup()
        trainer.train_epoch(0)  # allocations, one-off estimation or teacher training
        first[name] = time.perf_counter() - start
        trainers[name] = trainer
    times: dict[str, list[float]] = {name: [] for name in methods}
    for r in range(1, args.rounds + 1):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.train_epoch(r)
            times[name].append(time.perf_counter() - start)
    steps = len(trainers["joint"].train_loader)
    base = statistics.median(times["joint"])
    print(f"dataset {args.dataset}, {steps} steps per epoch, {args.rounds} rounds, {args.threads} thread(s)")
    print(f"{'method':<18} {'ms/step':>8} {'x joint':>8} {'setup + first epoch, in joint epochs':>38}")
    for name in methods:
        med = statistics.median(times[name])
        print(f"{name:<18} {med / steps * 1000:8.2f} {med / base:8.2f} {first[name] / base:38.1f}")


if __name__ == "__main__":
    main()
