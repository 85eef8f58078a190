"""Joint against UMT and UME, and joint with and without self-supervised encoder pre-training.

    .venv/bin/python benchmarks/teachers_pretrain.py --dataset synthetic --seeds 0,1,2

Prints two markdown tables (mean +- std over seeds): fused test accuracy, every modality's frozen
linear-probe accuracy and the run's CPU seconds on one thread (process time, so that other load on
the machine does not count; UMT and UME include training their unimodal models, the pre-trained row
adds the pre-training). Configuration: the dataset's defaults plus the probe.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from poise.bench import method_options, run_config, splits_for
from poise.methods import make_method
from poise.train import Trainer
from poise.train.pretrain import run_pretrain


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(rows: dict[str, list[dict]], modalities: list[str]) -> str:
    lines = ["| run | fused accuracy | " + " | ".join(f"probe {m}" for m in modalities) + " | CPU seconds |",
             "|---|---|" + "---|" * len(modalities) + "---|"]
    for name, runs in rows.items():
        probes = " | ".join(mean_std([r["probe"][m] for r in runs]) for m in modalities)
        seconds = statistics.mean(r["seconds"] for r in runs)
        lines.append(f"| {name} | {mean_std([r['accuracy'] for r in runs])} | {probes} | {seconds:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: timings comparable across runs)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    cfg = run_config(args.dataset, {}, {"trainer": {"probe": True, "progress": False, "tensorboard": False}})
    splits = splits_for(args.dataset, cfg)
    modalities = list(splits.info.modalities)

    def fit(spec: str, seed: int, init_dir: str | None = None, extra_seconds: float = 0.0) -> dict:
        start = time.process_time()
        result = Trainer(splits, make_method(spec, method_options(cfg, spec)), cfg, seed=seed, init_dir=init_dir).fit()
        return {"accuracy": result.test["accuracy"], "probe": result.test["probe_accuracy"],
                "seconds": time.process_time() - start + extra_seconds}

    # one discarded epoch first: the first run of a process pays one-off imports (torch.optim loads torch._dynamo)
    Trainer(splits, make_method("joint"), cfg.model_copy(update={"trainer": cfg.trainer.model_copy(
        update={"epochs": 1, "probe": False})}), seed=0).fit()
    methods = {spec: [fit(spec, seed) for seed in seeds] for spec in ("joint", "umt", "ume")}
    print(f"## {args.dataset}: joint, UMT, UME ({len(seeds)} seeds, {cfg.trainer.epochs} epochs)\n")
    print(table(methods, modalities))

    pretrained = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as folder:
            start = time.process_time()
            run_pretrain(splits, cfg, Path(folder), seed)
            pretrained.append(fit("joint", seed, init_dir=folder, extra_seconds=time.process_time() - start))
    print(f"\n## {args.dataset}: joint with and without contrastive pre-training ({cfg.trainer.epochs} epochs each)\n")
    print(table({"joint": methods["joint"], "contrastive pre-training + joint": pretrained}, modalities))


if __name__ == "__main__":
    main()
