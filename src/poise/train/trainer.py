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
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from poise.config import RunConfig
from poise.data.base import DataSplits
from poise.data.batch import MultimodalBatch, collate
from poise.errors import ConfigError, IncompatibleError
from poise.eval.probe import linear_probe
from poise.functional.confidence import confidence_ratios, confidence_rows
from poise.methods.base import Method
from poise.models.model import ModelOutput, MultimodalModel, build_model
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
from poise.train.distributed import (
    all_gather_objects,
    all_reduce_sum,
    barrier,
    broadcast_buffers,
    broadcast_object,
    broadcast_tensors,
    gather_objects,
    init_distributed,
    is_distributed,
    is_main_process,
    launched_by_torchrun,
    rank,
    world_size,
)
from poise.train.engine import NonFiniteError, StepEngine
from poise.train.evaluation import evaluate_split
from poise.train.sampler import ShardedBatchSampler

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_write_text(text: str, path: Path) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device is '{name}' but CUDA is not available on this machine")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"trainer.device '{name}' is not a device name (expected cpu, cuda or cuda:N)") from None


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
    #: (fused logits, labels) of micro-batches and (unimodal logits, labels, present) of steps not yet counted
    pending_correct: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    pending_scores: list[tuple[dict[str, Tensor], Tensor, Tensor]] = field(default_factory=list)

    def note(self, logits: Tensor, labels: Tensor) -> None:
        self.pending_correct.append((logits.detach(), labels))
        if len(self.pending_correct) >= STATS_GROUP:
            self.flush()

    def note_scores(self, unimodal_logits: dict[str, Tensor], labels: Tensor, present: Tensor) -> None:
        self.pending_scores.append(({m: z.detach() for m, z in unimodal_logits.items()}, labels, present))

    def flush(self) -> None:
        """Count the pending micro-batches' correct predictions and compute the pending steps' confidence
        scores (each step's exactly as on its own: the same rows, summed the same way)."""
        with torch.no_grad():
            if self.pending_correct:
                logits = torch.cat([z for z, _ in self.pending_correct])
                labels = torch.cat([y for _, y in self.pending_correct])
                correct = (logits.argmax(1) == labels).sum()
                self.correct = correct if self.correct is None else self.correct + correct
                self.pending_correct = []
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
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], device: torch.device) -> EpochStats:
        scores = state["scores"]
        return cls(
            totals={k: v.to(device) for k, v in state["totals"].items()},
            correct=None if state["correct"] is None else state["correct"].to(device),
            seen=state["seen"], micro_batches=state["micro_batches"], steps=state["steps"],
            scores=[] if scores is None else [s.to(device) for s in scores.unbind(0)], seconds=state["seconds"],
        )


class Trainer:
    """Trains one method on one dataset with one seed, selects the best epoch on the validation split,
    and reports test metrics of that epoch's weights.

    ``resume=True`` continues the run whose ``checkpoint.pt`` is in ``out_dir``; the configuration, the
    method and the seed must be those of that run."""

    def __init__(self, splits: DataSplits, method: Method, config: RunConfig, seed: int = 0,
                 out_dir: str | Path | None = None, method_name: str | None = None, init_dir: str | Path | None = None,
                 resume: bool = False):
        self.splits, self.method, self.config, self.seed = splits, method, config, seed
        self.init_dir = Path(init_dir) if init_dir is not None else None
        self.method_name = method_name or method.name
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.resume = resume
        if resume and self.out_dir is None:
            raise ConfigError("resuming needs the run folder that holds checkpoint.pt (out_dir)")
        t = config.trainer
        self.device = resolve_device(t.device)
        if launched_by_torchrun():
            self.device = init_distributed(self.device, t.dist_backend)
        if t.amp == "bf16" and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError("trainer.amp bf16 needs a GPU with bfloat16 support; use fp16 on this one")
        self.modalities = method.modalities(tuple(splits.info.modalities))
        self.fusion = config.model.fusion or method.default_fusion
        method.check(splits.info, self.modalities, self.fusion)
        if method.owns_optimizer_step and t.accumulate > 1:
            raise IncompatibleError(
                f"method '{self.method_name}' takes its own optimizer steps within each batch and cannot accumulate "
                f"gradients over micro-batches; set trainer.accumulate to 1 (it is {t.accumulate})"
            )
        self.history: list[dict[str, Any]] = []
        #: {"accuracy", "epoch", "model", "method"} of the best validation epoch so far
        self.best: dict[str, Any] | None = None
        self.optimizer_steps = 0

    # ---- builders ------------------------------------------------------------------------------
    def build_model(self, modalities: tuple[str, ...] | None = None, fusion: str | None = None) -> MultimodalModel:
        mc = self.config.model
        return build_model(
            self.splits.info, modalities or self.modalities, fusion or self.fusion,
            feature_dim=mc.feature_dim, encoders=mc.encoders, encoder_options=mc.encoder_options,
            fusion_options=mc.fusion_options if fusion in (None, self.fusion) else None,
        ).to(self.device)

    def build_optimizer(self, params) -> torch.optim.Optimizer:
        t = self.config.trainer
        params = [p for p in params if p.requires_grad]
        if t.optimizer == "sgd":
            return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
        return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)

    def build_scheduler(self, optimizer):
        t = self.config.trainer
        if t.scheduler == "step":
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=t.step_size, gamma=t.gamma)
        if t.scheduler == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t.epochs)
        return None

    def make_loader(self, dataset: Dataset, shuffle: bool, micro_batches: int | None = None,
                    sharded: bool = True) -> DataLoader:
        """A loader over ``dataset`` whose batch order depends on the seed and the epoch only.

        ``shuffle=True`` (training): each batch of ``batch_size`` is split over the processes and into
        ``micro_batches`` micro-batches (default ``trainer.accumulate``; a method's own training loop
        passes 1). ``shuffle=False`` (evaluation): whole batches in order, process r taking every W-th.
        ``sharded=False``: all of the data in this process (the linear probe on rank 0)."""
        t = self.config.trainer
        num_shards, shard = (world_size(), rank()) if sharded else (1, 0)
        sampler = ShardedBatchSampler(
            len(dataset), t.batch_size, shuffle, seed=self.seed * 1_000_003 + 17, split=shuffle,
            num_shards=num_shards, shard=shard, micro_batches=t.accumulate if micro_batches is None else micro_batches,
        )
        # the loader's own generator only seeds its workers; the order comes from the sampler
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 17) if shuffle else None
        return DataLoader(
            dataset, batch_sampler=sampler, collate_fn=collate, num_workers=t.num_workers, generator=g,
            pin_memory=self.device.type == "cuda",
        )

    # ---- the loop --------------------------------------------------------------------------------
    def setup(self):
        """Seed, build the model, optimizer, scheduler and context, call ``method.setup``, then wrap the
        model for multi-process training and build the step engine."""
        from poise.train.context import TrainContext

        seed_everything(self.seed)
        model = self.build_model()
        if self.init_dir is not None:
            from poise.train.pretrain import load_encoders

            load_encoders(model, self.init_dir)
        self.model = model
        optimizer = self.build_optimizer(model.parameters())
        self.scheduler = self.build_scheduler(optimizer)
        self.ctx = ctx = TrainContext(
            model=model, optimizer=optimizer, config=self.config, info=self.splits.info, splits=self.splits,
            device=self.device, seed=self.seed, make_loader=self.make_loader, build_model=self.build_model,
            build_optimizer=self.build_optimizer,
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
        )
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
        val_loader = self.make_loader(self.splits.val, shuffle=False)
        first_epoch, partial = 0, None
        if self.resume:
            first_epoch, partial = self._restore(load_checkpoint(self.out_dir / CHECKPOINT_FILE))
        main = is_main_process()
        writer, log_file = self._open_logs(first_epoch) if main else (None, None)
        bar = tqdm(range(first_epoch, t.epochs), desc=self.method_name, disable=not (t.progress and main) or None,
                   leave=False)
        try:
            for epoch in bar:
                epoch_start = time.perf_counter() - (partial.seconds if partial is not None else 0.0)
                train_stats = self.train_epoch(epoch, partial)
                partial = None
                if scheduler is not None:
                    scheduler.step()
                broadcast_buffers(model)  # evaluate (and checkpoint) rank 0's norm statistics everywhere
                val = evaluate_split(model, method, val_loader, self.splits.info.num_classes, self.device)
                entry = {
                    "epoch": epoch,
                    "lr": optimizer.param_groups[0]["lr"],
                    **train_stats,
                    "val": val,
                    "method": self._reduce_records(method.pop_records()),
                    "seconds": time.perf_counter() - epoch_start,
                }
                self.history.append(entry)
                self._log(writer, log_file, entry)
                if self.best is None or val["accuracy"] > self.best["accuracy"]:
                    self.best = {"accuracy": val["accuracy"], "epoch": epoch, "model": copy.deepcopy(model.state_dict()),
                                 "method": copy.deepcopy(method.state_dict())}
                self._save_checkpoint(epoch + 1, None)
                bar.set_postfix(val_acc=f"{val['accuracy']:.3f}")
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
        test_loader = self.make_loader(self.splits.test, shuffle=False)
        test = evaluate_split(model, method, test_loader, self.splits.info.num_classes, self.device)
        test.pop("loss")
        probe: dict[str, float] = {}
        if t.probe:
            # rank 0 alone, over all of the data: the probe is a deterministic scikit-learn fit
            if main:
                probe_train = self.make_loader(self.splits.train, shuffle=False, sharded=False)
                probe_test = self.make_loader(self.splits.test, shuffle=False, sharded=False)
                probe = linear_probe(model, probe_train, probe_test, self.device)
            probe = broadcast_object(probe)
        test["probe_accuracy"] = probe
        return RunResult(self.method_name, self.seed, self.config.model_dump(), best["epoch"], train_seconds, test,
                         self.history)

    def _train_epoch(self, epoch: int, loader, stats: EpochStats) -> dict[str, Any]:
        model, method, ctx, engine = self.model, self.method, self.ctx, self.engine
        model.train()
        owns = method.owns_optimizer_step
        accumulate = engine.accumulate
        sampler = getattr(loader, "batch_sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        batches: Iterable = loader
        done = stats.steps * accumulate  # micro-batches a resumed run already trained on in this epoch
        if done:
            if hasattr(sampler, "skip_next"):
                sampler.skip_next(done)
            else:
                batches = itertools.islice(loader, done, None)
        epoch_start = time.perf_counter() - stats.seconds
        every = self.config.trainer.checkpoint_every_steps
        group: list[tuple[MultimodalBatch, ModelOutput]] = []
        for batch, last in _with_last(batches):
            batch = batch.to(self.device, non_blocking=True)
            end_of_step = last or len(group) == accumulate - 1
            output = None
            try:
                if not group and not owns:
                    ctx.optimizer.zero_grad(set_to_none=True)
                plan = method.on_step_start(batch)
                with engine.sync_context(end_of_step):
                    with engine.autocast():
                        output = engine.forward_module(batch, feature_scale=plan.feature_scale if plan else None)
                        terms = method.loss(output, batch)
                        if output.probe_logits:
                            terms["aux_heads"] = self._probe_loss(output, batch)
                    engine.note_loss(terms)
                    calls = engine.backward_calls
                    method.backward(terms, output, batch)
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
                raise NonFiniteError(f"{err}; {self._diagnose(pending)}") from None
            with torch.no_grad():
                for k, v in terms.items():
                    stats.totals[k] = stats.totals.get(k, 0.0) + v.detach().float()
            stats.note(output.logits, batch.labels)
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
        if is_distributed():
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
                if m in output.features and not bool(torch.isfinite(output.features[m].detach()).all()):
                    return f"the features of modality '{m}' (its encoder's output) are not finite"
        for m in model.modalities:
            for _, output in pending:
                z = output.unimodal_logits.get(m)
                if z is not None and not bool(torch.isfinite(z.detach()).all()):
                    return f"the unimodal logits of modality '{m}' are not finite"
        return ("every modality's input, encoder weights and features are finite: the fusion head or the method's "
                "own computation went bad")

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
            "records": {k: torch.stack([v.cpu() for v in vs]) for k, vs in method._records.items() if vs},
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
        ranks = state["ranks"]
        mine = ranks[rank()] if rank() < len(ranks) else ranks[0]
        self.method.load_state_dict(mine["method"])
        self.method._records.clear()
        for k, values in mine["records"].items():
            self.method._records[k] = list(values.to(self.device).unbind(0))
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


__all__ = ["EpochStats", "NonFiniteError", "RunResult", "Trainer", "atomic_save", "atomic_write_text", "concat_batches",
           "concat_outputs", "resolve_device", "seed_everything"]
