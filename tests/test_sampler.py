"""ShardedBatchSampler directly: the one-process order is a plain shuffled DataLoader's; shards and
micro-batches partition each batch; skip_next resumes in the middle of an epoch; evaluation is sharded
without padding."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from poise.train.sampler import ShardedBatchSampler


def epochs_of(sampler: ShardedBatchSampler, n: int) -> list[list[list[int]]]:
    out = []
    for epoch in range(n):
        sampler.set_epoch(epoch)
        out.append([list(b) for b in sampler])
    return out


def test_one_process_order_is_a_plain_shuffled_dataloader():
    size, batch, seed = 23, 5, 7
    loader = DataLoader(list(range(size)), batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))
    expected = [[[int(i) for i in b] for b in loader] for _ in range(3)]  # three epochs of one loader
    sampler = ShardedBatchSampler(size, batch, shuffle=True, seed=seed, split=True)
    assert epochs_of(sampler, 3) == expected


@pytest.mark.parametrize("shards, micro", [(2, 1), (1, 2), (2, 2), (3, 1)])
def test_shards_and_micro_batches_partition_each_batch(shards, micro):
    size, batch, seed = 40, 12, 3
    whole = epochs_of(ShardedBatchSampler(size, batch, True, seed, split=True), 2)
    parts = [epochs_of(ShardedBatchSampler(size, batch, True, seed, split=True, num_shards=shards, shard=r,
                                           micro_batches=micro), 2) for r in range(shards)]
    for epoch in range(2):
        steps = [len(p[epoch]) // micro for p in parts]
        assert len(set(steps)) == 1 and steps[0] == len(whole[epoch])  # every rank steps as often
        for step, batch_items in enumerate(whole[epoch]):
            got = [i for p in parts for i in sum(p[epoch][step * micro:(step + 1) * micro], [])]
            if len(batch_items) >= shards * micro:
                assert sorted(got) == sorted(batch_items)  # exactly this batch, split over ranks and micro-batches
            else:
                assert set(batch_items) <= set(got)  # a short last batch is topped up, never empty


def test_skip_next_starts_in_the_middle_of_the_epoch():
    sampler = ShardedBatchSampler(30, 4, True, seed=1, split=True)
    sampler.set_epoch(2)
    full = [list(b) for b in sampler]
    sampler.set_epoch(2)
    sampler.skip_next(3)
    assert [list(b) for b in sampler] == full[3:]
    sampler.set_epoch(2)
    assert [list(b) for b in sampler] == full  # the skip applies once


def test_evaluation_shards_whole_batches_without_padding():
    shards = [list(ShardedBatchSampler(11, 4, False, seed=0, split=False, num_shards=2, shard=r)) for r in range(2)]
    assert shards[0] == [[0, 1, 2, 3], [8, 9, 10]] and shards[1] == [[4, 5, 6, 7]]


def test_bad_arguments_say_what_was_expected():
    with pytest.raises(ValueError, match="batch_size must be positive"):
        ShardedBatchSampler(10, 0, True, 0, True)
    with pytest.raises(ValueError, match=r"shard 2 is not in \[0, 2\)"):
        ShardedBatchSampler(10, 2, True, 0, True, num_shards=2, shard=2)
