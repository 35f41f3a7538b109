"""Calibration, thresholds and split-conformal prediction on synthetic data with known answers, and against
scikit-learn, crepes and (when installed) netcal."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from crepes import ConformalClassifier, ConformalRegressor
from scipy.special import expit, logit
from sklearn.calibration import calibration_curve
from sklearn.metrics import balanced_accuracy_score

from mdmt.evaluate.calibration import (
    BinaryCalibration,
    BinaryConformal,
    IntervalConformal,
    coverage_and_size,
    coverage_and_width,
    ece_floor,
    expected_calibration_error,
    fit_binary_calibration,
    fit_binary_conformal,
    fit_interval_conformal,
    reliability_table,
)


def overconfident(n: int, seed: int, temperature: float = 2.5, shift: float = 0.0):
    """Labels drawn from sigmoid(z) and a model's logits temperature * z + shift."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, n)
    return (rng.random(n) < expit(z)).astype(int), temperature * z + shift


def two_gaussians(n_mild: int, n_severe: int, seed: int):
    """Scores N(0, 1) for MILD and N(2, 1) for SEVERE: Youden's optimal cut is at 1 whatever the prevalence."""
    rng = np.random.default_rng(seed)
    y = np.r_[np.zeros(n_mild, int), np.ones(n_severe, int)]
    return y, np.r_[rng.normal(0.0, 1.0, n_mild), rng.normal(2.0, 1.0, n_severe)]


# --------------------------------------------------------------------------------------------- calibration
def test_temperature_scaling_recovers_a_known_temperature_and_lowers_ece():
    y_val, z_val = overconfident(20_000, seed=0)
    fitted = fit_binary_calibration(y_val, z_val, score_kind="logit")
    assert fitted.temperature == pytest.approx(2.5, rel=0.05) and fitted.bias == 0.0
    from_probabilities = fit_binary_calibration(y_val, expit(z_val))  # the same model given as P(SEVERE)
    assert from_probabilities.temperature == pytest.approx(fitted.temperature, rel=1e-3)

    y_test, z_test = overconfident(20_000, seed=1)
    before = expected_calibration_error(y_test, expit(z_test))
    after = expected_calibration_error(y_test, fitted.apply(z_test))
    assert before > 0.08 and after < 0.02
    # a monotone map: the ranking (and so the AUC) is unchanged
    assert np.array_equal(np.argsort(fitted.apply(z_test), kind="stable"), np.argsort(z_test, kind="stable"))


def test_platt_recovers_temperature_and_shift_where_temperature_alone_cannot():
    y_val, z_val = overconfident(20_000, seed=2, shift=1.0)  # sigmoid(z) = sigmoid(logit / 2.5 - 0.4)
    platt = fit_binary_calibration(y_val, z_val, score_kind="logit", method="platt")
    assert platt.temperature == pytest.approx(2.5, rel=0.05) and platt.bias == pytest.approx(-0.4, abs=0.05)
    temperature = fit_binary_calibration(y_val, z_val, score_kind="logit")
    y_test, z_test = overconfident(20_000, seed=3, shift=1.0)
    assert (expected_calibration_error(y_test, platt.apply(z_test))
            < 0.5 * expected_calibration_error(y_test, temperature.apply(z_test)))


def test_youden_threshold_finds_the_optimal_cut_and_beats_half():
    y_val, s_val = two_gaussians(3200, 800, seed=4)  # calibrated P(SEVERE) reaches 0.5 near s = 1.7, not 1
    fitted = fit_binary_calibration(y_val, s_val, score_kind="logit", rule="youden")
    cut = fitted.temperature * (logit(fitted.threshold) - fitted.bias)  # the threshold on the raw score
    assert cut == pytest.approx(1.0, abs=0.15)

    prob = fitted.apply(s_val)
    best_j = max(np.mean(prob[y_val == 1] >= t) - np.mean(prob[y_val == 0] >= t) for t in np.unique(prob))
    chosen = fitted.predict(s_val)
    assert np.mean(chosen[y_val == 1]) - np.mean(chosen[y_val == 0]) == pytest.approx(best_j, abs=1e-12)

    y_test, s_test = two_gaussians(3200, 800, seed=5)
    at_half = (fitted.apply(s_test) >= 0.5).astype(int)
    assert (balanced_accuracy_score(y_val, chosen) >= balanced_accuracy_score(y_val, (prob >= 0.5).astype(int)))
    assert balanced_accuracy_score(y_test, fitted.predict(s_test)) > balanced_accuracy_score(y_test, at_half) + 0.03


def test_youden_ties_go_to_the_cut_nearest_half():
    # cuts at 0.4 and at 0.7 both give J = 2/3; the calibration map is symmetric about 0.5, so 0.4 is nearer
    y = np.array([0, 0, 1, 0, 1, 1])
    prob = np.array([0.1, 0.2, 0.4, 0.55, 0.7, 0.9])
    fitted = fit_binary_calibration(y, prob, rule="youden")
    assert fitted.threshold == pytest.approx(fitted.apply([0.4])[0], abs=1e-12)
    assert fitted.predict(prob).tolist() == [0, 0, 1, 1, 1, 1]
    assert fit_binary_calibration(y, prob[::-1][::-1], rule="youden") == fitted  # deterministic


def test_prevalence_rule_finds_youdens_cut_from_a_logistic_fit_where_temperature_leaves_the_location_out():
    y_val, s_val = two_gaussians(3200, 800, seed=4)  # the posterior is logistic in s; J's best cut is s = 1
    fitted = fit_binary_calibration(y_val, s_val, score_kind="logit")
    assert fitted.threshold_rule == "prevalence" and fitted.bias == 0.0  # the default rule, on temperature scaling
    assert fitted.temperature * logit(fitted.threshold) == pytest.approx(1.0, abs=0.1)
    # with Platt's map the calibrated probability is already logistic: the threshold is the share of SEVERE itself
    platt = fit_binary_calibration(y_val, s_val, score_kind="logit", method="platt")
    assert platt.threshold == pytest.approx(y_val.mean(), abs=1e-4)
    y_test, s_test = two_gaussians(3200, 800, seed=5)
    assert (balanced_accuracy_score(y_test, fitted.predict(s_test))
            > balanced_accuracy_score(y_test, (fitted.apply(s_test) >= 0.5).astype(int)) + 0.03)


def test_prevalence_rule_varies_less_than_the_empirical_youden_cut_on_small_validation_folds():
    """100 validation folds of 60 films of one model whose raw 0.5 is off (scores N(0.5, 1) MILD, N(1.5, 1)
    SEVERE: J's best cut is 1): the prevalence rule's cut spreads a third as much as the empirical ROC's best
    point, and its balanced accuracy on 20,000 test films is higher on average, and above 0.5's."""
    rng = np.random.default_rng(0)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, n)
        return y, rng.normal(0.0, 1.0, n) + y + 0.5

    y_test, s_test = draw(20_000)
    rules = ("prevalence", "youden")
    accuracy: dict[str, list[float]] = {rule: [] for rule in rules}
    cuts: dict[str, list[float]] = {rule: [] for rule in rules}
    for _ in range(100):
        y_val, s_val = draw(60)
        for rule in rules:
            fitted = fit_binary_calibration(y_val, s_val, score_kind="logit", rule=rule)
            accuracy[rule].append(balanced_accuracy_score(y_test, fitted.predict(s_test)))
            cuts[rule].append(fitted.temperature * logit(fitted.threshold))
    assert np.mean(cuts["prevalence"]) == pytest.approx(1.0, abs=0.05)
    assert np.std(cuts["prevalence"]) < 0.5 * np.std(cuts["youden"])
    assert np.mean(accuracy["prevalence"]) > np.mean(accuracy["youden"]) + 0.005
    assert np.mean(accuracy["prevalence"]) > balanced_accuracy_score(y_test, s_test >= 0) + 0.05


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_sensitivity_rule_reaches_the_target_with_the_highest_threshold(target: float):
    y_val, s_val = two_gaussians(600, 400, seed=6)
    fitted = fit_binary_calibration(y_val, expit(s_val), rule="sensitivity", target_sensitivity=target)
    prob = fitted.apply(expit(s_val))
    sensitivity = np.mean(fitted.predict(expit(s_val))[y_val == 1])
    assert sensitivity >= target
    next_up = np.min(prob[prob > fitted.threshold])  # one validation score higher drops below the target
    assert np.mean(prob[y_val == 1] >= next_up) < target
    assert fitted.target_sensitivity == target and fitted.threshold_rule == "sensitivity"


# --------------------------------------------------------------------------------------------- ECE
def test_ece_and_reliability_table_by_hand():
    y = [0, 1, 1, 1]
    prob = [0.1, 0.1, 0.9, 0.9]  # bins of 0.1: 1 SEVERE of 2 at 0.1 (gap 0.4), 2 of 2 at 0.9 (gap 0.1)
    assert expected_calibration_error(y, prob, bins=10) == pytest.approx(0.5 * 0.4 + 0.5 * 0.1)
    table = reliability_table(y, [0.0, 0.5, 0.99, 1.0], bins=2)
    assert table["edges"] == [0.0, 0.5, 1.0]
    assert table["count"] == [1.0, 3.0]  # 0.5 opens the upper bin, 1.0 closes it
    assert table["fraction_positive"] == [0.0, 1.0]
    assert math.isnan(reliability_table(y, prob, bins=15)["mean_predicted"][7])  # an empty bin


def test_ece_agrees_with_sklearn_calibration_curve():
    rng = np.random.default_rng(7)
    prob = rng.beta(2, 3, 500)
    y = (rng.random(500) < prob**0.7).astype(int)
    table = reliability_table(y, prob)
    observed, predicted = calibration_curve(y, prob, n_bins=15)
    filled = np.asarray(table["count"]) > 0
    assert np.allclose(np.asarray(table["fraction_positive"])[filled], observed)
    assert np.allclose(np.asarray(table["mean_predicted"])[filled], predicted)
    assert sum(table["count"]) == 500


def test_ece_agrees_with_netcal():
    metrics = pytest.importorskip("netcal.metrics")  # netcal imports torch and tensorboard: not a dependency
    rng = np.random.default_rng(8)
    prob = rng.beta(2, 3, 500)
    y = (rng.random(500) < prob**0.7).astype(int)
    assert expected_calibration_error(y, prob) == pytest.approx(metrics.ECE(bins=15).measure(prob, y), abs=1e-9)


# --------------------------------------------------------------------------------------------- conformal
ALPHA = 0.1
N_CAL = 104  # (n + 1) alpha = 10.5: the expected coverage 95/105 sits mid-way in [0.9, 0.9 + 1/105]


def test_interval_coverage_is_within_the_split_conformal_bounds():
    rng = np.random.default_rng(9)
    coverage = []
    for _ in range(2000):
        x = rng.uniform(3, 15, N_CAL + 200)
        y = x + rng.normal(0, 1.5, x.size)
        model = fit_interval_conformal(y[:N_CAL], x[:N_CAL], ALPHA, value_range=(-50, 50))
        coverage.append(coverage_and_width(y[N_CAL:], *model.predict_interval(x[N_CAL:]))["coverage"])
    assert 1 - ALPHA <= np.mean(coverage) <= 1 - ALPHA + 1 / (N_CAL + 1)


def test_set_coverage_is_within_the_split_conformal_bounds():
    rng = np.random.default_rng(10)
    coverage = []
    for _ in range(2000):
        prob = rng.beta(2, 2, N_CAL + 200)
        y = (rng.random(prob.size) < prob).astype(int)
        model = fit_binary_conformal(y[:N_CAL], prob[:N_CAL], ALPHA)
        coverage.append(coverage_and_size(y[N_CAL:], model.predict_set(prob[N_CAL:]))["coverage"])
    assert 1 - ALPHA <= np.mean(coverage) <= 1 - ALPHA + 1 / (N_CAL + 1)


def test_interval_width_shrinks_with_a_better_predictor_and_stays_in_range():
    rng = np.random.default_rng(11)
    truth = rng.integers(0, 19, 1000).astype(float)
    widths = {}
    for noise in (2.0, 1.0):
        pred = truth + rng.normal(0, noise, truth.size)
        model = fit_interval_conformal(truth[:500], pred[:500], ALPHA)
        lower, upper = model.predict_interval(pred[500:])
        assert lower.min() >= 0 and upper.max() <= 18
        widths[noise] = model.half_width[0]
    assert widths[1.0] < 0.6 * widths[2.0]
    assert widths[2.0] == pytest.approx(1.645 * 2.0, rel=0.15)  # the normal's 95th percentile of |noise|


def test_regional_intervals_have_one_width_per_region():
    rng = np.random.default_rng(12)
    truth = rng.integers(0, 4, (400, 6)).astype(float)
    noise = np.array([0.2, 0.2, 0.2, 0.6, 0.6, 0.6])
    pred = truth + rng.normal(0, 1, truth.shape) * noise
    model = fit_interval_conformal(truth[:200], pred[:200], ALPHA, value_range=(0, 3))
    assert len(model.half_width) == 6 and max(model.half_width[:3]) < min(model.half_width[3:])
    lower, upper = model.predict_interval(pred[200:])
    assert lower.shape == (200, 6) and 0.8 < coverage_and_width(truth[200:], lower, upper)["coverage"] < 0.98
    with pytest.raises(ValueError, match="3 columns, the intervals were fitted on 6"):
        model.predict_interval(pred[:, :3])


@pytest.mark.parametrize("n", [37, 104, 250])
def test_conformal_matches_crepes(n: int):
    rng = np.random.default_rng(n)
    prob = rng.beta(2, 2, n + 300)
    y = (rng.random(prob.size) < prob).astype(int)
    ours = fit_binary_conformal(y[:n], prob[:n], ALPHA)
    reference = ConformalClassifier().fit(np.where(y[:n] == 1, 1 - prob[:n], prob[:n]))
    test = np.column_stack([prob[n:], 1 - prob[n:]])  # 1 - P(MILD), 1 - P(SEVERE)
    expected = reference.predict_set(test, confidence=1 - ALPHA, smoothing=False).astype(bool)
    assert np.array_equal(ours.predict_set(prob[n:]), expected)

    pred = rng.uniform(0, 18, n)
    truth = pred + rng.normal(0, 2, n)
    interval = fit_interval_conformal(truth, pred, ALPHA, value_range=(-100, 100))
    crepes_interval = ConformalRegressor().fit(truth - pred).predict_int(np.array([5.0]), confidence=1 - ALPHA)
    assert np.allclose(np.concatenate(interval.predict_interval(np.array([5.0]))), crepes_interval[0])


def test_intervals_are_clipped_to_the_score_range():
    lower, upper = IntervalConformal(ALPHA, (1.0,), 0.0, 18.0, 100).predict_interval([17.5, -3.0, 9.0])
    assert lower.tolist() == [16.5, 0.0, 8.0] and upper.tolist() == [18.0, 1.0, 10.0]


def test_sets_are_singletons_both_or_empty():
    model = BinaryConformal(alpha=ALPHA, quantile=0.3, n_calibration=100)
    sets = model.predict_set([0.1, 0.9, 0.5, 0.75])
    assert sets.tolist() == [[True, False], [False, True], [False, False], [False, True]]
    assert BinaryConformal(ALPHA, 0.6, 100).predict_set([0.5]).tolist() == [[True, True]]
    summary = coverage_and_size([0, 1, 1, 0], sets)
    assert summary == {"coverage": 0.5, "mean_size": 0.75, "empty": 0.25, "both": 0.0, "n": 4.0}


# --------------------------------------------------------------------------------------------- serialisation
def test_every_fitted_object_round_trips_through_strict_json():
    y, z = overconfident(500, seed=13)
    truth = np.clip(np.round(expit(z) * 18), 0, 18)
    fitted = [
        fit_binary_calibration(y, expit(z), method="platt", rule="sensitivity", target_sensitivity=0.85),
        fit_binary_conformal(y, expit(z / 2.5)),
        fit_interval_conformal(truth, truth + np.sin(z)),
    ]
    for model in fitted:
        restored = type(model).from_dict(json.loads(json.dumps(model.to_dict(), allow_nan=False)))
        assert restored == model
    restored = BinaryCalibration.from_dict(fitted[0].to_dict())
    assert np.array_equal(fitted[0].predict(expit(z)), restored.predict(expit(z)))
    with pytest.raises(ValueError, match=r"unknown keys \['temprature'\], missing keys \['temperature'\]"):
        BinaryCalibration.from_dict({**{k: v for k, v in fitted[0].to_dict().items() if k != "temperature"},
                                     "temprature": 2.0})
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        BinaryCalibration.from_dict({**fitted[0].to_dict(), "temperature": -1.0})


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, message", [
    (lambda: fit_binary_calibration([0, 1, 1], [0.2, float("nan"), 0.7]),
     r"score: 1 non-finite values at positions \[1\]"),
    (lambda: fit_binary_calibration([1, 1, 1], [0.2, 0.6, 0.7]), r"needs both classes.*only \[1\]"),
    (lambda: fit_binary_calibration([], []), "expected a non-empty 1-D array"),
    (lambda: fit_binary_calibration([0, 1], [0.2, 1.4]), r"probabilities outside \[0, 1\] at positions \[1\]"),
    (lambda: fit_binary_calibration([0, 1], [0.2, 0.7, 0.1]), "y_true has 2 rows but score has 3"),
    (lambda: fit_binary_calibration([0, 1], [0.2, 0.7], rule="sensitivity", target_sensitivity=1.5),
     r"target_sensitivity must lie in \(0, 1\]"),
    (lambda: fit_binary_calibration([0, 1], [0.2, 0.7], rule="f1"),
     "rule must be one of prevalence, youden, sensitivity"),
    (lambda: fit_binary_conformal([0, 1] * 10, [0.3, 0.6] * 10, alpha=0.0), r"alpha must lie in \(0, 1\), got 0.0"),
    (lambda: fit_binary_conformal([0, 1] * 10, [0.3, 0.6] * 10, alpha=1.2), r"alpha must lie in \(0, 1\), got 1.2"),
    (lambda: fit_binary_conformal([0, 1] * 4, [0.3, 0.6] * 4, alpha=0.1),
     "needs at least 9 calibration samples, got 8"),
    (lambda: fit_interval_conformal([1.0, 2.0], [1.0], 0.1), r"shape \(2,\) but y_pred has \(1,\)"),
    (lambda: fit_interval_conformal([], [], 0.1), "y_true: expected a non-empty 1-D array"),
    (lambda: fit_interval_conformal([1.0, np.inf], [1.0, 2.0], 0.5), "y_true: 1 non-finite values"),
    (lambda: fit_interval_conformal([1.0] * 20, [1.0] * 20, 0.1, value_range=(3, 3)), "low < high"),
    (lambda: reliability_table([0, 1], [0.2, 0.7], bins=0), "bins must be >= 1"),
])
def test_bad_input_raises_a_clear_error(call, message: str):
    with pytest.raises(ValueError, match=message):
        call()


def test_nine_samples_are_enough_at_alpha_one_tenth():
    model = fit_interval_conformal(np.arange(9.0), np.zeros(9), 0.1)  # the largest residual, not an infinite one
    assert model.half_width == (8.0,)


def test_the_coverage_floor_of_the_calibration_benchmark_matches_split_conformal_sets(monkeypatch):
    """benchmarks/calibration_demo.py's ``coverage_spread`` (Beta-distributed coverage per run) against mdmt's own
    binary conformal sets simulated on exchangeable films: the same pooled percentiles and chance of missing."""
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "calibration_demo.py"
    spec = importlib.util.spec_from_file_location("calibration_demo", script)
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "calibration_demo", benchmark)
    spec.loader.exec_module(benchmark)
    sizes = [(60, 60)] * 5
    low, high, outside = benchmark.coverage_spread(sizes)
    rng = np.random.default_rng(1)
    pooled = []
    for _ in range(3000):
        hits = 0
        for n_cal, n_test in sizes:
            prob = rng.uniform(size=n_cal + n_test)
            truth = rng.binomial(1, prob)
            sets = fit_binary_conformal(truth[:n_cal], prob[:n_cal], alpha=0.1).predict_set(prob[n_cal:])
            hits += int(sets[np.arange(n_test), truth[n_cal:]].sum())
        pooled.append(hits / sum(n for _, n in sizes))
    assert np.quantile(pooled, 0.05) == pytest.approx(low, abs=0.006)
    assert np.quantile(pooled, 0.95) == pytest.approx(high, abs=0.006)
    simulated = np.mean((np.array(pooled) < 0.88) | (np.array(pooled) > 0.95))
    assert simulated == pytest.approx(outside, abs=0.03) and 0.05 < outside < 0.5


def test_the_ece_floor_of_a_perfectly_calibrated_model_falls_as_the_square_root_of_the_rows():
    """Labels drawn from the probabilities themselves still show a 15-bin ECE: about 0.05 on the demo's 600 pooled
    rows and √5 times less on five times the rows (the medium twin's), which is why the ECE target can be resolved
    on the one and not on the other; the floor is seeded and its 90th percentile lies above its median."""
    prob = np.random.default_rng(0).uniform(0.1, 0.9, size=3000)
    small, large = ece_floor(prob[:600]), ece_floor(prob)
    assert 0.04 < small < 0.06 and ece_floor(prob[:600], 0.9) > small
    assert small / large == pytest.approx(np.sqrt(5), rel=0.15)
    assert ece_floor(prob[:600]) == small and ece_floor(prob[:600], seed=1) != small
    drawn = np.random.default_rng(1).binomial(1, prob[:600])  # one such label set: its ECE is of the floor's size
    assert 0.5 * small < expected_calibration_error(drawn, prob[:600]) < 2 * small
    with pytest.raises(ValueError, match="quantile"):
        ece_floor(prob, 1.5)
