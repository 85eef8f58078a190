"""Evaluation of a finished run under missing modalities (``poise eval``).

The run's best checkpoint (``best.pt``, read with ``weights_only=True``) is scored on one split as it
is, with each modality of every sample missing with probability ``r`` (the same masks as a run with
``data.missing_rate_test = r``: never all of a sample's modalities, fixed by ``data.split_seed``),
and with one modality missing from every sample. A missing modality is what the trainer sees for it:
a zero input and a False column in the batch's ``present`` mask.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from poise.bench import run_folder
from poise.runs import RUN_FILE, RunDescription
from poise.errors import ConfigError, DataError, json_problem

BEST_FILE = "best.pt"
SPLITS = ("test", "val")
#: what ``poise eval --set`` may change: how the data is presented and where the model runs
EVAL_KEYS = ("data.", "dataset.", "trainer.device", "trainer.batch_size", "trainer.num_workers")


def read_run(run_dir: Path) -> dict[str, Any]:
    """``run.json`` of a run folder: dataset, method, seed, config (and the run's name in a bench)."""
    return RunDescription.read(run_dir).to_dict()


def check_overrides(flat_keys: list[str]) -> None:
    for key in flat_keys:
        if key == "data.standardize":
            raise ConfigError("poise eval cannot change 'data.standardize': the weights in best.pt were trained on "
                              "features standardised (or not) as the run's configuration says")
        if not key.startswith(EVAL_KEYS):
            raise ConfigError(f"poise eval cannot change '{key}': the weights in {BEST_FILE} were trained with the run's "
                              f"own model and method; it may change {', '.join(k.rstrip('.') + ('.*' if k.endswith('.') else '') for k in EVAL_KEYS)}")


def evaluate_run(run_dir: Path, overrides: dict | None = None, split: str = "test",
                 missing_rates: list[float] | None = None, drop_each: bool = True) -> dict[str, Any]:
    """Scores of the run's best checkpoint on ``split``: as it is (``missing_rate`` = the configured
    rate), at each of ``missing_rates``, and with each modality dropped from every sample."""
    from poise.runs import method_options, splits_for
    from poise.config import build_config, flatten
    from poise.data.registry import split_missing_mask
    from poise.eval.metrics import evaluate
    from poise.methods.registry import make_method
    from poise.train.trainer import Trainer

    if split not in SPLITS:
        raise ConfigError(f"--split must be one of {', '.join(SPLITS)}, got '{split}'")
    for rate in missing_rates or []:
        if not 0.0 <= rate < 1.0:
            raise ConfigError(f"missing rates must be in [0, 1), got {rate}")
    run = read_run(run_dir)
    overrides = overrides or {}
    check_overrides(list(flatten(overrides)))
    cfg = build_config(run["config"], overrides)
    best_path = run_dir / BEST_FILE
    if not best_path.is_file():
        raise DataError(f"'{best_path}' does not exist: the run has not finished")
    from poise.train.checkpoint import read_torch_file

    best = read_torch_file(best_path, "a poise checkpoint")
    if not isinstance(best, dict) or not isinstance(best.get("model"), dict):
        raise DataError(f"'{best_path}' is not a poise checkpoint (no model weights in it)")
    state = best["model"]

    splits = splits_for(run["dataset"], cfg, run.get("standardization"))
    method = make_method(run["method"], method_options(cfg, run["method"]))
    trainer = Trainer(splits, method, cfg, seed=run["seed"], method_name=run.get("name", run["method"]))
    trainer.setup(training=False)  # the method's setup first: its predict may depend on its state
    model = trainer.model
    try:
        model.load_state_dict(state)
        method.load_state_dict(best.get("method") or {})
    except (RuntimeError, KeyError, ValueError) as err:
        raise DataError(f"'{best_path}' does not fit the model or the method of '{run_dir / RUN_FILE}': "
                        f"{str(err).splitlines()[0]}") from None
    dataset = splits.split(split)
    modalities = list(model.modalities)
    num_classes = splits.info.num_classes

    def score(ds) -> dict[str, Any]:
        result = evaluate(model, method, trainer.make_loader(ds, shuffle=False), num_classes, trainer.device)
        result.pop("loss")
        return result

    rows = [{"condition": "as configured", "missing_rate": _configured_rate(cfg, split), "dropped": None,
             **score(dataset)}]
    for rate in missing_rates or []:
        present = split_missing_mask(len(dataset), len(modalities), rate, cfg.data.split_seed, split)
        rows.append({"condition": f"missing rate {rate:g}", "missing_rate": rate, "dropped": None,
                     **score(dataset.with_present(present))})
    if drop_each and len(modalities) > 1:
        base = _present_of(dataset, len(modalities))
        for j, m in enumerate(modalities):
            present = base.clone()
            present[:, j] = False
            lost = ~present.any(dim=1)
            present[lost] = base[lost]  # a sample that had only m keeps it: never every modality gone
            rows.append({"condition": f"without {m}", "missing_rate": None, "dropped": m,
                         "samples_without_any_other": int(lost.sum()), **score(dataset.with_present(present))})
    return {"run": str(run_dir), "dataset": run["dataset"], "method": run.get("name", run["method"]),
            "seed": run["seed"], "best_epoch": best.get("epoch"), "split": split, "results": rows}


def bench_run_dirs(bench_dir: Path) -> list[Path]:
    """The run folders of a ``poise bench`` output folder, in the order of its results.json."""
    path = bench_dir / "results.json"
    try:
        runs = json.loads(path.read_text())["runs"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"'{path}' is not a poise results file"
                        + (f" ({err})" if isinstance(err, OSError) else f": {json_problem(err)}")) from None
    folders = []
    for run in runs:
        folder = run_folder(bench_dir, run["method"], run["seed"])
        if not (folder / RUN_FILE).is_file():
            raise DataError(f"'{folder / RUN_FILE}' does not exist: the bench in '{bench_dir}' was made before "
                            "run folders described themselves; run it again to evaluate it")
        folders.append(folder)
    return folders


def summary_table(reports: list[dict[str, Any]]) -> str:
    """Markdown: per method, the fused accuracy of every condition, mean ± std over its seeds (%)."""
    from poise.eval.report import _fmt

    conditions = list(dict.fromkeys(r["condition"] for report in reports for r in report["results"]))
    by_method: dict[str, dict[str, list[float]]] = {}
    for report in reports:
        cells = by_method.setdefault(report["method"], {})
        for r in report["results"]:
            cells.setdefault(r["condition"], []).append(r["accuracy"])
    lines = ["| method | seeds | " + " | ".join(conditions) + " |", "|---|---|" + "---|" * len(conditions)]
    for method, cells in by_method.items():
        seeds = max(len(v) for v in cells.values())
        lines.append(f"| {method} | {seeds} | " + " | ".join(_fmt(cells[c]) if c in cells else "-" for c in conditions) + " |")
    return "\n".join(lines)


def _configured_rate(cfg, split: str) -> float:
    if split == "test" and cfg.data.missing_rate_test is not None:
        return cfg.data.missing_rate_test
    return cfg.data.missing_rate


def _present_of(dataset, num_modalities: int) -> torch.Tensor:
    present = getattr(dataset, "present", None)
    if present is None:
        return torch.ones(len(dataset), num_modalities, dtype=torch.bool)
    return present.clone().bool()


def robustness_table(report: dict[str, Any]) -> str:
    rows = report["results"]
    modalities = list(rows[0]["unimodal_accuracy"])
    lines = ["| condition | accuracy | macro-F1 | " + " | ".join(f"head {m}" for m in modalities) + " |",
             "|---|---|---|" + "---|" * len(modalities)]
    for r in rows:
        heads = " | ".join(_pct(r["unimodal_accuracy"].get(m)) for m in modalities)
        lines.append(f"| {r['condition']} | {_pct(r['accuracy'])} | {_pct(r['macro_f1'])} | {heads} |")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None or value != value else f"{100 * value:.2f}"


__all__ = ["bench_run_dirs", "evaluate_run", "read_run", "robustness_table", "summary_table"]
