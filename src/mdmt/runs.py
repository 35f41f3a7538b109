"""The run contract: what a run is, where its folder lives, what files it holds, and how they are written.

Everything that trains, evaluates, stores or reports runs imports this module; it imports nothing of mdmt
but the errors and no third-party package, so ``mdmt report`` never pays for torch.

A run folder ``<results>/runs/<strategy>/<backbone>/<protocol>/fold<k>/seed<s>/`` holds:

| file | written by | what |
|---|---|---|
| ``config.yaml`` | train | the resolved config of the run |
| ``spec.json`` | train | the RunSpec |
| ``inputs.json`` | train | fingerprint of the run's inputs: config, cache keys, split ids |
| ``split_ids_missing.csv`` | train | ids the official split files list that the cache lacks (only when some are) |
| ``tasks.json`` | train | each head's task: kind, scorer, groups, classes (what scoring needs) |
| ``history.csv`` | train | one row per epoch |
| ``last.pt`` / ``best.pt`` | train | checkpoints (tensors only) |
| ``predictions_<task>.csv`` | train | one row per test image of every dataset labelling the task |
| ``metrics.json`` | evaluate | metrics computed from the prediction files (strict JSON) |
| ``DONE`` | train | written last |
| ``FAILED`` | train / grid | the error of a run that failed |
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RUNS_DIR = "runs"
CONFIG_FILE = "config.yaml"
SPEC_FILE = "spec.json"
INPUTS_FILE = "inputs.json"
MISSING_IDS_FILE = "split_ids_missing.csv"
TASKS_FILE = "tasks.json"
HISTORY_FILE = "history.csv"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
METRICS_FILE = "metrics.json"
DONE_FILE = "DONE"
FAILED_FILE = "FAILED"
PREDICTIONS_PREFIX = "predictions_"
SPEC_FIELDS = ("strategy", "backbone", "protocol", "fold", "seed")


@dataclass(frozen=True)
class RunSpec:
    """Which run: strategy × backbone × protocol × fold × seed."""

    strategy: str
    backbone: str
    protocol: str
    fold: int
    seed: int

    @property
    def key(self) -> str:
        """``strategy/backbone/protocol/fold/seed``."""
        return f"{self.strategy}/{self.backbone}/{self.protocol}/{self.fold}/{self.seed}"

    def run_dir(self, results_dir: str | Path) -> Path:
        """``<results_dir>/runs/<strategy>/<backbone>/<protocol>/fold<fold>/seed<seed>``."""
        runs = Path(results_dir) / RUNS_DIR
        return runs / self.strategy / self.backbone / self.protocol / f"fold{self.fold}" / f"seed{self.seed}"

    def to_json(self) -> str:
        """The spec as the text of ``spec.json``."""
        return json.dumps(asdict(self), indent=2)


def spec_from_dir(run_dir: Path, runs_root: Path) -> RunSpec | None:
    """The spec of a run folder: ``spec.json`` when readable, else the folder names; None if neither fits."""
    spec_file = run_dir / SPEC_FILE
    if spec_file.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError, OSError):
            values = json.loads(spec_file.read_text())
            return RunSpec(str(values["strategy"]), str(values["backbone"]), str(values["protocol"]),
                           int(values["fold"]), int(values["seed"]))
    parts = run_dir.relative_to(runs_root).parts
    if len(parts) != 5 or not parts[3].startswith("fold") or not parts[4].startswith("seed"):
        return None
    try:
        return RunSpec(parts[0], parts[1], parts[2], int(parts[3][4:]), int(parts[4][4:]))
    except ValueError:
        return None


def predictions_file(task: str) -> str:
    """``predictions_<task>.csv``."""
    return f"{PREDICTIONS_PREFIX}{task}.csv"


def task_of_predictions(path: Path) -> str:
    """The task name of a ``predictions_<task>.csv`` path."""
    return path.stem.removeprefix(PREDICTIONS_PREFIX)


# --------------------------------------------------------------------------------------------- writing
@contextlib.contextmanager
def atomic_target(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path``; on success it is fsynced and renamed over ``path``, on error removed.

    ``with atomic_target(p) as tmp: torch.save(obj, tmp)`` leaves either the old file or the complete new one.
    ``durable=False`` skips the fsync: a crash of the process still leaves the old or the new file, a power cut may
    leave neither (for files the caller makes durable later with ``fsync_file``).
    An OSError that names no file (a write on a full disk) is raised again naming ``path``.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc
        raise


def fsync_file(path: str | Path) -> None:
    """Flush ``path``'s data to the disk."""
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def atomic_write_bytes(data: bytes, path: str | Path, durable: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file, an fsync (unless not ``durable``) and a rename."""
    with atomic_target(path, durable) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(text: str, path: str | Path, durable: bool = True) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file, an fsync (unless not ``durable``) and a rename."""
    atomic_write_bytes(text.encode("utf-8"), path, durable)


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN or infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def write_json(value: Any, path: str | Path) -> None:
    """Strict JSON (NaN → null), sorted keys, written atomically."""
    atomic_write_text(json.dumps(strict_json(value), indent=2, sort_keys=True, allow_nan=False) + "\n", path)
