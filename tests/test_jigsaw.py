"""Jigsaw pre-training: the permutation set, the tiles and the shuffle against hand-built values, then
``poise pretrain --objective jigsaw`` on avdigits (with and without a non-image modality) and its refusal."""

import itertools
import json
import math

import pytest
import torch
from torch.utils.data import Subset

from conftest import fast_config, synthetic
from poise.data import load_dataset
from poise.data.base import DataSplits
from poise.errors import IncompatibleError
from poise.functional.jigsaw import jigsaw_permutations, jigsaw_tile_size, jigsaw_tiles, shuffle_tiles
from poise.methods import make_method
from poise.models import build_model
from poise.train import Trainer
from poise.train.pretrain import JigsawHead, jigsaw_logits, load_encoders, run_pretrain


def hamming(p, q):
    return sum(int(a != b) for a, b in zip(p, q))


# ---- permutation set ----------------------------------------------------------------------------------
def test_permutations_are_distinct_permutations_and_seeded():
    p = jigsaw_permutations(10, 5, seed=3)
    assert p.shape == (10, 5) and p.dtype == torch.int64
    rows = [tuple(r) for r in p.tolist()]
    assert all(sorted(r) == list(range(5)) for r in rows) and len(set(rows)) == 10
    assert torch.equal(p, jigsaw_permutations(10, 5, seed=3))
    assert not torch.equal(p, jigsaw_permutations(10, 5, seed=4))
    with pytest.raises(ValueError, match="there are 24"):
        jigsaw_permutations(25, 4)


def test_greedy_choice_reaches_the_largest_distances_by_hand():
    # four tiles: any two rows of a Latin square differ everywhere, and a 2 x 4 Latin rectangle always
    # completes to a square, so the greedy choice finds 4 permutations at pairwise distance 4 (the most)
    p = jigsaw_permutations(4, 4, seed=0).tolist()
    assert all(hamming(a, b) == 4 for a, b in itertools.combinations(p, 2))
    # three tiles, three permutations: the three cyclic shifts of the first (pairwise distance 3)
    p = jigsaw_permutations(3, 3, seed=1).tolist()
    assert all(hamming(a, b) == 3 for a, b in itertools.combinations(p, 2))
    # nine tiles, the notes' 64: every pair differs in most positions
    p = jigsaw_permutations(64, 9, seed=0).tolist()
    assert min(hamming(a, b) for a, b in itertools.combinations(p, 2)) >= 6


def test_greedy_choice_matches_a_plain_loop():
    tiles, count, seed = 4, 9, 5
    g = torch.Generator().manual_seed(seed)
    candidates = [list(c) for c in itertools.permutations(range(tiles))]
    order = torch.randperm(len(candidates), generator=g).tolist()
    candidates = [candidates[i] for i in order]
    chosen = [0]
    while len(chosen) < count:
        best, best_key = None, None
        for k, c in enumerate(candidates):
            if k in chosen:
                continue
            distances = [hamming(c, candidates[j]) for j in chosen]
            key = (min(distances), sum(distances))
            if best_key is None or key > best_key:
                best, best_key = k, key
        chosen.append(best)
    assert jigsaw_permutations(count, tiles, seed).tolist() == [candidates[k] for k in chosen]


# ---- tiles and shuffle --------------------------------------------------------------------------------
def test_tiles_of_a_6x6_image_by_hand():
    x = torch.arange(36.0).reshape(1, 1, 6, 6)
    tiles = jigsaw_tiles(x, grid=3, min_tile=2)
    assert tiles.shape == (1, 9, 1, 2, 2)
    assert tiles[0, 0, 0].tolist() == [[0, 1], [6, 7]]
    assert tiles[0, 1, 0].tolist() == [[2, 3], [8, 9]]
    assert tiles[0, 3, 0].tolist() == [[12, 13], [18, 19]]
    assert tiles[0, 8, 0].tolist() == [[28, 29], [34, 35]]


def test_tile_sizes_at_every_input_size_poise_ships():
    assert jigsaw_tile_size(8, 8) == (4, 4)  # avdigits digits: upsampled to 12 x 12
    assert jigsaw_tile_size(16, 16) == (5, 5)  # avdigits spectrograms: cropped to 15 x 15
    assert jigsaw_tile_size(224, 224) == (74, 74)  # frames: cropped to 222 x 222
    digits = torch.full((2, 1, 8, 8), 0.5)
    assert jigsaw_tiles(digits).shape == (2, 9, 1, 4, 4) and torch.allclose(jigsaw_tiles(digits), torch.tensor(0.5))
    spectrogram = torch.arange(256.0).reshape(1, 1, 16, 16)
    # a 15 x 15 centre crop starts at row 0, column 0 ((16 - 15) // 2 = 0)
    assert torch.equal(jigsaw_tiles(spectrogram)[0, 4, 0], spectrogram[0, 0, 5:10, 5:10])
    frames = torch.randn(1, 2, 3, 224, 224)  # (B, T, C, H, W)
    tiles = jigsaw_tiles(frames)
    assert tiles.shape == (1, 9, 2, 3, 74, 74)
    assert torch.equal(tiles[0, 0], frames[0, :, :, 1:75, 1:75])
    assert torch.equal(tiles[0, 8], frames[0, :, :, 149:223, 149:223])


def test_shuffle_tiles_by_hand():
    tiles = torch.arange(2 * 3, dtype=torch.float32).reshape(2, 3, 1) * 10  # sample b, tile i holds 10 (3b + i)
    permutations = torch.tensor([[0, 1, 2], [2, 0, 1]])
    out = shuffle_tiles(tiles, permutations, torch.tensor([1, 0]))
    assert out[0, :, 0].tolist() == [20, 0, 10]
    assert out[1, :, 0].tolist() == [30, 40, 50]


def test_jigsaw_scores_frames_through_a_resnet_trunk():
    from poise.data.base import ModalitySpec
    from poise.models.resnet import ResNet18Encoder

    encoder = ResNet18Encoder(ModalitySpec("frames", (1, 3, 224, 224)), 16)
    head = JigsawHead(16, 9, 4)
    perms = jigsaw_permutations(4, 9, seed=0)
    logits = jigsaw_logits(encoder, head, torch.randn(2, 1, 3, 224, 224), perms, torch.tensor([0, 3]))
    assert logits.shape == (2, 4) and bool(torch.isfinite(logits).all())


# ---- poise pretrain --objective jigsaw ----------------------------------------------------------------
def small_avdigits(**options):
    cfg = fast_config()
    full = load_dataset("avdigits", options, cfg.data)
    splits = DataSplits(full.info, Subset(full.train, range(192)), Subset(full.val, range(64)), full.test)
    return splits, cfg


def test_jigsaw_pretraining_saves_its_permutations_and_loads(tmp_path):
    splits, cfg = small_avdigits()
    summary = run_pretrain(splits, cfg, tmp_path, seed=0, objective="jigsaw", epochs=1)
    saved = json.loads((tmp_path / "pretrain.json").read_text())
    assert saved["permutations"] == jigsaw_permutations(64, 9, seed=0).tolist()
    assert summary["pretrained"] == ["visual", "audio"] and summary["not_pretrained"] == []
    assert all(math.isfinite(e["val_loss"]) for e in summary["history"])
    model = Trainer(splits, make_method("joint"), cfg).build_model()
    assert load_encoders(model, tmp_path) == ["visual", "audio"]


def test_jigsaw_leaves_non_image_encoders_as_initialised_and_says_so(tmp_path):
    splits, cfg = small_avdigits(text=True)
    summary = run_pretrain(splits, cfg, tmp_path, seed=0, objective="jigsaw", epochs=1)
    assert summary["pretrained"] == ["visual", "audio"] and summary["not_pretrained"] == ["text"]
    assert "text left as initialised" in summary["note"]
    torch.manual_seed(0)
    initial = build_model(splits.info, tuple(splits.info.modalities), "concat", **{
        k: v for k, v in cfg.model.model_dump().items() if k in ("feature_dim", "encoders", "encoder_options")})
    saved = torch.load(tmp_path / "encoders.pt", weights_only=True)
    for k, v in initial.encoders["text"].state_dict().items():
        assert torch.equal(saved["text"][k], v)
    assert not all(torch.equal(saved["audio"][k], v) for k, v in initial.encoders["audio"].state_dict().items())


def test_jigsaw_refuses_data_without_an_image_like_modality(tmp_path):
    splits, cfg = synthetic(2)
    with pytest.raises(IncompatibleError, match="needs an image, frame or spectrogram modality"):
        run_pretrain(splits, cfg, tmp_path, seed=0, objective="jigsaw", epochs=1)
