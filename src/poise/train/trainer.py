"""The one training loop. Every method plugs into it through the hooks of :class:`poise.methods.Method`.

One optimizer step = ``trainer.accumulate`` micro-batches (their union is one batch of ``batch_size``
samples, over all processes together):

    [per micro-batch]  on_step_start -> forward and loss (under autocast) -> backward (ctx.backward)
    [once per step]    gradients made final (averaged over processes, unscaled) -> after_backward
                       -> finiteness check, clipping, optimizer step (unless the method owns the step)

Under ``torchrun`` (RANK / WORLD_SIZE in the environment) the trainer joins the process group, wraps the
model in DistributedDataParallel and shards every split with :class:`ShardedBatchSampler`; training
statistics and evaluation predictions are reduced across ranks, the linear probe runs on rank 0 over
the full data, and only rank 0 writes files. With ``out_dir`` set it writes ``checkpoint.pt`` after every
epoch (and every ``checkpoint_every_steps`` steps); ``resume=True`` continues from it.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from poise.config import RunConfig
from poise.data.base import DataSplits, check_splits, evaluation_view
from poise.data.batch import MultimodalBatch
from poise.errors import ConfigError, IncompatibleError
from poise.train.probe import linear_probe
from poise.functional.confidence import confidence_ratios, confidence_rows
from poise.io import atomic_write_text, seed_everything, set_threads
from poise.models.model import ModelOutput, MultimodalModel
from poise.train import factory
from poise.train.checkpoint import (
    CHECKPOINT_FILE,
    CHECKPOINT_FORMAT,
    atomic_save,
    first_difference,
    load_checkpoint,
    rng_state,
    set_rng_state,
    to_cpu,
)
from poise.train.curves import ValidationCurves, head_loss_sums_of, head_means, head_names, ogr_entry
from poise.train.distributed import (
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    broadcast_object,
    broadcast_tensors,
    gather_objects,
    is_distributed,
    is_main_process,
    rank,
    world_size,
)
from poise.train.engine import NonFiniteError, StepEngine
from poise.train.evaluation import evaluate_split
from poise.train.run_files import RESULT_FILE, write_run_description

if TYPE_CHECKING:
    from poise.methods.base import Method

Tensor = torch.Tensor


@dataclass
class RunResult:
    method: str
    seed: int
    config: dict[str, Any]
    best_epoch: int
    train_seconds: float
    test: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    #: how ``best_epoch`` (and so ``test``) was chosen: "validation" or, without a validation split
    #: (protocol released), "last epoch"
    selection: str = "validation"
    #: protocol released only: the test metrics of the epoch with the best TEST accuracy, as the released
    #: code of OGM-GE, MLA and BalanceBenchmark reports them; test-selected, never comparable with ``test``
    released_test_selected: dict[str, Any] | None = None
    #: sentences about the run a user must read (a modality that learned nothing, with likely causes)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def test_selected(history: list[dict[str, Any]]) -> dict[str, Any]:
    """The released protocol's number: the test metrics of the first epoch with the best test
    accuracy (the papers' code keeps that epoch). Selected on the test split itself, so it is
    optimistic and reported apart from poise's validation-selected ``test``."""
    scored = [h for h in history if h.get("test_every_epoch")]
    if not scored:
        return {}
    best = max(scored, key=lambda h: (h["test_every_epoch"]["accuracy"], -h["epoch"]))
    metrics = {k: v for k, v in best["test_every_epoch"].items() if k != "loss"}
    return {**metrics, "epoch": best["epoch"], "selected_on": "test"}


def concat_outputs(outputs: list[ModelOutput]) -> ModelOutput:
    """The micro-batches' outputs of one step as one output (rows in micro-batch order)."""
    if len(outputs) == 1:
        return outputs[0]

    def cat(dicts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        return {k: torch.cat([d[k] for d in dicts]) for k in dicts[0]}

    return ModelOutput(
        features=cat([o.features for o in outputs]), unimodal_logits=cat([o.unimodal_logits for o in outputs]),
        logits=torch.cat([o.logits for o in outputs]), probe_logits=cat([o.probe_logits for o in outputs]),
    )


def concat_batches(batches: list[MultimodalBatch]) -> MultimodalBatch:
    if len(batches) == 1:
        return batches[0]
    return MultimodalBatch(
        inputs={m: torch.cat([b.inputs[m] for b in batches]) for m in batches[0].inputs},
        labels=torch.cat([b.labels for b in batches]), present=torch.cat([b.present for b in batches]),
        index=torch.cat([b.index for b in batches]),
    )


def _with_last(items: Iterable) -> Iterator[tuple[Any, bool]]:
    """Each item with a flag that says whether it is the last one."""
    it = iter(items)
    try:
        current = next(it)
    except StopIteration:
        return
    for following in it:
        yield current, False
        current = following
    yield current, True


#: micro-batches whose accuracy and confidence scores are computed together: a few operations per group
#: instead of a dozen per step (what small models at large batch notice)
STATS_GROUP = 32


@dataclass
class EpochStats:
    """What one epoch's training has added up so far on this rank (checkpointed in mid-epoch)."""

    totals: dict[str, Tensor] = field(default_factory=dict)
    correct: Tensor | None = None
    seen: int = 0
    micro_batches: int = 0
    #: optimizer steps (groups of ``accumulate`` micro-batches) done in this epoch
    steps: int = 0
    #: (M,) confidence scores of each step, summed over ranks only at the end of the epoch
    scores: list[Tensor] = field(default_factory=list)
    seconds: float = 0.0
    #: (H, 2) summed cross-entropy and sample count of each head (fused, then each modality)
    heads: Tensor | None = None
    #: micro-batches not yet counted: (loss terms, fused logits, unimodal logits, labels, present, modalities)
    pending: list[tuple[dict[str, Tensor], Tensor, dict[str, Tensor], Tensor, Tensor, tuple[str, ...]]] = field(
        default_factory=list)
    #: (unimodal logits, labels, present) of steps whose confidence scores are not yet computed
    pending_scores: list[tuple[dict[str, Tensor], Tensor, Tensor]] = field(default_factory=list)

    def note(self, terms: dict[str, Tensor], output: ModelOutput, batch: MultimodalBatch) -> None:
        """One micro-batch's loss terms, correct predictions and per-head losses, added up at the next
        :meth:`flush` (every ``STATS_GROUP`` micro-batches): a few operations per group, not per step."""
        entry = ({k: v.detach() for k, v in terms.items()}, output.logits.detach(),
                 {m: z.detach() for m, z in output.unimodal_logits.items()}, batch.labels, batch.present,
                 batch.modalities)
        if self.pending and (set(entry[0]) != set(self.pending[0][0]) or list(entry[2]) != list(self.pending[0][2])
                             or entry[5] != self.pending[0][5]):
            self.flush()  # another shape of record (a method's phase adds a term): not concatenated with these
        self.pending.append(entry)
        if len(self.pending) >= STATS_GROUP:
            self.flush()

    def note_scores(self, unimodal_logits: dict[str, Tensor], labels: Tensor, present: Tensor) -> None:
        self.pending_scores.append(({m: z.detach() for m, z in unimodal_logits.items()}, labels, present))

    def flush(self) -> None:
        """Add up the pending micro-batches (loss terms, correct predictions, each head's summed loss) and
        compute the pending steps' confidence scores (each step's exactly as on its own: the same rows,
        summed the same way)."""
        with torch.no_grad():
            if self.pending:
                pending, self.pending = self.pending, []
                for k in pending[0][0]:
                    total = torch.stack([terms[k].float() for terms, *_ in pending]).sum(dim=0)
                    self.totals[k] = self.totals.get(k, 0.0) + total
                logits = torch.cat([z for _, z, *_ in pending])
                labels = torch.cat([y for _, _, _, y, _, _ in pending])
                correct = (logits.argmax(1) == labels).sum()
                self.correct = correct if self.correct is None else self.correct + correct
                unimodal = {m: torch.cat([u[m] for _, _, u, *_ in pending]) for m in pending[0][2]}
                present = torch.cat([p for *_, p, _ in pending])
                columns = pending[0][5]
                heads = head_loss_sums_of(logits, unimodal, labels,
                                          {m: present[:, columns.index(m)] for m in unimodal})
                self.heads = heads if self.heads is None else self.heads + heads
            if self.pending_scores:
                names = list(self.pending_scores[0][0])
                rows = confidence_rows({m: torch.cat([u[m] for u, _, _ in self.pending_scores]) for m in names},
                                       torch.cat([y for _, y, _ in self.pending_scores]),
                                       torch.cat([p for _, _, p in self.pending_scores]))
                sizes = [len(y) for _, y, _ in self.pending_scores]
                self.scores += [part.sum(dim=0) for part in rows.split(sizes)]
                self.pending_scores = []

    def state(self) -> dict[str, Any]:
        self.flush()
        return {
            "totals": {k: v.detach().cpu() for k, v in self.totals.items()},
            "correct": None if self.correct is None else self.correct.cpu(),
            "seen": self.seen, "micro_batches": self.micro_batches, "steps": self.steps,
            "scores": torch.stack(self.scores).cpu() if self.scores else None, "seconds": self.seconds,
            "heads": None if self.heads is None else self.heads.cpu(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> EpochStats:
        scores = state["scores"]
        return cls(
            totals={k: v.to(device) for k, v in state["totals"].items()},
            correct=None if state["correct"] is None else state["correct"].to(device),
            seen=state["seen"], micro_batches=state["micro_batches"], steps=state["steps"],
            scores=[] if scores is None else [s.to(device) for s in scores.unbind(0)], seconds=state["seconds"],
            heads=None if state.get("heads") is None else state["heads"].to(device),
        )


FINITE_INPUTS_HEAD_OR_METHOD = ("every modality's input, encoder weights and features are finite: the fusion head or "
                                "the method's own computation went bad")


def chance_level(dataset: Dataset, num_classes: int) -> tuple[float, float]:
    """The accuracy of always answering the split's most frequent class, and the highest accuracy that
    guessing reaches by luck on a split of this size (two binomial standard errors above it)."""
    from poise.data.base import split_labels

    labels = split_labels(dataset)
    if labels is None or len(labels) == 0:
        chance, n = 1.0 / num_classes, max(len(dataset), 1)
    else:
        import numpy as np

        chance, n = float(np.bincount(labels).max()) / len(labels), len(labels)
    return chance, chance + 2.0 * math.sqrt(chance * (1.0 - chance) / n)


class Trainer:
    """Trains one method on one dataset with one seed, selects the best epoch on the validation split,
    and reports test metrics of that epoch's weights.

    ``resume=True`` continues the run whose ``checkpoint.pt`` is in ``out_dir``; the configuration, the
    method and the seed must be those of that run.

    ``epoch_callback(epoch, entry)`` is called after every epoch with that epoch's history entry (its
    ``entry["val"]["accuracy"]`` is the validation accuracy, None without a validation split), once the
    epoch is logged and checkpointed; an exception it raises stops the run (a tuner prunes a trial so)."""

    def __init__(self, splits: DataSplits, method: Method, config: RunConfig, seed: int = 0,
                 out_dir: str | Path | None = None, method_name: str | None = None, init_dir: str | Path | None = None,
                 resume: bool = False, epoch_lines: bool = True,
                 epoch_callback: Callable[[int, dict[str, Any]], None] | None = None):
        self.splits, self.method, self.config, self.seed = splits, method, config, seed
        self.epoch_callback = epoch_callback
        #: print one line per epoch when the progress bar cannot show (output not on a terminal)
        self.epoch_lines = epoch_lines
        self.init_dir = Path(init_dir) if init_dir is not None else None
        self.method_name = method_name or method.name
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.resume = resume
        if resume and self.out_dir is None:
            raise ConfigError("resuming needs the run folder that holds checkpoint.pt (out_dir)")
        t = config.trainer
        set_threads(t.threads)
        self.device = factory.run_device(config)  # joining a torchrun group is the caller's explicit step

        check_splits(splits, f"dataset '{splits.source or splits.info.name}'",
                     empty_val=config.data.protocol == "released")
        self.modalities = method.modalities(tuple(splits.info.modalities))
        self.fusion = config.model.fusion or method.default_fusion
        method.check(splits.info, self.modalities, self.fusion)
        from poise.models.fusion import FUSIONS

        FUSIONS[self.fusion].check_modalities(self.fusion, self.modalities)
        if method.owns_optimizer_step and t.accumulate > 1:
            raise IncompatibleError(
                f"method '{self.method_name}' takes its own optimizer steps within each batch and cannot accumulate "
                f"gradients over micro-batches; set trainer.accumulate to 1 (it is {t.accumulate})"
            )
        decision = method.per_batch_decision()
        if decision is not None and t.accumulate > 1:
            raise IncompatibleError(
                f"method '{self.method_name}' {decision} from each batch it sees, and with trainer.accumulate "
                f"{t.accumulate} it would do so once per micro-batch instead of once per step; set trainer.accumulate to 1"
            )
        self.history: list[dict[str, Any]] = []
        #: {"accuracy", "epoch", "model", "method"} of the best validation epoch so far
        self.best: dict[str, Any] | None = None
        self.optimizer_steps = 0

    # ---- builders ------------------------------------------------------------------------------
    def build_model(self, modalities: tuple[str, ...] | None = None, fusion: str | None = None) -> MultimodalModel:
        return factory.build_model(self.config, self.splits.info, modalities or self.modalities, fusion or self.fusion,
                                   self.device, fusion_options=fusion in (None, self.fusion),
                                   mid_fusion=self.method.default_mid_fusion)

    def build_optimizer(self, params) -> torch.optim.Optimizer:
        return factory.build_optimizer(self.config, params)

    def build_scheduler(self, optimizer):
        return factory.build_scheduler(self.config, optimizer)

    def make_loader(self, dataset: Dataset, shuffle: bool, micro_batches: int | None = None,
                    sharded: bool = True) -> DataLoader:
        """A loader over ``dataset`` whose batch order depends on the seed and the epoch only.

        ``shuffle=True`` (training): each batch of ``batch_size`` is split over the processes and into
        ``micro_batches`` micro-batches (default ``trainer.accumulate``; a method's own training loop
        passes 1). ``shuffle=False`` (evaluation): whole batches in order, process r taking every W-th.
        ``sharded=False``: all of the data in this process (the linear probe on rank 0)."""
        return factory.make_loader(self.config, dataset, self.seed, self.device, shuffle, micro_batches, sharded)

    # ---- the loop --------------------------------------------------------------------------------
    def setup(self, training: bool = True):
        """Seed, build the model, optimizer, scheduler and context, call ``method.setup``, then wrap the
        model for multi-process training and build the step engine. ``training=False`` (``poise eval``):
        the method's setup may skip training-only work."""
        from poise.train.context import TrainContext

        seed_everything(self.seed)
        model = self.build_model()
        if self.init_dir is not None:
            from poise.train.checkpoint import load_encoders

            load_encoders(model, self.init_dir)
        self.model = model
        optimizer = self.build_optimizer(model.parameters())
        self.scheduler = self.build_scheduler(optimizer)
        self.ctx = ctx = TrainContext(
            model=model, optimizer=optimizer, config=self.config, info=self.splits.info, splits=self.splits,
            device=self.device, seed=self.seed, make_loader=self.make_loader, build_model=self.build_model,
            build_optimizer=self.build_optimizer, training=training,
        )
        self.method.setup(ctx)
        forward_module = model
        if is_distributed() and any(p.requires_grad for p in model.parameters()):
            # after method.setup: a method may load or freeze weights; DDP starts every rank from rank 0's
            forward_module = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        self.engine = StepEngine(
            model, optimizer, self.config, self.device, self.method_name, self.method.owns_optimizer_step,
            forward_module=forward_module, where=lambda: (ctx.epoch, ctx.step),
            multiple_backward=self.method.multiple_backward or self.method.partial_graph,
        )
        self.engine.frozen = ctx.frozen  # the method's phase (set in setup or later) freezes these
        broadcast_tensors(self.engine.extra_params)  # a method's own parameters (heads, loss weights)
        ctx.engine = self.engine
        self.train_loader = self.make_loader(self.splits.train, shuffle=True)
        return ctx

    def train_epoch(self, epoch: int, partial: EpochStats | None = None) -> dict[str, Any]:
        """One training epoch with the method's epoch hooks (no evaluation, no scheduler step).
        ``partial``: the statistics of the steps a resumed run already took in this epoch; then
        ``on_epoch_start`` ran before the checkpoint and is not called again."""
        self.ctx.epoch = epoch
        if partial is None:
            loader = self.method.on_epoch_start(epoch, self.train_loader) or self.train_loader
        else:
            loader = self.method.epoch_loader(epoch, self.train_loader) or self.train_loader
        stats = self._train_epoch(epoch, loader, partial or EpochStats())
        self.method.on_epoch_end(epoch)
        return stats

    def fit(self) -> RunResult:
        t = self.config.trainer
        self._start = time.perf_counter()  # the method's setup (teachers, estimation runs) is part of its cost
        self._seconds_before = 0.0
        ctx = self.setup()
        model, optimizer, scheduler, method = self.model, ctx.optimizer, self.scheduler, self.method
        has_val = len(self.splits.val) > 0
        val_loader = self.make_loader(self.splits.val, shuffle=False) if has_val else None
        released = self.config.data.protocol == "released"
        if not has_val and not released:
            raise ConfigError("the validation split is empty: nothing to select the epoch on (data.val_fraction 0 "
                              "needs data.protocol released)")
        test_loader = self.make_loader(self.splits.test, shuffle=False)
        first_epoch, partial = 0, None
        if self.resume:
            from poise.train.run_files import RUN_FILE, stored_statistics

            stored = stored_statistics(self.out_dir)
            if stored is not None and stored != self.splits.standardization:
                raise ConfigError(f"cannot resume: the splits are standardised with other statistics than those in "
                                  f"'{self.out_dir / RUN_FILE}'; load them with splits_for(dataset, config, statistics) "
                                  "from that file")
            first_epoch, partial = self._restore(load_checkpoint(self.out_dir / CHECKPOINT_FILE))
        main = is_main_process()
        if self.out_dir is not None and main and not self.resume:
            write_run_description(self.out_dir, self.description())
        writer, log_file = self._open_logs(first_epoch) if main else (None, None)
        bar = tqdm(range(first_epoch, t.epochs), desc=self.method_name, disable=not (t.progress and main) or None,
                   leave=False)
        # off a terminal the bar is silent: one line per epoch instead
        epoch_lines = t.progress and main and self.epoch_lines and not sys.stderr.isatty()
        try:
            for epoch in bar:
                epoch_start = time.perf_counter() - (partial.seconds if partial is not None else 0.0)
                train_stats = self.train_epoch(epoch, partial)
                partial = None
                if scheduler is not None:
                    scheduler.step()
                broadcast_buffers(model)  # evaluate (and checkpoint) rank 0's norm statistics everywhere
                curves = ValidationCurves.for_model(model, self.device) if has_val else None
                val = evaluate_split(model, method, val_loader, self.splits.info.num_classes, self.device, curves) if has_val else None
                entry = {
                    "epoch": epoch,
                    "lr": optimizer.param_groups[0]["lr"],
                    **train_stats,
                    "val": val,
                    "ogr": ogr_entry(self.history[-1] if self.history else None, train_stats["head_train_loss"],
                                     val["head_loss"] if val is not None else {}),
                    "method": self._reduce_records(method.pop_records()),
                    "seconds": time.perf_counter() - epoch_start,
                    **({"phase": self.ctx.phase} if self.ctx.phase is not None else {}),  # set_phase's name
                }
                if released:  # the papers' code picks its epoch on these; poise keeps them apart, under their own key
                    entry["test_every_epoch"] = evaluate_split(model, method, test_loader, self.splits.info.num_classes,
                                                               self.device)
                self.history.append(entry)
                self._log(writer, log_file, entry)
                score = val["accuracy"] if has_val else float("inf")  # without validation: the last epoch
                if self.best is None or score > self.best["accuracy"] or not has_val:
                    self.best = {"accuracy": score, "epoch": epoch, "model": copy.deepcopy(model.state_dict()),
                                 "method": copy.deepcopy(method.state_dict())}
                self._save_checkpoint(epoch + 1, None)
                if has_val:
                    bar.set_postfix(val_acc=f"{val['accuracy']:.3f}")
                if epoch_lines:
                    print(self._epoch_line(entry), flush=True)
                if self.epoch_callback is not None:
                    self.epoch_callback(epoch, entry)
        finally:
            bar.close()
            if writer is not None:
                writer.close()
            if log_file is not None:
                log_file.close()
        train_seconds = self._seconds_before + time.perf_counter() - self._start

        best = self.best
        model.load_state_dict(best["model"])
        method.load_state_dict(best["method"])
        if self.out_dir is not None and main:
            atomic_save({"model": best["model"], "method": best["method"], "epoch": best["epoch"],
                         "config": self.config.model_dump(), "seed": self.seed}, self.out_dir / "best.pt")
        test = evaluate_split(model, method, test_loader, self.splits.info.num_classes, self.device)
        test.pop("loss")
        if self.splits.notes.get("evaluation") == "binary_tasks":  # MulT's IEMOCAP: one binary task per emotion
            test["binary_tasks"] = self._binary_tasks(model, method, test_loader)
        probe: dict[str, float] = {}
        if t.probe:
            # rank 0 alone, over all of the data: the probe is a deterministic scikit-learn fit
            if main:
                # the training samples as evaluation sees them: augmentation would make the features random
                probe_train = self.make_loader(evaluation_view(self.splits.train), shuffle=False, sharded=False)
                probe_test = self.make_loader(self.splits.test, shuffle=False, sharded=False)
                probe = linear_probe(model, probe_train, probe_test, self.device)
            probe = broadcast_object(probe)
        test["probe_accuracy"] = probe
        result = RunResult(self.method_name, self.seed, self.config.model_dump(), best["epoch"], train_seconds, test,
                           self.history, "validation" if has_val else "last epoch",
                           test_selected(self.history) if released else None, notes=self._chance_notes(probe))
        if self.out_dir is not None and main:
            self.write_result(result)
        return result

    def _binary_tasks(self, model, method, loader) -> dict[str, dict[str, float]]:
        from poise.train.metrics import binary_tasks, predict_batches
        from poise.train.distributed import gather_strided

        batches = predict_batches(model, method, loader, self.device)
        if is_distributed():
            batches = gather_strided(batches)
        logits, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        return binary_tasks(logits.argmax(1).cpu(), labels.cpu(), list(self.splits.info.class_names))

    def write_result(self, result: RunResult) -> None:
        """``result.json``: the dataset and the run's result, as ``poise train`` and ``poise bench`` leave it."""
        atomic_write_text(json.dumps({"dataset": self.splits.source, **result.to_dict()}, indent=1),
                          self.out_dir / RESULT_FILE)

    def description(self) -> dict[str, Any]:
        """``run.json``: what ``poise eval`` and ``--resume`` rebuild this run from. Options given to the
        method object directly (``make_method(name, options)``) are recorded in the configuration."""
        config = self.config.model_dump()
        spec = self.method.spec
        base = spec.partition(":")[0]
        options = self.method.params.model_dump(exclude_unset=True)
        if base == "unimodal":
            options.pop("modality", None)
        if options and config["method"].get(base) != options:
            config["method"][base] = {**config["method"].get(base, {}), **options}
        return {"dataset": self.splits.source, "method": spec, "name": self.method_name, "seed": self.seed,
                "init": None if self.init_dir is None else str(self.init_dir), "config": config,
                "standardization": self.splits.standardization}

    def _epoch_line(self, entry: dict[str, Any]) -> str:
        val = entry["val"] or {"accuracy": float("nan")}
        per_modality = ", ".join(f"{m} {a:.4f}" for m, a in val.get("unimodal_accuracy", {}).items())
        return (f"{self.method_name} epoch {entry['epoch'] + 1}/{self.config.trainer.epochs}: train loss "
                f"{entry['train_loss']:.4f}, val accuracy {val['accuracy']:.4f}"
                + (f" ({per_modality})" if per_modality else "") + f", {entry['seconds']:.1f} s")

    def _chance_notes(self, probe: dict[str, float]) -> list[str]:
        """One sentence, with the likely causes, for each modality whose validation head accuracy stayed at
        chance in every epoch, or whose linear probe scored at chance."""
        num_classes = self.splits.info.num_classes
        chance_val, limit_val = chance_level(self.splits.val, num_classes)
        chance_test, limit_test = chance_level(self.splits.test, num_classes)
        notes = []
        for m in self.model.modalities:
            heads = [(e["val"] or {}).get("unimodal_accuracy", {}).get(m) for e in self.history]
            heads = [a for a in heads if a is not None and not math.isnan(a)]
            best = max(heads) if heads else None
            head_low = best is not None and best <= limit_val
            p = probe.get(m)
            probe_low = p is not None and not math.isnan(p) and p <= limit_test
            probe_text = "" if p is None or math.isnan(p) else f" and a linear probe on its encoder scores {p:.3f} on test (chance {chance_test:.3f})"
            spec = self.splits.info.modalities[m]
            scale = ("" if self.config.data.standardize or spec.kind not in ("vector", "sequence")
                     else "its features on a large or offset scale (set data.standardize=true), ")
            if head_low and (probe_low or probe_text == ""):
                notes.append(
                    f"modality '{m}' learned nothing: its validation accuracy stayed at chance for the whole run "
                    f"({best:.3f} at best, chance {chance_val:.3f}){probe_text}; likely causes: {scale}a modality that "
                    f"carries no information about the labels, a learning rate too high or too low for it, or another "
                    f"modality that dominated training (compare with unimodal:{m})")
            elif head_low and len(self.model.modalities) == 1:
                notes.append(
                    f"modality '{m}': the model stayed at chance in validation for the whole run ({best:.3f} at best, "
                    f"chance {chance_val:.3f}), although a linear probe on its encoder scores {p:.3f} on test: the "
                    "encoder learned something but the head did not; likely causes: too few epochs, or a learning "
                    "rate too high or too low")
            elif head_low:
                notes.append(
                    f"modality '{m}': the model's own head for it stayed at chance in validation for the whole run "
                    f"({best:.3f} at best, chance {chance_val:.3f}), although a linear probe on its encoder scores "
                    f"{p:.3f} on test: its encoder learned but the fused model ignores it; likely cause: another "
                    "modality dominates the shared head (the imbalance that ogm_ge, mla and the other balancing "
                    "methods counter)")
            elif probe_low:
                notes.append(
                    f"modality '{m}': a linear probe on its encoder scores at chance on test ({p:.3f}, chance "
                    f"{chance_test:.3f}) although its head reached {best:.3f} in validation; likely causes: "
                    f"{scale}too few training samples for the probe, or encoder features that collapsed")
        return notes

    def _train_epoch(self, epoch: int, loader, stats: EpochStats) -> dict[str, Any]:
        model, method, ctx, engine = self.model, self.method, self.ctx, self.engine
        model.train()
        owns = method.owns_optimizer_step
        accumulate = engine.accumulate
        sampler = getattr(loader, "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        done = stats.steps * accumulate  # micro-batches a resumed run already trained on in this epoch
        if done and hasattr(sampler, "skip_next"):
            sampler.skip_next(done)
        batches: Iterable = factory.loader_batches(loader)
        if done and not hasattr(sampler, "skip_next"):
            batches = itertools.islice(batches, done, None)
        epoch_start = time.perf_counter() - stats.seconds
        every = self.config.trainer.checkpoint_every_steps
        group: list[tuple[MultimodalBatch, ModelOutput]] = []
        for batch, last in _with_last(batches):
            batch = batch.to(self.device, non_blocking=True)
            end_of_step = last or len(group) == accumulate - 1
            output = None
            try:
                if not group and not owns and engine.has_gradients():
                    # usually the previous step's optimizer_step left none: zero_grad's own overhead is then saved
                    ctx.optimizer.zero_grad(set_to_none=True)
                plan = method.on_step_start(batch)
                with engine.sync_context(end_of_step):
                    with engine.autocast():
                        output = engine.forward_module(batch, feature_scale=plan.feature_scale if plan else None)
                        terms = method.loss(output, batch)
                        # the fusion's auxiliary heads: trained with the method's first backward, never one of its terms
                        aux = self._probe_loss(output, batch) if output.probe_logits else None
                    logged = terms if aux is None else {**terms, "aux_heads": aux}
                    engine.note_loss(logged)
                    calls = engine.backward_calls
                    engine.carry(aux)
                    method.backward(terms, output, batch)
                    engine.flush_carried()
                    if engine.ddp and end_of_step and not owns and engine.backward_calls == calls:
                        engine.release_without_backward(output)
                group.append((batch, output))
                if end_of_step:
                    step_output = concat_outputs([o for _, o in group])
                    step_batch = concat_batches([b for b, _ in group])
                    if owns:
                        engine.check_finite(gradients=False)  # loss terms of a step the method did not take
                    else:
                        engine.finish_gradients()  # averaged over ranks and unscaled: what methods may read
                        method.after_backward(step_output, step_batch)
                        engine.optimizer_step()
            except NonFiniteError as err:
                in_group = bool(group) and group[-1][0] is batch
                pending = group + ([(batch, output)] if output is not None and not in_group else [])
                if not any(b is batch for b, _ in pending):
                    pending.append((batch, output))
                diagnosis = self._diagnose(pending)
                large = self._large_inputs(pending) if not diagnosis.startswith("the input of") else ""
                if large:
                    if diagnosis == FINITE_INPUTS_HEAD_OR_METHOD:
                        diagnosis = "every modality's input, encoder weights and features are finite"
                    diagnosis += (f"; {large}: unscaled features are a likely cause (set data.standardize=true, or "
                                  "lower trainer.lr)")
                raise NonFiniteError(f"{err}; {diagnosis}") from None
            stats.note(logged, output, batch)
            stats.seen += len(batch)
            stats.micro_batches += 1
            ctx.step += 1
            if end_of_step:
                if len(step_output.unimodal_logits) > 1:
                    stats.note_scores(step_output.unimodal_logits, step_batch.labels, step_batch.present)
                group = []
                stats.steps += 1
                self.optimizer_steps += 1
                if every is not None and self.optimizer_steps % every == 0 and not last:
                    stats.seconds = time.perf_counter() - epoch_start
                    self._save_checkpoint(epoch, stats)
        return self._epoch_summary(stats)

    def _epoch_summary(self, stats: EpochStats) -> dict[str, Any]:
        """The epoch's training statistics, over every rank."""
        stats.flush()
        steps = max(stats.micro_batches, 1)
        terms_mean = {k: float(v) / steps for k, v in stats.totals.items()}
        correct = float(stats.correct) if stats.correct is not None else 0.0
        seen = stats.seen
        scores = stats.scores
        heads = stats.heads
        if is_distributed():
            heads = all_reduce_sum(heads if heads is not None else torch.zeros(len(self.model.modalities) + 1, 2,
                                                                                device=self.device))
            keys = list(terms_mean)
            means = all_reduce_sum(torch.tensor([terms_mean[k] for k in keys], dtype=torch.float64, device=self.device))
            terms_mean = {k: float(means[i]) / world_size() for i, k in enumerate(keys)}
            counts = all_reduce_sum(torch.tensor([correct, float(seen)], dtype=torch.float64, device=self.device))
            correct, seen = float(counts[0]), int(counts[1])
            if scores:
                scores = list(all_reduce_sum(torch.stack(scores)).unbind(0))
        names = list(self.model.modalities)
        ratio_sums: dict[str, Tensor] = {}
        for row in scores:
            ratios = confidence_ratios({m: row[j] for j, m in enumerate(names)})
            for m, r in ratios.items():
                ratio_sums[m] = ratio_sums.get(m, 0.0) + r
        n_steps = max(len(scores), 1)
        return {
            "train_loss": sum(terms_mean.values()),
            "train_terms": terms_mean,
            "train_accuracy": correct / max(seen, 1),
            "confidence_ratio": {m: float(v) / n_steps for m, v in ratio_sums.items()},
            "head_train_loss": head_means(heads, head_names(names)),
        }

    @staticmethod
    def _reduce_records(records: dict[str, float]) -> dict[str, float]:
        """Each rank's epoch means of the method's records, averaged over the ranks that recorded them."""
        if not is_distributed():
            return records
        out: dict[str, list[float]] = defaultdict(list)
        for part in all_gather_objects(records):
            for k, v in part.items():
                out[k].append(v)
        return {k: sum(vs) / len(vs) for k, vs in out.items()}

    @staticmethod
    def _probe_loss(output, batch) -> Tensor:
        losses = []
        for m, z in output.probe_logits.items():
            rows = batch.present_of(m)
            losses.append(F.cross_entropy(z[rows], batch.labels[rows]) if rows.any() else z.sum() * 0.0)
        return torch.stack(losses).sum()

    def _diagnose(self, pending: list[tuple[MultimodalBatch, ModelOutput]]) -> str:
        """Which modality's values went bad in the step that failed: its input, its encoder's weights,
        its features or its unimodal logits."""
        model = self.model
        for m in model.modalities:
            for batch, _ in pending:
                x = batch.inputs[m][batch.present_of(m)]
                if x.is_floating_point() and not bool(torch.isfinite(x).all()):
                    return f"the input of modality '{m}' is not finite"
        for m in model.modalities:
            if not all(bool(torch.isfinite(p).all()) for p in model.modality_parameters(m)):
                return f"the encoder weights of modality '{m}' are not finite"
        for m in model.modalities:
            for _, output in pending:
                if output is not None and m in output.features and not bool(torch.isfinite(output.features[m].detach()).all()):
                    return f"the features of modality '{m}' (its encoder's output) are not finite"
        for m in model.modalities:
            for _, output in pending:
                z = None if output is None else output.unimodal_logits.get(m)
                if z is not None and not bool(torch.isfinite(z.detach()).all()):
                    return f"the unimodal logits of modality '{m}' are not finite"
        return FINITE_INPUTS_HEAD_OR_METHOD

    def _large_inputs(self, pending: list[tuple[MultimodalBatch, ModelOutput]], limit: float = 100.0) -> str:
        """'the inputs of modality m reach |x| = ...' for the floating-point inputs beyond ``limit``."""
        largest: dict[str, float] = {}
        for batch, _ in pending:
            for m, x in batch.inputs.items():
                if x.is_floating_point() and x.numel() and m in self.model.modalities:
                    largest[m] = max(largest.get(m, 0.0), float(x.detach().abs().max()))
        big = [f"'{m}' reach |x| = {v:.3g}" for m, v in largest.items() if math.isfinite(v) and v > limit]
        return ("the inputs of modality " + " and ".join(big)) if big else ""

    # ---- checkpoints -----------------------------------------------------------------------------
    def _save_checkpoint(self, epoch: int, partial: EpochStats | None) -> None:
        """``checkpoint.pt``: the state after the last finished step. ``epoch`` is the epoch to continue
        in; ``partial`` the statistics of the steps already done in it (None at an epoch boundary)."""
        t = self.config.trainer
        if self.out_dir is None or not t.checkpoint:
            return
        method = self.method
        mine = {
            "rng": rng_state(),
            "method": to_cpu(method.state_dict()),
            "records": method.records_state(),
            "epoch_stats": None if partial is None else partial.state(),
        }
        ranks = gather_objects(mine)
        if not is_main_process():
            return
        state = {
            "format": CHECKPOINT_FORMAT,
            "method_name": self.method_name,
            "seed": self.seed,
            "config": self.config.model_dump(),
            "world_size": world_size(),
            "position": {"epoch": epoch, "steps_in_epoch": 0 if partial is None else partial.steps,
                         "micro_batches": self.ctx.step, "optimizer_steps": self.optimizer_steps},
            "model": self.model.state_dict(),
            "optimizer": self.ctx.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": self.engine.state_dict(),
            "phase": self.ctx.phase_state(),
            "snapshots": {k: [t.detach().cpu() for t in v] for k, v in self.ctx.snapshots.items()},
            "method": mine["method"],
            "ranks": ranks,
            "best": self.best,
            "history": json.dumps(self.history),
            "train_seconds": self._seconds_before + time.perf_counter() - self._start,
        }
        atomic_save(state, self.out_dir / CHECKPOINT_FILE)

    def _restore(self, state: dict[str, Any]) -> tuple[int, EpochStats | None]:
        """Load a checkpoint into the freshly set-up run; returns the epoch to continue in and the
        statistics of the steps already done in it."""
        path = self.out_dir / CHECKPOINT_FILE
        if state["method_name"] != self.method_name or state["seed"] != self.seed:
            raise ConfigError(f"cannot resume: '{path}' is from method '{state['method_name']}' seed {state['seed']}, "
                              f"not method '{self.method_name}' seed {self.seed}")
        differs = first_difference(state["config"], self.config.model_dump())
        if differs is not None:
            raise ConfigError(f"cannot resume: '{path}' was written with a different configuration (first difference: "
                              f"'{differs}'); resume with the run's own configuration")
        position = state["position"]
        mid_epoch = position["steps_in_epoch"] > 0
        if mid_epoch and state["world_size"] != world_size():
            raise ConfigError(
                f"cannot resume: '{path}' was written by {state['world_size']} processes in the middle of epoch "
                f"{position['epoch']}; resume it with {state['world_size']} processes"
            )
        self.model.load_state_dict(state["model"])
        self.ctx.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.engine.load_state_dict(state["scaler"])
        self.ctx.load_phase_state(state.get("phase"))
        self.ctx.snapshots.update({k: [t.to(self.device) for t in v] for k, v in state.get("snapshots", {}).items()})
        ranks = state["ranks"]
        mine = ranks[rank()] if rank() < len(ranks) else ranks[0]
        self.method.load_state_dict(mine["method"])
        self.method.load_records_state(mine["records"], self.device)
        self.history = json.loads(state["history"])
        self.best = state["best"]
        self.ctx.step = position["micro_batches"]
        self.ctx.epoch = position["epoch"]
        self.optimizer_steps = position["optimizer_steps"]
        self._seconds_before = state["train_seconds"]
        self._start = time.perf_counter()
        partial = EpochStats.from_state(mine["epoch_stats"], self.device) if mid_epoch else None
        set_rng_state(mine["rng"])
        barrier()  # every rank has read the file before rank 0 may replace it
        return position["epoch"], partial

    # ---- logs ------------------------------------------------------------------------------------
    def _open_logs(self, first_epoch: int = 0):
        if self.out_dir is None:
            return None, None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        writer = None
        if self.config.trainer.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops what the killed one logged after its checkpoint
            writer = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=first_epoch if self.resume else None)
        path = self.out_dir / "metrics.jsonl"
        if self.resume:
            atomic_write_text("".join(json.dumps(e) + "\n" for e in self.history), path)
            return writer, open(path, "a")
        return writer, open(path, "w")

    @staticmethod
    def _log(writer, log_file, entry: dict[str, Any]) -> None:
        if log_file is not None:
            log_file.write(json.dumps(entry) + "\n")
            log_file.flush()
        if writer is not None:
            from poise.config import flatten

            for key, value in flatten({k: v for k, v in entry.items() if k != "epoch"}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    writer.add_scalar(key.replace(".", "/"), value, entry["epoch"])


__all__ = ["chance_level", "EpochStats", "NonFiniteError", "RunResult", "Trainer", "atomic_save", "concat_batches",
           "concat_outputs"]
