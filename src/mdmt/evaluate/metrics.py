"""Test-set metrics: prognosis (MILD/SEVERE), BrixIA severity variants, and fold aggregation.

Pure numpy/pandas/scikit-learn. Every metric function returns ``dict[str, float]`` (JSON-ready); a metric that
is undefined on the given labels (e.g. ROC AUC with one class present) is NaN, never a made-up number.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats as scipy_stats
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning

from mdmt.tasks import REGIONS, global_bins

MILD, SEVERE = 0, 1
SUMMARY_ROWS: tuple[str, ...] = ("mean", "std", "se")
"""Rows appended by ``pooled_and_per_fold`` to the per-fold table (std with ddof=1, se = std / sqrt(folds))."""

REGION_CLASS_EDGES: tuple[float, ...] = (0.5, 1.5, 2.5)
"""Cut points rounding a regional prediction to a 0–3 class (the official exact-match accuracy)."""
LUNGS: dict[str, slice] = {"right": slice(0, 3), "left": slice(3, 6)}
"""Regions of each lung in the 6-column layout: A+B+C = right, D+E+F = left."""

SeverityKind = Literal["global4", "lung4", "regions"]


# --------------------------------------------------------------------------------------------- helpers
def _ratio(num: float, den: float) -> float:
    return float(num / den) if den else float("nan")


def _finite_vector(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name}: expected a non-empty 1-D array, got shape {array.shape}")
    bad = np.flatnonzero(~np.isfinite(array))
    if bad.size:
        raise ValueError(f"{name}: {bad.size} non-finite values at positions {bad[:5].tolist()}")
    return array


def _class_labels(values: ArrayLike, n_classes: int, name: str) -> np.ndarray:
    """Integer class labels 0..n_classes-1 (floats holding integers are accepted)."""
    array = np.asarray(values, dtype=np.float64)
    bad = np.flatnonzero(~np.isin(array, np.arange(n_classes)))
    if bad.size:
        raise ValueError(f"{name}: values outside 0..{n_classes - 1} at positions {bad[:5].tolist()} "
                         f"({array.ravel()[bad[:5]].tolist()})")
    return array.astype(np.int64)


def _same_length(y_true: np.ndarray, y_other: np.ndarray, other: str) -> None:
    if y_true.shape[0] != y_other.shape[0]:
        raise ValueError(f"y_true has {y_true.shape[0]} rows but {other} has {y_other.shape[0]}")


def _roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    return float(skm.roc_auc_score(y_true, y_score)) if np.unique(y_true).size == 2 else float("nan")


# --------------------------------------------------------------------------------------------- prognosis
def prognosis_metrics(y_true: ArrayLike, y_score: ArrayLike, threshold: float = 0.5) -> dict[str, float]:
    """τ1 metrics from labels (1 = SEVERE) and scores P(SEVERE); predicted SEVERE when ``score >= threshold``.

    ``f1_weighted`` is the paper's F1 (support-weighted over both classes), ``gmean`` = sqrt(sens × spec),
    ``roc_auc`` uses the scores; ``roc_auc_hard`` is the official code's AUC of the hard labels (= balanced
    accuracy), kept for comparison. ``mild_accuracy``/``severe_accuracy`` are the per-class recalls.
    """
    scores = _finite_vector(y_score, "y_score")
    labels = _class_labels(y_true, 2, "y_true")
    _same_length(labels, scores, "y_score")
    predicted = (scores >= threshold).astype(np.int64)
    tn, fp, fn, tp = skm.confusion_matrix(labels, predicted, labels=[MILD, SEVERE]).ravel()
    sensitivity, specificity = _ratio(tp, tp + fn), _ratio(tn, tn + fp)
    return {
        "accuracy": float(skm.accuracy_score(labels, predicted)),
        "f1_weighted": float(skm.f1_score(labels, predicted, labels=[MILD, SEVERE], average="weighted",
                                          zero_division=0)),
        "f1_severe": float(skm.f1_score(labels, predicted, pos_label=SEVERE, zero_division=0)),
        "gmean": float(np.sqrt(sensitivity * specificity)),
        "sensitivity": sensitivity,
        "specificity": specificity,
        "precision_severe": _ratio(tp, tp + fp),
        "roc_auc": _roc_auc(labels, scores),
        "roc_auc_hard": _roc_auc(labels, predicted),
        "mild_accuracy": specificity,
        "severe_accuracy": sensitivity,
        "n": float(labels.size),
    }


# --------------------------------------------------------------------------------------------- severity
def region_classes(values: ArrayLike) -> np.ndarray:
    """Regional predictions → classes 0–3 with the official cut points 0.5 / 1.5 / 2.5."""
    return np.digitize(np.asarray(values, dtype=np.float64), REGION_CLASS_EDGES).astype(np.int64)


def classification_metrics(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int,
                           with_confusion: bool = False) -> dict[str, float]:
    """Accuracy, weighted F1 and quadratic-weighted Cohen's kappa of class labels 0..n_classes-1; optionally the
    confusion counts as ``confusion_<true>_<pred>``."""
    true = _class_labels(y_true, n_classes, "y_true")
    pred = _class_labels(y_pred, n_classes, "y_pred")
    _same_length(true, pred, "y_pred")
    labels = list(range(n_classes))
    with warnings.catch_warnings():  # kappa is 0/0 when both sides hold a single class: NaN is the answer
        warnings.simplefilter("ignore", RuntimeWarning)  # sklearn < 1.7
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        kappa = float(skm.cohen_kappa_score(true, pred, labels=labels, weights="quadratic"))
    out = {
        "accuracy": float(skm.accuracy_score(true, pred)),
        "f1_weighted": float(skm.f1_score(true, pred, labels=labels, average="weighted", zero_division=0)),
        "kappa_quadratic": kappa,
        "n": float(true.size),
    }
    if with_confusion:
        counts = skm.confusion_matrix(true, pred, labels=labels)
        out |= {f"confusion_{t}_{p}": float(counts[t, p]) for t in labels for p in labels}
    return out


def regression_metrics(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """MAE, MSE, Pearson r and R² of one target (NaN where undefined: constant input, fewer than 2 values)."""
    true = _finite_vector(y_true, "y_true")
    pred = _finite_vector(y_pred, "y_pred")
    _same_length(true, pred, "y_pred")
    varies = true.size >= 2 and np.ptp(true) > 0
    pearson = float(scipy_stats.pearsonr(true, pred).statistic) if varies and np.ptp(pred) > 0 else float("nan")
    return {
        "mae": float(skm.mean_absolute_error(true, pred)),
        "mse": float(skm.mean_squared_error(true, pred)),
        "pearson_r": pearson,
        "r2": float(skm.r2_score(true, pred)) if varies else float("nan"),
    }


def _prefixed(prefix: str, values: Mapping[str, float]) -> dict[str, float]:
    return {f"{prefix}_{name}": value for name, value in values.items()}


def _columns(values: ArrayLike, width: int, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    array = array.reshape(-1, 1) if array.ndim == 1 else array
    if array.ndim != 2 or array.shape[1] != width:
        raise ValueError(f"{name}: expected shape (N, {width}), got {np.asarray(values).shape}")
    return array


def _global4_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    return classification_metrics(y_true[:, 0], y_pred[:, 0], 4, with_confusion=True)


def _lung4_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    out = classification_metrics(y_true.ravel(), y_pred.ravel(), 4, with_confusion=True)
    for j, lung in enumerate(LUNGS):
        out |= _prefixed(lung, classification_metrics(y_true[:, j], y_pred[:, j], 4))
    return out


def _regions_metrics(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    hits = region_classes(y_pred) == _class_labels(y_true, 4, "y_true")
    out = regression_metrics(y_true.ravel(), y_pred.ravel())
    out["region_accuracy"] = float(hits.mean())
    for j, region in enumerate(REGIONS):
        out |= _prefixed(f"region_{region}", regression_metrics(y_true[:, j], y_pred[:, j]))
        out[f"region_{region}_accuracy"] = float(hits[:, j].mean())
    for lung, regions in LUNGS.items():
        out |= _prefixed(f"lung_{lung}", regression_metrics(y_true[:, regions].sum(1), y_pred[:, regions].sum(1)))
    true_global, pred_global = y_true.sum(1), y_pred.sum(1)
    out |= _prefixed("global", regression_metrics(true_global, pred_global))
    out |= _prefixed("global4", classification_metrics(global_bins(true_global), global_bins(pred_global), 4,
                                                       with_confusion=True))
    out["n"] = float(y_true.shape[0])
    return out


SEVERITY_KINDS: dict[str, tuple[int, Callable[[np.ndarray, np.ndarray], dict[str, float]]]] = {
    "global4": (1, _global4_metrics),
    "lung4": (2, _lung4_metrics),
    "regions": (len(REGIONS), _regions_metrics),
}
"""kind → (columns of y_true / y_pred, metric function)."""


def severity_metrics(kind: SeverityKind, y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """Metrics of one BrixIA task variant (a built-in severity task's ``scorer`` is its kind).

    - ``global4``: y_true / y_pred class 0–3 of the global score, shape (N,) or (N, 1) → accuracy, f1_weighted,
      kappa_quadratic, confusion_<t>_<p>;
    - ``lung4``: (N, 2) classes 0–3, columns right, left → the same pooled over both lungs, plus per lung
      (``right_*``, ``left_*``);
    - ``regions``: y_true (N, 6) regional scores 0–3 (A–F), y_pred (N, 6) values → mae, mse, pearson_r, r2 over
      all regional values and per region (``region_A_*``), per lung sum (``lung_right_*``) and on the global sum
      (``global_*``); exact-match accuracy after rounding (``region_accuracy``, ``region_A_accuracy``); the
      4-bin class of the summed prediction (``global4_accuracy``, ``global4_kappa_quadratic``, ...).
    """
    if kind not in SEVERITY_KINDS:
        raise ValueError(f"unknown severity kind {kind!r}; choose one of {', '.join(SEVERITY_KINDS)}")
    width, metric_fn = SEVERITY_KINDS[kind]
    true, pred = _columns(y_true, width, "y_true"), _columns(y_pred, width, "y_pred")
    _same_length(true, pred, "y_pred")
    if true.shape[0] == 0:
        raise ValueError("severity_metrics: no rows")
    return metric_fn(true, pred)


# --------------------------------------------------------------------------------------------- aggregation
def pooled_and_per_fold(
    predictions: pd.DataFrame, metric_fn: Callable[[pd.DataFrame], Mapping[str, float]], fold_col: str = "fold"
) -> tuple[pd.DataFrame, dict[str, float]]:
    """The study's two aggregations over one model's test predictions (one row per image per fold): per fold, and
    pooled over folds.

    Returns (a) a table indexed by fold (sorted) with one column per metric of ``metric_fn(fold_rows)``, followed by
    the rows ``mean``, ``std`` (ddof=1) and ``se`` (std / sqrt(folds)) across folds — a NaN fold metric makes its
    summary NaN rather than being skipped; and (b) ``metric_fn`` on all folds' rows pooled.
    """
    if fold_col not in predictions.columns:
        raise ValueError(f"predictions have no fold column {fold_col!r} (columns: {list(predictions.columns)})")
    if predictions.empty:
        raise ValueError("predictions are empty")
    per_fold = pd.DataFrame({fold: dict(metric_fn(rows)) for fold, rows in predictions.groupby(fold_col, sort=True)}).T
    per_fold.index.name = fold_col
    std = per_fold.std(ddof=1, skipna=False)
    summary = pd.DataFrame(dict(zip(SUMMARY_ROWS, (per_fold.mean(skipna=False), std, std / np.sqrt(len(per_fold))))))
    table = pd.concat([per_fold, summary.T])
    table.index.name = fold_col
    return table, {name: float(value) for name, value in metric_fn(predictions).items()}


# --------------------------------------------------------------------------------------------- plot data
def roc_curve_points(y_true: ArrayLike, y_score: ArrayLike) -> pd.DataFrame:
    """ROC curve of scores P(SEVERE): columns fpr, tpr, threshold (sklearn ``roc_curve``)."""
    scores = _finite_vector(y_score, "y_score")
    labels = _class_labels(y_true, 2, "y_true")
    _same_length(labels, scores, "y_score")
    if np.unique(labels).size < 2:
        raise ValueError("roc_curve_points: y_true holds a single class; the ROC curve is undefined")
    fpr, tpr, thresholds = skm.roc_curve(labels, scores)
    return pd.DataFrame({"fpr": fpr, "tpr": tpr, "threshold": thresholds})


def confusion(y_true: ArrayLike, y_pred: ArrayLike, labels: Sequence[int | str]) -> pd.DataFrame:
    """Confusion counts: rows = true label, columns = predicted label, in the order of ``labels``."""
    counts = skm.confusion_matrix(np.asarray(y_true), np.asarray(y_pred), labels=list(labels))
    return pd.DataFrame(counts, index=pd.Index(list(labels), name="true"),
                        columns=pd.Index(list(labels), name="predicted"))
