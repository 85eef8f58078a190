"""Metrics over a split: fused accuracy and macro-F1 (torchmetrics), per-modality accuracy."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_f1_score


def accuracy(logits: Tensor, labels: Tensor, num_classes: int) -> float:
    if labels.numel() == 0:
        return float("nan")
    return float(multiclass_accuracy(logits.argmax(1), labels, num_classes=num_classes, average="micro"))


def macro_f1(logits: Tensor, labels: Tensor, num_classes: int) -> float:
    if labels.numel() == 0:
        return float("nan")
    return float(multiclass_f1_score(logits.argmax(1), labels, num_classes=num_classes, average="macro"))


@torch.no_grad()
def evaluate(model, method, loader, num_classes: int, device: torch.device) -> dict:
    """Fused accuracy / macro-F1 from ``method.predict`` and unimodal accuracy from each modality's
    logits, counted over the samples that have that modality."""
    was_training = model.training
    model.eval()
    fused, labels, present = [], [], []
    unimodal: dict[str, list[Tensor]] = {}
    for batch in loader:
        batch = batch.to(device)
        out = model(batch)
        fused.append(method.predict(out, batch).float().cpu())
        labels.append(batch.labels.cpu())
        present.append(batch.present.cpu())
        for m, z in out.unimodal_logits.items():
            unimodal.setdefault(m, []).append(z.float().cpu())
    model.train(was_training)
    logits, y, present_all = torch.cat(fused), torch.cat(labels), torch.cat(present)
    result = {
        "accuracy": accuracy(logits, y, num_classes),
        "macro_f1": macro_f1(logits, y, num_classes),
        "loss": float(torch.nn.functional.cross_entropy(logits, y)),
        "unimodal_accuracy": {},
    }
    modalities = list(model.modalities)
    for m, zs in unimodal.items():
        rows = present_all[:, modalities.index(m)]
        result["unimodal_accuracy"][m] = accuracy(torch.cat(zs)[rows], y[rows], num_classes)
    return result
