import math

import numpy as np
import pytest
import torch

from poise.config import DataConfig
from poise.data import load_dataset
from poise.errors import ConfigError, DataError


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_vectors_sequences_and_given_split(tmp_path):
    n = 60
    rng = np.random.default_rng(0)
    split = np.array(["train"] * 40 + ["val"] * 10 + ["test"] * 10)
    spec = write_npz(tmp_path / "f.npz", labels=np.arange(n) % 3, split=split,
                     acoustic=rng.normal(size=(n, 5)).astype(np.float32), words=rng.normal(size=(n, 7, 4)))
    splits = load_dataset(spec, {}, DataConfig())
    assert list(splits.info.modalities) == ["acoustic", "words"]
    assert splits.info.modalities["acoustic"].kind == "vector"
    assert splits.info.modalities["words"].kind == "sequence" and splits.info.modalities["words"].shape == (7, 4)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (40, 10, 10)
    assert splits.info.num_classes == 3


def test_npz_without_split_is_stratified_and_disjoint(tmp_path):
    n = 100
    x = np.arange(n, dtype=np.float32).reshape(n, 1).repeat(2, axis=1)
    spec = write_npz(tmp_path / "f.npz", labels=np.arange(n) % 4, a=x, b=x * 2)
    splits = load_dataset(spec, {}, DataConfig(split_seed=5))
    ids = [set(s.inputs["a"][:, 0].long().tolist()) for s in (splits.train, splits.val, splits.test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    assert sum(map(len, ids)) == n
    again = load_dataset(spec, {}, DataConfig(split_seed=5))
    assert set(again.test.inputs["a"][:, 0].long().tolist()) == ids[2]


@pytest.mark.parametrize(
    "arrays,message",
    [
        ({"a": np.zeros((4, 2))}, "has no 'labels' array"),
        ({"labels": np.array([0, 1, 0, 1])}, "no modality arrays"),
        ({"labels": np.array([0, 1, 0, 1]), "a": np.zeros((3, 2))}, "array 'a' has 3 rows but 'labels' has 4"),
        ({"labels": np.array([0, 1, 0, 1]), "a": np.zeros(4)}, "array 'a' must be numeric N x D or N x T x D"),
        ({"labels": np.zeros(4), "a": np.zeros((4, 2))}, "'labels' must be a 1-D integer array"),
        ({"labels": np.array([0, 1, 0, 1]), "a": np.full((4, 2), np.nan)}, "array 'a' contains NaN"),
        ({"labels": np.array([0, 1, 0, 1]), "a": np.zeros((4, 2)), "split": np.array(["train", "dev", "test", "val"])},
         "'split' holds \\['dev'\\]"),
    ],
)
def test_npz_errors_name_the_array(tmp_path, arrays, message):
    spec = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        load_dataset(spec, {}, DataConfig())


def test_npz_missing_or_corrupt_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}", {}, DataConfig())
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(DataError, match="is not a .npz archive"):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}", {}, DataConfig())
    with pytest.raises(ConfigError, match="needs a path"):
        load_dataset("npz", {}, DataConfig())


def test_unknown_dataset_and_option():
    with pytest.raises(ConfigError, match="did you mean 'synthetic'"):
        load_dataset("synthtic", {}, DataConfig())
    with pytest.raises(ConfigError, match="unknown config key 'dataset.num_sample'"):
        load_dataset("synthetic", {"num_sample": 10}, DataConfig())


def test_synthetic_signal_knob_orders_modalities():
    from conftest import synthetic

    splits, _ = synthetic(2)
    assert splits.info.modalities["audio"].shape == (8,)
    # class-mean separation grows with the signal knob
    def separation(m):
        x, y = splits.train.inputs[m].numpy(), splits.train.labels.numpy()
        means = np.stack([x[y == c].mean(0) for c in range(4)])
        return np.linalg.norm(means - means.mean(0), axis=1).mean()

    assert separation("audio") > separation("visual")


def test_missing_rate_applies_per_split():
    """Each modality is drawn missing with probability r, and a sample that lost every modality gets one
    back at random: per modality r - r^M / M is missing (two modalities: 0.4 -> 0.32, 0.1 -> 0.095)."""
    options = {"num_samples": 4000, "modalities": {"audio": {"dim": 2}, "visual": {"dim": 2}}}
    splits = load_dataset("synthetic", options, DataConfig(missing_rate=0.4, missing_rate_test=0.1))
    for s, rate in ((splits.train, 0.4), (splits.val, 0.4), (splits.test, 0.1)):
        present = s.present
        expected = rate - rate**2 / 2
        n = present.shape[0]
        tolerance = 4 * math.sqrt(expected * (1 - expected) / n)  # four standard deviations
        for j in range(2):
            assert abs(float((~present[:, j]).float().mean()) - expected) < tolerance, (n, rate, j)
        assert present.any(dim=1).all()  # never every modality of a sample
        # both missing was drawn with probability r^2; those samples keep exactly one modality
        one_left = float((present.sum(1) == 1).float().mean())
        assert abs(one_left - 2 * rate * (1 - rate) - rate**2) < 4 * math.sqrt(0.25 / n)
    assert not torch.equal(splits.train.present[: len(splits.val)], splits.val.present)  # one draw per split
    clean = load_dataset("synthetic", options, DataConfig(missing_rate=0.4, missing_rate_test=0.0))
    assert bool(clean.test.present.all())
