"""Tasks: what a head predicts, which record columns it reads, and how targets are encoded.

A task is the project's unit of supervision. Its ``encode`` turns a records table into a target
matrix and a label-present mask; that mask is the indicator function of the paper's loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import numpy as np
import pandas as pd

from mdmt.errors import ConfigError, DataError

TaskKind = Literal["classification", "regression", "ordinal"]

REGIONS: tuple[str, ...] = ("A", "B", "C", "D", "E", "F")
REGION_COLUMNS: tuple[str, ...] = tuple(f"brixia_{r}" for r in REGIONS)
# A horizontal flip swaps the right lung (A-C, image left) with the left lung (D-F).
REGION_FLIP: tuple[int, ...] = (3, 4, 5, 0, 1, 2)
GLOBAL_BIN_EDGES: tuple[float, ...] = (5.0, 10.0, 15.0)  # 0-4, 5-9, 10-14, 15-18 (the paper)
LUNG_BIN_EDGES: tuple[float, ...] = (2.0, 5.0, 8.0)  # 0-1, 2-4, 5-7, 8-9 (official brixia_Lung)


def bin_scores(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """Bin scores by right-open edges: value < edges[0] -> 0, ... (NaN stays NaN)."""
    values = np.asarray(values, dtype=np.float64)
    binned = np.digitize(values, np.asarray(edges, dtype=np.float64)).astype(np.float32)
    binned[np.isnan(values)] = np.nan
    return binned


Encoder = Callable[[pd.DataFrame], np.ndarray]


@dataclass(frozen=True)
class Task:
    """One supervised output of the network."""

    name: str
    kind: TaskKind
    columns: tuple[str, ...]
    groups: int
    n_classes: int
    raw_targets: Encoder = field(repr=False, compare=False)
    flip_perm: tuple[int, ...] | None = None
    class_names: tuple[str, ...] = ()

    @property
    def n_outputs(self) -> int:
        """Width of the head's output layer."""
        if self.kind == "classification":
            return self.groups * self.n_classes
        if self.kind == "ordinal":
            return self.groups * (self.n_classes - 1)
        return self.groups

    @property
    def target_dim(self) -> int:
        """Columns of the target matrix (class index per group, or a value per output)."""
        return self.groups

    def encode(self, records: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Targets ``(N, target_dim)`` float32 (0 where absent) and the label-present mask ``(N,)``."""
        missing = [c for c in self.columns if c not in records.columns]
        if missing:
            present = np.zeros(len(records), dtype=bool)
            return np.zeros((len(records), self.target_dim), dtype=np.float32), present
        raw = np.asarray(self.raw_targets(records), dtype=np.float32).reshape(len(records), self.target_dim)
        present = ~np.isnan(raw).any(axis=1)
        if self.kind != "regression":
            bad = present & ((raw < 0) | (raw >= self.n_classes) | (raw != np.round(raw))).any(axis=1)
            if bad.any():
                ids = records.loc[bad, "image_id"].astype(str).tolist()[:5] if "image_id" in records else []
                raise DataError(f"task {self.name!r}: labels outside 0..{self.n_classes - 1} for ids {ids}")
        return np.where(present[:, None], raw, 0.0).astype(np.float32), present


def _numeric(records: pd.DataFrame, name: str) -> np.ndarray:
    return pd.to_numeric(records[name], errors="coerce").to_numpy(np.float64)


def _column(name: str) -> Encoder:
    return partial(_numeric, name=name)


def _regions(records: pd.DataFrame) -> np.ndarray:
    return records[list(REGION_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(np.float64)


def _global4(records: pd.DataFrame) -> np.ndarray:
    return bin_scores(_column("brixia_global")(records), GLOBAL_BIN_EDGES)


def _lung4(records: pd.DataFrame) -> np.ndarray:
    regions = _regions(records)
    lungs = np.stack([regions[:, :3].sum(axis=1), regions[:, 3:].sum(axis=1)], axis=1)
    return bin_scores(lungs, LUNG_BIN_EDGES)


_BUILTIN: dict[str, Task] = {
    task.name: task
    for task in (
        Task("prognosis", "classification", ("prognosis",), 1, 2, _column("prognosis"), None, ("MILD", "SEVERE")),
        Task(
            "severity_global4", "classification", ("brixia_global",), 1, 4, _global4, None,
            ("0-4", "5-9", "10-14", "15-18"),
        ),
        Task("severity_lung4", "classification", REGION_COLUMNS, 2, 4, _lung4, (1, 0), ("0-1", "2-4", "5-7", "8-9")),
        Task("severity_regions", "regression", REGION_COLUMNS, 6, 0, _regions, REGION_FLIP, REGIONS),
        Task("severity_ordinal", "ordinal", REGION_COLUMNS, 6, 4, _regions, REGION_FLIP, ("0", "1", "2", "3")),
    )
}

TASK_NAMES: tuple[str, ...] = tuple(_BUILTIN)


def get_task(name: str) -> Task:
    """A built-in task by name."""
    try:
        return _BUILTIN[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(TASK_NAMES)}") from None


def _class_key(value: object) -> str:
    """Upper-cased text of a class value; integral numbers as integers (a 0/1 sheet column reads as 1.0)."""
    if isinstance(value, (int, float, np.integer, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value).strip().upper()


def _class_indices(records: pd.DataFrame, task: str, column: str, classes: tuple[str, ...]) -> np.ndarray:
    lookup = {_class_key(c): i for i, c in enumerate(classes)}
    out = np.full(len(records), np.nan)
    for i, value in enumerate(records[column]):
        if pd.isna(value) or str(value).strip() == "":
            continue
        key = _class_key(value)
        if key not in lookup:
            raise DataError(f"task {task!r}: column {column!r} has value {value!r}; expected one of {list(classes)}")
        out[i] = lookup[key]
    return out


def make_task(name: str, column: str, kind: TaskKind = "classification", classes: Sequence[str] = ()) -> Task:
    """A task read from one manifest column (class names map to indices in the given order)."""
    if kind == "classification":
        if len(classes) < 2:
            raise ConfigError(f"task {name!r}: a classification task needs at least 2 classes")
        encode = partial(_class_indices, task=name, column=column, classes=tuple(map(str, classes)))
        return Task(name, kind, (column,), 1, len(classes), encode, None, tuple(map(str, classes)))
    if kind == "regression":
        return Task(name, kind, (column,), 1, 0, _column(column))
    raise ConfigError(f"task {name!r}: kind must be classification or regression, not {kind!r}")


# ----------------------------------------------------------------------------------------- prediction columns
def group_names(task: Task) -> list[str]:
    """Suffixes of a task's per-group columns: ``[""]`` for one group, else the region letters or indices."""
    if task.target_dim == 1:
        return [""]
    if len(task.columns) == task.target_dim:
        return [c.removeprefix("brixia_") for c in task.columns]
    return [str(i) for i in range(task.target_dim)]


def prediction_column(base: str, group: str) -> str:
    """``base`` for a one-group task, else ``base_<group>``."""
    return f"{base}_{group}" if group else base


def prediction_columns(base: str, task: Task) -> list[str]:
    """A task's per-group column names for ``base`` (``y_true`` → ``y_true`` or ``y_true_A`` …)."""
    return [prediction_column(base, g) for g in group_names(task)]
