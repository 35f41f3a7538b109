"""Scoring from prediction files: task entries, the metrics of each scorer, home and per-dataset metrics,
strict metrics.json, runs without tasks.json, and rescoring a results folder without torch."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mdmt.errors import DataError
from mdmt.evaluate import metrics as metrics_lib
from mdmt.evaluate.scoring import (
    rescore,
    run_entries,
    score_run,
    score_table,
    write_metrics,
)
from mdmt.runs import RunSpec
from mdmt.tasks import get_task, make_task

RNG = np.random.default_rng(11)


def prognosis_table(n: int, dataset: str, rng: np.random.Generator = RNG) -> pd.DataFrame:
    y_true = rng.integers(0, 2, n)
    score = np.clip(0.4 * y_true + rng.uniform(0, 0.6, n), 0, 1)
    ids = [f"{dataset}_{i}" for i in range(n)]
    return pd.DataFrame({"image_id": ids, "patient_id": ids, "center": "A", "dataset": dataset, "fold": 0,
                         "y_true": y_true, "y_pred": (score >= 0.5).astype(int), "score": score})


def regions_table(n: int, dataset: str = "brixia", rng: np.random.Generator = RNG) -> pd.DataFrame:
    task = get_task("severity_regions")
    truth = rng.integers(0, 4, (n, 6)).astype(float)
    predicted = truth + rng.normal(0, 0.8, (n, 6))  # some predictions below 0 and above 3
    table = pd.DataFrame({"image_id": [f"b{i}" for i in range(n)], "patient_id": "p", "center": "X",
                          "dataset": dataset, "fold": 0})
    table[task.prediction_columns("y_true")] = truth
    table[task.prediction_columns("y_pred")] = predicted
    return table


def write_run(run_dir: Path, tables: dict[str, pd.DataFrame], entries: dict | None, done: bool = True) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    for task, table in tables.items():
        table.to_csv(run_dir / f"predictions_{task}.csv", index=False)
    if entries is not None:
        (run_dir / "tasks.json").write_text(json.dumps(entries))
    if done:
        (run_dir / "DONE").write_text("done\n")
    return run_dir


@pytest.mark.parametrize(("task", "scorer"), [
    (get_task("prognosis"), "binary"),
    (get_task("severity_global4"), "global4"),
    (get_task("severity_lung4"), "lung4"),
    (get_task("severity_regions"), "regions"),
    (get_task("severity_ordinal"), "regions"),
    (make_task("outcome", "death", "classification", ["no", "yes"]), "binary"),
    (make_task("stage", "stage", "classification", ["I", "II", "III"]), "classification"),
    (make_task("age", "age", "regression"), "regression"),
])
def test_task_entry_derives_the_scorer_from_the_task(task, scorer):
    entry = task.entry(["aiforcovid", "cohort2"], "cohort2")
    assert task.scorer == entry["scorer"] == scorer
    assert entry["kind"] == task.kind and entry["n_classes"] == task.n_classes
    assert entry["datasets"] == ["aiforcovid", "cohort2"] and entry["home"] == "cohort2"
    assert len(entry["groups"]) == task.target_dim and entry["class_names"] == list(task.class_names)
    json.dumps(entry)  # tasks.json material


def test_task_entry_needs_its_home_among_the_datasets():
    with pytest.raises(ValueError, match="brixia"):
        get_task("prognosis").entry(["aiforcovid"], "brixia")


def test_binary_scoring_is_prognosis_metrics_of_the_scores():
    table = prognosis_table(40, "aiforcovid")
    entry = get_task("prognosis").entry(["aiforcovid"], "aiforcovid")
    assert score_table(entry, table) == metrics_lib.prognosis_metrics(table["y_true"], table["score"])


def test_regional_predictions_are_clipped_to_0_3_before_scoring():
    table = regions_table(30)
    task = get_task("severity_regions")
    predicted = table[task.prediction_columns("y_pred")].to_numpy()
    assert predicted.min() < 0 and predicted.max() > 3
    truth = table[task.prediction_columns("y_true")].to_numpy()
    scored = score_table(task.entry(["brixia"], "brixia"), table)
    assert scored == metrics_lib.severity_metrics("regions", truth, np.clip(predicted, 0, 3))
    assert scored["mae"] == pytest.approx(np.abs(np.clip(predicted, 0, 3) - truth).mean())
    assert scored["mae"] < np.abs(predicted - truth).mean()


def test_other_scorers_match_the_metric_functions():
    rng = np.random.default_rng(2)
    lung = get_task("severity_lung4")
    truth, predicted = rng.integers(0, 4, (25, 2)), rng.integers(0, 4, (25, 2))
    table = pd.DataFrame(np.hstack([truth, predicted]), columns=[*lung.prediction_columns("y_true"),
                                                                  *lung.prediction_columns("y_pred")])
    assert score_table(lung.entry(["b"], "b"), table) == metrics_lib.severity_metrics("lung4", truth, predicted)
    stage = make_task("stage", "stage", "classification", ["I", "II", "III"])
    three = pd.DataFrame({"y_true": rng.integers(0, 3, 20), "y_pred": rng.integers(0, 3, 20)})
    assert score_table(stage.entry(["m"], "m"), three) == metrics_lib.classification_metrics(
        three["y_true"], three["y_pred"], 3)
    age = make_task("age", "age", "regression")
    values = pd.DataFrame({"y_true": rng.normal(60, 10, 20), "y_pred": rng.normal(60, 10, 20)})
    assert score_table(age.entry(["m"], "m"), values) == metrics_lib.regression_metrics(
        values["y_true"], values["y_pred"])
    with pytest.raises(DataError, match="score"):
        score_table(get_task("prognosis").entry(["a"], "a"), three)


def test_score_run_gives_home_metrics_and_one_set_per_dataset(tmp_path):
    home, other = prognosis_table(30, "aiforcovid"), prognosis_table(20, "cohort2")
    entries = {"prognosis": get_task("prognosis").entry(["aiforcovid", "cohort2"], "aiforcovid"),
               "severity_regions": get_task("severity_regions").entry(["brixia"], "brixia")}
    severity = regions_table(15)
    run = write_run(tmp_path / "run", {"prognosis": pd.concat([other, home]), "severity_regions": severity}, entries)
    scored = score_run(run)
    assert sorted(scored) == ["prognosis", "prognosis@aiforcovid", "prognosis@cohort2", "severity_regions"]
    assert scored["prognosis"] == metrics_lib.prognosis_metrics(home["y_true"], home["score"])
    assert scored["prognosis@aiforcovid"] == scored["prognosis"]
    assert scored["prognosis@cohort2"] == metrics_lib.prognosis_metrics(other["y_true"], other["score"])
    assert scored["severity_regions"]["n"] == 15


def test_write_metrics_is_strict_json(tmp_path):
    one_class = prognosis_table(10, "aiforcovid").assign(y_true=1)  # ROC AUC undefined → NaN → null
    run = write_run(tmp_path / "run", {"prognosis": one_class},
                    {"prognosis": get_task("prognosis").entry(["aiforcovid"], "aiforcovid")})
    metrics = write_metrics(run)
    assert math.isnan(metrics["prognosis"]["roc_auc"])

    def no_constants(name: str) -> None:
        raise AssertionError(f"{name} in metrics.json")

    on_disk = json.loads((run / "metrics.json").read_text(), parse_constant=no_constants)
    assert on_disk["prognosis"]["roc_auc"] is None
    assert on_disk["prognosis"]["accuracy"] == metrics["prognosis"]["accuracy"]


def test_a_run_without_tasks_json_is_scored_from_the_built_in_task(tmp_path):
    table = prognosis_table(25, "aiforcovid")
    run = write_run(tmp_path / "old", {"prognosis": table}, entries=None)
    assert run_entries(run)["prognosis"]["home"] == "aiforcovid"
    assert score_run(run)["prognosis"] == metrics_lib.prognosis_metrics(table["y_true"], table["score"])
    mixed = write_run(tmp_path / "mixed", {"prognosis": pd.concat([table, prognosis_table(5, "cohort2")])}, None)
    with pytest.raises(DataError, match="home dataset is unknown"):
        score_run(mixed)
    custom = write_run(tmp_path / "custom", {"outcome": table}, None)
    with pytest.raises(DataError, match="'outcome' is not a built-in task"):
        score_run(custom)


def test_rescore_rewrites_every_finished_run_and_names_the_broken_ones(tmp_path):
    entry = {"prognosis": get_task("prognosis").entry(["aiforcovid"], "aiforcovid")}
    specs = [RunSpec("mdmt", "resnet18", "cv5", fold, 0) for fold in range(3)]
    tables = [prognosis_table(20, "aiforcovid", np.random.default_rng(fold)) for fold in range(3)]
    for spec, table in zip(specs, tables):
        write_run(spec.run_dir(tmp_path), {"prognosis": table}, entry)
        (spec.run_dir(tmp_path) / "metrics.json").write_text('{"prognosis": {"accuracy": -1}}')
    running = RunSpec("mdmt", "resnet18", "cv5", 3, 0)
    write_run(running.run_dir(tmp_path), {"prognosis": tables[0]}, entry, done=False)
    assert rescore(tmp_path) == 3
    for spec, table in zip(specs, tables):
        stored = json.loads((spec.run_dir(tmp_path) / "metrics.json").read_text())
        assert stored["prognosis"]["accuracy"] == pytest.approx(
            metrics_lib.prognosis_metrics(table["y_true"], table["score"])["accuracy"])
    assert not (running.run_dir(tmp_path) / "metrics.json").exists()

    (specs[1].run_dir(tmp_path) / "tasks.json").write_text("{oops")
    with pytest.raises(DataError, match=r"1 of 3 runs could not be rescored:\n.*fold1.*tasks.json"):
        rescore(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        rescore(tmp_path / "nowhere")


def test_scoring_imports_no_torch():
    code = "import sys, mdmt.evaluate.scoring; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _overconfident(n: int, rng: np.random.Generator, dataset: str = "aiforcovid") -> pd.DataFrame:
    """Scores whose logit is 3x the true log-odds: a temperature of about 3 calibrates them."""
    logit = rng.normal(0, 1.5, n)
    y_true = (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(int)
    score = 1 / (1 + np.exp(-3 * logit))
    ids = [f"{dataset}_{i}" for i in range(n)]
    return pd.DataFrame({"image_id": ids, "patient_id": ids, "center": "A", "dataset": dataset, "fold": 0,
                         "y_true": y_true, "y_pred": (score >= 0.5).astype(int), "score": score})


def test_calibration_is_fitted_on_the_home_datasets_validation_rows(tmp_path):
    from mdmt.config import CalibrationConfig
    from mdmt.evaluate.calibration import BinaryCalibration, IntervalConformal
    from mdmt.evaluate.scoring import fit_calibration

    rng = np.random.default_rng(5)
    entries = {"prognosis": get_task("prognosis").entry(["aiforcovid", "cohort"], "aiforcovid"),
               "severity_regions": get_task("severity_regions").entry(["brixia"], "brixia")}
    run_dir = write_run(tmp_path / "run", {"prognosis": _overconfident(400, rng),
                                           "severity_regions": regions_table(300, rng=rng)}, entries)
    # the other dataset's validation rows are inverted: calibrating on them would turn the temperature negative
    other = _overconfident(400, rng, "cohort").assign(y_true=lambda t: 1 - t["y_true"])
    pd.concat([_overconfident(2000, rng), other]).to_csv(run_dir / "val_predictions_prognosis.csv", index=False)
    regions_table(400, rng=rng).to_csv(run_dir / "val_predictions_severity_regions.csv", index=False)
    fitted = fit_calibration(run_dir, CalibrationConfig(alpha=0.2))
    binary = BinaryCalibration.from_dict(fitted["prognosis"]["binary"])
    assert 2.6 < binary.temperature < 3.4 and 0 < binary.threshold < 1
    assert fitted["prognosis"]["sets"]["alpha"] == 0.2 and fitted["prognosis"]["sets"]["n_calibration"] == 2000
    total = IntervalConformal.from_dict(fitted["severity_regions"]["global"])
    assert (total.low, total.high) == (0.0, 18.0) and len(total.half_width) == 1
    assert len(fitted["severity_regions"]["regions"]["half_width"]) == 6
    # the intervals cover held-out rows of the same distribution at about 1 - alpha
    test = regions_table(4000, rng=np.random.default_rng(6))
    truth, predicted = test.filter(like="y_true").to_numpy(), np.clip(test.filter(like="y_pred").to_numpy(), 0, 3)
    lower, upper = total.predict_interval(predicted.sum(1))
    assert 0.77 <= np.mean((lower <= truth.sum(1)) & (truth.sum(1) <= upper)) <= 0.83


def test_write_metrics_writes_calibration_only_with_validation_predictions(tmp_path):
    entries = {"prognosis": get_task("prognosis").entry(["aiforcovid"], "aiforcovid")}
    rng = np.random.default_rng(7)
    plain = write_run(tmp_path / "plain", {"prognosis": _overconfident(60, rng)}, entries)
    write_metrics(plain)
    assert not (plain / "calibration.json").exists()
    one_class = write_run(tmp_path / "one", {"prognosis": _overconfident(60, rng)}, entries)
    _overconfident(50, rng).assign(y_true=0).to_csv(one_class / "val_predictions_prognosis.csv", index=False)
    write_metrics(one_class)
    saved = json.loads((one_class / "calibration.json").read_text())
    assert "both classes" in saved["prognosis"]["error"] and "val_predictions_prognosis.csv" in saved["prognosis"]["error"]
