"""The report's figures: ROC curves and confusion matrices (where the task has them), reliability diagrams of a
calibrated binary task, headline metrics per backbone, training curves and critical-difference diagrams. Every
figure is returned as PNG bytes by ``figure_png``."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from mdmt.evaluate import calibration as calib  # noqa: E402
from mdmt.evaluate import metrics as metrics_lib  # noqa: E402
from mdmt.evaluate import stats  # noqa: E402
from mdmt.evaluate.report_tables import (  # noqa: E402
    PROTOCOL_LABELS,
    TaskView,
    column_label,
    order,
    protocol_label,
    strategy_order,
)
from mdmt.runs import HISTORY_FILE  # noqa: E402
from mdmt.tasks import prediction_column  # noqa: E402


def figure_png(fig: Figure) -> bytes:
    """A figure as PNG bytes (the figure is closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _strategy_colors(strategies: list[str]) -> dict[str, tuple[float, ...]]:
    palette = plt.get_cmap("tab10")
    return {name: palette(i % 10) for i, name in enumerate(strategy_order(strategies))}


def roc_figure(predictions: pd.DataFrame) -> Figure:
    """ROC curves of each strategy's pooled binary test predictions (all backbones, folds, seeds), a panel per
    protocol."""
    protocols = order(predictions["protocol"], PROTOCOL_LABELS)
    colors = _strategy_colors(list(predictions["strategy"].unique()))
    fig, axes = plt.subplots(1, len(protocols), figsize=(4.8 * len(protocols), 4.4), squeeze=False)
    for ax, protocol in zip(axes[0], protocols):
        rows = predictions[predictions["protocol"] == protocol]
        for strategy in strategy_order(rows["strategy"]):
            group = rows[rows["strategy"] == strategy]
            if group["y_true"].nunique() < 2:
                continue
            curve = metrics_lib.roc_curve_points(group["y_true"], group["score"])
            auc = metrics_lib.prognosis_metrics(group["y_true"], group["score"])["roc_auc"]
            ax.plot(curve["fpr"], curve["tpr"], color=colors[strategy],
                    label=f"{strategy} (AUC {auc:.3f}, n={len(group)})")
        ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=0.8)
        ax.set(title=f"ROC, {protocol_label(protocol)} (pooled)", xlabel="1 − specificity",
               ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def reliability_figure(rows: pd.DataFrame) -> Figure:
    """Reliability diagrams (15 equal-width bins) of the pooled test rows of a calibrated binary task: the raw
    P(class 1) and the calibrated one against the observed fraction, a panel per strategy, a row per protocol."""
    strategies = strategy_order(rows["strategy"])
    protocols = order(rows["protocol"], PROTOCOL_LABELS)
    fig, axes = plt.subplots(len(protocols), len(strategies), figsize=(3.6 * len(strategies), 3.6 * len(protocols)),
                             squeeze=False)
    for i, protocol in enumerate(protocols):
        for j, strategy in enumerate(strategies):
            ax = axes[i][j]
            group = rows[(rows["protocol"] == protocol) & (rows["strategy"] == strategy)]
            ax.plot([0, 1], [0, 1], ls="--", color="0.6", lw=0.8)
            for column, label, color in (("score", "raw", "tab:red"), ("calibrated", "calibrated", "tab:blue")):
                if group.empty:
                    continue
                bins = calib.reliability_table(group["y_true"], group[column])
                table = {name: np.asarray(values) for name, values in bins.items()}
                filled = table["count"] > 0
                ece = calib.expected_calibration_error(group["y_true"], group[column])
                ax.plot(table["mean_predicted"][filled], table["fraction_positive"][filled], "o-", ms=3, color=color,
                        label=f"{label} (ECE {ece:.3f})")
            ax.set(title=f"{strategy}, {protocol_label(protocol)} (n={len(group)})", xlabel="predicted probability",
                   ylabel="observed fraction", xlim=(0, 1), ylim=(0, 1))
            if not group.empty:
                ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    return fig


def confusion_figure(predictions: pd.DataFrame, entry: dict[str, Any]) -> Figure:
    """Pooled confusion matrices (every group of the task pooled), strategies × protocols."""
    strategies = strategy_order(predictions["strategy"])
    protocols = order(predictions["protocol"], PROTOCOL_LABELS)
    n_classes = int(entry["n_classes"])
    names = list(entry["class_names"]) if len(entry["class_names"]) == n_classes else [str(c) for c in range(n_classes)]
    truth = [prediction_column("y_true", g) for g in entry["groups"]]
    predicted = [prediction_column("y_pred", g) for g in entry["groups"]]
    size = 2.6 + 0.35 * n_classes
    fig, axes = plt.subplots(len(strategies), len(protocols), figsize=(size * len(protocols), size * len(strategies)),
                             squeeze=False)
    ticks = list(range(n_classes))
    for i, strategy in enumerate(strategies):
        for j, protocol in enumerate(protocols):
            ax = axes[i][j]
            rows = predictions[(predictions["strategy"] == strategy) & (predictions["protocol"] == protocol)]
            ax.set_title(f"{strategy}, {protocol_label(protocol)}", fontsize=9)
            ax.set_xticks(ticks, names, fontsize=8)
            ax.set_yticks(ticks, names, fontsize=8)
            ax.set(xlabel="predicted", ylabel="true")
            if rows.empty:
                continue
            counts = metrics_lib.confusion(rows[truth].to_numpy().ravel().astype(np.int64),
                                           rows[predicted].to_numpy().ravel().astype(np.int64), ticks).to_numpy()
            ax.imshow(counts, cmap="Blues", vmin=0)
            for (t, p), count in np.ndenumerate(counts):
                ax.text(p, t, str(count), ha="center", va="center", fontsize=8,
                        color="white" if count > counts.max() / 2 else "black")
    fig.tight_layout()
    return fig


def per_backbone_figure(per_backbone: pd.DataFrame, view: TaskView) -> Figure:
    """Mean ± std across folds of the headline metrics per backbone and strategy; a row of panels per protocol."""
    table = per_backbone[per_backbone["metric"].isin(list(view.headline))]
    protocols = order(table["protocol"], PROTOCOL_LABELS)
    backbones = sorted(table["backbone"].unique())
    strategies = strategy_order(table["strategy"])
    colors = _strategy_colors(strategies)
    width = max(4.0, 0.55 * len(backbones) + 2)
    metrics = [m for m in view.headline if m in set(table["metric"])]
    fig, axes = plt.subplots(len(protocols), len(metrics), figsize=(width * len(metrics), 3.4 * len(protocols)),
                             squeeze=False)
    offsets = np.linspace(-0.25, 0.25, len(strategies)) if len(strategies) > 1 else np.zeros(1)
    x = np.arange(len(backbones))
    for i, protocol in enumerate(protocols):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            for offset, strategy in zip(offsets, strategies):
                rows = table[(table["protocol"] == protocol) & (table["metric"] == metric) &
                             (table["strategy"] == strategy)].set_index("backbone").reindex(backbones)
                ax.errorbar(x + offset, rows["mean"], yerr=rows["std"].fillna(0), fmt="o", ms=5, capsize=2,
                            color=colors[strategy], label=strategy)
            crowded = len(backbones) > 3
            ax.set_xticks(x, backbones, rotation=45 if crowded else 0, ha="right" if crowded else "center", fontsize=8)
            ax.set_title(column_label(protocol, metric, view.headline))
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
        try:
            history = pd.read_csv(path)
        except (OSError, ValueError):
            continue
        if column in history.columns and "epoch" in history.columns:
            curves.append((run, history))
    if not curves:
        return None
    strategies = strategy_order(runs["strategy"])
    panels = sorted({(r.strategy, r.protocol) for r, _ in curves}, key=lambda sp: (strategies.index(sp[0]), sp[1]))
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
        ax.set(title=f"{strategy}, {protocol_label(protocol)}", xlabel="epoch", ylabel=column)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes.ravel()[len(panels):]:
        ax.set_visible(False)
    axes[0][0].legend(handles=[Line2D([], [], color=palette(i % 20), label=b) for i, b in enumerate(backbones)],
                      fontsize=7, title="backbone", title_fontsize=7)
    fig.tight_layout()
    return fig


def critical_difference_figure(results: dict[tuple[str, str], stats.FriedmanResult], view: TaskView) -> Figure | None:
    """CD diagrams (Nemenyi) of every protocol × headline metric, Friedman p in each title."""
    if not results:
        return None
    protocols = list(dict.fromkeys(p for p, _ in results))
    metrics = [m for m in view.headline if any(m == metric for _, metric in results)]
    n_methods = max(len(r.avg_ranks) for r in results.values())
    fig, axes = plt.subplots(len(protocols), len(metrics), figsize=(5.6 * len(metrics),
                             (1.6 + 0.35 * n_methods) * len(protocols)), squeeze=False)
    for i, protocol in enumerate(protocols):
        for j, metric in enumerate(metrics):
            ax = axes[i][j]
            result = results.get((protocol, metric))
            if result is None:
                ax.axis("off")
                continue
            stats.plot_critical_difference(result.avg_ranks.to_dict(), result.nemenyi, result.critical_difference,
                                           result.alpha, ax=ax)
            ax.set_title(f"{column_label(protocol, metric, view.headline)}: Friedman p={result.p_value:.3g}, "
                         f"{result.n_blocks} blocks", fontsize=9, pad=40)
    fig.tight_layout()
    return fig
