"""Test-set scoring from a run folder's prediction files, so that new metrics need no retraining.

``tasks.json`` says how each head is scored (``Task.entry``: its ``scorer``); ``predictions_<task>.csv`` holds one row per test
image of every dataset of the run that labels the task. A task's metrics are those of its home dataset's rows;
a task labelled by several datasets also gets ``<task>@<dataset>`` metrics per dataset. Imports no torch.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from mdmt.config import CalibrationConfig, load_run_config, read_yaml
from mdmt.data.splits import CALIB
from mdmt.errors import ConfigError, DataError
from mdmt.evaluate import calibration
from mdmt.evaluate import metrics as metrics_lib
from mdmt.progress import progress_bar
from mdmt.runs import (
    CALIBRATION_FILE,
    CONFIG_FILE,
    DONE_FILE,
    METRICS_FILE,
    PREDICTIONS_PREFIX,
    RUNS_DIR,
    TASKS_FILE,
    atomic_write_text,
    predictions_file,
    task_of_predictions,
    write_json,
)
from mdmt.store import read_prediction_file
from mdmt.tasks import REGION_SCORE_RANGE, SCORERS, get_task, prediction_column


def read_predictions(path: Path) -> pd.DataFrame:
    """A ``predictions_<task>.csv`` file (``mdmt.store.read_prediction_file``: ids as text, every number present);
    DataError naming the file if it cannot be read."""
    try:
        return read_prediction_file(path)
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
            predicted = np.clip(predicted, *REGION_SCORE_RANGE)
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
    return task.entry(datasets, datasets[0])


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


def calibration_rows(run_dir: Path, task: str, home: str) -> tuple[str, Path, pd.DataFrame] | None:
    """(part, file, the home dataset's rows) calibration is fitted on: the ``calib`` part, which chose nothing, when
    its file holds rows of ``home``, else the ``val`` part that chose the epoch; None without either file."""
    for part in (CALIB, "val"):
        path = run_dir / predictions_file(task, part)
        if path.is_file():
            table = read_predictions(path)
            rows = table[table["dataset"] == home]
            if len(rows) or part == "val":
                return part, path, rows
    return None


def fit_calibration(run_dir: str | Path, settings: CalibrationConfig) -> dict[str, dict[str, Any]]:
    """Per task, what its home dataset's calibration rows (``calibration_rows``: ``calib_predictions_<task>.csv``
    when the run has a calibration part, else ``val_predictions_<task>.csv``) calibrate: for a binary head the
    calibration map with its decision threshold (``binary``) and conformal prediction sets on the calibrated
    probability (``sets``); for a regional Brixia head conformal intervals of the global score (``global``, 0–18)
    and of each region (``regions``, 0–3). Each entry names the ``part`` it was fitted on; a task that cannot be
    calibrated (a part with one class, too few rows for ``alpha``) records why under ``error``; a run without
    validation predictions gives ``{}``."""
    run_dir = Path(run_dir)
    out: dict[str, dict[str, Any]] = {}
    for name, entry in run_entries(run_dir).items():
        found = calibration_rows(run_dir, name, entry["home"]) if entry["scorer"] in ("binary", "regions") else None
        if found is None:
            continue
        part, path, rows = found
        truth = _columns(rows, "y_true", entry)
        try:
            if entry["scorer"] == "binary":
                binary = calibration.fit_binary_calibration(
                    truth[:, 0], rows["score"].to_numpy(np.float64), method=settings.method, rule=settings.threshold,
                    target_sensitivity=settings.target_sensitivity)
                probability = binary.apply(rows["score"].to_numpy(np.float64))
                sets = calibration.fit_binary_conformal(truth[:, 0], probability, settings.alpha)
                out[name] = {"part": part, "binary": binary.to_dict(), "sets": sets.to_dict()}
            else:
                predicted = np.clip(_columns(rows, "y_pred", entry), *REGION_SCORE_RANGE)
                total = calibration.fit_interval_conformal(truth.sum(1), predicted.sum(1), settings.alpha,
                                                           (0.0, REGION_SCORE_RANGE[1] * truth.shape[1]))
                regions = calibration.fit_interval_conformal(truth, predicted, settings.alpha, REGION_SCORE_RANGE)
                out[name] = {"part": part, "global": total.to_dict(), "regions": regions.to_dict()}
        except ValueError as error:
            out[name] = {"part": part, "error": f"{path} ({entry['home']} rows): {error}"}
    return out


def write_metrics(run_dir: str | Path, calibration_settings: CalibrationConfig | None = None
                  ) -> dict[str, dict[str, float]]:
    """Score a run (``score_run``) and write ``metrics.json`` (strict JSON: NaN as null), and ``calibration.json``
    when it has validation predictions (a run with a calibration part has them too); returns the metrics.

    Calibration is fitted with the run's own ``calibration`` settings, or with ``calibration_settings`` when given:
    those are then recorded in the run's ``config.yaml`` (its ``calibration`` section, nothing else), so the run
    says what it was calibrated with (``mdmt.model_card.recalibrate`` refreshes its model card too)."""
    run_dir = Path(run_dir)
    metrics = score_run(run_dir)
    write_json(metrics, run_dir / METRICS_FILE)
    if any(run_dir.glob(f"{predictions_file('*', 'val')}")):
        config = run_dir / CONFIG_FILE
        settings = calibration_settings or (load_run_config(config).calibration if config.is_file()
                                            else CalibrationConfig())
        write_json(fit_calibration(run_dir, settings), run_dir / CALIBRATION_FILE)
        if calibration_settings is not None and config.is_file():
            values = read_yaml(config)
            values["calibration"] = dataclasses.asdict(calibration_settings)
            atomic_write_text(yaml.safe_dump(values, sort_keys=False), config)
    return metrics


def finished_runs(results_dir: str | Path) -> list[Path]:
    """The run folders under ``results_dir`` that hold ``DONE``, sorted; DataError when the folder is missing."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise DataError(f"results folder {results_dir} does not exist")
    return sorted(p.parent for p in (results_dir / RUNS_DIR).glob(f"*/*/*/fold*/seed*/{DONE_FILE}"))


def rescore(results_dir: str | Path, calibration_settings: CalibrationConfig | None = None,
            progress: bool = False) -> int:
    """Recompute ``metrics.json`` of every finished run under ``results_dir`` from its prediction files, with
    calibration fitted again by ``write_metrics`` (the runs' own settings, or ``calibration_settings``), with a
    progress bar when ``progress``; returns the number of runs rescored. Runs that cannot be scored are named
    together in one DataError at the end."""
    runs = finished_runs(results_dir)
    failures = []
    for run_dir in progress_bar(runs, "rescoring runs", enabled=progress):
        try:
            write_metrics(run_dir, calibration_settings)
        except (DataError, OSError) as error:
            failures.append(f"{run_dir}: {error}")
    if failures:
        raise DataError(f"{len(failures)} of {len(runs)} runs could not be rescored:\n" + "\n".join(failures))
    return len(runs)
