"""Results store: an SQLite index over the run directories, one row per run.

The run directories are the truth (run contract: ``spec.json``, ``metrics.json``, ``predictions_<task>.csv``,
``DONE`` written last). The index ``<results_dir>/index.sqlite`` makes queries cheap and records what the run
directories cannot (start time of a run that is still going, timings measured by the grid); every write is one
transaction. :meth:`ResultsStore.rescan` rebuilds it from the run directories, so a report never depends on the
index being intact. A failed run leaves a ``FAILED`` file (the error) in its run directory, so failures survive a
rescan too.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from mdmt.train.engine import HISTORY_FILE, atomic_write_text
from mdmt.train.run import DONE_FILE, METRICS_FILE, SPEC_FILE, RunSpec

INDEX_FILE = "index.sqlite"
RUNS_DIR = "runs"
FAILED_FILE = "FAILED"
STATUSES = ("done", "running", "failed")
SPEC_COLUMNS = ["strategy", "backbone", "protocol", "fold", "seed"]
COLUMNS = ["key", *SPEC_COLUMNS, "status", "started", "finished", "seconds", "run_dir", "metrics", "error"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    key TEXT PRIMARY KEY,
    strategy TEXT NOT NULL,
    backbone TEXT NOT NULL,
    protocol TEXT NOT NULL,
    fold INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('done', 'running', 'failed')),
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


def _spec_from_dir(run_dir: Path, runs_root: Path) -> RunSpec | None:
    """The spec of a run directory: ``spec.json`` when present, else the folder names; None if neither fits."""
    spec_file = run_dir / SPEC_FILE
    if spec_file.is_file():
        try:
            values = json.loads(spec_file.read_text())
            return RunSpec(str(values["strategy"]), str(values["backbone"]), str(values["protocol"]),
                          int(values["fold"]), int(values["seed"]))
        except (ValueError, KeyError, TypeError):
            pass
    parts = run_dir.relative_to(runs_root).parts
    if len(parts) != 5 or not parts[3].startswith("fold") or not parts[4].startswith("seed"):
        return None
    try:
        return RunSpec(parts[0], parts[1], parts[2], int(parts[3][4:]), int(parts[4][4:]))
    except ValueError:
        return None


def _mtime(path: Path) -> float | None:
    return path.stat().st_mtime if path.exists() else None


def _read_metrics(run_dir: Path) -> str | None:
    path = run_dir / METRICS_FILE
    return json.dumps(json.loads(path.read_text()), sort_keys=True) if path.is_file() else None


class ResultsStore:
    """One row per run in ``<results_dir>/index.sqlite``, kept in step with the run directories."""

    def __init__(self, results_dir: str | Path):
        self.results_dir = Path(results_dir)
        self.path = self.results_dir / INDEX_FILE
        self.results_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._create()
        except sqlite3.DatabaseError:
            # An unreadable index is moved aside and started afresh; rescan() refills it from the run directories.
            os.replace(self.path, self.path.with_name(f"{INDEX_FILE}.damaged-{int(time.time())}"))
            self._create()

    def _create(self) -> None:
        with self._transaction() as db:
            db.execute(_SCHEMA)
            db.execute("SELECT count(*) FROM runs").fetchone()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A connection whose statements commit together (or roll back on error), then close."""
        with closing(sqlite3.connect(self.path, timeout=60)) as db, db:
            yield db

    def _upsert(self, db: sqlite3.Connection, row: dict[str, Any]) -> None:
        db.execute(
            f"INSERT OR REPLACE INTO runs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
            [row.get(c) for c in COLUMNS],
        )

    def run_dir(self, spec: RunSpec) -> Path:
        """The run directory of ``spec`` under this store's results folder."""
        return spec.run_dir(self.results_dir)

    # ----------------------------------------------------------------------------------------- writes
    def record_start(self, spec: RunSpec) -> None:
        """Mark ``spec`` as running (clears an earlier failure, in the index and the run directory)."""
        run_dir = self.run_dir(spec)
        (run_dir / FAILED_FILE).unlink(missing_ok=True)
        with self._transaction() as db:
            self._upsert(db, {"key": spec.key, **spec_fields(spec), "status": "running", "started": time.time(),
                              "run_dir": str(run_dir)})

    def _started(self, db: sqlite3.Connection, key: str) -> float | None:
        row = db.execute("SELECT started FROM runs WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def record_done(self, spec: RunSpec, seconds: float | None = None) -> None:
        """Mark ``spec`` as done and index its ``metrics.json``; ``seconds`` defaults to the time since its start."""
        self._record_end(spec, "done", seconds, metrics=_read_metrics(self.run_dir(spec)))

    def record_failure(self, spec: RunSpec, error: str, seconds: float | None = None) -> None:
        """Mark ``spec`` as failed with ``error``; the error is also written to ``FAILED`` in its run directory."""
        run_dir = self.run_dir(spec)
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(error, run_dir / FAILED_FILE)
        self._record_end(spec, "failed", seconds, error=error)

    def _record_end(self, spec: RunSpec, status: str, seconds: float | None, **fields: Any) -> None:
        finished = time.time()
        with self._transaction() as db:
            started = self._started(db, spec.key)
            if seconds is None and started is not None:
                seconds = finished - started
            self._upsert(db, {"key": spec.key, **spec_fields(spec), "status": status, "started": started,
                              "finished": finished, "seconds": seconds, "run_dir": str(self.run_dir(spec)), **fields})

    def rescan(self) -> int:
        """Rebuild the index from the run directories (one transaction); returns the number of runs found.

        DONE → done (metrics from ``metrics.json``), FAILED → failed (its error), otherwise running (started
        or interrupted). Timings already in the index are kept for runs whose status the files confirm;
        otherwise they come from the file times (and ``history.csv``'s epoch seconds).
        """
        runs_root = self.results_dir / RUNS_DIR
        found = sorted(p.parent for p in runs_root.glob(f"*/*/*/fold*/seed*/{SPEC_FILE}")) if runs_root.is_dir() else []
        found += sorted(p.parent for p in runs_root.glob(f"*/*/*/fold*/seed*/{FAILED_FILE}")
                        if not (p.parent / SPEC_FILE).is_file())
        known = self.runs().set_index("key")
        rows = []
        for run_dir in found:
            spec = _spec_from_dir(run_dir, runs_root)
            if spec is None:
                continue
            rows.append(self._row_from_dir(spec, run_dir, known))
        with self._transaction() as db:
            db.execute("DELETE FROM runs")
            for row in rows:
                self._upsert(db, row)
        return len(rows)

    @staticmethod
    def _row_from_dir(spec: RunSpec, run_dir: Path, known: pd.DataFrame) -> dict[str, Any]:
        done, failed = run_dir / DONE_FILE, run_dir / FAILED_FILE
        status = "done" if done.is_file() else "failed" if failed.is_file() else "running"
        row: dict[str, Any] = {"key": spec.key, **spec_fields(spec), "status": status, "run_dir": str(run_dir),
                               "started": _mtime(run_dir / SPEC_FILE) or _mtime(run_dir)}
        if status == "done":
            row["finished"] = _mtime(done)
            row["metrics"] = _read_metrics(run_dir)
            history = run_dir / HISTORY_FILE
            if history.is_file():
                seconds = pd.read_csv(history).get("seconds")
                row["seconds"] = float(seconds.sum()) if seconds is not None else None
        elif status == "failed":
            row["finished"] = _mtime(failed)
            row["error"] = failed.read_text()
        if spec.key in known.index and known.at[spec.key, "status"] == status:
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

        The file's own ``fold`` column (if any) is replaced by the spec's; runs without the file are left out.
        """
        frames = []
        for run in self.runs("done").itertuples(index=False):
            path = Path(run.run_dir) / f"predictions_{task}.csv"
            if not path.is_file():
                continue
            table = pd.read_csv(path, dtype={"image_id": str, "patient_id": str, "center": str})
            table = table.drop(columns=[c for c in ["key", *SPEC_COLUMNS] if c in table.columns])
            spec = pd.DataFrame({"key": run.key, **{c: getattr(run, c) for c in SPEC_COLUMNS}}, index=table.index)
            frames.append(pd.concat([spec, table], axis=1))
        if not frames:
            return pd.DataFrame(columns=["key", *SPEC_COLUMNS])
        return pd.concat(frames, ignore_index=True)
