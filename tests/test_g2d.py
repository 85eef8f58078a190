"""G2D: the logit distillation and the teachers' confidence against plain loops, SMP's gates by hand, and
inside a run: the gradient of every encoder but the least confident teacher's modality is zeroed."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import fast_config, make_context, synthetic
from method_checks import check_accumulation, check_fp16, check_resume
from poise.functional.g2d import logit_distillation_loss, smp_coefficients, teacher_confidence_sums
from poise.methods import make_method
from poise.train import Trainer


def softmax_list(row, temperature=1.0):
    e = [math.exp(v / temperature) for v in row]
    return [v / sum(e) for v in e]


def test_logit_distillation_against_a_loop():
    torch.manual_seed(0)
    s, t = torch.randn(6, 4), torch.randn(6, 4) * 2
    rows = torch.tensor([True, False, True, True, False, True])
    for temperature in (1.0, 2.5):
        total, count = 0.0, 0
        for i in range(6):
            if not rows[i]:
                continue
            p, q = softmax_list(t[i].tolist(), temperature), softmax_list(s[i].tolist(), temperature)
            total += sum(a * math.log(a / b) for a, b in zip(p, q))
            count += 1
        expected = total / count * temperature**2
        assert float(logit_distillation_loss(s, t, temperature, rows)) == pytest.approx(expected, rel=1e-5)
    assert float(logit_distillation_loss(t, t, 3.0)) == pytest.approx(0.0, abs=1e-6)
    s.requires_grad_(True)
    empty = logit_distillation_loss(s, t, 1.0, torch.zeros(6, dtype=torch.bool))
    assert empty.requires_grad and float(empty.detach()) == 0.0


def test_teacher_confidence_sums_by_hand():
    # audio: row 0 gives p(y=0) = e^1 / (e^1 + 1); row 1 gives p(y=1) = 1/2 but lacks the modality
    logits = {"audio": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "visual": torch.tensor([[0.0, 0.0], [0.0, 2.0]])}
    labels = torch.tensor([0, 1])
    present = {"audio": torch.tensor([True, False]), "visual": torch.tensor([True, True])}
    sums = teacher_confidence_sums(logits, labels, present)
    e = math.e
    assert sums[0].tolist() == pytest.approx([e / (e + 1), 1.0])
    assert sums[1].tolist() == pytest.approx([0.5 + e**2 / (e**2 + 1), 2.0])


def test_smp_keeps_only_the_least_confident_teachers_modality():
    assert smp_coefficients(torch.tensor([0.9, 0.6])).tolist() == [0.0, 1.0]
    assert smp_coefficients(torch.tensor([0.5, 0.8, 0.7])).tolist() == [1.0, 0.0, 0.0]
    assert smp_coefficients(torch.tensor([0.4, 0.4, 0.9])).tolist() == [1.0, 1.0, 1.0]  # shared lowest: no priority
    assert smp_coefficients(torch.tensor([math.inf, 0.3])).tolist() == [0.0, 1.0]  # no sample of modality 0
    assert smp_coefficients(torch.tensor([math.inf, math.inf])).tolist() == [1.0, 1.0]


def _step(method, ctx, batch):
    """One forward, loss and backward by hand; the gradients before and after ``after_backward``."""
    output = ctx.model(batch)
    ctx.model.zero_grad()
    torch.stack(list(method.loss(output, batch).values())).sum().backward()
    before = {n: p.grad.clone() for n, p in ctx.model.named_parameters() if p.grad is not None}
    method.after_backward(output, batch)
    return output, before, {n: p.grad.clone() for n, p in ctx.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("n", [2, 3])
def test_smp_zeroes_every_encoder_but_the_least_confident_teachers(n):
    splits, _ = synthetic(n, num_samples=96)
    cfg = fast_config(trainer={"epochs": 4})
    method = make_method("g2d", {"teacher_epochs": 1})
    ctx, batch = make_context(method, splits, cfg)
    ctx.epoch = 0
    # the teachers' mean true-class probability, one sample at a time
    confidence = {}
    for m, teacher in method.teachers.items():
        with torch.no_grad():
            z = teacher(batch).logits
        confidence[m] = sum(softmax_list(z[i].tolist())[int(batch.labels[i])] for i in range(len(batch))) / len(batch)
    weakest = min(confidence, key=confidence.get)
    output, before, after = _step(method, ctx, batch)
    for name, grad in after.items():
        if name.startswith("encoders.") and not name.startswith(f"encoders.{weakest}."):
            assert not grad.any(), name
        else:
            assert torch.equal(grad, before[name]), name
    assert any(before[n].any() for n in before if n.startswith("encoders.") and not n.startswith(f"encoders.{weakest}."))
    records = method.pop_records()
    for m in confidence:
        assert records[f"teacher_confidence/{m}"] == pytest.approx(confidence[m], rel=1e-5)
        assert records[f"smp/{m}"] == (1.0 if m == weakest else 0.0)
    # after the SMP epochs (default: the first half) nothing is zeroed
    ctx.epoch = 2
    _, before, after = _step(method, ctx, batch)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_released_scope_zeroes_only_convolution_kernels():
    splits, _ = synthetic(2, num_samples=96)
    cfg = fast_config(model={"encoders": {"audio": "conv", "visual": "conv"}})
    # shapes of the conv encoder's input: make the synthetic inputs images
    method = make_method("g2d", {"teacher_epochs": 1, "smp_scope": "conv_kernels"})
    splits = _as_images(splits)
    ctx, batch = make_context(method, splits, cfg)
    ctx.epoch = 0
    _, before, after = _step(method, ctx, batch)
    records = method.pop_records()
    gated = [m for m in ("audio", "visual") if records[f"smp/{m}"] == 0.0]
    assert len(gated) == 1
    zeroed = {n for n in after if not after[n].any() and before[n].any()}
    kernels = {n for n, p in ctx.model.named_parameters() if n.startswith(f"encoders.{gated[0]}.") and p.dim() == 4}
    assert kernels and zeroed == kernels  # norm and projection layers of that encoder keep their gradient


def _as_images(splits):
    from poise.data.base import DataSplits, DatasetInfo, ModalitySpec, TensorMultimodalDataset

    info = DatasetInfo(splits.info.name, {m: ModalitySpec("image", (1, 4, 4)) for m in splits.info.modalities},
                       splits.info.num_classes)

    def images(ds):
        return TensorMultimodalDataset({m: torch.nn.functional.pad(x, (0, 8)).view(-1, 1, 4, 4) for m, x in ds.inputs.items()},
                                       ds.labels, ds.present)

    return DataSplits(info, images(splits.train), images(splits.val), images(splits.test))


def test_loss_is_ce_plus_feature_and_logit_distillation():
    splits, _ = synthetic(2, num_samples=64, missing_rate=0.3)
    method = make_method("g2d", {"teacher_epochs": 1, "feature_weight": 0.5, "logit_weight": 2.0, "temperature": 2.0})
    ctx, batch = make_context(method, splits, fast_config(data={"missing_rate": 0.3}))
    with torch.no_grad():
        output = ctx.model(batch)
        total = float(sum(method.loss(output, batch).values()))
        expected = float(F.cross_entropy(output.logits, batch.labels))
        for m, teacher in method.teachers.items():
            t = teacher(batch)
            rows = [i for i in range(len(batch)) if batch.present_of(m)[i]]
            mse = sum(float(((output.features[m][i] - t.features[m][i]) ** 2).mean()) for i in rows) / len(rows)
            kl = 0.0
            for i in rows:
                p, q = softmax_list(t.logits[i].tolist(), 2.0), softmax_list(output.logits[i].tolist(), 2.0)
                kl += sum(a * math.log(a / b) for a, b in zip(p, q))
            expected += 0.5 * mse + 2.0 * 4.0 * kl / len(rows)
    assert total == pytest.approx(expected, rel=1e-4)


def test_g2d_trains_and_survives_resume_fp16_and_accumulation(tmp_path):
    splits, _ = synthetic(2, num_samples=240)
    result = Trainer(splits, make_method("g2d", {"teacher_epochs": 2}), fast_config(trainer={"epochs": 4}), seed=0).fit()
    assert result.test["accuracy"] > 0.5  # four classes: chance is 0.25
    assert "smp/audio" in result.history[0]["method"] and "smp/audio" not in result.history[-1]["method"]
    check_resume("g2d", {"teacher_epochs": 1}, tmp_path)
    check_fp16("g2d", {"teacher_epochs": 1})
    check_accumulation("g2d", {"teacher_epochs": 1}, epochs=2)
