"""Seeds, RNG states and checkpoints.

Checkpoints hold tensors, numbers, strings and containers only (the RNG states as tensors), and load with
``torch.load(weights_only=True)``: a checkpoint from elsewhere cannot run code. A file that is not a
checkpoint of this project is refused with an error naming it (and never advising to load it unsafely).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mdmt.cache.preprocess import file_sha256
from mdmt.errors import DataError, load_refusal
from mdmt.runs import BEST_CHECKPOINT, atomic_target

CHECKPOINT_FORMAT = 2
"""Bumped when the checkpoint layout changes; older checkpoints are refused with a clear error."""


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (e.g. run seed and epoch) via numpy's SeedSequence."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def rng_states() -> dict[str, Any]:
    """The global RNG states (python, numpy, torch CPU and CUDA) as tensors and numbers."""
    version, python_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(python_state, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restore what ``rng_states`` captured."""
    python = states["python"]
    random.setstate((python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss"]))
    numpy = states["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached"]))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(values: dict[str, Any], path: Path, durable: bool = True) -> None:
    """``torch.save`` of ``values`` (with the format number) through a temporary file, an fsync (unless not
    ``durable``: ``atomic_target``) and a rename.

    The file is written through an unbuffered Python handle, so a full disk raises its OSError (ENOSPC) rather
    than the RuntimeError torch's zip writer turns it into.
    """
    with atomic_target(path, durable) as tmp, open(tmp, "wb", buffering=0) as handle:
        try:
            torch.save({"format": CHECKPOINT_FORMAT, **values}, handle)
        except RuntimeError as exc:
            if isinstance(exc.__context__, OSError):
                raise exc.__context__ from None
            raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint written by ``save_checkpoint`` (CPU tensors, ``weights_only=True``); DataError otherwise."""
    path = Path(path)
    try:
        values = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint not found") from None
    except MemoryError:
        raise
    except Exception as exc:  # foreign bytes make torch's unpickler raise almost any error
        raise DataError(f"{path}: not a readable mdmt checkpoint (truncated, empty or foreign; "
                        f"only tensors and plain values are loaded): {load_refusal(exc)}") from None
    if not isinstance(values, dict) or values.get("format") != CHECKPOINT_FORMAT or "model" not in values:
        raise DataError(f"{path}: not an mdmt checkpoint of format {CHECKPOINT_FORMAT} (written by another "
                        f"version or program); delete the run folder and train it again")
    return values


def load_model_state(run_dir: Path, name: str = BEST_CHECKPOINT) -> dict[str, torch.Tensor]:
    """The model ``state_dict`` stored in ``run_dir/name``."""
    return load_checkpoint(Path(run_dir) / name)["model"]


@functools.lru_cache(maxsize=256)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def checkpoint_sha256(path: Path) -> str | None:
    """sha256 of a checkpoint file's bytes, None when there is none; a process hashes a file again only when its
    size or modification time changed (the grid asks for every run's parents)."""
    try:
        stat = Path(path).stat()
    except FileNotFoundError:
        return None
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)
