"""The run contract: what a run is, where its folder lives, what files it holds, and how they are written.

Everything that trains, evaluates, stores or reports runs imports this module; it imports nothing of mdmt
but the errors and no third-party package, so ``mdmt report`` never pays for torch. A run's inputs
(``run_inputs``) decide whether a run folder can be reused: ``check_inputs`` refuses one whose inputs changed,
naming what changed, or empties it for a rerun.

A run folder ``<results>/runs/<strategy>/<backbone>/<protocol>/fold<k>/seed<s>/`` holds:

| file | written by | what |
|---|---|---|
| ``config.yaml`` | train | the resolved config of the run |
| ``spec.json`` | train | the RunSpec |
| ``inputs.json`` | train | fingerprint of the run's inputs: config, cache keys, split ids, parents' checkpoints |
| ``split_ids_missing.csv`` | train | ids the official split files list that the cache lacks (only when some are) |
| ``tasks.json`` | train | each head's task: kind, scorer, groups, classes (what scoring needs) |
| ``history.csv`` | train | one row per epoch |
| ``last.pt`` / ``best.pt`` | train | checkpoints (tensors only) |
| ``predictions_<task>.csv`` | train | one row per test image of every dataset labelling the task |
| ``val_predictions_<task>.csv`` | train | the same for the validation images (which chose the epoch) |
| ``calib_predictions_<task>.csv`` | train | the same for the calibration part (``protocol.calibration_fraction``) |
| ``ood_features.npz`` | train | statistics of the training films' features: ``mdmt predict`` flags films far from them |
| ``calibration.json`` | evaluate | per task, calibration, threshold and conformal sets fitted on calib or val rows |
| ``metrics.json`` | evaluate | metrics computed from the prediction files (strict JSON) |
| ``DONE`` | train | written last |
| ``FAILED`` | train / grid | the error of a run that failed |
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mdmt.errors import ConfigError

RUNS_DIR = "runs"
CONFIG_FILE = "config.yaml"
CALIBRATION_FILE = "calibration.json"
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


def predictions_file(task: str, part: str = "test") -> str:
    """``predictions_<task>.csv`` (the test fold), ``<part>_predictions_<task>.csv`` for another part (``val``,
    ``calib``)."""
    return f"{'' if part == 'test' else part + '_'}{PREDICTIONS_PREFIX}{task}.csv"


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


# --------------------------------------------------------------------------------------------- inputs
RUNTIME_KEYS = {
    "data": ("cache_dir",),
    "train": ("compile", "checkpoint_every_s", "phase_timing", "callbacks"),
}
"""Keys that may change between a run and its resumption (where things are, machine settings); the whole
``runtime`` section (device, workers, threads) is left out too."""
ADDED_KEYS: dict[tuple[str, str], Any] = {("protocol", "calibration_fraction"): 0.0}
"""Result-shaping keys added after runs were recorded, with the value that gives those runs' results: left out of
the fingerprint at that value (a finished older run stays reusable), part of it at any other."""


def fingerprint(config_values: dict[str, Any]) -> dict[str, Any]:
    """The config keys a run's result depends on (not where things are, not machine settings), from the resolved
    config as a mapping (``mdmt.config.to_dict``)."""
    values = copy.deepcopy(config_values)
    for section in ("grid", "synth", "infer", "calibration", "runtime", "report", "results_dir", "plugins"):
        values.pop(section, None)
    values["run"].pop("rerun_changed", None)
    values["data"].pop("datasets", None)  # the data enter through the cache keys and split ids
    for section, keys in RUNTIME_KEYS.items():
        for key in keys:
            values[section].pop(key, None)
    for (section, key), unchanged in ADDED_KEYS.items():
        if values.get(section, {}).get(key) == unchanged:
            del values[section][key]
    return values


def run_inputs(config_values: dict[str, Any], cache_keys: Mapping[str, str], ids: Mapping[str, Any],
               parents: Mapping[str, str | None] | None = None) -> dict[str, Any]:
    """What the run's result depends on (``inputs.json``): the config fingerprint, each dataset's cache key, a hash
    of each dataset's split ids (dataset → part → ids) and, for a run that starts from others, each parent's
    ``best.pt`` sha256 (``parents.<strategy>.checkpoint``)."""
    inputs: dict[str, Any] = {
        "config": fingerprint(config_values),
        "caches": dict(cache_keys),
        "splits": {name: hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
                   for name, parts in ids.items()},
    }
    if parents:
        inputs["parents"] = {name: {"checkpoint": digest} for name, digest in parents.items()}
    return inputs


def changed_inputs(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted names of what differs between two ``run_inputs`` (config keys, ``caches.<dataset>``, ``splits.…``)."""

    def walk(a: Any, b: Any, prefix: str) -> list[str]:
        if isinstance(a, dict) and isinstance(b, dict):
            return [d for k in sorted(set(a) | set(b)) for d in walk(a.get(k), b.get(k), f"{prefix}{k}.")]
        return [] if a == b else [prefix.rstrip(".")]

    return walk(saved, current, "")


def saved_inputs(run_dir: Path) -> dict[str, Any] | str | None:
    """The inputs a run folder records; None without ``inputs.json``, the reason when it cannot be read."""
    path = run_dir / INPUTS_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return saved if isinstance(saved, dict) else f"not a JSON object: {type(saved).__name__}"


def check_inputs(run_dir: Path, inputs: dict[str, Any], rerun: bool) -> bool:
    """Whether ``run_dir`` is finished with the same inputs. A run folder with other inputs is refused (ConfigError
    naming what changed) or, with ``rerun``, emptied so the run trains again from scratch."""
    saved = saved_inputs(run_dir)
    if saved is None:
        if (run_dir / DONE_FILE).is_file():
            raise ConfigError(f"{run_dir} is finished but records no {INPUTS_FILE} (made by an older mdmt): delete "
                              f"it or use another results_dir")
        return False
    changed = [] if isinstance(saved, str) else changed_inputs(saved, inputs)
    if not changed and not isinstance(saved, str):
        return (run_dir / DONE_FILE).is_file()
    state = "a finished" if (run_dir / DONE_FILE).is_file() else "an unfinished"
    if not rerun:
        again = "use --rerun-changed (run.rerun_changed) to train it again, or another results_dir"
        if isinstance(saved, str):
            raise ConfigError(f"{run_dir / INPUTS_FILE}: unreadable ({saved}), so {state} run's inputs are unknown; "
                              f"{again}")
        shown = ", ".join(changed[:8]) + (" …" if len(changed) > 8 else "")
        raise ConfigError(f"{run_dir} holds {state} run with other inputs ({shown} changed); {again}")
    shutil.rmtree(run_dir)
    return False
