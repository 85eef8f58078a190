"""Jigsaw puzzles for self-supervised pre-training (Noroozi & Favaro, "Unsupervised Learning of Visual
Representations by Solving Jigsaw Puzzles", ECCV 2016): cut an image into a grid of tiles, shuffle them
by one permutation of a fixed set, and have a network say which permutation it was.

The permutation set is chosen greedily for large Hamming distance between its members, so that no two
puzzles are nearly the same: start from a random permutation, then repeatedly add the permutation whose
smallest Hamming distance to those already chosen is largest (ties: the largest total distance, then a
seeded random order).
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def jigsaw_permutations(count: int = 64, tiles: int = 9, seed: int = 0) -> Tensor:
    """(count, tiles) long: ``count`` permutations of ``range(tiles)`` chosen greedily for maximal
    Hamming distance (module docstring); the same ``seed`` gives the same set."""
    total = math.factorial(tiles)
    if not 1 <= count <= total:
        raise ValueError(f"{count} permutations of {tiles} tiles asked; there are {total}")
    return torch.from_numpy(_greedy_permutations(count, tiles, seed).copy())


@functools.lru_cache(maxsize=8)
def _greedy_permutations(count: int, tiles: int, seed: int) -> np.ndarray:
    """The set of :func:`jigsaw_permutations`, computed once per process (about a second for 9 tiles)."""
    total = math.factorial(tiles)
    generator = torch.Generator().manual_seed(seed)
    flat = np.fromiter(itertools.chain.from_iterable(itertools.permutations(range(tiles))), dtype=np.int8,
                       count=total * tiles)
    order = torch.randperm(total, generator=generator).numpy()
    candidates = flat.reshape(total, tiles)[order]
    columns = np.ascontiguousarray(candidates.T)  # (tiles, total): one contiguous comparison per position
    smallest = np.full(total, tiles + 1, dtype=np.int64)
    summed = np.zeros(total, dtype=np.int64)
    taken = np.zeros(total, dtype=bool)
    chosen = [0]
    while True:
        j = chosen[-1]
        taken[j] = True
        distance = np.zeros(total, dtype=np.int64)
        for i in range(tiles):
            distance += columns[i] != columns[i, j]
        np.minimum(smallest, distance, out=smallest)
        summed += distance
        if len(chosen) == count:
            break
        # the smallest distance first, the total second; argmax takes the first maximum (seeded order)
        score = smallest * (tiles * count + 1) + summed
        score[taken] = -1
        chosen.append(int(score.argmax()))
    return candidates[chosen].astype(np.int64)


def jigsaw_tile_size(height: int, width: int, grid: int = 3, min_tile: int = 4) -> tuple[int, int]:
    """The tile size for an input of ``height x width``: ``size // grid`` on each axis, at least
    ``min_tile`` (small inputs are upsampled to ``grid * min_tile``)."""
    return max(height // grid, min_tile), max(width // grid, min_tile)


def jigsaw_tiles(x: Tensor, grid: int = 3, min_tile: int = 4) -> Tensor:
    """Cut a batch ``(B, ..., H, W)`` (any dimensions between the batch and the last two: channels,
    frames) into ``grid x grid`` tiles: ``(B, grid * grid, ..., th, tw)``, tile ``r * grid + c`` at row r,
    column c. Tile sizes come from :func:`jigsaw_tile_size`; an input larger than ``grid`` tiles is
    centre-cropped to them, a smaller one resized (bilinear) up to them."""
    b, *lead, h, w = x.shape
    th, tw = jigsaw_tile_size(h, w, grid, min_tile)
    target_h, target_w = grid * th, grid * tw
    flat = x.reshape(b, -1, h, w)
    top, left = max(h - target_h, 0) // 2, max(w - target_w, 0) // 2
    flat = flat[:, :, top:top + min(h, target_h), left:left + min(w, target_w)]
    if flat.shape[-2:] != (target_h, target_w):
        flat = F.interpolate(flat.float(), size=(target_h, target_w), mode="bilinear", align_corners=False).to(x.dtype)
    c = flat.shape[1]
    tiles = flat.reshape(b, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5).reshape(b, grid * grid, c, th, tw)
    return tiles.reshape(b, grid * grid, *lead, th, tw)


def shuffle_tiles(tiles: Tensor, permutations: Tensor, index: Tensor) -> Tensor:
    """Puzzles from tiles ``(B, T, ...)``: position i of sample b holds tile ``permutations[index[b], i]``."""
    order = permutations.to(tiles.device)[index]  # (B, T)
    rows = torch.arange(tiles.shape[0], device=tiles.device).unsqueeze(1)
    return tiles[rows, order]


__all__ = ["jigsaw_permutations", "jigsaw_tile_size", "jigsaw_tiles", "shuffle_tiles"]
