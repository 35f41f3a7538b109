"""Statistics: paired tests against scipy, pairing by name, Holm, Nemenyi CD, Friedman, bootstrap, CD diagram.

Holm (statsmodels), the bootstrap (scipy) and the Nemenyi cliques (scikit-posthocs) replaced hand-written code;
the ``REFERENCE_*`` numbers below were computed with that earlier code on the same inputs, and the tests check
that the libraries give them back.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from mdmt.evaluate.stats import (
    bootstrap_mean_diff_ci,
    critical_difference,
    friedman_holm,
    holm,
    nemenyi_cliques,
    one_tailed_paired_tests,
    paired_by_name,
    plot_critical_difference,
    significance_table,
    stars,
    wilcoxon,
)

BACKBONES = [f"net{i:02d}" for i in range(18)]

# --- reference values of the hand-written implementation these functions replaced (same inputs as below)
REFERENCE_HOLM_INPUT = [0.012, 0.2, 0.001, 0.04, 0.04, 0.5, 0.03, 0.0004, 0.07, 0.9]
REFERENCE_HOLM = [0.096, 0.6, 0.009, 0.24, 0.24, 1.0, 0.21, 0.004, 0.28, 1.0]
REFERENCE_BOOTSTRAP_30 = (0.019707061417987504, 0.016848718138581718, 0.02271242015604193)
REFERENCE_BOOTSTRAP_5 = (0.034, 0.004, 0.064)
REFERENCE_FRIEDMAN = {"statistic": 10.3, "p": 0.016180836829565795, "cd": 1.3539986304310858,
                      "ranks": {"mdmt": 1.75, "perm": 2.0833333333333335, "ft": 3.0, "stl": 3.1666666666666665},
                      "p_holm": [0.6787109375, 0.0556640625, 0.0556640625, 0.064453125, 0.15673828125, 0.6787109375],
                      "groups": [("mdmt", "perm", "ft"), ("perm", "ft", "stl")]}


def test_paired_by_name_ignores_order():
    a = {"resnet18": 0.7, "densenet121": 0.6, "vgg11": 0.5}
    b = pd.Series({"vgg11": 0.4, "resnet18": 0.65, "densenet121": 0.62})
    names, a_vec, b_vec = paired_by_name(a, b)
    assert names == ["densenet121", "resnet18", "vgg11"]
    np.testing.assert_allclose(a_vec, [0.6, 0.7, 0.5])
    np.testing.assert_allclose(b_vec, [0.62, 0.65, 0.4])


def test_paired_by_name_names_the_unpaired_backbones():
    with pytest.raises(ValueError, match=r"only in the first set \['vgg11'\].*only in the second set \['alexnet'\]"):
        paired_by_name({"resnet18": 0.7, "vgg11": 0.5}, {"resnet18": 0.6, "alexnet": 0.5})
    with pytest.raises(ValueError, match="vgg11"):
        paired_by_name({"resnet18": 0.7, "vgg11": float("nan")}, {"resnet18": 0.6, "vgg11": 0.5})


def test_stars_levels():
    assert [stars(p) for p in (0.0005, 0.001, 0.005, 0.01, 0.03, 0.05, 0.2, float("nan"))] == [
        "***", "**", "**", "*", "*", "—", "—", "—"]


def test_one_tailed_tests_are_half_the_two_sided_scipy_p():
    better = np.array([0.70, 0.66, 0.71, 0.64, 0.69, 0.73, 0.68, 0.67])
    worse = np.array([0.66, 0.65, 0.66, 0.65, 0.64, 0.70, 0.66, 0.61])
    result = one_tailed_paired_tests(better, worse)
    assert result["p"] == pytest.approx(scipy_stats.ttest_rel(better, worse).pvalue / 2)
    assert result["t_statistic"] == pytest.approx(scipy_stats.ttest_rel(better, worse).statistic)
    assert result["p_wilcoxon"] == pytest.approx(scipy_stats.wilcoxon(better, worse).pvalue / 2)
    assert result["mean_diff"] == pytest.approx(np.mean(better - worse))
    assert (result["wins"], result["n"]) == (7, 8)
    reversed_ = one_tailed_paired_tests(better, worse, alternative="less")
    assert reversed_["p"] == pytest.approx(1 - result["p"])
    assert reversed_["wins"] == 1


def test_wilcoxon_gives_scipys_numbers_on_tied_small_samples():
    """Accuracy differences on small folds tie and hit zero: scipy then enumerates every sign flip one call at a
    time; the vectorised permutation path must give the same statistic and p-value (and scipy's own elsewhere)."""
    rng = np.random.default_rng(3)
    tied = 0
    for n in [2, 3, 5, 8, 10, 10, 12, 14, 20]:
        diff = np.round(rng.normal(0.01, 0.03, n), 2)
        diff[0] = 0.0  # a zero difference: the permutation path up to 13 pairs
        tied += n <= 13
        for alternative in ("greater", "less", "two-sided"):
            expected = scipy_stats.wilcoxon(diff, alternative=alternative)
            assert wilcoxon(diff, alternative) == pytest.approx((expected.statistic, expected.pvalue), abs=1e-12)
    assert tied == 7


def test_one_tailed_tests_degenerate_inputs_give_nan():
    same = one_tailed_paired_tests([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert math.isnan(same["p"]) and math.isnan(same["p_wilcoxon"]) and same["wins"] == 0
    with pytest.raises(ValueError, match="same length"):
        one_tailed_paired_tests([1.0, 2.0], [1.0])


def _per_backbone_frame(rng: np.random.Generator) -> pd.DataFrame:
    """MDMT clearly above STL in mean and below it in std; FT indistinguishable from MDMT."""
    rows = []
    for protocol in ("cv5", "loco"):
        for metric in ("accuracy", "f1_weighted", "gmean"):
            base = rng.uniform(0.6, 0.7, len(BACKBONES))
            spread = rng.uniform(0.03, 0.06, len(BACKBONES))
            shifts = {"stl_prognosis": (0.0, 0.02), "ft": (0.03, 0.0), "mdmt": (0.03, 0.0)}
            for strategy, (mean_shift, std_shift) in shifts.items():
                noise = rng.normal(0, 0.005, len(BACKBONES))
                rows += [{"strategy": strategy, "backbone": b, "protocol": protocol, "metric": metric,
                          "mean": base[i] + mean_shift + noise[i], "std": spread[i] + std_shift + noise[i] / 5}
                         for i, b in enumerate(BACKBONES)]
    return pd.DataFrame(rows)


def test_significance_table_layout_and_values():
    frame = _per_backbone_frame(np.random.default_rng(0))
    table = significance_table(frame)
    assert list(table.index) == ["Mean (μ↑) MDMT vs STL", "Mean (μ↑) MDMT vs FT",
                                 "Std (σ↓) MDMT vs STL", "Std (σ↓) MDMT vs FT"]
    assert table.columns.names == ["protocol", "metric", "field"]
    assert table.columns.get_level_values("protocol").unique().tolist() == ["cv5", "loco"]
    pick = frame[(frame.protocol == "loco") & (frame.metric == "gmean")].set_index(["strategy", "backbone"])
    expected = scipy_stats.ttest_rel(pick.loc["mdmt", "mean"], pick.loc["stl_prognosis", "mean"], alternative="greater")
    assert table.loc["Mean (μ↑) MDMT vs STL", ("loco", "gmean", "p")] == pytest.approx(expected.pvalue)
    assert table.loc["Mean (μ↑) MDMT vs STL", ("loco", "gmean", "n")] == 18
    assert (table.loc["Mean (μ↑) MDMT vs STL", (slice(None), slice(None), "stars")] == "***").all()
    assert (table.loc["Std (σ↓) MDMT vs STL", (slice(None), slice(None), "stars")] == "***").all()
    expected_std = scipy_stats.ttest_rel(pick.loc["mdmt", "std"], pick.loc["stl_prognosis", "std"], alternative="less")
    assert table.loc["Std (σ↓) MDMT vs STL", ("loco", "gmean", "p")] == pytest.approx(expected_std.pvalue)
    assert table.loc["Mean (μ↑) MDMT vs FT", (slice(None), slice(None), "p")].min() > 0.001
    # the row order of the input does not matter: pairing is by name
    shuffled = frame.sample(frac=1.0, random_state=1)
    pd.testing.assert_frame_equal(significance_table(shuffled), table)


def test_significance_table_missing_strategy_and_missing_backbone():
    frame = _per_backbone_frame(np.random.default_rng(1))
    without_ft = frame[~((frame.strategy == "ft") & (frame.protocol == "loco"))]
    table = significance_table(without_ft)
    assert table.loc["Mean (μ↑) MDMT vs FT", ("loco", "accuracy", "stars")] == "n/a"
    assert table.loc["Mean (μ↑) MDMT vs FT", ("cv5", "accuracy", "n")] == 18
    lost = frame[~((frame.strategy == "mdmt") & (frame.backbone == "net07") & (frame.protocol == "cv5"))]
    with pytest.raises(ValueError, match="net07"):
        significance_table(lost)


def test_holm_textbook_example():
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, 0.4]), [0.8, 0.8])
    assert holm([0.9, 0.6, 0.7]).max() == 1.0


def test_holm_from_statsmodels_gives_the_earlier_values():
    np.testing.assert_allclose(holm(REFERENCE_HOLM_INPUT), REFERENCE_HOLM, rtol=1e-12)


def test_lower_is_better_flips_the_mean_test():
    frame = _per_backbone_frame(np.random.default_rng(0))
    errors = frame.assign(mean=1 - frame["mean"])  # an error metric: MDMT now lower, i.e. better
    table = significance_table(errors, lower_is_better={"accuracy", "f1_weighted", "gmean"})
    assert (table.loc["Mean (μ↑) MDMT vs STL", (slice(None), slice(None), "stars")] == "***").all()
    pick = errors[(errors.protocol == "cv5") & (errors.metric == "accuracy")].set_index(["strategy", "backbone"])
    expected = scipy_stats.ttest_rel(pick.loc["mdmt", "mean"], pick.loc["stl_prognosis", "mean"], alternative="less")
    assert table.loc["Mean (μ↑) MDMT vs STL", ("cv5", "accuracy", "p")] == pytest.approx(expected.pvalue)
    pd.testing.assert_frame_equal(table.loc[table.index.str.startswith("Std")],
                                  significance_table(frame).loc[lambda t: t.index.str.startswith("Std")])


def test_significance_table_takes_any_pairs():
    frame = _per_backbone_frame(np.random.default_rng(3))
    permuted = frame[frame.strategy == "stl_prognosis"].assign(strategy="mdmt_permuted")
    table = significance_table(pd.concat([frame, permuted]), comparisons=[("mdmt", "mdmt_permuted"), ("ft", "mdmt")])
    assert list(table.index) == ["Mean (μ↑) MDMT vs permuted MDMT", "Mean (μ↑) FT vs MDMT",
                                 "Std (σ↓) MDMT vs permuted MDMT", "Std (σ↓) FT vs MDMT"]


def test_critical_difference_matches_demsar_table():
    # Demšar (2006) Table 5a, q_0.05 for k = 2..10
    table = [1.960, 2.343, 2.569, 2.728, 2.850, 2.949, 3.031, 3.102, 3.164]
    for k, q in zip(range(2, 11), table):  # CD = q * sqrt(k(k+1) / 6n)
        assert critical_difference(k, 1) / math.sqrt(k * (k + 1) / 6) == pytest.approx(q, abs=1.5e-3)
    assert critical_difference(4, 18) == pytest.approx(2.569 * math.sqrt(4 * 5 / (6 * 18)), abs=1e-3)
    assert critical_difference(4, 18, alpha=0.10) < critical_difference(4, 18)


def test_friedman_holm_on_a_strict_ordering():
    rng = np.random.default_rng(2)
    base = rng.uniform(0.5, 0.6, 10)
    scores = pd.DataFrame({"stl": base, "ft": base + rng.uniform(0.01, 0.02, 10),
                           "mdmt": base + rng.uniform(0.03, 0.04, 10)}, index=BACKBONES[:10])
    result = friedman_holm(scores)
    assert result.avg_ranks.to_dict() == {"mdmt": 1.0, "ft": 2.0, "stl": 3.0}
    # chi2 = 12n / (k(k+1)) * sum(R_j^2) - 3n(k+1) with n=10, k=3, R = (1, 2, 3)
    assert result.statistic == pytest.approx(12 * 10 / 12 * 14 - 3 * 10 * 4)
    assert result.p_value == pytest.approx(scipy_stats.chi2.sf(20, 2))
    # every pair: 10 differences of one sign -> exact two-sided Wilcoxon p = 2 / 2^10; Holm x3, x2, x1 then monotone
    np.testing.assert_allclose(result.pairwise["p"], 2 / 1024)
    np.testing.assert_allclose(result.pairwise["p_holm"], 3 * 2 / 1024)
    assert result.critical_difference == pytest.approx(critical_difference(3, 10))
    assert result.n_blocks == 10
    lower_better = friedman_holm(-scores, higher_is_better=False)
    assert lower_better.avg_ranks.to_dict() == result.avg_ranks.to_dict()
    # CD = 1.05: neighbours (rank distance 1) are not told apart, mdmt and stl (distance 2) are
    assert result.cliques == [("mdmt", "ft"), ("ft", "stl")]
    with pytest.raises(ValueError, match="at least 3"):
        friedman_holm(scores[["stl", "ft"]])
    incomplete = scores.copy()
    incomplete.loc["net03", "ft"] = np.nan
    with pytest.raises(ValueError, match="net03"):
        friedman_holm(incomplete)


def _reference_scores() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    base = rng.uniform(0.5, 0.7, 12)
    return pd.DataFrame({"stl": base, "ft": base + rng.normal(0.01, 0.02, 12),
                         "mdmt": base + rng.normal(0.03, 0.02, 12), "perm": base + rng.normal(0.015, 0.02, 12)},
                        index=BACKBONES[:12])


def test_friedman_and_cliques_give_the_earlier_values():
    result = friedman_holm(_reference_scores())
    assert result.statistic == pytest.approx(REFERENCE_FRIEDMAN["statistic"], rel=1e-12)
    assert result.p_value == pytest.approx(REFERENCE_FRIEDMAN["p"], rel=1e-12)
    assert result.critical_difference == pytest.approx(REFERENCE_FRIEDMAN["cd"], rel=1e-12)
    assert result.avg_ranks.to_dict() == pytest.approx(REFERENCE_FRIEDMAN["ranks"])
    np.testing.assert_allclose(result.pairwise["p_holm"], REFERENCE_FRIEDMAN["p_holm"], rtol=1e-12)
    # scikit-posthocs' cliques (groups sharing a letter of the compact letter display of the Nemenyi p-values)
    # are the earlier runs of methods whose average ranks differ by less than the CD
    assert result.cliques == REFERENCE_FRIEDMAN["groups"]
    ranks = result.avg_ranks
    for a in ranks.index:
        for b in ranks.index:
            if a != b:
                assert (result.nemenyi.loc[a, b] < 0.05) == (abs(ranks[a] - ranks[b]) > result.critical_difference)


def test_bootstrap_from_scipy_gives_the_earlier_intervals():
    # scipy's percentile bootstrap draws the same resamples from the same seeded generator as the earlier
    # hand-written loop, so the intervals agree to rounding; BCa (scipy's default) would move these bounds by
    # about 1e-4 on the 30-pair example, which is why the percentile method is kept
    rng = np.random.default_rng(4)
    b = rng.uniform(0.55, 0.7, 30)
    a = b + 0.02 + rng.normal(0, 0.01, 30)
    np.testing.assert_allclose(bootstrap_mean_diff_ci(a, b), REFERENCE_BOOTSTRAP_30, rtol=1e-9)
    five = bootstrap_mean_diff_ci([0.71, 0.66, 0.69, 0.74, 0.62], [0.65, 0.66, 0.61, 0.70, 0.63])
    np.testing.assert_allclose(five, REFERENCE_BOOTSTRAP_5, atol=1e-12)
    assert bootstrap_mean_diff_ci([0.7, 0.6, 0.5], [0.6, 0.5, 0.4]) == pytest.approx((0.1, 0.1, 0.1))


def test_bootstrap_ci_contains_truth_and_is_seeded():
    rng = np.random.default_rng(4)
    b = rng.uniform(0.55, 0.7, 30)
    a = b + 0.02 + rng.normal(0, 0.01, 30)
    mean, lower, upper = bootstrap_mean_diff_ci(a, b)
    assert mean == pytest.approx(np.mean(a - b))
    assert lower < 0.02 < upper and lower < mean < upper
    assert bootstrap_mean_diff_ci(a, b) == (mean, lower, upper)
    assert bootstrap_mean_diff_ci(a, b, seed=1) != (mean, lower, upper)
    reference = scipy_stats.bootstrap((a - b,), np.mean, n_resamples=10000, method="percentile",
                                      rng=np.random.default_rng(9)).confidence_interval
    assert lower == pytest.approx(reference.low, abs=1e-3) and upper == pytest.approx(reference.high, abs=1e-3)
    narrower = bootstrap_mean_diff_ci(a, b, confidence=0.5)
    assert lower < narrower[1] < narrower[2] < upper


def _rank_distance_pvalues(ranks: dict[str, float], cd: float) -> pd.DataFrame:
    """Nemenyi-like p-values: 0.01 where the average ranks differ by the CD or more, else 0.5."""
    names = list(ranks)
    return pd.DataFrame([[0.01 if abs(ranks[a] - ranks[b]) >= cd else 0.5 for b in names] for a in names],
                        index=names, columns=names)


def test_nemenyi_cliques():
    # the cases of the earlier hand-written grouping, with the same answers
    ranks = {"a": 1.0, "b": 1.5, "c": 3.0, "d": 3.2}
    for cd, expected in [(1.0, [("a", "b"), ("c", "d")]), (1.6, [("a", "b"), ("b", "c"), ("c", "d")]), (0.1, []),
                         (5.0, [("a", "b", "c", "d")])]:
        assert nemenyi_cliques(_rank_distance_pvalues(ranks, cd), ranks) == expected, cd


def test_cd_diagram_renders_png(tmp_path: Path):
    ranks = {"mdmt": 1.4, "ft": 2.1, "stl_prognosis": 2.9, "stl_severity": 3.6}
    cd = critical_difference(4, 18)
    figure = plot_critical_difference(ranks, _rank_distance_pvalues(ranks, cd), cd)
    out = tmp_path / "cd.png"
    figure.savefig(out, dpi=80)
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    labels = [t.get_text() for t in figure.axes[0].texts]
    assert "mdmt (1.40)" in labels and "CD = 1.11" in labels
