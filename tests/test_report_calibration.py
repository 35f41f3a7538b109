"""The report's calibration and conformal sections on fabricated run folders: each run's own calibration.json
applied to its own test rows, pooled per strategy and protocol, checked against hand computations; runs without
one listed and left out; nothing written into the run folders."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.special import expit
from sklearn.metrics import balanced_accuracy_score
from test_report import write_severity_run

from mdmt.evaluate.calibration import (
    BinaryCalibration,
    ece_floor,
    expected_calibration_error,
)
from mdmt.evaluate.report import build_report, collect
from mdmt.evaluate.scoring import write_metrics
from mdmt.runs import CALIBRATION_FILE, RunSpec
from mdmt.tasks import get_task

STRATEGIES = ("stl_prognosis", "mdmt")
FOLDS = {"cv5": 3, "loco": 2}


def _prognosis_rows(rng: np.random.Generator, n: int, fold: int, part: str) -> pd.DataFrame:
    """Overconfident scores: P(SEVERE) = sigmoid(2.5 z) while the label follows sigmoid(z)."""
    z = rng.normal(0.3, 1.5, n)
    ids = [f"{part}_{fold}_{i}" for i in range(n)]
    score = expit(2.5 * z)
    return pd.DataFrame({"image_id": ids, "patient_id": ids, "center": "A", "dataset": "aiforcovid", "fold": fold,
                         "y_true": (rng.uniform(size=n) < expit(z)).astype(int), "y_pred": (score >= 0.5).astype(int),
                         "score": score})


def write_calibrated_run(results: Path, spec: RunSpec, n_test: int = 40, n_val: int = 30) -> Path:
    """A finished prognosis run with test and validation predictions, scored (and calibrated) by write_metrics."""
    rng = np.random.default_rng(zlib.crc32(spec.key.encode()))
    run_dir = spec.run_dir(results)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.json").write_text(spec.to_json())
    (run_dir / "tasks.json").write_text(json.dumps({"prognosis": get_task("prognosis").entry(["aiforcovid"],
                                                                                              "aiforcovid")}))
    _prognosis_rows(rng, n_test, spec.fold, "test").to_csv(run_dir / "predictions_prognosis.csv", index=False)
    _prognosis_rows(rng, n_val, spec.fold, "val").to_csv(run_dir / "val_predictions_prognosis.csv", index=False)
    pd.DataFrame({"epoch": [0, 1], "seconds": 1.0, "val_prognosis_loss": [1.0, 0.8]}).to_csv(
        run_dir / "history.csv", index=False)
    write_metrics(run_dir)
    (run_dir / "DONE").write_text("done\n")
    return run_dir


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, Path, RunSpec]:
    results = tmp_path_factory.mktemp("results")
    for strategy in STRATEGIES:
        for protocol, folds in FOLDS.items():
            for fold in range(folds):
                write_calibrated_run(results, RunSpec(strategy, "resnet18", protocol, fold, 0))
    older = RunSpec("mdmt", "resnet18", "cv5", 1, 0)
    (older.run_dir(results) / CALIBRATION_FILE).unlink()
    before = {p: p.stat().st_mtime_ns for p in (results / "runs").rglob("*")}
    page = build_report(results, results.parent / f"{results.name}-report")
    assert {p: p.stat().st_mtime_ns for p in (results / "runs").rglob("*")} == before  # run folders untouched
    return results, page, older


def _pooled(results: Path, strategy: str, protocol: str, skip: RunSpec | None = None) -> pd.DataFrame:
    """The test rows of a strategy's calibrated runs with each run's own calibration applied."""
    parts = []
    for fold in range(FOLDS[protocol]):
        spec = RunSpec(strategy, "resnet18", protocol, fold, 0)
        if spec == skip:
            continue
        rows = pd.read_csv(spec.run_dir(results) / "predictions_prognosis.csv")
        fitted = json.loads((spec.run_dir(results) / CALIBRATION_FILE).read_text())["prognosis"]
        binary = BinaryCalibration.from_dict(fitted["binary"])
        quantile = fitted["sets"]["quantile"]
        calibrated = binary.apply(rows["score"])
        truth_probability = np.where(rows["y_true"] == 1, calibrated, 1 - calibrated)
        parts.append(rows.assign(calibrated=calibrated, at_threshold=(calibrated >= binary.threshold).astype(int),
                                 covered=1 - truth_probability <= quantile,
                                 size=(calibrated <= quantile).astype(int) + (1 - calibrated <= quantile)))
    return pd.concat(parts, ignore_index=True)


def test_ece_and_balanced_accuracy_are_those_of_the_pooled_calibrated_rows(study):
    results, page, older = study
    table = pd.read_csv(page.parent / "calibration.csv").set_index(["strategy", "protocol"])
    assert list(table.index) == [(s, p) for s in STRATEGIES for p in FOLDS]
    for strategy in STRATEGIES:
        for protocol in FOLDS:
            rows = _pooled(results, strategy, protocol, older)
            row = table.loc[(strategy, protocol)]
            runs = FOLDS[protocol] - ((strategy, protocol) == (older.strategy, older.protocol))
            assert row["n"] == len(rows) and row["runs"] == runs
            assert row["ece_raw"] == pytest.approx(expected_calibration_error(rows["y_true"], rows["score"]))
            assert row["ece_calibrated"] == pytest.approx(expected_calibration_error(rows["y_true"],
                                                                                     rows["calibrated"]))
            assert row["ece_floor"] == pytest.approx(ece_floor(rows["calibrated"]))
            assert row["balanced_accuracy_at_0.5"] == pytest.approx(
                balanced_accuracy_score(rows["y_true"], rows["score"] >= 0.5))
            assert row["balanced_accuracy_at_threshold"] == pytest.approx(
                balanced_accuracy_score(rows["y_true"], rows["at_threshold"]))
            assert row["sensitivity_at_threshold"] == pytest.approx(rows.loc[rows["y_true"] == 1, "at_threshold"]
                                                                    .mean())
    # the scores are overconfident by a factor 2.5: each run's temperature, fitted on 30 validation rows, undoes
    # most of it on the 200 pooled CV test rows
    assert (table["ece_calibrated"] < table["ece_raw"]).all()
    # and the raw scores' error is more than labels drawn at random from the calibrated probabilities would show
    assert (table["ece_raw"] > table["ece_floor"]).all()


def test_conformal_sets_coverage_and_size_are_those_of_the_pooled_rows(study):
    results, page, older = study
    table = pd.read_csv(page.parent / "conformal.csv").set_index(["strategy", "protocol"])
    for strategy in STRATEGIES:
        for protocol in FOLDS:
            rows = _pooled(results, strategy, protocol, older)
            row = table.loc[(strategy, protocol)]
            assert row["alpha"] == 0.1
            assert row["coverage"] == pytest.approx(rows["covered"].mean())
            assert row["mean_size"] == pytest.approx(rows["size"].mean())
            assert row["empty"] == pytest.approx((rows["size"] == 0).mean())


def test_a_run_without_calibration_json_is_listed_and_left_out(study):
    results, page, older = study
    markdown = (page.parent / "report.md").read_text()
    assert f"| {older.key} | not calibrated (older run) |" in markdown
    assert markdown.count("not calibrated (older run)") == 1
    assert "reliability diagrams" in page.read_text()


def test_a_study_without_calibration_lists_every_run_and_writes_no_table(tmp_path):
    results = tmp_path / "results"
    specs = [RunSpec("mdmt", "resnet18", "cv5", fold, 0) for fold in range(2)]
    for spec in specs:
        (write_calibrated_run(results, spec) / CALIBRATION_FILE).unlink()
    page = build_report(results, tmp_path / "report")
    assert not (page.parent / "calibration.csv").exists() and not (page.parent / "conformal.csv").exists()
    markdown = page.with_suffix(".md").read_text()
    assert all(f"| {spec.key} | not calibrated (older run) |" in markdown for spec in specs)


def test_regional_brixia_intervals_cover_as_the_pooled_rows_say(tmp_path):
    results = tmp_path / "results"
    task = "severity_regions"
    columns = {base: get_task(task).prediction_columns(base) for base in ("y_true", "y_pred")}
    for fold in range(3):
        run_dir = write_severity_run(results, RunSpec("mdmt", "resnet18", "cv5", fold, 0), task, n_images=20)
        test = pd.read_csv(run_dir / f"predictions_{task}.csv", dtype={"image_id": str})
        rng = np.random.default_rng(fold)
        val = test.assign(**{c: np.clip(test[c] + rng.normal(0, 0.3, len(test)), -1, 4) for c in columns["y_pred"]})
        val.to_csv(run_dir / f"val_predictions_{task}.csv", index=False)
        write_metrics(run_dir)
    found = collect(results, task).calibration
    assert found.calibration.empty and found.left_out.empty
    table = found.conformal.set_index("interval")
    truth, low, high = {"global": [], "regions": []}, {"global": [], "regions": []}, {"global": [], "regions": []}
    for fold in range(3):
        run_dir = RunSpec("mdmt", "resnet18", "cv5", fold, 0).run_dir(results)
        rows = pd.read_csv(run_dir / f"predictions_{task}.csv")
        fitted = json.loads((run_dir / CALIBRATION_FILE).read_text())[task]
        predicted = np.clip(rows[columns["y_pred"]].to_numpy(), 0, 3)
        for part, true, pred, bound in (("global", rows[columns["y_true"]].sum(axis=1).to_numpy(),
                                         predicted.sum(axis=1), 18), ("regions", rows[columns["y_true"]].to_numpy(),
                                                                      predicted, 3)):
            width = np.asarray(fitted[part]["half_width"])
            truth[part].append(true)
            low[part].append(np.clip(pred - width, 0, bound))
            high[part].append(np.clip(pred + width, 0, bound))
    for part in ("global", "regions"):
        true, lower, upper = (np.concatenate(v[part]) for v in (truth, low, high))
        assert table.loc[part, "coverage"] == pytest.approx(np.mean((lower <= true) & (true <= upper)))
        assert table.loc[part, "mean_width"] == pytest.approx(np.mean(upper - lower))
        assert table.loc[part, "n"] == 60 and table.loc[part, "runs"] == 3
