"""Evaluation over a split, sharded across processes in a multi-process run.

Every rank scores its own batches (the evaluation loader gives rank r whole batches r, r + W, ..., the
batches one process would form); the per-batch predictions are gathered in batch order and scored once,
so the metrics are those of one process over the whole split. In one process this is exactly
:func:`poise.eval.metrics.evaluate`.
"""

from __future__ import annotations

import torch

from poise.train.metrics import predict_batches, score
from poise.train.distributed import gather_strided, is_distributed


def evaluate_split(model, method, loader, num_classes: int, device: torch.device) -> dict:
    batches = predict_batches(model, method, loader, device)
    if is_distributed():
        batches = gather_strided(batches)
    return score(batches, list(model.modalities), num_classes)


__all__ = ["evaluate_split"]
