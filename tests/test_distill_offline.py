"""``distill`` with ``mode=offline``: a separately trained (or loaded) strong-modality teacher, logit
distillation into the weak modality, optional feature alignment through a learned projection; the
loss against values computed by hand from the teacher's own outputs."""

import math

import pytest
import torch

from conftest import make_context, synthetic
from poise.errors import ConfigError, IncompatibleError
from poise.methods import make_method
from poise.methods.teachers import load_unimodal_model
from poise.train import Trainer


def naive_kd(student, teacher, t):
    """Mean over rows of T^2 KL(softmax(teacher / T) || softmax(student / T)), one row at a time."""
    total = 0.0
    for zs, zt in zip(student.tolist(), teacher.tolist()):
        es, et = [math.exp(v / t) for v in zs], [math.exp(v / t) for v in zt]
        ps, pt = [v / sum(es) for v in es], [v / sum(et) for v in et]
        total += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    return total / len(student) * t * t


@pytest.fixture(scope="module")
def visual_checkpoint(tmp_path_factory):
    splits, cfg = synthetic(2, num_samples=200)
    out = tmp_path_factory.mktemp("visual")
    Trainer(splits, make_method("unimodal:visual"), cfg, seed=0, out_dir=out).fit()
    return out / "best.pt"


def test_offline_loss_by_hand_with_a_loaded_teacher(visual_checkpoint):
    splits, cfg = synthetic(2, num_samples=200)
    method = make_method("distill", {"mode": "offline", "teacher": "visual", "lambda": 0.5, "temperature": 3.0,
                                     "teacher_checkpoints": {"visual": str(visual_checkpoint)}, "align_weight": 2.0})
    ctx, batch = make_context(method, splits, cfg)
    assert method.teacher_modality == "visual" and set(method.projections) == {"audio"}
    assert ctx.optimizer.param_groups[-1]["params"] == list(method.projections.parameters())
    output = ctx.model(batch)
    terms = method.loss(output, batch)
    teacher = load_unimodal_model(splits.info, "visual", visual_checkpoint).eval()
    with torch.no_grad():
        taught = teacher(batch)
    kd = naive_kd(output.unimodal_logits["audio"].detach(), taught.logits, 3.0)
    assert terms["kd"].item() == pytest.approx(0.5 * kd, rel=1e-4)
    projection = method.projections["audio"]
    projected = output.features["audio"].detach() @ projection.weight.detach().T + projection.bias.detach()
    mse = ((projected - taught.features["visual"]) ** 2).mean().item()
    assert terms["align"].item() == pytest.approx(2.0 * mse, rel=1e-4)
    assert terms["ce"].item() == pytest.approx(
        torch.nn.functional.cross_entropy(output.logits, batch.labels).item(), rel=1e-6)
    # the teacher is frozen: only the student side and the projection receive gradients
    sum(terms.values()).backward()
    assert projection.weight.grad is not None
    assert all(p.grad is None for p in method.teacher_model.parameters())
    # the projection is part of the method's state (the best epoch restores it)
    state = method.state_dict()
    with torch.no_grad():
        projection.weight.zero_()
    method.load_state_dict(state)
    assert not bool((projection.weight == 0).all())


def test_offline_teacher_is_the_modality_best_on_validation():
    splits, cfg = synthetic(2, num_samples=200)  # audio carries twice the signal of visual
    method = make_method("distill", {"mode": "offline", "teacher_epochs": 2})
    result = Trainer(splits, method, cfg, seed=0).fit()
    accuracy = {m: result.history[0]["method"][f"teacher_val_accuracy/{m}"] for m in ("audio", "visual")}
    assert method.teacher_modality == max(accuracy, key=accuracy.get)
    assert result.history[0]["method"][f"teacher/{method.teacher_modality}"] == 1.0
    assert "align" not in result.history[0]["train_terms"] and math.isfinite(result.test["accuracy"])


def test_offline_options_are_refused_online_and_a_mismatched_checkpoint_is_refused(visual_checkpoint):
    with pytest.raises(ConfigError, match="align_weight applies only with mode offline"):
        make_method("distill", {"align_weight": 1.0})
    splits, cfg = synthetic(2, num_samples=200)
    method = make_method("distill", {"mode": "offline", "teacher": "audio",
                                     "teacher_checkpoints": {"visual": str(visual_checkpoint)}})
    with pytest.raises(IncompatibleError, match="teacher is fixed to 'audio'"):
        Trainer(splits, method, cfg, seed=0)
