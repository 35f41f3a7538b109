"""The results store: SQLite index written in transactions, rebuilt from the run folders; unreadable runs,
read-only folders and damaged indexes.

Also home of ``write_fake_run``: a run folder per the run contract, used by test_grid and test_report.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mdmt.evaluate.scoring import task_entry
from mdmt import store as store_module
from mdmt.store import FAILED_FILE, INDEX_FILE, ResultsStore
from mdmt.runs import RunSpec
from mdmt.tasks import get_task

PROGNOSIS_STRATEGIES = ("stl_prognosis", "ft", "mdmt")
BONUS = {"mdmt": 0.06, "mdmt3": 0.08, "mdmt_permuted": 0.01}
"""How much better than STL a fake strategy scores (MDMT a little better, as in the paper)."""


def fake_metric_values(spec: RunSpec) -> dict[str, float]:
    """Deterministic test-set metrics of a fake prognosis run."""
    rng = np.random.default_rng(zlib.crc32(spec.key.encode()))
    bonus = BONUS.get(spec.strategy, 0.0)
    return {name: float(rng.uniform(0.55, 0.7) + bonus) for name in ("accuracy", "f1_weighted", "gmean", "roc_auc")}


def write_fake_run(results_dir: Path, spec: RunSpec, done: bool = True, n_images: int = 12, epochs: int = 3) -> Path:
    """A run folder as training writes it (spec.json, tasks.json, history.csv, predictions, metrics.json, DONE);
    ``stl_severity`` runs hold severity_global4 metrics only, every other strategy prognosis."""
    rng = np.random.default_rng(zlib.crc32(spec.key.encode()) + 1)
    run_dir = spec.run_dir(results_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.json").write_text(json.dumps(spec.__dict__))
    task = "severity_global4" if spec.strategy == "stl_severity" else "prognosis"
    home = "brixia" if task == "severity_global4" else "aiforcovid"
    (run_dir / "tasks.json").write_text(json.dumps({task: task_entry(get_task(task), [home], home)}))
    val_loss = 1.0 / (1 + np.arange(epochs)) + rng.uniform(0, 0.1, epochs)
    pd.DataFrame({
        "epoch": np.arange(epochs), "lr": 1e-3, "seconds": 2.0, "train_loss": val_loss * 0.9, "val_loss": val_loss,
        f"train_{task}_loss": val_loss * 0.9, f"val_{task}_loss": val_loss,
        "selected": (np.arange(epochs) == epochs - 1).astype(int),
    }).to_csv(run_dir / "history.csv", index=False)
    if not done:
        return run_dir
    if task == "prognosis":
        y_true = rng.integers(0, 2, n_images)
        score = np.clip(0.5 * y_true + rng.uniform(0, 0.6, n_images), 0, 1)
        ids = [f"P_{spec.fold}_{i}" for i in range(n_images)]
        pd.DataFrame({
            "image_id": ids, "patient_id": ids, "center": "A", "dataset": "aiforcovid", "fold": spec.fold,
            "y_true": y_true, "score": score, "y_pred": (score >= 0.5).astype(int),
        }).to_csv(run_dir / "predictions_prognosis.csv", index=False)
        metrics = {"prognosis": fake_metric_values(spec)}
    else:
        metrics = {"severity_global4": {"accuracy": float(rng.uniform(0.4, 0.6))}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "DONE").write_text("done\n")
    return run_dir


SPECS = [RunSpec(strategy, "resnet18", "cv5", fold, 0) for strategy in ("stl_prognosis", "mdmt") for fold in (0, 1)]


def _store_with_runs(tmp_path: Path) -> ResultsStore:
    store = ResultsStore(tmp_path)
    for spec in SPECS:
        store.record_start(spec)
        write_fake_run(tmp_path, spec)
        store.record_done(spec, seconds=5.0)
    return store


def test_done_runs_are_indexed_with_their_metrics(tmp_path):
    store = _store_with_runs(tmp_path)
    runs = store.runs()
    assert len(runs) == len(SPECS)
    assert set(runs["status"]) == {"done"}
    assert sorted(runs["key"]) == sorted(s.key for s in SPECS)
    assert (runs["seconds"] == 5.0).all()
    metrics = store.metrics_frame("prognosis")
    assert len(metrics) == len(SPECS) * 4
    row = metrics[(metrics.key == SPECS[1].key) & (metrics.metric == "gmean")]
    assert row["value"].item() == pytest.approx(fake_metric_values(SPECS[1])["gmean"])
    assert row[["strategy", "fold", "seed"]].iloc[0].tolist() == ["stl_prognosis", 1, 0]


def test_predictions_carry_the_spec_columns(tmp_path):
    store = _store_with_runs(tmp_path)
    predictions = store.predictions("prognosis")
    assert len(predictions) == len(SPECS) * 12
    expected = {"strategy", "backbone", "protocol", "fold", "seed", "y_true", "score", "image_id"}
    assert expected <= set(predictions.columns)
    one = predictions[predictions.key == SPECS[3].key]
    on_disk = pd.read_csv(SPECS[3].run_dir(tmp_path) / "predictions_prognosis.csv")
    np.testing.assert_allclose(one["score"].to_numpy(), on_disk["score"].to_numpy())
    assert (one["strategy"] == "mdmt").all() and (one["fold"] == 1).all()
    assert store.predictions("severity_global4").empty


def test_failure_is_recorded_and_cleared_by_a_new_start(tmp_path):
    store = ResultsStore(tmp_path)
    spec = SPECS[0]
    store.record_start(spec)
    store.record_failure(spec, "Traceback ...\nValueError: boom")
    failed = store.runs("failed")
    assert failed["key"].tolist() == [spec.key]
    assert failed["error"].item().endswith("ValueError: boom")
    assert (spec.run_dir(tmp_path) / FAILED_FILE).read_text().endswith("boom")
    store.record_start(spec)
    assert not (spec.run_dir(tmp_path) / FAILED_FILE).exists()
    assert store.runs("running")["key"].tolist() == [spec.key]
    assert store.runs("failed").empty


def test_rescan_rebuilds_the_index_from_the_run_dirs(tmp_path):
    store = _store_with_runs(tmp_path)
    unfinished = RunSpec("ft", "resnet18", "loco", 2, 0)
    write_fake_run(tmp_path, unfinished, done=False)
    crashed = RunSpec("ft", "resnet18", "loco", 3, 0)
    store.record_start(crashed)
    store.record_failure(crashed, "RuntimeError: out of memory")
    before = store.metrics_frame()

    (tmp_path / INDEX_FILE).unlink()
    rebuilt = ResultsStore(tmp_path)
    assert rebuilt.runs().empty
    assert rebuilt.rescan() == len(SPECS) + 2
    status = rebuilt.runs().set_index("key")["status"]
    assert status[unfinished.key] == "running"
    assert status[crashed.key] == "failed"
    assert (status[[s.key for s in SPECS]] == "done").all()
    # history.csv holds 3 epochs of 2 s: the rebuilt index's run time of a finished run
    assert rebuilt.runs("done")["seconds"].tolist() == [6.0] * len(SPECS)
    pd.testing.assert_frame_equal(rebuilt.metrics_frame().sort_values(["key", "metric"]).reset_index(drop=True),
                                  before.sort_values(["key", "metric"]).reset_index(drop=True))


def test_rescan_keeps_the_grids_timings_and_drops_vanished_runs(tmp_path):
    store = _store_with_runs(tmp_path)
    ghost = RunSpec("mdmt", "resnet18", "loco", 5, 0)
    store.record_start(ghost)  # started, but its folder was never created
    store.rescan()
    runs = store.runs()
    assert ghost.key not in set(runs["key"])
    assert runs["seconds"].tolist() == [5.0] * len(SPECS)


def test_a_damaged_index_is_replaced_and_refilled(tmp_path):
    _store_with_runs(tmp_path)
    (tmp_path / INDEX_FILE).write_bytes(b"this is not an sqlite file" * 100)
    store = ResultsStore(tmp_path)
    assert store.rescan() == len(SPECS)
    assert len(store.runs("done")) == len(SPECS)
    assert list(tmp_path.glob(f"{INDEX_FILE}.damaged-*"))


def test_unknown_status_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="finished"):
        ResultsStore(tmp_path).runs("finished")


@pytest.mark.parametrize(("file", "content", "reason"), [
    ("metrics.json", "{not json", "metrics.json"),
    ("metrics.json", "[1, 2]", "task → {metric: value}"),
    ("predictions_prognosis.csv", "garbage\x00\x01 \n", "predictions_prognosis.csv: no image_id"),
    ("predictions_prognosis.csv", "image_id,y_true,score\nP_1,SEVERE,0.3\n", "not numbers"),
    ("predictions_prognosis.csv", "", "predictions_prognosis.csv"),
])
def test_a_corrupt_file_lists_the_run_as_unreadable(tmp_path, file, content, reason):
    store = _store_with_runs(tmp_path)
    broken = SPECS[2]
    (broken.run_dir(tmp_path) / file).write_text(content)
    assert store.rescan() == len(SPECS)
    runs = store.runs().set_index("key")
    assert runs.at[broken.key, "status"] == "unreadable"
    assert reason in runs.at[broken.key, "error"]
    assert (runs.drop(index=broken.key)["status"] == "done").all()
    assert broken.key not in set(store.metrics_frame()["key"]) and broken.key not in set(store.predictions()["key"])
    assert len(store.metrics_frame()) == (len(SPECS) - 1) * 4
    store.record_done(broken)  # the grid's end-of-run record reads the same way
    assert store.runs("unreadable")["key"].tolist() == [broken.key]


def test_a_prediction_file_spoiled_after_the_scan_is_skipped(tmp_path):
    store = _store_with_runs(tmp_path)
    (SPECS[0].run_dir(tmp_path) / "predictions_prognosis.csv").write_bytes(b"\xff\xfe\x00garbage")
    assert set(store.predictions()["key"]) == {s.key for s in SPECS[1:]}


def _index_bytes(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


def make_read_only(folder: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Make a folder read-only (and, as root, who may write anyway, open the index read-only as well); returns
    the paths to make writable again."""
    paths = [folder, *folder.rglob("*")]
    for path in paths:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    if os.geteuid() == 0:
        monkeypatch.setattr(store_module, "_open",
                            lambda path: sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True))
    return paths


def make_writable(paths: list[Path]) -> None:
    for path in paths:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)`` makes the folder read-only until the test ends."""
    changed: list[Path] = []
    yield lambda folder: changed.extend(make_read_only(folder, monkeypatch))
    make_writable(changed)


def test_a_read_only_results_folder_is_indexed_in_memory(tmp_path, read_only):
    _store_with_runs(tmp_path)
    crashed = RunSpec("ft", "resnet18", "loco", 3, 0)
    ResultsStore(tmp_path).record_failure(crashed, "RuntimeError: out of memory")
    before = _index_bytes(tmp_path / INDEX_FILE)
    read_only(tmp_path)
    store = ResultsStore(tmp_path)
    assert store.in_memory
    assert len(store.runs()) == len(SPECS) + 1  # the copy of the file's index
    assert store.rescan() == len(SPECS) + 1
    assert store.runs("failed")["key"].tolist() == [crashed.key]
    assert len(store.metrics_frame()) == len(SPECS) * 4
    assert _index_bytes(tmp_path / INDEX_FILE) == before
    assert not list(tmp_path.glob(f"{INDEX_FILE}.damaged-*"))


def test_a_read_only_folder_without_an_index(tmp_path, read_only):
    for spec in SPECS:
        write_fake_run(tmp_path, spec)
    read_only(tmp_path)
    store = ResultsStore(tmp_path)
    assert store.in_memory and store.rescan() == len(SPECS)
    assert not (tmp_path / INDEX_FILE).exists()


def test_a_locked_index_is_an_error_not_damage(tmp_path, monkeypatch):
    _store_with_runs(tmp_path)
    monkeypatch.setattr(store_module, "_open", lambda path: sqlite3.connect(path, timeout=0.05))
    holder = sqlite3.connect(tmp_path / INDEX_FILE)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            ResultsStore(tmp_path)
    finally:
        holder.rollback()
        holder.close()
    assert not list(tmp_path.glob(f"{INDEX_FILE}.damaged-*"))
    assert len(ResultsStore(tmp_path).runs()) == len(SPECS)


def test_an_index_of_an_older_schema_is_rebuilt(tmp_path):
    for spec in SPECS:
        write_fake_run(tmp_path, spec)
    with sqlite3.connect(tmp_path / INDEX_FILE) as db:  # the previous layout: no 'unreadable' status, version 0
        db.execute(store_module._SCHEMA.replace(", 'unreadable'", ""))
    (SPECS[0].run_dir(tmp_path) / "metrics.json").write_text("{broken")
    store = ResultsStore(tmp_path)
    assert store.rescan() == len(SPECS)
    assert store.runs("unreadable")["key"].tolist() == [SPECS[0].key]
    assert not list(tmp_path.glob(f"{INDEX_FILE}.damaged-*"))


def test_the_store_imports_only_the_run_contract():
    code = ("import sys, mdmt.store; "
            "mine = sorted(m for m in sys.modules if m.startswith('mdmt')); print(mine); "
            "assert 'torch' not in sys.modules; "
            "assert set(mine) <= {'mdmt', 'mdmt.runs', 'mdmt.store'}, mine")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
