"""Two processes (gloo, CPU) decide what one process decides on the concatenated batch.

One spawn of two ranks runs every case below with the real trainer (DistributedDataParallel, sharded
loaders); the same cases run once in this process. With batch_size 64 every step's two halves (32 + 32,
the last 6 + 6) are exactly the one-process batch, so every statistic that is reduced across ranks
(OGM's confidence scores, OPM's ratios, G-Blend's losses, MLA's mean features and sample counts, the
gradients of uncertainty's learned log-variances) must agree with the one-process value. They agree up
to float rounding (a sum over two halves is not bit for bit the sum over the whole), hence the
tolerances; accuracies, which round to whole samples, agree exactly. OPM's drop probabilities agree,
but each rank draws the per-sample drop masks for its own samples, so its trained weights do not.
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import fast_config, free_port, synthetic
from poise.methods import make_method
from poise.train import Trainer

CASES = ("ogm_ge", "opm", "gblend", "mla", "uncertainty", "joint", "mmcosine", "pmr", "mmpareto", "agm")


def run_case(name: str) -> dict:
    """Train one case; returns what each method decided (plain values and CPU tensors)."""
    splits, _ = synthetic(2, num_samples=240)
    epochs = 2 if name == "joint" else 1
    options = {
        "opm": {"warmup_epochs": 0, "p_exe": 1.0},
        "gblend": {"estimate_epochs": 1},
    }.get(name, {})
    cfg = fast_config(trainer={"epochs": epochs, "probe": name == "joint"})
    method = make_method(name, options)
    records: list[tuple[str, float]] = []
    record = method.record

    def capture(key, value):
        records.append((key, float(value)))
        record(key, value)

    method.record = capture
    trainer = Trainer(splits, method, cfg, seed=0, method_name=name)
    result = trainer.fit()
    out = {
        "test": result.test,
        "train_loss": [h["train_loss"] for h in result.history],
        "val_accuracy": [h["val"]["accuracy"] for h in result.history],
        "model": {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
    }
    if name == "ogm_ge":
        out["coefficients"] = [v for k, v in records if k.startswith("coef/")]
        out["ratios"] = [v for k, v in records if k.startswith("ratio/")]
    elif name == "opm":
        # the drop probabilities of the first step come from this batch's ratio (before any update);
        # later steps differ because each rank draws its own per-sample drop masks
        out["first_q"] = [v for k, v in records if k.startswith("q/")][:2]
    elif name == "gblend":
        out["weights"] = method.history[0]["weights"]
        out["tables"] = {k: method.history[0][k] for k in ("train_start", "val_start", "train_end", "val_end")}
    elif name == "mla":
        out["projection"] = method.projection.cpu()
    elif name == "uncertainty":
        out["log_variances"] = method.log_variances.detach().cpu()
    return out


def _worker(rank: int, world: int, port: int, path: str) -> None:
    torch.set_num_threads(1)  # first thing in a forked child: no OpenMP pool inherited from the parent
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = {name: run_case(name) for name in CASES}
        torch.save(results, f"{path}.rank{rank}")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ddp") / "results")
    # fork, not spawn: the children start with torch and poise already imported (seconds saved)
    mp.start_processes(_worker, args=(2, free_port(), path), nprocs=2, join=True, start_method="spawn")
    two = [torch.load(f"{path}.rank{r}", weights_only=False) for r in range(2)]
    one = {name: run_case(name) for name in CASES}
    return one, two


def close(a, b, tol=1e-5) -> bool:
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=tol,
                          rtol=tol)


def test_ogm_coefficients_match_one_process(results):
    one, two = results
    assert len(one["ogm_ge"]["coefficients"]) >= 2 * 2  # two modalities, every step
    for rank in two:
        assert close(rank["ogm_ge"]["coefficients"], one["ogm_ge"]["coefficients"])
        assert close(rank["ogm_ge"]["ratios"], one["ogm_ge"]["ratios"])
    assert min(one["ogm_ge"]["coefficients"]) < 0.9  # the modulation did act


def test_opm_ratios_match_one_process(results):
    one, two = results
    assert len(one["opm"]["first_q"]) == 2
    for rank in two:
        assert close(rank["opm"]["first_q"], one["opm"]["first_q"])


def test_gblend_losses_and_weights_match_one_process(results):
    one, two = results
    for rank in two:
        for table, values in one["gblend"]["tables"].items():
            assert close(list(rank["gblend"]["tables"][table].values()), list(values.values()), 1e-4), table
        assert close(list(rank["gblend"]["weights"].values()), list(one["gblend"]["weights"].values()), 1e-4)


def test_mla_projection_matches_one_process(results):
    one, two = results
    assert not torch.allclose(one["mla"]["projection"], torch.eye(len(one["mla"]["projection"]), dtype=torch.float64))
    for rank in two:
        assert close(rank["mla"]["projection"], one["mla"]["projection"])


def test_uncertainty_log_variances_match_one_process(results):
    one, two = results
    assert not torch.allclose(one["uncertainty"]["log_variances"], torch.zeros(3))  # they were learned
    for rank in two:
        assert close(rank["uncertainty"]["log_variances"], one["uncertainty"]["log_variances"])


def test_two_process_training_matches_one_process(results):
    one, two = results
    for name in CASES:
        if name == "opm":
            continue  # each rank draws its own per-sample drop masks: same ratios, different samples dropped
        for rank in two:
            for key, value in one[name]["model"].items():
                assert close(rank[name]["model"][key], value, 1e-4), (name, key)
            assert close(rank[name]["train_loss"], one[name]["train_loss"], 1e-5), name
    # the evaluation predictions are gathered from both ranks: same accuracies, to the sample
    joint = one["joint"]
    for rank in two:
        assert rank["joint"]["val_accuracy"] == joint["val_accuracy"]
        assert rank["joint"]["test"]["accuracy"] == joint["test"]["accuracy"]
        assert rank["joint"]["test"]["unimodal_accuracy"] == joint["test"]["unimodal_accuracy"]
        # the probe runs on rank 0 over all of the data and is broadcast: identical on both ranks
        assert rank["joint"]["test"]["probe_accuracy"] == two[0]["joint"]["test"]["probe_accuracy"]


TORCHRUN_RUN = ["train", "--dataset", "synthetic", "--method", "ogm_ge", "--set", "trainer.epochs=2",
                "--set", "dataset.num_samples=400", "--set", "trainer.tensorboard=false",
                "--set", "trainer.checkpoint_every_steps=2"]


@pytest.mark.slow
def test_torchrun_two_processes_match_one_and_resume(tmp_path):
    """The real launcher: ``torchrun --nproc-per-node 2 -m poise train`` (environment variables, process
    group from the trainer, rank 0 writing) against ``python -m poise train``; then ``--resume`` under
    torchrun of the finished run gives the same result again."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--nproc-per-node", "2",
                "--master-port", str(free_port()), "-m", "poise"]
    subprocess.run([sys.executable, "-m", "poise", *TORCHRUN_RUN, "--out", str(tmp_path / "one")], env=env, check=True)
    subprocess.run([*torchrun, *TORCHRUN_RUN, "--out", str(tmp_path / "two")], env=env, check=True)
    one = json.loads((tmp_path / "one" / "result.json").read_text())
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["test"]["accuracy"] == one["test"]["accuracy"]
    assert two["best_epoch"] == one["best_epoch"]
    for a, b in zip(one["history"], two["history"]):
        assert b["train_loss"] == pytest.approx(a["train_loss"], abs=1e-5)
        assert b["val"]["accuracy"] == a["val"]["accuracy"]
        assert b["method"]["coef/audio"] == pytest.approx(a["method"]["coef/audio"], abs=1e-5)
    torchrun[4] = str(free_port())
    subprocess.run([*torchrun, "train", "--resume", str(tmp_path / "two")], env=env, check=True)
    again = json.loads((tmp_path / "two" / "result.json").read_text())
    assert again["test"] == two["test"]


def _resume_worker(rank: int, world: int, port: int, path: str) -> None:
    """Two processes: an uninterrupted run, a run stopped in the middle of epoch 1 (both ranks at the
    same step, as when torchrun tears the group down) and its resumption from the mid-epoch checkpoint."""
    import json

    from test_resume import Interrupt, interrupt_at, without_seconds

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        splits, _ = synthetic(2, num_samples=300)
        cfg = fast_config(trainer={"epochs": 2, "batch_size": 32, "checkpoint_every_steps": 2})
        options = {"warmup_epochs": 0, "p_exe": 0.8}  # opm: per-rank mask generators in the checkpoint
        expected = Trainer(splits, make_method("opm", options), cfg, seed=1, out_dir=f"{path}/a", method_name="opm").fit()
        try:
            Trainer(splits, interrupt_at(make_method("opm", options), epoch=1, micro_batch=3), cfg, seed=1,
                    out_dir=f"{path}/b", method_name="opm").fit()
        except Interrupt:
            pass
        dist.barrier()
        got = Trainer(splits, make_method("opm", options), cfg, seed=1, out_dir=f"{path}/b", method_name="opm",
                      resume=True).fit()
        same = without_seconds(got.to_dict()) == without_seconds(expected.to_dict())
        with open(f"{path}/rank{rank}.json", "w") as f:
            json.dump({"same": same, "test": got.test}, f)
    finally:
        dist.destroy_process_group()


def test_two_process_run_resumes_in_mid_epoch_exactly(tmp_path):
    import json

    mp.start_processes(_resume_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    state = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["ranks"]) == 2
    masks = [r["method"]["mask_generator"] for r in state["ranks"]]
    assert not torch.equal(masks[0], masks[1])  # each rank's own random stream was kept
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text())["same"]


def _gather_rows_worker(rank: int, world: int, path: str) -> None:
    import torch.distributed as dist

    from poise.train.distributed import all_gather_rows

    dist.init_process_group("gloo", init_method=f"file://{path}.store", rank=rank, world_size=world)
    try:
        mine = torch.arange(6, dtype=torch.float32).view(3, 2)[: 3 - rank] + 10 * rank  # 3 rows, then 2
        torch.save(all_gather_rows(mine), f"{path}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_all_gather_rows_concatenates_unequal_shards_in_rank_order(tmp_path):
    import torch.multiprocessing as mp

    path = str(tmp_path / "rows")
    mp.start_processes(_gather_rows_worker, args=(2, path), nprocs=2, join=True, start_method="spawn")
    expected = torch.cat([torch.arange(6, dtype=torch.float32).view(3, 2),
                          torch.arange(6, dtype=torch.float32).view(3, 2)[:2] + 10])
    for rank in range(2):
        assert torch.equal(torch.load(f"{path}.{rank}"), expected)
