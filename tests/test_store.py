"""The results store: SQLite index written in transactions, rebuilt from the run directories.

Also home of ``write_fake_run``: a run directory per the run contract, used by test_grid and test_report.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mdmt.experiments.store import FAILED_FILE, INDEX_FILE, ResultsStore
from mdmt.train.run import RunSpec

PROGNOSIS_STRATEGIES = ("stl_prognosis", "ft", "mdmt")


def fake_metric_values(spec: RunSpec) -> dict[str, float]:
    """Deterministic test-set metrics of a fake prognosis run (MDMT a little better, as in the paper)."""
    rng = np.random.default_rng(zlib.crc32(spec.key.encode()))
    bonus = 0.06 if spec.strategy == "mdmt" else 0.0
    return {name: float(rng.uniform(0.55, 0.7) + bonus) for name in ("accuracy", "f1_weighted", "gmean", "roc_auc")}


def write_fake_run(results_dir: Path, spec: RunSpec, done: bool = True, n_images: int = 12, epochs: int = 3) -> Path:
    """A run directory as the engine writes it (spec.json, history.csv, predictions, metrics.json, DONE)."""
    rng = np.random.default_rng(zlib.crc32(spec.key.encode()) + 1)
    run_dir = spec.run_dir(results_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.json").write_text(json.dumps(spec.__dict__))
    task = "prognosis" if spec.strategy in PROGNOSIS_STRATEGIES else "severity_global4"
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
