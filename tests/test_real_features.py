"""Real feature files: per-feature standardisation fitted on the training split, class lists, splits too
small to train on, and modalities that learn nothing."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from poise.bench import method_options, run_config, splits_for
from poise.cli import main
from poise.config import DataConfig
from poise.data import load_dataset
from poise.errors import DataError, PoiseError
from poise.methods.registry import make_method
from poise.train.trainer import Trainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from feature_scale import write_feature_file  # noqa: E402

QUIET = {"progress": False, "tensorboard": False}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def npz(path, **arrays):
    np.savez(path, **arrays)
    return f"npz:{path}"


# ---- standardisation --------------------------------------------------------------------------------------
def test_statistics_come_from_the_training_split_alone_and_match_numpy(tmp_path):
    rng = np.random.default_rng(0)
    n = 40
    split = np.array(["train"] * 20 + ["val"] * 10 + ["test"] * 10)
    vec = rng.normal(3.0, 2.0, (n, 3)) * np.array([1.0, 1e4, 1e-3])
    vec[:, 2] = 7.0  # a constant feature keeps scale 1
    vec[20:] += 1e6  # validation and test rows far away: they must not move the statistics
    seq = rng.normal(-5.0, 10.0, (n, 4, 2))
    labels = np.arange(n) % 2
    spec = npz(tmp_path / "f.npz", labels=labels, split=split, vec=vec.astype(np.float32), seq=seq.astype(np.float32))
    cfg = run_config(spec)
    assert cfg.data.standardize is True  # on by default for npz
    splits = load_dataset(spec, {}, cfg.data)
    train_vec = vec[:20].astype(np.float32).astype(np.float64)
    mean, std = train_vec.mean(0), train_vec.std(0)  # population std, as StandardScaler
    std[2] = 1.0
    stats = splits.standardization
    assert np.allclose(stats["vec"]["mean"], mean, rtol=1e-6) and np.allclose(stats["vec"]["std"], std, rtol=1e-6)
    train_seq = seq[:20].astype(np.float32).astype(np.float64).reshape(-1, 2)  # over samples and time steps
    assert np.allclose(stats["seq"]["mean"], train_seq.mean(0), rtol=1e-6)
    assert np.allclose(stats["seq"]["std"], train_seq.std(0), rtol=1e-6)
    x = splits.train.inputs["vec"].double().numpy()
    assert np.allclose(x[:, :2].mean(0), 0, atol=1e-5) and np.allclose(x[:, :2].std(0), 1, atol=1e-5)
    assert np.allclose(x[:, 2], 0)
    by_hand = (vec[20:30].astype(np.float32) - mean) / std
    assert np.allclose(splits.val.inputs["vec"].numpy(), by_hand, rtol=1e-5)
    # off: the features as they come
    raw = load_dataset(spec, {}, DataConfig(standardize=False))
    assert raw.standardization is None and torch.equal(raw.val.inputs["vec"], torch.from_numpy(vec[20:30].astype(np.float32)))
    # given statistics are applied as they are, not fitted again
    shifted = {m: {"mean": [v + 1 for v in s["mean"]], "std": s["std"]} for m, s in stats.items()}
    again = load_dataset(spec, {}, cfg.data, shifted)
    assert torch.allclose(again.train.inputs["vec"][:, :2], splits.train.inputs["vec"][:, :2] - 1 / torch.tensor(std[:2]).float(),
                          atol=1e-4)


def test_missing_modalities_stay_zero_after_standardisation(tmp_path):
    rng = np.random.default_rng(1)
    spec = npz(tmp_path / "f.npz", labels=np.arange(200) % 2, a=(rng.normal(size=(200, 3)) + 50).astype(np.float32),
               b=rng.normal(size=(200, 3)).astype(np.float32))
    splits = load_dataset(spec, {}, DataConfig(standardize=True, missing_rate=0.4))
    for ds in (splits.train, splits.val, splits.test):
        gone = ~ds.present[:, 0]
        assert gone.any() and torch.equal(ds.inputs["a"][gone], torch.zeros(int(gone.sum()), 3))
    # the statistics come from every training sample (the masks are drawn after the fit)
    full = load_dataset(spec, {}, DataConfig(standardize=True))
    assert splits.standardization == full.standardization


def test_standardize_on_a_dataset_without_vector_features_is_refused(tmp_path):
    from poise.data.base import DatasetInfo, DataSplits, ModalitySpec, TensorMultimodalDataset
    from poise.data.standardize import standardize_splits

    ds = TensorMultimodalDataset({"img": torch.zeros(4, 1, 2, 2)}, torch.tensor([0, 1, 0, 1]))
    splits = DataSplits(DatasetInfo("x", {"img": ModalitySpec("image", (1, 2, 2))}, 2), ds, ds, ds)
    with pytest.raises(DataError, match="applies to vector and sequence features.*img \\(image\\)"):
        standardize_splits(splits)


@pytest.mark.parametrize("method", ["joint", "ogm_ge", "gblend", "mla"])
def test_a_modality_in_the_thousands_trains_well_above_chance(tmp_path, method):
    spec = f"npz:{write_feature_file(tmp_path / 'f.npz')}"  # 'large' = informative features x 1e4 + 5e4
    cfg = run_config(spec, set_layer={"trainer": {"epochs": 8, **QUIET}})
    result = Trainer(splits_for(spec, cfg), make_method(method, method_options(cfg, method)), cfg, seed=0).fit()
    # chance is 0.25 (4 balanced classes); without standardisation: 0.25 or a non-finite stop
    assert result.test["probe_accuracy"]["large"] > 0.8
    assert result.test["unimodal_accuracy"]["large"] > 0.5
    assert not result.notes


def test_non_finite_stop_names_the_feature_scale(tmp_path):
    spec = f"npz:{write_feature_file(tmp_path / 'f.npz')}"
    cfg = run_config(spec, set_layer={"trainer": {"epochs": 2, **QUIET}, "data": {"standardize": False}})
    with pytest.raises(PoiseError, match=r"inputs of modality 'large' reach \|x\| = .*unscaled features are a likely "
                                         r"cause \(set data.standardize=true"):
        Trainer(splits_for(spec, cfg), make_method("ogm_ge"), cfg, seed=0).fit()


def test_eval_and_resume_apply_the_statistics_stored_with_the_run(tmp_path):
    path = write_feature_file(tmp_path / "f.npz")
    spec = f"npz:{path}"
    out = tmp_path / "run"
    assert main(["train", "--dataset", spec, "--method", "joint", "--out", str(out), "--set", "trainer.epochs=2",
                 "--set", "trainer.tensorboard=false", "--set", "trainer.probe=false"]) == 0
    run = json.loads((out / "run.json").read_text())
    result = json.loads((out / "result.json").read_text())
    fitted = splits_for(spec, run_config(spec)).standardization
    assert run["standardization"] == fitted
    # the training rows of the file change after training: eval still standardises as the run did, so it
    # scores the unchanged test rows exactly as training did
    from poise.runs import _cached_splits
    from poise.data.base import stratified_split

    with np.load(path) as f:
        arrays = dict(f)
    train_rows, _, test_rows = stratified_split(arrays["labels"], (0.8 * 0.85, 0.8 * 0.15, 0.2), 0)
    arrays["large"][train_rows] *= 3
    np.savez(path, **arrays)
    _cached_splits.cache_clear()
    assert splits_for(spec, run_config(spec)).standardization != fitted
    assert main(["eval", str(out), "--no-drop-each"]) == 0
    scored = json.loads((out / "eval_test.json").read_text())["results"][0]
    assert scored["accuracy"] == result["test"]["accuracy"]
    # resume: train_one reads the stored statistics back
    from poise.train.run_files import stored_statistics

    assert stored_statistics(out) == fitted
    # the library API refuses to resume on splits standardised otherwise
    from poise.errors import ConfigError

    cfg = run_config(spec, set_layer={"trainer": {"epochs": 2, "tensorboard": False, "probe": False}})
    with pytest.raises(ConfigError, match="standardised with other statistics than those in"):
        Trainer(splits_for(spec, cfg), make_method("joint"), cfg, out_dir=out, resume=True).fit()
    again = Trainer(splits_for(spec, cfg, fitted), make_method("joint"), cfg, out_dir=out, resume=True).fit()
    assert again.best_epoch == result["best_epoch"]
    _cached_splits.cache_clear()


# ---- class lists ----------------------------------------------------------------------------------------
def vectors(n):
    return np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)


@pytest.mark.parametrize(
    "labels,message",
    [
        (np.array([1, 2, 3, 4] * 5), r"labels' must be the contiguous classes 0..C-1, but label 0 never occurs below the largest label 4"),
        (np.array([0, 1, 2] * 5 + [1000]), r"but labels 3..999 never occur below the largest label 1000"),
        (np.array([0, 2] * 5), r"but label 1 never occurs"),
        (np.array([0, -1] * 5), r"found negative labels -1"),
        (np.zeros(10, dtype=int), "every label is 0"),
        (np.zeros(0, dtype=int), "holds no samples"),
    ],
)
def test_class_count_is_never_guessed(tmp_path, labels, message):
    spec = npz(tmp_path / "f.npz", labels=labels, a=vectors(len(labels)))
    with pytest.raises(DataError, match=message):
        load_dataset(spec, {}, DataConfig())


def test_a_classes_array_names_the_classes(tmp_path):
    labels = np.array([0, 1, 3] * 20)  # class 2 ('dog') has no sample in this file, by the user's say
    spec = npz(tmp_path / "f.npz", labels=labels, a=vectors(60), classes=np.array(["cat", "cow", "dog", "eel"]))
    splits = load_dataset(spec, {}, DataConfig())
    assert splits.info.num_classes == 4 and splits.info.class_names == ("cat", "cow", "dog", "eel")
    assert "classes" not in splits.info.modalities
    bad = npz(tmp_path / "g.npz", labels=np.array([0, 1, 4, 7] * 5), a=vectors(20), classes=np.array(["a", "b", "c"]))
    with pytest.raises(DataError, match=r"labels 4, 7 do not index the 3 names of 'classes'"):
        load_dataset(bad, {}, DataConfig())
    twice = npz(tmp_path / "h.npz", labels=np.array([0, 1] * 5), a=vectors(10), classes=np.array(["a", "a"]))
    with pytest.raises(DataError, match="names 'a' more than once"):
        load_dataset(twice, {}, DataConfig())


def test_splits_with_one_class_or_none_are_refused_before_training(tmp_path):
    split = np.array(["train"] * 8 + ["val"] * 4 + ["test"] * 4)
    labels = np.array([0, 1] * 4 + [0] * 4 + [0, 1] * 2)
    spec = npz(tmp_path / "f.npz", labels=labels, split=split, a=vectors(16))
    cfg = run_config(spec, set_layer={"trainer": QUIET})
    splits = splits_for(spec, cfg)
    with pytest.raises(DataError, match="the val split holds only class 0 \\(4 samples\\)"):
        Trainer(splits, make_method("joint"), cfg)
    tiny = npz(tmp_path / "g.npz", labels=np.array([0, 1, 0, 1, 0, 1]), a=vectors(6))
    cfg = run_config(tiny, set_layer={"trainer": QUIET})
    with pytest.raises(DataError, match="the val split is empty"):
        Trainer(splits_for(tiny, cfg), make_method("joint"), cfg)
    out = tmp_path / "run"
    assert main(["train", "--dataset", tiny, "--method", "joint", "--out", str(out)]) == 2
    assert not out.exists()


# ---- a modality that learns nothing ----------------------------------------------------------------------
def test_a_modality_at_chance_is_reported_with_likely_causes(tmp_path):
    rng = np.random.default_rng(3)
    n = 800
    labels = np.arange(n) % 4
    rng.shuffle(labels)
    prototypes = rng.normal(size=(4, 8)) * 1.5
    signal = (prototypes[labels] + rng.normal(size=(n, 8))).astype(np.float32)
    noise = rng.normal(size=(n, 8)).astype(np.float32)  # no information about the labels
    spec = npz(tmp_path / "f.npz", labels=labels, signal=signal, noise=noise)
    out = tmp_path / "bench"
    assert main(["bench", "--dataset", spec, "--methods", "joint", "--seeds", "0", "--out", str(out),
                 "--set", "trainer.epochs=4", "--set", "trainer.tensorboard=false"]) == 0
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert len(run["notes"]) == 1
    note = run["notes"][0]
    assert note.startswith("modality 'noise' learned nothing: its validation accuracy stayed at chance")
    assert "carries no information about the labels" in note and "compare with unimodal:noise" in note
    assert "data.standardize" not in note  # it is on
    report = (out / "report.md").read_text()
    assert "## Modalities that learned nothing" in report and "`joint` seed 0: modality 'noise' learned nothing" in report
    single = json.loads((out / "runs" / "joint" / "seed0" / "result.json").read_text())
    assert single["notes"] == run["notes"]


def test_chance_level_is_the_majority_share_plus_two_standard_errors():
    from poise.data.base import TensorMultimodalDataset
    from poise.train.trainer import chance_level

    labels = torch.tensor([0] * 60 + [1] * 20 + [2] * 20)
    ds = TensorMultimodalDataset({"a": torch.zeros(100, 1)}, labels)
    chance, limit = chance_level(ds, 3)
    assert chance == pytest.approx(0.6) and limit == pytest.approx(0.6 + 2 * (0.6 * 0.4 / 100) ** 0.5)
