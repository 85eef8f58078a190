"""Measure the modality imbalance of the ``avdigits`` defaults: joint training against each modality
trained alone, with the frozen-encoder linear probe, over several seeds, one CPU thread per run.

    .venv/bin/python scripts/avdigits_imbalance.py                 # seeds 0, 1, 2; split_seed 0
    .venv/bin/python scripts/avdigits_imbalance.py --set dataset.text=true

Prints a markdown table (mean +- std over the seeds, in accuracy points) and the time per run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from threadpoolctl import threadpool_limits

from poise.config import build_config, parse_set
from poise.data import load_dataset
from poise.data.registry import DATASETS
from poise.methods.registry import make_method
from poise.train import Trainer


def mean_std(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):.1f} +- {100 * statistics.pstdev(values):.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(1)
    threadpool_limits(1)  # the probe's scikit-learn solver too
    torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))])  # import torch's optimiser machinery before timing

    quiet = {"trainer": {"progress": False, "tensorboard": False}}
    cfg = build_config(DATASETS["avdigits"].defaults, quiet, parse_set(args.set))
    splits = load_dataset("avdigits", cfg.dataset, cfg.data)
    modalities = tuple(splits.info.modalities)
    methods = ["joint"] + [f"unimodal:{m}" for m in modalities]
    results: dict[str, list] = {}
    for spec in methods:
        results[spec] = []
        for seed in seeds:
            wall, cpu = time.perf_counter(), time.process_time()
            result = Trainer(splits, make_method(spec), cfg, seed=seed).fit()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            results[spec].append((result, wall, cpu))
            print(f"{spec} seed {seed}: acc {result.test['accuracy']:.3f} probe {result.test['probe_accuracy']} "
                  f"best epoch {result.best_epoch} {wall:.1f} s wall {cpu:.1f} s cpu", flush=True)

    print(f"\nsizes: train {len(splits.train)}, val {len(splits.val)}, test {len(splits.test)}; seeds {seeds}\n")
    print("| run | fused test accuracy | " + " | ".join(f"probe {m}" for m in modalities) + " | s / run (wall, cpu) |")
    print("|---|---|" + "---|" * len(modalities) + "---|")
    for spec in methods:
        runs = results[spec]
        cells = []
        for m in modalities:
            values = [r.test["probe_accuracy"][m] for r, _, _ in runs if m in r.test["probe_accuracy"]]
            cells.append(mean_std(values) if values else "")
        wall = statistics.mean(w for _, w, _ in runs)
        cpu = statistics.mean(c for _, _, c in runs)
        print(f"| {spec} | {mean_std([r.test['accuracy'] for r, _, _ in runs])} | " + " | ".join(cells)
              + f" | {wall:.1f}, {cpu:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
