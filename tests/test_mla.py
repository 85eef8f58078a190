"""MLA: OWM projection (paper and released forms), entropy fusion weights, the alternating training
step of the method, its ablation switches and end-to-end training."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from poise.config import build_config
from poise.data import load_dataset
from poise.errors import ConfigError, IncompatibleError
from poise.functional.mla import (
    entropy_fusion_weights,
    entropy_fusion_weights_released,
    fixed_fusion_weights,
    fuse_logits,
    owm_project,
    owm_update,
    owm_update_released,
    released_owm_alpha,
)
from poise.methods import make_method
from poise.methods.mla import MLA
from poise.train import Trainer
from poise.train.context import TrainContext

FAST = {"progress": False, "probe": False, "tensorboard": False}


def random_spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


# ---- OWM, paper form ---------------------------------------------------------------------------
def naive_owm(P: np.ndarray, h: np.ndarray, alpha: float) -> np.ndarray:
    d = len(h)
    Ph = [sum(P[i][j] * h[j] for j in range(d)) for i in range(d)]
    hPh = sum(h[i] * Ph[i] for i in range(d))
    q = 1.0 / (alpha + hPh)
    return np.array([[P[i][j] - q * Ph[i] * Ph[j] for j in range(d)] for i in range(d)])


def test_owm_update_matches_naive_loop_and_is_pure():
    P = random_spd(5, 0)
    h = torch.tensor([0.3, -1.2, 0.5, 2.0, 0.1], dtype=torch.float64)
    before = P.clone()
    out = owm_update(P, h, 0.7)
    assert torch.equal(P, before)
    np.testing.assert_allclose(out.numpy(), naive_owm(P.numpy(), h.numpy(), 0.7), rtol=1e-12, atol=1e-12)


def test_owm_update_removes_the_new_direction_and_keeps_orthogonal_ones():
    h = torch.tensor([1.0, 2.0, 0.0, -1.0], dtype=torch.float64)
    P = owm_update(torch.eye(4, dtype=torch.float64), h, 1e-6)
    assert torch.linalg.vector_norm(P @ h) < 1e-6 * torch.linalg.vector_norm(h)
    v = torch.tensor([2.0, -1.0, 5.0, 0.0], dtype=torch.float64)  # orthogonal to h
    torch.testing.assert_close(P @ v, v)
    # general alpha: P' h = alpha / (alpha + h^T P h) * P h
    P0 = random_spd(4, 1)
    P1 = owm_update(P0, h, 0.5)
    torch.testing.assert_close(P1 @ h, 0.5 / (0.5 + h @ P0 @ h) * (P0 @ h))


def test_owm_updates_are_recursive_least_squares():
    """After updates with h_1..h_T from P_0 = I: P_T = (I + sum_t h_t h_t^T / alpha)^-1."""
    g = torch.Generator().manual_seed(3)
    hs = torch.randn(6, 5, generator=g, dtype=torch.float64)
    P = torch.eye(5, dtype=torch.float64)
    for h in hs:
        P = owm_update(P, h, 0.3)
    closed = torch.linalg.inv(torch.eye(5, dtype=torch.float64) + hs.T @ hs / 0.3)
    torch.testing.assert_close(P, closed)


def test_owm_update_rejects_non_positive_alpha():
    with pytest.raises(ValueError, match="owm alpha must be positive"):
        owm_update(torch.eye(2), torch.ones(2), 0.0)


# ---- OWM, released form ------------------------------------------------------------------------
def naive_owm_released(P: np.ndarray, h: np.ndarray, alpha: float) -> np.ndarray:
    d = len(h)
    k = [sum(P[i][j] * h[j] for j in range(d)) for i in range(d)]
    out = [[P[i][j] - k[i] * k[j] / (alpha + k[i] * h[j]) for j in range(d)] for i in range(d)]
    norm = math.sqrt(sum(out[i][j] ** 2 for i in range(d) for j in range(d)))
    return np.array([[out[i][j] / norm for j in range(d)] for i in range(d)])


def test_released_owm_matches_naive_loop_and_differs_from_paper():
    P = random_spd(4, 2)
    h = torch.tensor([0.5, 1.5, 0.2, 0.9], dtype=torch.float64)
    out = owm_update_released(P, h, 0.05)
    np.testing.assert_allclose(out.numpy(), naive_owm_released(P.numpy(), h.numpy(), 0.05), rtol=1e-10, atol=1e-12)
    assert torch.linalg.matrix_norm(out).item() == pytest.approx(1.0)
    paper = owm_update(P, h, 0.05)
    assert not torch.allclose(out, paper / torch.linalg.matrix_norm(paper), atol=1e-3)


def test_released_alpha_schedule():
    assert released_owm_alpha(0, 10) == pytest.approx(0.1)
    assert released_owm_alpha(5, 10) == pytest.approx(0.1**1.5)
    assert released_owm_alpha(9, 10) == pytest.approx(0.1**1.9)


def test_owm_project():
    grad = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    P = torch.tensor([[0.5, 0.0], [1.0, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(owm_project(grad, P), torch.tensor([[2.5, 4.0], [5.5, 8.0]]))


# ---- fusion weights ----------------------------------------------------------------------------
def entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p)


def test_entropy_fusion_weights_by_hand_per_sample():
    # sample 0: audio uncertain (uniform), visual confident (0.75 / 0.25); sample 1: the reverse, stronger
    logits = {
        "audio": torch.tensor([[0.0, 0.0], [math.log(9.0), 0.0]]),
        "visual": torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]]),
    }
    w = entropy_fusion_weights(logits)
    e_a0, e_v0 = entropy([0.5, 0.5]), entropy([0.75, 0.25])
    top = max(e_a0, e_v0)
    expect_a0 = math.exp(top - e_a0) / (math.exp(top - e_a0) + math.exp(top - e_v0))
    e_a1, e_v1 = entropy([0.9, 0.1]), entropy([0.5, 0.5])
    top = max(e_a1, e_v1)
    expect_a1 = math.exp(top - e_a1) / (math.exp(top - e_a1) + math.exp(top - e_v1))
    torch.testing.assert_close(w["audio"], torch.tensor([expect_a0, expect_a1]))
    torch.testing.assert_close(w["audio"] + w["visual"], torch.ones(2))
    assert w["audio"][0] < 0.5 < w["audio"][1]  # per sample: the confident modality leads
    fused = fuse_logits(logits, w)
    torch.testing.assert_close(fused[0], expect_a0 * logits["audio"][0] + (1 - expect_a0) * logits["visual"][0])
    # the released batch softmax gives one weight per modality for the whole batch
    released = entropy_fusion_weights_released(logits)
    assert released["audio"].dim() == 0


def test_entropy_fusion_weights_present_mask():
    g = torch.Generator().manual_seed(0)
    logits = {m: torch.randn(4, 3, generator=g) * 2 for m in ("a", "b", "c")}
    present = torch.tensor([[True, True, True], [True, False, True], [False, True, False], [False, False, False]])
    w = entropy_fusion_weights(logits, present)
    stacked = torch.stack([w[m] for m in logits], dim=1)
    assert torch.all(stacked[~present] == 0)
    torch.testing.assert_close(stacked[:3].sum(1), torch.ones(3))
    assert torch.all(stacked[3] == 0)  # a sample with no modality gets no weight (not NaN)
    assert stacked[2, 1] == 1.0
    # row 1 equals the two-modality weights of a and c alone
    pair = entropy_fusion_weights({"a": logits["a"][1:2], "c": logits["c"][1:2]})
    torch.testing.assert_close(stacked[1, [0, 2]], torch.cat([pair["a"], pair["c"]]))


def test_released_batch_softmax_weights_by_naive_loop():
    g = torch.Generator().manual_seed(1)
    logits = {"a": torch.randn(5, 3, generator=g), "v": torch.randn(5, 3, generator=g) * 3}
    ents = {}
    for m, z in logits.items():
        e = 0.0
        for c in range(3):
            col = [math.exp(z[i, c].item()) for i in range(5)]
            total = sum(col)
            e -= sum(x / total * math.log(x / total) for x in col)
        ents[m] = e
    top = max(ents.values())
    denom = sum(math.exp(top - e) for e in ents.values())
    w = entropy_fusion_weights_released(logits)
    for m in logits:
        assert w[m].item() == pytest.approx(math.exp(top - ents[m]) / denom, rel=1e-5)


def test_fixed_fusion_weights_with_missing():
    present = torch.tensor([[True, True], [False, True]])
    w = fixed_fusion_weights([0.55, 0.45], ["a", "v"], present)
    torch.testing.assert_close(w["a"], torch.tensor([0.55, 0.0]))
    torch.testing.assert_close(w["v"], torch.tensor([0.45, 1.0]))
    with pytest.raises(ValueError, match="1 fixed weights for 2 modalities"):
        fixed_fusion_weights([1.0], ["a", "v"], present)


# ---- the method: one step, by hand -------------------------------------------------------------
def make_setup(options=None, modalities=2, optimizer="sgd", missing=0.0, batch_size=16, **trainer):
    mods = {"audio": {"dim": 6, "signal": 2.0}, "visual": {"dim": 5, "signal": 1.0}, "text": {"dim": 4, "signal": 0.5}}
    cfg = build_config({
        "trainer": {**FAST, "optimizer": optimizer, "batch_size": batch_size, "epochs": 1, "lr": 0.05,
                    "momentum": 0.9, "weight_decay": 0.01, **trainer},
        "data": {"missing_rate": missing},
        "model": {"feature_dim": 8},
    })
    splits = load_dataset("synthetic", {"num_samples": 96, "modalities": dict(list(mods.items())[:modalities])}, cfg.data)
    method = make_method("mla", options or {})
    tr = Trainer(splits, method, cfg, seed=0)
    torch.manual_seed(0)
    model = tr.build_model()
    optimizer_ = tr.build_optimizer(model.parameters())
    ctx = TrainContext(model=model, optimizer=optimizer_, config=cfg, info=splits.info, splits=splits, device=tr.device,
                       seed=0, make_loader=tr.make_loader, build_model=tr.build_model, build_optimizer=tr.build_optimizer)
    method.setup(ctx)
    loader = tr.make_loader(splits.train, shuffle=False)
    method.on_epoch_start(0, loader)
    return method, ctx, loader


def train_step(method, ctx, batch):
    output = ctx.model(batch)
    terms = method.loss(output, batch)
    method.backward(terms, output, batch)
    return terms


def spy_steps(ctx):
    """Wrap ctx.optimizer_step: remember, per step, the head's gradients and which parameters moved."""
    model, real_step, steps = ctx.model, ctx.optimizer_step, []

    def step():
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        head = model.fusion.head
        grads = (head.weight.grad.clone(), head.bias.grad.clone(), head.weight.detach().clone(), head.bias.detach().clone())
        real_step()
        moved = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
        steps.append({"grads": grads, "moved": moved})

    ctx.optimizer_step = step
    return steps


def raw_head_grads(features, labels, weight, bias):
    weight, bias = weight.clone().requires_grad_(), bias.clone().requires_grad_()
    loss = F.cross_entropy(F.linear(features, weight, bias), labels)
    return torch.autograd.grad(loss, (weight, bias))


def test_head_gradient_is_projected_in_paper_order():
    method, ctx, loader = make_setup()
    P0 = random_spd(8, 5)
    method.projection = P0.clone()
    steps = spy_steps(ctx)
    batch = next(iter(loader))
    with torch.no_grad():
        feats = copy.deepcopy(ctx.model).encode(batch)
    train_step(method, ctx, batch)
    assert len(steps) == 2
    # step 1 (audio): P_0; step 2 (visual): P_0 updated with audio's mean feature
    P1 = owm_update(P0, feats["audio"].double().mean(0), 0.1)
    for step, m, P in ((steps[0], "audio", P0), (steps[1], "visual", P1)):
        grad_w, grad_b, w, b = step["grads"]
        raw_w, raw_b = raw_head_grads(feats[m], batch.labels, w, b)
        torch.testing.assert_close(grad_w, raw_w @ P.float(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(grad_b, raw_b)  # bias untouched
        assert not torch.allclose(grad_w, raw_w, atol=1e-4)
    P2 = owm_update(P1, feats["visual"].double().mean(0), 0.1)
    torch.testing.assert_close(method.projection, P2)
    # the second modality's logits were recomputed with the head after the first step
    assert not torch.equal(steps[1]["grads"][2], steps[0]["grads"][2])


def test_released_projection_as_written_uses_the_current_feature_after_first_step():
    method, ctx, loader = make_setup({"variant": "released", "gradient_modification": True})
    steps = spy_steps(ctx)
    feats = []
    for batch in list(loader)[:2]:
        with torch.no_grad():
            feats.append(copy.deepcopy(ctx.model).encode(batch))
        train_step(method, ctx, batch)
    labels = [batch.labels for batch in list(loader)[:2]]
    grad_w, _, w, b = steps[0]["grads"]
    torch.testing.assert_close(grad_w, raw_head_grads(feats[0]["audio"], labels[0], w, b)[0])  # first step: none
    # later steps: P absorbs the CURRENT modality's mean feature, alpha from the schedule, then grad P^T
    P = torch.eye(8, dtype=torch.float64)
    for i, (batch_index, m) in enumerate([(0, "visual"), (1, "audio"), (1, "visual")], start=1):
        P = owm_update_released(P, feats[batch_index][m].double().mean(0), released_owm_alpha(batch_index, len(loader)))
        grad_w, _, w, b = steps[i]["grads"]
        expected = raw_head_grads(feats[batch_index][m], labels[batch_index], w, b)[0] @ P.T.float()
        torch.testing.assert_close(grad_w, expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(P, P.T)  # the released matrix is not symmetric: P^T matters
    torch.testing.assert_close(method.projection, P)


@pytest.mark.parametrize("options", [{"variant": "released"}, {"variant": "released", "gradient_modification": False}])
def test_released_head_never_projects_the_head_gradient(options):
    """At the released code's head the projection's name check never matches: every step applies the raw
    head gradient and P stays the identity."""
    method, ctx, loader = make_setup(options)
    steps = spy_steps(ctx)
    for batch in list(loader)[:2]:
        with torch.no_grad():
            feats = copy.deepcopy(ctx.model).encode(batch)
        n = len(steps)
        train_step(method, ctx, batch)
        for step, m in zip(steps[n:], method.order):
            grad_w, grad_b, w, b = step["grads"]
            raw_w, raw_b = raw_head_grads(feats[m], batch.labels, w, b)
            torch.testing.assert_close(grad_w, raw_w, rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(grad_b, raw_b, rtol=1e-4, atol=1e-6)
    assert len(steps) == 4
    torch.testing.assert_close(method.projection, torch.eye(8, dtype=torch.float64))
    assert not any(k.startswith("owm/") for k in method.pop_records())


def test_torch18_zero_grad_keeps_moving_encoders_stepped_earlier_in_the_batch():
    """SGD without momentum, weight decay wd: with zero gradients kept, the audio encoder (stepped first)
    decays by (1 - lr * wd) again during the visual step; the visual encoder, whose gradient the previous
    batch deleted, does not move during the audio step."""
    lr, wd = 0.05, 0.01
    for zero_grad, released in (("zeros", True), ("set_to_none", False)):
        options = {"variant": "released", "zero_grad": zero_grad} if released else {"zero_grad": zero_grad}
        method, ctx, loader = make_setup(options, momentum=0.0, weight_decay=wd, lr=lr)
        assert method.order == ("audio", "visual")
        model = ctx.model
        snapshots = []
        real_step = ctx.optimizer_step

        def step(real_step=real_step, snapshots=snapshots, model=model):
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
            real_step()
            snapshots.append((before, {n: p.detach().clone() for n, p in model.named_parameters()}))

        ctx.optimizer_step = step
        batches = list(loader)[:2]
        for batch in batches:
            train_step(method, ctx, batch)
        audio = [n for n, _ in model.named_parameters() if n.startswith("encoders.audio.")]
        visual = [n for n, _ in model.named_parameters() if n.startswith("encoders.visual.")]
        for batch_index in range(2):
            (a_before, a_after), (v_before, v_after) = snapshots[2 * batch_index: 2 * batch_index + 2]
            for n in visual:  # audio's step: the visual encoder has no gradient (deleted after each batch)
                assert torch.equal(a_before[n], a_after[n]), n
            for n in audio:  # visual's step
                if zero_grad == "zeros":
                    torch.testing.assert_close(v_after[n], v_before[n] * (1 - lr * wd))
                    assert not torch.equal(v_after[n], v_before[n])
                else:
                    assert torch.equal(v_after[n], v_before[n]), n


def test_released_fixed_weights_and_order_follow_modality_roles():
    """0.55 goes to the audio on audio-visual data and to the text on image-text data, whatever the
    dataset's order; the alternating steps follow the same slots."""
    from poise.data.base import DatasetInfo, ModalitySpec
    from poise.methods.mla import released_fixed_weights, released_slots

    av = DatasetInfo("t", {"visual": ModalitySpec("image", (1, 8, 8)), "audio": ModalitySpec("spectrogram", (1, 8, 8))}, 3)
    assert released_fixed_weights(av, ("visual", "audio")) == {"audio": 0.55, "visual": 0.45}
    it = DatasetInfo("t", {"img": ModalitySpec("image", (3, 8, 8)), "words": ModalitySpec("tokens", (5,), vocab_size=9)}, 3)
    assert released_fixed_weights(it, ("img", "words")) == {"words": 0.55, "img": 0.45}
    assert released_slots(it, ("img", "words")) == ("words", "img")
    avt = DatasetInfo("t", {m: ModalitySpec("sequence", (4, 3)) for m in ("text", "visual", "audio")}, 3)
    assert released_fixed_weights(avt, ("text", "visual", "audio")) == {"audio": 0.35, "visual": 0.25, "text": 0.40}
    flow = DatasetInfo("t", {m: ModalitySpec("frames", (2, 3, 8, 8)) for m in ("rgb", "flow")}, 3)
    assert released_fixed_weights(flow, ("rgb", "flow")) is None

    cfg = build_config({"trainer": FAST, "model": {"feature_dim": 8}})
    for names in (("image", "text"), ("text", "image")):
        splits = load_dataset("synthetic", {"num_samples": 60, "modalities": {m: {"dim": 4} for m in names}}, cfg.data)
        method = make_method("mla", {"variant": "released", "dynamic_fusion": False})
        tr = Trainer(splits, method, cfg, seed=0)
        model = tr.build_model()
        method.setup(TrainContext(model=model, optimizer=tr.build_optimizer(model.parameters()), config=cfg,
                                  info=splits.info, splits=splits, device=tr.device, seed=0, make_loader=tr.make_loader,
                                  build_model=tr.build_model, build_optimizer=tr.build_optimizer))
        assert method.order == ("text", "image")
        batch = next(iter(tr.make_loader(splits.test, shuffle=False)))
        with torch.no_grad():
            out = model.eval()(batch)
        weights = method.fusion_weights(out, batch)
        torch.testing.assert_close(weights["text"], torch.full((len(batch),), 0.55))
        torch.testing.assert_close(weights["image"], torch.full((len(batch),), 0.45))
    with pytest.raises(IncompatibleError, match="fixed_weights"):
        splits = load_dataset("synthetic", {"num_samples": 60, "modalities": {"rgb": {"dim": 4}, "flow": {"dim": 4}}}, cfg.data)
        Trainer(splits, make_method("mla", {"variant": "released", "dynamic_fusion": False}), cfg)
    named = make_method("mla", {"dynamic_fusion": False, "fixed_weights": {"flow": 1.0, "rgb": 3.0}})
    Trainer(splits, named, cfg)  # explicit weights per modality name: accepted


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_alternating_steps_move_only_the_stepped_encoder(optimizer):
    method, ctx, loader = make_setup({"modality_order": ["text", "audio", "visual"]}, modalities=3, optimizer=optimizer)
    steps = spy_steps(ctx)
    batches = list(loader)[:3]  # momentum buffers and Adam moments exist from the second batch on
    for batch in batches:
        train_step(method, ctx, batch)
    assert len(steps) == 9
    names = {m: {n for n, _ in ctx.model.named_parameters() if n.startswith(f"encoders.{m}.")} for m in ("audio", "visual", "text")}
    head = {"fusion.head.weight", "fusion.head.bias"}
    for i, step in enumerate(steps):
        m = ("text", "audio", "visual")[i % 3]
        assert step["moved"] == names[m] | head, (i, m)


def test_joint_ablation_takes_one_step_and_absorbs_every_mean():
    method, ctx, loader = make_setup({"alternate": False})
    steps = spy_steps(ctx)
    batch = next(iter(loader))
    with torch.no_grad():
        feats = copy.deepcopy(ctx.model).encode(batch)
    train_step(method, ctx, batch)
    assert len(steps) == 1
    assert any(n.startswith("encoders.audio.") for n in steps[0]["moved"])
    assert any(n.startswith("encoders.visual.") for n in steps[0]["moved"])
    P = torch.eye(8, dtype=torch.float64)
    for m in ("audio", "visual"):
        P = owm_update(P, feats[m].double().mean(0), 0.1)
    torch.testing.assert_close(method.projection, P)


def test_without_gradient_modification_the_head_gradient_is_raw():
    method, ctx, loader = make_setup({"gradient_modification": False})
    steps = spy_steps(ctx)
    batch = next(iter(loader))
    with torch.no_grad():
        feats = copy.deepcopy(ctx.model).encode(batch)
    train_step(method, ctx, batch)
    grad_w, grad_b, w, b = steps[0]["grads"]
    raw_w, raw_b = raw_head_grads(feats["audio"], batch.labels, w, b)
    torch.testing.assert_close(grad_w, raw_w)
    torch.testing.assert_close(method.projection, torch.eye(8, dtype=torch.float64))


def test_a_modality_absent_from_the_batch_is_skipped_and_present_rows_only_train():
    method, ctx, loader = make_setup()
    steps = spy_steps(ctx)
    batch = next(iter(loader))
    batch.present[:, 1] = False  # no visual sample
    batch.present[:4, 0] = False  # audio present on rows 4..
    with torch.no_grad():
        feats = copy.deepcopy(ctx.model).encode(batch)
    terms = train_step(method, ctx, batch)
    assert len(steps) == 1
    grad_w, _, w, b = steps[0]["grads"]
    raw_w, _ = raw_head_grads(feats["audio"][4:], batch.labels[4:], w, b)
    torch.testing.assert_close(grad_w, raw_w, rtol=1e-4, atol=1e-6)
    assert terms["ce_visual"].item() == 0.0


def test_predict_fuses_per_sample_over_present_modalities():
    method, ctx, loader = make_setup()
    batch = next(iter(loader))
    batch.present[0, 1] = False
    ctx.model.eval()
    with torch.no_grad():
        out = ctx.model(batch)
        fused = method.predict(out, batch)
    w = entropy_fusion_weights(out.unimodal_logits, batch.present)
    z = out.unimodal_logits
    torch.testing.assert_close(fused, w["audio"].unsqueeze(1) * z["audio"] + w["visual"].unsqueeze(1) * z["visual"])
    torch.testing.assert_close(fused[0], out.unimodal_logits["audio"][0])
    assert "fusion_weight/audio" in method.pop_records()

    fixed, _, _ = make_setup({"dynamic_fusion": False, "fixed_weights": [3.0, 1.0]})
    fixed.ctx.model.load_state_dict(ctx.model.state_dict())
    with torch.no_grad():
        out = fixed.ctx.model.eval()(batch)
        fused = fixed.predict(out, batch)
    torch.testing.assert_close(fused[1], 0.75 * out.unimodal_logits["audio"][1] + 0.25 * out.unimodal_logits["visual"][1])
    torch.testing.assert_close(fused[0], out.unimodal_logits["audio"][0])

    released, _, _ = make_setup({"variant": "released"})
    with torch.no_grad():
        out = released.ctx.model.eval()(batch)
        weights = released.fusion_weights(out, batch)
    per_batch = entropy_fusion_weights_released(out.unimodal_logits, batch.present)
    torch.testing.assert_close(weights["visual"][1:], per_batch["visual"].expand(len(batch) - 1))


def test_state_dict_round_trip():
    method, ctx, loader = make_setup()
    for batch in list(loader)[:2]:
        train_step(method, ctx, batch)
    state = method.state_dict()
    fresh, _, _ = make_setup()
    assert not torch.allclose(fresh.projection, method.projection)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.projection, method.projection)
    assert (fresh.owm_steps, fresh.batch_index, fresh.batches_per_epoch) == (4, 2, len(loader))


def test_registered_with_the_shared_head():
    method = make_method("mla")
    assert isinstance(method, MLA) and method.owns_optimizer_step
    method, ctx, _ = make_setup()
    assert type(ctx.model.fusion).__name__ == "SharedHeadFusion"
    torch.testing.assert_close(method.projection, torch.eye(8, dtype=torch.float64))


def test_refusals():
    cfg = build_config({"trainer": FAST})
    splits = load_dataset("synthetic", {"num_samples": 60}, cfg.data)
    with pytest.raises(IncompatibleError, match="fixed_weights"):
        Trainer(splits, make_method("mla", {"fixed_weights": [1.0]}), cfg)
    with pytest.raises(IncompatibleError, match="modality_order"):
        Trainer(splits, make_method("mla", {"modality_order": ["audio"]}), cfg)
    with pytest.raises(IncompatibleError, match="shared"):
        Trainer(splits, make_method("mla"), build_config({"trainer": FAST, "model": {"fusion": "concat"}}))
    with pytest.raises(ConfigError, match="'method.mla.fixed_weights'.*non-negative with a positive sum"):
        make_method("mla", {"fixed_weights": [-1.0, 2.0]})
    with pytest.raises(ConfigError, match="'official' for 'method.mla.variant'.*'paper' or 'released'"):
        make_method("mla", {"variant": "official"})


# ---- end to end --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("modalities", "missing", "options"),
    [(2, 0.0, {}), (3, 0.0, {}), (2, 0.3, {}), (3, 0.3, {"variant": "released"}), (2, 0.0, {"alternate": False, "dynamic_fusion": False})],
)
def test_mla_trains(modalities, missing, options):
    mods = {"audio": {"dim": 8, "signal": 2.0}, "visual": {"dim": 8, "signal": 1.0}, "text": {"dim": 8, "signal": 1.0}}
    cfg = build_config({"trainer": {**FAST, "epochs": 3, "lr": 0.05, "batch_size": 32}, "data": {"missing_rate": missing}})
    splits = load_dataset("synthetic", {"num_samples": 240, "modalities": dict(list(mods.items())[:modalities])}, cfg.data)
    result = Trainer(splits, make_method("mla", options), cfg, seed=0).fit()
    assert result.test["accuracy"] > 0.45  # 4 classes: chance is 0.25
    assert all(math.isfinite(v) for v in result.history[-1]["train_terms"].values())
    records = result.history[-1]["method"]
    assert set(f"fusion_weight/{m}" for m in list(mods)[:modalities]) <= set(records)
    if options.get("alternate", True):
        assert len(result.history[-1]["train_terms"]) == modalities
        if options.get("variant") == "released":  # its projection never runs
            assert "owm/trace" not in records
        else:
            assert "owm/trace" in records and records["owm/trace"] < 64
