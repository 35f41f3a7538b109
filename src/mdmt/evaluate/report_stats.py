"""The report's statistics: what the paired tests pair, the significance table, the effects with bootstrap
intervals, and the Friedman tests behind the critical-difference diagrams.

Pairs are (proposed, baseline) strategies, kept when both have runs of the report's task. The tests pair the
backbones (matched by name) when there are ``MIN_PAIRED_BACKBONES`` or more, else the runs (matched by backbone,
fold and seed).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from mdmt.evaluate import stats
from mdmt.evaluate.report_tables import (
    PROTOCOL_LABELS,
    TaskView,
    column_label,
    format_value,
    order,
    strategy_order,
)

MIN_PAIRED_BACKBONES = 5
"""Below this many backbones a test over backbones has too few pairs; runs are paired instead."""
DEFAULT_COMPARISONS: list[tuple[str, str]] = [
    ("mdmt", "stl_prognosis"), ("mdmt", "stl_severity"), ("mdmt", "ft"), ("mdmt", "mdmt_permuted"), ("mdmt3", "mdmt"),
    ("mdmt_clinical", "mdmt"), ("mdmt_clinical", "clinical_only"),
]
"""(proposed, baseline) pairs the report compares when both have runs of the task."""
UNIT_COLUMNS = ["strategy", "backbone", "protocol", "metric", "mean", "std"]
EFFECT_COLUMNS = ["comparison", "proposed", "baseline", "protocol", "metric", "n", "wins", "mean_diff", "ci_low",
                  "ci_high", "p", "p_wilcoxon"]


def paired_units(per_backbone: pd.DataFrame, metrics: pd.DataFrame, names: Sequence[str]) -> tuple[pd.DataFrame, str]:
    """What the paired tests pair: backbones (the paper, when there are ``MIN_PAIRED_BACKBONES`` or more), else
    the runs, matched by backbone, fold and seed; only the metrics ``names``.

    Returns the long frame ``stats.significance_table`` takes (strategy, backbone, protocol, metric, mean, std;
    ``backbone`` names the unit) and a sentence saying what was paired.
    """
    headline = per_backbone[per_backbone["metric"].isin(list(names))]
    n_backbones = headline["backbone"].nunique()
    if n_backbones >= MIN_PAIRED_BACKBONES:
        return (headline[UNIT_COLUMNS],
                f"paired over {n_backbones} backbones (matched by name); σ = each backbone's std across folds")
    runs = metrics[metrics["metric"].isin(list(names))]
    unit = runs["backbone"] + " fold" + runs["fold"].astype(str) + " seed" + runs["seed"].astype(str)
    units = runs.assign(backbone=unit, mean=runs["value"], std=np.nan)
    return (units[UNIT_COLUMNS],
            f"only {n_backbones} backbone(s), fewer than {MIN_PAIRED_BACKBONES}: the tests pair the runs over "
            "backbones × folds × seeds (matched by backbone, fold and seed); the σ↓ rows need "
            f"{MIN_PAIRED_BACKBONES} or more backbones and are left out")


def present_comparisons(units: pd.DataFrame, comparisons: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """The pairs whose two strategies both have units."""
    have = set(units["strategy"])
    return [(a, b) for a, b in comparisons if a in have and b in have]


def common_units(units: pd.DataFrame, proposed: str, baseline: str) -> pd.DataFrame:
    """The units of the two strategies, restricted per protocol × metric to the units both have."""
    pair = units[units["strategy"].isin([proposed, baseline])]
    both = pair.groupby(["protocol", "metric", "backbone"])["strategy"].transform("nunique") == 2
    return pair[both]


def comparison_label(proposed: str, baseline: str) -> str:
    """``"MDMT − permuted MDMT"``."""
    return f"{stats.strategy_label(proposed)} − {stats.strategy_label(baseline)}"


def significance(units: pd.DataFrame, note: str, view: TaskView,
                 comparisons: Sequence[tuple[str, str]]) -> tuple[pd.DataFrame, str]:
    """``stats.significance_table`` (each pair, μ↑ and σ↓) over the paired units, and the note on what was paired."""
    pairs = present_comparisons(units, comparisons)
    if units.empty or not pairs:
        return pd.DataFrame(), "no pair of compared strategies has finished runs of this task"
    has_std = units["std"].notna().all()
    if not has_std and "σ↓" not in note:
        note += "; the σ↓ rows need at least 2 folds per backbone and are left out"
    # σ is undefined for single runs: a placeholder 0 lets the μ rows be computed, the σ rows are dropped below
    filled = units.fillna({"std": 0.0})
    tables = [stats.significance_table(common_units(filled, *pair), comparisons=[pair], metrics=list(view.headline),
                                       protocols=order(units["protocol"], PROTOCOL_LABELS),
                                       lower_is_better=view.lower_is_better) for pair in pairs]
    table = pd.concat(tables)
    means = table.index.str.startswith("Mean")
    table = table.loc[[*table.index[means], *table.index[~means]]]
    if not has_std:
        table = table[~table.index.str.startswith("Std")]
    return table, note


def effect_sizes(units: pd.DataFrame, view: TaskView, comparisons: Sequence[tuple[str, str]],
                 confidence: float = 0.95) -> pd.DataFrame:
    """Proposed − baseline mean difference per pair × protocol × metric with its paired bootstrap CI, wins (units
    where the proposed is better) and the one-tailed paired t-test and Wilcoxon p-values (H1: proposed better)."""
    rows = []
    protocols = order(units["protocol"], PROTOCOL_LABELS)
    for proposed, baseline in present_comparisons(units, comparisons):
        pair = common_units(units, proposed, baseline)
        for protocol in protocols:
            for metric in view.headline:
                group = pair[(pair["protocol"] == protocol) & (pair["metric"] == metric)]
                sides = {name: g.set_index("backbone")["mean"] for name, g in group.groupby("strategy")}
                if proposed not in sides:
                    continue
                _, first, second = stats.paired_by_name(sides[proposed], sides[baseline])
                if len(first) < 2:
                    continue
                diff, low, high = stats.bootstrap_mean_diff_ci(first, second, confidence=confidence)
                tests = stats.one_tailed_paired_tests(first, second,
                                                      stats.better_alternative(metric, view.lower_is_better))
                rows.append({"comparison": comparison_label(proposed, baseline), "proposed": proposed,
                             "baseline": baseline, "protocol": protocol, "metric": metric, "n": len(first),
                             "wins": int(tests["wins"]), "mean_diff": diff, "ci_low": low, "ci_high": high,
                             "p": tests["p"], "p_wilcoxon": tests["p_wilcoxon"]})
    return pd.DataFrame(rows, columns=EFFECT_COLUMNS)


def effects_display(effects: pd.DataFrame, view: TaskView) -> pd.DataFrame:
    """The effects as printed: the difference and its CI in points (% metrics ×100), p-values with stars."""
    if effects.empty:
        return pd.DataFrame()

    def signed(metric: str, value: float) -> str:
        text = format_value(metric, value, view)
        return text if text.startswith("-") else f"+{text}"

    return pd.DataFrame({
        "comparison": effects["comparison"],
        "column": [column_label(p, m, view.headline) for p, m in zip(effects["protocol"], effects["metric"])],
        "n": effects["n"], "wins": effects["wins"],
        "difference [CI]": [f"{signed(m, d)} [{signed(m, lo)}, {signed(m, hi)}]" for m, d, lo, hi in
                            zip(effects["metric"], effects["mean_diff"], effects["ci_low"], effects["ci_high"])],
        "t-test p (one-tailed)": [f"{p:.3g} {stats.stars(p)}" for p in effects["p"]],
        "Wilcoxon p": [f"{p:.3g}" for p in effects["p_wilcoxon"]],
    })


def significance_long(table: pd.DataFrame) -> pd.DataFrame:
    """The significance table as rows: comparison, protocol, metric, p, stars, p_wilcoxon, n."""
    if table.empty:
        return pd.DataFrame(columns=["comparison", "protocol", "metric", *stats.TABLE_FIELDS])
    long = table.stack(["protocol", "metric"], future_stack=True).reset_index()
    long = long.rename(columns={"level_0": "comparison"})
    return long[["comparison", "protocol", "metric", *stats.TABLE_FIELDS]]


def significance_display(table: pd.DataFrame, view: TaskView) -> pd.DataFrame:
    """Comparisons × "<protocol> <metric>" cells: stars with the t-test and Wilcoxon p-values."""
    long = significance_long(table)
    if long.empty:
        return pd.DataFrame()
    long["cell"] = [f"{s} (t p={p:.3g}; W p={w:.3g}; n={n})" if n else str(s)
                    for s, p, w, n in zip(long["stars"], long["p"], long["p_wilcoxon"], long["n"])]
    long["column"] = [column_label(p, m, view.headline) for p, m in zip(long["protocol"], long["metric"])]
    display = long.pivot(index="comparison", columns="column", values="cell")
    return display.reindex(index=list(dict.fromkeys(long["comparison"])), columns=list(dict.fromkeys(long["column"])))


def friedman_tests(units: pd.DataFrame, view: TaskView) -> tuple[dict[tuple[str, str], stats.FriedmanResult],
                                                                  list[str]]:
    """Friedman + Holm across strategies per protocol × headline metric (blocks = the paired units); and notes."""
    results: dict[tuple[str, str], stats.FriedmanResult] = {}
    notes: list[str] = []
    for (protocol, metric), rows in units.groupby(["protocol", "metric"], sort=False):
        scores = rows.pivot_table(index="backbone", columns="strategy", values="mean")
        complete = scores.dropna()
        where = column_label(protocol, metric, view.headline)
        if len(complete) < len(scores):
            notes.append(f"{where}: {len(scores) - len(complete)} block(s) without every strategy left out "
                         f"({', '.join(scores.index.difference(complete.index)[:10])})")
        if complete.shape[1] < 3 or len(complete) < 2:
            notes.append(f"{where}: Friedman needs ≥ 3 strategies and ≥ 2 complete blocks "
                         f"(have {complete.shape[1]} and {len(complete)})")
            continue
        results[(protocol, metric)] = stats.friedman_holm(complete[strategy_order(complete.columns)],
                                                          higher_is_better=metric not in view.lower_is_better)
    return results, notes


def cliques_frame(results: dict[tuple[str, str], stats.FriedmanResult], view: TaskView) -> pd.DataFrame:
    """Per protocol × metric, the groups of strategies no Nemenyi test tells apart (best-ranked first)."""
    rows = [{"column": column_label(p, m, view.headline), "not told apart": ", ".join(clique)}
            for (p, m), result in results.items() for clique in result.cliques]
    return pd.DataFrame(rows, columns=["column", "not told apart"])


def friedman_frame(results: dict[tuple[str, str], stats.FriedmanResult]) -> pd.DataFrame:
    """Holm-corrected pairwise Wilcoxon tests of every Friedman test, with its p-value and blocks."""
    frames = [r.pairwise.assign(protocol=p, metric=m, friedman_p=r.p_value, blocks=r.n_blocks)
              for (p, m), r in results.items()]
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, ignore_index=True)
    return out[["protocol", "metric", "friedman_p", "blocks", "a", "b", "mean_diff", "p", "p_holm"]]
