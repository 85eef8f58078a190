import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from conftest import synthetic
from poise.data.base import DataSplits
from poise.errors import ConfigError, DataError, IncompatibleError
from poise.functional.teachers import ensemble_logits, feature_distillation_losses
from poise.methods import make_method
from poise.methods import teachers as teachers_module
from poise.train import Trainer


# ---- functional --------------------------------------------------------------------------------------
def test_feature_distillation_matches_naive_loop_over_present_samples():
    g = torch.Generator().manual_seed(0)
    h = {"a": torch.randn(5, 3, generator=g, requires_grad=True), "b": torch.randn(5, 2, generator=g)}
    t = {"a": torch.randn(5, 3, generator=g), "b": torch.randn(5, 2, generator=g)}
    present = {"a": torch.tensor([True, False, True, True, False]), "b": torch.ones(5, dtype=torch.bool)}
    losses = feature_distillation_losses(h, t, present)
    for m in h:
        total, count = 0.0, 0
        for i in range(5):
            if present[m][i]:
                for j in range(h[m].shape[1]):
                    total += float(h[m][i, j].detach() - t[m][i, j]) ** 2
                    count += 1
        assert math.isclose(float(losses[m].detach()), total / count, rel_tol=1e-5)
    losses["a"].backward()
    assert torch.all(h["a"].grad[~present["a"]] == 0) and torch.any(h["a"].grad[present["a"]] != 0)


def test_feature_distillation_without_present_samples_is_a_zero_with_graph():
    h = {"a": torch.randn(3, 2, requires_grad=True)}
    loss = feature_distillation_losses(h, {"a": torch.randn(3, 2)}, {"a": torch.zeros(3, dtype=torch.bool)})["a"]
    assert float(loss.detach()) == 0.0 and loss.requires_grad


def test_ensemble_logits_and_probabilities_match_naive_loops():
    g = torch.Generator().manual_seed(1)
    z = {m: torch.randn(4, 3, generator=g) for m in ("a", "b", "c")}
    present = torch.tensor([[1, 1, 1], [1, 0, 1], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    mean_logits = ensemble_logits(z, present, "logits")
    log_mean_probs = ensemble_logits(z, present, "probs")
    names = list(z)
    for i in range(4):
        used = [m for j, m in enumerate(names) if present[i, j]] or names  # nobody present: everyone
        expected_logits = sum(z[m][i] for m in used) / len(used)
        expected_probs = sum(torch.softmax(z[m][i], 0) for m in used) / len(used)
        assert torch.allclose(mean_logits[i], expected_logits, atol=1e-6)
        assert torch.allclose(log_mean_probs[i].exp(), expected_probs, atol=1e-6)
    assert torch.allclose(log_mean_probs.exp().sum(1), torch.ones(4), atol=1e-6)
    # the sum over present members picks the same class as the mean
    summed = torch.stack([z[m] * present[:, j, None] for j, m in enumerate(names)]).sum(0)
    assert torch.equal(summed[:3].argmax(1), mean_logits[:3].argmax(1))
    with pytest.raises(ValueError, match="combine must be 'logits' or 'probs', got 'votes'"):
        ensemble_logits(z, present, "votes")


# ---- UMT -----------------------------------------------------------------------------------------------
class NoTest(Dataset):
    """Stands in for a test split that nothing may read during setup."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        raise AssertionError("the test split was read")


def without_test(splits: DataSplits) -> DataSplits:
    return DataSplits(splits.info, splits.train, splits.val, NoTest())


@pytest.mark.parametrize("name", ["umt", "ume"])
def test_refuses_one_modality(name):
    splits, cfg = synthetic(1)
    with pytest.raises(IncompatibleError, match=name):
        Trainer(splits, make_method(name), cfg)


def test_umt_loss_is_ce_plus_weighted_mse_to_frozen_teachers_and_never_reads_test():
    splits, cfg = synthetic(2, missing_rate=0.3, num_samples=200)
    method = make_method("umt", {"distill_weight": 2.5})
    trainer = Trainer(without_test(splits), method, cfg, seed=0)
    ctx = trainer.setup()  # trains both teachers
    assert set(method.teachers) == {"audio", "visual"}
    for teacher in method.teachers.values():
        assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
        assert all(p is not q for p in teacher.parameters() for q in ctx.model.parameters())
    records = method.pop_records()
    assert records["teacher_val_accuracy/audio"] > 0.35  # the strong modality alone: chance is 0.25
    batch = next(iter(trainer.train_loader))
    output = ctx.model(batch)
    terms = method.loss(output, batch)
    assert torch.allclose(terms["ce"], F.cross_entropy(output.logits, batch.labels))
    for m in ("audio", "visual"):
        rows = batch.present_of(m)
        assert not rows.all()
        expected = 2.5 * F.mse_loss(output.features[m][rows], method.teachers[m](batch.inputs[m])[rows])
        assert torch.allclose(terms[f"distill/{m}"], expected)
    # gradients of the distillation reach the student's encoders, never the teachers
    terms["distill/visual"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in ctx.model.modality_parameters("visual"))
    assert all(p.grad is None for p in method.teachers["visual"].parameters())


@pytest.mark.parametrize(("num_modalities", "missing_rate"), [(2, 0.0), (3, 0.3)])
def test_umt_trains_and_pulls_features_towards_the_teachers(num_modalities, missing_rate):
    splits, cfg = synthetic(num_modalities, missing_rate=missing_rate, num_samples=200)
    result = Trainer(splits, make_method("umt", {"distill_weight": 5.0}), cfg, seed=0).fit()
    terms = [h["train_terms"] for h in result.history]
    for m in splits.info.modalities:
        assert terms[-1][f"distill/{m}"] < terms[0][f"distill/{m}"]
    assert set(result.history[0]["method"]) == {f"teacher_val_accuracy/{m}" for m in splits.info.modalities}
    assert math.isfinite(result.test["accuracy"])


@pytest.fixture(scope="module")
def unimodal_checkpoints(tmp_path_factory):
    """best.pt files of `unimodal:<m>` runs (concat fusion, the unimodal baseline's default)."""
    splits, cfg = synthetic(2, num_samples=200)
    paths = {}
    for m in splits.info.modalities:
        out = tmp_path_factory.mktemp(m)
        Trainer(splits, make_method(f"unimodal:{m}"), cfg, seed=0, out_dir=out).fit()
        paths[m] = out / "best.pt"
    return paths


def test_teacher_checkpoints_are_loaded_and_the_rest_trained(unimodal_checkpoints, monkeypatch):
    trained = []
    real = teachers_module.train_unimodal_model
    monkeypatch.setattr(teachers_module, "train_unimodal_model",
                        lambda ctx, m, epochs: trained.append(m) or real(ctx, m, epochs))
    splits, cfg = synthetic(2, num_samples=200)
    method = make_method("umt", {"teacher_checkpoints": {"audio": str(unimodal_checkpoints["audio"])}})
    Trainer(splits, method, cfg, seed=0).setup()
    assert trained == ["visual"]
    saved = torch.load(unimodal_checkpoints["audio"], weights_only=True)["model"]
    for key, value in method.teachers["audio"].state_dict().items():
        assert torch.equal(value, saved[f"encoders.audio.{key}"])


def test_bad_teacher_checkpoints_give_clear_errors(unimodal_checkpoints, tmp_path):
    splits, cfg = synthetic(2, num_samples=200)
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(ConfigError, match="nowhere.pt"):
        Trainer(splits, make_method("umt", {"teacher_checkpoints": {"audio": str(missing)}}), cfg)
    with pytest.raises(ConfigError, match="audoi"):
        Trainer(splits, make_method("umt", {"teacher_checkpoints": {"audoi": str(unimodal_checkpoints["audio"])}}), cfg)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    wrong_modality = {"audio": str(unimodal_checkpoints["visual"])}
    saved = torch.load(unimodal_checkpoints["audio"], weights_only=True)
    saved["model"]["encoders.audio.net.1.weight"] = torch.zeros(3, 3)
    bad_shape = tmp_path / "bad_shape.pt"
    torch.save(saved, bad_shape)
    for options, pattern in [({"audio": str(garbage)}, "garbage.pt"), (wrong_modality, "visual"),
                             ({"audio": str(bad_shape)}, "bad_shape.pt")]:
        method = make_method("umt", {"teacher_checkpoints": options, "teacher_epochs": 1})
        with pytest.raises(DataError, match=pattern):
            Trainer(splits, method, cfg, seed=0).setup()


# ---- UME -----------------------------------------------------------------------------------------------
def test_ume_refuses_a_fusion_other_than_sum():
    splits, cfg = synthetic(2, model={"fusion": "concat"})
    with pytest.raises(IncompatibleError, match="sum"):
        Trainer(splits, make_method("ume"), cfg)


@pytest.mark.parametrize(("num_modalities", "missing_rate", "combine"), [(2, 0.0, "logits"), (3, 0.3, "probs")])
def test_ume_is_the_frozen_ensemble_of_its_members(num_modalities, missing_rate, combine, monkeypatch):
    members = {}
    real = teachers_module.unimodal_models

    def keep(*args, **kwargs):
        members.update(real(*args, **kwargs))
        return members

    monkeypatch.setattr(teachers_module, "unimodal_models", keep)
    splits, cfg = synthetic(num_modalities, missing_rate=missing_rate, num_samples=200)
    method = make_method("ume", {"combine": combine})
    trainer = Trainer(splits, method, cfg, seed=0)
    result = trainer.fit()
    model = trainer.model
    # the model's encoders and heads are the members', untouched by the trainer's epochs
    for m, member in members.items():
        for key, value in member.encoders[m].state_dict().items():
            assert torch.equal(model.encoders[m].state_dict()[key], value)
        assert torch.equal(model.fusion.fc[m].weight, member.fusion.fc[m].weight)
    assert len({h["val"]["accuracy"] for h in result.history}) == 1
    # the fused accuracy is the ensemble's over the present members; each unimodal accuracy a member's own
    loader = trainer.make_loader(splits.test, False)
    correct, total, member_correct, member_total = 0, 0, dict.fromkeys(members, 0), dict.fromkeys(members, 0)
    with torch.no_grad():
        for batch in loader:
            z = {m: member(batch).logits for m, member in members.items()}
            present = torch.stack([batch.present_of(m) for m in members], 1)
            correct += int((ensemble_logits(z, present, combine).argmax(1) == batch.labels).sum())
            total += len(batch)
            for j, m in enumerate(members):
                rows = present[:, j]
                member_correct[m] += int((z[m][rows].argmax(1) == batch.labels[rows]).sum())
                member_total[m] += int(rows.sum())
    assert math.isclose(result.test["accuracy"], correct / total, abs_tol=1e-6)
    for m in members:
        assert math.isclose(result.test["unimodal_accuracy"][m], member_correct[m] / member_total[m], abs_tol=1e-6)


def test_ume_loads_members_from_unimodal_checkpoints(unimodal_checkpoints):
    splits, cfg = synthetic(2, num_samples=200)
    checkpoints = {m: str(p) for m, p in unimodal_checkpoints.items()}
    trainer = Trainer(splits, make_method("ume", {"member_checkpoints": checkpoints}), cfg, seed=0)
    trainer.setup()
    for m, path in unimodal_checkpoints.items():
        saved = torch.load(path, weights_only=True)["model"]
        assert torch.equal(trainer.model.fusion.fc[m].weight, saved["fusion.fc.weight"])  # concat head, one modality
        assert torch.equal(trainer.model.fusion.fc[m].bias, saved["fusion.fc.bias"])
