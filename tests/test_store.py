"""The results store: the run folders read into a DataFrame at each call; unreadable runs, read-only folders,
files of other programs left alone.

Also home of ``write_fake_run``: a run folder per the run contract, used by test_grid and test_report.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mdmt.runs import RunSpec
from mdmt.store import FAILED_FILE, ResultsStore
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
    (run_dir / "tasks.json").write_text(json.dumps({task: get_task(task).entry([home], home)}))
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
    return store


def test_done_runs_are_read_with_their_metrics(tmp_path):
    store = _store_with_runs(tmp_path)
    runs = store.runs()
    assert len(runs) == len(SPECS)
    assert set(runs["status"]) == {"done"}
    assert sorted(runs["key"]) == sorted(s.key for s in SPECS)
    assert (runs["seconds"] == 6.0).all()  # history.csv: 3 epochs of 2 s
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


def test_every_store_reads_the_same_runs_from_the_run_dirs(tmp_path):
    store = _store_with_runs(tmp_path)
    unfinished = RunSpec("ft", "resnet18", "loco", 2, 0)
    write_fake_run(tmp_path, unfinished, done=False)
    crashed = RunSpec("ft", "resnet18", "loco", 3, 0)
    store.record_start(crashed)
    store.record_failure(crashed, "RuntimeError: out of memory")
    started = RunSpec("mdmt", "resnet18", "loco", 5, 0)
    store.record_start(started)  # its folder exists, nothing in it yet

    other = ResultsStore(tmp_path)
    assert len(other.runs()) == len(SPECS) + 3
    status = other.runs().set_index("key")["status"]
    assert status[unfinished.key] == "running" and status[started.key] == "running"
    assert status[crashed.key] == "failed"
    assert (status[[s.key for s in SPECS]] == "done").all()
    assert other.runs("done")["seconds"].tolist() == [6.0] * len(SPECS)
    pd.testing.assert_frame_equal(other.metrics_frame(), store.metrics_frame())
    assert other.runs()[["fold", "seed"]].dtypes.tolist() == [np.int64, np.int64]


def test_a_read_follows_the_run_dirs_as_they_change(tmp_path):
    store = _store_with_runs(tmp_path)
    gone = SPECS[0].run_dir(tmp_path)
    for path in gone.iterdir():
        path.unlink()
    gone.rmdir()
    assert set(store.runs()["key"]) == {s.key for s in SPECS[1:]}
    (SPECS[1].run_dir(tmp_path) / "DONE").unlink()  # as if it were training again
    assert store.runs("running")["key"].tolist() == [SPECS[1].key]
    assert len(store.metrics_frame()) == (len(SPECS) - 2) * 4


def test_files_of_other_programs_are_left_alone(tmp_path):
    _store_with_runs(tmp_path)
    leftovers = {tmp_path / "index.sqlite": b"this is not an sqlite file" * 100,  # an older mdmt's index
                 tmp_path / "runs" / "notes.txt": b"x", tmp_path / "runs" / "mdmt" / "resnet18" / "cv5" / "x": b"y"}
    for path, data in leftovers.items():
        path.write_bytes(data)
    store = ResultsStore(tmp_path)
    assert len(store.runs("done")) == len(SPECS)
    assert {path: path.read_bytes() for path in leftovers} == leftovers


def test_unknown_status_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="finished"):
        ResultsStore(tmp_path).runs("finished")


PREDICTIONS_HEADER = "image_id,patient_id,center,dataset,fold,y_true,y_pred,score\n"


@pytest.mark.parametrize(("file", "content", "reason"), [
    ("metrics.json", "{not json", "metrics.json"),
    ("metrics.json", "[1, 2]", "task → {metric: value}"),
    ("predictions_prognosis.csv", "garbage\x00\x01 \n", "predictions_prognosis.csv: no image_id"),
    ("predictions_prognosis.csv", "image_id,y_true,score\nP_1,SEVERE,0.3\n", "not numbers"),
    ("predictions_prognosis.csv", "", "predictions_prognosis.csv"),
    ("predictions_prognosis.csv", PREDICTIONS_HEADER + "P_1,P_1,A,aiforcovid,0,1,1,0.71\nP_2,P_2,A,aiforcovid,0,0,0,0.3",
     "predictions_prognosis.csv: the last row has no line break: the file was cut short"),  # 0.3: read as a number
    ("predictions_prognosis.csv", PREDICTIONS_HEADER + "P_1,P_1,A,aiforcovid,0,1,1,0.71\nP_2,P_2,A,aiforcovid,0,0\n",
     "predictions_prognosis.csv: 1 row(s) lack a value in ['y_pred', 'score'], the first on line 3 (image 'P_2')"),
])
def test_a_corrupt_file_lists_the_run_as_unreadable(tmp_path, file, content, reason):
    store = _store_with_runs(tmp_path)
    broken = SPECS[2]
    (broken.run_dir(tmp_path) / file).write_text(content)
    runs = store.runs().set_index("key")
    assert len(runs) == len(SPECS)
    assert runs.at[broken.key, "status"] == "unreadable"
    assert reason in runs.at[broken.key, "error"]
    assert (runs.drop(index=broken.key)["status"] == "done").all()
    assert broken.key not in set(store.metrics_frame()["key"]) and broken.key not in set(store.predictions()["key"])
    assert len(store.metrics_frame()) == (len(SPECS) - 1) * 4
    assert store.runs("unreadable")["key"].tolist() == [broken.key]


def test_a_finished_run_without_metrics_is_unreadable_not_a_crash(tmp_path):
    store = _store_with_runs(tmp_path)
    (SPECS[1].run_dir(tmp_path) / "metrics.json").unlink()
    runs = store.runs().set_index("key")
    assert len(runs) == len(SPECS)
    assert runs.at[SPECS[1].key, "status"] == "unreadable"
    assert runs.at[SPECS[1].key, "error"] == "unreadable: metrics.json: missing (the run wrote DONE without it)"
    assert set(store.metrics_frame()["key"]) == {s.key for s in SPECS} - {SPECS[1].key}


def test_a_prediction_file_spoiled_after_the_scan_is_skipped(tmp_path):
    store = _store_with_runs(tmp_path)
    runs = store.runs()
    (SPECS[0].run_dir(tmp_path) / "predictions_prognosis.csv").write_bytes(b"\xff\xfe\x00garbage")
    assert set(store.predictions("prognosis", runs)["key"]) == {s.key for s in SPECS[1:]}


def folder_state(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file and folder under ``folder``: its bytes (b"" for a folder) and modification time in ns."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else b"", p.stat().st_mtime_ns)
            for p in [folder, *folder.rglob("*")]}


def make_read_only(folder: Path) -> list[Path]:
    """Make a folder read-only (root may write anyway: tests compare ``folder_state`` too); returns the paths to
    make writable again."""
    paths = [folder, *folder.rglob("*")]
    for path in paths:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    return paths


def make_writable(paths: list[Path]) -> None:
    for path in paths:
        path.chmod(path.stat().st_mode | stat.S_IWUSR)


def test_reading_a_read_only_results_folder_changes_nothing(tmp_path):
    _store_with_runs(tmp_path)
    crashed = RunSpec("ft", "resnet18", "loco", 3, 0)
    ResultsStore(tmp_path).record_failure(crashed, "RuntimeError: out of memory")
    (SPECS[0].run_dir(tmp_path) / "metrics.json").write_text("{broken")
    before = folder_state(tmp_path)
    changed = make_read_only(tmp_path)
    try:
        store = ResultsStore(tmp_path)
        assert len(store.runs()) == len(SPECS) + 1
        assert store.runs("failed")["key"].tolist() == [crashed.key]
        assert store.runs("unreadable")["key"].tolist() == [SPECS[0].key]
        assert len(store.metrics_frame()) == (len(SPECS) - 1) * 4
        assert len(store.predictions()) == (len(SPECS) - 1) * 12
    finally:
        make_writable(changed)
    assert folder_state(tmp_path) == before


def test_the_store_imports_only_the_run_contract():
    code = ("import sys, mdmt.store; "
            "mine = sorted(m for m in sys.modules if m.startswith('mdmt')); print(mine); "
            "assert 'torch' not in sys.modules; "
            "assert set(mine) <= {'mdmt', 'mdmt.errors', 'mdmt.runs', 'mdmt.store'}, mine")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
