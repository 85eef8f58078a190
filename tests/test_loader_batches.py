"""The trainer reads an in-memory dataset's loader batch by batch without the DataLoader's iterator: the same
batches in the same order; any other loader is used as it is."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from conftest import synthetic
from poise.data.batch import collate
from poise.methods.registry import make_method
from poise.train.factory import loader_batches
from poise.train.trainer import Trainer


def batches_equal(a, b) -> bool:
    return (list(a.inputs) == list(b.inputs) and all(torch.equal(a.inputs[m], b.inputs[m]) for m in a.inputs)
            and torch.equal(a.labels, b.labels) and torch.equal(a.present, b.present) and torch.equal(a.index, b.index))


def test_in_memory_loader_gives_the_dataloaders_batches():
    splits, cfg = synthetic(2, missing_rate=0.2)
    trainer = Trainer(splits, make_method("joint"), cfg, seed=3)
    for epoch in range(2):
        loader = trainer.make_loader(splits.train, shuffle=True)
        loader.batch_sampler.set_epoch(epoch)
        expected = list(loader)
        loader.batch_sampler.set_epoch(epoch)
        direct = loader_batches(loader)
        assert direct is not loader
        got = list(direct)
        assert len(got) == len(expected) > 1
        assert all(batches_equal(a, b) for a, b in zip(got, expected))


def test_other_loaders_are_used_as_they_are():
    splits, cfg = synthetic(2)
    items = [splits.train[i] for i in range(10)]  # a list: no whole-batch indexing
    per_item = DataLoader(items, batch_size=4, collate_fn=collate)
    assert loader_batches(per_item) is per_item
    with_workers = DataLoader(splits.train, batch_size=4, collate_fn=collate, num_workers=1)
    assert loader_batches(with_workers) is with_workers
    own_collate = DataLoader(splits.train, batch_size=4)
    assert loader_batches(own_collate) is own_collate
    batches = [1, 2, 3]
    assert loader_batches(batches) is batches
