import json
import math

import pytest
import torch

from conftest import fast_config, synthetic
from poise.methods import Method, make_method
from poise.train import Trainer


class SpyMethod(Method):
    name = "spy"

    def __init__(self):
        super().__init__()
        self.calls = []

    def setup(self, ctx):
        super().setup(ctx)
        self.calls.append("setup")

    def on_epoch_start(self, epoch, loader):
        self.calls.append("on_epoch_start")

    def on_step_start(self, batch):
        self.calls.append("on_step_start")

    def loss(self, output, batch):
        self.calls.append("loss")
        return super().loss(output, batch)

    def backward(self, terms, output, batch):
        self.calls.append("backward")
        super().backward(terms, output, batch)

    def after_backward(self, output, batch):
        self.calls.append("after_backward")
        grads = [p.grad for p in self.ctx.model.parameters() if p.grad is not None]
        assert grads, "gradients must exist when after_backward runs"

    def on_epoch_end(self, epoch):
        self.calls.append("on_epoch_end")

    def predict(self, output, batch):
        self.calls.append("predict")
        return output.logits


def test_every_hook_is_called_in_the_documented_order():
    splits, cfg = synthetic(2, num_samples=120)
    cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"epochs": 1, "batch_size": 200})})
    spy = SpyMethod()
    Trainer(splits, spy, cfg).fit()
    train_calls = [c for c in spy.calls if c != "predict"]
    assert train_calls == ["setup", "on_epoch_start", "on_step_start", "loss", "backward", "after_backward", "on_epoch_end"]
    assert "predict" in spy.calls


def test_same_seed_same_numbers_and_different_seed_differs():
    splits, cfg = synthetic(2)
    a = Trainer(splits, make_method("joint"), cfg, seed=3).fit()
    b = Trainer(splits, make_method("joint"), cfg, seed=3).fit()
    c = Trainer(splits, make_method("joint"), cfg, seed=4).fit()
    assert a.test == b.test
    assert [h["train_loss"] for h in a.history] == [h["train_loss"] for h in b.history]
    assert [h["train_loss"] for h in a.history] != [h["train_loss"] for h in c.history]


def test_best_epoch_is_chosen_on_validation_not_test():
    splits, cfg = synthetic(2)
    cfg = fast_config(trainer={"epochs": 4})
    result = Trainer(splits, make_method("joint"), cfg, seed=0).fit()
    val_acc = [h["val"]["accuracy"] for h in result.history]
    assert result.best_epoch == val_acc.index(max(val_acc))
    assert all("test" not in h for h in result.history)


def test_training_learns_and_reports_every_metric(tmp_path, monkeypatch):
    import poise.train.trainer as trainer_module

    scores_seen = []
    note_scores = trainer_module.EpochStats.note_scores

    def spy(self, unimodal_logits, labels, present):  # each step's logits, scored here by a plain formula
        scores_seen.append({m: float(torch.softmax(z.double(), 1)[torch.arange(len(labels)), labels].sum())
                            for m, z in unimodal_logits.items()})
        return note_scores(self, unimodal_logits, labels, present)

    monkeypatch.setattr(trainer_module.EpochStats, "note_scores", spy)
    splits, _ = synthetic(2)
    cfg = fast_config(trainer={"epochs": 4, "probe": True, "tensorboard": True})
    result = Trainer(splits, make_method("joint"), cfg, seed=0, out_dir=tmp_path).fit()
    t = result.test
    assert t["accuracy"] > 0.6  # four balanced classes: chance is 0.25
    assert 0 <= t["macro_f1"] <= 1
    assert set(t["unimodal_accuracy"]) == set(t["probe_accuracy"]) == {"audio", "visual"}
    assert t["probe_accuracy"]["audio"] > t["probe_accuracy"]["visual"]  # audio carries the stronger signal
    h = result.history[-1]
    assert set(h["confidence_ratio"]) == {"audio", "visual"}
    # the epoch's ratio is the mean over its steps of s_audio / s_visual (and its inverse)
    last_epoch = scores_seen[-len(scores_seen) // 4:]
    expected = sum(s["audio"] / s["visual"] for s in last_epoch) / len(last_epoch)
    assert h["confidence_ratio"]["audio"] == pytest.approx(expected, rel=1e-5)
    assert h["confidence_ratio"]["visual"] == pytest.approx(sum(s["visual"] / s["audio"] for s in last_epoch) / len(last_epoch), rel=1e-5)
    assert h["confidence_ratio"]["audio"] > 1.0  # the stronger audio signal is the more confident
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [0, 1, 2, 3]
    assert any((tmp_path / "tensorboard").iterdir())
    ckpt = torch.load(tmp_path / "best.pt", weights_only=True)
    assert ckpt["epoch"] == result.best_epoch


def test_unimodal_baseline_uses_one_modality():
    splits, cfg = synthetic(2)
    result = Trainer(splits, make_method("unimodal:visual"), cfg, method_name="unimodal:visual").fit()
    assert list(result.test["unimodal_accuracy"]) == ["visual"]
    assert result.method == "unimodal:visual"


@pytest.mark.parametrize("optimizer,scheduler", [("sgd", "step"), ("adamw", "cosine"), ("sgd", "none")])
def test_optimizers_and_schedules(optimizer, scheduler):
    splits, _ = synthetic(2, num_samples=120)
    cfg = fast_config(trainer={"epochs": 3, "optimizer": optimizer, "scheduler": scheduler, "step_size": 1,
                               "gamma": 0.5, "lr": 0.01 if optimizer == "sgd" else 0.001, "grad_clip": 1.0})
    result = Trainer(splits, make_method("joint"), cfg).fit()
    lrs = [h["lr"] for h in result.history]
    if scheduler == "none":
        assert lrs == [lrs[0]] * 3
    else:
        assert lrs[2] < lrs[0]


def test_grad_clip_bounds_the_gradient_norm():
    splits, _ = synthetic(2, num_samples=120)
    cfg = fast_config(trainer={"epochs": 1, "grad_clip": 1e-3, "lr": 1.0, "momentum": 0.0, "weight_decay": 0.0})

    class Check(Method):
        def setup(self, ctx):
            super().setup(ctx)
            self.before = [p.detach().clone() for p in ctx.model.parameters()]

    m = Check()
    trainer = Trainer(splits, m, cfg)
    trainer.fit()
    # one epoch with lr 1 and gradient norm clipped to 1e-3 per step moves the weights by at most steps * 1e-3
    steps = math.ceil(len(splits.train) / cfg.trainer.batch_size)
    moved = torch.sqrt(sum(((p.detach() - b) ** 2).sum() for p, b in zip(trainer.model.parameters(), m.before)))
    assert float(moved) <= steps * 1e-3 + 1e-6


def test_non_finite_loss_stops_with_a_named_step():
    from poise.train.trainer import NonFiniteError

    class Bad(Method):
        name = "bad"

        def loss(self, output, batch):
            return {"ce": output.logits.sum() * float("nan")}

    splits, cfg = synthetic(2, num_samples=60)
    with pytest.raises(NonFiniteError, match="loss term 'ce' of method 'bad' is not finite at epoch 0, step 0"):
        Trainer(splits, Bad(), cfg).fit()


def test_aux_heads_are_trained_as_probes_for_nondecomposable_fusion():
    splits, _ = synthetic(2)
    cfg = fast_config(trainer={"epochs": 3}, model={"fusion": "gated"})
    result = Trainer(splits, make_method("joint"), cfg).fit()
    assert "aux_heads" in result.history[0]["train_terms"]
    assert result.test["unimodal_accuracy"]["audio"] > 0.5
