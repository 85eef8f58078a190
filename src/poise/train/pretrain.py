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
- ``jigsaw``: solving jigsaw puzzles (Noroozi & Favaro, ECCV 2016), for image-like modalities (images,
  frames, spectrograms). Each input is cut into 3 x 3 tiles (``poise.functional.jigsaw``: ``size // 3``
  per axis, at least 4 pixels, larger inputs centre-cropped to the grid, smaller ones upsampled), each
  tile standardised on its own (no shortcut through brightness or contrast), the tiles shuffled by one
  of 64 permutations chosen greedily for large Hamming distance (seeded by the run's seed and saved in
  ``pretrain.json``), and the nine tiles run one by one through the modality's encoder (the shared
  trunk); a head on their concatenated features says which permutation was applied. An encoder that
  needs its modality's full input shape (``mlp``) sees each tile resized to that shape. The encoders of
  other modalities are left as initialised (and saved so, so that the file loads into every encoder);
  the summary says which were pre-trained.

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
from poise.functional.jigsaw import jigsaw_permutations, jigsaw_tiles, shuffle_tiles
from poise.models.encoders import MLPEncoder
from poise.train.checkpoint import ENCODERS_FILE, load_encoders  # noqa: F401  (importable from here too)

OBJECTIVES = ("contrastive", "augment", "jigsaw")
SUMMARY_FILE = "pretrain.json"

KEEP_PROBABILITY = 0.8
NOISE_SCALE = 0.1
TOKEN_DROP_PROBABILITY = 0.15

#: modality kinds the jigsaw objective cuts into tiles
IMAGE_LIKE_KINDS = ("image", "frames", "spectrogram")
JIGSAW_GRID = 3
JIGSAW_PERMUTATIONS = 64
JIGSAW_MIN_TILE = 4
JIGSAW_HIDDEN = 256


class ProjectionHead(nn.Module):
    """Linear-ReLU-Linear from an encoder's feature to the embedding the objective compares."""

    def __init__(self, feature_dim: int, embedding_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(), nn.Linear(feature_dim, embedding_dim))

    def forward(self, h: Tensor) -> Tensor:
        return self.net(h)


class JigsawHead(nn.Module):
    """The tiles' features, concatenated in puzzle order, to a score for each permutation of the set."""

    def __init__(self, feature_dim: int, tiles: int, permutations: int, hidden: int = JIGSAW_HIDDEN):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(tiles * feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, permutations))

    def forward(self, tile_features: Tensor) -> Tensor:
        return self.net(tile_features.flatten(1))


def jigsaw_logits(encoder: nn.Module, head: nn.Module, x: Tensor, permutations: Tensor, index: Tensor) -> Tensor:
    """Puzzles from inputs ``x`` (N, ..., H, W), shuffled by ``permutations[index]``; returns the head's
    (N, P) scores."""
    tiles = jigsaw_tiles(x.float(), JIGSAW_GRID, JIGSAW_MIN_TILE)  # (N, T, ..., th, tw)
    dims = tuple(range(2, tiles.dim()))
    tiles = (tiles - tiles.mean(dim=dims, keepdim=True)) / (tiles.std(dim=dims, keepdim=True) + 1e-5)
    puzzles = shuffle_tiles(tiles, permutations, index)
    n, t = puzzles.shape[:2]
    flat = puzzles.reshape(n * t, *puzzles.shape[2:])
    if isinstance(encoder, MLPEncoder):  # a fixed input size: each tile resized to the whole input's
        h, w = x.shape[-2:]
        lead = flat.shape[1:-2]
        flat = torch.nn.functional.interpolate(flat.reshape(n * t, -1, *flat.shape[-2:]), size=(h, w), mode="bilinear",
                                               align_corners=False).reshape(n * t, *lead, h, w)
    return head(encoder(flat).reshape(n, t, -1))


def random_view(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A random view of a batch of inputs for the ``augment`` objective (see the module docstring)."""
    if not x.is_floating_point():
        drop = torch.rand(x.shape, generator=generator, device=x.device) < TOKEN_DROP_PROBABILITY
        return x.masked_fill(drop, 0)
    keep = torch.rand(x.shape, generator=generator, device=x.device) < KEEP_PROBABILITY
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x * keep + noise * (NOISE_SCALE * x.std())


def pretrain_loss(model: nn.Module, heads: nn.ModuleDict, batch: MultimodalBatch, objective: str,
                  temperature: float, generator: torch.Generator | None = None,
                  permutations: Tensor | None = None) -> Tensor | None:
    """The objective on one batch; None when no term has the two samples it needs (nothing to learn).
    ``jigsaw`` trains the modalities that have a head in ``heads`` and needs the ``permutations``."""
    present = {m: batch.present_of(m) for m in model.modalities}
    if objective == "jigsaw":
        losses = []
        for m in heads:
            rows = present[m]
            if not bool(rows.any()):
                continue
            x = batch.inputs[m][rows]
            index = torch.randint(len(permutations), (x.shape[0],), generator=generator,
                                  device=x.device if generator is None else generator.device)
            logits = jigsaw_logits(model.encoders[m], heads[m], x, permutations, index.to(x.device))
            losses.append(torch.nn.functional.cross_entropy(logits, index.to(x.device)))
        return torch.stack(losses).mean() if losses else None
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
    trained = modalities
    if objective == "jigsaw":
        trained = tuple(m for m in modalities if splits.info.modalities[m].kind in IMAGE_LIKE_KINDS)
        if not trained:
            kinds = ", ".join(f"{m}: {spec.kind}" for m, spec in splits.info.modalities.items())
            raise IncompatibleError(f"the jigsaw objective needs an image, frame or spectrogram modality and dataset "
                                    f"'{splits.info.name}' has none ({kinds}); use objective 'contrastive' or 'augment'")
    epochs = config.trainer.epochs if epochs is None else epochs
    if epochs < 1:
        raise ConfigError(f"pre-training needs at least one epoch, got {epochs}")
    # the builders of a training run, so that the encoders match what `poise train --init` builds
    device = factory.run_device(config)
    seed_everything(seed)
    model = factory.build_model(config, splits.info, modalities, "concat", device,
                                fusion_options=config.model.fusion in (None, "concat"))
    permutations = None
    if objective == "jigsaw":
        permutations = jigsaw_permutations(JIGSAW_PERMUTATIONS, JIGSAW_GRID**2, seed).to(device)
        heads = nn.ModuleDict({m: JigsawHead(model.fusion.feature_dims[m], JIGSAW_GRID**2, JIGSAW_PERMUTATIONS)
                               for m in trained})
    else:
        heads = nn.ModuleDict({m: ProjectionHead(model.fusion.feature_dims[m], embedding_dim) for m in modalities})
    heads = heads.to(device)
    params = [p for m in trained for p in model.modality_parameters(m)] + list(heads.parameters())
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
            loss = pretrain_loss(model, heads, batch, objective, temperature, permutations=permutations)
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
        val_loss = _validation_loss(model, heads, val_loader, objective, temperature, device, seed, permutations)
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
        "encoders": str(out_dir / ENCODERS_FILE), "pretrained": list(trained),
        "not_pretrained": [m for m in modalities if m not in trained],
    }
    if objective == "jigsaw":
        summary["permutations"] = permutations.tolist()
        left = summary["not_pretrained"]
        summary["note"] = (f"jigsaw pre-trained the image-like encoders ({', '.join(trained)})"
                           + (f"; {', '.join(left)} left as initialised" if left else ""))
    atomic_write_text(json.dumps(summary, indent=1), out_dir / SUMMARY_FILE)
    return summary


@torch.no_grad()
def _validation_loss(model, heads, loader, objective: str, temperature: float, device, seed: int,
                     permutations: Tensor | None = None) -> float:
    """The objective on the validation split; the ``augment`` views and the ``jigsaw`` puzzles come from
    a fixed generator, so that epochs are compared on the same views and puzzles."""
    model.eval()
    heads.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    total, steps = 0.0, 0
    for batch in loader:
        loss = pretrain_loss(model, heads, batch.to(device), objective, temperature, generator, permutations)
        if loss is not None:
            total += float(loss)
            steps += 1
    return total / steps if steps else math.nan


__all__ = ["IMAGE_LIKE_KINDS", "OBJECTIVES", "JigsawHead", "ProjectionHead", "jigsaw_logits", "load_encoders", "random_view", "run_pretrain"]
