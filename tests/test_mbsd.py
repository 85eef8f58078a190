"""MBSD: the functional core against hand computations and naive loops, and the method in training."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import fast_config, synthetic
from method_checks import check_accumulation, check_fp16, check_resume
from poise.functional.mbsd import mbsd_alignment, mbsd_distillation_kl, mbsd_released_kl, mbsd_sample_weights
from poise.methods import make_method
from poise.train import Trainer


def test_sample_weights_by_hand():
    pa = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    pb = torch.tensor([[0.4, 0.5, 0.1], [0.6, 0.3, 0.1], [0.3, 0.3, 0.4]])
    labels = torch.tensor([0, 0, 1])
    # sample 0: a correct, |0.7 - 0.4|; sample 1: b correct, |0.2 - 0.6|; sample 2: neither -> 0
    assert mbsd_sample_weights(pa, pb, labels).tolist() == pytest.approx([0.3, 0.4, 0.0])


def test_alignment_is_mean_squared_difference():
    a, b = torch.tensor([[1.0, 2.0, 4.0]]), torch.tensor([[0.0, 2.0, 1.0]])
    assert mbsd_alignment(a, b).tolist() == pytest.approx([(1 + 0 + 9) / 3])


def test_distillation_kl_against_a_loop():
    torch.manual_seed(0)
    za, zb = torch.randn(5, 4), torch.randn(5, 4)
    labels = torch.tensor([0, 1, 2, 3, 0])
    la, lb = F.log_softmax(za, 1), F.log_softmax(zb, 1)
    got = mbsd_distillation_kl(la, lb, labels)
    for i in range(5):
        pa, pb = la[i].exp().tolist(), lb[i].exp().tolist()
        s, w = (pa, pb) if pa[labels[i]] >= pb[labels[i]] else (pb, pa)
        expected = sum(s[k] * (math.log(s[k]) - math.log(w[k])) for k in range(4))
        assert float(got[i]) == pytest.approx(expected, rel=1e-5)


def test_distillation_teacher_takes_no_gradient():
    za = torch.tensor([[3.0, 0.0]], requires_grad=True)  # a teaches (p_a(y=0) is larger)
    zb = torch.tensor([[0.0, 0.0]], requires_grad=True)
    mbsd_distillation_kl(F.log_softmax(za, 1), F.log_softmax(zb, 1), torch.tensor([0])).sum().backward()
    assert za.grad is None or torch.all(za.grad == 0)
    assert zb.grad is not None and zb.grad.abs().sum() > 0


def test_released_kl_is_kl_div_given_probabilities():
    pa = torch.tensor([[0.9, 0.1], [0.3, 0.7]])
    pb = torch.tensor([[0.2, 0.8], [0.4, 0.6]])
    labels = torch.tensor([0, 1])
    # sample 0: ps 0.9, pw 0.2 -> 0.2 (log 0.2 - 0.9); sample 1: ps 0.7, pw 0.6 -> 0.6 (log 0.6 - 0.7)
    expected = [0.2 * (math.log(0.2) - 0.9), 0.6 * (math.log(0.6) - 0.7)]
    assert mbsd_released_kl(pa, pb, labels).tolist() == pytest.approx(expected)
    assert F.kl_div(torch.tensor([0.9, 0.7]), torch.tensor([0.2, 0.6]), reduction="none").tolist() == pytest.approx(expected)


def test_loss_terms_against_a_naive_loop():
    """The method's terms for two and three modalities, recomputed sample by sample and pair by pair."""
    from poise.data.batch import MultimodalBatch
    from poise.models.model import ModelOutput

    torch.manual_seed(1)
    names = ["audio", "visual", "text"]
    z = {m: torch.randn(6, 3) * 2 for m in names}
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    present = torch.ones(6, 3, dtype=torch.bool)
    present[4, 2] = False
    batch = MultimodalBatch(inputs={m: torch.zeros(6, 1) for m in names}, labels=labels, present=present,
                            index=torch.arange(6))
    output = ModelOutput(features={}, unimodal_logits=z, logits=sum(z.values()))
    terms = make_method("mbsd").loss(output, batch)
    align, dist = [], []
    for a, b in [("audio", "visual"), ("audio", "text"), ("visual", "text")]:
        sa, sd = 0.0, 0.0
        for i in range(6):
            if not (present[i, names.index(a)] and present[i, names.index(b)]):
                continue
            pa, pb = torch.softmax(z[a][i], 0), torch.softmax(z[b][i], 0)
            y = int(labels[i])
            if int(pa.argmax()) != y and int(pb.argmax()) != y:
                continue
            w = abs(float(pa[y] - pb[y]))
            s, t = (pa, pb) if pa[y] >= pb[y] else (pb, pa)
            sa += w * float(((z[a][i] - z[b][i]) ** 2).mean())
            sd += w * float((s * (s.log() - t.log())).sum())
        align.append(sa / 6)
        dist.append(sd / 6)
    assert float(terms["alignment"]) == pytest.approx(sum(align) / 3, rel=1e-5)
    assert float(terms["distillation"]) == pytest.approx(sum(dist) / 3, rel=1e-5)
    rows = present[:, 2]
    ce_text = F.cross_entropy(z["text"][rows], labels[rows])
    assert float(terms["ce_text"]) == pytest.approx(float(ce_text), rel=1e-6)


@pytest.mark.parametrize(("modalities", "missing", "options"),
                         [(2, 0.0, {}), (3, 0.3, {}), (2, 0.2, {"kl": "released", "alignment": "probabilities"})])
def test_trains(modalities, missing, options):
    splits, _ = synthetic(modalities, missing_rate=missing, num_samples=240)
    cfg = fast_config(trainer={"epochs": 3}, data={"missing_rate": missing})
    result = Trainer(splits, make_method("mbsd", options), cfg, seed=0, method_name="mbsd").fit()
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    assert result.test["accuracy"] > 0.5  # four classes: chance is 0.25
    assert 0.0 <= result.history[-1]["method"]["weight/audio-visual"] <= 1.0


def test_resumed_fp16_and_accumulation(tmp_path):
    check_resume("mbsd", {}, tmp_path)
    check_fp16("mbsd", {})
    check_accumulation("mbsd", {})
