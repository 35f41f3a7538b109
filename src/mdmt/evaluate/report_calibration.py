"""The report's calibration and conformal sections: each run's ``calibration.json`` (fitted on its validation fold
by ``mdmt.evaluate.scoring.fit_calibration``) applied to its own test rows, then pooled per strategy and protocol
over backbones, folds and seeds. Nothing is fitted again and nothing is written into the run folders.

- ``calibration_table`` (a binary task, ``calibration.csv``): ECE (15 bins) of the raw P(class 1) and of the
  calibrated one, and the ECE a perfectly calibrated model would show on the same rows (its noise floor);
  sensitivity, specificity and balanced accuracy at 0.5 (the raw score: the model's own decision) and at each run's
  threshold (on its calibrated probability); the mean of the runs' thresholds.
- ``conformal_table`` (``conformal.csv``): at each run's ``alpha``, the empirical coverage of the conformal sets with
  their mean size and the fractions empty and with both classes (a binary task), or the coverage and mean width of
  the intervals of the global Brixia score and of the regions (a regional Brixia task).

Runs without ``calibration.json`` (trained before mdmt fitted one) or whose task was not calibrated are listed with
the reason (``left_out``) and kept out of both tables.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdmt.evaluate import calibration as calib
from mdmt.evaluate.report_tables import PROTOCOL_LABELS, order, strategy_order
from mdmt.runs import CALIBRATION_FILE
from mdmt.tasks import REGION_SCORE_RANGE, prediction_column

CALIBRATED_SCORERS = ("binary", "regions")
"""The scorers whose heads ``calibration.json`` calibrates (a binary head; a regional Brixia head)."""
NOT_CALIBRATED = "not calibrated (older run)"
GROUP = ["strategy", "protocol"]
INTERVAL_PARTS = ("global", "regions")


@dataclass
class CalibrationData:
    """The test rows of the calibrated runs with their calibrated columns, both tables and the runs left out."""

    rows: pd.DataFrame
    calibration: pd.DataFrame
    conformal: pd.DataFrame
    left_out: pd.DataFrame  # run, reason


def _fitted(run_dir: Path, task: str) -> dict[str, Any] | str:
    """The run's fitted entry of ``task`` in ``calibration.json``, or why there is none."""
    path = run_dir / CALIBRATION_FILE
    if not path.is_file():
        return NOT_CALIBRATED
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        return f"{CALIBRATION_FILE} unreadable ({error})"
    fitted = stored.get(task) if isinstance(stored, dict) else None
    if not isinstance(fitted, dict):
        return f"not calibrated (no {task} entry in {CALIBRATION_FILE})"
    if "error" in fitted:
        return f"not calibrated: {fitted['error']}"
    return fitted


def binary_columns(fitted: Mapping[str, Any], rows: pd.DataFrame) -> dict[str, Any]:
    """A binary task's fitted entry (``binary``, ``sets``) applied to test rows: the calibrated probability, the
    threshold, the class at it, alpha and the set membership of class 0 and 1."""
    binary = calib.BinaryCalibration.from_dict(fitted["binary"])
    sets = calib.BinaryConformal.from_dict(fitted["sets"])
    probability = binary.apply(rows["score"].to_numpy(np.float64))
    members = sets.predict_set(probability)
    return {"calibrated": probability, "threshold": binary.threshold,
            "at_threshold": (probability >= binary.threshold).astype(np.int64), "alpha": sets.alpha,
            "set_0": members[:, 0], "set_1": members[:, 1]}


def _interval_columns(fitted: Mapping[str, Any], rows: pd.DataFrame, entry: Mapping[str, Any]) -> dict[str, Any]:
    total = calib.IntervalConformal.from_dict(fitted["global"])
    regions = calib.IntervalConformal.from_dict(fitted["regions"])
    predicted = np.clip(rows[[prediction_column("y_pred", g) for g in entry["groups"]]].to_numpy(np.float64),
                        *REGION_SCORE_RANGE)
    global_low, global_high = total.predict_interval(predicted.sum(axis=1))
    low, high = regions.predict_interval(predicted)
    return {"alpha": total.alpha, "global_low": global_low, "global_high": global_high,
            **{f"low_{g}": low[:, i] for i, g in enumerate(entry["groups"])},
            **{f"high_{g}": high[:, i] for i, g in enumerate(entry["groups"])}}


def _ordered(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows in display order of strategy, then protocol."""
    if frame.empty:
        return frame
    strategies, protocols = strategy_order(frame["strategy"]), order(frame["protocol"], PROTOCOL_LABELS)
    rank = frame["strategy"].map(strategies.index) * len(protocols) + frame["protocol"].map(protocols.index)
    return frame.iloc[np.argsort(rank.to_numpy(), kind="stable")].reset_index(drop=True)


def _rates(truth: np.ndarray, predicted: np.ndarray, at: str) -> dict[str, float]:
    sensitivity = float(predicted[truth == 1].mean()) if (truth == 1).any() else float("nan")
    specificity = float(1 - predicted[truth == 0].mean()) if (truth == 0).any() else float("nan")
    return {f"sensitivity_at_{at}": sensitivity, f"specificity_at_{at}": specificity,
            f"balanced_accuracy_at_{at}": (sensitivity + specificity) / 2}


def calibration_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per strategy × protocol of a binary task's calibrated rows: runs, n, ECE raw and calibrated, its floor, the
    mean threshold, and sensitivity, specificity and balanced accuracy at 0.5 and at the runs' thresholds."""
    records = []
    for (strategy, protocol), group in rows.groupby(GROUP):
        truth = group["y_true"].to_numpy(np.int64)
        score = group["score"].to_numpy(np.float64)
        records.append({
            "strategy": strategy, "protocol": protocol, "runs": group["key"].nunique(), "n": len(group),
            "ece_raw": calib.expected_calibration_error(truth, score),
            "ece_calibrated": calib.expected_calibration_error(truth, group["calibrated"].to_numpy(np.float64)),
            "ece_floor": calib.ece_floor(group["calibrated"].to_numpy(np.float64)),
            "threshold_mean": float(group.groupby("key")["threshold"].first().mean()),
            **_rates(truth, (score >= 0.5).astype(np.int64), "0.5"),
            **_rates(truth, group["at_threshold"].to_numpy(np.int64), "threshold")})
    return _ordered(pd.DataFrame(records))


def conformal_table(rows: pd.DataFrame, entry: Mapping[str, Any]) -> pd.DataFrame:
    """Per strategy × protocol × alpha of the calibrated rows: the sets' coverage, mean size and fractions empty and
    with both classes (binary task), or per interval (``global``, ``regions``) coverage and mean width."""
    records = []
    for (strategy, protocol, alpha), group in rows.groupby([*GROUP, "alpha"]):
        head = {"strategy": strategy, "protocol": protocol, "alpha": alpha, "runs": group["key"].nunique()}
        if entry["scorer"] == "binary":
            found = calib.coverage_and_size(group["y_true"].to_numpy(np.int64), group[["set_0", "set_1"]].to_numpy())
            records.append({**head, "n": int(found.pop("n")), **found})
            continue
        truth = group[[prediction_column("y_true", g) for g in entry["groups"]]].to_numpy(np.float64)
        intervals = {"global": (truth.sum(axis=1), group["global_low"], group["global_high"]),
                     "regions": (truth, group[[f"low_{g}" for g in entry["groups"]]],
                                 group[[f"high_{g}" for g in entry["groups"]]])}
        for part, (true, low, high) in intervals.items():
            found = calib.coverage_and_width(true, low.to_numpy(np.float64), high.to_numpy(np.float64))
            records.append({**head, "interval": part, "n": int(found.pop("n")), **found})
    return _ordered(pd.DataFrame(records))


def collect_calibration(runs: pd.DataFrame, entries: Mapping[str, Mapping[str, Any]], predictions: pd.DataFrame,
                        task: str) -> CalibrationData | None:
    """The calibration of ``task`` in the finished runs ``entries`` (run key → the task's entry) applied to their
    home test rows ``predictions``; None when the task's scorer is not calibrated (or no run has the task)."""
    scorers = {e["scorer"] for e in entries.values()}
    if not entries or not scorers <= set(CALIBRATED_SCORERS) or len(scorers) != 1:
        return None
    run_dirs = dict(zip(runs["key"], runs["run_dir"]))
    parts, left_out = [], []
    by_run = dict(tuple(predictions.groupby("key", sort=False))) if not predictions.empty else {}
    for key, entry in entries.items():
        fitted = _fitted(Path(run_dirs[key]), task)
        if isinstance(fitted, str):
            left_out.append({"run": key, "reason": fitted})
            continue
        if key not in by_run:
            continue
        rows = by_run[key]
        try:
            columns = (binary_columns(fitted, rows) if entry["scorer"] == "binary"
                       else _interval_columns(fitted, rows, entry))
        except (KeyError, TypeError, ValueError) as error:
            left_out.append({"run": key, "reason": f"{CALIBRATION_FILE} unreadable ({error!r})"})
            continue
        parts.append(rows.assign(**columns))
    rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*GROUP, "key", "alpha"])
    entry = next(iter(entries.values()))
    calibration = calibration_table(rows) if entry["scorer"] == "binary" else pd.DataFrame()
    return CalibrationData(rows, calibration, conformal_table(rows, entry),
                           pd.DataFrame(left_out, columns=["run", "reason"]))
