"""Metrics over a split: fused accuracy and macro-F1 (torchmetrics), per-modality accuracy."""

from __future__ import annotations

import torch
from torch import Tensor

# torchmetrics is imported where it is used: importing it costs more than torch itself (it pulls in scipy and,
# where installed, transformers), and every command of the CLI imports the training layer


def accuracy(logits: Tensor, labels: Tensor, num_classes: int) -> float:
    from torchmetrics.functional.classification import multiclass_accuracy

    if labels.numel() == 0:
        return float("nan")
    return float(multiclass_accuracy(logits.argmax(1), labels, num_classes=num_classes, average="micro"))


def macro_f1(logits: Tensor, labels: Tensor, num_classes: int) -> float:
    from torchmetrics.functional.classification import multiclass_f1_score

    if labels.numel() == 0:
        return float("nan")
    return float(multiclass_f1_score(logits.argmax(1), labels, num_classes=num_classes, average="macro"))


#: one evaluated batch: fused predictions, labels, present mask, unimodal logits per modality (on the CPU)
BatchPrediction = tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]


@torch.no_grad()
def predict_batches(model, method, loader, device: torch.device, on_output=None) -> list[BatchPrediction]:
    """``method.predict`` and the unimodal logits of every batch of ``loader``, in eval mode.
    ``on_output(output, batch)``, when given, sees every batch's model output (learning curves)."""
    was_training = model.training
    model.eval()
    batches = []
    for batch in loader:
        batch = batch.to(device)
        out = model(batch)
        if on_output is not None:
            on_output(out, batch)
        batches.append((method.predict(out, batch).float().cpu(), batch.labels.cpu(), batch.present.cpu(),
                        {m: z.float().cpu() for m, z in out.unimodal_logits.items()}))
    model.train(was_training)
    return batches


def score(batches: list[BatchPrediction], modalities: list[str], num_classes: int) -> dict:
    """Fused accuracy / macro-F1 / loss, and each modality's accuracy over the samples that have it."""
    if not batches:
        nan = float("nan")
        return {"accuracy": nan, "macro_f1": nan, "loss": nan, "unimodal_accuracy": {m: nan for m in modalities}}
    logits = torch.cat([b[0] for b in batches])
    labels = torch.cat([b[1] for b in batches])
    present = torch.cat([b[2] for b in batches])
    result = {
        "accuracy": accuracy(logits, labels, num_classes),
        "macro_f1": macro_f1(logits, labels, num_classes),
        "loss": float(torch.nn.functional.cross_entropy(logits, labels)),
        "unimodal_accuracy": {},
    }
    for m in batches[0][3]:
        rows = present[:, modalities.index(m)]
        z = torch.cat([b[3][m] for b in batches])
        result["unimodal_accuracy"][m] = accuracy(z[rows], labels[rows], num_classes)
    return result


def evaluate(model, method, loader, num_classes: int, device: torch.device) -> dict:
    """Fused accuracy / macro-F1 from ``method.predict`` and unimodal accuracy from each modality's
    logits, counted over the samples that have that modality."""
    return score(predict_batches(model, method, loader, device), list(model.modalities), num_classes)


def binary_tasks(predicted: Tensor, labels: Tensor, class_names: list[str]) -> dict[str, dict[str, float]]:
    """MulT's IEMOCAP evaluation, one binary task per class: for class c, "is c" against "is not c"
    (here derived from the single-label prediction), its accuracy and its support-weighted F1 over
    the two outcomes (scikit-learn's ``average='weighted'``, as MulT calls it)."""
    out = {}
    for c, name in enumerate(class_names):
        truth, guess = labels == c, predicted == c
        f1s, supports = [], []
        for outcome in (False, True):
            t, g = truth == outcome, guess == outcome
            tp = float((t & g).sum())
            denom = float(t.sum() + g.sum())
            f1s.append(2 * tp / denom if denom else 0.0)
            supports.append(float(t.sum()))
        total = sum(supports)
        out[name] = {"accuracy": float((truth == guess).float().mean()),
                     "f1": sum(f * s for f, s in zip(f1s, supports)) / total if total else 0.0}
    return out
