"""Mixed precision and gradient accumulation keep every gradient-editing method correct: methods see the
final gradient (unscaled, accumulated) once per optimizer step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import fast_config, synthetic
from poise.methods import make_method
from poise.train import Trainer
from poise.train.engine import StepEngine


def spy(method, log: dict):
    """Record, around the method's own hooks, the forward's dtype and the gradients after_backward saw."""
    loss, after = method.loss, method.after_backward
    log.update(dtypes=set(), grads=[], steps=0, micro=0)

    def spy_loss(output, batch):
        log["dtypes"].add(output.logits.dtype)
        log["micro"] += 1
        return loss(output, batch)

    def spy_after(output, batch):
        log["steps"] += 1
        log["seen"] = len(batch)
        before = [p.grad.detach().clone() for p in method.ctx.model.parameters() if p.grad is not None]
        log.setdefault("before", []).append(before)
        after(output, batch)
        log["grads"].append([p.grad.detach().clone() for p in method.ctx.model.parameters() if p.grad is not None])

    method.loss, method.after_backward = spy_loss, spy_after
    return method


@pytest.mark.parametrize("name", ["ogm_ge", "mla"])
def test_bf16_autocast_trains_end_to_end(name):
    splits, _ = synthetic(2)
    cfg = fast_config(trainer={"epochs": 2, "amp": "bf16"})
    log: dict = {}
    method = spy(make_method(name), log)
    result = Trainer(splits, method, cfg, seed=0).fit()
    assert log["dtypes"] == {torch.bfloat16}  # the forward ran under autocast
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert result.test["accuracy"] > 0.5  # four classes: chance is 0.25
    if name == "mla":
        assert not torch.allclose(method.projection, torch.eye(len(method.projection), dtype=torch.float64))


def test_engine_unscales_before_methods_read_gradients():
    """fp16 on CPU: the loss is multiplied by the scaler's 65536 for backward; what a method reads after
    ``finish_gradients`` is the true gradient, and the step applies that same gradient."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    reference = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    cfg = fast_config(trainer={"amp": "fp16", "momentum": 0.0, "weight_decay": 0.0, "lr": 0.1})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = StepEngine(model, optimizer, cfg, torch.device("cpu"), "test", owns_optimizer_step=False)
    assert engine.scaler is not None and engine.scaler.get_scale() == 65536.0
    engine.backward(nn.functional.cross_entropy(model(x), y))
    assert torch.allclose(model.weight.grad, reference[0] * 65536.0)  # still scaled after backward
    engine.finish_gradients()
    for p, g in zip(model.parameters(), reference):
        assert torch.allclose(p.grad, g, atol=1e-7)
    before = [p.detach().clone() for p in model.parameters()]
    engine.optimizer_step()
    for p, b, g in zip(model.parameters(), before, reference):
        assert torch.allclose(p.detach(), b - 0.1 * g, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("name", ["ogm_ge", "mla", pytest.param("gblend", marks=pytest.mark.slow), "uncertainty"])
def test_fp16_with_scaler_trains_and_methods_see_unscaled_gradients(name):
    splits, _ = synthetic(2, num_samples=160)
    logs: dict[str, dict] = {}
    results = {}
    for amp in ("none", "fp16"):
        cfg = fast_config(trainer={"epochs": 1, "amp": amp})
        logs[amp] = {}
        method = make_method(name, {"estimate_epochs": 1} if name == "gblend" else {})
        if name != "mla":  # mla owns the step: no after_backward
            method = spy(method, logs[amp])
        trainer = Trainer(splits, method, cfg, seed=0)
        results[amp] = trainer.fit()
        if amp == "fp16":
            assert trainer.engine.scaler.get_scale() > 1000.0
    assert all(math.isfinite(h["train_loss"]) for h in results["fp16"].history)
    if name != "mla":
        assert logs["fp16"]["dtypes"] == {torch.float16}
        # first step: same weights, so the fp16 gradient is the fp32 one up to half-precision rounding,
        # not 65536 times it
        g16 = torch.cat([g.flatten() for g in logs["fp16"]["before"][0]])
        g32 = torch.cat([g.flatten() for g in logs["none"]["before"][0]])
        assert torch.linalg.vector_norm(g16 - g32) / torch.linalg.vector_norm(g32) < 0.02


#: methods (with options) that decide nothing from a single micro-batch: a step of two micro-batches
#: must train exactly as one step on the whole batch
DECIDE_PER_STEP = {
    "joint": {}, "unimodal:audio": {}, "ogm": {}, "ogm_ge": {}, "boost_weak": {},
    "boost_weak[lr]": {"mode": "lr"}, "uncertainty": {}, "distill[fixed teacher]": {"teacher": "audio"},
    "gblend": {"estimate_epochs": 1}, "umt": {"teacher_epochs": 1},
    "mmcosine": {}, "agm": {}, "inforeg": {}, "relearning": {}, "valuation": {}, "reconboost": {"epochs_per_phase": 1},
    "modulate": {}, "modulate[lr boost]": {"actuator": "lr", "direction": "boost_weak"},
    "mbsd": {}, "arl": {}, "greedy[at once]": {"start_epoch": 0},
    "lfm": {}, "lfm[learnable]": {"schedule": "learnable"},
    "g2d": {"teacher_epochs": 1}, "remix": {"warmup_epochs": 0},
}
#: methods that decide per batch (a coin, a ratio, a teacher) or take their own steps: they refuse
REFUSE = {"opm": {}, "distill": {}, "distill[weakest student]": {"teacher": "audio", "students": "weakest"},
          "mla": {}, "ume": {}, "pmr": {}, "mmpareto": {}, "modulate[loss_weight]": {"actuator": "loss_weight"},
          "modulate[feature_drop]": {"actuator": "feature_drop"}, "amco": {}, "dimml": {}, "cggm": {}, "cml": {}}
#: per-sample random draws: the law of a decision does not depend on how a step is split
PER_SAMPLE = {"modality_dropout"}


def test_every_method_is_classified_for_accumulation():
    from poise.methods import METHODS

    names = {k.split("[")[0].split(":")[0] for k in [*DECIDE_PER_STEP, *REFUSE]} | PER_SAMPLE
    assert names == set(METHODS)


@pytest.mark.parametrize("case", list(DECIDE_PER_STEP))
def test_accumulating_two_micro_batches_equals_one_batch(case):
    name, options = case.split("[")[0], DECIDE_PER_STEP[case]
    splits, _ = synthetic(2, num_samples=160)
    logs, records, histories, models = {}, {}, {}, {}
    for accumulate in (1, 2):
        cfg = fast_config(trainer={"epochs": 1, "accumulate": accumulate, "batch_size": 32})
        log: dict = {}
        method = spy(make_method(name, options), log)
        steps: list[tuple[str, float]] = []
        record = method.record
        method.record = lambda k, v, record=record, steps=steps: (steps.append((k, float(v.detach() if isinstance(v, torch.Tensor) else v))), record(k, v))
        trainer = Trainer(splits, method, cfg, seed=0, method_name=name)
        result = trainer.fit()
        logs[accumulate], records[accumulate], histories[accumulate] = log, steps, result.history
        models[accumulate] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    one, two = logs[1], logs[2]
    assert two["micro"] == 2 * one["micro"] and two["steps"] == one["steps"]  # after_backward once per step
    assert one["seen"] == two["seen"]  # it saw the whole step's batch
    for step_one, step_two in zip(one["grads"], two["grads"]):
        for a, b in zip(step_one, step_two):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    # every decision taken once per step has the same value; loss-time records repeat once per micro-batch
    after = {k for k, _ in records[1]} - {k for k, _ in records[1] if k.startswith(("weight/", "kd", "teacher/", "fallback_uniform", "cos_true/"))}
    assert [v for k, v in records[1] if k in after] == pytest.approx([v for k, v in records[2] if k in after], abs=1e-5)
    for h1, h2 in zip(histories[1], histories[2]):
        assert h1["method"] == pytest.approx(h2["method"], abs=1e-5)
    for key, value in models[1].items():
        assert torch.allclose(value.float(), models[2][key].float(), atol=1e-5), key


@pytest.mark.parametrize("case", list(REFUSE))
def test_methods_that_decide_per_batch_refuse_accumulation_and_train_without(case):
    from poise.errors import IncompatibleError

    name, options = case.split("[")[0], REFUSE[case]
    splits, _ = synthetic(2, num_samples=120)
    with pytest.raises(IncompatibleError, match=f"method '{name}' .*set trainer.accumulate to 1"):
        Trainer(splits, make_method(name, options), fast_config(trainer={"accumulate": 2}))
    Trainer(splits, make_method(name, options), fast_config(trainer={"accumulate": 1}))


def test_methods_that_own_the_step_refuse_accumulation():
    from poise.errors import IncompatibleError

    splits, _ = synthetic(2)
    cfg = fast_config(trainer={"accumulate": 2})
    with pytest.raises(IncompatibleError, match="set trainer.accumulate to 1"):
        Trainer(splits, make_method("mla"), cfg)
