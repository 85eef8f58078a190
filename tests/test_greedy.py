"""MMTM mid-fusion and the greedy method: the functional core against naive loops and hand values, the
staged-encoder interface, the refusals, and the method end to end (missing modalities, fp16, resume)."""

import math

import pytest
import torch

from conftest import fast_config, make_context, synthetic
from method_checks import check_fp16, check_resume
from poise.data.base import ModalitySpec
from poise.errors import IncompatibleError
from poise.functional.greedy import (
    conditional_learning_speeds,
    mmtm,
    rebalance_target,
    squared_norm_ratio,
    squeeze,
)
from poise.methods import make_method
from poise.models.encoders import ConvEncoder, MLPEncoder, SequenceEncoder, TokenEncoder, is_staged
from poise.models.midfusion import MMTMFusion, build_mmtm
from poise.models.resnet import ResNet18Encoder, TextEncoder
from poise.train import Trainer


def naive_mmtm(maps, w, b, wes, bes, scale, present=None):
    """Sample by sample, channel by channel, with plain Python sums."""
    out = [a.clone() for a in maps]
    gates = [torch.zeros(a.shape[:2]) for a in maps]
    for i in range(maps[0].shape[0]):
        s = []
        for k, a in enumerate(maps):
            for c in range(a.shape[1]):
                values = a[i, c].reshape(-1)
                mean = sum(float(v) for v in values) / len(values)
                if present is not None and not present[k][i]:
                    mean = 0.0
                s.append(mean)
        z = [max(0.0, sum(w[r, j].item() * s[j] for j in range(len(s))) + b[r].item()) for r in range(w.shape[0])]
        for k, a in enumerate(maps):
            for c in range(a.shape[1]):
                e = sum(wes[k][c, r].item() * z[r] for r in range(len(z))) + bes[k][c].item()
                g = scale / (1.0 + math.exp(-e))
                gates[k][i, c] = g
                out[k][i, c] = a[i, c] * g
    return out, gates


def random_mmtm(channels, bottleneck=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(bottleneck, sum(channels), generator=g)
    b = torch.randn(bottleneck, generator=g)
    wes = [torch.randn(c, bottleneck, generator=g) for c in channels]
    bes = [torch.randn(c, generator=g) for c in channels]
    return w, b, wes, bes


@pytest.mark.parametrize("shapes", [[(2, 3, 4, 5), (2, 2, 3, 3)], [(3, 2, 4), (3, 4), (3, 3, 2, 2, 2)]])
def test_mmtm_matches_a_naive_loop(shapes):
    g = torch.Generator().manual_seed(1)
    maps = [torch.randn(*s, generator=g) for s in shapes]
    w, b, wes, bes = random_mmtm([s[1] for s in shapes])
    got, gates = mmtm(maps, w, b, wes, bes, gate_scale=2.0)
    want, want_gates = naive_mmtm(maps, w, b, wes, bes, 2.0)
    for a, e in zip(got + gates, want + want_gates):
        assert torch.allclose(a, e, atol=1e-5)


def test_mmtm_missing_samples_squeeze_to_zero_and_fixed_gates_replace():
    g = torch.Generator().manual_seed(2)
    maps = [torch.randn(3, 2, 4, generator=g), torch.randn(3, 3, 2, 2, generator=g)]
    w, b, wes, bes = random_mmtm([2, 3])
    present = [torch.tensor([True, False, True]), torch.tensor([True, True, False])]
    got, _ = mmtm(maps, w, b, wes, bes, present=present)
    want, _ = naive_mmtm(maps, w, b, wes, bes, 2.0, present=present)
    for a, e in zip(got, want):
        assert torch.allclose(a, e, atol=1e-5)
    fixed = torch.tensor([0.5, 1.5])
    got, gates = mmtm(maps, w, b, wes, bes, fixed_gates={0: fixed})
    assert torch.allclose(got[0], maps[0] * fixed.view(1, 2, 1))
    assert torch.allclose(gates[0], fixed.expand(3, 2))


def test_mmtm_with_zero_weights_is_the_identity():
    # 2 * sigmoid(0) = 1: the paper's gate leaves the maps unchanged
    maps = [torch.randn(2, 3, 2, 2), torch.randn(2, 4)]
    zeros = torch.zeros(2, 7), torch.zeros(2), [torch.zeros(3, 2), torch.zeros(4, 2)], [torch.zeros(3), torch.zeros(4)]
    out, gates = mmtm(maps, *zeros)
    assert torch.equal(out[0], maps[0]) and torch.equal(out[1], maps[1])
    assert torch.equal(squeeze(maps[1]), maps[1])
    assert torch.allclose(squeeze(maps[0]), maps[0].mean(dim=(2, 3)))


def test_learning_speed_hand_values():
    # ||(3, 4)||^2 / ||(1, 2)||^2 = 25 / 5; a missing gradient counts zero
    assert float(squared_norm_ratio([torch.tensor([3.0, 4.0]), None], [torch.tensor([1.0, 2.0]), torch.tensor([0.0])])) == 5.0
    speeds = conditional_learning_speeds(torch.tensor([100.0, 1.0]), torch.tensor([1.0, 10.0]))
    assert torch.allclose(speeds, torch.tensor([2.0, -1.0]))
    assert rebalance_target(torch.tensor([0.5, 0.2]), 0.1) == 0
    assert rebalance_target(torch.tensor([0.2, 0.5]), 0.1) == 1
    assert rebalance_target(torch.tensor([0.5, 0.2]), 0.5) is None
    assert rebalance_target(torch.tensor([0.1, 0.3, 0.2]), 0.001) == 1


@pytest.mark.parametrize("encoder,x", [
    (lambda: ConvEncoder(ModalitySpec("image", (3, 12, 12)), 8), torch.randn(2, 3, 12, 12)),
    (lambda: MLPEncoder(ModalitySpec("vector", (5,)), 8, depth=3), torch.randn(2, 5)),
    (lambda: SequenceEncoder(ModalitySpec("sequence", (4, 3)), 8), torch.randn(2, 4, 3)),
    (lambda: TokenEncoder(ModalitySpec("tokens", (6,), vocab_size=20), 8), torch.randint(0, 20, (2, 6))),
    (lambda: ResNet18Encoder(ModalitySpec("image", (1, 16, 16)), 8), torch.randn(2, 1, 16, 16)),
    (lambda: ResNet18Encoder(ModalitySpec("frames", (2, 3, 16, 16)), 8), torch.randn(2, 2, 3, 16, 16)),
])
def test_staged_encoders_compose_to_their_forward(encoder, x, one_thread):
    torch.manual_seed(0)
    enc = encoder().eval()
    assert is_staged(enc)
    h = x
    for i, channels in enumerate(enc.stage_channels):
        h = enc.stage(i, h)
        assert h.shape[:2] == (2, channels)
    assert torch.allclose(enc.readout(h), enc(x), atol=1e-6)


def test_mmtm_refuses_an_encoder_without_stages_in_one_sentence():
    spec = ModalitySpec("tokens", (6,), vocab_size=20)
    encoders = {"a": MLPEncoder(ModalitySpec("vector", (4,)), 8), "t": TextEncoder(spec, 8, embed_dim=8, layers=1)}
    with pytest.raises(IncompatibleError, match=r"^the mmtm mid-fusion needs .* modality 't' uses TextEncoder[^.]*\)$"):
        build_mmtm(encoders)


def test_mmtm_model_cut_branch_ignores_the_other_modality_and_keeps_a_running_mean():
    splits, _ = synthetic(2)
    cfg = fast_config(model={"mid_fusion": "mmtm"})
    trainer = Trainer(splits, make_method("joint"), cfg, seed=0)
    model = trainer.build_model()
    mid = model.mid_fusion
    assert isinstance(mid, MMTMFusion)
    ids = {id(p) for p in model.head_parameters()}
    assert all(id(p) in ids for p in mid.parameters())
    batch = next(iter(trainer.make_loader(splits.train, False)))
    module = mid.modules_by_stage[0]
    model.train()
    model(batch)
    assert float(module.gate_count) == len(batch)
    other = batch.inputs["visual"].clone()
    model.eval()
    mid.cut = ("audio",)
    a = model.encode(batch)["audio"]
    batch.inputs["visual"] = other + 1.0
    b = model.encode(batch)
    assert torch.allclose(a, b["audio"], atol=1e-6)  # no information from visual reaches audio's branch
    mid.cut = ()
    assert not torch.allclose(a, model.encode(batch)["audio"], atol=1e-4)


def test_greedy_refuses_a_model_without_mmtm():
    splits, _ = synthetic(2)
    trainer = Trainer(splits, make_method("greedy"), fast_config(model={"mid_fusion": "none"}), seed=0)
    with pytest.raises(IncompatibleError, match="^method 'greedy' needs the mmtm mid-fusion"):
        trainer.setup()  # before any step


def test_greedy_rebalances_the_branch_that_learns_through_the_others():
    splits, cfg = synthetic(2)
    method = make_method("greedy", {"start_epoch": 0})
    ctx, batch = make_context(method, splits, cfg)
    model, mid = ctx.model, ctx.model.mid_fusion
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for p in mid.excitation_parameters("visual"):
        p.grad = torch.ones_like(p)
    for p in model.modality_parameters("visual") + model.modality_parameters("audio"):
        p.grad = torch.full_like(p, 1e-3)
    output = model(batch)
    method.after_backward(output, batch)
    assert method.caring == model.modalities.index("visual")
    for step in range(5):  # the window: visual's branch trains on its own input, no new decision
        assert method.on_step_start(batch) is None and mid.cut == ("visual",)
        method.after_backward(output, batch)
        assert mid.cut == ()
    assert method.caring == -1


@pytest.mark.parametrize("n,missing", [(2, 0.3), (3, 0.0)])
def test_greedy_trains_end_to_end(n, missing):
    splits, _ = synthetic(n, missing_rate=missing)
    cfg = fast_config(trainer={"epochs": 3}, data={"missing_rate": missing})
    result = Trainer(splits, make_method("greedy"), cfg, seed=0).fit()
    assert result.test["accuracy"] > 0.6  # four classes: chance is 0.25
    last = result.history[-1]["method"]
    assert sum(v for k, v in last.items() if k.startswith("rebalanced/")) > 0  # it re-balanced


def test_greedy_fp16_and_resume(tmp_path):
    check_fp16("greedy", {"start_epoch": 0})
    check_resume("greedy", {"start_epoch": 0}, tmp_path)


def _gate_state(trainer) -> dict:
    mid = trainer.model.mid_fusion
    return {f"{j}/{name}": buf.tolist() for j, module in enumerate(mid.modules_by_stage)
            for name, buf in module.named_buffers()}


def _greedy_gates() -> dict:
    splits, _ = synthetic(2, num_samples=256)
    trainer = Trainer(splits, make_method("greedy", {"start_epoch": 0, "threshold": 0.0}),
                      fast_config(trainer={"epochs": 2}), seed=0)
    result = trainer.fit()
    return {"gates": _gate_state(trainer), "rebalanced": [h["method"] for h in result.history]}


def _greedy_worker(rank: int, world: int, port: int, path: str) -> None:
    import json

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with open(f"{path}/rank{rank}.json", "w") as f:
            json.dump(_greedy_gates(), f)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_keep_the_running_gate_means_of_the_whole_batch(tmp_path):
    """The re-balancing steps replace gates by their running means: with two processes each holding half of
    every batch, every process keeps the means (sums and sample count) of all samples, as one process does."""
    import json

    import torch.multiprocessing as mp

    from conftest import free_port

    mp.start_processes(_greedy_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        one = _greedy_gates()
    assert any(v for h in one["rebalanced"] for k, v in h.items() if k.startswith("rebalanced/"))
    for rank in range(2):
        two = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert two["gates"].keys() == one["gates"].keys()
        for key, values in one["gates"].items():
            assert two["gates"][key] == pytest.approx(values, rel=1e-4, abs=1e-5), key
