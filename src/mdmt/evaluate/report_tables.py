"""The report's tables: which metrics a task shows, the headline in both aggregations, per backbone, run counts.

The two aggregations of the headline: (a) ``per-fold mean``: per backbone the mean over folds and seeds, then the
mean over backbones; (b) ``pooled``: per backbone (and seed) the metrics of all folds' test predictions
concatenated, then the mean over seeds and backbones.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from mdmt.evaluate.scoring import score_table
from mdmt.tasks import REGIONS

PREFERRED_STRATEGIES: tuple[str, ...] = ("stl_prognosis", "stl_severity", "ft", "mdmt_permuted", "mdmt", "mdmt3")
"""Display order of strategies; others follow sorted by name."""
PROTOCOL_LABELS = {"cv5": "CV", "loco": "LOCO", "official-cv5": "official CV", "official-loco": "official LOCO"}
AGGREGATIONS = {"per-fold mean": "per backbone: mean over folds (and seeds); then mean over backbones",
                "pooled": "per backbone: all folds' test predictions pooled; then mean over seeds and backbones"}
CLASS_METRICS = {"accuracy": "ACC", "f1_weighted": "F1", "kappa_quadratic": "κ"}
REGRESSION_METRICS = {"mae": "MAE", "pearson_r": "r", "r2": "R²"}


@dataclass(frozen=True)
class TaskView:
    """What the report shows of a task: headline and detail metrics (name → column label), which of them are
    fractions printed in %, which are errors (lower is better), and which figures apply."""

    scorer: str
    headline: dict[str, str]
    detail: dict[str, str] = field(default_factory=dict)
    percent: frozenset[str] = frozenset()
    roc: bool = False
    confusion: bool = False

    @property
    def lower_is_better(self) -> frozenset[str]:
        """The error metrics (MAE, MSE) among the shown ones."""
        return frozenset(m for m in (*self.headline, *self.detail) if m.endswith(("mae", "mse")))


_FRACTIONS = ("accuracy", "f1_weighted", "gmean", "sensitivity", "specificity", "roc_auc")


def _view(scorer: str, headline: dict[str, str], detail: dict[str, str], **figures: bool) -> TaskView:
    percent = frozenset(m for m in (*headline, *detail) if m.endswith(_FRACTIONS))
    return TaskView(scorer, headline, detail, percent, **figures)


_LUNG_DETAIL = {f"{lung}_{m}": f"{label} {lung}" for lung in ("right", "left") for m, label in CLASS_METRICS.items()}
VIEWS: dict[str, TaskView] = {
    "binary": _view("binary", {"accuracy": "ACC", "f1_weighted": "F1", "gmean": "G-mean"},
                    {"roc_auc": "AUC", "sensitivity": "sensitivity", "specificity": "specificity"},
                    roc=True, confusion=True),
    "global4": _view("global4", CLASS_METRICS, {}, confusion=True),
    "lung4": _view("lung4", CLASS_METRICS, _LUNG_DETAIL, confusion=True),
    "regions": _view("regions", {**REGRESSION_METRICS, "global4_kappa_quadratic": "global κ"},
                     {**{f"region_{r}_mae": f"MAE {r}" for r in REGIONS}, "global_mae": "global MAE",
                      "region_accuracy": "region ACC"}),
    "regression": _view("regression", REGRESSION_METRICS, {}),
    "classification": _view("classification", CLASS_METRICS, {}, confusion=True),
}
"""The view of each scorer."""


# --------------------------------------------------------------------------------------------- ordering, labels
def order(values: Iterable[str], preferred: Iterable[str]) -> list[str]:
    """The distinct ``values``: those in ``preferred`` in its order, then the rest sorted."""
    present = list(dict.fromkeys(values))
    first = [v for v in preferred if v in present]
    return first + sorted(v for v in present if v not in first)


def strategy_order(values: Iterable[str]) -> list[str]:
    """Strategies in display order (``PREFERRED_STRATEGIES`` first)."""
    return order(values, PREFERRED_STRATEGIES)


def protocol_label(protocol: str) -> str:
    """The printed name of a protocol."""
    return PROTOCOL_LABELS.get(protocol, protocol)


def column_label(protocol: str, metric: str, labels: dict[str, str]) -> str:
    """``"<protocol> <metric>"`` as printed (``CV ACC``)."""
    return f"{protocol_label(protocol)} {labels.get(metric, metric)}"


def format_value(metric: str, value: float, view: TaskView) -> str:
    """A metric value as printed: fractions in % with one decimal, others with three decimals; "—" if missing."""
    if pd.isna(value):
        return "—"
    return f"{100 * value:.1f}" if metric in view.percent else f"{value:.3f}"


# --------------------------------------------------------------------------------------------- tables
def per_backbone_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """strategy, backbone, protocol, metric → mean over folds and seeds, std across folds (mean over seeds), runs."""
    keys = ["strategy", "backbone", "protocol", "metric"]
    per_seed = metrics.groupby([*keys, "seed"])["value"].agg(["mean", "std", "size"])
    out = per_seed.groupby(keys).agg(mean=("mean", "mean"), std=("std", "mean"), runs=("size", "sum"))
    return out.reset_index()


def wide_table(long: pd.DataFrame, metrics: dict[str, str], value: str = "mean") -> pd.DataFrame:
    """Rows of ``metrics`` in a long frame (strategy, protocol, metric, ``value``) → strategies × (protocol,
    metric) columns, in display order."""
    long = long[long["metric"].isin(list(metrics))]
    if long.empty:
        return pd.DataFrame()
    table = long.pivot_table(index="strategy", columns=["protocol", "metric"], values=value, aggfunc="mean")
    columns = [(p, m) for p in order(long["protocol"], PROTOCOL_LABELS) for m in metrics if (p, m) in table.columns]
    table = table.reindex(index=strategy_order(long["strategy"]), columns=pd.MultiIndex.from_tuples(columns))
    table.index.name = "strategy"
    return table


def labelled(table: pd.DataFrame, labels: dict[str, str]) -> pd.DataFrame:
    """A ``wide_table`` with its (protocol, metric) columns named as printed."""
    if table.empty:
        return table
    out = table.copy()
    out.columns = [column_label(p, m, labels) for p, m in table.columns]
    return out


def formatted(table: pd.DataFrame, view: TaskView, labels: dict[str, str]) -> pd.DataFrame:
    """A ``wide_table`` as printed text (``format_value`` per column's metric), columns labelled."""
    if table.empty:
        return table
    text = pd.DataFrame({(p, m): [format_value(m, v, view) for v in table[(p, m)]] for p, m in table.columns},
                        index=table.index)
    return labelled(text, labels)


def pooled_long(predictions: pd.DataFrame, entry: dict[str, Any], metrics: Iterable[str]) -> tuple[pd.DataFrame,
                                                                                                     list[str]]:
    """Aggregation (b) per backbone: metrics of the pooled test predictions per seed, then the mean over seeds;
    and a note for each group that could not be scored."""
    names = list(metrics)
    rows, notes = [], []
    for (strategy, backbone, protocol, seed), group in predictions.groupby(["strategy", "backbone", "protocol",
                                                                            "seed"]):
        try:
            values = score_table(entry, group)
        except ValueError as error:
            notes.append(f"pooled {strategy}/{backbone}/{protocol}/seed{seed} left out: {error}")
            continue
        rows += [{"strategy": strategy, "backbone": backbone, "protocol": protocol, "seed": seed, "metric": m,
                  "value": float(values[m])} for m in names if m in values]
    frame = pd.DataFrame(rows, columns=["strategy", "backbone", "protocol", "seed", "metric", "value"])
    return frame.groupby(["strategy", "backbone", "protocol", "metric"], as_index=False)["value"].mean(), notes


def aggregated_tables(per_backbone: pd.DataFrame, pooled: pd.DataFrame,
                      metrics: dict[str, str]) -> dict[str, pd.DataFrame]:
    """Both aggregations (mean over backbones) of ``metrics`` as wide tables, keyed by ``AGGREGATIONS``."""
    over_backbones = per_backbone.groupby(["strategy", "protocol", "metric"], as_index=False)["mean"].mean()
    over_pooled = pooled.groupby(["strategy", "protocol", "metric"], as_index=False)["value"].mean()
    return {"per-fold mean": wide_table(over_backbones, metrics, "mean"),
            "pooled": wide_table(over_pooled, metrics, "value")}


def headline_frame(tables: dict[str, pd.DataFrame], labels: dict[str, str]) -> pd.DataFrame:
    """The headline tables stacked for ``headline.csv``: aggregation, strategy, a column per protocol × metric."""
    frames = [labelled(t, labels).reset_index().assign(aggregation=name) for name, t in tables.items() if not t.empty]
    if not frames:
        return pd.DataFrame(columns=["aggregation", "strategy"])
    out = pd.concat(frames, ignore_index=True)
    return out[["aggregation", *[c for c in out.columns if c != "aggregation"]]]


def per_backbone_display(per_backbone: pd.DataFrame, view: TaskView) -> pd.DataFrame:
    """(backbone, strategy) × "<protocol> <metric>": "mean ± std" of the headline metrics as printed."""
    table = per_backbone[per_backbone["metric"].isin(list(view.headline))]
    if table.empty:
        return pd.DataFrame()

    def text(metric: str, value: float) -> str:
        return format_value(metric, value, view)

    cells = table.assign(
        cell=[f"{text(m, mean)} ± {text(m, std)}" if pd.notna(std) else text(m, mean)
              for m, mean, std in zip(table["metric"], table["mean"], table["std"])],
        column=[column_label(p, m, view.headline) for p, m in zip(table["protocol"], table["metric"])])
    wide = cells.pivot(index=["backbone", "strategy"], columns="column", values="cell")
    columns = [column_label(p, m, view.headline) for p in order(table["protocol"], PROTOCOL_LABELS)
               for m in view.headline]
    strategies = strategy_order(table["strategy"])
    rows = sorted(wide.index, key=lambda bs: (bs[0], strategies.index(bs[1])))
    return wide.reindex(index=rows, columns=[c for c in columns if c in wide.columns])


def run_counts(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs per strategy and status (done / running / failed / unreadable) with totals."""
    if runs.empty:
        return pd.DataFrame()
    counts = pd.crosstab(runs["strategy"], runs["status"], margins=True, margins_name="all")
    return counts.reindex(index=[*strategy_order(runs["strategy"]), "all"])


def problem_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Failed and unreadable runs with the last line of their error."""
    bad = runs[runs["status"].isin(["failed", "unreadable"])]
    last = [str(e).strip().splitlines()[-1] if isinstance(e, str) and e.strip() else "" for e in bad["error"]]
    return pd.DataFrame({"run": bad["key"].to_list(), "status": bad["status"].to_list(), "error": last})

