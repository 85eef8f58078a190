"""boost_weak, uncertainty, distill and modality_dropout: functional cores against hand-computed values
and naive loops, the hooks' effect on one step, and end-to-end training."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_context, synthetic
from poise.errors import ConfigError, IncompatibleError
from poise.functional.extensions import (
    batch_confidence_ratios,
    boost_coefficients_from_ratios,
    cross_modal_distillation,
    distillation_kl,
    distillation_roles,
    modality_dropout_mask,
    modality_dropout_scale,
    uncertainty_weighted_loss,
    weak_boost_coefficients,
)
from poise.methods import make_method
from poise.train import Trainer


def naive_scores(logits: dict, labels, present=None):
    """sum over samples having every modality of the true-class probability, one sample at a time."""
    names = list(logits)
    scores = {m: 0.0 for m in names}
    for i in range(len(labels)):
        if present is not None and not all(bool(present[i, j]) for j in range(len(names))):
            continue
        for m in names:
            row = [math.exp(float(v)) for v in logits[m][i]]
            scores[m] += row[int(labels[i])] / sum(row)
    return scores


def random_logits(names, b=12, c=4, seed=0, scale=None):
    g = torch.Generator().manual_seed(seed)
    scale = scale or {m: 1.0 for m in names}
    return {m: torch.randn(b, c, generator=g) * scale[m] for m in names}, torch.randint(0, c, (b,), generator=g)


# ---- boost_weak: functional ---------------------------------------------------------------------------
def test_boost_coefficients_two_modalities_by_hand():
    alpha = 0.7
    k = boost_coefficients_from_ratios(torch.tensor([2.5, 0.4]), alpha)
    assert k[0].item() == 1.0
    assert k[1].item() == pytest.approx(1 + math.tanh(alpha * (2.5 - 1)))
    # balanced: nobody is boosted
    assert torch.equal(boost_coefficients_from_ratios(torch.tensor([1.0, 1.0]), alpha), torch.ones(2))


def test_boost_coefficients_three_modalities_targets():
    alpha = 1.3
    ratios = torch.tensor([1.6, 0.8, 0.5])
    below = boost_coefficients_from_ratios(ratios, alpha, "below_one")
    expected = [1.0, 1 + math.tanh(alpha * (1 / 0.8 - 1)), 1 + math.tanh(alpha * (1 / 0.5 - 1))]
    assert below.tolist() == pytest.approx(expected)
    weakest = boost_coefficients_from_ratios(ratios, alpha, "weakest")
    assert weakest.tolist() == pytest.approx([1.0, 1.0, expected[2]])


def test_weak_boost_coefficients_match_naive_scores():
    alpha = 0.9
    logits, labels = random_logits(["audio", "visual"], scale={"audio": 3.0, "visual": 0.3})
    coefficients, ratios = weak_boost_coefficients(logits, labels, alpha)
    s = naive_scores(logits, labels)
    rho_a = s["audio"] / s["visual"]
    assert ratios["audio"].item() == pytest.approx(rho_a, rel=1e-5)
    rho_dom = max(rho_a, 1 / rho_a)
    weak = "visual" if rho_a > 1 else "audio"
    assert coefficients[weak].item() == pytest.approx(1 + math.tanh(alpha * max(rho_dom - 1, 0)), rel=1e-5)
    assert coefficients["audio" if weak == "visual" else "visual"].item() == 1.0


def test_weak_boost_coefficients_with_missing_modalities():
    logits, labels = random_logits(["a", "b", "c"], b=10, scale={"a": 2.0, "b": 1.0, "c": 0.2})
    present = torch.ones(10, 3, dtype=torch.bool)
    present[:4, 1] = False
    coefficients, ratios = weak_boost_coefficients(logits, labels, 1.0, present)
    s = naive_scores(logits, labels, present)
    for m in "abc":
        others = sum(v for k, v in s.items() if k != m) / 2
        assert ratios[m].item() == pytest.approx(s[m] / others, rel=1e-5)
        assert coefficients[m].item() == pytest.approx(1 + math.tanh(max(others / s[m] - 1, 0)), rel=1e-5)
    # no sample has every modality: nothing is decided
    none_complete = present.clone()
    none_complete[:, 1] = False
    coefficients, _ = weak_boost_coefficients(logits, labels, 1.0, none_complete)
    assert all(k.item() == 1.0 for k in coefficients.values())


# ---- uncertainty: functional --------------------------------------------------------------------------
def test_uncertainty_weighted_loss_regression_form_by_hand_and_minimiser():
    losses = torch.tensor([0.8, 2.0, 0.1])
    s = torch.tensor([0.0, math.log(2.0), -1.0])
    out = uncertainty_weighted_loss(losses, s, form="regression")
    assert out.tolist() == pytest.approx([0.8, 2.0 / 2.0 + math.log(2.0), 0.1 * math.e - 1.0])
    masked = uncertainty_weighted_loss(losses, s, torch.tensor([True, False, True]), form="regression")
    assert masked[1].item() == 0.0 and masked[0].item() == pytest.approx(0.8)
    # the optimum of exp(-s) L + s is s = log L (weight 1 / L)
    s_opt = torch.log(losses).requires_grad_(True)
    uncertainty_weighted_loss(losses, s_opt, form="regression").sum().backward()
    assert s_opt.grad.abs().max().item() < 1e-6


def test_uncertainty_weighted_loss_classification_form_is_the_default_by_hand():
    losses = torch.tensor([0.8, 2.0, 0.1])
    s = torch.tensor([0.0, math.log(2.0), -1.0])
    out = uncertainty_weighted_loss(losses, s)
    # exp(-s) L + s / 2: 0.8 + 0; 2 / 2 + log(2) / 2; 0.1 e - 1/2
    assert out.tolist() == pytest.approx([0.8, 1.0 + math.log(2.0) / 2, 0.1 * math.e - 0.5])
    assert uncertainty_weighted_loss(losses, s, form="classification").tolist() == out.tolist()
    masked = uncertainty_weighted_loss(losses, s, torch.tensor([True, False, True]))
    assert masked[1].item() == 0.0 and masked[2].item() == pytest.approx(0.1 * math.e - 0.5)
    # d/ds (exp(-s) L + s / 2) = 0 at exp(-s) = 1 / (2 L), i.e. s = log(2 L); not at s = log L
    s_opt = torch.log(2 * losses).requires_grad_(True)
    uncertainty_weighted_loss(losses, s_opt).sum().backward()
    assert s_opt.grad.abs().max().item() < 1e-6
    s_reg = torch.log(losses).requires_grad_(True)
    uncertainty_weighted_loss(losses, s_reg).sum().backward()
    assert s_reg.grad.tolist() == pytest.approx([-0.5, -0.5, -0.5])
    with pytest.raises(ValueError, match="form"):
        uncertainty_weighted_loss(losses, s, form="poisson")


# ---- distill: functional ------------------------------------------------------------------------------
def test_distillation_kl_matches_naive_and_detaches_teacher():
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(5, 3, generator=g) * 3).requires_grad_(True)
    teacher = (torch.randn(5, 3, generator=g) * 3).requires_grad_(True)
    t = 3.0
    out = distillation_kl(student, teacher, t)
    for i in range(5):
        zt = [math.exp(float(v) / t) for v in teacher[i].detach()]
        zs = [math.exp(float(v) / t) for v in student[i].detach()]
        pt = [v / sum(zt) for v in zt]
        ps = [v / sum(zs) for v in zs]
        kl = sum(a * math.log(a / b) for a, b in zip(pt, ps))
        assert out[i].item() == pytest.approx(kl * t * t, rel=1e-4, abs=1e-6)
    out.sum().backward()
    assert teacher.grad is None and student.grad is not None


def test_distillation_roles():
    ratios = torch.tensor([0.5, 2.0, 0.9])
    teacher, students = distillation_roles(ratios)
    assert teacher.tolist() == [0, 1, 0] and students.tolist() == [1, 0, 1]
    _, students = distillation_roles(ratios, students="weakest")
    assert students.tolist() == [1, 0, 0]
    teacher, students = distillation_roles(ratios, teacher=0, students="weakest")
    assert teacher.tolist() == [1, 0, 0] and students.tolist() == [0, 0, 1]
    _, students = distillation_roles(ratios, valid=torch.tensor(False))
    assert students.tolist() == [0, 0, 0]


@pytest.mark.parametrize("students", ["all", "weakest"])
def test_cross_modal_distillation_matches_naive_loop(students):
    names = ["a", "b", "c"]
    logits, labels = random_logits(names, b=9, scale={"a": 3.0, "b": 1.0, "c": 0.3})
    present = torch.ones(9, 3, dtype=torch.bool)
    present[0, 0] = False  # no teacher for sample 0
    present[1:3, 2] = False
    t = 2.0
    ratios, valid = batch_confidence_ratios(logits, labels, present)
    teacher, weights = distillation_roles(ratios, valid, students=students)
    got = cross_modal_distillation(logits, teacher, weights, t, present)
    ti = int(teacher.argmax())
    per_student = {}
    for j, m in enumerate(names):
        if weights[j] == 0:
            continue
        rows = [i for i in range(9) if present[i, j] and present[i, ti]]
        per_student[m] = sum(float(distillation_kl(logits[m][i : i + 1], logits[names[ti]][i : i + 1], t)) for i in rows) / len(rows)
    assert got.item() == pytest.approx(sum(per_student.values()) / len(per_student), rel=1e-5)


# ---- modality_dropout: functional ---------------------------------------------------------------------
def test_modality_dropout_mask_matches_naive_loop():
    b, m = 40, 3
    gen = torch.Generator().manual_seed(3)
    present = torch.rand(b, m, generator=gen) > 0.3
    p = torch.tensor([0.6, 0.3, 0.8])
    keep = modality_dropout_mask(present, p, torch.Generator().manual_seed(7))
    replay = torch.Generator().manual_seed(7)
    u, v = torch.rand(b, m, generator=replay), torch.rand(b, m, generator=replay)
    for i in range(b):
        expected = [bool(present[i, j]) and not float(u[i, j]) < float(p[j]) for j in range(m)]
        if not any(expected):
            candidates = [j for j in range(m) if present[i, j]]
            if candidates:
                chosen = max(candidates, key=lambda j: float(v[i, j]))
                expected = [j == chosen for j in range(m)]
        assert keep[i].tolist() == expected


def test_modality_dropout_mask_rules_and_rate():
    n = 20000
    present = torch.ones(n, 2, dtype=torch.bool)
    present[:5000, 1] = False  # a quarter of the samples only have modality 0
    keep = modality_dropout_mask(present, torch.tensor([0.5, 0.5]), torch.Generator().manual_seed(0))
    assert not (keep & ~present).any()
    assert keep.any(dim=1).all()
    assert keep[:5000, 0].all()  # the only present modality is never dropped
    # both present: P(dropped) = p - p^2 / 2 (both drawn dropped, then one of the two restored)
    assert (~keep[5000:, 0]).float().mean().item() == pytest.approx(0.375, abs=0.015)
    scale = modality_dropout_scale(keep, torch.tensor([0.5, 0.2]), rescale=True)
    assert set(scale[:, 0].unique().tolist()) <= {0.0, 2.0} and set(scale[:, 1].unique().tolist()) <= {0.0, 1.25}


# ---- hooks on one step --------------------------------------------------------------------------------
def test_boost_weak_grad_mode_scales_only_the_weak_encoder():
    splits, cfg = synthetic(2)
    method = make_method("boost_weak", {"alpha": 1.0})
    ctx, batch = make_context(method, splits, cfg)
    output = ctx.model(batch)
    torch.stack(list(method.loss(output, batch).values())).sum().backward()
    before = {n: p.grad.clone() for n, p in ctx.model.named_parameters()}
    method.after_backward(output, batch)
    coefficients, _ = weak_boost_coefficients(output.unimodal_logits, batch.labels, 1.0, batch.present)
    weak, dominant = sorted(coefficients, key=lambda m: -coefficients[m].item())
    assert coefficients[weak].item() > 1.0 and coefficients[dominant].item() == 1.0
    for n, p in ctx.model.named_parameters():
        k = coefficients[weak] if n.startswith(f"encoders.{weak}.") else 1.0
        assert torch.allclose(p.grad, before[n] * k), n
    assert method.pop_records()[f"coef/{weak}"] == pytest.approx(coefficients[weak].item())


def test_boost_weak_lr_mode_equals_grad_mode_for_plain_sgd_and_restores_lr():
    splits, cfg = synthetic(2, trainer={"momentum": 0.0, "weight_decay": 0.0})
    params = {}
    for mode in ("grad", "lr"):
        method = make_method("boost_weak", {"alpha": 1.0, "mode": mode})
        ctx, batch = make_context(method, splits, cfg)
        output = ctx.model(batch)
        torch.stack(list(method.loss(output, batch).values())).sum().backward()
        method.after_backward(output, batch)
        if mode == "lr":
            lrs = sorted(g["lr"] for g in ctx.optimizer.param_groups)
            assert lrs[0] == cfg.trainer.lr and lrs[-1] > cfg.trainer.lr
            assert len(ctx.optimizer.param_groups) == 3  # head + one per encoder
        ctx.optimizer.step()
        assert all(g["lr"] == cfg.trainer.lr for g in ctx.optimizer.param_groups)
        params[mode] = [p.detach().clone() for p in ctx.model.parameters()]
    for a, b in zip(params["grad"], params["lr"]):
        assert torch.allclose(a, b, atol=1e-6)


def test_boost_weak_lr_mode_leaves_the_schedule_intact():
    splits, cfg = synthetic(2, trainer={"epochs": 3, "scheduler": "step", "step_size": 1, "gamma": 0.5})
    method = make_method("boost_weak", {"mode": "lr", "modulation_ends": 1})
    result = Trainer(splits, method, cfg, seed=0).fit()
    lrs = [g["lr"] for g in method.ctx.optimizer.param_groups]
    assert lrs == pytest.approx([cfg.trainer.lr * 0.5**3] * 3)
    assert "coef/visual" in result.history[1]["method"] and "coef/visual" not in result.history[2]["method"]


def test_uncertainty_loss_terms_and_parameter_group():
    splits, cfg = synthetic(2, missing_rate=0.3)
    method = make_method("uncertainty", {"init_log_variance": 0.5})
    ctx, batch = make_context(method, splits, cfg)
    assert ctx.optimizer.param_groups[-1]["params"][0] is method.log_variances
    assert ctx.optimizer.param_groups[-1]["weight_decay"] == 0.0
    output = ctx.model(batch)
    terms = method.loss(output, batch)
    fused = F.cross_entropy(output.logits, batch.labels)
    assert terms["ce_fused"].item() == pytest.approx(math.exp(-0.5) * fused.item() + 0.25, rel=1e-5)
    rows = batch.present_of("visual")
    visual = F.cross_entropy(output.unimodal_logits["visual"][rows], batch.labels[rows])
    assert terms["ce_visual"].item() == pytest.approx(math.exp(-0.5) * visual.item() + 0.25, rel=1e-5)
    assert method.pop_records()["weight/audio"] == pytest.approx(math.exp(-0.5))
    regression = make_method("uncertainty", {"init_log_variance": 0.5, "form": "regression"})
    ctx, _ = make_context(regression, splits, cfg)
    terms = regression.loss(output, batch)
    assert terms["ce_fused"].item() == pytest.approx(math.exp(-0.5) * fused.item() + 0.5, rel=1e-5)


def test_distill_loss_and_teacher_choice():
    splits, cfg = synthetic(2)
    method = make_method("distill", {"lambda": 0.5, "temperature": 3.0, "teacher": "visual"})
    ctx, batch = make_context(method, splits, cfg)
    output = ctx.model(batch)
    terms = method.loss(output, batch)
    z = output.unimodal_logits
    expected = distillation_kl(z["audio"], z["visual"], 3.0).mean()
    assert terms["kd"].item() == pytest.approx(0.5 * expected.item(), rel=1e-5)
    assert terms["ce"].item() == pytest.approx(F.cross_entropy(output.logits, batch.labels).item())
    records = method.pop_records()
    assert records["teacher/visual"] == 1.0 and records["teacher/audio"] == 0.0


def test_modality_dropout_plan_and_eval_untouched():
    splits, cfg = synthetic(3, missing_rate=0.3)
    method = make_method("modality_dropout", {"p": {"audio": 0.75, "text": 0.5}, "rescale": True})
    ctx, batch = make_context(method, splits, cfg)
    plan = method.on_step_start(batch)
    scale = torch.stack([plan.feature_scale[m] for m in ("audio", "visual", "text")], dim=1)
    assert ((scale > 0) & ~batch.present).sum() == 0
    assert ((scale > 0) | ~batch.present.any(dim=1, keepdim=True)).any(dim=1).all()
    assert set(plan.feature_scale["visual"].unique().tolist()) <= {0.0, 1.0}  # p = 0: only restores, never drops
    assert set(plan.feature_scale["audio"].unique().tolist()) <= {0.0, 4.0}
    assert (plan.feature_scale["visual"][batch.present_of("visual")] == 1).all()
    output = ctx.model(batch)
    assert torch.equal(method.predict(output, batch), output.logits)


def test_start_up_refusals():
    splits, cfg = synthetic(2)
    with pytest.raises(IncompatibleError, match="teacher 'text'"):
        Trainer(splits, make_method("distill", {"teacher": "text"}), cfg)
    with pytest.raises(IncompatibleError, match="'vision'.*did you mean 'visual'"):
        Trainer(splits, make_method("modality_dropout", {"p": {"vision": 0.3}}), cfg)
    with pytest.raises(ConfigError, match=r"\[0, 1\)"):
        make_method("modality_dropout", {"p": 1.0})
    with pytest.raises(ConfigError, match="modulation_ends"):
        make_method("boost_weak", {"modulation_starts": 3, "modulation_ends": 1})
    unimodal_splits, unimodal_cfg = synthetic(1)
    for name in ("boost_weak", "uncertainty", "distill", "modality_dropout"):
        with pytest.raises(IncompatibleError, match="at least 2 modalities"):
            Trainer(unimodal_splits, make_method(name), unimodal_cfg)


# ---- end to end ---------------------------------------------------------------------------------------
CASES = {
    "boost_weak": ({"alpha": 1.0}, "coef/visual"),
    "uncertainty": ({}, "weight/fused"),
    "distill": ({}, "teacher/audio"),
    "modality_dropout": ({"p": 0.3}, "drop_rate/audio"),
}


@pytest.mark.parametrize("num_modalities,missing_rate", [(2, 0.0), (3, 0.3)])
@pytest.mark.parametrize("name", list(CASES))
def test_method_trains_end_to_end(name, num_modalities, missing_rate):
    options, record = CASES[name]
    splits, cfg = synthetic(num_modalities, missing_rate=missing_rate, num_samples=320, trainer={"epochs": 3})
    method = make_method(name, options)
    result = Trainer(splits, method, cfg, seed=0).fit()
    # 4 classes, chance 0.25; joint reaches about 0.70 (two modalities) and 0.46 (three, 30% missing) here
    assert result.test["accuracy"] > (0.55 if missing_rate == 0 else 0.38)
    assert all(record in h["method"] for h in result.history)
    state = method.state_dict()  # its round trip into a fresh run is checked for every method in test_conformance
    if name == "uncertainty":
        assert not torch.equal(state["log_variances"], torch.zeros(num_modalities + 1))  # learned
        assert len(state["log_variances"]) == num_modalities + 1
