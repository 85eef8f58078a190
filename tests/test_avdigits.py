"""The built-in avdigits dataset: real images, shipped spoken digits, class pairing, disjoint splits,
options, and (slow) the modality imbalance its defaults are tuned to show."""

from __future__ import annotations

import statistics
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

from poise.config import DataConfig
from poise.data import load_dataset
from poise.data.avdigits import (
    AVDIGITS_DEFAULTS,
    DIGIT_WORDS,
    WORD_LENGTH,
    encode_words,
    load_audio_asset,
    load_digit_images,
    pool_spectrograms,
)
from poise.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[1]


def splits(**options):
    return load_dataset("avdigits", options, DataConfig())


def test_asset_is_compact_and_its_generator_is_shipped():
    asset = resources.files("poise.data") / "assets" / "avdigits_audio.npz"
    with resources.as_file(asset) as path:
        assert path.stat().st_size <= 5 * 2**20
    assert (ROOT / "scripts" / "make_avdigits_audio.py").is_file()
    arrays = load_audio_asset()
    n = len(arrays["labels"])
    assert arrays["log_mel"].shape == (n, 32, 32) and arrays["log_mel"].dtype == np.uint8
    assert len(arrays["voice_names"]) == 400 and set(np.unique(arrays["voice"])) == set(range(400))
    # every voice says every digit
    assert n == 400 * 10 and set(np.unique(arrays["labels"])) == set(range(10))


def test_images_are_the_real_scikit_learn_digits():
    from sklearn.datasets import load_digits

    images, labels = load_digit_images()
    digits = load_digits()
    assert images.shape == (1797, 1, 8, 8)
    np.testing.assert_allclose(images.reshape(1797, 64), digits.data / 16.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(labels, digits.target)


def test_shapes_sizes_and_labels():
    s = splits()
    assert s.info.modalities == {"visual": s.info.modalities["visual"], "audio": s.info.modalities["audio"]}
    assert s.info.num_classes == 10 and s.info.class_names == DIGIT_WORDS
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    inputs, label, present, index = s.train[0]
    assert inputs["visual"].shape == (1, 8, 8) and inputs["audio"].shape == (1, 16, 16)
    assert present.all() and 0 <= int(label) < 10


def test_splits_share_no_image_and_no_voice_and_pairs_are_within_class():
    s = splits()
    images = {k: set(v.tolist()) for k, v in s.notes["image_index"].items()}
    voices = {k: set(v.tolist()) for k, v in s.notes["voice"].items()}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not images[a] & images[b], f"{a} and {b} share images"
        assert not voices[a] & voices[b], f"{a} and {b} share voices"
    # each split uses many voices (voices split as well as images)
    assert all(len(v) > 30 for v in voices.values())
    utterance_labels = load_audio_asset()["labels"]
    _, image_labels = load_digit_images()
    for name in ("train", "val", "test"):
        ds = s.split(name)
        labels = np.array([int(ds[i][1]) for i in range(len(ds))])
        np.testing.assert_array_equal(labels, image_labels[s.notes["image_index"][name]])
        np.testing.assert_array_equal(labels, utterance_labels[s.notes["utterance_index"][name]])


def test_audio_input_is_the_pooled_utterance_plus_its_noise():
    s = splits(audio_noise=0.0, visual_noise=0.0)
    asset = load_audio_asset()
    to_unit = float(asset["db_scale"]) / -float(asset["db_offset"])  # uint8 -> dB -> [0, 1]
    rows = s.notes["utterance_index"]["test"][:5]
    expected = pool_spectrograms(asset["log_mel"][rows].astype(np.float32) * to_unit, 2)
    got = np.stack([s.test[i][0]["audio"][0].numpy() for i in range(5)])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    images, _ = load_digit_images()
    np.testing.assert_array_equal(s.test[0][0]["visual"].numpy(), images[s.notes["image_index"]["test"][0]])
    assert 0.0 <= expected.min() and expected.max() <= 1.0


def test_noise_levels_are_options_and_the_split_seed_fixes_everything():
    clean, noisy = splits(visual_noise=0.0, audio_noise=0.0), splits(visual_noise=0.5, audio_noise=0.0)
    diff = noisy.train[0][0]["visual"] - clean.train[0][0]["visual"]
    assert 0.3 < float(diff.std()) < 0.7
    assert torch.equal(noisy.train[0][0]["audio"], clean.train[0][0]["audio"])  # one stream per purpose
    again = splits(visual_noise=0.5, audio_noise=0.0)
    assert torch.equal(again.train[3][0]["visual"], noisy.train[3][0]["visual"])
    other = load_dataset("avdigits", {}, DataConfig(split_seed=1))
    assert not np.array_equal(other.notes["image_index"]["test"], splits().notes["image_index"]["test"])


def test_text_modality_is_the_corrupted_word():
    s = splits(text=True, text_noise=0.0)
    assert set(s.info.modalities) == {"visual", "audio", "text"}
    inputs, label, _, _ = s.test[0]
    word = DIGIT_WORDS[int(label)]
    letters = "".join(chr(ord("a") + int(t) - 1) for t in inputs["text"] if int(t) > 0)
    assert inputs["text"].shape == (WORD_LENGTH,) and letters == word
    # corruption rate: the share of letters replaced, counted over many words
    rng = np.random.default_rng(0)
    labels = np.arange(2000) % 10
    clean = encode_words(labels, 0.0, rng)
    noisy = encode_words(labels, 0.5, rng)
    letters = clean > 0
    changed = (noisy != clean)[letters].mean()
    assert 0.45 < changed < 0.5  # 0.5 of the letters redrawn, 1/26 of them redrawn as themselves
    assert np.array_equal(noisy == 0, clean == 0)  # padding stays padding


@pytest.mark.parametrize("options, message", [
    ({"audio_pool": 3}, "audio_pool"),
    ({"visual_noise": -1}, "visual_noise"),
    ({"colour": 1}, "colour"),
])
def test_bad_options_name_the_option(options, message):
    with pytest.raises(ConfigError, match=message):
        splits(**options)


def test_takes_no_path_argument():
    with pytest.raises((DataError, ConfigError), match="takes no argument"):
        load_dataset("avdigits:somewhere", {}, DataConfig())


@pytest.mark.slow
def test_defaults_show_the_imbalance_of_the_seed_papers():
    """Under joint training, the weak modality's encoder (frozen linear probe) is at least 10 points
    below the same encoder trained alone, mean of 3 seeds; each modality alone is informative but
    imperfect."""
    from poise.bench import run_config, splits_for
    from poise.methods import make_method
    from poise.train import Trainer

    cfg = run_config("avdigits", {}, {"trainer": {"progress": False, "tensorboard": False}})
    data = splits_for("avdigits", cfg)
    probe: dict[str, dict[str, list[float]]] = {"joint": {"visual": [], "audio": []}, "alone": {"visual": [], "audio": []}}
    alone_accuracy = {"visual": [], "audio": []}
    for seed in (0, 1, 2):
        joint = Trainer(data, make_method("joint"), cfg, seed=seed).fit()
        for m in ("visual", "audio"):
            probe["joint"][m].append(joint.test["probe_accuracy"][m])
            alone = Trainer(data, make_method(f"unimodal:{m}"), cfg, seed=seed).fit()
            probe["alone"][m].append(alone.test["probe_accuracy"][m])
            alone_accuracy[m].append(alone.test["accuracy"])
    gaps = {m: statistics.mean(probe["alone"][m]) - statistics.mean(probe["joint"][m]) for m in ("visual", "audio")}
    weak = max(gaps, key=gaps.get)
    assert gaps[weak] >= 0.10, gaps
    for m, acc in alone_accuracy.items():
        assert 0.3 < statistics.mean(acc) < 0.97, (m, acc)
    assert AVDIGITS_DEFAULTS["trainer"]["epochs"] == cfg.trainer.epochs
