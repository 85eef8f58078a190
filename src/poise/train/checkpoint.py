"""Run checkpoints: everything a killed run needs to continue exactly where it stopped.

``checkpoint.pt`` is written by rank 0 only, atomically (a temporary file in the same folder, flushed to
disk, then renamed over the old one), so a run killed at any moment leaves either the previous
checkpoint or the new one, never a half-written file. It holds only tensors and plain containers
(dict, list, str, int, float, bool, None), so it loads with ``torch.load(path, weights_only=True)``:
no arbitrary object is ever unpickled. Random-number states are stored as tensors, the run history as
a JSON string.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from poise.errors import ConfigError, DataError

CHECKPOINT_FILE = "checkpoint.pt"
#: bumped when the layout changes incompatibly
CHECKPOINT_FORMAT = 1


def atomic_save(obj: Any, path: Path) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename: never a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def to_cpu(obj: Any) -> Any:
    """The same nested containers with every tensor moved to the CPU (and detached)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(to_cpu(v) for v in obj)
    return obj


# ---- random-number states -------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The process's random-number states (torch CPU and CUDA, NumPy, Python) as tensors and numbers."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": None if gauss_next is None else float(gauss_next)},
        "cuda": [],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["internal"].tolist()), p["gauss_next"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- reading --------------------------------------------------------------------------------------------
def read_torch_file(path: Path, what: str, prefix: str = "") -> Any:
    """A file written by ``torch.save``, read with ``weights_only=True``; one sentence of our own when it is
    empty or unreadable (never torch's advice to load it unsafely)."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise DataError(f"{prefix}'{path}' is empty (0 bytes), not {what}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # unpickling errors come in many types; their text advises unsafe loading
        raise DataError(f"{prefix}'{path}' cannot be read as {what}: it is truncated, damaged or holds objects other "
                        "than tensors and plain containers") from None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A run checkpoint, read with ``weights_only=True``; one clear sentence when it is missing or broken."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"cannot resume: '{path}' does not exist (the run stopped before its first checkpoint, or "
            "trainer.checkpoint was false); start the run again without --resume"
        )
    state = read_torch_file(path, "a poise run checkpoint", prefix="cannot resume: ")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"cannot resume: '{path}' is not a poise run checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """The dotted key of the first place two nested config dictionaries differ (None if equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            found = first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if a == b else prefix.rstrip(".") or "(the whole configuration)"


#: the file ``poise pretrain`` writes: modality -> encoder state dict
ENCODERS_FILE = "encoders.pt"


def load_encoders(model: nn.Module, init_dir: str | Path) -> list[str]:
    """Load the encoders written by :func:`run_pretrain` (``init_dir/encoders.pt``, or that file itself)
    into ``model``'s encoders; modalities in the file that the model lacks are ignored. Every modality is
    checked before any weight is copied, so a refused file leaves the model as it was. Returns the
    loaded modalities."""
    path = Path(init_dir)
    file = path / ENCODERS_FILE if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"pre-trained encoders '{file}' do not exist: give a folder written by 'poise pretrain'")
    saved = read_torch_file(file, "pre-trained encoders written by 'poise pretrain'")
    if not isinstance(saved, dict) or not all(isinstance(v, dict) for v in saved.values()):
        raise DataError(f"'{file}' is not a file written by 'poise pretrain' (expected modality -> encoder weights)")
    for m in model.modalities:
        if m not in saved:
            raise DataError(f"'{file}' has no encoder for modality '{m}' (it has: {', '.join(saved) or 'none'})")
        problem = _state_mismatch(model.encoders[m].state_dict(), saved[m])
        if problem:
            raise DataError(f"'{file}': the encoder of modality '{m}' does not match this model ({problem}); "
                            "pre-train with the same model configuration")
    for m in model.modalities:
        model.encoders[m].load_state_dict(saved[m])
    return list(model.modalities)


def _state_mismatch(expected: dict[str, Tensor], given: dict[str, Any]) -> str | None:
    missing = [k for k in expected if k not in given]
    if missing:
        return f"missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    unexpected = [k for k in given if k not in expected]
    if unexpected:
        return f"unexpected {unexpected[0]}" + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
    for k, v in expected.items():
        if not isinstance(given[k], Tensor) or given[k].shape != v.shape:
            shape = tuple(given[k].shape) if isinstance(given[k], Tensor) else type(given[k]).__name__
            return f"{k} has shape {shape}, expected {tuple(v.shape)}"
    return None


__all__ = ["CHECKPOINT_FILE", "CHECKPOINT_FORMAT", "ENCODERS_FILE", "load_encoders", "atomic_save", "first_difference", "load_checkpoint", "read_torch_file", "rng_state",
           "set_rng_state", "to_cpu"]
