"""MLA (paper and released variants) against joint training: fused test accuracy, frozen-encoder probe
accuracy of the weak modality (the one joint's probe rates lowest), and CPU time per run relative to
joint (training and evaluation, the probe's fit left out). Every run uses the dataset's own
defaults, one thread, and the best validation epoch.

    python benchmarks/mla_vs_joint.py [--dataset synthetic] [--seeds 0,1,2] [--ablations]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from poise.bench import run_config, splits_for
from poise.config import parse_set
from poise.eval.probe import linear_probe
from poise.methods.registry import make_method
from poise.train.trainer import Trainer

VARIANTS = {"joint": ("joint", {}), "mla": ("mla", {}), "mla (released)": ("mla", {"variant": "released"})}
ABLATIONS = {
    "mla, no gradient modification": ("mla", {"gradient_modification": False}),
    "mla, fixed equal weights": ("mla", {"dynamic_fusion": False}),
    "mla, joint step (no alternation)": ("mla", {"alternate": False}),
    "mla, owm_alpha 1": ("mla", {"owm_alpha": 1.0}),
    "mla, owm_alpha 0.01": ("mla", {"owm_alpha": 0.01}),
}


def mean_std(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else f"{100 * values[0]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    parser.add_argument("--ablations", action="store_true", help="also run MLA with each part switched off")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sets = ["trainer.progress=false", "trainer.tensorboard=false", *args.sets, "trainer.probe=false"]
    cfg = run_config(args.dataset, {}, parse_set(sets))
    splits = splits_for(args.dataset, cfg)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = {**VARIANTS, **(ABLATIONS if args.ablations else {})}
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for name, options in VARIANTS.values():  # warm-up, untimed: one-off allocations and lazy imports
        Trainer(splits, make_method(name, options), cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"epochs": 1})})).fit()
    for seed in seeds:
        for label, (name, options) in variants.items():
            trainer = Trainer(splits, make_method(name, options), cfg, seed=seed, method_name=label)
            start = time.process_time()
            run = trainer.fit()
            cpu = time.process_time() - start
            train_loader, test_loader = trainer.make_loader(splits.train, False), trainer.make_loader(splits.test, False)
            run.test["probe_accuracy"] = linear_probe(trainer.model, train_loader, test_loader, trainer.device)
            results[label].append({"test": run.test, "cpu": cpu})
            print(f"{label:<34} seed {seed}: acc {run.test['accuracy']:.4f} probe {run.test['probe_accuracy']} "
                  f"cpu {results[label][-1]['cpu']:.1f}s", flush=True)
    joint_probe = results["joint"][0]["test"]["probe_accuracy"]
    weak = min(joint_probe, key=lambda m: statistics.mean(r["test"]["probe_accuracy"][m] for r in results["joint"]))
    joint_cpu = statistics.mean(r["cpu"] for r in results["joint"])
    print(f"\n{args.dataset}, seeds {args.seeds}, weak modality: {weak}\n")
    print(f"| method | fused accuracy | probe {weak} (weak) | head {weak} | CPU time x joint |")
    print("|---|---|---|---|---|")
    for label, runs in results.items():
        acc = mean_std([r["test"]["accuracy"] for r in runs])
        probe = mean_std([r["test"]["probe_accuracy"][weak] for r in runs])
        head = mean_std([r["test"]["unimodal_accuracy"][weak] for r in runs])
        ratio = statistics.mean(r["cpu"] for r in runs) / joint_cpu
        print(f"| {label} | {acc} | {probe} | {head} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
