"""Evaluation metrics against hand-computed values and scikit-learn on small fixed vectors."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as skm

from mdmt.evaluate.metrics import (
    classification_metrics,
    confusion,
    pooled_and_per_fold,
    prognosis_metrics,
    region_classes,
    roc_curve_points,
    severity_metrics,
)
from mdmt.tasks import GLOBAL_BIN_EDGES, TASK_NAMES, bin_scores, get_task, global_bins

# 4 SEVERE, 6 MILD; at threshold 0.5: TP=3, FN=1, FP=2, TN=4.
Y_TRUE = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
Y_SCORE = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.4, 0.2, 0.1, 0.55, 0.05])


def test_prognosis_metrics_match_hand_computed_2x2():
    m = prognosis_metrics(Y_TRUE, Y_SCORE)
    assert m["n"] == 10
    assert m["accuracy"] == pytest.approx(0.7)
    assert m["sensitivity"] == pytest.approx(0.75) and m["severe_accuracy"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(4 / 6) and m["mild_accuracy"] == pytest.approx(4 / 6)
    assert m["gmean"] == pytest.approx(math.sqrt(0.75 * 4 / 6))
    assert m["precision_severe"] == pytest.approx(3 / 5)
    assert m["f1_severe"] == pytest.approx(2 * 0.6 * 0.75 / (0.6 + 0.75))
    f1_mild = 2 * 0.8 * (4 / 6) / (0.8 + 4 / 6)
    assert m["f1_weighted"] == pytest.approx((6 * f1_mild + 4 * m["f1_severe"]) / 10)
    # 20 of the 24 (SEVERE, MILD) pairs are ordered correctly by the score
    assert m["roc_auc"] == pytest.approx(20 / 24)
    assert m["roc_auc_hard"] == pytest.approx((0.75 + 4 / 6) / 2)


def test_prognosis_metrics_agree_with_sklearn():
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 2, 60)
    y_score = np.clip(0.3 * y_true + rng.uniform(0, 0.7, 60), 0, 1)
    y_pred = (y_score >= 0.5).astype(int)
    m = prognosis_metrics(y_true, y_score)
    assert m["f1_weighted"] == pytest.approx(skm.f1_score(y_true, y_pred, average="weighted"))
    assert m["roc_auc_hard"] == pytest.approx(skm.balanced_accuracy_score(y_true, y_pred))
    assert m["roc_auc"] == pytest.approx(skm.roc_auc_score(y_true, y_score))
    assert m["f1_severe"] == pytest.approx(skm.f1_score(y_true, y_pred))
    assert m["precision_severe"] == pytest.approx(skm.precision_score(y_true, y_pred))


def test_threshold_is_inclusive_and_moves_predictions():
    assert prognosis_metrics([1, 0], [0.5, 0.49])["accuracy"] == 1.0
    # at 0.35 the MILD scores 0.4 and 0.55 and 0.7 are SEVERE, the SEVERE 0.3 stays MILD
    m = prognosis_metrics(Y_TRUE, Y_SCORE, threshold=0.35)
    assert m["specificity"] == pytest.approx(3 / 6) and m["sensitivity"] == pytest.approx(0.75)


def test_single_class_gives_nan_where_undefined():
    m = prognosis_metrics([1, 1, 1], [0.9, 0.2, 0.7])
    assert math.isnan(m["roc_auc"]) and math.isnan(m["specificity"]) and math.isnan(m["gmean"])
    assert m["sensitivity"] == pytest.approx(2 / 3)


@pytest.mark.parametrize(("y_true", "y_score", "match"), [
    ([0, 2], [0.1, 0.2], "y_true"),
    ([0, 1], [0.1, np.nan], "y_score"),
    ([0, 1, 1], [0.1, 0.2], "rows"),
])
def test_prognosis_metrics_reject_bad_input(y_true, y_score, match):
    with pytest.raises(ValueError, match=match):
        prognosis_metrics(y_true, y_score)


def test_global_bins_edges_and_continuous_scores():
    scores = [0, 4, 4.4, 4.6, 5, 9, 9.6, 10, 14, 15, 18]
    np.testing.assert_array_equal(global_bins(scores), [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3])
    integers = np.arange(19)
    np.testing.assert_array_equal(global_bins(integers), bin_scores(integers, GLOBAL_BIN_EDGES))
    assert global_bins(integers).dtype.kind == "i"
    with pytest.raises(ValueError, match="NaN"):
        global_bins([1.0, np.nan])


def test_region_classes_cut_points():
    values = [-0.3, 0.49, 0.5, 1.49, 1.5, 2.49, 2.5, 3.7]
    np.testing.assert_array_equal(region_classes(values), [0, 0, 1, 1, 2, 2, 3, 3])


def test_classification_metrics_kappa_and_confusion():
    y_true = [0, 1, 2, 3, 3, 2]
    y_pred = [0, 1, 3, 3, 2, 2]
    m = classification_metrics(y_true, y_pred, 4, with_confusion=True)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["kappa_quadratic"] == pytest.approx(skm.cohen_kappa_score(y_true, y_pred, weights="quadratic"))
    assert m["f1_weighted"] == pytest.approx(skm.f1_score(y_true, y_pred, average="weighted"))
    assert (m["confusion_2_3"], m["confusion_3_2"], m["confusion_2_2"], m["confusion_0_1"]) == (1, 1, 1, 0)
    assert sum(v for k, v in m.items() if k.startswith("confusion_")) == 6
    assert classification_metrics([0, 1, 2, 3], [0, 1, 2, 3], 4)["kappa_quadratic"] == pytest.approx(1.0)
    assert math.isnan(classification_metrics([2, 2], [2, 2], 4)["kappa_quadratic"])


def test_severity_global4_and_lung4():
    g = severity_metrics("global4", [[0], [1], [3]], [0, 2, 3])
    assert g["accuracy"] == pytest.approx(2 / 3) and g["confusion_1_2"] == 1
    y_true = np.array([[0, 1], [2, 2], [3, 0]])
    y_pred = np.array([[0, 1], [2, 3], [1, 0]])
    m = severity_metrics("lung4", y_true, y_pred)
    assert m["right_accuracy"] == pytest.approx(2 / 3) and m["left_accuracy"] == pytest.approx(2 / 3)
    assert m["accuracy"] == pytest.approx(4 / 6) and m["n"] == 6
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        severity_metrics("lung4", y_true[:, :1], y_pred[:, :1])
    with pytest.raises(ValueError, match="unknown severity kind"):
        severity_metrics("global5", y_true, y_pred)  # type: ignore[arg-type]


def test_severity_regions_against_hand_values():
    y_true = np.array([[0, 1, 2, 3, 0, 1],
                       [3, 3, 3, 3, 3, 3],
                       [0, 0, 0, 0, 0, 0],
                       [1, 2, 1, 2, 1, 2]], dtype=float)
    error = np.array([[0.2, -0.6, 0.0, 0.0, 0.4, 0.0],
                      [0.0, 0.0, -0.4, 0.0, 0.0, 0.0],
                      [0.3, 0.0, 0.0, 0.0, 0.7, 0.0],
                      [0.0, 0.0, 0.0, -1.0, 0.0, 0.1]])
    y_pred = y_true + error
    m = severity_metrics("regions", y_true, y_pred)
    assert m["mae"] == pytest.approx(np.abs(error).sum() / 24)
    assert m["mse"] == pytest.approx((error**2).sum() / 24)
    # rounding mistakes: 1-0.6=0.4 -> 0 (true 1), 0+0.7 -> 1 (true 0), 2-1 -> 1 (true 2)
    assert m["region_accuracy"] == pytest.approx(21 / 24)
    assert m["region_B_accuracy"] == pytest.approx(3 / 4) and m["region_C_accuracy"] == 1.0
    assert m["region_A_mae"] == pytest.approx(0.5 / 4)
    right_true, right_pred = y_true[:, :3].sum(1), y_pred[:, :3].sum(1)
    assert m["lung_right_mae"] == pytest.approx(np.abs(right_pred - right_true).mean())
    global_true, global_pred = y_true.sum(1), y_pred.sum(1)  # 7, 18, 0, 9 vs 7, 17.6, 1, 8.1
    assert m["global_pearson_r"] == pytest.approx(np.corrcoef(global_true, global_pred)[0, 1])
    assert m["global_r2"] == pytest.approx(skm.r2_score(global_true, global_pred))
    # bins: true 1, 3, 0, 1; predicted 7 -> 1, 17.6 -> 3, 1 -> 0, 8.1 -> 1
    assert m["global4_accuracy"] == 1.0 and m["global4_confusion_3_3"] == 1
    assert m["n"] == 4
    constant = severity_metrics("regions", np.ones((3, 6)), np.ones((3, 6)) * 1.2)
    assert math.isnan(constant["region_A_pearson_r"]) and math.isnan(constant["r2"])
    assert constant["mae"] == pytest.approx(0.2)


def test_every_builtin_severity_task_is_scored_as_a_severity_kind():
    from mdmt.evaluate.metrics import SEVERITY_KINDS

    severity = [get_task(name) for name in TASK_NAMES if name.startswith("severity_")]
    assert severity and all(task.scorer in SEVERITY_KINDS for task in severity)


def _accuracy_of(rows: pd.DataFrame) -> dict[str, float]:
    return {"accuracy": float((rows["y_true"] == rows["y_pred"]).mean()), "n": float(len(rows))}


def test_pooled_and_per_fold_toy_frame():
    frame = pd.DataFrame({
        "fold": [1, 1, 0, 0, 0, 0],
        "y_true": [1, 0, 1, 0, 1, 0],
        "y_pred": [1, 1, 1, 0, 1, 0],
    })
    per_fold, pooled = pooled_and_per_fold(frame, _accuracy_of)
    assert list(per_fold.index) == [0, 1, "mean", "std", "se"]
    assert per_fold.loc[0, "accuracy"] == 1.0 and per_fold.loc[1, "accuracy"] == 0.5
    assert per_fold.loc["mean", "accuracy"] == pytest.approx(0.75)
    assert per_fold.loc["std", "accuracy"] == pytest.approx(math.sqrt(0.125))  # ddof=1
    assert per_fold.loc["se", "accuracy"] == pytest.approx(math.sqrt(0.125) / math.sqrt(2))
    assert pooled == {"accuracy": pytest.approx(5 / 6), "n": 6.0}


def test_pooled_and_per_fold_keeps_nan_and_needs_the_fold_column():
    frame = pd.DataFrame({"split": [0, 0, 1, 1], "y_true": [1, 1, 1, 0], "score": [0.9, 0.8, 0.7, 0.1]})
    per_fold, pooled = pooled_and_per_fold(
        frame, lambda rows: {"roc_auc": prognosis_metrics(rows["y_true"], rows["score"])["roc_auc"]}, fold_col="split")
    assert math.isnan(per_fold.loc[0, "roc_auc"]) and math.isnan(per_fold.loc["mean", "roc_auc"])
    assert pooled["roc_auc"] == 1.0
    with pytest.raises(ValueError, match="'fold'"):
        pooled_and_per_fold(frame, _accuracy_of)


def test_roc_curve_points_and_confusion():
    points = roc_curve_points(Y_TRUE, Y_SCORE)
    assert list(points.columns) == ["fpr", "tpr", "threshold"]
    assert (points["fpr"].iloc[0], points["tpr"].iloc[0]) == (0.0, 0.0)
    assert (points["fpr"].iloc[-1], points["tpr"].iloc[-1]) == (1.0, 1.0)
    assert np.trapezoid(points["tpr"], points["fpr"]) == pytest.approx(20 / 24)
    table = confusion(Y_TRUE, (Y_SCORE >= 0.5).astype(int), labels=[0, 1])
    assert table.loc[0, 0] == 4 and table.loc[0, 1] == 2 and table.loc[1, 0] == 1 and table.loc[1, 1] == 3
    assert (table.index.name, table.columns.name) == ("true", "predicted")
