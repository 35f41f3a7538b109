"""Results store: an SQLite index over the run folders, one row per run.

The run folders are the truth (the run contract of ``mdmt.runs``: ``spec.json``, ``metrics.json``,
``predictions_<task>.csv``, ``DONE`` written last). The index ``<results_dir>/index.sqlite`` makes queries cheap
and records what the run folders cannot (start time of a run that is still going, timings measured by the grid);
every write is one transaction. :meth:`ResultsStore.rescan` rebuilds it from the run folders, so a report never
depends on the index being intact. A failed run leaves a ``FAILED`` file (the error) in its run folder, so
failures survive a rescan too. A finished run whose ``metrics.json`` or prediction file cannot be read is listed
with status ``unreadable`` and the reason, never raised.

An index that is not a database is moved aside and rebuilt. When the index cannot be written (a read-only results
folder) the store keeps it in memory, starting from a copy of the file when there is one.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
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

log = logging.getLogger(__name__)
__all__ = ["COLUMNS", "FAILED_FILE", "INDEX_FILE", "STATUSES", "ResultsStore", "spec_fields"]

INDEX_FILE = "index.sqlite"
SCHEMA_VERSION = 2
"""``PRAGMA user_version`` of the index; an index of another version is rebuilt (it only caches the folders)."""
STATUSES = ("done", "running", "failed", "unreadable")
SPEC_COLUMNS = list(SPEC_FIELDS)
COLUMNS = ["key", *SPEC_COLUMNS, "status", "started", "finished", "seconds", "run_dir", "metrics", "error"]
ID_COLUMNS = {"image_id": str, "patient_id": str, "center": str, "dataset": str}
NUMERIC_PREFIXES = ("y_true", "y_pred", "score", "prob", "expected")
"""Prediction-file columns that must hold numbers."""
_READ_ONLY_ERRORS = ("readonly", "read-only", "unable to open")
_TRANSIENT_ERRORS = ("locked", "disk is full", "busy")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    strategy TEXT NOT NULL,
    backbone TEXT NOT NULL,
    protocol TEXT NOT NULL,
    fold INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('done', 'running', 'failed', 'unreadable')),
    started REAL,
    finished REAL,
    seconds REAL,
    run_dir TEXT NOT NULL,
    metrics TEXT,
    error TEXT
)
"""


def spec_fields(spec: RunSpec) -> dict[str, Any]:
    """The spec columns of a RunSpec."""
    return {name: getattr(spec, name) for name in SPEC_COLUMNS}


def _open(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, timeout=60)


def _mtime(path: Path) -> float | None:
    return path.stat().st_mtime if path.exists() else None


def _read_metrics(run_dir: Path) -> str | None:
    """``metrics.json`` normalised to sorted-key JSON; ValueError if it is not ``{task: {metric: value}}``."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return None
    values = json.loads(path.read_text())
    if not isinstance(values, dict) or not all(isinstance(v, dict) for v in values.values()):
        raise ValueError("expected an object of task → {metric: value}")
    return json.dumps(values, sort_keys=True)


def _read_predictions(path: Path) -> pd.DataFrame:
    """A prediction file; ValueError naming what is wrong when it is not one."""
    table = pd.read_csv(path, dtype=ID_COLUMNS)
    if "image_id" not in table.columns or not any(c.startswith("y_true") for c in table.columns):
        raise ValueError(f"no image_id or y_true column (columns: {list(table.columns)[:8]})")
    text = [c for c in table.columns if c.startswith(NUMERIC_PREFIXES) and not pd.api.types.is_numeric_dtype(table[c])]
    if text:
        raise ValueError(f"columns {text} hold values that are not numbers")
    return table


def _problems(run_dir: Path) -> tuple[str | None, list[str]]:
    """The normalised metrics of a finished run and what could not be read (``metrics.json``, prediction files)."""
    problems = []
    metrics = None
    try:
        metrics = _read_metrics(run_dir)
    except (OSError, ValueError) as error:
        problems.append(f"{METRICS_FILE}: {error}")
    for path in sorted(run_dir.glob(f"{PREDICTIONS_PREFIX}*.csv")):
        try:
            _read_predictions(path)
        except (OSError, ValueError) as error:
            problems.append(f"{path.name}: {error}")
    return metrics, problems


def _finished_fields(run_dir: Path) -> dict[str, Any]:
    """Status ``done`` with its metrics, or ``unreadable`` with the reasons."""
    metrics, problems = _problems(run_dir)
    if problems:
        return {"status": "unreadable", "error": "unreadable: " + "; ".join(problems)}
    return {"status": "done", "metrics": metrics}


class ResultsStore:
    """One row per run in ``<results_dir>/index.sqlite``, kept in step with the run folders."""

    def __init__(self, results_dir: str | Path):
        self.results_dir = Path(results_dir)
        self.path = self.results_dir / INDEX_FILE
        self._memory: sqlite3.Connection | None = None
        self.results_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._create()
        except sqlite3.DatabaseError as error:
            message = str(error).lower()
            if any(word in message for word in _READ_ONLY_ERRORS):
                self._use_memory()
            elif any(word in message for word in _TRANSIENT_ERRORS):
                raise
            else:  # not a database: moved aside and started afresh; rescan() refills it from the run folders
                damaged = self.path.with_name(f"{INDEX_FILE}.damaged-{int(time.time())}")
                try:
                    os.replace(self.path, damaged)
                except OSError:
                    self._use_memory()
                    return
                log.warning("%s: not a results index (%s); moved to %s and rebuilt from the run folders",
                            self.path, error, damaged.name)
                self._create()

    @property
    def in_memory(self) -> bool:
        """Whether the index lives in memory (the results folder cannot be written)."""
        return self._memory is not None

    def _create(self) -> None:
        """Create (or upgrade by rebuilding) the table; setting the version also proves the index is writable."""
        with self._transaction() as db:
            if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                db.execute("DROP TABLE IF EXISTS runs")
            db.execute(_SCHEMA)
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            db.execute("SELECT count(*) FROM runs").fetchone()

    def _use_memory(self) -> None:
        """Keep the index in memory, starting from a read-only copy of the file when it is a readable index."""
        self._memory = sqlite3.connect(":memory:")
        if self.path.is_file():
            try:
                with closing(sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)) as source:
                    source.backup(self._memory)
            except sqlite3.DatabaseError:
                self._memory = sqlite3.connect(":memory:")
        self._create()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A connection whose statements commit together (or roll back on error)."""
        if self._memory is not None:
            with self._memory:
                yield self._memory
            return
        with closing(_open(self.path)) as db, db:
            yield db

    def _upsert(self, db: sqlite3.Connection, row: dict[str, Any]) -> None:
        db.execute(
            f"INSERT OR REPLACE INTO runs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
            [row.get(c) for c in COLUMNS],
        )

    def run_dir(self, spec: RunSpec) -> Path:
        """The run folder of ``spec`` under this store's results folder."""
        return spec.run_dir(self.results_dir)

    # ----------------------------------------------------------------------------------------- writes
    def record_start(self, spec: RunSpec) -> None:
        """Mark ``spec`` as running (clears an earlier failure, in the index and the run folder)."""
        run_dir = self.run_dir(spec)
        (run_dir / FAILED_FILE).unlink(missing_ok=True)
        with self._transaction() as db:
            self._upsert(db, {"key": spec.key, **spec_fields(spec), "status": "running", "started": time.time(),
                              "run_dir": str(run_dir)})

    def _started(self, db: sqlite3.Connection, key: str) -> float | None:
        row = db.execute("SELECT started FROM runs WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def record_done(self, spec: RunSpec, seconds: float | None = None) -> None:
        """Mark ``spec`` as done and index its ``metrics.json`` (``unreadable`` if its files cannot be read);
        ``seconds`` defaults to the time since its start."""
        self._record_end(spec, seconds, **_finished_fields(self.run_dir(spec)))

    def record_failure(self, spec: RunSpec, error: str, seconds: float | None = None) -> None:
        """Mark ``spec`` as failed with ``error``; the error is also written to ``FAILED`` in its run folder."""
        run_dir = self.run_dir(spec)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(error, run_dir / FAILED_FILE)
        self._record_end(spec, seconds, status="failed", error=error)

    def _record_end(self, spec: RunSpec, seconds: float | None, **fields: Any) -> None:
        finished = time.time()
        with self._transaction() as db:
            started = self._started(db, spec.key)
            if seconds is None and started is not None:
                seconds = finished - started
            self._upsert(db, {"key": spec.key, **spec_fields(spec), "started": started, "finished": finished,
                              "seconds": seconds, "run_dir": str(self.run_dir(spec)), **fields})

    def rescan(self) -> int:
        """Rebuild the index from the run folders (one transaction); returns the number of runs found.

        DONE → done (metrics from ``metrics.json``) or unreadable, FAILED → failed (its error), otherwise running
        (started or interrupted). Timings already in the index are kept for runs whose status the files confirm;
        otherwise they come from the file times (and ``history.csv``'s epoch seconds).
        """
        runs_root = self.results_dir / RUNS_DIR
        found = sorted(p.parent for p in runs_root.glob(f"*/*/*/fold*/seed*/{SPEC_FILE}")) if runs_root.is_dir() else []
        found += sorted(p.parent for p in runs_root.glob(f"*/*/*/fold*/seed*/{FAILED_FILE}")
                        if not (p.parent / SPEC_FILE).is_file())
        known = self.runs().set_index("key")
        rows = []
        for run_dir in found:
            spec = spec_from_dir(run_dir, runs_root)
            if spec is not None:
                rows.append(self._row_from_dir(spec, run_dir, known))
        with self._transaction() as db:
            db.execute("DELETE FROM runs")
            for row in rows:
                self._upsert(db, row)
        return len(rows)

    @staticmethod
    def _row_from_dir(spec: RunSpec, run_dir: Path, known: pd.DataFrame) -> dict[str, Any]:
        done, failed = run_dir / DONE_FILE, run_dir / FAILED_FILE
        row: dict[str, Any] = {"key": spec.key, **spec_fields(spec), "status": "running", "run_dir": str(run_dir),
                               "started": _mtime(run_dir / SPEC_FILE) or _mtime(run_dir)}
        if done.is_file():
            row |= _finished_fields(run_dir)
            row["finished"] = _mtime(done)
            row["seconds"] = _history_seconds(run_dir / HISTORY_FILE)
        elif failed.is_file():
            row |= {"status": "failed", "finished": _mtime(failed), "error": failed.read_text(errors="replace")}
        if spec.key in known.index and known.at[spec.key, "status"] == row["status"]:
            for column in ("started", "finished", "seconds"):
                value = known.at[spec.key, column]
                if pd.notna(value):
                    row[column] = float(value)
        return row

    # ----------------------------------------------------------------------------------------- reads
    def runs(self, status: str | None = None) -> pd.DataFrame:
        """The index as a DataFrame (one row per run, columns ``COLUMNS``), optionally of one status."""
        if status is not None and status not in STATUSES:
            raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
        query = f"SELECT {', '.join(COLUMNS)} FROM runs"
        params: tuple[str, ...] = ()
        if status is not None:
            query += " WHERE status = ?"
            params = (status,)
        with self._transaction() as db:
            rows = db.execute(query + " ORDER BY strategy, backbone, protocol, fold, seed", params).fetchall()
        return pd.DataFrame(rows, columns=COLUMNS)

    def metrics_frame(self, task: str = "prognosis") -> pd.DataFrame:
        """One row per finished run × metric of ``task``: key, the spec columns, metric, value."""
        records = []
        for run in self.runs("done").itertuples(index=False):
            values = json.loads(run.metrics).get(task, {}) if run.metrics else {}
            for metric, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    records.append({"key": run.key, **{c: getattr(run, c) for c in SPEC_COLUMNS},
                                    "metric": metric, "value": float(value)})
        return pd.DataFrame(records, columns=["key", *SPEC_COLUMNS, "metric", "value"])

    def predictions(self, task: str = "prognosis") -> pd.DataFrame:
        """Every finished run's test predictions of ``task`` (``predictions_<task>.csv``) with the spec columns.

        The file's own ``fold`` column (if any) is replaced by the spec's; runs without a readable file are left
        out (a file that became unreadable since the last scan included).
        """
        frames = []
        for run in self.runs("done").itertuples(index=False):
            path = Path(run.run_dir) / predictions_file(task)
            if not path.is_file():
                continue
            try:
                table = _read_predictions(path)
            except (OSError, ValueError):
                continue
            table = table.drop(columns=[c for c in ["key", *SPEC_COLUMNS] if c in table.columns])
            spec = pd.DataFrame({"key": run.key, **{c: getattr(run, c) for c in SPEC_COLUMNS}}, index=table.index)
            frames.append(pd.concat([spec, table], axis=1))
        if not frames:
            return pd.DataFrame(columns=["key", *SPEC_COLUMNS])
        return pd.concat(frames, ignore_index=True)


def _history_seconds(path: Path) -> float | None:
    """The summed epoch seconds of ``history.csv`` (None when absent or unreadable)."""
    try:
        seconds = pd.read_csv(path).get("seconds")
    except (OSError, ValueError):
        return None
    return float(seconds.sum()) if seconds is not None else None
