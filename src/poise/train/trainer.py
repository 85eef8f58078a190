"""The one training loop. Every method plugs into it through the hooks of :class:`poise.methods.Method`."""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from poise.config import RunConfig
from poise.data.base import DataSplits
from poise.data.batch import collate
from poise.errors import ConfigError, PoiseError
from poise.eval.metrics import evaluate
from poise.eval.probe import linear_probe
from poise.functional.confidence import confidence_ratios, confidence_scores
from poise.methods.base import Method
from poise.models.model import MultimodalModel, build_model


class NonFiniteError(PoiseError):
    """A loss or gradient became NaN or infinite."""


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
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, then rename: never a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
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


class Trainer:
    """Trains one method on one dataset with one seed, selects the best epoch on the validation split,
    and reports test metrics of that epoch's weights."""

    def __init__(self, splits: DataSplits, method: Method, config: RunConfig, seed: int = 0,
                 out_dir: str | Path | None = None, method_name: str | None = None, init_dir: str | Path | None = None):
        self.splits, self.method, self.config, self.seed = splits, method, config, seed
        self.init_dir = Path(init_dir) if init_dir is not None else None
        self.method_name = method_name or method.name
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.device = resolve_device(config.trainer.device)
        self.modalities = method.modalities(tuple(splits.info.modalities))
        self.fusion = config.model.fusion or method.default_fusion
        method.check(splits.info, self.modalities, self.fusion)

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

    def make_loader(self, dataset: Dataset, shuffle: bool) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + 17)
        return DataLoader(
            dataset, batch_size=self.config.trainer.batch_size, shuffle=shuffle, collate_fn=collate,
            num_workers=self.config.trainer.num_workers, generator=g if shuffle else None,
            pin_memory=self.device.type == "cuda",
        )

    # ---- the loop --------------------------------------------------------------------------------
    def setup(self):
        """Seed, build the model, optimizer, scheduler and context, and call ``method.setup``."""
        from poise.train.context import TrainContext

        seed_everything(self.seed)
        model = self.build_model()
        if self.init_dir is not None:
            from poise.train.pretrain import load_encoders

            load_encoders(model, self.init_dir)
        self.model = model
        optimizer = self.build_optimizer(model.parameters())
        self.scheduler = self.build_scheduler(optimizer)
        self.ctx = TrainContext(
            model=model, optimizer=optimizer, config=self.config, info=self.splits.info, splits=self.splits,
            device=self.device, seed=self.seed, make_loader=self.make_loader, build_model=self.build_model,
            build_optimizer=self.build_optimizer,
        )
        self.method.setup(self.ctx)
        self.train_loader = self.make_loader(self.splits.train, shuffle=True)
        return self.ctx

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One training epoch with the method's epoch hooks (no evaluation, no scheduler step)."""
        self.ctx.epoch = epoch
        loader = self.method.on_epoch_start(epoch, self.train_loader) or self.train_loader
        stats = self._train_epoch(self.model, self.method, self.ctx, loader)
        self.method.on_epoch_end(epoch)
        return stats

    def fit(self) -> RunResult:
        t = self.config.trainer
        start = time.perf_counter()  # the method's setup (teachers, estimation runs) is part of its cost
        ctx = self.setup()
        model, optimizer, scheduler, method = self.model, ctx.optimizer, self.scheduler, self.method
        val_loader = self.make_loader(self.splits.val, shuffle=False)
        writer, log_file = self._open_logs()
        history: list[dict[str, Any]] = []
        best = (-math.inf, -1, None, None)  # (val accuracy, epoch, model state, method state)
        bar = tqdm(range(t.epochs), desc=self.method_name, disable=not t.progress or None, leave=False)
        try:
            for epoch in bar:
                epoch_start = time.perf_counter()
                train_stats = self.train_epoch(epoch)
                if scheduler is not None:
                    scheduler.step()
                val = evaluate(model, method, val_loader, self.splits.info.num_classes, self.device)
                entry = {
                    "epoch": epoch,
                    "lr": optimizer.param_groups[0]["lr"],
                    **train_stats,
                    "val": val,
                    "method": method.pop_records(),
                    "seconds": time.perf_counter() - epoch_start,
                }
                history.append(entry)
                self._log(writer, log_file, entry)
                if val["accuracy"] > best[0]:
                    best = (val["accuracy"], epoch, copy.deepcopy(model.state_dict()), copy.deepcopy(method.state_dict()))
                bar.set_postfix(val_acc=f"{val['accuracy']:.3f}")
        finally:
            bar.close()
            if writer is not None:
                writer.close()
            if log_file is not None:
                log_file.close()
        train_seconds = time.perf_counter() - start

        _, best_epoch, best_state, best_method_state = best
        model.load_state_dict(best_state)
        method.load_state_dict(best_method_state)
        if self.out_dir is not None:
            atomic_save({"model": best_state, "method": best_method_state, "epoch": best_epoch,
                         "config": self.config.model_dump(), "seed": self.seed}, self.out_dir / "best.pt")
        test_loader = self.make_loader(self.splits.test, shuffle=False)
        test = evaluate(model, method, test_loader, self.splits.info.num_classes, self.device)
        test.pop("loss")
        if t.probe:
            probe_train = self.make_loader(self.splits.train, shuffle=False)
            test["probe_accuracy"] = linear_probe(model, probe_train, test_loader, self.device)
        else:
            test["probe_accuracy"] = {}
        return RunResult(self.method_name, self.seed, self.config.model_dump(), best_epoch, train_seconds, test, history)

    def _train_epoch(self, model, method: Method, ctx, loader) -> dict[str, Any]:
        model.train()
        totals: dict[str, Tensor] = {}
        ratio_sums: dict[str, Tensor] = {}
        correct = torch.zeros((), device=self.device)
        seen = 0
        steps = 0
        for batch in loader:
            batch = batch.to(self.device, non_blocking=True)
            plan = method.on_step_start(batch)
            output = model(batch, feature_scale=plan.feature_scale if plan else None)
            terms = method.loss(output, batch)
            if output.probe_logits:
                terms["aux_heads"] = self._probe_loss(output, batch)
            if not method.owns_optimizer_step:
                ctx.optimizer.zero_grad(set_to_none=True)
            method.backward(terms, output, batch)
            self._check_finite(terms, ctx)
            if not method.owns_optimizer_step:
                method.after_backward(output, batch)
                ctx.optimizer_step()
            with torch.no_grad():
                for k, v in terms.items():
                    totals[k] = totals.get(k, 0.0) + v.detach().float()
                correct += (output.logits.detach().argmax(1) == batch.labels).sum()
                if len(output.unimodal_logits) > 1:
                    ratios = confidence_ratios(confidence_scores(output.unimodal_logits, batch.labels, batch.present))
                    for m, r in ratios.items():
                        ratio_sums[m] = ratio_sums.get(m, 0.0) + r
            seen += len(batch)
            steps += 1
            ctx.step += 1
        steps = max(steps, 1)
        terms_mean = {k: float(v) / steps for k, v in totals.items()}
        return {
            "train_loss": sum(terms_mean.values()),
            "train_terms": terms_mean,
            "train_accuracy": float(correct) / max(seen, 1),
            "confidence_ratio": {m: float(v) / steps for m, v in ratio_sums.items()},
        }

    @staticmethod
    def _probe_loss(output, batch) -> Tensor:
        losses = []
        for m, z in output.probe_logits.items():
            rows = batch.present_of(m)
            losses.append(F.cross_entropy(z[rows], batch.labels[rows]) if rows.any() else z.sum() * 0.0)
        return torch.stack(losses).sum()

    def _check_finite(self, terms: dict[str, Tensor], ctx) -> None:
        for name, value in terms.items():
            if not torch.isfinite(value.detach()).all():
                raise NonFiniteError(
                    f"loss term '{name}' of method '{self.method_name}' is not finite at epoch {ctx.epoch}, step {ctx.step}"
                )

    # ---- logs ------------------------------------------------------------------------------------
    def _open_logs(self):
        if self.out_dir is None:
            return None, None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        writer = None
        if self.config.trainer.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(self.out_dir / "tensorboard"))
        return writer, open(self.out_dir / "metrics.jsonl", "w")

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


Tensor = torch.Tensor
