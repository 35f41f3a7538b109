"""Statistics over backbones: the paper's one-tailed paired tests, and beyond the paper a Friedman test with
Holm-corrected pairwise Wilcoxon tests, the Nemenyi critical difference, a paired bootstrap CI and the
critical-difference diagram.

Pairs are always matched by backbone name (the paper's official code paired them by directory listing order,
which pairs the wrong backbones whenever the listings differ). Holm's correction comes from statsmodels, the
bootstrap from scipy, the Nemenyi p-values, cliques and the diagram from scikit-posthocs.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import scikit_posthocs
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.transforms import offset_copy
from numpy.typing import ArrayLike
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests

Alternative = Literal["greater", "less"]
STRATEGY_LABELS: dict[str, str] = {
    "mdmt": "MDMT", "stl_prognosis": "STL", "stl_severity": "STL (severity)", "ft": "FT",
    "mdmt_permuted": "permuted MDMT", "mdmt3": "MDMT (3 datasets)",
}
"""Names the tables print for the built-in strategies (others print as given)."""
PAPER_COMPARISONS: tuple[tuple[str, str], ...] = (("mdmt", "stl_prognosis"), ("mdmt", "ft"))
"""The paper's (proposed, baseline) pairs."""
TABLE_FIELDS: tuple[str, ...] = ("p", "stars", "p_wilcoxon", "n")
"""Per-cell fields of ``significance_table``: t-test p, its stars, Wilcoxon p, number of paired backbones."""
PER_BACKBONE_COLUMNS: tuple[str, ...] = ("strategy", "backbone", "protocol", "metric", "mean", "std")
STAR_LEVELS: tuple[tuple[float, str], ...] = ((0.001, "***"), (0.01, "**"), (0.05, "*"))
NOT_SIGNIFICANT = "—"
MISSING = "n/a"


# --------------------------------------------------------------------------------------------- paired tests
def _as_series(values: Mapping[str, float] | pd.Series, side: str) -> pd.Series:
    series = values.copy() if isinstance(values, pd.Series) else pd.Series(dict(values), dtype=np.float64)
    series.index = series.index.astype(str)
    duplicated = series.index[series.index.duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(f"{side}: backbone names given more than once: {duplicated}")
    missing = series.index[series.isna()].tolist()
    if missing:
        raise ValueError(f"{side}: no value (NaN) for {missing}")
    return series.astype(np.float64)


def paired_by_name(
    a: Mapping[str, float] | pd.Series, b: Mapping[str, float] | pd.Series
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Match two per-backbone value sets by name → (sorted names, a values, b values).

    Raises ValueError naming the backbones present on one side only, given twice, or without a value.
    """
    first, second = _as_series(a, "first"), _as_series(b, "second")
    only_first = sorted(set(first.index) - set(second.index))
    only_second = sorted(set(second.index) - set(first.index))
    if only_first or only_second:
        raise ValueError(f"cannot pair by backbone name: only in the first set {only_first}, "
                         f"only in the second set {only_second}")
    names = sorted(first.index)
    return names, first[names].to_numpy(), second[names].to_numpy()


def stars(p: float) -> str:
    """Significance stars: *** p<0.001, ** p<0.01, * p<0.05, "—" otherwise (and for NaN)."""
    for level, mark in STAR_LEVELS:
        if p < level:
            return mark
    return NOT_SIGNIFICANT


PERMUTATION_MAX_PAIRS = 13
"""scipy's Wilcoxon test takes its exact permutation path up to this many pairs when there are ties or zeros."""


def wilcoxon(diff: np.ndarray, alternative: str) -> tuple[float, float]:
    """``scipy.stats.wilcoxon(diff, alternative=...)`` as ``(statistic, p)``: the same numbers, faster.

    With ties or zero differences and at most 13 pairs (accuracy differences on small folds), scipy enumerates
    all 2^n sign flips calling its statistic once per flip; here ``scipy.stats.permutation_test`` evaluates the
    same statistic (the positive rank sum) on all flips at once. Every other case is scipy's own call.
    """
    diff = np.asarray(diff, dtype=np.float64)
    nonzero = diff[diff != 0]
    tied = nonzero.size < diff.size or np.unique(np.abs(nonzero)).size < nonzero.size
    if not tied or diff.size > PERMUTATION_MAX_PAIRS:
        result = scipy_stats.wilcoxon(diff, alternative=alternative)
        return float(result.statistic), float(result.pvalue)

    def positive_rank_sum(d: np.ndarray, axis: int) -> np.ndarray:
        return scipy_stats.wilcoxon(d, alternative="greater", method="asymptotic", axis=axis).statistic

    statistic = scipy_stats.wilcoxon(diff, alternative=alternative, method="asymptotic").statistic
    p = scipy_stats.permutation_test((diff,), positive_rank_sum, permutation_type="samples", vectorized=True,
                                     n_resamples=np.inf, alternative=alternative, axis=-1).pvalue
    return float(statistic), float(p)


def one_tailed_paired_tests(
    better: ArrayLike, worse: ArrayLike, alternative: Alternative = "greater"
) -> dict[str, float]:
    """Paired t-test and Wilcoxon signed-rank test of H1: ``better - worse`` > 0 (``greater``) or < 0 (``less``).

    Returns t_statistic, p (t-test), wilcoxon_statistic, p_wilcoxon, mean_diff (better − worse), wins (pairs whose
    difference points the way of H1), n. Undefined tests (n < 2, all differences zero) give NaN p-values.
    """
    first, second = np.asarray(better, dtype=np.float64), np.asarray(worse, dtype=np.float64)
    if first.shape != second.shape or first.ndim != 1:
        raise ValueError(f"paired vectors must be 1-D of the same length, got {first.shape} and {second.shape}")
    if alternative not in ("greater", "less"):
        raise ValueError(f"alternative must be 'greater' or 'less', not {alternative!r}")
    diff = first - second
    t_stat = t_p = w_stat = w_p = float("nan")
    with warnings.catch_warnings():  # scipy warns on degenerate inputs; they come back as NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        if diff.size >= 2:
            t_stat, t_p = scipy_stats.ttest_rel(first, second, alternative=alternative)
        if np.any(diff != 0):
            w_stat, w_p = wilcoxon(diff, alternative)
    sign = 1.0 if alternative == "greater" else -1.0
    return {
        "t_statistic": float(t_stat), "p": float(t_p), "wilcoxon_statistic": float(w_stat), "p_wilcoxon": float(w_p),
        "mean_diff": float(diff.mean()) if diff.size else float("nan"),
        "wins": float(np.sum(sign * diff > 0)), "n": float(diff.size),
    }


def strategy_label(strategy: str) -> str:
    """The printed name of a strategy (``STRATEGY_LABELS``, else the name itself)."""
    return STRATEGY_LABELS.get(strategy, strategy)


def better_alternative(metric: str, lower_is_better: Collection[str]) -> Alternative:
    """The one-tailed alternative of "the first is better" for ``metric``: ``greater`` unless lower is better."""
    return "less" if metric in lower_is_better else "greater"


def significance_table(
    per_backbone: pd.DataFrame,
    comparisons: Sequence[tuple[str, str]] = PAPER_COMPARISONS,
    metrics: Sequence[str] = ("accuracy", "f1_weighted", "gmean"),
    protocols: Sequence[str] = ("cv5", "loco"),
    lower_is_better: Collection[str] = (),
) -> pd.DataFrame:
    """The paper's significance table: is the proposed strategy of each (proposed, baseline) pair the better one?

    Input: a long frame with columns strategy, backbone, protocol, metric, mean, std — one row per
    strategy × backbone × protocol × metric, ``mean``/``std`` taken over that backbone's folds.
    Rows: "Mean (μ↑) MDMT vs STL", …, then "Std (σ↓) MDMT vs STL", … — one-tailed paired tests over backbones
    (paired by name) of the means (H1: proposed better: higher, or lower for a metric in ``lower_is_better``)
    and of the stds (H1: proposed lower). Columns: (protocol, metric, field) with fields ``TABLE_FIELDS``. A pair
    with no rows for a protocol × metric holds p = NaN, stars "n/a", n = 0.
    """
    missing = [c for c in PER_BACKBONE_COLUMNS if c not in per_backbone.columns]
    if missing:
        raise ValueError(f"per_backbone lacks columns {missing} (has {list(per_backbone.columns)})")
    keys = ["strategy", "protocol", "metric", "backbone"]
    duplicated = per_backbone[per_backbone.duplicated(keys, keep=False)]
    if not duplicated.empty:
        raise ValueError(f"per_backbone has several rows for {duplicated[keys].drop_duplicates().values.tolist()[:5]}")
    indexed = per_backbone.set_index(keys)[["mean", "std"]].sort_index()
    available = set(indexed.index.droplevel("backbone"))
    statistics = {"Mean (μ↑)": "mean", "Std (σ↓)": "std"}
    rows: dict[str, dict[tuple[str, str, str], object]] = {}
    for (title, column), (proposed, baseline) in itertools.product(statistics.items(), comparisons):
        cells: dict[tuple[str, str, str], object] = {}
        for protocol, metric in itertools.product(protocols, metrics):
            sides = [(s, protocol, metric) for s in (proposed, baseline)]
            if not all(side in available for side in sides):
                values: dict[str, object] = {"p": float("nan"), "stars": MISSING, "p_wilcoxon": float("nan"), "n": 0}
            else:
                _, first, second = paired_by_name(indexed.loc[sides[0], column], indexed.loc[sides[1], column])
                alternative = better_alternative(metric, lower_is_better) if column == "mean" else "less"
                result = one_tailed_paired_tests(first, second, alternative)
                values = {"p": result["p"], "stars": stars(result["p"]), "p_wilcoxon": result["p_wilcoxon"],
                          "n": int(result["n"])}
            cells |= {(protocol, metric, field): values[field] for field in TABLE_FIELDS}
        rows[f"{title} {strategy_label(proposed)} vs {strategy_label(baseline)}"] = cells
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.columns = pd.MultiIndex.from_tuples(table.columns, names=["protocol", "metric", "field"])
    return table


# --------------------------------------------------------------------------------------------- beyond the paper
def holm(pvalues: ArrayLike) -> np.ndarray:
    """Holm step-down adjusted p-values, in the input order (monotone, capped at 1)."""
    return np.asarray(multipletests(np.asarray(pvalues, dtype=np.float64), method="holm")[1], dtype=np.float64)


def critical_difference(k: int, n: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference of average ranks for k methods on n blocks (Demšar 2006)."""
    if k < 2 or n < 1:
        raise ValueError(f"critical_difference needs k >= 2 methods and n >= 1 blocks, got k={k}, n={n}")
    q_alpha = scipy_stats.studentized_range.ppf(1 - alpha, k, np.inf) / np.sqrt(2)
    return float(q_alpha * np.sqrt(k * (k + 1) / (6 * n)))


@dataclass(frozen=True)
class FriedmanResult:
    """Friedman test over blocks with average ranks (1 = best), Holm-corrected pairwise Wilcoxon tests, the
    Nemenyi p-values (strategy × strategy) and critical difference."""

    statistic: float
    p_value: float
    avg_ranks: pd.Series  # strategy → average rank, best first
    pairwise: pd.DataFrame  # a, b, mean_diff (a − b), p, p_holm
    nemenyi: pd.DataFrame  # strategy × strategy Nemenyi p-values
    critical_difference: float
    n_blocks: int
    alpha: float

    @property
    def cliques(self) -> list[tuple[str, ...]]:
        """Groups of two or more strategies that no Nemenyi test at ``alpha`` tells apart."""
        return nemenyi_cliques(self.nemenyi, self.avg_ranks.to_dict(), self.alpha)


def friedman_holm(scores: pd.DataFrame, higher_is_better: bool = True, alpha: float = 0.05) -> FriedmanResult:
    """Friedman test of ``scores`` (rows = blocks such as backbones or backbone × fold, columns = strategies).

    Ranks within each block (ties share the average rank), pairwise two-sided Wilcoxon signed-rank p-values with
    Holm's correction over all pairs (a pair with identical scores in every block gets p = 1), the Nemenyi
    post-hoc p-values (scikit-posthocs) and the Nemenyi CD at ``alpha``.
    """
    if scores.shape[1] < 3:
        raise ValueError(f"the Friedman test needs at least 3 strategies, got {list(scores.columns)}; "
                         f"use one_tailed_paired_tests for two")
    incomplete = scores.index[scores.isna().any(axis=1)].tolist()
    if incomplete:
        raise ValueError(f"scores have missing values for blocks {incomplete[:10]}")
    values = scores.to_numpy(np.float64)
    statistic, p_value = scipy_stats.friedmanchisquare(*values.T)
    ranks = scores.rank(axis=1, ascending=not higher_is_better).mean().sort_values()
    pairs = list(itertools.combinations(scores.columns, 2))
    p_pairs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for a, b in pairs:
            diff = scores[a] - scores[b]
            p_pairs.append(wilcoxon(diff.to_numpy(np.float64), "two-sided")[1] if diff.any() else 1.0)
    pairwise = pd.DataFrame({
        "a": [a for a, _ in pairs], "b": [b for _, b in pairs],
        "mean_diff": [float((scores[a] - scores[b]).mean()) for a, b in pairs],
        "p": p_pairs, "p_holm": holm(p_pairs),
    })
    nemenyi = scikit_posthocs.posthoc_nemenyi_friedman(values)
    nemenyi.index = nemenyi.columns = list(scores.columns)
    return FriedmanResult(float(statistic), float(p_value), ranks, pairwise, nemenyi,
                          critical_difference(scores.shape[1], scores.shape[0], alpha), scores.shape[0], alpha)


def bootstrap_mean_diff_ci(
    a: ArrayLike, b: ArrayLike, n_boot: int = 10000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Paired percentile bootstrap of mean(a − b) (``scipy.stats.bootstrap`` on the differences) → (observed mean
    difference, lower, upper); seeded."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diff.ndim != 1 or diff.size < 2 or np.isnan(diff).any():
        raise ValueError(f"bootstrap needs two paired 1-D vectors of >= 2 values without NaN, got {diff.shape}")
    with warnings.catch_warnings():  # identical differences: a zero-width interval is the answer
        warnings.simplefilter("ignore", scipy_stats.DegenerateDataWarning)
        interval = scipy_stats.bootstrap((diff,), np.mean, n_resamples=n_boot, confidence_level=confidence,
                                         method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    return float(diff.mean()), float(interval.low), float(interval.high)


# --------------------------------------------------------------------------------------------- CD diagram
def nemenyi_cliques(
    pvalues: pd.DataFrame, avg_ranks: Mapping[str, float], alpha: float = 0.05
) -> list[tuple[str, ...]]:
    """Groups (≥ 2 members, each ordered by rank, groups by best rank) that share a letter in scikit-posthocs'
    compact letter display of ``pvalues``: no pair inside a group differs at ``alpha``."""
    letters = scikit_posthocs.compact_letter_display(pvalues, alpha=alpha)
    width = max(len(text) for text in letters)
    groups = []
    for position in range(width):
        members = [name for name, text in letters.items() if len(text) > position and text[position] != " "]
        if len(members) > 1:
            groups.append(tuple(sorted(members, key=lambda name: (avg_ranks[name], name))))
    return sorted(set(groups), key=lambda group: [avg_ranks[name] for name in group])


def plot_critical_difference(
    avg_ranks: Mapping[str, float], pvalues: pd.DataFrame, cd: float, alpha: float = 0.05, ax: Axes | None = None
) -> Figure:
    """The critical-difference diagram (Demšar 2006, drawn by scikit-posthocs): each method on the rank axis
    (1 = best) with its name, thick bars joining methods whose Nemenyi ``pvalues`` are not below ``alpha``, and
    the CD as a bar above the axis."""
    if len(avg_ranks) < 2:
        raise ValueError("a critical-difference diagram needs at least two methods")
    if ax is None:
        width = 3.0 + 0.9 * len(avg_ranks) + 0.12 * max(len(name) for name in avg_ranks)
        ax = Figure(figsize=(width, 1.4 + 0.3 * len(avg_ranks)), layout="constrained").add_subplot()
    names = list(avg_ranks)
    scikit_posthocs.critical_difference_diagram(
        pd.Series(avg_ranks, dtype=np.float64), pvalues.loc[names, names], alpha=alpha, ax=ax,
        label_fmt_left="{label} ({rank:.2f})", label_fmt_right="({rank:.2f}) {label}",
        label_props={"fontsize": 9}, text_h_margin=0.3,
    )
    best = min(avg_ranks.values())
    figure = ax.figure
    above_ticks = offset_copy(ax.transData, fig=figure, y=26, units="points")  # clear of the rank labels
    ax.plot([best, best + cd], [0, 0], color="black", lw=1.5, transform=above_ticks, clip_on=False)
    ax.text(best + cd / 2, 0, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=9, clip_on=False,
            transform=offset_copy(ax.transData, fig=figure, y=29, units="points"))
    return figure
