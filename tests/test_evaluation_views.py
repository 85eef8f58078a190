"""Measurements taken on the training split (the linear probe's features, G-Blend's losses L^T and L^V)
read the evaluation-time views of the samples, not the random training augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

import poise.methods.gblend as gblend_module
import poise.train.trainer as trainer_module
from conftest import synthetic
from poise.data import evaluation_view
from poise.data.base import DataSplits
from poise.data.lazy import LazyMultimodalDataset, SampleReader
from poise.eval.probe import extract_features
from poise.methods import make_method
from poise.train import Trainer


class NoisyReader(SampleReader):
    """One modality of an in-memory split. Training transform: Gaussian noise from the item's generator
    (a random augmentation, like a random crop); evaluation transform: the stored vector."""

    def __init__(self, array: np.ndarray, spec):
        self.array, self.spec = array, spec

    def read(self, record, rng):
        x = self.array[record]
        return x if rng is None else x + rng.normal(0.0, 0.5, x.shape).astype(np.float32)


def augmented(splits: DataSplits) -> DataSplits:
    """The same splits read sample by sample, the training split with a random training transform."""
    parts = {}
    for name in ("train", "val", "test"):
        split = splits.split(name)
        readers = {m: NoisyReader(split.inputs[m].numpy(), splits.info.modalities[m]) for m in split.modalities}
        parts[name] = LazyMultimodalDataset(readers, split.labels, [f"{name} row {i}" for i in range(len(split))],
                                            train=name == "train", present=split.present)
    return DataSplits(splits.info, parts["train"], parts["val"], parts["test"])


@pytest.fixture
def splits_and_config():
    splits, cfg = synthetic(2, num_samples=200)
    return augmented(splits), splits, cfg


def test_the_training_split_is_really_augmented(splits_and_config):
    splits, plain, _ = splits_and_config
    assert not torch.equal(splits.train[0][0]["audio"], splits.train[0][0]["audio"])
    view = evaluation_view(splits.train)
    assert view.train is False and splits.train.train is True  # the split itself keeps augmenting
    torch.testing.assert_close(view[0][0]["audio"], plain.train[0][0]["audio"], rtol=0, atol=0)
    rows = [3, 1, 4]
    sub = evaluation_view(Subset(splits.train, rows))
    assert [sub[i][3] for i in range(3)] == rows
    torch.testing.assert_close(sub[0][0]["visual"], plain.train[3][0]["visual"], rtol=0, atol=0)
    assert evaluation_view(plain.train) is plain.train  # in-memory tensors have no augmentation


def test_probe_features_of_the_training_split_are_identical_twice(splits_and_config, monkeypatch):
    splits, plain, cfg = splits_and_config
    cfg.trainer.probe = True
    cfg.trainer.epochs = 1
    seen = {}

    def capturing_probe(model, train_loader, test_loader, device, **kw):
        seen["model"], seen["loader"] = model, train_loader
        return {m: 0.0 for m in model.modalities}

    monkeypatch.setattr(trainer_module, "linear_probe", capturing_probe)
    trainer = Trainer(splits, make_method("joint"), cfg, seed=0)
    trainer.fit()
    model, loader = seen["model"], seen["loader"]
    first, labels, _ = extract_features(model, loader, trainer.device)
    second, _, _ = extract_features(model, loader, trainer.device)
    # the features the probe is fitted on: the stored training samples through the encoders, every time
    reference, reference_labels, _ = extract_features(model, trainer.make_loader(plain.train, False, sharded=False),
                                                      trainer.device)
    for m in model.modalities:
        np.testing.assert_array_equal(first[m], second[m])
        np.testing.assert_array_equal(first[m], reference[m])
    np.testing.assert_array_equal(labels, reference_labels)


def test_gblend_losses_are_measured_on_evaluation_views(splits_and_config, monkeypatch):
    splits, _, cfg = splits_and_config
    trained = []
    # copies that do not train: the losses at N and N + n are two measurements of the same networks
    monkeypatch.setattr(gblend_module, "train_networks", lambda networks, *a: trained.append(len(networks)))
    method = make_method("gblend", {"estimate_epochs": 2, "estimate_subset": 0.5})
    trainer = Trainer(splits, method, cfg, seed=0)
    trainer.setup()
    method.estimate(0)
    record = method.history[-1]
    assert trained == [3, 3]
    assert record["train_start"] == record["train_end"]
    assert record["val_start"] == record["val_end"]
    # every head then has dG = 0: no generalisation gained, uniform fallback
    assert record["fallback_uniform"] and record["weights"] == pytest.approx({h: 1 / 3 for h in record["weights"]})
    # the copies themselves still train on the augmented samples
    fit_dataset = trainer.make_loader(Subset(splits.train, [0]), True).dataset
    assert fit_dataset.dataset.train is True


def test_gblend_records_the_uniform_fallback(monkeypatch):
    splits, cfg = synthetic(2, num_samples=200)
    method = make_method("gblend", {"estimate_epochs": 1})
    trainer = Trainer(splits, method, cfg, seed=0)
    trainer.setup()
    calls = []

    def rising_losses(networks, loader, device):
        calls.append(None)  # train_start, val_start, train_end, val_end: held-out losses rise for every head
        return {h: 1.0 + len(calls) for h in networks}

    original = gblend_module.mean_losses
    monkeypatch.setattr(gblend_module, "mean_losses", rising_losses)
    method.estimate(0)
    assert method.fallback_uniform and method.history[-1]["fallback_uniform"]
    assert method.weights == pytest.approx({"audio": 1 / 3, "visual": 1 / 3, "fused": 1 / 3})
    batch = next(iter(trainer.make_loader(splits.train, False)))
    method.loss(trainer.model(batch), batch)
    assert method.pop_records()["fallback_uniform"] == 1.0
    restored = make_method("gblend")
    restored.setup(trainer.ctx)  # setup always comes before load_state_dict
    restored.load_state_dict(method.state_dict())
    assert restored.fallback_uniform

    monkeypatch.setattr(gblend_module, "mean_losses", original)
    method.estimate(1)  # real copies trained for an epoch: held-out losses fall
    assert not method.fallback_uniform and not method.history[-1]["fallback_uniform"]
    method.loss(trainer.model(batch), batch)
    assert method.pop_records()["fallback_uniform"] == 0.0
