"""The trainer's step against a hand-written PyTorch loop, and every method's step against ``joint``.

Two settings, each on in-memory tensors:

- ``cremad``: CREMA-D size, the seed papers' model: two ResNet-18 from scratch (a 1 x 257 x 188
  spectrogram and one 3 x 224 x 224 frame), concat head, batch 8, SGD (lr 1e-3, momentum 0.9, weight
  decay 1e-4); random inputs, 6 classes.
- ``avdigits``: the built-in avdigits data and its encoders (MLP and small conv), batch 64.

The plain loop trains a copy of joint's initial model (the same encoder modules and the concat
head's linear layer, no poise code in the step) on the same batches, indexed from the same tensors.
Every variant of a setting runs in turn, one step at a time (the order rotating from step to step),
so that whatever else the machine does hits all of them alike. A trainer step is timed inside the
trainer's own loop, from one ``on_step_start`` to the next (loading the batch, forward, loss,
backward, gradient edits, checks, optimizer step, statistics); steps that cross an epoch boundary are
not counted, nor are start-up (model building, a method's teachers or pre-estimates) and evaluation; the
statistics the trainer adds up at the end of each epoch (or every ``STATS_GROUP`` micro-batches) are timed
apart and reported as a share of the epoch's steps.
Reported: per round the median step of each variant, the ratio of those medians, and over rounds the
median ratio with its min-max. Methods run in groups of ``--group`` (each with its own ``joint``)
to bound memory; methods whose set-up trains other models (teachers, estimates) run it once, short
(``trainer.epochs`` 1).

    python benchmarks/trainer_overhead.py [--settings cremad,avdigits] [--rounds 5] [--steps 3]
        [--methods all] [--skip umt,ume] [--threads 2] [--json overhead.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from poise.config import build_config, merge, parse_set
from poise.errors import ConfigError
from poise.data.base import DataSplits, DatasetInfo, ModalitySpec, TensorMultimodalDataset
from poise.methods.registry import BASELINES, METHODS, make_method
from poise.train.trainer import Trainer

#: options that make a method modulate from the first step (its defaults wait some epochs)
ACTIVE_FROM_START = {"opm": {"warmup_epochs": 0}, "greedy": {"start_epoch": 0}, "dimml": {"contrast_epoch": 0, "fusion_epochs": 0},
                     "remix": {"warmup_epochs": 0}}
#: extra variants: name -> (method, options), measured when their method is
VARIANTS = {"opm[extra_pass]": ("opm", {"warmup_epochs": 0, "extra_pass": True})}

#: the clock of every timing: wall time, or the process's CPU time (all its threads), which a busy shared
#: machine disturbs less (a descheduled process is not charged)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = time.perf_counter

BENCH_TRAINER = {"progress": False, "tensorboard": False, "probe": False, "checkpoint": False, "epochs": 1}


#: CREMA-D's shapes (one 1 x 257 x 188 spectrogram, one 3 x 224 x 224 frame, 6 classes) and its model
CREMAD_INFO = DatasetInfo("cremad-size", {"audio": ModalitySpec("spectrogram", (1, 257, 188)),
                                          "visual": ModalitySpec("frames", (1, 3, 224, 224))}, 6)
CREMAD_MODEL = {"feature_dim": 512, "encoders": {"audio": "resnet18", "visual": "resnet18"}}


def cremad_setting(batches: int) -> tuple[DataSplits, dict]:
    info = CREMAD_INFO
    g = torch.Generator().manual_seed(0)

    def split(n: int) -> TensorMultimodalDataset:
        inputs = {m: torch.randn(n, *spec.shape, generator=g) for m, spec in info.modalities.items()}
        return TensorMultimodalDataset(inputs, torch.randint(6, (n,), generator=g))

    layer = {
        "trainer": {"batch_size": 8, "optimizer": "sgd", "lr": 1e-3, "momentum": 0.9, "weight_decay": 1e-4},
        "model": CREMAD_MODEL,
    }
    return DataSplits(info, split(8 * batches), split(8), split(8)), layer


def avdigits_setting(batches: int) -> tuple[DataSplits, dict]:
    from poise.bench import run_config, splits_for

    layer = {"trainer": {"batch_size": 64}}
    cfg = run_config("avdigits", {}, layer)
    splits = splits_for("avdigits", cfg)
    return splits, merge(cfg.model_dump(), layer)


SETTINGS: dict[str, Callable[[int], tuple[DataSplits, dict]]] = {"cremad": cremad_setting, "avdigits": avdigits_setting}
#: default timed steps per variant per round: small steps need more of them to settle
STEPS = {"cremad": 3, "avdigits": 30}


class _Stop(Exception):
    pass


class TrainerStepper:
    """A Trainer training epoch after epoch in its own thread, one step per ``step()`` call: the thread
    waits inside ``on_step_start`` until it is its turn, so no two variants ever run at once."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self._go = threading.Semaphore(0)
        self._done = threading.Semaphore(0)
        self._stop = False
        self._error: BaseException | None = None
        self._start: float | None = None
        self._start_epoch = -1
        self._calls = 0
        self._finished = False
        self._last: float | None = None
        method = trainer.method
        original = method.on_step_start

        def paced(batch):
            now = CLOCK()
            epoch = trainer.ctx.epoch
            same_epoch = self._start is not None and epoch == self._start_epoch
            self._last = now - self._start if same_epoch else None
            self._calls += 1
            self._done.release()
            self._go.acquire()
            if self._stop:
                raise _Stop
            self._start_epoch = epoch
            self._start = CLOCK()
            return original(batch)

        method.on_step_start = paced
        #: seconds of each epoch's closing statistics (the loss terms, accuracy, per-head losses and confidence
        #: scores the steps left pending): training work outside the timed steps
        self.summaries: list[float] = []
        summary = trainer._epoch_summary

        def timed_summary(stats):
            start = CLOCK()
            out = summary(stats)
            self.summaries.append(CLOCK() - start)
            return out

        trainer._epoch_summary = timed_summary
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self._go.acquire()
        try:
            epoch = 0
            while not self._stop:
                before = self._calls
                self.trainer.train_epoch(epoch)
                if self._calls == before:
                    raise RuntimeError("an epoch of this method takes no training step")
                self._start = None  # the gap to the next epoch's first step is not a step
                epoch += 1
        except _Stop:
            pass
        except BaseException as err:  # reported by step() in the main thread
            self._error = err
        self._last = None
        self._finished = True
        self._done.release()

    def step(self) -> float:
        """Seconds of the next step that lies wholly inside one epoch."""
        for _ in range(1000):
            self._go.release()
            self._done.acquire()
            if self._error is not None:
                raise self._error
            if self._finished:
                raise RuntimeError("the trainer stopped")
            if self._last is not None:
                return self._last
        raise RuntimeError("no timed step in 1000 tries")

    def close(self) -> None:
        self._stop = True
        if not self._finished:
            self._go.release()
        self._thread.join()


class PlainStepper:
    """The loop a researcher writes: index the batch, forward the two encoders, the linear head on the
    concatenated features, cross-entropy, backward, SGD step."""

    def __init__(self, trainer: Trainer):
        self.model = copy.deepcopy(trainer.model)
        self.model.train()
        t = trainer.config.trainer
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        data = trainer.splits.train
        self.inputs, self.labels = data.inputs, data.labels
        self.sampler = copy.deepcopy(trainer.train_loader.batch_sampler)
        self.epoch, self.batches = 0, iter(())
        self.loss_sum = 0.0

    def _next_index(self) -> list[int]:
        for _ in range(2):
            for index in self.batches:
                return index
            self.sampler.set_epoch(self.epoch)
            self.epoch += 1
            self.batches = iter(self.sampler)
        raise RuntimeError("empty sampler")

    def step(self) -> float:
        index = self._next_index()
        start = CLOCK()
        idx = torch.as_tensor(index)
        x = {m: v[idx] for m, v in self.inputs.items()}
        y = self.labels[idx]
        self.optimizer.zero_grad(set_to_none=True)
        features = [self.model.encoders[m](x[m]) for m in self.model.modalities]
        loss = F.cross_entropy(self.model.fusion.fc(torch.cat(features, dim=1)), y)
        loss.backward()
        self.optimizer.step()
        self.loss_sum += loss.item()
        return CLOCK() - start

    def close(self) -> None:
        pass


def make_trainer(splits: DataSplits, cfg_layer: dict, method: str, options: dict, sets: dict) -> Trainer:
    cfg = build_config(cfg_layer, {"trainer": BENCH_TRAINER}, sets)
    opts = {**cfg.method.get(method, {}), **options}
    trainer = Trainer(splits, make_method(method, opts), cfg, seed=0, method_name=method)
    trainer.setup()
    return trainer


def interleave(steppers: dict[str, object], rounds: int, steps: int, warmup: int) -> dict[str, list[float]]:
    """Per round, each variant's median step (seconds); the variants alternate step by step."""
    names = list(steppers)
    for w in range(warmup):
        for name in names:
            steppers[name].step()
    medians: dict[str, list[float]] = {name: [] for name in names}
    turn = 0
    for _ in range(rounds):
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(steps):
            order = names[turn % len(names):] + names[: turn % len(names)]
            turn += 1
            for name in order:
                times[name].append(steppers[name].step())
        for name in names:
            medians[name].append(statistics.median(times[name]))
    return medians


def finite_check_seconds(trainer: Trainer, repeats: int = 5) -> float:
    """The trainer's finiteness check (loss terms and every gradient) on gradients of the model's shapes."""
    engine = trainer.engine
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p)
    loss = {"ce": torch.zeros((), device=trainer.device)}
    times = []
    for _ in range(repeats):
        engine.note_loss(loss)
        start = CLOCK()
        engine.check_finite()
        times.append(CLOCK() - start)
    for p in params:
        p.grad = None
    return statistics.median(times)


def ratios(medians: dict[str, list[float]], name: str, base: str) -> list[float]:
    return [a / b for a, b in zip(medians[name], medians[base])]


def summary(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def method_names(spec: str, skip: set[str]) -> list[str]:
    names = [m for m in METHODS if m not in BASELINES] if spec == "all" else [m for m in spec.split(",") if m]
    for m in names:
        if m not in METHODS:
            raise SystemExit(f"--methods: unknown method '{m}' (known: {', '.join(METHODS)})")
    return [m for m in names if m not in skip and m != "joint"]


def run_setting(name: str, args, sets: dict) -> dict:
    splits, layer = SETTINGS[name](args.batches)
    steps = args.steps or STEPS[name]
    methods = method_names(args.methods, set(args.skip.split(",")) if args.skip else set())
    variants: list[tuple[str, str, dict]] = []
    for m in methods:
        variants.append((m, m, ACTIVE_FROM_START.get(m, {})))
        for v, (base, opts) in VARIANTS.items():
            if base == m:
                try:
                    make_method(base, opts)
                except ConfigError as err:  # an option this version of poise does not have
                    print(f"  {name}: {v} left out: {err}")
                    continue
                variants.append((v, base, opts))
    groups = [variants[i: i + args.group] for i in range(0, len(variants), args.group)] or [[]]
    result = {"trainer_vs_plain": None, "methods_vs_joint": {}}
    rows: list[tuple[str, float, tuple[float, float, float]]] = []
    for g, group in enumerate(groups):
        steppers: dict[str, object] = {}
        try:
            joint = make_trainer(splits, layer, "joint", {}, sets)
            if g == 0:
                steppers["plain"] = PlainStepper(joint)
            steppers["joint"] = TrainerStepper(joint)
            for label, method, opts in group:
                steppers[label] = TrainerStepper(make_trainer(splits, layer, method, opts, sets))
            medians = interleave(steppers, args.rounds, steps, args.warmup)
            check = finite_check_seconds(joint) if g == 0 else None
            summaries = steppers["joint"].summaries
        finally:
            for s in steppers.values():
                s.close()
        if g == 0:
            r = summary(ratios(medians, "joint", "plain"))
            result["trainer_vs_plain"] = r[0]
            rows.append(("plain", statistics.median(medians["plain"]), (1.0, 1.0, 1.0)))
            rows.append(("joint (trainer)", statistics.median(medians["joint"]), r))
            print(f"  {name}: trainer joint / plain loop {r[0]:.3f} (rounds {r[1]:.3f}-{r[2]:.3f})", flush=True)
            result["finite_check_share"] = check / statistics.median(medians["joint"])
            print(f"  {name}: the finiteness check takes {check * 1000:.2f} ms, "
                  f"{100 * result['finite_check_share']:.2f} % of the trainer's step", flush=True)
            if summaries:
                per_epoch = statistics.median(summaries)
                epoch_steps = len(joint.train_loader)
                result["epoch_statistics_share"] = per_epoch / (epoch_steps * statistics.median(medians["joint"]))
                print(f"  {name}: the statistics closing an epoch take {per_epoch * 1000:.2f} ms, "
                      f"{100 * result['epoch_statistics_share']:.2f} % of the epoch's {epoch_steps} steps "
                      f"(not in the timed steps)", flush=True)
        for label, _, _ in group:
            r = summary(ratios(medians, label, "joint"))
            result["methods_vs_joint"][label] = r[0]
            rows.append((label, statistics.median(medians[label]), r))
            print(f"  {name}: {label} / joint {r[0]:.3f} (rounds {r[1]:.3f}-{r[2]:.3f})", flush=True)
    print(f"\n{name}: batch {layer['trainer']['batch_size']}, {torch.get_num_threads()} thread(s), {args.clock} clock, {args.rounds} rounds "
          f"x {steps} steps per variant, median of per-round medians (min-max over rounds)")
    print("| variant | ms / step | ratio | min-max |\n|---|---|---|---|")
    for label, seconds, (mid, lo, hi) in rows:
        against = "" if label == "plain" else (" x plain" if label.startswith("joint") else " x joint")
        ms = seconds * 1000
        print(f"| `{label}` | {ms:.0f} | {mid:.3f}{against} | {lo:.3f}-{hi:.3f} |" if ms >= 100 else
              f"| `{label}` | {ms:.2f} | {mid:.3f}{against} | {lo:.3f}-{hi:.3f} |")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default="cremad,avdigits", help=f"comma list of {', '.join(SETTINGS)}")
    parser.add_argument("--methods", default="all", help="comma list of methods to compare with joint, or 'all' (the registry)")
    parser.add_argument("--skip", default="", help="comma list of methods to leave out (e.g. those that train teachers)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=None,
                        help=f"timed steps per variant per round (default: {', '.join(f'{k} {v}' for k, v in STEPS.items())})")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--batches", type=int, default=8, help="batches per epoch of the cremad setting's data")
    parser.add_argument("--group", type=int, default=4, help="methods measured together (each group has its own joint)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every variant (sets trainer.threads; default: the config's, 1)")
    parser.add_argument("--clock", choices=list(CLOCKS), default="wall",
                        help="wall time, or process CPU time (steadier on a machine shared with other jobs)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="config overrides, KEY=VALUE")
    parser.add_argument("--json", type=Path, default=None, help="write the ratios to this file")
    args = parser.parse_args(argv)
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    sets = parse_set(args.sets)
    if args.threads:
        # the trainer sets its threads when built (trainer.threads), so the count goes through the config
        sets = merge(sets, {"trainer": {"threads": args.threads}})
    out = {"settings": {}}
    for name in args.settings.split(","):
        if name not in SETTINGS:
            raise SystemExit(f"--settings: unknown setting '{name}' (known: {', '.join(SETTINGS)})")
        print(f"{name}:", flush=True)
        out["settings"][name] = run_setting(name, args, sets)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
