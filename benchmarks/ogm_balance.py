"""Does OGM-GE help the weak modality, and does the optimizer let it?

Part 1 trains each modality alone, joint, OGM (released and continuous coefficient), OGM-GE (default
alpha and alpha 0.1) and OPM, with SGD and with AdamW, on ``synthetic`` and ``avdigits`` (dataset
defaults from the registry, 3 seeds), and prints fused test accuracy and the frozen-encoder
linear-probe accuracy of every modality (mean +- std over seeds).

Part 2 isolates the actuator: two copies of one model see the same batches; in one, the gradients of
the dominant encoder are multiplied by a constant ``k`` before every step (what OGM does when the
imbalance holds still). It prints how far that encoder moved relative to the unscaled copy. Under SGD
the ratio follows ``k``; AdamW divides by a running gradient scale, so a constant ``k`` cancels and the
ratio stays near 1 -- only changes of ``k`` from step to step survive.

    .venv/bin/python benchmarks/ogm_balance.py [--datasets synthetic,avdigits] [--seeds 0,1,2] [--workers 2]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

OPTIMIZERS = {
    "sgd": {},  # the dataset's own defaults (SGD, momentum 0.9)
    "adamw": {"optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01},  # the TPAMI setting
}
#: (label, registered method, options); the unimodal runs give each encoder's ceiling when trained alone
METHODS = (
    ("unimodal", "unimodal", {}),
    ("joint", "joint", {}),
    ("ogm", "ogm", {}),
    ("ogm continuous", "ogm", {"continuous": True}),
    ("ogm_ge", "ogm_ge", {}),
    ("ogm_ge alpha=0.1", "ogm_ge", {"alpha": 0.1}),
    ("opm", "opm", {}),
)


def run_one(job: tuple[str, str, str, int]) -> list[dict]:
    dataset, optimizer, label, seed = job
    _, method, options = next(m for m in METHODS if m[0] == label)
    torch.set_num_threads(1)
    from poise.config import build_config
    from poise.data import DATASETS, load_dataset
    from poise.methods import make_method
    from poise.train import Trainer

    cfg = build_config(
        DATASETS[dataset].defaults,
        {"trainer": {**OPTIMIZERS[optimizer], "progress": False, "tensorboard": False, "probe": True}},
    )
    splits = load_dataset(dataset, {}, cfg.data)
    specs = [f"unimodal:{m}" for m in splits.info.modalities] if method == "unimodal" else [method]
    rows = []
    for spec in specs:
        result = Trainer(splits, make_method(spec, options), cfg, seed=seed).fit()
        records = [h["method"] for h in result.history]
        keys = {k for r in records for k in r if k.startswith(("coef/", "q/"))}
        rows.append({
            "dataset": dataset, "optimizer": optimizer, "method": label, "seed": seed,
            "accuracy": result.test["accuracy"], "probe": result.test["probe_accuracy"],
            "mean_coef": {k: statistics.mean(r[k] for r in records if k in r) for k in keys},
        })
    if method == "unimodal":
        # one row: each modality's probe from its own unimodal run; no fused accuracy
        probe = {k: v for r in rows for k, v in r["probe"].items()}
        return [{**rows[0], "accuracy": float("nan"), "probe": probe}]
    return rows


def fmt(values: list[float]) -> str:
    if any(math.isnan(v) for v in values):
        return "-"
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def part1(datasets: list[str], seeds: list[int], workers: int) -> list[dict]:
    jobs = [(d, o, m[0], s) for d in datasets for o in OPTIMIZERS for m in METHODS for s in seeds]
    with ProcessPoolExecutor(workers) as pool:
        rows = [row for result in pool.map(run_one, jobs) for row in result]
    for d in datasets:
        modalities = list(next(r for r in rows if r["dataset"] == d and r["method"] == "joint")["probe"])
        print(f"\n### {d} ({len(seeds)} seeds; test accuracy %, mean ± std)\n")
        print("| optimizer | method | fused | " + " | ".join(f"probe {m}" for m in modalities) + " | mean coef / q |")
        print("|---|---|---|" + "---|" * len(modalities) + "---|")
        for o in OPTIMIZERS:
            for m, _, _ in METHODS:
                sel = [r for r in rows if r["dataset"] == d and r["optimizer"] == o and r["method"] == m]
                probes = " | ".join(fmt([r["probe"][mod] for r in sel]) for mod in modalities)
                keys = sorted(sel[0]["mean_coef"])
                coef = ", ".join(f"{k} {statistics.mean(r['mean_coef'][k] for r in sel):.2f}" for k in keys) or "-"
                print(f"| {o} | {m} | {fmt([r['accuracy'] for r in sel])} | {probes} | {coef} |")
    return rows


def encoder_displacement(optimizer_name: str, k: float, steps: int = 200, seed: int = 0) -> float:
    """How far the dominant (audio) encoder of ``synthetic`` moves in ``steps`` steps when its gradients
    are scaled by a constant ``k``, relative to the same run with ``k = 1``."""
    from poise.config import build_config
    from poise.data import DATASETS, load_dataset
    from poise.data.batch import collate
    from poise.functional.ogm import modulate_gradients, select_modulated_parameters
    from poise.models.model import build_model

    cfg = build_config(DATASETS["synthetic"].defaults)
    splits = load_dataset("synthetic", {}, cfg.data)
    torch.manual_seed(seed)
    base = build_model(splits.info, tuple(splits.info.modalities), "concat", feature_dim=cfg.model.feature_dim)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=64, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(seed))
    moved = {}
    for scale in (1.0, k):
        model = copy.deepcopy(base)
        if optimizer_name == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        groups = [select_modulated_parameters(model.encoders[m]) for m in model.modalities]
        start = [p.detach().clone() for p in groups[0]]
        coefficients = torch.tensor([scale] + [1.0] * (len(groups) - 1))
        step = 0
        torch.manual_seed(seed)
        while step < steps:
            for batch in loader:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(batch).logits, batch.labels).backward()
                modulate_gradients(groups, coefficients)
                opt.step()
                step += 1
                if step == steps:
                    break
        moved[scale] = float(torch.sqrt(sum(((p.detach() - s) ** 2).sum() for p, s in zip(groups[0], start))))
    return moved[k] / moved[1.0]


def part2() -> dict:
    torch.set_num_threads(1)
    out = {}
    print("\n### Constant gradient scale k on the dominant encoder: displacement relative to k = 1 (200 steps)\n")
    print("| k | SGD (momentum 0.9) | AdamW |")
    print("|---|---|---|")
    for k in (0.7, 0.3, 0.1):
        sgd, adamw = encoder_displacement("sgd", k), encoder_displacement("adamw", k)
        out[k] = {"sgd": sgd, "adamw": adamw}
        print(f"| {k} | {sgd:.2f} | {adamw:.2f} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", default="synthetic,avdigits")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write every run's numbers to this file")
    args = parser.parse_args()
    rows = part1(args.datasets.split(","), [int(s) for s in args.seeds.split(",")], args.workers)
    scale = part2()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": rows, "constant_scale": scale}, f, indent=1)


if __name__ == "__main__":
    main()
