import json
import math

import pytest
import torch

from conftest import synthetic
from poise.errors import ConfigError, DataError, IncompatibleError
from poise.functional.contrastive import cross_modal_info_nce, info_nce, nt_xent
from poise.methods import make_method
from poise.models import build_model
from poise.train import Trainer
from poise.train.pretrain import load_encoders, random_view, run_pretrain


# ---- objectives against naive loops --------------------------------------------------------------------
def naive_info_nce(a, b, t):
    a, b = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    n = len(a)
    total = 0.0
    for i in range(n):
        row = [float(a[i] @ b[j]) / t for j in range(n)]
        col = [float(b[i] @ a[j]) / t for j in range(n)]
        total += -row[i] + math.log(sum(math.exp(v) for v in row))
        total += -col[i] + math.log(sum(math.exp(v) for v in col))
    return total / (2 * n)


def naive_nt_xent(a, b, t):
    z = torch.cat([a, b])
    z = z / z.norm(dim=1, keepdim=True)
    n = len(a)
    total = 0.0
    for i in range(2 * n):
        positive = i + n if i < n else i - n
        others = [float(z[i] @ z[k]) / t for k in range(2 * n) if k != i]
        total += -float(z[i] @ z[positive]) / t + math.log(sum(math.exp(v) for v in others))
    return total / (2 * n)


def test_info_nce_and_nt_xent_match_naive_loops():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    assert math.isclose(float(info_nce(a, b, 0.2)), naive_info_nce(a, b, 0.2), rel_tol=1e-5)
    assert math.isclose(float(nt_xent(a, b, 0.3)), naive_nt_xent(a, b, 0.3), rel_tol=1e-5)
    # aligned pairs score lower than shuffled ones
    assert float(info_nce(a, a + 0.01 * b)) < float(info_nce(a, b))


def test_cross_modal_info_nce_averages_pairs_over_shared_samples():
    g = torch.Generator().manual_seed(1)
    e = {m: torch.randn(6, 3, generator=g, requires_grad=True) for m in ("a", "b", "c")}
    present = {"a": torch.tensor([1, 1, 1, 1, 0, 0]).bool(), "b": torch.tensor([1, 1, 0, 1, 1, 1]).bool(),
               "c": torch.tensor([1, 0, 0, 0, 0, 1]).bool()}
    # pairs: a-b share rows 0, 1, 3; a-c share row 0 only (no negative: skipped); b-c share rows 0, 5
    ab, bc = present["a"] & present["b"], present["b"] & present["c"]
    expected = (info_nce(e["a"][ab], e["b"][ab]) + info_nce(e["b"][bc], e["c"][bc])) / 2
    assert torch.allclose(cross_modal_info_nce(e, present), expected)
    nobody = {m: torch.zeros(6, dtype=torch.bool) for m in e}
    zero = cross_modal_info_nce(e, nobody)
    assert float(zero.detach()) == 0.0 and zero.requires_grad


def test_random_views_differ_and_keep_tokens_in_range():
    x = torch.randn(4, 10)
    assert not torch.equal(random_view(x), random_view(x))
    tokens = torch.randint(1, 9, (4, 50))
    view = random_view(tokens)
    assert view.dtype == tokens.dtype and ((view == tokens) | (view == 0)).all() and (view == 0).any()


def test_a_batch_without_two_shared_samples_gives_no_loss():
    from torch import nn

    from poise.data import DatasetInfo, ModalitySpec, MultimodalBatch
    from poise.train.pretrain import ProjectionHead, pretrain_loss

    info = DatasetInfo("toy", {"a": ModalitySpec("vector", (3,)), "b": ModalitySpec("vector", (2,))}, num_classes=2)
    model = build_model(info, ("a", "b"), "concat", feature_dim=4)
    heads = nn.ModuleDict({m: ProjectionHead(4, 5) for m in ("a", "b")})
    present = torch.tensor([[1, 0], [0, 1], [1, 0], [1, 1]], dtype=torch.bool)  # one sample has both
    batch = MultimodalBatch({"a": torch.randn(4, 3), "b": torch.randn(4, 2)}, torch.zeros(4, dtype=torch.long),
                            present, torch.arange(4))
    assert pretrain_loss(model, heads, batch, "contrastive", 0.1) is None
    assert pretrain_loss(model, heads, batch, "augment", 0.1) is not None  # "a" alone has three samples
    batch.present[1, 0] = True
    assert pretrain_loss(model, heads, batch, "contrastive", 0.1) is not None


# ---- run_pretrain and load_encoders ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    splits, cfg = synthetic(3, missing_rate=0.2, num_samples=300)
    out = tmp_path_factory.mktemp("pretrain")
    summary = run_pretrain(splits, cfg, out, seed=0, epochs=4)
    return splits, cfg, out, summary


def test_contrastive_pretraining_lowers_its_loss_and_writes_the_files(pretrained):
    splits, _, out, summary = pretrained
    losses = [h["train_loss"] for h in summary["history"]]
    assert len(losses) == 4 and losses[-1] < 0.97 * losses[0]
    assert summary["objective"] == "contrastive" and 0 <= summary["best_epoch"] < 4
    assert json.loads((out / "pretrain.json").read_text())["best_epoch"] == summary["best_epoch"]
    saved = torch.load(out / "encoders.pt", weights_only=True)
    assert set(saved) == set(splits.info.modalities)
    assert all(isinstance(v, torch.Tensor) for state in saved.values() for v in state.values())
    assert sorted(p.name for p in out.iterdir()) == ["encoders.pt", "pretrain.json"]  # no temporary left


def test_augment_objective_lowers_its_loss_with_one_modality(tmp_path):
    splits, cfg = synthetic(1, num_samples=200)
    summary = run_pretrain(splits, cfg, tmp_path, seed=0, objective="augment", epochs=3)
    losses = [h["train_loss"] for h in summary["history"]]
    assert losses[-1] < losses[0]
    assert list(torch.load(tmp_path / "encoders.pt", weights_only=True)) == ["audio"]


def test_load_encoders_replaces_the_weights_and_ignores_extra_modalities(pretrained):
    splits, cfg, out, _ = pretrained
    saved = torch.load(out / "encoders.pt", weights_only=True)
    torch.manual_seed(123)
    model = build_model(splits.info, ("audio", "visual"), "concat", feature_dim=cfg.model.feature_dim)
    before = {k: v.clone() for k, v in model.encoders["visual"].state_dict().items()}
    assert load_encoders(model, out) == ["audio", "visual"]  # "text" is in the file, not in the model
    after = model.encoders["visual"].state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for m in ("audio", "visual"):
        for k, v in model.encoders[m].state_dict().items():
            assert torch.equal(v, saved[m][k])


def test_trainer_starts_from_the_pretrained_encoders(pretrained):
    splits, cfg, out, _ = pretrained
    saved = torch.load(out / "encoders.pt", weights_only=True)
    trainer = Trainer(splits, make_method("joint"), cfg, seed=5, init_dir=out)
    trainer.setup()
    for m in splits.info.modalities:
        for k, v in trainer.model.encoders[m].state_dict().items():
            assert torch.equal(v, saved[m][k])
    assert math.isfinite(Trainer(splits, make_method("joint"), cfg, seed=5, init_dir=out).fit().test["accuracy"])


def test_bad_encoder_files_give_clear_errors(pretrained, tmp_path):
    splits, cfg, out, _ = pretrained
    model = build_model(splits.info, tuple(splits.info.modalities), "concat", feature_dim=cfg.model.feature_dim)
    with pytest.raises(ConfigError, match="nowhere"):
        load_encoders(model, tmp_path / "nowhere")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00not torch")
    with pytest.raises(DataError, match="garbage.pt"):
        load_encoders(model, garbage)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(DataError, match="list.pt"):
        load_encoders(model, tmp_path / "list.pt")
    saved = torch.load(out / "encoders.pt", weights_only=True)
    partial = tmp_path / "partial"
    partial.mkdir()
    torch.save({"audio": saved["audio"], "visual": saved["visual"]}, partial / "encoders.pt")
    with pytest.raises(DataError, match=r"encoders\.pt.*'text'"):
        load_encoders(model, partial)
    # a model with another feature size: refused before any weight is copied
    wide = build_model(splits.info, tuple(splits.info.modalities), "concat", feature_dim=cfg.model.feature_dim + 3)
    before = {m: {k: v.clone() for k, v in wide.encoders[m].state_dict().items()} for m in wide.modalities}
    with pytest.raises(DataError, match=r"encoders\.pt.*'audio'.*shape"):
        load_encoders(wide, out)
    for m in wide.modalities:
        assert all(torch.equal(v, before[m][k]) for k, v in wide.encoders[m].state_dict().items())


def test_bad_pretraining_requests_are_refused(tmp_path):
    splits, cfg = synthetic(1, num_samples=100)
    with pytest.raises(IncompatibleError, match="augment"):
        run_pretrain(splits, cfg, tmp_path, seed=0)
    with pytest.raises(ConfigError, match="contrastive"):
        run_pretrain(splits, cfg, tmp_path, seed=0, objective="masked")
    assert not (tmp_path / "encoders.pt").exists()


def test_pretrain_refuses_to_run_under_torchrun(tmp_path, monkeypatch, capsys):
    from poise.cli import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["pretrain", "--dataset", "synthetic", "--out", str(tmp_path / "p")]) == 2
    assert "poise pretrain runs in one process" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()
