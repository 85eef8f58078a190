"""Evaluation over a split, sharded across processes in a multi-process run.

Every rank scores its own batches (the evaluation loader gives rank r whole batches r, r + W, ..., the
batches one process would form); the per-batch predictions are gathered in batch order and scored once,
so the metrics are those of one process over the whole split. In one process this is exactly
:func:`poise.eval.metrics.evaluate`.
"""

from __future__ import annotations

import torch

from poise.eval.metrics import accuracy, evaluate, macro_f1
from poise.train.distributed import gather_strided, is_distributed


@torch.no_grad()
def evaluate_split(model, method, loader, num_classes: int, device: torch.device) -> dict:
    if not is_distributed():
        return evaluate(model, method, loader, num_classes, device)
    was_training = model.training
    model.eval()
    local = []
    for batch in loader:
        batch = batch.to(device)
        out = model(batch)
        local.append((
            method.predict(out, batch).float().cpu(), batch.labels.cpu(), batch.present.cpu(),
            {m: z.float().cpu() for m, z in out.unimodal_logits.items()},
        ))
    model.train(was_training)
    batches = gather_strided(local)
    if not batches:
        nan = float("nan")
        return {"accuracy": nan, "macro_f1": nan, "loss": nan, "unimodal_accuracy": {m: nan for m in model.modalities}}
    logits = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    present = torch.cat([b[2] for b in batches])
    result = {
        "accuracy": accuracy(logits, labels, num_classes),
        "macro_f1": macro_f1(logits, labels, num_classes),
        "loss": float(torch.nn.functional.cross_entropy(logits, labels)),
        "unimodal_accuracy": {},
    }
    modalities = list(model.modalities)
    for m in batches[0][3]:
        rows = present[:, modalities.index(m)]
        z = torch.cat([b[3][m] for b in batches])
        result["unimodal_accuracy"][m] = accuracy(z[rows], labels[rows], num_classes)
    return result


__all__ = ["evaluate_split"]
