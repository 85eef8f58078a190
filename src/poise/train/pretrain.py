"""Self-supervised pre-training of every encoder, without labels (``poise pretrain``), and loading the
result into a model before training (``poise train --init DIR``).

Objectives:

- ``contrastive`` (default): cross-modal InfoNCE, CLIP-style. Each encoder feeds a small projection
  head (Linear-ReLU-Linear, discarded afterwards); for every pair of modalities the two embeddings of
  the same sample are the positive pair and the other samples of the batch the negatives, over the
  samples that have both modalities. Chosen as the default because the data is paired: the other
  modality of a sample is a free, semantically matched view, so no augmentation has to be designed for
  each input kind (spectrograms, frames, token sequences, feature vectors); and each encoder, the weak
  one included, must by itself carry what the sample's other modalities carry, which is the signal a
  weak encoder lacks under joint training. It needs at least two modalities.
- ``augment``: SimCLR's NT-Xent per modality between two random views of the same input (float
  inputs: each entry kept with probability 0.8, then Gaussian noise of 0.1 times the input's standard
  deviation; token inputs: each token replaced by padding with probability 0.15). It works with one
  modality, but generic views like these teach less than a second modality does.

The encoder weights of the epoch with the lowest validation loss (the same objective on the validation
split: still no labels) are written to ``DIR/encoders.pt`` (modality -> state dict) with a JSON summary
``DIR/pretrain.json``. The model is built exactly as a training run builds it from the same
configuration, so the weights load into that run's encoders.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from poise.config import RunConfig
from poise.data.base import DataSplits
from poise.data.batch import MultimodalBatch
from poise.errors import ConfigError, IncompatibleError
from poise.functional.contrastive import cross_modal_info_nce, nt_xent
from poise.train.checkpoint import ENCODERS_FILE, load_encoders  # noqa: F401  (importable from here too)

OBJECTIVES = ("contrastive", "augment")
SUMMARY_FILE = "pretrain.json"

KEEP_PROBABILITY = 0.8
NOISE_SCALE = 0.1
TOKEN_DROP_PROBABILITY = 0.15


class ProjectionHead(nn.Module):
    """Linear-ReLU-Linear from an encoder's feature to the embedding the objective compares."""

    def __init__(self, feature_dim: int, embedding_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(), nn.Linear(feature_dim, embedding_dim))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


def random_view(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A random view of a batch of inputs for the ``augment`` objective (see the module docstring)."""
    if not x.is_floating_point():
        drop = torch.rand(x.shape, generator=generator, device=x.device) < TOKEN_DROP_PROBABILITY
        return x.masked_fill(drop, 0)
    keep = torch.rand(x.shape, generator=generator, device=x.device) < KEEP_PROBABILITY
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x * keep + noise * (NOISE_SCALE * x.std())


def pretrain_loss(model: nn.Module, heads: nn.ModuleDict, batch: MultimodalBatch, objective: str,
                  temperature: float, generator: torch.Generator | None = None) -> Tensor | None:
    """The objective on one batch; None when no term has the two samples it needs (nothing to learn)."""
    present = {m: batch.present_of(m) for m in model.modalities}
    if objective == "contrastive":
        if not any(int((present[m] & present[n]).sum()) >= 2 for m, n in itertools.combinations(present, 2)):
            return None
        embeddings = {m: heads[m](h) for m, h in model.encode(batch).items()}
        return cross_modal_info_nce(embeddings, present, temperature)
    losses = []
    for m in model.modalities:
        rows = present[m]
        if int(rows.sum()) < 2:
            continue
        x = batch.inputs[m][rows]
        a = heads[m](model.encoders[m](random_view(x, generator)))
        b = heads[m](model.encoders[m](random_view(x, generator)))
        losses.append(nt_xent(a, b, temperature))
    return torch.stack(losses).mean() if losses else None


def run_pretrain(splits: DataSplits, config: RunConfig, out_dir: Path, seed: int, objective: str = "contrastive",
                 *, epochs: int | None = None, temperature: float = 0.1, embedding_dim: int = 64) -> dict[str, Any]:
    """Pre-train every encoder of the dataset's modalities without labels; write ``out_dir/encoders.pt``
    and ``out_dir/pretrain.json``; return the summary. ``epochs`` defaults to ``trainer.epochs``; the
    optimiser, learning rate, scheduler, batch size, clipping and device are the configuration's."""
    from poise.io import atomic_write_text, seed_everything
    from poise.train import factory
    from poise.train.checkpoint import atomic_save
    from poise.train.engine import NonFiniteError

    if objective not in OBJECTIVES:
        raise ConfigError(f"unknown pre-training objective '{objective}' (valid: {', '.join(OBJECTIVES)})")
    if not temperature > 0:
        raise ConfigError(f"the pre-training temperature must be positive, got {temperature}")
    modalities = tuple(splits.info.modalities)
    if objective == "contrastive" and len(modalities) < 2:
        raise IncompatibleError(f"the contrastive objective pairs modalities and the data has one ({modalities[0]}); "
                                "use objective 'augment'")
    epochs = config.trainer.epochs if epochs is None else epochs
    if epochs < 1:
        raise ConfigError(f"pre-training needs at least one epoch, got {epochs}")
    # the builders of a training run, so that the encoders match what `poise train --init` builds
    device = factory.run_device(config)
    seed_everything(seed)
    model = factory.build_model(config, splits.info, modalities, "concat", device,
                                fusion_options=config.model.fusion in (None, "concat"))
    heads = nn.ModuleDict({m: ProjectionHead(model.fusion.feature_dims[m], embedding_dim) for m in modalities})
    heads = heads.to(device)
    params = [p for m in modalities for p in model.modality_parameters(m)] + list(heads.parameters())
    optimizer = factory.build_optimizer(config, params)
    scheduler = factory.build_scheduler(config, optimizer)
    train_loader = factory.make_loader(config, splits.train, seed, device, shuffle=True)
    val_loader = factory.make_loader(config, splits.val, seed, device, shuffle=False)
    clip = config.trainer.grad_clip

    history: list[dict[str, float]] = []
    best_loss, best_epoch, best_state = math.inf, -1, None
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        heads.train()
        total, steps = torch.zeros((), device=device), 0
        for batch in train_loader:
            batch = batch.to(device, non_blocking=True)
            loss = pretrain_loss(model, heads, batch, objective, temperature)
            if loss is None:
                continue
            if not torch.isfinite(loss.detach()):
                raise NonFiniteError(f"the pre-training loss is not finite at epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            total += loss.detach()
            steps += 1
        if scheduler is not None:
            scheduler.step()
        val_loss = _validation_loss(model, heads, val_loader, objective, temperature, device, seed)
        history.append({"epoch": epoch, "train_loss": float(total) / max(steps, 1), "val_loss": val_loss})
        if best_state is None or val_loss < best_loss or math.isnan(val_loss):  # no validation signal: the latest
            best_loss, best_epoch = val_loss, epoch
            best_state = {m: copy.deepcopy(model.encoders[m].state_dict()) for m in modalities}

    out_dir = Path(out_dir)
    atomic_save(best_state, out_dir / ENCODERS_FILE)
    summary = {
        "dataset": splits.info.name, "modalities": list(modalities), "objective": objective, "seed": seed,
        "epochs": epochs, "temperature": temperature, "embedding_dim": embedding_dim, "best_epoch": best_epoch,
        "best_val_loss": best_loss, "train_seconds": time.perf_counter() - start, "history": history,
        "encoders": str(out_dir / ENCODERS_FILE),
    }
    atomic_write_text(json.dumps(summary, indent=1), out_dir / SUMMARY_FILE)
    return summary


@torch.no_grad()
def _validation_loss(model, heads, loader, objective: str, temperature: float, device, seed: int) -> float:
    """The objective on the validation split; the ``augment`` views come from a fixed generator, so
    that epochs are compared on the same views."""
    model.eval()
    heads.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    total, steps = 0.0, 0
    for batch in loader:
        loss = pretrain_loss(model, heads, batch.to(device), objective, temperature, generator)
        if loss is not None:
            total += float(loss)
            steps += 1
    return total / steps if steps else math.nan


__all__ = ["OBJECTIVES", "ProjectionHead", "load_encoders", "random_view", "run_pretrain"]
