"""Generic io and reproducibility helpers every layer from ``train`` up may use: atomic writes, seeding."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's global generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def atomic_write_text(text: str, path: Path) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader sees the old or the new
    file, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def set_threads(threads: int) -> None:
    """Use ``threads`` CPU threads for torch's operators (0: leave them). A sum split over more threads adds in
    another order, so the thread count is part of what makes a run's numbers; the inter-op threads follow
    where torch still allows it (before the process's first parallel work)."""
    import torch

    if threads <= 0:
        return
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != threads:
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:
            pass


__all__ = ["atomic_write_text", "seed_everything", "set_threads"]
