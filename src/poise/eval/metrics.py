"""Scores of a model's predictions: they live in :mod:`poise.train.metrics` (the loop scores each epoch)."""

from poise.train.metrics import (  # noqa: F401
    BatchPrediction,
    accuracy,
    binary_tasks,
    evaluate,
    macro_f1,
    predict_batches,
    score,
)
