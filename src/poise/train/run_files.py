"""The files that describe a run folder, written by every way of training (``poise train``, ``poise bench``,
``Trainer(...).fit()``): ``run.json`` (what ``poise eval`` and ``--resume`` rebuild the run from) and
``result.json`` (the finished run's result)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from poise.errors import PoiseError
from poise.io import atomic_write_text

#: a run folder's description: dataset, method, name, seed, init folder, configuration, standardisation
RUN_FILE = "run.json"
RESULT_FILE = "result.json"
#: what a finished or started run leaves in its folder (what --overwrite clears)
RUN_OUTPUTS = (RUN_FILE, RESULT_FILE, "checkpoint.pt", "best.pt", "metrics.jsonl", "tensorboard", "pretrain",
               "eval_test.json", "eval_val.json")


def write_run_description(out_dir: Path, description: dict[str, Any]) -> None:
    atomic_write_text(json.dumps(description, indent=1), Path(out_dir) / RUN_FILE)


def stored_statistics(out_dir: str | Path | None) -> dict | None:
    """The standardisation statistics recorded in a run folder's ``run.json`` (None when it has none)."""
    if out_dir is None:
        return None
    path = Path(out_dir) / RUN_FILE
    try:
        return json.loads(path.read_text()).get("standardization")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None


def check_out_dir(out: Path, flag: str = "--out") -> None:
    """One sentence when ``out`` cannot be a run folder: a file, or a folder that cannot be written."""
    if out.exists() and not out.is_dir():
        raise PoiseError(f"{flag} '{out}' is a file; give a folder for the run's outputs")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise PoiseError(f"{flag} '{out}' cannot be created: '{probe}' is a file")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PoiseError(f"{flag} '{out}' cannot be written: no write permission in '{probe}'")


def clear_run_folder(out: Path, names: tuple[str, ...] = RUN_OUTPUTS) -> None:
    """Remove what an earlier run left in ``out`` (``--overwrite``), TensorBoard events included."""
    for name in names:
        target = out / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


__all__ = ["RESULT_FILE", "RUN_FILE", "RUN_OUTPUTS", "atomic_write_text", "check_out_dir", "clear_run_folder",
           "stored_statistics", "write_run_description"]
