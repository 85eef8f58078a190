"""Data Remixing: the distance from uniform by hand, the assignment and the grouped order against plain
loops, and inside a run: every sample once per epoch with its one modality, one modality per batch."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import fast_config, make_context, synthetic
from method_checks import check_accumulation, check_fp16, check_resume
from poise.functional.remix import kl_from_uniform, remix_assignment, remix_order
from poise.methods import make_method
from poise.train import Trainer


def test_kl_from_uniform_by_hand():
    # p = (3/4, 1/4): 3/4 ln(3/4 * 2) + 1/4 ln(1/4 * 2)
    z = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0], [2.0, 2.0]])
    expected = [0.75 * math.log(1.5) + 0.25 * math.log(0.5), 0.0, 0.0]
    assert kl_from_uniform(z).tolist() == pytest.approx(expected, abs=1e-6)
    torch.manual_seed(0)
    z = torch.randn(5, 4) * 3
    for i in range(5):
        p = [math.exp(v) for v in z[i].tolist()]
        p = [v / sum(p) for v in p]
        assert float(kl_from_uniform(z)[i]) == pytest.approx(sum(q * math.log(4 * q) for q in p), rel=1e-5)


def test_assignment_goes_to_the_modality_closest_to_uniform_among_the_present():
    audio = torch.tensor([[5.0, 0.0], [0.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    visual = torch.tensor([[0.0, 0.0], [5.0, 0.0], [3.0, 0.0], [1.0, 0.0]])
    logits = {"audio": audio, "visual": visual}
    assert remix_assignment(logits).tolist() == [1, 0, 0, 0]  # last row: a tie goes to the first
    present = torch.tensor([[True, True], [False, True], [True, False], [False, False]])
    assert remix_assignment(logits, present).tolist() == [1, 1, 0, 0]  # never a modality the sample lacks


def test_assignment_with_three_modalities_against_a_loop():
    torch.manual_seed(1)
    logits = {m: torch.randn(30, 5) * 2 for m in ("a", "b", "c")}
    present = torch.rand(30, 3) < 0.7
    got = remix_assignment(logits, present).tolist()
    for i in range(30):
        candidates = [k for k in range(3) if present[i, k]] or [0, 1, 2]
        kls = {}
        for k in candidates:
            p = F.softmax(list(logits.values())[k][i], dim=0).tolist()
            kls[k] = sum(q * math.log(5 * q) for q in p)
        assert got[i] == min(candidates, key=lambda k: (kls[k], k))


def test_order_groups_by_modality_and_shuffles_within():
    assignment = torch.tensor([1, 0, 1, 1, 0, 2, 1])
    order = remix_order(assignment, 3, torch.Generator().manual_seed(0)).tolist()
    assert sorted(order) == list(range(7))
    assert [int(assignment[i]) for i in order] == [0, 0, 1, 1, 1, 1, 2]
    orders = {tuple(remix_order(assignment, 3, torch.Generator().manual_seed(s)).tolist()) for s in range(10)}
    assert len(orders) > 1  # the order within a group follows the generator


def test_shuffled_order_keeps_full_batches_whole_and_the_remainders_last():
    assignment = torch.tensor([0] * 7 + [1] * 5 + [2] * 4)  # batches of 2: 3 + 2 + 2 full, remainders 1 + 1
    batch_orders = set()
    for seed in range(20):
        order = remix_order(assignment, 3, torch.Generator().manual_seed(seed), batch_size=2).tolist()
        assert sorted(order) == list(range(16))
        groups = [int(assignment[i]) for i in order]
        batches = [groups[i: i + 2] for i in range(0, 14, 2)]
        assert all(len(set(b)) == 1 for b in batches)  # the 7 full batches hold one modality each
        assert sorted(b[0] for b in batches) == [0, 0, 0, 1, 1, 2, 2]
        assert sorted(groups[14:]) == [0, 1]  # one left over from modality 0 and one from modality 1
        batch_orders.add(tuple(b[0] for b in batches))
    assert len(batch_orders) > 1  # the modalities' batches interleave in a drawn order


def test_remixed_epoch_gives_each_sample_once_with_its_one_modality():
    splits, _ = synthetic(3, num_samples=200)
    cfg = fast_config(trainer={"batch_size": 16})
    method = make_method("remix", {"warmup_epochs": 0})
    trainer = Trainer(splits, method, cfg, seed=0)
    trainer.setup()
    loader = method.on_epoch_start(0, trainer.train_loader)
    seen, mixed = [], 0
    for batch in loader:
        assert (batch.present.sum(dim=1) == 1).all()  # one modality per sample
        columns = batch.present.float().argmax(dim=1)
        for i, row in enumerate(batch.index.tolist()):
            assert int(columns[i]) == int(method.assignment[row])
        mixed += int(len(set(columns.tolist())) > 1)
        seen += batch.index.tolist()
    assert sorted(seen) == list(range(len(splits.train)))
    assert mixed <= 2  # only in the epoch's last batches, from the groups' remainders
    records = method.pop_records()
    assert sum(records[f"assigned/{m}"] for m in ("audio", "visual", "text")) == pytest.approx(1.0)


def test_without_reassembling_the_batches_mix_modalities():
    splits, _ = synthetic(2, num_samples=200)
    method = make_method("remix", {"warmup_epochs": 0, "reassemble": False})
    trainer = Trainer(splits, method, fast_config(trainer={"batch_size": 50}), seed=0)
    trainer.setup()
    batches = list(method.on_epoch_start(0, trainer.train_loader))
    assert all((b.present.sum(dim=1) == 1).all() for b in batches)
    assert any(len(set(b.present.float().argmax(dim=1).tolist())) > 1 for b in batches)


def test_loss_is_fused_ce_plus_the_assigned_modalitys_ce():
    splits, _ = synthetic(2, num_samples=64)
    cfg = fast_config()
    method = make_method("remix", {"warmup_epochs": 1, "warmup_weight": 0.5, "weight": 2.0})
    ctx, batch = make_context(method, splits, cfg)
    keep = torch.tensor([i % 2 == 0 for i in range(len(batch))])
    batch.present = torch.stack([keep, ~keep], dim=1)  # even rows: audio only; odd rows: visual only
    with torch.no_grad():
        output = ctx.model(batch)
    for epoch, weight in ((0, 0.5), (1, 2.0)):
        ctx.epoch = epoch
        total = sum(method.loss(output, batch).values())
        expected = 0.0
        for i in range(len(batch)):
            m = "audio" if i % 2 == 0 else "visual"
            y = batch.labels[i: i + 1]
            expected += float(F.cross_entropy(output.logits[i: i + 1], y)) + weight * float(
                F.cross_entropy(output.unimodal_logits[m][i: i + 1], y))
        assert float(total) == pytest.approx(expected / len(batch), rel=1e-5)


def test_remix_trains_above_chance_and_survives_resume_fp16_and_accumulation(tmp_path):
    splits, _ = synthetic(2, num_samples=240)
    result = Trainer(splits, make_method("remix", {"warmup_epochs": 1}), fast_config(trainer={"epochs": 4}), seed=0).fit()
    assert result.test["accuracy"] > 0.5  # four classes: chance is 0.25
    assert "assigned/audio" in result.history[-1]["method"]
    check_resume("remix", {"warmup_epochs": 1}, tmp_path)
    check_resume("remix", {"warmup_epochs": 1, "batch_order": "blocks"}, tmp_path / "blocks")
    check_fp16("remix", {"warmup_epochs": 0})
    check_accumulation("remix", {"warmup_epochs": 1}, epochs=2)
