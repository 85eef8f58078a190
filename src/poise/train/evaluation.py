"""Evaluation over a split, sharded across processes in a multi-process run.

Every rank scores its own batches (the evaluation loader gives rank r whole batches r, r + W, ..., the
batches one process would form); the per-batch predictions are gathered in batch order and scored once,
so the metrics are those of one process over the whole split. In one process this is exactly
:func:`poise.train.metrics.evaluate`.
"""

from __future__ import annotations

import torch

from poise.train.distributed import all_reduce_sum, gather_strided, is_distributed
from poise.train.metrics import predict_batches, score


def evaluate_split(model, method, loader, num_classes: int, device: torch.device, curves=None) -> dict:
    """``curves``: a :class:`poise.train.curves.ValidationCurves` that also adds up each head's loss
    (and the modality gap); its sums are reduced over processes and its result merged in."""
    batches = predict_batches(model, method, loader, device, on_output=curves)
    if is_distributed():
        batches = gather_strided(batches)
    result = score(batches, list(model.modalities), num_classes)
    if curves is not None:
        if is_distributed():
            for t in curves.tensors():
                t.copy_(all_reduce_sum(t))
        result.update(curves.result())
    return result


__all__ = ["evaluate_split"]
