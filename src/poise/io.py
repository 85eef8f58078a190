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


__all__ = ["atomic_write_text", "seed_everything"]
