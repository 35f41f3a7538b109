"""Calibration, decision thresholds and split-conformal prediction, each fitted on a validation fold.

Pure numpy/scipy/scikit-learn (no torch). Every fitted object is a frozen dataclass with ``to_dict``/``from_dict``
(plain JSON types) and predicts from numpy arrays, so a run stores it and ``mdmt predict`` applies it per film.

- :class:`BinaryCalibration`: temperature scaling (or Platt) of the logit of P(SEVERE), fitted by minimising the
  validation NLL with scipy (netcal's ``TemperatureScaling`` imports torch, tensorboard, gpytorch and pyro), plus a
  decision threshold chosen on the calibrated validation probabilities (the prevalence rule, which estimates
  Youden's J's maximiser; the empirical Youden's J; or a fixed sensitivity).
- :func:`expected_calibration_error` and :func:`reliability_table`: equal-width bins of P(SEVERE) against the
  observed fraction of SEVERE (netcal's binary ECE); :func:`ece_floor`: the ECE a perfectly calibrated model
  would show on the same rows (the estimator's noise floor).
- :class:`BinaryConformal` (prediction sets) and :class:`IntervalConformal` (absolute-residual intervals, clipped
  to the score's range): split-conformal at level ``alpha``. The quantile is the ``ceil((1 - alpha)(n + 1))``-th
  smallest calibration score, crepes' standard conformal classifier and regressor without smoothing; crepes
  truncates ``alpha (n + 1)`` in floating point (at ``alpha = 0.1, n = 9`` its intervals are infinite), so the
  order statistic is computed here and the tests check it against crepes where the two agree.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, TypeVar, get_args

import numpy as np
from numpy.typing import ArrayLike
from scipy import optimize, special
from sklearn.metrics import roc_curve

from mdmt.evaluate.metrics import SEVERE, _class_labels, _finite_vector, _same_length

ScoreKind = Literal["probability", "logit"]
CalibrationMethod = Literal["temperature", "platt"]
ThresholdRule = Literal["prevalence", "youden", "sensitivity"]
THRESHOLD_RULES: tuple[str, ...] = get_args(ThresholdRule)
PROBABILITY_CLIP = 1e-6
"""Probabilities are clipped to [PROBABILITY_CLIP, 1 - PROBABILITY_CLIP] before the logit (|logit| <= 13.8)."""
LOG_TEMPERATURE_BOUND = math.log(100.0)
"""The fitted temperature stays within [1/100, 100] (a validation fold the model separates drives it to 0)."""
ECE_BINS = 15
ECE_FLOOR_DRAWS = 200
"""Label sets :func:`ece_floor` draws: on 600 rows spread over [0.1, 0.9] its median stays within 0.0494-0.0508
over five seeds."""

_Fitted = TypeVar("_Fitted")


# --------------------------------------------------------------------------------------------- helpers
def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _binary_inputs(y_true: ArrayLike, score: ArrayLike, score_name: str) -> tuple[np.ndarray, np.ndarray]:
    scores = _finite_vector(score, score_name)
    labels = _class_labels(y_true, 2, "y_true")
    _same_length(labels, scores, score_name)
    return labels, scores


def _probabilities(prob: ArrayLike, name: str = "prob") -> np.ndarray:
    values = _finite_vector(prob, name)
    bad = np.flatnonzero((values < 0.0) | (values > 1.0))
    if bad.size:
        raise ValueError(f"{name}: probabilities outside [0, 1] at positions {bad[:5].tolist()}")
    return values


def _matrix(values: ArrayLike, name: str) -> np.ndarray:
    """A finite, non-empty (n,) or (n, k) array as (n, k)."""
    array = np.asarray(values, dtype=np.float64)
    if array.ndim not in (1, 2):
        raise ValueError(f"{name}: expected a 1-D or 2-D array, got shape {array.shape}")
    _finite_vector(array.ravel(), name)
    return array.reshape(array.shape[0], -1)


def _from_dict(cls: type[_Fitted], data: Mapping[str, Any]) -> _Fitted:
    names = {f.name for f in fields(cls)}
    unknown, missing = sorted(set(data) - names), sorted(names - set(data))
    if unknown or missing:
        raise ValueError(f"{cls.__name__}: unknown keys {unknown}, missing keys {missing}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _conformal_quantile(scores: np.ndarray, alpha: float) -> np.ndarray:
    """Per column, the ``ceil((1 - alpha)(n + 1))``-th smallest of the n calibration scores of shape (n, k)."""
    _check_alpha(alpha)
    n = scores.shape[0]
    # the (floor(alpha (n + 1)))-th largest; rounding keeps alpha = 0.1, n = 9 at the 1st (0.1 is not exact in binary)
    rank = math.floor(round(alpha * (n + 1), 9))
    if rank < 1:
        raise ValueError(f"alpha={alpha} needs at least {math.ceil(round(1 / alpha, 9)) - 1} calibration samples, "
                         f"got {n}")
    return np.sort(scores, axis=0)[n - rank]


# --------------------------------------------------------------------------------------------- calibration
def _logits(score: ArrayLike, score_kind: ScoreKind) -> np.ndarray:
    if score_kind == "logit":
        return _finite_vector(score, "score")
    return special.logit(np.clip(_probabilities(score, "score"), PROBABILITY_CLIP, 1.0 - PROBABILITY_CLIP))


def _fit_scaling(labels: np.ndarray, logits: np.ndarray, with_bias: bool) -> tuple[float, float]:
    """(temperature, bias) minimising the mean NLL of ``sigmoid(logit / temperature + bias)`` (L-BFGS-B)."""

    def nll(theta: np.ndarray) -> tuple[float, np.ndarray]:
        scale = math.exp(-theta[0])
        u = logits * scale + (theta[1] if with_bias else 0.0)
        residual = special.expit(u) - labels
        grad = [float(np.mean(residual * -logits * scale))] + ([float(np.mean(residual))] if with_bias else [])
        return float(np.mean(np.logaddexp(0.0, u) - labels * u)), np.asarray(grad)

    start = np.zeros(2 if with_bias else 1)
    bounds = [(-LOG_TEMPERATURE_BOUND, LOG_TEMPERATURE_BOUND)] + ([(None, None)] if with_bias else [])
    theta = optimize.minimize(nll, start, jac=True, method="L-BFGS-B", bounds=bounds).x
    return math.exp(float(theta[0])), (float(theta[1]) if with_bias else 0.0)


def _choose_threshold(labels: np.ndarray, prob: np.ndarray, rule: ThresholdRule,
                      target_sensitivity: float) -> float:
    """The threshold on the calibrated validation probabilities ``prob``.

    - ``prevalence``: where a logistic (Platt) fit of the labels on ``logit(prob)`` equals the share of class 1.
      For a calibrated probability Youden's J peaks where it equals the prevalence, so this estimates J's maximiser
      from every row's probability rather than from the empirical ROC's single best point (less variable: on the
      medium twin it never fell below 0.5's balanced accuracy, where ``youden`` did in 2 of 20 cells;
      benchmarks/RESULTS.md). The logistic fit supplies the location temperature scaling leaves out.
    - ``youden``: the validation probability with the largest empirical J (ties: the one nearest 0.5, then the
      higher).
    - ``sensitivity``: the highest validation probability that keeps sensitivity >= ``target_sensitivity``.
    """
    if rule == "prevalence":
        share = float(labels.mean())
        temperature, bias = _fit_scaling(labels.astype(np.float64), _logits(prob, "probability"), with_bias=True)
        return float(special.expit(temperature * (special.logit(share) - bias)))
    fpr, tpr, thresholds = roc_curve(labels, prob, drop_intermediate=False)
    finite = np.isfinite(thresholds)  # the first point (+inf) predicts nobody SEVERE
    fpr, tpr, thresholds = fpr[finite], tpr[finite], thresholds[finite]
    if rule == "sensitivity":
        return float(thresholds[np.flatnonzero(tpr >= target_sensitivity)[0]])
    youden = tpr - fpr
    best = np.flatnonzero(youden >= youden.max() - 1e-12)
    return float(thresholds[best[np.argmin(np.abs(thresholds[best] - 0.5))]])


@dataclass(frozen=True)
class BinaryCalibration:
    """P(SEVERE) = sigmoid(logit / temperature + bias), predicted SEVERE when that is >= ``threshold``.

    ``score_kind`` says what :meth:`apply` takes (P(SEVERE) or its logit); ``bias`` is 0 for temperature scaling;
    ``target_sensitivity`` is set for the ``sensitivity`` rule only.
    """

    temperature: float
    threshold: float
    threshold_rule: ThresholdRule = "prevalence"
    method: CalibrationMethod = "temperature"
    bias: float = 0.0
    score_kind: ScoreKind = "probability"
    target_sensitivity: float | None = None

    def __post_init__(self) -> None:
        _check_choice(self.threshold_rule, THRESHOLD_RULES, "threshold_rule")
        _check_choice(self.method, ("temperature", "platt"), "method")
        _check_choice(self.score_kind, ("probability", "logit"), "score_kind")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1], got {self.threshold}")
        if self.method == "temperature" and self.bias != 0.0:
            raise ValueError(f"temperature scaling has no bias, got bias={self.bias}")
        if (self.threshold_rule == "sensitivity") != (self.target_sensitivity is not None):
            raise ValueError("target_sensitivity is set with threshold_rule='sensitivity' and only then")

    def apply(self, score: ArrayLike) -> np.ndarray:
        """Calibrated P(SEVERE) of scores of kind ``score_kind``."""
        return special.expit(_logits(score, self.score_kind) / self.temperature + self.bias)

    def predict(self, score: ArrayLike) -> np.ndarray:
        """1 (SEVERE) where the calibrated probability reaches the threshold, else 0 (MILD)."""
        return (self.apply(score) >= self.threshold).astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BinaryCalibration:
        return _from_dict(cls, data)


def fit_binary_calibration(y_true: ArrayLike, score: ArrayLike, *, score_kind: ScoreKind = "probability",
                           method: CalibrationMethod = "temperature", rule: ThresholdRule = "prevalence",
                           target_sensitivity: float = 0.9) -> BinaryCalibration:
    """Fit the calibration map and the threshold on validation labels (1 = SEVERE) and scores of ``score_kind``.

    Both classes must be present; the threshold is a calibrated probability (``_choose_threshold``).
    """
    _check_choice(score_kind, ("probability", "logit"), "score_kind")
    _check_choice(method, ("temperature", "platt"), "method")
    _check_choice(rule, THRESHOLD_RULES, "rule")
    if rule == "sensitivity" and not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must lie in (0, 1], got {target_sensitivity}")
    labels, scores = _binary_inputs(y_true, score, "score")
    present = np.unique(labels)
    if present.size < 2:
        raise ValueError(f"y_true: calibration needs both classes, the validation labels hold only {present.tolist()}")
    logits = _logits(scores, score_kind)
    temperature, bias = _fit_scaling(labels.astype(np.float64), logits, method == "platt")
    threshold = _choose_threshold(labels, special.expit(logits / temperature + bias), rule, target_sensitivity)
    return BinaryCalibration(temperature, threshold, rule, method, bias, score_kind,
                             float(target_sensitivity) if rule == "sensitivity" else None)


def reliability_table(y_true: ArrayLike, prob: ArrayLike, bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Equal-width bins of P(SEVERE) on [0, 1] (left-closed, the last one closed): ``edges`` (bins + 1), and per
    bin ``count``, ``mean_predicted`` and ``fraction_positive`` (NaN in an empty bin)."""
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    labels, values = _binary_inputs(y_true, prob, "prob")
    _probabilities(values)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.digitize(values, edges[1:-1])
    count = np.bincount(index, minlength=bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = np.bincount(index, weights=values, minlength=bins) / count
        fraction_positive = np.bincount(index, weights=labels.astype(np.float64), minlength=bins) / count
    return {"edges": edges.tolist(), "count": count.tolist(), "mean_predicted": mean_predicted.tolist(),
            "fraction_positive": fraction_positive.tolist()}


def expected_calibration_error(y_true: ArrayLike, prob: ArrayLike, bins: int = ECE_BINS) -> float:
    """ECE of P(SEVERE): the count-weighted mean |fraction SEVERE - mean P(SEVERE)| over the reliability bins."""
    table = reliability_table(y_true, prob, bins)
    count = np.asarray(table["count"])
    gap = np.abs(np.asarray(table["fraction_positive"]) - np.asarray(table["mean_predicted"]))
    filled = count > 0
    return float(np.sum(count[filled] * gap[filled]) / count.sum())


def ece_floor(prob: ArrayLike, quantile: float = 0.5, bins: int = ECE_BINS, draws: int = ECE_FLOOR_DRAWS,
              seed: int = 0) -> float:
    """The ECE a perfectly calibrated model with these probabilities shows on this many rows: the ``quantile`` of
    the ECE of ``draws`` label sets drawn from ``prob`` itself (seeded). An ECE near the median is as calibrated
    as the rows can tell: about 0.05 on 600 rows spread over [0.1, 0.9], and it falls as one over the square root
    of the rows."""
    values = _probabilities(prob)
    if not 0.0 <= quantile <= 1.0:
        raise ValueError(f"quantile must lie in [0, 1], got {quantile}")
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    rng = np.random.default_rng(seed)
    return float(np.quantile([expected_calibration_error(rng.binomial(1, values), values, bins)
                              for _ in range(draws)], quantile))


# --------------------------------------------------------------------------------------------- conformal
@dataclass(frozen=True)
class BinaryConformal:
    """Split-conformal prediction sets from P(SEVERE): a class is in the set when 1 - P(class) <= ``quantile``.

    The set holds the true class with probability >= 1 - alpha over exchangeable films; it may be {MILD},
    {SEVERE}, both, or empty.
    """

    alpha: float
    quantile: float
    n_calibration: int

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)
        if not 0.0 <= self.quantile <= 1.0:
            raise ValueError(f"quantile must lie in [0, 1], got {self.quantile}")

    def predict_set(self, prob: ArrayLike) -> np.ndarray:
        """Boolean (n, 2) array: column ``MILD`` (0) and column ``SEVERE`` (1) in the set."""
        severe = _probabilities(prob)
        return np.column_stack([severe, 1.0 - severe]) <= self.quantile

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BinaryConformal:
        return _from_dict(cls, data)


def fit_binary_conformal(y_true: ArrayLike, prob: ArrayLike, alpha: float = 0.1) -> BinaryConformal:
    """Calibrate on validation labels (1 = SEVERE) and P(SEVERE) with the score 1 - P(true class)."""
    _check_alpha(alpha)
    labels, severe = _binary_inputs(y_true, prob, "prob")
    _probabilities(severe)
    scores = np.where(labels == SEVERE, 1.0 - severe, severe)
    return BinaryConformal(float(alpha), float(_conformal_quantile(scores[:, None], alpha)[0]), int(labels.size))


def coverage_and_size(y_true: ArrayLike, sets: ArrayLike) -> dict[str, float]:
    """Empirical coverage of boolean (n, 2) prediction sets, their mean size and the fractions empty and with both."""
    members = np.asarray(sets, dtype=bool)
    if members.ndim != 2 or members.shape[1] != 2 or members.shape[0] == 0:
        raise ValueError(f"sets: expected a non-empty (n, 2) boolean array, got shape {members.shape}")
    labels = _class_labels(y_true, 2, "y_true")
    _same_length(labels, members, "sets")
    size = members.sum(axis=1)
    return {"coverage": float(members[np.arange(labels.size), labels].mean()), "mean_size": float(size.mean()),
            "empty": float(np.mean(size == 0)), "both": float(np.mean(size == 2)), "n": float(labels.size)}


@dataclass(frozen=True)
class IntervalConformal:
    """Split-conformal intervals ``clip(prediction -/+ half_width, low, high)`` per output column.

    One ``half_width`` per column (one for the global Brixia score, six for the regions), each the conformal
    quantile of that column's absolute residuals; predictions are clipped to [low, high] first.
    """

    alpha: float
    half_width: tuple[float, ...]
    low: float
    high: float
    n_calibration: int

    def __post_init__(self) -> None:
        _check_alpha(self.alpha)
        if not self.half_width or not all(math.isfinite(w) and w >= 0 for w in self.half_width):
            raise ValueError(f"half_width must be finite non-negative numbers, got {self.half_width}")
        if not self.low < self.high:
            raise ValueError(f"value range must have low < high, got [{self.low}, {self.high}]")

    def _clipped(self, y_pred: ArrayLike) -> np.ndarray:
        pred = _matrix(y_pred, "y_pred")
        if pred.shape[1] != len(self.half_width):
            raise ValueError(f"y_pred: {pred.shape[1]} columns, the intervals were fitted on {len(self.half_width)}")
        return np.clip(pred, self.low, self.high)

    def predict_interval(self, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper), each of the shape of ``y_pred``."""
        shape = np.shape(y_pred)
        pred = self._clipped(y_pred)
        width = np.asarray(self.half_width)
        lower, upper = np.clip(pred - width, self.low, self.high), np.clip(pred + width, self.low, self.high)
        return lower.reshape(shape), upper.reshape(shape)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "half_width": list(self.half_width)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> IntervalConformal:
        return _from_dict(cls, data)


def fit_interval_conformal(y_true: ArrayLike, y_pred: ArrayLike, alpha: float = 0.1,
                           value_range: tuple[float, float] = (0.0, 18.0)) -> IntervalConformal:
    """Calibrate on validation targets and predictions of shape (n,) or (n, k) (e.g. the six regions, range 0–3)."""
    _check_alpha(alpha)
    truth, pred = _matrix(y_true, "y_true"), _matrix(y_pred, "y_pred")
    if truth.shape != pred.shape:
        raise ValueError(f"y_true has shape {np.shape(y_true)} but y_pred has {np.shape(y_pred)}")
    low, high = (float(v) for v in value_range)
    if not low < high:
        raise ValueError(f"value_range must have low < high, got {value_range}")
    residuals = np.abs(truth - np.clip(pred, low, high))
    return IntervalConformal(float(alpha), tuple(float(w) for w in _conformal_quantile(residuals, alpha)), low, high,
                             int(truth.shape[0]))


def coverage_and_width(y_true: ArrayLike, lower: ArrayLike, upper: ArrayLike) -> dict[str, float]:
    """Empirical coverage (lower <= truth <= upper) and mean width, pooled over every cell of (n,) or (n, k)."""
    truth, low, high = (_matrix(v, name) for v, name in ((y_true, "y_true"), (lower, "lower"), (upper, "upper")))
    if not truth.shape == low.shape == high.shape:
        raise ValueError(f"y_true, lower and upper differ in shape: {truth.shape}, {low.shape}, {high.shape}")
    return {"coverage": float(np.mean((low <= truth) & (truth <= high))), "mean_width": float(np.mean(high - low)),
            "n": float(truth.shape[0])}


__all__ = [
    "ECE_BINS", "BinaryCalibration", "BinaryConformal", "IntervalConformal", "coverage_and_size",
    "coverage_and_width", "expected_calibration_error", "fit_binary_calibration", "fit_binary_conformal",
    "fit_interval_conformal", "reliability_table",
]
