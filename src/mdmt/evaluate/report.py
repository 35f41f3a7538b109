"""The study's report, rebuilt from the run directories alone (no training).

``build_report`` rescans the results store and writes, into ``<results_dir>/report`` (or ``out_dir``):

- ``headline.csv``: the paper's table, strategies × {CV, LOCO} × {ACC, F1, G-mean}, in two aggregations
  (method.md §9.2): (a) ``per-fold mean``: per backbone the mean over folds and seeds, then the mean over
  backbones; (b) ``pooled``: per backbone (and seed) the metrics of all folds' test predictions concatenated,
  then the mean over seeds and backbones;
- ``per_backbone.csv``: strategy, backbone, protocol, metric, mean and std across folds (std per seed, averaged
  over seeds), runs;
- ``effects.csv``: MDMT − STL and MDMT − FT mean differences with paired bootstrap 95% CIs.
- ``significance.csv``: MDMT vs STL and MDMT vs FT, μ↑ and σ↓, one-tailed paired t-test with stars and Wilcoxon,
  paired over backbones (or over folds × seeds when fewer than two backbones exist, said on the page);
- ``report.html`` (self-contained: figures embedded as base64 PNG) and ``report.md``.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mdmt.evaluate import metrics as metrics_lib  # noqa: E402
from mdmt.evaluate import stats  # noqa: E402
from mdmt.experiments.store import HISTORY_FILE, ResultsStore  # noqa: E402
from mdmt.train.strategies import STRATEGIES  # noqa: E402

HEADLINE_METRICS = {"accuracy": "ACC", "f1_weighted": "F1", "gmean": "G-mean"}
PROTOCOL_LABELS = {"cv5": "CV", "loco": "LOCO", "official-cv5": "official CV", "official-loco": "official LOCO"}
PROPOSED = "mdmt"
MIN_PAIRED_BACKBONES = 5
"""Below this many backbones a test over backbones has too few pairs; runs are paired instead."""
BASELINES = ("stl_prognosis", "ft")
AGGREGATIONS = {"per-fold mean": "per backbone: mean over folds (and seeds); then mean over backbones",
                "pooled": "per backbone: all folds' test predictions pooled; then mean over seeds and backbones"}
REPORT_DIR = "report"
SCORE_COLUMNS = ("y_true", "score", "y_pred")
"""Prediction columns of a binary task scored by P(positive) (the prognosis contract)."""


# --------------------------------------------------------------------------------------------- tables
def _order(values: pd.Series, preferred: list[str]) -> list[str]:
    present = list(dict.fromkeys(values))
    return [v for v in preferred if v in present] + sorted(v for v in present if v not in preferred)


def _label(protocol: str, metric: str) -> str:
    return f"{PROTOCOL_LABELS.get(protocol, protocol)} {HEADLINE_METRICS.get(metric, metric)}"


def per_backbone_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """strategy, backbone, protocol, metric → mean over folds and seeds, std across folds (mean over seeds), runs."""
    keys = ["strategy", "backbone", "protocol", "metric"]
    per_seed = metrics.groupby([*keys, "seed"])["value"].agg(["mean", "std", "size"])
    out = per_seed.groupby(keys).agg(mean=("mean", "mean"), std=("std", "mean"), runs=("size", "sum"))
    return out.reset_index()


def wide_table(long: pd.DataFrame, value: str = "mean") -> pd.DataFrame:
    """Headline-metric rows of a long frame (strategy, protocol, metric, ``value``) → strategies × "<protocol>
    <metric>" columns."""
    long = long[long["metric"].isin(list(HEADLINE_METRICS))]
    if long.empty:
        return pd.DataFrame()
    table = long.pivot_table(index="strategy", columns=["protocol", "metric"], values=value, aggfunc="mean")
    columns = [(p, m) for p in _order(long["protocol"], list(PROTOCOL_LABELS)) for m in HEADLINE_METRICS
               if (p, m) in table.columns]
    table = table.reindex(index=_order(long["strategy"], list(STRATEGIES)), columns=columns)
    table.columns = [_label(p, m) for p, m in columns]
    table.index.name = "strategy"
    return table


def pooled_long(predictions: pd.DataFrame) -> pd.DataFrame:
    """Aggregation (b) per backbone: metrics of the pooled test predictions per seed, then the mean over seeds."""
    rows = []
    for (strategy, backbone, protocol, seed), group in predictions.groupby(["strategy", "backbone", "protocol",
                                                                            "seed"]):
        values = metrics_lib.prognosis_metrics(group["y_true"].to_numpy(), group["score"].to_numpy())
        rows += [{"strategy": strategy, "backbone": backbone, "protocol": protocol, "seed": seed, "metric": m,
                  "value": float(values[m])} for m in HEADLINE_METRICS if m in values]
    frame = pd.DataFrame(rows, columns=["strategy", "backbone", "protocol", "seed", "metric", "value"])
    return frame.groupby(["strategy", "backbone", "protocol", "metric"], as_index=False)["value"].mean()


def headline_tables(per_backbone: pd.DataFrame, predictions: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Both aggregations of the headline table (mean over backbones), keyed by ``AGGREGATIONS``."""
    over_backbones = per_backbone.groupby(["strategy", "protocol", "metric"], as_index=False)["mean"].mean()
    pooled = pooled_long(predictions).groupby(["strategy", "protocol", "metric"], as_index=False)["value"].mean()
    return {"per-fold mean": wide_table(over_backbones, "mean"), "pooled": wide_table(pooled, "value")}


def headline_frame(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The headline tables stacked for ``headline.csv``: aggregation, strategy, a column per protocol × metric."""
    frames = [t.reset_index().assign(aggregation=name) for name, t in tables.items() if not t.empty]
    if not frames:
        return pd.DataFrame(columns=["aggregation", "strategy"])
    out = pd.concat(frames, ignore_index=True)
    return out[["aggregation", *[c for c in out.columns if c != "aggregation"]]]


# --------------------------------------------------------------------------------------------- figures
def _strategy_colors(strategies: list[str]) -> dict[str, tuple[float, ...]]:
    palette = plt.get_cmap("tab10")
    return {name: palette(i % 10) for i, name in enumerate(_order(pd.Series(strategies), list(STRATEGIES)))}


def roc_figure(predictions: pd.DataFrame) -> Figure:
    """ROC curves of each strategy's pooled test predictions (all backbones, folds, seeds), a panel per protocol."""
    protocols = _order(predictions["protocol"], list(PROTOCOL_LABELS))
    colors = _strategy_colors(list(predictions["strategy"].unique()))
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.8 * len(protocols), 4.4), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        rows = predictions[predictions["protocol"] == protocol]
        for strategy in _order(rows["strategy"], list(STRATEGIES)):
            group = rows[rows["strategy"] == strategy]
            if group["y_true"].nunique() < 2:
                continue
            curve = metrics_lib.roc_curve_points(group["y_true"], group["score"])
            auc = metrics_lib.prognosis_metrics(group["y_true"], group["score"])["roc_auc"]
            ax.plot(curve["fpr"], curve["tpr"], color=colors[strategy],
                    label=f"{strategy} (AUC {auc:.3f}, n={len(group)})")
        ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=0.8)
        ax.set(title=f"ROC, {PROTOCOL_LABELS.get(protocol, protocol)} (pooled)", xlabel="1 − specificity",
               ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def confusion_figure(predictions: pd.DataFrame) -> Figure:
    """Pooled confusion matrices (MILD/SEVERE), strategies × protocols."""
    strategies = _order(predictions["strategy"], list(STRATEGIES))
    protocols = _order(predictions["protocol"], list(PROTOCOL_LABELS))
    fig, axes = plt.subplots(len(strategies), len(protocols), figsize=(3.2 * len(protocols), 3.0 * len(strategies)),
                             squeeze=False)
    names = ["MILD", "SEVERE"]
    for i, strategy in enumerate(strategies):
        for j, protocol in enumerate(protocols):
            ax = axes[i][j]
            rows = predictions[(predictions["strategy"] == strategy) & (predictions["protocol"] == protocol)]
            ax.set_title(f"{strategy}, {PROTOCOL_LABELS.get(protocol, protocol)}", fontsize=9)
            ax.set_xticks([0, 1], names)
            ax.set_yticks([0, 1], names)
            ax.set(xlabel="predicted", ylabel="true")
            if rows.empty:
                continue
            counts = metrics_lib.confusion(rows["y_true"], rows["y_pred"], labels=[0, 1]).to_numpy()
            ax.imshow(counts, cmap="Blues", vmin=0)
            for (t, p), count in np.ndenumerate(counts):
                ax.text(p, t, str(count), ha="center", va="center",
                        color="white" if count > counts.max() / 2 else "black")
    fig.tight_layout()
    return fig


def per_backbone_figure(per_backbone: pd.DataFrame) -> Figure:
    """Mean ± std across folds of ACC, F1 and G-mean per backbone and strategy; a row of panels per protocol."""
    table = per_backbone[per_backbone["metric"].isin(list(HEADLINE_METRICS))]
    protocols = _order(table["protocol"], list(PROTOCOL_LABELS))
    backbones = sorted(table["backbone"].unique())
    strategies = _order(table["strategy"], list(STRATEGIES))
    colors = _strategy_colors(strategies)
    width = max(4.0, 0.55 * len(backbones) + 2)
    fig, axes = plt.subplots(len(protocols), len(HEADLINE_METRICS), figsize=(width * len(HEADLINE_METRICS),
                             3.4 * len(protocols)), squeeze=False)
    offsets = np.linspace(-0.25, 0.25, len(strategies)) if len(strategies) > 1 else np.zeros(1)
    x = np.arange(len(backbones))
    for i, protocol in enumerate(protocols):
        for j, (metric, label) in enumerate(HEADLINE_METRICS.items()):
            ax = axes[i][j]
            for offset, strategy in zip(offsets, strategies):
                rows = table[(table["protocol"] == protocol) & (table["metric"] == metric) &
                             (table["strategy"] == strategy)].set_index("backbone").reindex(backbones)
                ax.errorbar(x + offset, rows["mean"], yerr=rows["std"].fillna(0), fmt="o", ms=5, capsize=2,
                            color=colors[strategy], label=strategy)
            crowded = len(backbones) > 3
            ax.set_xticks(x, backbones, rotation=45 if crowded else 0, ha="right" if crowded else "center", fontsize=8)
            ax.set_title(f"{label}, {PROTOCOL_LABELS.get(protocol, protocol)}")
            ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def training_curves_figure(runs: pd.DataFrame, task: str) -> Figure | None:
    """Validation loss of ``task`` per epoch (``history.csv``) of each finished run; a panel per strategy × protocol."""
    column = f"val_{task}_loss"
    curves = []
    for run in runs.itertuples(index=False):
        path = Path(run.run_dir) / HISTORY_FILE
        if path.is_file():
            history = pd.read_csv(path)
            if column in history.columns:
                curves.append((run, history))
    if not curves:
        return None
    panels = sorted({(r.strategy, r.protocol) for r, _ in curves},
                    key=lambda sp: (_order(runs["strategy"], list(STRATEGIES)).index(sp[0]), sp[1]))
    columns = min(3, len(panels))
    n_rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(n_rows, columns, figsize=(4.6 * columns, 3.2 * n_rows), squeeze=False)
    backbones = sorted(runs["backbone"].unique())
    palette = plt.get_cmap("tab20")
    for ax, (strategy, protocol) in zip(axes.ravel(), panels):
        for run, history in curves:
            if (run.strategy, run.protocol) == (strategy, protocol):
                ax.plot(history["epoch"], history[column], lw=0.9, alpha=0.7,
                        color=palette(backbones.index(run.backbone) % 20))
        ax.set(title=f"{strategy}, {PROTOCOL_LABELS.get(protocol, protocol)}", xlabel="epoch", ylabel=column)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    axes[0][0].legend(handles=[Line2D([], [], color=palette(i % 20), label=b) for i, b in enumerate(backbones)],
                      fontsize=7, title="backbone", title_fontsize=7)
    fig.tight_layout()
    return fig


def figure_png(fig: Figure) -> bytes:
    """A figure as PNG bytes (the figure is closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------- statistics
def paired_units(per_backbone: pd.DataFrame, metrics: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """What the paired tests pair: backbones (the paper, when there are ``MIN_PAIRED_BACKBONES`` or more),
    else the runs, matched by backbone, fold and seed.

    Returns the long frame ``stats.significance_table`` takes (strategy, backbone, protocol, metric, mean, std;
    ``backbone`` names the unit) and a sentence saying what was paired.
    """
    headline = per_backbone[per_backbone["metric"].isin(list(HEADLINE_METRICS))]
    n_backbones = headline["backbone"].nunique()
    if n_backbones >= MIN_PAIRED_BACKBONES:
        return headline, f"paired over {n_backbones} backbones (matched by name); σ = each backbone's std across folds"
    runs = metrics[metrics["metric"].isin(list(HEADLINE_METRICS))]
    unit = runs["backbone"] + " fold" + runs["fold"].astype(str) + " seed" + runs["seed"].astype(str)
    units = runs.assign(backbone=unit, mean=runs["value"], std=np.nan)
    return (units[["strategy", "backbone", "protocol", "metric", "mean", "std"]],
            f"only {n_backbones} backbone(s), fewer than {MIN_PAIRED_BACKBONES}: the tests pair the runs over "
            "backbones × folds × seeds (matched by backbone, fold and seed); the σ↓ rows need "
            f"{MIN_PAIRED_BACKBONES} or more backbones and are left out")


def significance(per_backbone: pd.DataFrame, metrics: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """``stats.significance_table`` (MDMT vs STL and vs FT, μ↑ and σ↓) over ``paired_units``, and its note."""
    units, note = paired_units(per_backbone, metrics)
    if units.empty:
        return pd.DataFrame(), "no finished runs to compare"
    protocols = _order(units["protocol"], list(PROTOCOL_LABELS))
    has_std = units["std"].notna().all()
    if not has_std and "σ↓" not in note:
        note += "; the σ↓ rows need at least 2 folds per backbone and are left out"
    # σ is undefined for single runs: a placeholder 0 lets the μ rows be computed, the σ rows are dropped below
    table = stats.significance_table(units.fillna({"std": 0.0}), reference=PROPOSED, comparisons=BASELINES,
                                     metrics=list(HEADLINE_METRICS), protocols=protocols)
    if not has_std:
        table = table[~table.index.str.startswith("Std")]
    return table, note


def effect_sizes(units: pd.DataFrame, confidence: float = 0.95) -> pd.DataFrame:
    """MDMT − baseline mean difference per protocol × metric with a paired bootstrap CI (units matched by name)."""
    rows = []
    for (protocol, metric), group in units.groupby(["protocol", "metric"], sort=False):
        by_strategy = {name: g.set_index("backbone")["mean"] for name, g in group.groupby("strategy")}
        for baseline in BASELINES:
            if PROPOSED not in by_strategy or baseline not in by_strategy:
                continue
            _, proposed, other = stats.paired_by_name(by_strategy[PROPOSED], by_strategy[baseline])
            if len(proposed) < 2:
                continue
            diff, low, high = stats.bootstrap_mean_diff_ci(proposed, other, confidence=confidence)
            rows.append({"comparison": f"MDMT − {baseline}", "protocol": protocol, "metric": metric,
                         "n": len(proposed), "wins": int((proposed > other).sum()), "mean_diff": diff,
                         "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows, columns=["comparison", "protocol", "metric", "n", "wins", "mean_diff", "ci_low",
                                       "ci_high"])


def significance_long(table: pd.DataFrame) -> pd.DataFrame:
    """The significance table as rows: comparison, protocol, metric, p, stars, p_wilcoxon, n."""
    if table.empty:
        return pd.DataFrame(columns=["comparison", "protocol", "metric", *stats.TABLE_FIELDS])
    long = table.stack(["protocol", "metric"], future_stack=True).reset_index()
    long = long.rename(columns={"level_0": "comparison"})
    return long[["comparison", "protocol", "metric", *stats.TABLE_FIELDS]]


def significance_display(table: pd.DataFrame) -> pd.DataFrame:
    """Comparisons × "<protocol> <metric>" cells: stars with the t-test and Wilcoxon p-values."""
    long = significance_long(table)
    long["cell"] = [f"{s} (t p={p:.3g}; W p={w:.3g}; n={n})" if n else str(s)
                    for s, p, w, n in zip(long["stars"], long["p"], long["p_wilcoxon"], long["n"])]
    long["column"] = [_label(p, m) for p, m in zip(long["protocol"], long["metric"])]
    display = long.pivot(index="comparison", columns="column", values="cell")
    return display.reindex(index=list(dict.fromkeys(long["comparison"])), columns=list(dict.fromkeys(long["column"])))


def friedman_tests(units: pd.DataFrame) -> tuple[dict[tuple[str, str], stats.FriedmanResult], list[str]]:
    """Friedman + Holm across strategies per protocol × headline metric (blocks = the paired units); and notes."""
    results: dict[tuple[str, str], stats.FriedmanResult] = {}
    notes: list[str] = []
    for (protocol, metric), rows in units.groupby(["protocol", "metric"], sort=False):
        scores = rows.pivot_table(index="backbone", columns="strategy", values="mean")
        complete = scores.dropna()
        where = _label(protocol, metric)
        if len(complete) < len(scores):
            notes.append(f"{where}: {len(scores) - len(complete)} block(s) without every strategy left out "
                         f"({', '.join(scores.index.difference(complete.index)[:10])})")
        if complete.shape[1] < 3 or len(complete) < 2:
            notes.append(f"{where}: Friedman needs ≥ 3 strategies and ≥ 2 complete blocks "
                         f"(have {complete.shape[1]} and {len(complete)})")
            continue
        strategies = _order(pd.Series(complete.columns), list(STRATEGIES))
        results[(protocol, metric)] = stats.friedman_holm(complete[strategies])
    return results, notes


def critical_difference_figure(results: dict[tuple[str, str], stats.FriedmanResult]) -> Figure | None:
    """CD diagrams (Nemenyi) of every protocol × metric, Friedman p in each title."""
    if not results:
        return None
    protocols = list(dict.fromkeys(p for p, _ in results))
    fig, axes = plt.subplots(len(protocols), len(HEADLINE_METRICS), figsize=(5.6 * len(HEADLINE_METRICS),
                             2.6 * len(protocols)), squeeze=False)
    for i, protocol in enumerate(protocols):
        for j, metric in enumerate(HEADLINE_METRICS):
            ax = axes[i][j]
            result = results.get((protocol, metric))
            if result is None:
                ax.axis("off")
                continue
            stats.plot_critical_difference(result.avg_ranks.to_dict(), result.critical_difference, ax=ax)
            ax.set_title(f"{_label(protocol, metric)}: Friedman p={result.p_value:.3g}, {result.n_blocks} blocks",
                         fontsize=9)
    fig.tight_layout()
    return fig


def friedman_frame(results: dict[tuple[str, str], stats.FriedmanResult]) -> pd.DataFrame:
    """Holm-corrected pairwise Wilcoxon tests of every Friedman test, with its p-value and blocks."""
    frames = [r.pairwise.assign(protocol=p, metric=m, friedman_p=r.p_value, blocks=r.n_blocks)
              for (p, m), r in results.items()]
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, ignore_index=True)
    return out[["protocol", "metric", "friedman_p", "blocks", "a", "b", "mean_diff", "p", "p_holm"]]


# --------------------------------------------------------------------------------------------- assembly
@dataclass
class ReportData:
    """Everything the report shows, read from the run directories (through a rescanned store)."""

    task: str
    runs: pd.DataFrame
    metrics: pd.DataFrame
    predictions: pd.DataFrame
    per_backbone: pd.DataFrame
    headline: dict[str, pd.DataFrame]


def collect(results_dir: str | Path, task: str = "prognosis") -> ReportData:
    """Rescan the store of ``results_dir`` and compute the tables of ``task``."""
    store = ResultsStore(results_dir)
    store.rescan()
    metrics = store.metrics_frame(task)
    predictions = store.predictions(task)
    if not set(SCORE_COLUMNS) <= set(predictions.columns):
        predictions = predictions.iloc[0:0]  # pooled metrics, ROC and confusion need binary labels and scores
    per_backbone = per_backbone_table(metrics)
    return ReportData(task, store.runs(), metrics, predictions, per_backbone,
                      headline_tables(per_backbone, predictions))


def per_backbone_display(per_backbone: pd.DataFrame) -> pd.DataFrame:
    """(backbone, strategy) × "<protocol> <metric>": "mean ± std" in % for the headline metrics."""
    table = per_backbone[per_backbone["metric"].isin(list(HEADLINE_METRICS))]
    if table.empty:
        return pd.DataFrame()
    cells = table.assign(cell=[f"{100 * m:.1f} ± {100 * s:.1f}" if pd.notna(s) else f"{100 * m:.1f}"
                               for m, s in zip(table["mean"], table["std"])],
                         column=[_label(p, m) for p, m in zip(table["protocol"], table["metric"])])
    wide = cells.pivot(index=["backbone", "strategy"], columns="column", values="cell")
    columns = [_label(p, m) for p in _order(table["protocol"], list(PROTOCOL_LABELS)) for m in HEADLINE_METRICS]
    strategies = _order(table["strategy"], list(STRATEGIES))
    rows = sorted(wide.index, key=lambda bs: (bs[0], strategies.index(bs[1])))
    return wide.reindex(index=rows, columns=[c for c in columns if c in wide.columns])


def _percent(table: pd.DataFrame) -> pd.DataFrame:
    """Fractions → percent strings with one decimal ("—" for missing)."""
    return (table * 100).map(lambda v: "—" if pd.isna(v) else f"{v:.1f}")


def headline_table_text(results_dir: str | Path, task: str = "prognosis") -> str:
    """The headline tables (both aggregations, %) as plain text, for the command line."""
    data = collect(results_dir, task)
    parts = []
    missing = f"(no finished run has {task} {'/'.join(HEADLINE_METRICS)})"
    for name, table in data.headline.items():
        body = _percent(table).to_string() if not table.empty else missing
        parts.append(f"{task}, {name} ({AGGREGATIONS[name]}), %:\n{body}")
    return "\n\n".join(parts)


def markdown_table(table: pd.DataFrame) -> str:
    """A DataFrame (index included) as a GitHub Markdown table."""
    if table.empty:
        return "_(none)_"
    frame = _with_index_columns(table)

    def cell(value: object) -> str:
        if isinstance(value, float):
            return "—" if np.isnan(value) else f"{value:.4g}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _with_index_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The index as leading columns (a plain row number index is dropped)."""
    named = any(name is not None for name in table.index.names)
    return table.reset_index() if named else table.reset_index(drop=True)


def _html_table(table: pd.DataFrame) -> str:
    if table.empty:
        return "<p><em>(none)</em></p>"
    frame = _with_index_columns(table)
    frame.columns.name = None
    return frame.to_html(index=False, na_rep="—", border=0, classes="t", float_format=lambda v: f"{v:.4g}")


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def run_counts(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs per strategy and status (done / running / failed) with totals."""
    if runs.empty:
        return pd.DataFrame()
    counts = pd.crosstab(runs["strategy"], runs["status"], margins=True, margins_name="all")
    return counts.reindex(index=[*_order(runs["strategy"], list(STRATEGIES)), "all"])


def failed_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Failed runs with the last line of their error."""
    failed = runs[runs["status"] == "failed"]
    last = [str(e).strip().splitlines()[-1] if isinstance(e, str) and e.strip() else "" for e in failed["error"]]
    return pd.DataFrame({"run": failed["key"].to_list(), "error": last})


@dataclass
class Section:
    """One part of the report page: a title, text, tables (title → frame) and figures (title → PNG)."""

    title: str
    text: str = ""
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)


def _effects_display(units: pd.DataFrame) -> pd.DataFrame:
    effects = effect_sizes(units)
    for column in ("mean_diff", "ci_low", "ci_high"):
        effects[column] = (100 * effects[column]).round(1)
    return effects


def report_sections(data: ReportData, significance_table_: pd.DataFrame, significance_note: str) -> list[Section]:
    """The report's sections in page order (tables and rendered figures)."""
    units, _ = paired_units(data.per_backbone, data.metrics)
    friedman, friedman_notes = friedman_tests(units)
    sections = [
        Section("Runs", f"{int((data.runs['status'] == 'done').sum())} finished of {len(data.runs)} run directories.",
                {"runs per strategy and status": run_counts(data.runs), "failed runs": failed_runs(data.runs)}),
        Section("Headline table (%)", "; ".join(f"<b>{k}</b>: {v}" for k, v in AGGREGATIONS.items()) + ".",
                {f"{data.task}, {name}": _percent(t) for name, t in data.headline.items()}),
        Section("Significance", f"MDMT vs STL and vs FT; one-tailed paired t-test (stars: * p<0.05, ** p<0.01, "
                f"*** p<0.001) and Wilcoxon signed-rank (W); {significance_note}.",
                {"significance": significance_display(significance_table_),
                 "mean difference, 95% paired bootstrap CI (points of the metric ×100)": _effects_display(units)}),
    ]
    per_backbone = Section("Per backbone", "Mean ± std across folds, % (std per seed, averaged over seeds); every "
                           "metric is in per_backbone.csv.", {"per backbone": per_backbone_display(data.per_backbone)})
    if not data.per_backbone.empty:
        per_backbone.figures["ACC / F1 / G-mean per backbone"] = figure_png(per_backbone_figure(data.per_backbone))
    sections.append(per_backbone)
    if not data.predictions.empty:
        sections.append(Section("ROC curves and confusion matrices", "Test predictions pooled over backbones, folds "
                                "and seeds; SEVERE predicted when P(SEVERE) ≥ 0.5.",
                                figures={"ROC curves": figure_png(roc_figure(data.predictions)),
                                         "confusion matrices": figure_png(confusion_figure(data.predictions))}))
    cd = Section("Critical difference (Friedman + Holm)", "Average ranks across strategies (1 = best), blocks = "
                 f"the paired units of the significance section; Nemenyi CD at α = 0.05. {' '.join(friedman_notes)}",
                 {"pairwise Wilcoxon, Holm-corrected": friedman_frame(friedman)})
    cd_figure = critical_difference_figure(friedman)
    if cd_figure is not None:
        cd.figures["critical-difference diagrams"] = figure_png(cd_figure)
    sections.append(cd)
    curves = training_curves_figure(data.runs[data.runs["status"] == "done"], data.task)
    if curves is not None:
        sections.append(Section("Training curves", f"Validation {data.task} loss per epoch (history.csv), one line "
                                "per run, coloured by backbone.", figures={"training curves": figure_png(curves)}))
    return sections


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px}table.t{border-collapse:collapse;margin:.5em 0 1.5em}
table.t td,table.t th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}
img{max-width:100%;display:block;margin:.5em 0 1.5em}h2{border-bottom:1px solid #ddd}"""


def render_html(sections: list[Section], title: str) -> str:
    """A self-contained HTML page (figures as base64 PNG)."""
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2><p>{section.text}</p>")
        for name, table in section.tables.items():
            parts.append(f"<h3>{html.escape(name)}</h3>{_html_table(table)}")
        for name, png in section.figures.items():
            parts.append(f"<h3>{html.escape(name)}</h3>{_img(png, name)}")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_markdown(sections: list[Section], title: str) -> str:
    """The report's tables as Markdown (figures are in report.html)."""
    parts = [f"# {title}", ""]
    for section in sections:
        parts += [f"## {section.title}", "", section.text.replace("<b>", "**").replace("</b>", "**"), ""]
        for name, table in section.tables.items():
            parts += [f"### {name}", "", markdown_table(table), ""]
    return "\n".join(parts)


def build_report(results_dir: str | Path, out_dir: str | Path | None = None, task: str = "prognosis") -> Path:
    """Rebuild the report of ``results_dir`` from its run directories; returns the path of ``report.html``."""
    results_dir = Path(results_dir)
    out = Path(out_dir) if out_dir is not None else results_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    data = collect(results_dir, task)
    significance_table_, note = significance(data.per_backbone, data.metrics)
    headline_frame(data.headline).to_csv(out / "headline.csv", index=False)
    significance_long(significance_table_).to_csv(out / "significance.csv", index=False)
    effect_sizes(paired_units(data.per_backbone, data.metrics)[0]).to_csv(out / "effects.csv", index=False)
    data.per_backbone.to_csv(out / "per_backbone.csv", index=False)
    sections = report_sections(data, significance_table_, note)
    title = f"mdmt report: {task} ({results_dir})"
    (out / "report.md").write_text(render_markdown(sections, title))
    page = out / "report.html"
    page.write_text(render_html(sections, title))
    return page
