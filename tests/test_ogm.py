"""OGM, OGM-GE and OPM: the functional cores against hand computations and naive loops, and the
methods' behaviour inside the training step."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import synthetic
from poise.data.base import DatasetInfo, ModalitySpec
from poise.data.batch import MultimodalBatch
from poise.errors import IncompatibleError
from poise.eval.metrics import evaluate
from poise.functional.ogm import (
    GE_EPS,
    ge_noise,
    modulate_gradients,
    modulation_coefficients,
    ogm_coefficients,
    opm_drop_probabilities,
    opm_feature_scale,
    opm_keep_mask,
    opm_loss_rows,
    opm_theta,
    select_modulated_parameters,
    stack_ratios,
)
from poise.methods import make_method
from poise.models.model import build_model
from poise.train import Trainer


# ---- naive references ----------------------------------------------------------------------------
def naive_scores(unimodal_logits, labels):
    """s_m = sum_i softmax(z_m)_i[y_i], one sample and one exponential at a time."""
    scores = {}
    for m, z in unimodal_logits.items():
        total = 0.0
        for row, y in zip(z.tolist(), labels.tolist()):
            exps = [math.exp(v) for v in row]
            total += exps[y] / sum(exps)
        scores[m] = total
    return scores


def naive_coefficients(scores, alpha, continuous=False):
    out = {}
    for m, s in scores.items():
        others = [v for k, v in scores.items() if k != m]
        rho = s / (sum(others) / len(others))
        if rho > 1:
            x = rho - 1 if continuous else rho
            out[m] = 1 - math.tanh(alpha * max(x, 0.0))
        else:
            out[m] = 1.0
    return out


def released_two_modality(score_a, score_v, alpha):
    """The released CVPR training step, written out for two modalities."""
    ratio_v = score_v / score_a
    ratio_a = 1 / ratio_v
    if ratio_v > 1:
        return 1.0, 1 - math.tanh(alpha * max(ratio_v, 0.0))
    return 1 - math.tanh(alpha * max(ratio_a, 0.0)), 1.0


# ---- OGM coefficients -----------------------------------------------------------------------------
def test_coefficients_match_hand_computed_softmax():
    labels = torch.tensor([0, 2, 1])
    logits = {
        "audio": torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0], [0.5, 1.0, 0.0]]),
        "visual": torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.2, 0.1]]),
    }
    # by hand: audio p = e^2/(e^2+2), e^3/(e^3+2), e/(e^0.5+e+1); visual p = 1/(e+2), 1/(e+2), e^.2/(1+e^.2+e^.1)
    e = math.e
    s_a = e**2 / (e**2 + 2) + e**3 / (e**3 + 2) + e / (e**0.5 + e + 1)
    s_v = 1 / (e + 2) + 1 / (e + 2) + e**0.2 / (1 + e**0.2 + e**0.1)
    assert naive_scores(logits, labels) == pytest.approx({"audio": s_a, "visual": s_v})
    rho_a = s_a / s_v
    assert rho_a > 1
    k = ogm_coefficients(logits, labels, alpha=0.8)
    assert k["audio"] == pytest.approx(1 - math.tanh(0.8 * rho_a), rel=1e-5)
    assert k["visual"] == 1.0
    k_cont = ogm_coefficients(logits, labels, alpha=0.8, continuous=True)
    assert k_cont["audio"] == pytest.approx(1 - math.tanh(0.8 * (rho_a - 1)), rel=1e-5)
    assert k_cont["visual"] == 1.0
    # the released variant always slows harder than the continuous one
    assert k["audio"] < k_cont["audio"]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("continuous", [False, True])
def test_coefficients_match_naive_loop_for_random_batches(seed, continuous):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 5, (17,), generator=g)
    logits = {m: torch.randn(17, 5, generator=g) * 2 for m in ("a", "b", "c")[: 2 + seed % 2]}
    expected = naive_coefficients(naive_scores(logits, labels), alpha=1.3, continuous=continuous)
    assert ogm_coefficients(logits, labels, 1.3, continuous) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_two_modalities_reduce_to_the_released_formula(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (9,), generator=g)
    logits = {"audio": torch.randn(9, 4, generator=g), "visual": torch.randn(9, 4, generator=g)}
    s = naive_scores(logits, labels)
    k_a, k_v = released_two_modality(s["audio"], s["visual"], alpha=0.5)
    assert ogm_coefficients(logits, labels, 0.5) == pytest.approx({"audio": k_a, "visual": k_v}, rel=1e-5)
    ratios = stack_ratios({m: torch.tensor(v) for m, v in s.items()})
    assert float(ratios[0]) == pytest.approx(s["audio"] / s["visual"], rel=1e-6)
    assert float(ratios[1]) == pytest.approx(s["visual"] / s["audio"], rel=1e-6)


def test_three_modality_ratio_is_score_over_mean_of_the_others():
    scores = {"a": torch.tensor(3.0), "b": torch.tensor(2.0), "c": torch.tensor(1.0)}
    ratios = stack_ratios(scores)
    assert ratios.tolist() == pytest.approx([3 / 1.5, 2 / 2.0, 1 / 2.5])
    k = modulation_coefficients(ratios, alpha=0.5)
    # rho_b is exactly 1: not dominant
    assert k.tolist() == pytest.approx([1 - math.tanh(0.5 * 2.0), 1.0, 1.0])


def test_released_coefficient_jumps_at_rho_one_and_continuous_does_not():
    rho = torch.tensor([0.5, 1.0 - 1e-6, 1.0, 1.0 + 1e-6, 2.0])
    released = modulation_coefficients(rho, alpha=0.8)
    continuous = modulation_coefficients(rho, alpha=0.8, continuous=True)
    assert released[:3].tolist() == [1.0, 1.0, 1.0]
    assert float(released[3]) == pytest.approx(1 - math.tanh(0.8), abs=1e-5)
    assert float(released[2] - released[3]) > 0.3  # the discontinuity
    assert continuous[:3].tolist() == [1.0, 1.0, 1.0]
    assert float(continuous[3]) == pytest.approx(1.0, abs=1e-5)
    assert float(continuous[4]) == pytest.approx(1 - math.tanh(0.8), abs=1e-6)


def test_ogm_coefficients_refuses_one_modality():
    with pytest.raises(ValueError, match="at least two"):
        ogm_coefficients({"a": torch.zeros(2, 3)}, torch.tensor([0, 1]), 0.8)


# ---- GE noise and gradient modulation --------------------------------------------------------------
def test_ge_noise_std_matches_the_gradient_std_and_is_seeded():
    grad = torch.randn(400, 500, generator=torch.Generator().manual_seed(0)) * 3.0 + 1.0
    noise = ge_noise(grad, torch.Generator().manual_seed(5))
    assert float(noise.std()) == pytest.approx(float(grad.std()), rel=0.01)
    assert abs(float(noise.mean())) < 0.02
    assert torch.equal(noise, ge_noise(grad, torch.Generator().manual_seed(5)))
    assert not torch.equal(noise, ge_noise(grad, torch.Generator().manual_seed(6)))
    # a zero gradient gets noise of std 1e-8; a one-element tensor gets the same floor, not NaN
    assert float(ge_noise(torch.zeros(1000), torch.Generator().manual_seed(0)).std()) == pytest.approx(GE_EPS, rel=0.1)
    assert torch.isfinite(ge_noise(torch.ones(1, 1))).all()


def test_modulate_gradients_scales_then_adds_noise_of_the_unscaled_std():
    g = torch.Generator().manual_seed(1)
    p_a = torch.nn.Parameter(torch.zeros(300, 300))
    p_v = torch.nn.Parameter(torch.zeros(300, 300))
    p_a.grad = torch.randn(300, 300, generator=g) * 2.0
    p_v.grad = torch.randn(300, 300, generator=g) * 0.5
    orig_a, orig_v = p_a.grad.clone(), p_v.grad.clone()
    modulate_gradients([[p_a], [p_v]], torch.tensor([0.25, 1.0]))
    assert torch.allclose(p_a.grad, 0.25 * orig_a) and torch.equal(p_v.grad, orig_v)

    p_a.grad, p_v.grad = orig_a.clone(), orig_v.clone()
    modulate_gradients([[p_a], [p_v]], torch.tensor([0.25, 1.0]), noise=True, generator=torch.Generator().manual_seed(3))
    # noise on BOTH encoders, each with the std of its own gradient before scaling
    assert float((p_a.grad - 0.25 * orig_a).std()) == pytest.approx(float(orig_a.std()), rel=0.02)
    assert float((p_v.grad - orig_v).std()) == pytest.approx(float(orig_v.std()), rel=0.02)
    # same generator state: the same noise; another seed: other noise
    for seed, same in ((3, True), (4, False)):
        q_a, q_v = torch.nn.Parameter(torch.zeros(300, 300)), torch.nn.Parameter(torch.zeros(300, 300))
        q_a.grad, q_v.grad = orig_a.clone(), orig_v.clone()
        modulate_gradients([[q_a], [q_v]], torch.tensor([0.25, 1.0]), noise=True, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(q_a.grad, p_a.grad) == same and torch.equal(q_v.grad, p_v.grad) == same


@pytest.mark.parametrize("threads", [1, 2])
def test_ge_noise_in_pieces_has_each_tensors_mean_and_std_and_ignores_the_thread_count(threads, monkeypatch):
    """Tensors larger than a piece, smaller than one, and not contiguous: per tensor the added noise has mean 0
    and the tensor's own std; the pieces of one tensor are not copies of each other; the numbers depend on
    the generator's state only, not on how many threads draw them."""
    import poise.functional.ogm as ogm

    monkeypatch.setattr(ogm, "NOISE_PIECE", 1 << 14)
    g = torch.Generator().manual_seed(0)
    shapes = [(64, 3, 20, 20), (200,), (300, 500)]
    grads = [torch.randn(shape, generator=g) * (i + 0.5) + i for i, shape in enumerate(shapes)]
    grads.append((torch.randn(400, 300, generator=g) * 4.0).t())  # non-contiguous
    originals = [x.clone() for x in grads]
    stds = [x.std() + GE_EPS for x in originals]
    k = torch.tensor(0.5)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ogm.scale_and_add_noise_(grads, k, stds, torch.Generator().manual_seed(11))
    finally:
        torch.set_num_threads(previous)
    for x, orig, std in zip(grads, originals, stds):
        noise = x - 0.5 * orig
        assert abs(float(noise.mean())) < 4 * float(std) / math.sqrt(noise.numel())
        assert float(noise.std()) == pytest.approx(float(std), rel=0.02 if noise.numel() > 10_000 else 0.15)
    first = (grads[0] - 0.5 * originals[0]).reshape(-1)
    piece = ogm.NOISE_PIECE
    assert abs(float(torch.corrcoef(torch.stack([first[:piece], first[piece: 2 * piece]]))[0, 1])) < 0.05
    # the reference: one thread, the same generator state
    again = [x.clone() for x in originals]
    torch.set_num_threads(1)
    try:
        ogm.scale_and_add_noise_(again, k, stds, torch.Generator().manual_seed(11))
    finally:
        torch.set_num_threads(previous)
    assert all(torch.equal(a, b) for a, b in zip(again, grads))


def _conv_and_mlp_model():
    info = DatasetInfo(
        name="t",
        modalities={"audio": ModalitySpec("spectrogram", (1, 8, 8)), "visual": ModalitySpec("vector", (6,))},
        num_classes=3,
    )
    torch.manual_seed(0)
    model = build_model(info, ("audio", "visual"), "concat", feature_dim=8,
                        encoder_options={"audio": {"hidden": 4, "depth": 2}, "visual": {"hidden": 16}})
    g = torch.Generator().manual_seed(0)
    batch = MultimodalBatch(
        inputs={"audio": torch.randn(12, 1, 8, 8, generator=g), "visual": torch.randn(12, 6, generator=g)},
        labels=torch.arange(12) % 3,
        present=torch.ones(12, 2, dtype=torch.bool),
        index=torch.arange(12),
    )
    return model, batch


def _layers(encoder, kinds):
    return [m for m in encoder.modules() if isinstance(m, kinds)]


def test_default_selection_is_every_weight_tensor_of_a_conv_encoder_with_its_projection():
    model, _ = _conv_and_mlp_model()
    audio = model.encoders["audio"]  # conv-BN-ReLU blocks, then a linear projection
    convs, linears = _layers(audio, torch.nn.Conv2d), _layers(audio, torch.nn.Linear)
    assert len(convs) == 2 and len(linears) == 1
    selected = select_modulated_parameters(audio)
    assert [id(p) for p in selected] == [id(c.weight) for c in convs] + [id(linears[0].weight)]
    norm_and_bias = [p for bn in _layers(audio, torch.nn.BatchNorm2d) for p in bn.parameters()] + [linears[0].bias]
    assert not {id(p) for p in norm_and_bias} & {id(p) for p in selected}
    visual = model.encoders["visual"]  # an MLP: its linear weights, never the biases
    assert [id(p) for p in select_modulated_parameters(visual)] == [id(m.weight) for m in _layers(visual, torch.nn.Linear)]
    assert len(select_modulated_parameters(audio, "all")) == len(model.modality_parameters("audio"))


def test_conv_selection_is_the_literal_released_rule():
    model, _ = _conv_and_mlp_model()
    audio = model.encoders["audio"]
    assert [id(p) for p in select_modulated_parameters(audio, "conv")] == [id(c.weight) for c in _layers(audio, torch.nn.Conv2d)]
    assert select_modulated_parameters(model.encoders["visual"], "conv") == []
    with pytest.raises(TypeError, match="encoder module"):
        select_modulated_parameters(model.modality_parameters("audio"))


def test_normalisation_layers_are_never_selected_even_with_matrix_parameters():
    encoder = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.LayerNorm([2, 3]), torch.nn.GroupNorm(2, 6))
    selected = select_modulated_parameters(encoder)
    assert encoder[1].weight.dim() == 2  # a LayerNorm over (2, 3) has a matrix weight: still left alone
    assert [id(p) for p in selected] == [id(encoder[0].weight)]


def test_resnet18_at_512_features_selects_the_same_tensors_with_both_rules():
    from poise.models.resnet import ResNet18Encoder

    spec = ModalitySpec("spectrogram", (1, 32, 32))
    released = ResNet18Encoder(spec, 512)  # the released architecture: no projection
    assert [id(p) for p in select_modulated_parameters(released)] == [id(p) for p in select_modulated_parameters(released, "conv")]
    projected = ResNet18Encoder(spec, 64)  # a linear projection to 64 after the trunk
    extra = [p for p in select_modulated_parameters(projected) if p.dim() != 4]
    assert len(extra) == 1 and extra[0].shape == (64, 512)
    assert id(extra[0]) not in {id(p) for p in select_modulated_parameters(projected, "conv")}


def _setup(method, model, epoch=0, seed=0):
    ctx = SimpleNamespace(model=model, device=torch.device("cpu"), seed=seed, epoch=epoch, step=0)
    method.setup(ctx)
    return ctx


def _backward(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch)
    F.cross_entropy(out.logits, batch.labels).backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["ogm", "ogm_ge"])
def test_only_selected_encoder_tensors_change_never_norm_layers_or_head(name):
    model, batch = _conv_and_mlp_model()
    method = make_method(name, {"alpha": 2.0})
    _setup(method, model)
    out, before = _backward(model, batch)
    method.after_backward(out, batch)
    records = method.pop_records()
    k = {m: records[f"coef/{m}"] for m in ("audio", "visual")}
    assert min(k.values()) < 1.0 and max(k.values()) == 1.0
    selected = {id(p) for m in ("audio", "visual") for p in select_modulated_parameters(model.encoders[m])}
    for n, p in model.named_parameters():
        modality = n.split(".")[1] if n.startswith("encoders.") else None
        if id(p) not in selected:
            assert torch.equal(p.grad, before[n]), n  # BatchNorm, biases, projections, head: untouched
        elif name == "ogm":
            assert torch.allclose(p.grad, k[modality] * before[n]), n
        else:
            assert not torch.allclose(p.grad, k[modality] * before[n]), n  # noise on every modulated tensor
    assert any(".1.weight" in n and p.dim() == 1 for n, p in model.encoders["audio"].named_parameters())


def _two_conv_model():
    spec = ModalitySpec("spectrogram", (1, 8, 8))
    info = DatasetInfo(name="t", modalities={"audio": spec, "visual": spec}, num_classes=3)
    torch.manual_seed(0)
    options = {"hidden": 4, "depth": 2}
    model = build_model(info, ("audio", "visual"), "concat", feature_dim=8, encoder_options={"audio": options, "visual": options})
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(12) % 3
    inputs = {m: torch.randn(12, 1, 8, 8, generator=g) for m in ("audio", "visual")}
    batch = MultimodalBatch(inputs=inputs, labels=labels,
                            present=torch.ones(12, 2, dtype=torch.bool), index=torch.arange(12))
    return model, batch


@pytest.mark.parametrize("params", ["weights", "conv"])
def test_ogm_scales_the_projection_of_a_conv_encoder_only_by_default(params):
    model, batch = _two_conv_model()
    method = make_method("ogm", {"alpha": 2.0, "params": params})
    _setup(method, model)
    out, before = _backward(model, batch)
    method.after_backward(out, batch)
    records = method.pop_records()
    dominant = min(("audio", "visual"), key=lambda m: records[f"coef/{m}"])
    k_dominant = records[f"coef/{dominant}"]
    assert k_dominant < 0.9  # the dominant modality is slowed
    encoder = model.encoders[dominant]
    grads = {id(p): p.grad for p in encoder.parameters()}
    named = {id(p): n for n, p in encoder.named_parameters()}
    for conv in _layers(encoder, torch.nn.Conv2d):
        assert torch.allclose(grads[id(conv.weight)], k_dominant * before[f"encoders.{dominant}.{named[id(conv.weight)]}"])
    for bn in _layers(encoder, torch.nn.BatchNorm2d):
        for p in bn.parameters():
            assert torch.equal(p.grad, before[f"encoders.{dominant}.{named[id(p)]}"])
    (projection,) = _layers(encoder, torch.nn.Linear)
    raw_weight = before[f"encoders.{dominant}.{named[id(projection.weight)]}"]
    assert torch.equal(projection.bias.grad, before[f"encoders.{dominant}.{named[id(projection.bias)]}"])
    if params == "weights":
        assert torch.allclose(projection.weight.grad, k_dominant * raw_weight)
    else:
        assert torch.equal(projection.weight.grad, raw_weight)


def test_ogm_conv_rule_refuses_an_encoder_without_convolutions():
    model, _ = _conv_and_mlp_model()
    with pytest.raises(IncompatibleError, match="modality 'visual'.*params=weights"):
        _setup(make_method("ogm", {"params": "conv"}), model)


def test_ogm_hot_path_never_syncs_with_the_device(monkeypatch):
    model, batch = _conv_and_mlp_model()
    method = make_method("ogm_ge", {"params": "all"})
    _setup(method, model)
    out, _ = _backward(model, batch)
    calls = []
    originals = {attr: getattr(torch.Tensor, attr) for attr in ("item", "tolist", "__bool__", "__float__", "__int__")}

    def counting(attr):
        def call(self, *args, **kwargs):
            calls.append(attr)
            return originals[attr](self, *args, **kwargs)

        return call

    for attr in originals:
        monkeypatch.setattr(torch.Tensor, attr, counting(attr))
    method.after_backward(out, batch)
    monkeypatch.undo()
    assert calls == []
    assert set(method.pop_records()) == {"ratio/audio", "ratio/visual", "coef/audio", "coef/visual"}


def test_modulation_window_is_inclusive():
    model, batch = _conv_and_mlp_model()
    method = make_method("ogm", {"modulation_starts": 2, "modulation_ends": 4})
    ctx = _setup(method, model)
    assert [method.active(e) for e in range(7)] == [False, False, True, True, True, False, False]
    for epoch, expect in [(1, False), (2, True), (4, True), (5, False)]:
        ctx.epoch = epoch
        out, before = _backward(model, batch)
        method.after_backward(out, batch)
        records = method.pop_records()
        assert bool(records) is expect
        changed = any(not torch.equal(p.grad, before[n]) for n, p in model.named_parameters())
        assert changed is expect
    with pytest.raises(Exception, match="before modulation_starts"):
        make_method("ogm", {"modulation_starts": 3, "modulation_ends": 2})


def test_scores_are_reduced_across_ranks_before_the_coefficients(monkeypatch):
    """A stand-in for another rank whose visual scores are far higher must flip the decision."""
    import poise.methods.modulation as distributed  # its confidence estimator passes this reducer to confidence_scores

    model, batch = _conv_and_mlp_model()
    method = make_method("ogm")
    _setup(method, model)
    out, _ = _backward(model, batch)
    method.after_backward(out, batch)
    local = method.pop_records()
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda t: t + torch.tensor([0.0, 100.0]))
    out, _ = _backward(model, batch)
    method.after_backward(out, batch)
    reduced = method.pop_records()
    assert reduced["coef/visual"] < 1.0 and reduced["coef/audio"] == 1.0
    assert reduced["ratio/visual"] > 10 * local["ratio/visual"]


def test_scores_count_only_samples_with_every_modality():
    model, batch = _conv_and_mlp_model()
    method = make_method("ogm")
    _setup(method, model)
    batch.present[:6, 1] = False
    out, _ = _backward(model, batch)
    method.after_backward(out, batch)
    got = method.pop_records()
    rows = batch.present.all(1)
    ref = naive_scores({m: z[rows].detach() for m, z in out.unimodal_logits.items()}, batch.labels[rows])
    assert got["ratio/audio"] == pytest.approx(ref["audio"] / ref["visual"], rel=1e-5)


def test_noise_generator_state_round_trips():
    model, batch = _conv_and_mlp_model()
    method = make_method("ogm_ge")
    _setup(method, model, seed=3)
    state = method.state_dict()
    out, before = _backward(model, batch)
    method.after_backward(out, batch)
    first = [p.grad.clone() for p in model.parameters()]
    method.load_state_dict(state)
    for n, p in model.named_parameters():
        p.grad = before[n].clone()
    method.after_backward(out, batch)
    assert all(torch.equal(a, p.grad) for a, p in zip(first, model.parameters()))


# ---- OPM -------------------------------------------------------------------------------------------
def test_opm_drop_probability_formula_and_clipping():
    rho = torch.tensor([1.5, 1 / 1.5])
    q = opm_drop_probabilities(rho, q_base=0.5, lam=0.5)
    assert q.tolist() == pytest.approx([0.5 * (1 + 0.5 * math.tanh(0.5)), 0.0])
    assert opm_drop_probabilities(torch.tensor([1.0, 1.0])).tolist() == [0.0, 0.0]
    assert opm_drop_probabilities(torch.tensor([50.0, 0.02]), q_base=0.9, lam=1.0).tolist() == [1.0, 0.0]
    # three modalities: each with rho > 1 is dominant
    q3 = opm_drop_probabilities(torch.tensor([2.0, 1.2, 0.3]), q_base=0.4, lam=0.5)
    assert q3.tolist() == pytest.approx([0.4 * (1 + 0.5 * math.tanh(1.0)), 0.4 * (1 + 0.5 * math.tanh(0.2)), 0.0])


def test_opm_theta_and_rescaling():
    q = torch.tensor([0.6, 0.0])
    theta = opm_theta(q, torch.tensor([64, 32]))
    assert float(theta) == pytest.approx(64 * 0.6 / 96)
    keep = torch.tensor([[True, True], [False, True], [False, False]])
    scale = opm_feature_scale(keep, theta)
    assert torch.allclose(scale, torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]) / 0.6)
    assert opm_loss_rows(keep, torch.ones(3, 2, dtype=torch.bool)).tolist() == [True, True, False]
    # a sample that keeps only a modality it does not have has nothing left
    present = torch.tensor([[True, True], [True, False], [True, True]])
    assert opm_loss_rows(keep, present).tolist() == [True, False, False]


def test_opm_keep_mask_frequencies():
    keep = opm_keep_mask(torch.tensor([0.3, 0.0, 1.0]), 20_000, torch.Generator().manual_seed(0))
    assert keep.shape == (20_000, 3)
    assert float(keep[:, 0].float().mean()) == pytest.approx(0.7, abs=0.015)
    assert bool(keep[:, 1].all()) and not bool(keep[:, 2].any())


def _train_step(method, model, optimizer, batch):
    """The trainer's step order, written out."""
    plan = method.on_step_start(batch)
    out = model(batch, feature_scale=plan.feature_scale if plan else None)
    terms = method.loss(out, batch)
    optimizer.zero_grad(set_to_none=True)
    method.backward(terms, out, batch)
    method.after_backward(out, batch)
    optimizer.step()
    return plan, out, terms


def test_opm_drops_only_the_dominant_modality_and_excludes_emptied_samples():
    model, batch = _conv_and_mlp_model()
    method = make_method("opm", {"q_base": 1.0, "lam": 0.0, "p_exe": 1.0, "warmup_epochs": 0, "ratio_source": "previous"})
    _setup(method, model)
    method._previous_ratios = torch.tensor([2.0, 0.5])  # audio dominant: q = (1, 0)
    batch.present[:5, 1] = False  # these five have only audio, which is dropped
    plan = method.on_step_start(batch)
    assert plan.feature_scale["audio"].tolist() == [0.0] * 12
    theta = 8 * 1.0 / 16
    assert plan.feature_scale["visual"].tolist() == pytest.approx([1 / (1 - theta)] * 12)
    out = model(batch, feature_scale=plan.feature_scale)
    terms = method.loss(out, batch)
    expected = F.cross_entropy(out.logits[5:], batch.labels[5:])
    assert float(terms["ce"].detach()) == pytest.approx(float(expected.detach()))
    records = method.pop_records()
    assert records["q/audio"] == 1.0 and records["q/visual"] == 0.0
    assert records["kept_samples"] == pytest.approx(7 / 12)


def test_opm_skips_a_batch_with_no_sample_left():
    model, batch = _conv_and_mlp_model()
    method = make_method("opm", {"q_base": 1.0, "lam": 0.0, "p_exe": 1.0, "warmup_epochs": 0, "ratio_source": "previous"})
    _setup(method, model)
    method._previous_ratios = torch.tensor([2.0, 0.5])
    batch.present[:, 1] = False
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _, _, terms = _train_step(method, model, optimizer, batch)
    assert float(terms["ce"]) == 0.0
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_opm_warmup_and_p_exe():
    model, batch = _conv_and_mlp_model()
    method = make_method("opm", {"warmup_epochs": 2, "p_exe": 0.7, "ratio_source": "previous"})
    ctx = _setup(method, model, epoch=1)
    method._previous_ratios = torch.tensor([1.5, 1 / 1.5])
    assert method.on_step_start(batch) is None
    ctx.epoch = 2
    plans = [method.on_step_start(batch) for _ in range(400)]
    assert sum(p is not None for p in plans) / 400 == pytest.approx(0.7, abs=0.07)
    never = make_method("opm", {"warmup_epochs": 0, "p_exe": 0.0, "ratio_source": "previous"})
    _setup(never, model)
    never._previous_ratios = torch.tensor([1.5, 1 / 1.5])
    assert all(never.on_step_start(batch) is None for _ in range(50))


def test_opm_current_ratio_is_this_batch_and_leaves_norm_statistics_alone():
    model, batch = _conv_and_mlp_model()
    model.train()
    method = make_method("opm", {"p_exe": 1.0, "warmup_epochs": 0})
    _setup(method, model)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    ratios = method._current_ratios(batch)
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    with torch.no_grad():
        out = model(batch)
    s = naive_scores(out.unimodal_logits, batch.labels)
    assert ratios.tolist() == pytest.approx([s["audio"] / s["visual"], s["visual"] / s["audio"]], rel=1e-5)


def test_opm_ratio_from_the_training_forward_equals_the_extra_pass():
    """The default reads the ratio from the training forward's features before dropping; the option runs a
    separate no-grad encoder pass first. Same ratios, same masks, same training, step after step."""
    import copy

    model, batch = _conv_and_mlp_model()
    model.train()
    runs = {}
    for extra_pass in (False, True):
        m = copy.deepcopy(model)
        method = make_method("opm", {"p_exe": 1.0, "warmup_epochs": 0, "q_base": 0.6, "extra_pass": extra_pass})
        _setup(method, m).backward = lambda loss: loss.backward()
        optimizer = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9)
        keeps = []
        for _ in range(6):
            _train_step(method, m, optimizer, batch)
            keeps.append(method._keep.clone())
        runs[extra_pass] = (keeps, m, {k: [float(v) for v in vs] for k, vs in method._records.items()})
    records_forward, records_pass = runs[False][2], runs[True][2]
    assert records_forward["q/audio"] == records_pass["q/audio"] and records_forward["theta"] == records_pass["theta"]
    assert max(records_forward["q/audio"] + records_forward["q/visual"]) > 0  # some steps drop something
    for keep_f, keep_p in zip(runs[False][0], runs[True][0]):
        assert torch.equal(keep_f, keep_p)
    for p_f, p_p in zip(runs[False][1].parameters(), runs[True][1].parameters()):
        assert torch.equal(p_f, p_p)
    # and the extra pass reads this batch's ratio from the model as it is before the step
    fresh = make_method("opm", {"p_exe": 1.0, "warmup_epochs": 0, "extra_pass": True})
    _setup(fresh, model)
    with torch.no_grad():
        s = naive_scores(model(batch).unimodal_logits, batch.labels)
    ratios = fresh._current_ratios(batch)
    assert ratios.tolist() == pytest.approx([s["audio"] / s["visual"], s["visual"] / s["audio"]], rel=1e-5)


def test_opm_decides_inside_the_forward_by_default():
    model, batch = _conv_and_mlp_model()
    model.train()
    method = make_method("opm", {"p_exe": 1.0, "warmup_epochs": 0, "q_base": 1.0, "lam": 0.0})
    _setup(method, model)
    plan = method.on_step_start(batch)
    assert callable(plan.feature_scale) and method._keep is None  # nothing decided before the forward
    out = model(batch, feature_scale=plan.feature_scale)
    s = naive_scores(out.unimodal_logits, batch.labels)  # unimodal logits of the features before dropping
    dominant = 0 if s["audio"] > s["visual"] else 1
    assert method._keep[:, dominant].sum() == 0 and bool(method._keep[:, 1 - dominant].all())


def test_opm_never_drops_at_evaluation(monkeypatch):
    from poise.eval.metrics import predict_batches

    (splits, cfg) = synthetic(2, num_samples=120)
    method = make_method("opm", {"p_exe": 1.0, "warmup_epochs": 0, "q_base": 0.9})
    trainer = Trainer(splits, method, cfg, seed=0)
    result = trainer.fit()
    # training did drop: a modality's features were dropped with probability q > 0.45 in every epoch
    assert all(max(h["method"]["q/audio"], h["method"]["q/visual"]) > 0.45 for h in result.history)

    def refuse(*args, **kwargs):
        raise AssertionError("on_step_start ran during evaluation")

    monkeypatch.setattr(method, "on_step_start", refuse)
    model, scales = trainer.model, []
    forward = model.forward

    def spy(batch, feature_scale=None):
        scales.append(feature_scale)
        return forward(batch, feature_scale=feature_scale)

    monkeypatch.setattr(model, "forward", spy)
    loader = trainer.make_loader(splits.test, shuffle=False)
    predictions = predict_batches(model, method, loader, torch.device("cpu"))
    assert scales and all(s is None for s in scales)
    # the evaluated logits are the head on every modality's full, unscaled features
    model.eval()
    for (fused, *_), batch in zip(predictions, loader):
        with torch.no_grad():
            full, _ = model.fusion(model.encode(batch))
        torch.testing.assert_close(fused, full)
    assert evaluate(model, method, loader, 4, torch.device("cpu"))["accuracy"] == result.test["accuracy"]


# ---- end to end ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,options,modalities,missing",
    [
        ("ogm", {}, 2, 0.0),
        ("ogm", {"continuous": True, "params": "all"}, 3, 0.3),
        ("ogm_ge", {}, 3, 0.0),
        ("ogm_ge", {}, 2, 0.4),
        ("opm", {"warmup_epochs": 0, "p_exe": 1.0}, 3, 0.3),
        ("opm", {"warmup_epochs": 1, "ratio_source": "previous"}, 2, 0.4),
    ],
)
def test_trains_end_to_end(name, options, modalities, missing):
    splits, cfg = synthetic(modalities, missing_rate=missing, num_samples=240)
    cfg.trainer.epochs, cfg.trainer.batch_size = 3, 32
    method = make_method(name, options)
    result = Trainer(splits, method, cfg, seed=0).fit()
    assert result.test["accuracy"] > 0.4  # chance is 0.25
    records = result.history[-1]["method"]
    names = ["audio", "visual", "text"][:modalities]
    prefix = "q" if name == "opm" else "coef"
    assert {f"{prefix}/{m}" for m in names} <= set(records)
    assert all(0.0 <= records[f"{prefix}/{m}"] <= 1.0 for m in names)
    if name != "opm":
        assert min(records[f"coef/{m}"] for m in names) < 1.0


@pytest.mark.parametrize("name", ["ogm", "ogm_ge", "opm"])
def test_one_modality_is_refused(name):
    splits, cfg = synthetic(1, num_samples=60)
    with pytest.raises(IncompatibleError, match="at least 2 modalities"):
        Trainer(splits, make_method(name), cfg, seed=0)
