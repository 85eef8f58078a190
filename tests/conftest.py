import socket

import pytest
import torch

from poise.config import build_config
from poise.data import load_dataset

FAST = {"trainer": {"epochs": 2, "batch_size": 64, "lr": 0.05, "progress": False, "tensorboard": False, "probe": False}}


def fast_config(**layers):
    from poise.config import merge

    return build_config(merge(FAST, layers))


def synthetic(num_modalities: int = 2, missing_rate: float = 0.0, num_samples: int = 240, **kw):
    names = ["audio", "visual", "text"][:num_modalities]
    signals = [2.0, 1.0, 0.5][:num_modalities]
    options = {"num_samples": num_samples, "modalities": {m: {"dim": 8, "signal": s} for m, s in zip(names, signals)}}
    cfg = fast_config(data={"missing_rate": missing_rate}, **kw)
    return load_dataset("synthetic", options, cfg.data), cfg


@pytest.fixture
def synthetic2():
    return synthetic(2)


@pytest.fixture
def synthetic3():
    return synthetic(3)


@pytest.fixture
def one_thread():
    """Small models on a shared 2-core machine: one intra-op thread avoids oversubscription stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def free_port() -> int:
    """A free TCP port on the loopback interface, for a test's process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_context(method, splits, cfg):
    """``method`` set up on a fresh model of a Trainer's building, without training; and one training batch."""
    from poise.train import Trainer
    from poise.train.context import TrainContext

    trainer = Trainer(splits, method, cfg, seed=0)
    torch.manual_seed(0)
    model = trainer.build_model()
    ctx = TrainContext(
        model=model, optimizer=trainer.build_optimizer(model.parameters()), config=cfg, info=splits.info, splits=splits,
        device=trainer.device, seed=0, make_loader=trainer.make_loader, build_model=trainer.build_model,
        build_optimizer=trainer.build_optimizer,
    )
    method.setup(ctx)
    batch = next(iter(trainer.make_loader(splits.train, False)))
    return ctx, batch
