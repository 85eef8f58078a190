"""The linear probe: it lives in :mod:`poise.train.probe` (the loop runs it after training)."""

from poise.train.probe import extract_features, linear_probe  # noqa: F401
