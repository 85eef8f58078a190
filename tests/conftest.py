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
