"""Frozen-encoder linear probe: the fair measure of how well one modality's encoder learned.

A fresh multinomial logistic regression (scikit-learn, deterministic L-BFGS) is fitted on the frozen,
standardised features of the training split and scored on the test split, per modality, over the
samples that have that modality. Both splits are read with the evaluation-time transforms (the trainer
passes ``poise.data.evaluation_view`` of the training split), so the features are a function of the
encoder alone, not of a random crop or flip.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

# scikit-learn is imported in linear_probe: a command that trains nothing should not pay for it


@torch.no_grad()
def extract_features(model, loader, device) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    was_training = model.training
    model.eval()
    feats: dict[str, list] = {m: [] for m in model.modalities}
    labels, present = [], []
    for batch in loader:
        batch = batch.to(device)
        for m, h in model.encode(batch).items():
            feats[m].append(h.float().cpu().numpy())
        labels.append(batch.labels.cpu().numpy())
        present.append(batch.present.cpu().numpy())
    model.train(was_training)
    return {m: np.concatenate(v) for m, v in feats.items()}, np.concatenate(labels), np.concatenate(present)


def linear_probe(model, train_loader, test_loader, device, max_iter: int = 300, C: float = 1.0) -> dict[str, float]:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    train_x, train_y, train_p = extract_features(model, train_loader, device)
    test_x, test_y, test_p = extract_features(model, test_loader, device)
    out = {}
    # the solver's BLAS threads follow the run's (trainer.threads): a sum split over more threads rounds
    # differently, and a few hundred L-BFGS iterations carry that into the probe's accuracy
    with threadpool_limits(limits=torch.get_num_threads()):
        for j, m in enumerate(model.modalities):
            rows, test_rows = train_p[:, j], test_p[:, j]
            if len(np.unique(train_y[rows])) < 2 or not test_rows.any():
                out[m] = float("nan")
                continue
            clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter, C=C))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(train_x[m][rows], train_y[rows])
            out[m] = float(clf.score(test_x[m][test_rows], test_y[test_rows]))
    return out
