"""Results store: the run folders scanned into a DataFrame, one row per run.

The run folders are the only record (the run contract of ``mdmt.runs``: ``spec.json``, ``metrics.json``,
``predictions_<task>.csv``, ``DONE`` written last, ``FAILED`` holding a failed run's error). Every read scans them
again, so it is never out of step with them, and reading writes nothing: a report reads a read-only results folder
as any other. The grid's only writes are a run's folder when it starts (clearing an earlier ``FAILED``) and the
``FAILED`` file when it fails.

A folder ``runs/<strategy>/<backbone>/<protocol>/fold<k>/seed<s>`` is a run: ``done`` when it holds ``DONE``,
``failed`` when it holds ``FAILED``, else ``running`` (started, or interrupted). A finished run whose
``metrics.json`` is missing or cannot be read, or whose prediction file cannot be read, lacks a value or was cut
short, is listed with status ``unreadable`` and the reason, never raised. ``started`` is the time of ``spec.json``
(of the folder before it is written), ``finished`` that of ``DONE`` or ``FAILED``, ``seconds`` the summed epoch
seconds of ``history.csv``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pandas as pd

from mdmt.runs import (
    DONE_FILE,
    FAILED_FILE,
    HISTORY_FILE,
    METRICS_FILE,
    PREDICTIONS_PREFIX,
    RUNS_DIR,
    SPEC_FIELDS,
    SPEC_FILE,
    RunSpec,
    atomic_write_text,
    predictions_file,
    spec_from_dir,
)

__all__ = ["COLUMNS", "FAILED_FILE", "STATUSES", "ResultsStore", "read_prediction_file", "spec_fields"]

STATUSES = ("done", "running", "failed", "unreadable")
SPEC_COLUMNS = list(SPEC_FIELDS)
COLUMNS = ["key", *SPEC_COLUMNS, "status", "started", "finished", "seconds", "run_dir", "metrics", "error"]
ID_COLUMNS = {"image_id": str, "patient_id": str, "center": str, "dataset": str}
NUMERIC_PREFIXES = ("y_true", "y_pred", "score", "prob", "expected")
"""Prediction-file columns that must hold numbers."""


def spec_fields(spec: RunSpec) -> dict[str, Any]:
    """The spec columns of a RunSpec."""
    return {name: getattr(spec, name) for name in SPEC_COLUMNS}


def _mtime(path: Path) -> float | None:
    return path.stat().st_mtime if path.exists() else None


def _read_metrics(run_dir: Path) -> str:
    """``metrics.json`` normalised to sorted-key JSON; ValueError when it is missing or not
    ``{task: {metric: value}}``."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ValueError("missing (the run wrote DONE without it)")
    values = json.loads(path.read_text())
    if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
        raise ValueError("expected an object of task → {metric: value}")
    return json.dumps(values, sort_keys=True)


def read_prediction_file(path: Path) -> pd.DataFrame:
    """A ``predictions_<task>.csv`` file (ids as text); ValueError naming what is wrong when it is not one: a last
    row without its line break (the file was cut short: pandas would read the missing fields as NaN, or a number
    cut in two as a shorter one), no ``image_id`` or ``y_true`` column, text or a blank in a number column."""
    data = Path(path).read_bytes()
    if data and not data.endswith(b"\n"):
        raise ValueError("the last row has no line break: the file was cut short")
    table = pd.read_csv(io.BytesIO(data), dtype=ID_COLUMNS)
    if "image_id" not in table.columns or not any(c.startswith("y_true") for c in table.columns):
        raise ValueError(f"no image_id or y_true column (columns: {list(table.columns)[:8]})")
    numbers = [c for c in table.columns if c.startswith(NUMERIC_PREFIXES)]
    text = [c for c in numbers if not pd.api.types.is_numeric_dtype(table[c])]
    if text:
        raise ValueError(f"columns {text} hold values that are not numbers")
    blank = table[numbers].isna()
    if blank.to_numpy().any():
        rows = blank.any(axis=1)
        first = int(rows.to_numpy().argmax())
        raise ValueError(f"{int(rows.sum())} row(s) lack a value in {list(blank.columns[blank.any()])}, the first "
                         f"on line {first + 2} (image {table['image_id'].iloc[first]!r})")
    return table


def _finished_fields(run_dir: Path) -> dict[str, Any]:
    """Status ``done`` with its metrics, or ``unreadable`` with what could not be read (``metrics.json``, prediction
    files)."""
    problems = []
    metrics = None
    try:
        metrics = _read_metrics(run_dir)
    except (OSError, ValueError) as error:
        problems.append(f"{METRICS_FILE}: {error}")
    for path in sorted(run_dir.glob(f"{PREDICTIONS_PREFIX}*.csv")):
        try:
            read_prediction_file(path)
        except (OSError, ValueError) as error:
            problems.append(f"{path.name}: {error}")
    if problems:
        return {"status": "unreadable", "error": "unreadable: " + "; ".join(problems)}
    return {"status": "done", "metrics": metrics}


def _history_seconds(path: Path) -> float | None:
    """The summed epoch seconds of ``history.csv`` (None when absent or unreadable)."""
    try:
        seconds = pd.read_csv(path).get("seconds")
    except (OSError, ValueError):
        return None
    return float(seconds.sum()) if seconds is not None else None


def _row(spec: RunSpec, run_dir: Path) -> dict[str, Any]:
    """One run folder as a row of ``COLUMNS``."""
    done, failed = run_dir / DONE_FILE, run_dir / FAILED_FILE
    row: dict[str, Any] = {"key": spec.key, **spec_fields(spec), "status": "running", "run_dir": str(run_dir),
                           "started": _mtime(run_dir / SPEC_FILE) or _mtime(run_dir)}
    if done.is_file():
        row |= _finished_fields(run_dir)
        row |= {"finished": _mtime(done), "seconds": _history_seconds(run_dir / HISTORY_FILE)}
    elif failed.is_file():
        row |= {"status": "failed", "finished": _mtime(failed), "error": failed.read_text(errors="replace")}
    return row


class ResultsStore:
    """The runs of ``<results_dir>/runs``, read from their folders at each call."""

    def __init__(self, results_dir: str | Path):
        self.results_dir = Path(results_dir)

    def run_dir(self, spec: RunSpec) -> Path:
        """The run folder of ``spec`` under this store's results folder."""
        return spec.run_dir(self.results_dir)

    # ----------------------------------------------------------------------------------------- the grid's records
    def record_start(self, spec: RunSpec) -> None:
        """Create the run folder of ``spec`` (it is ``running`` from now on) and clear an earlier failure."""
        run_dir = self.run_dir(spec)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / FAILED_FILE).unlink(missing_ok=True)

    def record_failure(self, spec: RunSpec, error: str) -> None:
        """Write ``error`` to ``FAILED`` in the run folder of ``spec``."""
        run_dir = self.run_dir(spec)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(error, run_dir / FAILED_FILE)

    # ----------------------------------------------------------------------------------------- reads
    def runs(self, status: str | None = None) -> pd.DataFrame:
        """One row per run folder (columns ``COLUMNS``, ordered by strategy, backbone, protocol, fold, seed),
        optionally of one status."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        runs_root = self.results_dir / RUNS_DIR
        folders = sorted(p for p in runs_root.glob("*/*/*/fold*/seed*") if p.is_dir()) if runs_root.is_dir() else []
        rows = [_row(spec, folder) for folder in folders
                if (spec := spec_from_dir(folder, runs_root)) is not None]
        table = pd.DataFrame(rows, columns=COLUMNS).sort_values(SPEC_COLUMNS, ignore_index=True)
        return table if status is None else table[table["status"] == status].reset_index(drop=True)

    def metrics_frame(self, task: str = "prognosis", runs: pd.DataFrame | None = None) -> pd.DataFrame:
        """One row per finished run × metric of ``task``: key, the spec columns, metric, value (``runs``: a
        ``runs()`` frame already read, else the folders are read again)."""
        records = []
        for run in _done(self.runs() if runs is None else runs).itertuples(index=False):
            values = json.loads(run.metrics).get(task, {})
            for metric, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    records.append({"key": run.key, **{c: getattr(run, c) for c in SPEC_COLUMNS},
                                    "metric": metric, "value": float(value)})
        return pd.DataFrame(records, columns=["key", *SPEC_COLUMNS, "metric", "value"])

    def predictions(self, task: str = "prognosis", runs: pd.DataFrame | None = None) -> pd.DataFrame:
        """Every finished run's test predictions of ``task`` (``predictions_<task>.csv``) with the spec columns
        (``runs``: a ``runs()`` frame already read, else the folders are read again).

        The file's own ``fold`` column (if any) is replaced by the spec's; runs without a readable file are left
        out (a file that became unreadable since ``runs`` was read included).
        """
        frames = []
        for run in _done(self.runs() if runs is None else runs).itertuples(index=False):
            path = Path(run.run_dir) / predictions_file(task)
            if not path.is_file():
                continue
            try:
                table = read_prediction_file(path)
            except (OSError, ValueError):
                continue
            table = table.drop(columns=[c for c in ["key", *SPEC_COLUMNS] if c in table.columns])
            spec = pd.DataFrame({"key": run.key, **{c: getattr(run, c) for c in SPEC_COLUMNS}}, index=table.index)
            frames.append(pd.concat([spec, table], axis=1))
        if not frames:
            return pd.DataFrame(columns=["key", *SPEC_COLUMNS])
        return pd.concat(frames, ignore_index=True)


def _done(runs: pd.DataFrame) -> pd.DataFrame:
    return runs[runs["status"] == "done"]
