import pytest
import torch
import torch.nn.functional as F

from poise.data import DATASETS, DatasetInfo, ModalitySpec, MultimodalBatch, collate
from poise.data.base import TensorMultimodalDataset, missing_mask, stratified_split
from poise.errors import ConfigError, IncompatibleError
from poise.methods import METHODS, Method
from poise.models import ENCODERS, FUSIONS, build_model
from poise.models.fusion import ConcatFusion, SumFusion
from poise.registry import Registry

INFO = DatasetInfo(
    "toy",
    {"audio": ModalitySpec("spectrogram", (1, 12, 10)), "visual": ModalitySpec("image", (1, 8, 8)),
     "feat": ModalitySpec("vector", (5,)), "seq": ModalitySpec("sequence", (4, 3)),
     "text": ModalitySpec("tokens", (6,), vocab_size=11)},
    num_classes=3,
)


def toy_batch(modalities, b=4, present=None):
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for m in modalities:
        spec = INFO.modalities[m]
        if spec.kind == "tokens":
            inputs[m] = torch.randint(0, spec.vocab_size, (b, *spec.shape), generator=g)
        else:
            inputs[m] = torch.randn(b, *spec.shape, generator=g)
    if present is None:
        present = torch.ones(b, len(modalities), dtype=torch.bool)
    return MultimodalBatch(inputs, torch.arange(b) % 3, present, torch.arange(b))


def test_collate_builds_batch_with_mask_and_index():
    ds = TensorMultimodalDataset({"a": torch.randn(5, 2), "b": torch.randn(5, 3)}, torch.tensor([0, 1, 2, 0, 1]))
    batch = collate([ds[i] for i in (4, 1)])
    assert batch.modalities == ("a", "b")
    assert batch.inputs["a"].shape == (2, 2) and batch.inputs["b"].shape == (2, 3)
    assert batch.labels.tolist() == [1, 1]
    assert batch.index.tolist() == [4, 1]
    assert batch.present.dtype == torch.bool and batch.present.all()


def test_missing_inputs_are_zero_filled():
    x = torch.ones(3, 2)
    present = torch.tensor([[True, True], [False, True], [True, False]])
    ds = TensorMultimodalDataset({"a": x, "b": x.clone()}, torch.zeros(3, dtype=torch.long), present)
    assert ds.inputs["a"][1].abs().sum() == 0 and ds.inputs["a"][0].abs().sum() > 0
    assert ds.inputs["b"][2].abs().sum() == 0


def test_missing_mask_never_drops_every_modality():
    mask = missing_mask(2000, 2, 0.6, seed=3)
    assert mask.any(dim=1).all()
    assert 0.3 < (~mask).float().mean() < 0.6
    assert torch.equal(mask, missing_mask(2000, 2, 0.6, seed=3))


def test_stratified_split_is_disjoint_and_covers_everything():
    import numpy as np

    labels = np.arange(100) % 4
    parts = stratified_split(labels, (0.6, 0.2, 0.2), seed=1)
    joined = np.concatenate(parts)
    assert len(joined) == 100 and len(set(joined.tolist())) == 100
    for p in parts:
        assert set(labels[p].tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("fusion", ["concat", "sum", "gated", "film", "shared"])
def test_model_output_contract(fusion):
    mods = ("audio", "visual")
    model = build_model(INFO, mods, fusion, feature_dim=16)
    out = model(toy_batch(mods))
    assert out.logits.shape == (4, 3)
    assert set(out.features) == set(mods) and all(h.shape == (4, 16) for h in out.features.values())
    assert set(out.unimodal_logits) == set(mods) and all(z.shape == (4, 3) for z in out.unimodal_logits.values())
    assert bool(out.probe_logits) == (not model.fusion.decomposable)


@pytest.mark.parametrize("fusion", ["gated", "film"])
def test_two_modality_fusions_refuse_three(fusion):
    with pytest.raises(IncompatibleError, match="exactly two modalities"):
        build_model(INFO, ("audio", "visual", "feat"), fusion)


def test_concat_unimodal_logits_sum_to_fused():
    feats = {"a": torch.randn(5, 4), "b": torch.randn(5, 6)}
    fusion = ConcatFusion({"a": 4, "b": 6}, 3)
    fused, uni = fusion(feats)
    torch.testing.assert_close(uni["a"] + uni["b"], fused)
    w, b = fusion.fc.weight, fusion.fc.bias
    torch.testing.assert_close(uni["a"], feats["a"] @ w[:, :4].T + b / 2)


def test_sum_fusion_unimodal_is_own_linear_layer():
    feats = {"a": torch.randn(5, 4), "b": torch.randn(5, 4)}
    fusion = SumFusion({"a": 4, "b": 4}, 3)
    fused, uni = fusion(feats)
    torch.testing.assert_close(uni["a"], F.linear(feats["a"], fusion.fc["a"].weight, fusion.fc["a"].bias))
    torch.testing.assert_close(fused, uni["a"] + uni["b"])


def test_parameter_groups_are_explicit_and_disjoint():
    mods = ("audio", "visual")
    model = build_model(INFO, mods, "concat", feature_dim=8)
    groups = [set(map(id, model.modality_parameters(m))) for m in mods] + [set(map(id, model.head_parameters()))]
    assert all(groups)
    assert sum(len(g) for g in groups) == len(set().union(*groups)) == len(list(model.parameters()))


def test_missing_modality_features_are_zero():
    mods = ("feat", "seq")
    present = torch.tensor([[True, False], [True, True], [False, True], [True, True]])
    model = build_model(INFO, mods, "concat", feature_dim=8)
    out = model(toy_batch(mods, present=present))
    assert out.features["seq"][0].abs().sum() == 0
    assert out.features["feat"][2].abs().sum() == 0
    assert out.features["seq"][1].abs().sum() > 0


def test_feature_scale_changes_fused_but_not_unimodal():
    mods = ("feat", "seq")
    model = build_model(INFO, mods, "concat", feature_dim=8)
    batch = toy_batch(mods)
    plain = model(batch)
    scale = {"feat": torch.tensor([0.0, 1.0, 1.0, 2.0])}
    dropped = model(batch, feature_scale=scale)
    torch.testing.assert_close(dropped.unimodal_logits["feat"], plain.unimodal_logits["feat"])
    expected_row0 = plain.logits[0] - plain.unimodal_logits["feat"][0] + model.fusion.fc.bias / 2
    torch.testing.assert_close(dropped.logits[0], expected_row0)


@pytest.mark.parametrize("modality", ["audio", "visual", "feat", "seq", "text"])
def test_default_encoders_for_every_kind(modality):
    model = build_model(INFO, (modality,), "concat", feature_dim=7)
    out = model(toy_batch((modality,)))
    assert out.features[modality].shape == (4, 7)


def test_registries_name_the_closest_key():
    reg = Registry("widget", {"alpha": 1, "beta": 2})
    with pytest.raises(ConfigError, match="did you mean 'alpha'"):
        reg["alpah"]
    for r in (METHODS, FUSIONS, ENCODERS, DATASETS):
        assert len(r) >= 3
        for key in r:  # a one-letter typo of every registered name points back to that name
            with pytest.raises(ConfigError, match=f"unknown {r.kind} '{key}x' \\(did you mean '{key}'\\?\\)"):
                r[key + "x"]
    with pytest.raises(ConfigError, match="unknown fusion"):
        FUSIONS["concatt"]


def test_method_hooks_have_documented_defaults():
    m = Method()
    assert m.on_epoch_start(0, None) is None and m.on_step_start(None) is None
    assert m.per_batch_decision() is None  # the default decides nothing per batch: accumulation is allowed
    m.record("x", 1.0)
    m.record("x", torch.tensor(3.0))
    assert m.pop_records() == {"x": 2.0}
    assert m.pop_records() == {}
