"""Equal-budget tuning on the validation split (``poise tune``).

Every method gets one Optuna study of the same number of trials over the options it declares
(``Params.tunable``) and the shared trainer options (``TrainerConfig.tunable``: the learning rate, for the
baseline too). A trial is one run with seed ``TRIAL_SEED``; its objective is the best per-epoch validation
accuracy (the epoch the trainer would select), reported epoch by epoch through the trainer's
``epoch_callback`` so that a median pruner can stop a bad trial early. Trials never read the test split's
labels: the objective comes from the validation history alone. The best configuration of each method,
and its default configuration, are then trained with the final seeds by ``poise bench``'s machinery.

The studies live in one database (an SQLite file in the output folder by default, or any URL Optuna
accepts): a killed tune resumes from it. A trial left running by a process that no longer exists on this
machine is marked failed and its parameters are queued again, so the budget counts finished trials only
and a resumed tune asks the same configurations as one that was never stopped (the sampler is seeded
with the study's seed plus the number of trials counted so far).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from poise.bench import environment, run_bench, run_folder
from poise.config import RunConfig, TrainerConfig, build_config
from poise.errors import ConfigError, PoiseError
from poise.eval.report import group_runs
from poise.eval.significance import against_baseline
from poise.methods.registry import METHODS
from poise.runs import splits_for, train_one

#: the database file of the studies in the output folder (default storage)
STUDY_FILE = "study.db"
#: what a tune leaves in its folder (what --overwrite clears)
TUNE_OUTPUTS = ("results.json", "report.md", STUDY_FILE, "default", "tuned", "accuracy_vs_overhead.png",
                "trial_history.png")
#: the run seed of every trial (the final runs use --seeds)
TRIAL_SEED = 0
#: the seed of the TPE sampler (plus the number of trials counted when each trial is asked)
SAMPLER_SEED = 0
#: trials train without the parts that only the final runs need
TRIAL_SETTINGS = {"trainer": {"probe": False, "tensorboard": False, "checkpoint": False, "progress": False}}
#: a trial's user attribute: the ``host:pid`` of the tune that runs it (to tell a killed tune's trials)
OWNER = "poise_owner"
#: a trial's user attribute: the sentence of the error that stopped its training (it still counts)
ERROR = "poise_error"
#: the study's user attribute that records what it tunes (a resumed or shared study must match it)
SIGNATURE = "poise_signature"


def search_space(spec: str) -> dict[str, Any]:
    """Config key -> range for ``spec``: the shared trainer options, then each method part's own options."""
    if "[" in spec:
        raise ConfigError(f"poise tune takes method names, not variants ('{spec}'); give the fixed settings with "
                          "--set, they then hold for every method")
    space: dict[str, Any] = {f"trainer.{key}": r for key, r in TrainerConfig.tunable.items()}
    for part in spec.split("+"):
        name = part.strip().partition(":")[0]
        params = METHODS[name].Params
        for option, r in params.tunable.items():
            field = params.model_fields[option]
            space[f"method.{name}.{field.alias or option}"] = r
    return space


def overrides(params: dict[str, Any]) -> dict:
    """``{"trainer.lr": 0.1, "method.ogm.alpha": 0.3}`` -> the nested config layer."""
    out: dict = {}
    for key, value in params.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def storage_url(out: Path, storage: str | None) -> str:
    return storage or f"sqlite:///{(out / STUDY_FILE).resolve()}"


def shown_url(url: str) -> str:
    """The URL without its password (for the report)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url


def _storage(url: str):
    import optuna

    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
    except Exception as err:
        raise ConfigError(f"--storage '{shown_url(url)}' cannot be opened by Optuna ({err.__class__.__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else ''}); give a database URL such as "
                          "sqlite:///study.db or postgresql://user:password@host/db") from None


def pruner(epochs: int):
    """Median pruning: from the 4th trial on, stop a trial whose validation accuracy at an epoch (after the
    first quarter of the epochs) is below the median of the finished trials at that epoch."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(1, epochs // 4))


def startup_trials(trials: int) -> int:
    """TPE samples at random for the first third of the budget (at least 3, at most 10), then models."""
    return max(3, min(10, trials // 3))


def _sampler(trials: int, counted: int):
    import optuna

    return optuna.samplers.TPESampler(seed=SAMPLER_SEED + counted, n_startup_trials=startup_trials(trials),
                                      constant_liar=True)  # parallel trials: the running ones count as poor


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_gone(owner: str | None) -> bool:
    """The trial's tune ran on this machine and its process no longer exists (or is this one: pid reused)."""
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def counted(trial) -> bool:
    """A trial that uses the budget: finished, pruned, or stopped by its own training error."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        trial.state == TrialState.FAIL and ERROR in trial.user_attrs)


def _open_study(url: str, spec: str, signature: dict, epochs: int):
    import optuna

    from poise.train.checkpoint import first_difference

    storage = _storage(url)
    study = optuna.create_study(storage=storage, study_name=spec, direction="maximize", load_if_exists=True,
                                pruner=pruner(epochs))
    stored = study.user_attrs.get(SIGNATURE)
    if stored is None:
        study.set_user_attr(SIGNATURE, signature)
    else:
        differs = first_difference(stored, json.loads(json.dumps(signature)))
        if differs is not None:
            raise ConfigError(f"the study '{spec}' in '{shown_url(url)}' tunes another setting (first difference: "
                              f"'{differs}'); give the same --dataset, --config and --set, or another --out or --storage")
    return study


def _requeue_stale(study, owner: str) -> int:
    """Trials left running by a killed tune on this machine: failed (without an error sentence: they do not
    count) and their parameters queued again."""
    from optuna.trial import TrialState

    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
             if _owner_gone(t.user_attrs.get(OWNER))]
    for t in stale:
        study.tell(t.number, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"requeued_from": t.number, OWNER: owner})
    return len(stale)


def _in_budget(study) -> int:
    """Trials that count or are running (anyone's)."""
    from optuna.trial import TrialState

    return sum(counted(t) or t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))


def _run_trial(trial, dataset: str, spec: str, cfg_dict: dict) -> tuple[str, float | None, str | None]:
    """Train one trial; (state, objective, error): "complete" with the best validation accuracy, "pruned"
    with the best so far, or "error" with the sentence of a training error (a divergent configuration)."""
    import optuna

    best: list[float] = []

    def report(epoch: int, entry: dict) -> None:
        accuracy = float(entry["val"]["accuracy"])
        best.append(max(best[-1], accuracy) if best else accuracy)
        trial.report(accuracy, epoch)
        if trial.should_prune():
            raise optuna.TrialPruned()

    try:
        train_one(dataset, spec, cfg_dict, TRIAL_SEED, None, epoch_callback=report)
    except optuna.TrialPruned:
        return "pruned", best[-1] if best else None, None
    except PoiseError as err:
        return "error", None, str(err)
    return "complete", best[-1], None


def _worker_trial(url: str, study_name: str, trial_id: int, dataset: str, spec: str, cfg_dict: dict,
                  epochs: int) -> tuple[str, float | None, str | None]:
    import optuna

    _quiet_optuna()
    study = optuna.load_study(study_name=study_name, storage=_storage(url), pruner=pruner(epochs),
                              sampler=optuna.samplers.RandomSampler())
    return _run_trial(optuna.trial.Trial(study, trial_id), dataset, spec, cfg_dict)


def _worker_init() -> None:
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the tune's to handle; it ends the workers


def tune_method(dataset: str, spec: str, trials: int, cfg: RunConfig, url: str, workers: int = 1,
                log=print) -> Any:
    """Run trials of ``spec`` until its study holds ``trials`` counted ones; returns the study."""
    from optuna.trial import TrialState

    space = search_space(spec)
    signature = {"dataset": dataset, "method": spec, "config": cfg.model_dump(), "trial_seed": TRIAL_SEED,
                 "search_space": {key: str(r) for key, r in space.items()}}
    epochs = cfg.trainer.epochs
    study = _open_study(url, spec, signature, epochs)
    owner = _owner()
    requeued = _requeue_stale(study, owner)
    if requeued:
        log(f"{spec}: {requeued} trial(s) of a stopped tune run again")
    base = cfg.model_dump()

    def ask():
        study.sampler = _sampler(trials, _in_budget(study))
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            # queued with its owner, so that the trial is never running without one (a kill in between)
            study.enqueue_trial({}, user_attrs={OWNER: owner})
        trial = study.ask()
        trial.set_user_attr(OWNER, owner)  # a trial queued by another tune sharing the storage
        params = {key: r.suggest(trial, key) for key, r in space.items()}
        return trial, build_config(base, overrides(params), TRIAL_SETTINGS).model_dump()

    def tell(trial, outcome) -> None:
        state, value, error = outcome
        if state == "complete":
            study.tell(trial, value)
        elif state == "pruned":
            study.tell(trial, state=TrialState.PRUNED)
        else:
            trial.set_user_attr(ERROR, error)
            study.tell(trial, state=TrialState.FAIL)
        shown = f"{value:.4f}" if value is not None else error
        log(f"{spec} trial {trial.number}: {state} {shown}  "
            + " ".join(f"{k.rpartition('.')[2]}={v:.4g}" if isinstance(v, float) else f"{k.rpartition('.')[2]}={v}"
                       for k, v in trial.params.items()))

    if workers <= 1:
        while True:
            while _in_budget(study) < trials:
                trial, trial_cfg = ask()
                tell(trial, _run_trial(trial, dataset, spec, trial_cfg))
            if _others_finished(study, owner, log) >= trials:
                return study
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    pool = ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), initializer=_worker_init)
    running: dict = {}
    try:
        while True:
            while len(running) < workers and _in_budget(study) < trials:
                trial, trial_cfg = ask()
                # the worker reports the trial's epochs and asks the pruner through the storage, by the trial's id
                running[pool.submit(_worker_trial, url, spec, trial._trial_id, dataset, spec, trial_cfg, epochs)] = trial
            if not running and _others_finished(study, owner, log) >= trials:
                break
            if running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    tell(running.pop(future), future.result())
    except BaseException:
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.kill()
        raise
    pool.shutdown()
    return study


def _others_finished(study, owner: str, log, poll: float = 5.0) -> int:
    """Wait until no other tune sharing the storage runs a trial of ``study`` (every tune then chooses from
    the same finished trials); the trials that count then (a killed tune's are queued again and do not)."""
    from optuna.trial import TrialState

    told = False
    while True:
        _requeue_stale(study, owner)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return _in_budget(study)
        if not told:
            log(f"{study.study_name}: waiting for {len(running)} trial(s) of other tunes sharing the storage")
            told = True
        time.sleep(poll)


def study_summary(study, space: dict[str, Any]) -> dict[str, Any]:
    """What results.json keeps of a study: the chosen configuration, the counts, the time, every trial."""
    from optuna.trial import TrialState

    history = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        state = "error" if counted(t) and t.state == TrialState.FAIL else \
            "interrupted" if t.state == TrialState.FAIL else t.state.name.lower()
        value = t.value if t.state == TrialState.COMPLETE else (
            max(t.intermediate_values.values()) if t.state == TrialState.PRUNED and t.intermediate_values else None)
        history.append({"number": t.number, "state": state, "value": value, "params": dict(t.params),
                        "seconds": seconds, **({"error": t.user_attrs[ERROR]} if ERROR in t.user_attrs else {})})
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:
        raise PoiseError(f"no trial of '{study.study_name}' finished (every one was pruned or stopped by a training "
                         "error): give more --trials or other ranges")
    best = max(complete, key=lambda t: (t.value, -t.number))  # ties: the earliest
    return {
        "search_space": {key: str(r) for key, r in space.items()},
        "chosen": dict(best.params),
        "best_value": best.value,
        "best_trial": best.number,
        "trials_complete": sum(h["state"] == "complete" for h in history),
        "trials_pruned": sum(h["state"] == "pruned" for h in history),
        "trials_error": sum(h["state"] == "error" for h in history),
        "seconds": sum(h["seconds"] or 0.0 for h in history if h["state"] in ("complete", "pruned", "error")),
        "history": history,
    }


def run_tune(dataset: str, methods: list[str], trials: int, seeds: list[int], cfg: RunConfig, out: Path,
             workers: int = 1, storage: str | None = None, log=print, overwrite: bool = False,
             command: str | None = None) -> dict:
    """Tune every method with ``trials`` trials on the validation split, then train its default and its
    chosen configuration with ``seeds`` (in ``out/default`` and ``out/tuned/<method>``, as ``poise bench``
    does); returns (and writes to ``out/results.json``) the tuned runs in ``poise bench``'s schema, with
    ``default_runs`` and ``tuning`` beside them."""
    from poise.io import atomic_write_text

    if trials < 1:
        raise ConfigError(f"--trials must be at least 1, got {trials}")
    if cfg.data.protocol == "released":
        raise ConfigError("poise tune selects on the validation split, and data.protocol released has none; "
                          "tune under data.protocol poise")
    if overwrite:
        from poise.train.run_files import clear_run_folder

        clear_run_folder(out, TUNE_OUTPUTS)
    out.mkdir(parents=True, exist_ok=True)
    _quiet_optuna()
    url = storage_url(out, storage)
    spaces = {spec: search_space(spec) for spec in methods}
    from poise.methods.registry import make_method
    from poise.runs import method_options
    from poise.train.trainer import Trainer

    for spec in methods:  # a bad dataset or an incompatible method is told before any study is opened
        Trainer(splits_for(dataset, cfg), make_method(spec, method_options(cfg, spec)), cfg, seed=0, method_name=spec)
    summaries = {}
    for spec in methods:
        start = time.perf_counter()
        study = tune_method(dataset, spec, trials, cfg, url, workers, log)
        summaries[spec] = study_summary(study, spaces[spec])
        log(f"{spec}: chosen {summaries[spec]['chosen']} (validation accuracy {summaries[spec]['best_value']:.4f}; "
            f"{time.perf_counter() - start:.0f}s here)")

    def bench(names: list[str], run_cfg: RunConfig, folder: Path) -> dict:
        return run_bench(dataset, names, seeds, run_cfg, folder, workers=workers, log=log,
                         resume=(folder / "results.json").is_file())

    default = bench(methods, cfg, out / "default")
    tuned_runs = []
    for spec in methods:
        tuned_cfg = build_config(cfg.model_dump(), overrides(summaries[spec]["chosen"]))
        tuned_runs += bench([spec], tuned_cfg, out / "tuned" / run_folder(Path("."), spec, 0).parent.name)["runs"]
    results = {
        "dataset": dataset,
        **({"command": command} if command else {}),
        "environment": environment(),
        "runs": tuned_runs,
        "default_runs": default["runs"],
        "tuning": {
            "trials": trials, "seeds": seeds, "trial_seed": TRIAL_SEED,
            "objective": "best per-epoch validation accuracy of one run with the trial seed",
            "sampler": {"name": "TPESampler", "seed": SAMPLER_SEED, "n_startup_trials": startup_trials(trials),
                        "constant_liar": True},
            "pruner": {"name": "MedianPruner", "n_startup_trials": 3, "n_warmup_steps": max(1, cfg.trainer.epochs // 4)},
            "storage": shown_url(url), "workers": workers,
            "methods": summaries,
        },
        "against_joint": {"tuned": against_baseline(group_runs({"runs": tuned_runs})),
                          "default": against_baseline(group_runs({"runs": default["runs"]}))},
    }
    atomic_write_text(json.dumps(results, indent=1), out / "results.json")
    return results


__all__ = ["STUDY_FILE", "TUNE_OUTPUTS", "overrides", "run_tune", "search_space", "study_summary", "tune_method"]
