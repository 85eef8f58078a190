"""Unscaled features: one informative modality multiplied by 1e4, trained with and without
``data.standardize``. Prints, per method, the test accuracy of the fused model and of that modality's
head and probe, one value per seed (chance: 0.25), and on stderr why a run stopped.

    python benchmarks/feature_scale.py [--methods joint,ogm_ge,gblend,mla] [--seeds 0] [--epochs 8]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np


def write_feature_file(path: Path, scale: float = 1e4, n: int = 600, classes: int = 4, dim: int = 8,
                       seed: int = 0) -> Path:
    """Two informative vector modalities: ``unit`` as it comes (unit noise) and ``large`` (about as
    informative) multiplied by ``scale``, as features from different extractors come."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    arrays = {}
    for name, signal in (("unit", 2.0), ("large", 3.0)):
        prototypes = rng.standard_normal((classes, dim)) / np.sqrt(dim) * signal
        arrays[name] = prototypes[labels] + rng.standard_normal((n, dim))
    arrays["large"] = arrays["large"] * scale + 5 * scale  # large values, far from zero
    np.savez(path, labels=labels, **{k: v.astype(np.float32) for k, v in arrays.items()})
    return path


def run(methods: list[str], seeds: list[int], epochs: int, standardize: bool, folder: Path) -> list[dict]:
    from poise.bench import method_options, run_config, splits_for
    from poise.errors import PoiseError
    from poise.methods.registry import make_method
    from poise.train.trainer import Trainer

    data = f"npz:{write_feature_file(folder / 'features.npz')}"
    rows = []
    for method in methods:
        for seed in seeds:
            cfg = run_config(data, set_layer={"trainer": {"epochs": epochs, "progress": False, "tensorboard": False},
                                              "data": {"standardize": standardize}})
            try:
                result = Trainer(splits_for(data, cfg), make_method(method, method_options(cfg, method)), cfg,
                                 seed=seed).fit()
            except PoiseError as err:
                rows.append({"method": method, "seed": seed, "error": str(err)})
                continue
            t = result.test
            rows.append({"method": method, "seed": seed, "accuracy": t["accuracy"],
                         "head": t["unimodal_accuracy"]["large"], "probe": t["probe_accuracy"]["large"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="joint,ogm_ge,gblend,mla")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    print("| method | data.standardize | fused accuracy | head of `large` | probe of `large` |")
    print("|---|---|---|---|---|")

    def cells(rows: list[dict], key: str) -> str:
        return " / ".join("stopped" if "error" in r else f"{r[key]:.3f}" for r in rows)

    with tempfile.TemporaryDirectory() as tmp:
        for standardize in (False, True):
            rows = run(methods, seeds, args.epochs, standardize, Path(tmp))
            for method in methods:
                mine = [r for r in rows if r["method"] == method]
                print(f"| `{method}` | {str(standardize).lower()} | {cells(mine, 'accuracy')} | {cells(mine, 'head')} | "
                      f"{cells(mine, 'probe')} |", flush=True)
            for r in rows:
                if "error" in r:
                    print(f"  {r['method']} seed {r['seed']} stopped: {r['error']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
