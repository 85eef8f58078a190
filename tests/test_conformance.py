"""What every registered method must do, checked for each entry of the registry: train on 2 and on 3
modalities unless the class declares otherwise (and refuse with one sentence where it does), keep its
records finite, predict (B, C) logits, reload a saved state tensor-equal, resume a run stopped in the
middle of an epoch to identical metrics, and (for a method that declares ``per_batch_decisions``) decide
the same with 2 accumulated micro-batches as with 1. Two processes against one: ``test_distributed.py``
(a representative set by default) and ``test_two_processes_decide_as_one`` below (every method, slow)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import fast_config, synthetic
from poise.errors import IncompatibleError
from poise.methods import METHODS, make_method
from poise.methods.base import FAMILIES
from poise.methods.registry import BASELINES
from poise.train import Trainer

#: options that keep each method's start-up work (teachers, estimation runs) small
FAST_OPTIONS = {"umt": {"teacher_epochs": 1}, "ume": {"member_epochs": 1}, "gblend": {"estimate_epochs": 1},
                "opm": {"warmup_epochs": 0}, "reconboost": {"epochs_per_phase": 1},
                "g2d": {"teacher_epochs": 1}, "remix": {"warmup_epochs": 1}}


#: methods whose per-sample random masks are drawn by each rank for its own samples: N processes
#: share their per-batch decisions (test_distributed.py) but not the masks, hence not the weights
PER_RANK_MASKS = {"opm", "modality_dropout"}


def specs():
    return [("unimodal:audio" if name == "unimodal" else name) for name in METHODS]


def build(spec: str):
    name = spec.split(":")[0]
    options = {k: v for k, v in FAST_OPTIONS.get(name, {}).items() if k in METHODS[name].Params.model_fields}
    return make_method(spec, options)


def supports(spec: str, n: int) -> bool:
    cls = METHODS[spec.split(":")[0]]
    return cls.min_modalities <= n and (cls.max_modalities is None or n <= cls.max_modalities)


def equal_states(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a.cpu(), b.cpu())
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(equal_states(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(equal_states(x, y) for x, y in zip(a, b))
    return a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("spec", specs())
def test_method_conforms(spec, n):
    splits, _ = synthetic(n, num_samples=96)
    cfg = fast_config(trainer={"batch_size": 32, "epochs": 1})
    method = build(spec)
    if not supports(spec, n):
        with pytest.raises(IncompatibleError, match=spec.split(":")[0] + "|modalit"):
            Trainer(splits, method, cfg, seed=0, method_name=spec)
        return
    trainer = Trainer(splits, method, cfg, seed=0, method_name=spec)  # declared support: must not refuse
    result = trainer.fit()
    assert 0 <= result.test["accuracy"] <= 1
    for entry in result.history:
        assert math.isfinite(entry["train_loss"])
        for key, value in entry["method"].items():
            assert math.isfinite(value), (key, value)

    batch = next(iter(trainer.make_loader(splits.test, shuffle=False))).to(trainer.device)
    trainer.model.eval()
    with torch.no_grad():
        logits = method.predict(trainer.model(batch), batch)
    assert logits.shape == (len(batch), splits.info.num_classes)
    assert bool(torch.isfinite(logits).all())

    # a saved state reloads tensor-equal into a freshly set-up method
    state = method.state_dict()
    fresh = build(spec)
    Trainer(splits, fresh, cfg, seed=0, method_name=spec).setup()
    fresh.load_state_dict(state)
    assert equal_states(fresh.state_dict(), state)


@pytest.mark.parametrize("spec", specs())
def test_run_stopped_in_mid_epoch_resumes_to_identical_metrics(spec, tmp_path):
    from test_resume import Interrupt, interrupt_at, one_thread, without_seconds

    splits, _ = synthetic(2, num_samples=128)
    cfg = fast_config(trainer={"batch_size": 32, "checkpoint_every_steps": 1})
    with one_thread():
        expected = Trainer(splits, build(spec), cfg, seed=3, out_dir=tmp_path / "a", method_name=spec).fit()
        with pytest.raises(Interrupt):
            Trainer(splits, interrupt_at(build(spec), epoch=1, micro_batch=1), cfg, seed=3, out_dir=tmp_path / "b",
                    method_name=spec).fit()
        got = Trainer(splits, build(spec), cfg, seed=3, out_dir=tmp_path / "b", method_name=spec, resume=True).fit()
    assert without_seconds(got.to_dict()) == without_seconds(expected.to_dict())


def decisions(spec: str, accumulate: int) -> tuple[list[dict], list[float]]:
    splits, _ = synthetic(2, num_samples=128)
    cfg = fast_config(trainer={"batch_size": 32, "accumulate": accumulate})
    result = Trainer(splits, build(spec), cfg, seed=0, method_name=spec).fit()
    return [h["method"] for h in result.history], [h["train_loss"] for h in result.history]


def per_batch_deciders() -> list[str]:
    return [s for s in specs() if METHODS[s.split(":")[0]].per_batch_decisions]


def test_some_methods_declare_per_batch_decisions():
    assert {"ogm", "ogm_ge", "boost_weak"} <= set(per_batch_deciders())


@pytest.mark.parametrize("spec", per_batch_deciders())
def test_accumulating_two_micro_batches_decides_as_one_batch(spec):
    one_records, one_loss = decisions(spec, 1)
    two_records, two_loss = decisions(spec, 2)
    assert one_records and one_records[0]  # the method did decide something
    for a, b in zip(one_records, two_records):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k
    assert two_loss == pytest.approx(one_loss, rel=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("spec", specs())
def test_two_processes_decide_as_one(spec, tmp_path):
    """Every method's per-epoch records and accuracies with two gloo processes equal one process's."""
    import json

    import torch.multiprocessing as mp

    from conftest import free_port

    if not supports(spec, 2):
        pytest.skip(f"{spec} does not train on 2 modalities")
    if spec in PER_RANK_MASKS:
        pytest.skip(f"{spec} draws the drop masks of each rank's own samples (its shared decisions: test_distributed)")
    mp.start_processes(_two_worker, args=(2, free_port(), str(tmp_path), spec), nprocs=2, join=True,
                       start_method="spawn")
    one = _decide(spec)
    for rank in range(2):
        two = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert two["val"] == one["val"]
        for a, b in zip(one["records"], two["records"]):
            for k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k


def _decide(spec: str) -> dict:
    splits, _ = synthetic(2, num_samples=256)
    result = Trainer(splits, build(spec), fast_config(), seed=0, method_name=spec).fit()
    return {"records": [h["method"] for h in result.history], "val": [h["val"]["accuracy"] for h in result.history]}


def _two_worker(rank: int, world: int, port: int, path: str, spec: str) -> None:
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out = _decide(spec)
        with open(f"{path}/rank{rank}.json", "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


# ---- one modality (refused where the method compares modalities) and missing modalities ----

def expected_to_refuse(spec: str, modalities: int) -> bool:
    """Set-ups a method must refuse: fewer modalities than it compares."""
    return modalities < METHODS[spec.split(":")[0]].min_modalities


def same_state(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    return a == b


def snapshot_at_setup(method, store: dict):
    """The model's parameters as the run builds them, before the method's setup touches them."""
    setup = method.setup

    def wrapped(ctx):
        store.update({n: p.detach().clone() for n, p in ctx.model.named_parameters()})
        setup(ctx)

    method.setup = wrapped


@pytest.mark.parametrize("case", ["one", "missing"])  # 2 and 3 modalities: test_method_conforms
@pytest.mark.parametrize("spec", specs())
def test_method_trains_or_refuses_at_start(spec, case):
    modalities = {"one": 1, "three": 3}.get(case, 2)
    name = spec.split(":")[0]
    # reconboost trains one encoder per boosting phase: enough epochs that every encoder gets one
    longer = {"trainer": {"epochs": 4}} if name == "reconboost" else {}
    splits, cfg = synthetic(modalities, missing_rate=0.3 if case == "missing" else 0.0, num_samples=160, **longer)
    method = make_method(spec, FAST_OPTIONS.get(name, {}))
    if expected_to_refuse(spec, modalities):
        with pytest.raises(IncompatibleError) as refused:
            Trainer(splits, method, cfg, seed=0, method_name=spec)
        sentence = str(refused.value)
        assert f"'{name}'" in sentence and "modalities" in sentence and "\n" not in sentence
        return
    initial: dict = {}
    snapshot_at_setup(method, initial)
    trainer = Trainer(splits, method, cfg, seed=0, method_name=spec)  # must not refuse
    result = trainer.fit()
    assert math.isfinite(result.test["accuracy"]) and 0 <= result.test["accuracy"] <= 1
    assert len(result.history) == cfg.trainer.epochs
    assert all(math.isfinite(h["train_loss"]) for h in result.history)
    for m in trainer.model.modalities:  # every encoder the method trains has moved
        moved = [n for n, p in trainer.model.named_parameters()
                 if n.startswith(f"encoders.{m}.") and not torch.equal(p.detach(), initial[n])]
        assert moved, f"{spec}: the {m} encoder never changed"
    if case != "two":
        return
    # the state survives a save and load into a fresh run's method
    state = method.state_dict()
    fresh = make_method(spec)
    Trainer(splits, fresh, cfg, seed=0, method_name=spec).setup()
    untrained = fresh.state_dict()
    fresh.load_state_dict(state)
    assert same_state(fresh.state_dict(), state)
    if state and not same_state(untrained, state):
        assert not same_state(untrained, fresh.state_dict())


@pytest.mark.parametrize("name", list(METHODS))
def test_method_declares_its_family(name):
    """The reports group methods by what they act on: every registered class names one family itself
    (the base class has none to inherit), and only the baselines are 'baseline'."""
    cls = METHODS[name]
    family = getattr(cls, "family", None)
    assert family in FAMILIES, f"{cls.__name__}.family is {family!r}; expected one of {', '.join(FAMILIES)}"
    assert (family == "baseline") == (name in BASELINES)
