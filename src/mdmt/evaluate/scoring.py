"""Test-set scoring from a run folder's prediction files, so that new metrics need no retraining.

``tasks.json`` says how each head is scored (``task_entry``); ``predictions_<task>.csv`` holds one row per test
image of every dataset of the run that labels the task. A task's metrics are those of its home dataset's rows;
a task labelled by several datasets also gets ``<task>@<dataset>`` metrics per dataset. Imports no torch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdmt.errors import ConfigError, DataError
from mdmt.evaluate import metrics as metrics_lib
from mdmt.runs import (
    DONE_FILE,
    METRICS_FILE,
    PREDICTIONS_PREFIX,
    RUNS_DIR,
    TASKS_FILE,
    predictions_file,
    task_of_predictions,
    write_json,
)
from mdmt.tasks import Task, get_task, group_names, prediction_column

SCORERS: tuple[str, ...] = ("binary", *metrics_lib.SEVERITY_KINDS, "regression", "classification")
"""How a task's predictions are scored: ``binary`` from ``score`` (prognosis metrics), a severity kind
(``metrics.severity_metrics``), or plain regression / classification metrics of the ``y_pred`` columns."""
ID_COLUMNS: dict[str, type] = {"image_id": str, "patient_id": str, "center": str, "dataset": str}
"""Prediction-file columns read as text (ids such as BrixIA's long digit strings must not become numbers)."""


def scorer_of(task: Task) -> str:
    """The scorer of a task: ``binary`` for one two-class output, the severity kind of a built-in severity task,
    else ``regression`` or ``classification`` by its kind."""
    if task.kind == "classification" and task.n_classes == 2 and task.target_dim == 1:
        return "binary"
    if task.name in metrics_lib.SEVERITY_KIND_OF_TASK:
        return metrics_lib.SEVERITY_KIND_OF_TASK[task.name]
    return "regression" if task.kind == "regression" else "classification"


def task_entry(task: Task, datasets: Sequence[str], home: str) -> dict[str, Any]:
    """The ``tasks.json`` entry of a head: kind, scorer, group suffixes, classes, the run's datasets labelling it
    and its home dataset (whose rows give the task's metrics)."""
    if home not in datasets:
        raise ValueError(f"task {task.name!r}: home dataset {home!r} is not one of its datasets {list(datasets)}")
    return {"kind": task.kind, "scorer": scorer_of(task), "groups": group_names(task), "n_classes": task.n_classes,
            "class_names": list(task.class_names), "datasets": list(datasets), "home": home}


def read_predictions(path: Path) -> pd.DataFrame:
    """A ``predictions_<task>.csv`` file (ids as text); DataError naming the file if it cannot be read."""
    try:
        return pd.read_csv(path, dtype=ID_COLUMNS)
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: unreadable prediction file ({error})") from error


def _columns(table: pd.DataFrame, base: str, entry: dict[str, Any]) -> np.ndarray:
    names = [prediction_column(base, g) for g in entry["groups"]]
    missing = [n for n in names if n not in table.columns]
    if missing:
        raise DataError(f"prediction table lacks columns {missing} (has {list(table.columns)})")
    return table[names].to_numpy(np.float64)


def score_table(entry: dict[str, Any], table: pd.DataFrame) -> dict[str, float]:
    """The metrics of one task's prediction rows, by the entry's scorer (regional severity predictions are
    clipped to the 0–3 score range first)."""
    scorer = entry["scorer"]
    truth = _columns(table, "y_true", entry)
    if scorer == "binary":
        if "score" not in table.columns:
            raise DataError(f"prediction table lacks the column 'score' (has {list(table.columns)})")
        return metrics_lib.prognosis_metrics(truth[:, 0], table["score"].to_numpy(np.float64))
    predicted = _columns(table, "y_pred", entry)
    if scorer in metrics_lib.SEVERITY_KINDS:
        if scorer == "regions":
            predicted = np.clip(predicted, *metrics_lib.REGION_SCORE_RANGE)
        return metrics_lib.severity_metrics(scorer, truth, predicted)
    if scorer == "regression":
        return metrics_lib.regression_metrics(truth.ravel(), predicted.ravel())
    if scorer == "classification":
        return metrics_lib.classification_metrics(truth.ravel(), predicted.ravel(), int(entry["n_classes"]))
    raise DataError(f"unknown scorer {scorer!r}; expected one of {', '.join(SCORERS)}")


def _inferred_entry(path: Path) -> dict[str, Any]:
    """The entry of a prediction file of a run without ``tasks.json``: a built-in task, its only dataset home."""
    name = task_of_predictions(path)
    try:
        task = get_task(name)
    except ConfigError:
        raise DataError(f"{path.parent}: no {TASKS_FILE} and {name!r} is not a built-in task") from None
    table = read_predictions(path)
    datasets = sorted(table["dataset"].dropna().unique()) if "dataset" in table.columns else []
    if len(datasets) != 1:
        raise DataError(f"{path}: no {TASKS_FILE} beside it and {len(datasets)} datasets {datasets} in the file; "
                        "the home dataset is unknown")
    return task_entry(task, datasets, datasets[0])


def run_entries(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The task entries of a run folder: ``tasks.json``, or for older runs inferred from the prediction files."""
    run_dir = Path(run_dir)
    path = run_dir / TASKS_FILE
    if not path.is_file():
        return {task_of_predictions(p): _inferred_entry(p)
                for p in sorted(run_dir.glob(f"{PREDICTIONS_PREFIX}*.csv"))}
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: unreadable ({error})") from error
    if not isinstance(entries, dict) or not all(isinstance(e, dict) and "scorer" in e and "home" in e
                                                 for e in entries.values()):
        raise DataError(f"{path}: expected {{task: {{scorer, home, ...}}}}")
    return entries


def score_run(run_dir: str | Path) -> dict[str, dict[str, float]]:
    """Metrics of every task of a run from its prediction files: ``task`` on its home dataset's rows, and
    ``task@dataset`` per dataset when several datasets label the task."""
    run_dir = Path(run_dir)
    out: dict[str, dict[str, float]] = {}
    for name, entry in run_entries(run_dir).items():
        path = run_dir / predictions_file(name)
        if not path.is_file():
            continue
        table = read_predictions(path)
        if "dataset" not in table.columns:
            raise DataError(f"{path}: no 'dataset' column")
        parts = {str(ds): rows for ds, rows in table.groupby("dataset", sort=True)}
        wanted = [(name, entry["home"])]
        if len(entry["datasets"]) > 1:
            wanted += [(f"{name}@{ds}", ds) for ds in entry["datasets"]]
        for key, dataset in wanted:
            if dataset in parts:
                try:
                    out[key] = score_table(entry, parts[dataset])
                except ValueError as error:
                    raise DataError(f"{path} ({dataset} rows): {error}") from error
    return out


def write_metrics(run_dir: str | Path) -> dict[str, dict[str, float]]:
    """Score a run (``score_run``) and write ``metrics.json`` (strict JSON: NaN as null); returns the metrics."""
    metrics = score_run(run_dir)
    write_json(metrics, Path(run_dir) / METRICS_FILE)
    return metrics


def rescore(results_dir: str | Path) -> int:
    """Recompute ``metrics.json`` of every finished run under ``results_dir`` from its prediction files; returns
    the number of runs rescored. Runs that cannot be scored are named together in one DataError at the end."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise DataError(f"results folder {results_dir} does not exist")
    runs = sorted(p.parent for p in (results_dir / RUNS_DIR).glob(f"*/*/*/fold*/seed*/{DONE_FILE}"))
    failures = []
    for run_dir in runs:
        try:
            write_metrics(run_dir)
        except (DataError, OSError) as error:
            failures.append(f"{run_dir}: {error}")
    if failures:
        raise DataError(f"{len(failures)} of {len(runs)} runs could not be rescored:\n" + "\n".join(failures))
    return len(runs)
