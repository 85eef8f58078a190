"""The batch order of every loader the trainer makes: a function of the seed and the epoch only, the same
for any number of processes and micro-batches, and able to start in the middle of an epoch (resume)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.utils.data import Sampler


class ShardedBatchSampler(Sampler[list[int]]):
    """Batches of dataset positions for one rank.

    The run's batches of ``batch_size`` come from one order per epoch: ``0..size-1``, or, when shuffling,
    the permutation that a ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(seed))``
    gives in that epoch (the generator stream is replayed: the loader's base-seed draw, the permutation,
    and the sampler's trailing empty slice). So a one-process run sees exactly the batches of a plain
    shuffled DataLoader, and the order is still a function of the seed and the epoch only.

    - ``split=True`` (training): each batch is cut into ``num_shards * micro_batches`` interleaved
      pieces (piece p = batch[p::pieces]); shard r yields pieces r, r + num_shards, ... of every batch,
      one per micro-batch, so that the micro-batches of all ranks of one optimizer step are exactly that
      batch. A last batch with fewer samples than pieces is topped up from the start of the order, so
      every rank steps the same number of times and never gets an empty micro-batch.
    - ``split=False`` (evaluation): whole batches, shard r taking batches r, r + num_shards, ... (no
      padding; so every sample is scored exactly once, in batches that one process would form).

    Each iteration moves to the next epoch unless ``set_epoch`` says which; ``skip_next(k)`` makes the
    next iteration start after this shard's first k batches.
    """

    def __init__(self, size: int, batch_size: int, shuffle: bool, seed: int, split: bool,
                 num_shards: int = 1, shard: int = 0, micro_batches: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= shard < num_shards:
            raise ValueError(f"shard {shard} is not in [0, {num_shards})")
        self.size, self.batch_size, self.shuffle, self.seed, self.split = size, batch_size, shuffle, seed, split
        self.num_shards, self.shard = num_shards, shard
        self.micro_batches = micro_batches if split else 1
        self.epoch = 0
        self._skip = 0
        #: (next epoch, generator state before it): replaying the stream epoch after epoch stays linear
        self._stream: tuple[int, Tensor] | None = None

    @property
    def pieces(self) -> int:
        return self.num_shards * self.micro_batches if self.split else 1

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_next(self, batches: int) -> None:
        self._skip = batches

    def order(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        generator = torch.Generator()
        if self._stream is not None and self._stream[0] <= epoch:
            current = self._stream[0]
            generator.set_state(self._stream[1])
        else:
            current = 0
            generator.manual_seed(self.seed)
        while True:
            # what DataLoader + RandomSampler draw from their generator in one full epoch
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            permutation = torch.randperm(self.size, generator=generator)
            torch.randperm(self.size, generator=generator)
            if current == epoch:
                break
            current += 1
        self._stream = (epoch + 1, generator.get_state())
        return permutation

    def _batches(self) -> list[list[int]]:
        order = self.order(self.epoch).tolist()
        batches = [order[i: i + self.batch_size] for i in range(0, self.size, self.batch_size)]
        if not self.split:
            return batches[self.shard:: self.num_shards]
        pieces = self.pieces
        if batches and len(batches[-1]) < pieces:
            missing = pieces - len(batches[-1])
            batches[-1] = batches[-1] + [order[i % len(order)] for i in range(missing)]
        return [b[p:: pieces] for b in batches for p in range(self.shard, pieces, self.num_shards)]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches()[self._skip:]
        self._skip = 0
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        full = math.ceil(self.size / self.batch_size)
        count = full * self.micro_batches if self.split else len(range(self.shard, full, self.num_shards))
        return max(count - self._skip, 0)

