"""Run methods x seeds on one dataset and collect the results (``poise bench``).

``results.json`` schema (stable):

    {"dataset": str,
     "command": str,                     # the poise bench command line (when run from the CLI)
     "environment": {"poise", "torch", "python", "platform"},   # versions
     "runs": [{"method": str,            # registered name, "unimodal:<modality>" for the baseline
               "seed": int,
               "config": {...},          # the full validated run configuration
               "best_epoch": int,        # chosen on the validation split ("selection": "validation"),
                                         # or the last epoch where there is none ("last epoch")
               "selection": str,
               "released_test_selected": None or   # data.protocol released only: TEST-SELECTED, the
                   {"accuracy", "macro_f1", "unimodal_accuracy", "epoch", "selected_on": "test"},
                                         # epoch of best test accuracy as the papers' code picks it
               "train_seconds": float,
               "test": {"accuracy": float, "macro_f1": float,
                        "unimodal_accuracy": {modality: float},
                        "probe_accuracy": {modality: float}},
               "history": [{"epoch", "lr", "train_loss", "train_terms", "train_accuracy",
                            "confidence_ratio": {modality: float}, "val": {...},
                            "method": {recorded name: float}, "seconds"}, ...]}]}
"""

from __future__ import annotations

import atexit
import json
import os
import re
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from poise.config import RunConfig, build_config, parse_set
from poise.errors import ConfigError, closest, json_problem
from poise.methods.registry import METHODS, balancing_methods, make_method
from poise.runs import (  # noqa: F401  (the run-assembly API lives in poise.runs; importable from here too)
    RUN_FILE,
    RunDescription,
    method_options,
    resolve_method,
    run_config,
    splits_for,
    train_one,
)


#: the variant keys that are not config keys
PRETRAIN_KEY = "pretrain"


@dataclass(frozen=True)
class RunSpec:
    """One entry of ``--methods``: a method, optionally with a variant in brackets,
    ``NAME[KEY=VALUE;KEY=VALUE]``. KEYs are config keys (``model.fusion=mfb``, ``trainer.lr=0.05``,
    ``method.ogm_ge.alpha=0.3``) layered over the run's configuration, or ``pretrain=contrastive|augment``:
    self-supervised pre-training of the encoders (``poise pretrain``) before the run, with the same seed.
    The full text is the run's name in the results."""

    name: str
    method: str
    overrides: dict
    pretrain: str | None = None

    def config(self, base: RunConfig) -> RunConfig:
        return build_config(base.model_dump(), self.overrides) if self.overrides else base


def split_methods(text: str) -> list[str]:
    """Commas separate entries except inside brackets."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += (ch == "[") - (ch == "]")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return [p.strip() for p in parts if p.strip()]


def parse_spec(name: str, modalities: tuple[str, ...]) -> RunSpec:
    match = re.fullmatch(r"([^\[\]]+?)\s*(?:\[([^\[\]]*)\])?", name)
    if match is None:
        raise ConfigError(f"'{name}' is not a method or a variant NAME[KEY=VALUE;...]")
    method, variant = match.group(1).strip(), match.group(2)
    base, _, arg = method.partition(":")
    for part in method.split("+"):  # a combination (ogm_ge+modality_dropout): every part must exist
        METHODS[part.strip().partition(":")[0]]  # raises with the closest name
    if base == "unimodal" and not arg:
        raise ConfigError(f"the unimodal baseline needs a modality: 'unimodal:<modality>' (valid: {', '.join(modalities)})")
    if base == "unimodal" and arg not in modalities:
        raise ConfigError(f"unknown modality '{arg}' in '{name}'{closest(arg, modalities)}")
    items = [item.strip() for item in (variant or "").split(";") if item.strip()]
    if variant is not None and not items:
        raise ConfigError(f"the variant of '{name}' is empty; write NAME[KEY=VALUE;...]")
    pretrain = None
    settings = []
    for item in items:
        key, sep, value = item.partition("=")
        if key.strip() == PRETRAIN_KEY:
            from poise.train.pretrain import OBJECTIVES

            if value.strip() not in OBJECTIVES:
                raise ConfigError(f"'{name}': pretrain must be one of {', '.join(OBJECTIVES)}, got '{value.strip()}'")
            pretrain = value.strip()
        else:
            settings.append(item)
    return RunSpec(name, method, parse_set(settings), pretrain)


def check_method_names(spec: str) -> None:
    """Refuse an unknown method name in ``spec`` before any data is loaded: a typo is told at once."""
    for name in split_methods(spec):
        if name == "all":
            continue
        for part in re.match(r"[^\[\]]*", name).group(0).split("+"):  # a combination: every part must exist
            base = part.partition(":")[0].strip()
            if base:
                METHODS[base]  # raises with the closest name


def expand_methods(spec: str, modalities: tuple[str, ...]) -> list[str]:
    """``all`` -> joint, every unimodal:<m>, every balancing method; otherwise a comma list of methods
    and variants (``joint[model.fusion=mfb]``), validated."""
    names = split_methods(spec)
    if not names:
        raise ConfigError("--methods is empty; give a comma-separated list or 'all'")
    out: list[str] = []
    source: dict[str, str] = {}  # name -> the --methods entry that brought it in
    for name in names:
        entries = ["joint", *(f"unimodal:{m}" for m in modalities), *balancing_methods()] if name == "all" else \
            [parse_spec(name, modalities).name]
        for entry in entries:
            if entry in source:  # the same runs twice would fake the spread over seeds and share run folders
                how = " (once through 'all')" if "all" in (name, source[entry]) else ""
                raise ConfigError(f"--methods lists '{entry}' more than once{how}; give each method once")
            source[entry] = name
            out.append(entry)
    folders: dict[str, str] = {}
    for entry in out:
        folder = run_folder(Path("."), entry, 0).parent.name
        if folder in folders:
            raise ConfigError(f"--methods entries '{folders[folder]}' and '{entry}' would share the run folder "
                              f"'runs/{folder}'; write one of them differently")
        folders[folder] = entry
    return out


#: what a bench leaves in its folder (what --overwrite clears)
BENCH_OUTPUTS = ("results.json", "report.md", "runs", "unimodal_accuracy.png", "confidence_ratio.png",
                 "method_records.png", "eval_test.json", "eval_test.md", "eval_val.json", "eval_val.md", "decisions")


def run_folder(out: Path, name: str, seed: int) -> Path:
    """Where ``poise bench`` in ``out`` keeps the run of one method (or variant) and seed."""
    return out / "runs" / re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") / f"seed{seed}"


def warm_up() -> None:
    """Import and initialise once per process what every run uses (the optimiser machinery, TensorBoard,
    the probe's solver), so that the first run of a process is not charged for it in ``train_seconds``."""
    import torch
    from sklearn.linear_model import LogisticRegression  # noqa: F401
    from torchmetrics.functional.classification import multiclass_accuracy  # noqa: F401
    from torch.utils.tensorboard import SummaryWriter  # noqa: F401

    import poise.train.trainer  # noqa: F401

    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    (p ** 2).sum().backward()
    opt.step()


def environment() -> dict[str, str]:
    """The versions a bench runs with (results.json, for its report)."""
    import platform

    import torch

    from poise import __version__

    return {"poise": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def run_bench(dataset: str, methods: list[str], seeds: list[int], cfg: RunConfig, out: Path, workers: int = 1,
              log=print, resume: bool = False, overwrite: bool = False, command: str | None = None) -> dict:
    """Every method x seed; ``resume=True`` continues an interrupted bench in ``out``: the finished runs of
    ``out/results.json`` are kept, runs with a ``checkpoint.pt`` continue from it, the rest start anew.
    ``overwrite=True`` deletes an earlier bench's outputs in ``out`` once every method is validated.
    ``command`` (the command line) and the versions of poise, torch and Python go into results.json."""
    from poise.train.distributed import is_main_process, launched_by_torchrun

    if workers > 1 and launched_by_torchrun():
        raise ConfigError("under torchrun every run already uses all the processes torchrun started; "
                          "leave --workers at 1")
    # Validate every method's options, variant and compatibility before the first run starts.
    from poise.train.trainer import Trainer

    modalities = tuple(splits_for(dataset, cfg).info.modalities)
    specs = {name: parse_spec(name, modalities) for name in methods}
    configs = {}
    for name, spec in specs.items():
        run_cfg = spec.config(cfg)
        Trainer(splits_for(dataset, run_cfg), make_method(spec.method, method_options(run_cfg, spec.method)), run_cfg,
                seed=0, method_name=name)
        configs[name] = run_cfg.model_dump()
    jobs = [(spec, seed) for spec in methods for seed in seeds]
    results: dict[tuple[str, int], dict] = {}
    resumable: set[tuple[str, int]] = set()
    env = environment()

    def save():
        if not is_main_process():  # under torchrun only rank 0 writes
            return
        runs = [results[j] for j in jobs if j in results]
        from poise.io import atomic_write_text

        meta = {"command": command, "environment": env} if command else {"environment": env}
        atomic_write_text(json.dumps({"dataset": dataset, **meta, "runs": runs}, indent=1), out / "results.json")

    def run_dir(spec: str, seed: int) -> str:
        return str(run_folder(out, spec, seed))

    def job_args(name: str, seed: int) -> tuple:
        spec = specs[name]
        return (dataset, spec.method, configs[name], seed, run_dir(name, seed))

    def job_options(job: tuple[str, int]) -> dict:
        return {"name": job[0], "pretrain": specs[job[0]].pretrain, "resume": job in resumable}

    if resume:
        results, resumable = _resumable(out, dataset, jobs, configs, run_dir)
        log(f"resuming {out}: {len(results)} finished runs kept, {len(resumable)} continue from their checkpoints, "
            f"{len(jobs) - len(results) - len(resumable)} start")
    if overwrite and not resume and is_main_process():
        from poise.train.run_files import clear_run_folder

        clear_run_folder(out, BENCH_OUTPUTS)
    out.mkdir(parents=True, exist_ok=True)
    todo = [job for job in jobs if job not in results]

    try:
        with _termination_as_interrupt():
            if workers <= 1:
                warm_up()
                for spec, seed in todo:
                    results[(spec, seed)] = train_one(*job_args(spec, seed), **job_options((spec, seed)))
                    log(_line(results[(spec, seed)]))
                    save()
            else:
                import multiprocessing as mp

                pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"),
                                           initializer=_worker_init)
                futures: dict = {}
                try:
                    with _signals_ignored():  # the workers start now and inherit it: Ctrl-C is the parent's alone
                        futures = {
                            pool.submit(_worker_run, *job_args(spec, seed), **job_options((spec, seed))): (spec, seed)
                            for spec, seed in todo
                        }
                    for fut in _as_completed(futures):
                        results[futures[fut]] = fut.result()
                        log(_line(results[futures[fut]]))
                        save()
                except BaseException:
                    with _signals_ignored():
                        _stop_pool(pool, futures)
                    raise
                pool.shutdown()
    except KeyboardInterrupt as err:
        with _signals_ignored():
            save()
        raise BenchInterrupted(sum(j in results for j in jobs), len(jobs), out / "results.json",
                               getattr(err, "signum", signal.SIGINT)) from None
    save()
    if not is_main_process():
        return json.loads(json.dumps({"dataset": dataset, "runs": [results[j] for j in jobs]}))
    return json.loads((out / "results.json").read_text())


def _resumable(out: Path, dataset: str, jobs: list[tuple[str, int]], configs: dict[str, dict],
               run_dir) -> tuple[dict[tuple[str, int], dict], set[tuple[str, int]]]:
    """The finished runs of an earlier bench in ``out`` and the jobs whose run folder has a checkpoint;
    refused when either was made with another configuration."""
    from poise.train.checkpoint import CHECKPOINT_FILE, first_difference, load_checkpoint

    path = out / "results.json"
    finished: dict[tuple[str, int], dict] = {}
    if path.is_file():
        try:
            earlier = json.loads(path.read_text())
            runs = {(r["method"], r["seed"]): r for r in earlier["runs"]}
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ConfigError(f"cannot resume: '{path}' is not a poise results file: {json_problem(err)}") from None
        if earlier.get("dataset") != dataset:
            raise ConfigError(f"cannot resume: '{path}' is a bench on '{earlier.get('dataset')}', not on '{dataset}'")
        for job in jobs:
            if job in runs:
                differs = first_difference(runs[job]["config"], configs[job[0]])
                if differs is not None:
                    raise ConfigError(f"cannot resume: run '{job[0]}' seed {job[1]} in '{path}' has another "
                                      f"configuration (first difference: '{differs}'); give the same --config and "
                                      "--set, or another --out")
                finished[job] = runs[job]
    checkpoints = set()
    for job in jobs:
        checkpoint = Path(run_dir(*job)) / CHECKPOINT_FILE
        if job not in finished and checkpoint.is_file():
            state = load_checkpoint(checkpoint)
            differs = first_difference(state["config"], configs[job[0]])
            if differs is not None:
                raise ConfigError(f"cannot resume: '{checkpoint}' has another configuration (first difference: "
                                  f"'{differs}'); give the same --config and --set, or another --out")
            checkpoints.add(job)
    return finished, checkpoints


class BenchInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a bench: queued runs cancelled, running ones stopped, finished ones saved."""

    def __init__(self, finished: int, total: int, results_path: Path, signum: int = signal.SIGINT):
        super().__init__(f"{finished} of {total} runs finished")
        self.finished, self.total, self.results_path, self.signum = finished, total, results_path, signum


@contextmanager
def _termination_as_interrupt():
    """SIGTERM stops the bench as Ctrl-C does (in the main thread; elsewhere signals cannot be handled)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, frame):
        err = KeyboardInterrupt()
        err.signum = signum
        raise err

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


#: set in a worker process when the bench stops it: the run in progress ends, and any run it is given after
_stopping = False


def _stop_worker(signum, frame) -> None:
    global _stopping
    _stopping = True
    raise KeyboardInterrupt


def _worker_init() -> None:
    # Ctrl-C reaches every process of the terminal's group: the parent alone decides (the worker started with
    # it ignored), and stops the workers with SIGTERM, which ends the run in progress (its last checkpoint.pt
    # stays for --resume)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_worker)
    # The last exit handler: multiprocessing has flushed and finalised by then, and the interpreter's own
    # teardown (collecting torch's objects) takes seconds that a stopping bench would wait for.
    atexit.register(os._exit, 0)
    try:
        warm_up()
    except KeyboardInterrupt:
        pass  # stopped while starting: every run it is given ends at once


def _worker_run(*args, **kwargs) -> dict:
    if _stopping:  # a run queued to this worker before the bench stopped
        raise KeyboardInterrupt
    return train_one(*args, **kwargs)


@contextmanager
def _signals_ignored():
    """Ctrl-C and SIGTERM ignored (in the main thread): a second Ctrl-C must not break off the clean-up."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _stop_pool(pool: ProcessPoolExecutor, futures, grace: float = 3.0) -> None:
    """Cancel the queued runs and end the running ones now: SIGTERM makes each worker stop its run (its last
    checkpoint.pt stays for --resume) and exit; a worker still there ``grace`` seconds after its run stopped
    is killed."""
    from concurrent.futures import wait

    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for future in futures:  # queued: cancelled here, as wait() is not woken by the pool's own cancelling
        future.cancel()
    wait([f for f in futures if not f.done()], timeout=grace)
    deadline = time.monotonic() + grace
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
    pool.shutdown(wait=True)


def _as_completed(futures):
    from concurrent.futures import as_completed

    return as_completed(futures)


def _line(run: dict) -> str:
    probe = " ".join(f"{m}={v:.3f}" for m, v in run["test"]["probe_accuracy"].items())
    released = run.get("released_test_selected")
    marked = f"  test-selected acc {released['accuracy']:.4f} (released protocol)" if released else ""
    return (f"{run['method']:<22} seed {run['seed']}: acc {run['test']['accuracy']:.4f}  probe {probe}  "
            f"({run['train_seconds']:.1f}s, best epoch {run['best_epoch']}){marked}"
            + "".join(f"\n  note: {note}" for note in run.get("notes", [])))


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))
