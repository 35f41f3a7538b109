"""Statistics over backbones: the paper's one-tailed paired tests (method.md §9.3), and beyond the paper a Friedman
test with Holm-corrected pairwise Wilcoxon tests, the Nemenyi critical difference, a paired bootstrap CI and the
critical-difference diagram.

Pairs are always matched by backbone name (the official code paired by ``os.listdir`` order, method.md §12.7).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from numpy.typing import ArrayLike
from scipy import stats as scipy_stats

Alternative = Literal["greater", "less"]
STRATEGY_LABELS: dict[str, str] = {"mdmt": "MDMT", "stl_prognosis": "STL", "ft": "FT"}
"""Names the significance table prints for the paper's strategies (others print as given)."""
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
            w_stat, w_p = scipy_stats.wilcoxon(first, second, alternative=alternative)
    sign = 1.0 if alternative == "greater" else -1.0
    return {
        "t_statistic": float(t_stat), "p": float(t_p), "wilcoxon_statistic": float(w_stat), "p_wilcoxon": float(w_p),
        "mean_diff": float(diff.mean()) if diff.size else float("nan"),
        "wins": float(np.sum(sign * diff > 0)), "n": float(diff.size),
    }


def _label(strategy: str) -> str:
    return STRATEGY_LABELS.get(strategy, strategy)


def significance_table(
    per_backbone: pd.DataFrame,
    reference: str = "mdmt",
    comparisons: Sequence[str] = ("stl_prognosis", "ft"),
    metrics: Sequence[str] = ("accuracy", "f1_weighted", "gmean"),
    protocols: Sequence[str] = ("cv5", "loco"),
) -> pd.DataFrame:
    """The paper's significance table (README2): is ``reference`` better than each comparison strategy?

    Input: a long frame with columns strategy, backbone, protocol, metric, mean, std — one row per
    strategy × backbone × protocol × metric, ``mean``/``std`` taken over that backbone's folds.
    Rows: "Mean (μ↑) MDMT vs STL", "Mean (μ↑) MDMT vs FT", "Std (σ↓) MDMT vs STL", "Std (σ↓) MDMT vs FT" —
    one-tailed paired tests over backbones (paired by name) of the means (H1: reference higher) and of the
    stds (H1: reference lower). Columns: (protocol, metric, field) with fields ``TABLE_FIELDS``. A comparison with
    no rows for a protocol × metric holds p = NaN, stars "n/a", n = 0.
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
    statistics = {"Mean (μ↑)": ("mean", "greater"), "Std (σ↓)": ("std", "less")}
    rows: dict[str, dict[tuple[str, str, str], object]] = {}
    for (title, (column, alternative)), other in itertools.product(statistics.items(), comparisons):
        cells: dict[tuple[str, str, str], object] = {}
        for protocol, metric in itertools.product(protocols, metrics):
            sides = [(s, protocol, metric) for s in (reference, other)]
            if not all(side in available for side in sides):
                values: dict[str, object] = {"p": float("nan"), "stars": MISSING, "p_wilcoxon": float("nan"), "n": 0}
            else:
                _, ref, cmp_ = paired_by_name(indexed.loc[sides[0], column], indexed.loc[sides[1], column])
                result = one_tailed_paired_tests(ref, cmp_, alternative)
                values = {"p": result["p"], "stars": stars(result["p"]), "p_wilcoxon": result["p_wilcoxon"],
                          "n": int(result["n"])}
            cells |= {(protocol, metric, field): values[field] for field in TABLE_FIELDS}
        rows[f"{title} {_label(reference)} vs {_label(other)}"] = cells
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.columns = pd.MultiIndex.from_tuples(table.columns, names=["protocol", "metric", "field"])
    return table


# --------------------------------------------------------------------------------------------- beyond the paper
def holm(pvalues: ArrayLike) -> np.ndarray:
    """Holm step-down adjusted p-values, in the input order (monotone, capped at 1)."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (p.size - np.arange(p.size))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(np.maximum.accumulate(scaled), 1.0)
    return adjusted


def critical_difference(k: int, n: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference of average ranks for k methods on n blocks (Demšar 2006)."""
    if k < 2 or n < 1:
        raise ValueError(f"critical_difference needs k >= 2 methods and n >= 1 blocks, got k={k}, n={n}")
    q_alpha = scipy_stats.studentized_range.ppf(1 - alpha, k, np.inf) / np.sqrt(2)
    return float(q_alpha * np.sqrt(k * (k + 1) / (6 * n)))


@dataclass(frozen=True)
class FriedmanResult:
    """Friedman test over blocks with average ranks (1 = best), Holm-corrected pairwise Wilcoxon tests and the
    Nemenyi critical difference."""

    statistic: float
    p_value: float
    avg_ranks: pd.Series  # strategy → average rank, best first
    pairwise: pd.DataFrame  # a, b, mean_diff (a − b), p, p_holm
    critical_difference: float
    n_blocks: int
    alpha: float


def friedman_holm(scores: pd.DataFrame, higher_is_better: bool = True, alpha: float = 0.05) -> FriedmanResult:
    """Friedman test of ``scores`` (rows = blocks such as backbones or backbone × fold, columns = strategies).

    Ranks within each block (ties share the average rank), pairwise two-sided Wilcoxon signed-rank p-values with
    Holm's correction over all pairs (a pair with identical scores in every block gets p = 1), and the Nemenyi
    CD at ``alpha``.
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
            p_pairs.append(float(scipy_stats.wilcoxon(scores[a], scores[b]).pvalue) if diff.any() else 1.0)
    pairwise = pd.DataFrame({
        "a": [a for a, _ in pairs], "b": [b for _, b in pairs],
        "mean_diff": [float((scores[a] - scores[b]).mean()) for a, b in pairs],
        "p": p_pairs, "p_holm": holm(p_pairs),
    })
    return FriedmanResult(float(statistic), float(p_value), ranks, pairwise,
                          critical_difference(scores.shape[1], scores.shape[0], alpha), scores.shape[0], alpha)


def bootstrap_mean_diff_ci(
    a: ArrayLike, b: ArrayLike, n_boot: int = 10000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Paired percentile bootstrap of mean(a − b) → (observed mean difference, lower, upper); seeded."""
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if diff.ndim != 1 or diff.size < 2 or np.isnan(diff).any():
        raise ValueError(f"bootstrap needs two paired 1-D vectors of >= 2 values without NaN, got {diff.shape}")
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(n_boot, diff.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    lower, upper = np.quantile(means, [tail, 1 - tail])
    return float(diff.mean()), float(lower), float(upper)


# --------------------------------------------------------------------------------------------- CD diagram
def nemenyi_groups(avg_ranks: Mapping[str, float], cd: float) -> list[tuple[str, ...]]:
    """Maximal runs of methods (ordered by rank) whose average ranks differ by less than ``cd`` (≥ 2 members)."""
    names = sorted(avg_ranks, key=lambda name: (avg_ranks[name], name))
    ranks = [avg_ranks[name] for name in names]
    groups: list[tuple[str, ...]] = []
    last_end = 0
    for start in range(len(names)):
        end = start
        while end + 1 < len(names) and ranks[end + 1] - ranks[start] < cd:
            end += 1
        if end > start and end > last_end:
            groups.append(tuple(names[start:end + 1]))
            last_end = end
    return groups


def plot_critical_difference(avg_ranks: Mapping[str, float], cd: float, ax: Axes | None = None) -> Figure:
    """The critical-difference diagram (Demšar 2006): a rank axis (1 = best, on the left), each method a line to its
    name, the CD as a bar above the axis, and thick bars joining methods not significantly different."""
    if len(avg_ranks) < 2:
        raise ValueError("a critical-difference diagram needs at least two methods")
    names = sorted(avg_ranks, key=lambda name: (avg_ranks[name], name))
    k = len(names)
    low, high = 1, max(k, int(np.ceil(max(avg_ranks.values()))))
    groups = nemenyi_groups(avg_ranks, cd)
    half = (k + 1) // 2
    label_top = 0.3 + 0.15 * len(groups)
    axis_inches = max(3.0, 0.8 * (high - low))
    label_inches = 0.45 + 0.085 * max(len(f"{name} (0.00)") for name in names)  # ~0.085 in per 9-pt character
    if ax is None:
        figure = Figure(figsize=(axis_inches + 2 * label_inches, 1.4 + 0.3 * half))
        ax = figure.add_axes((0.0, 0.0, 1.0, 1.0))
    margin = (high - low) * label_inches / axis_inches
    ax.set_xlim(low - margin, high + margin)
    ax.set_ylim(label_top + 0.25 * half + 0.2, -0.9)
    ax.axis("off")
    ax.hlines(0, low, high, color="black", lw=1)
    for tick in range(low, high + 1):
        ax.vlines(tick, -0.08, 0, color="black", lw=1)
        ax.text(tick, -0.12, str(tick), ha="center", va="bottom", fontsize=9)
    ax.hlines(-0.6, low, low + cd, color="black", lw=1.5)
    ax.vlines([low, low + cd], -0.65, -0.55, color="black", lw=1.5)
    ax.text(low + cd / 2, -0.68, f"CD = {cd:.2f}", ha="center", va="bottom", fontsize=9)
    for position, name in enumerate(names):
        rank = avg_ranks[name]
        left = position < half
        depth = label_top + 0.25 * (position if left else k - 1 - position)
        edge = low - 0.3 * (high - low) / axis_inches if left else high + 0.3 * (high - low) / axis_inches
        ax.plot([rank, rank, edge], [0, depth, depth], color="black", lw=0.8)
        ax.text(edge + (-0.05 if left else 0.05), depth, f"{name} ({rank:.2f})", ha="right" if left else "left",
                va="center", fontsize=9)
    for level, group in enumerate(groups):
        y = 0.2 + 0.15 * level
        ax.hlines(y, avg_ranks[group[0]] - 0.03, avg_ranks[group[-1]] + 0.03, color="black", lw=3)
    return ax.figure
