"""The study's report of one task, rebuilt from the run folders alone (no training, no torch).

``build_report`` reads the run folders (``mdmt.store``: reading them writes nothing) and writes, into
``<results_dir>/report`` (or ``out_dir``):

- ``headline.csv``: strategies × protocols × the task's headline metrics (prognosis: ACC, F1, G-mean; severity
  classes: ACC, F1, quadratic κ; regional severity: MAE, r, R², κ of the global score's 4 bins), in two
  aggregations: per-fold mean and pooled (see ``report_tables``);
- ``detail.csv``: the same for the task's further metrics (per region, per lung, AUC …) when it has any;
- ``per_backbone.csv``: strategy, backbone, protocol, metric, mean and std across folds (std per seed, averaged
  over seeds), runs;
- ``significance.csv``: each (proposed, baseline) pair, μ↑ and σ↓, one-tailed paired t-test with stars and
  Wilcoxon, paired over backbones (or over runs when there are few backbones, said on the page);
- ``effects.csv``: proposed − baseline mean differences with paired bootstrap 95% CIs and one-tailed p-values;
- ``calibration.csv`` (a binary task) and ``conformal.csv`` (a binary or regional Brixia task), when any run has
  ``calibration.json``: each run's calibration, threshold and conformal sets or intervals applied to its own test
  rows, pooled per strategy and protocol (``report_calibration``); runs without it are listed, not scored;
- ``report.html`` (self-contained: figures embedded as base64 PNG) and ``report.md``.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mdmt.errors import ConfigError, DataError
from mdmt.evaluate import report_figures as figures
from mdmt.evaluate import report_stats
from mdmt.evaluate import report_tables as tables
from mdmt.evaluate.report_calibration import CalibrationData, collect_calibration
from mdmt.evaluate.scoring import run_entries
from mdmt.runs import atomic_write_text
from mdmt.store import ResultsStore
from mdmt.tasks import get_task

REPORT_DIR = "report"
DETAIL_TITLES = {"regions": "Per-region scores", "lung4": "Per-lung scores", "binary": "Further metrics"}


@dataclass
class ReportData:
    """Everything the report shows of one task, read from the run folders (``ResultsStore``)."""

    task: str
    entry: dict[str, Any] | None  # the task's tasks.json entry; None when no finished run has the task
    view: tables.TaskView
    runs: pd.DataFrame
    metrics: pd.DataFrame
    predictions: pd.DataFrame  # test predictions of each run's home dataset
    per_backbone: pd.DataFrame
    headline: dict[str, pd.DataFrame]
    detail: dict[str, pd.DataFrame]
    notes: list[str] = field(default_factory=list)
    calibration: CalibrationData | None = None  # None when the task's head is not calibrated


def _check_results(results_dir: Path) -> None:
    if not results_dir.is_dir():
        raise DataError(f"results folder {results_dir} does not exist")


def _entries(runs: pd.DataFrame, task: str) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Run key → the task's entry, for finished runs that have the task; and a note per run whose entry is
    unreadable."""
    entries, notes = {}, []
    for run in runs[runs["status"] == "done"].itertuples(index=False):
        try:
            entry = run_entries(run.run_dir).get(task)
        except DataError as error:
            notes.append(f"{run.key}: {error}")
            continue
        if entry is not None:
            entries[run.key] = entry
    return entries, notes


def _view_of(entry: dict[str, Any] | None, task: str) -> tables.TaskView:
    if entry is not None:
        return tables.VIEWS[entry["scorer"]]
    try:
        return tables.VIEWS[get_task(task).scorer]
    except ConfigError:
        return tables.VIEWS["binary"]


def collect(results_dir: str | Path, task: str = "prognosis") -> ReportData:
    """Read the run folders of ``results_dir`` once and compute the tables of ``task`` (DataError when the folder does
    not exist); writes nothing."""
    _check_results(Path(results_dir))
    store = ResultsStore(results_dir)
    runs = store.runs()
    entries, notes = _entries(runs, task)
    entry = next(iter(entries.values()), None)
    view = _view_of(entry, task)
    predictions = store.predictions(task, runs)
    if "dataset" in predictions.columns:  # the task's metrics are those of each run's home dataset
        homes = predictions["key"].map({key: e["home"] for key, e in entries.items()})
        predictions = predictions[predictions["dataset"] == homes]
    metrics = store.metrics_frame(task, runs)
    per_backbone = tables.per_backbone_table(metrics)
    pooled, pooled_notes = (tables.pooled_long(predictions, entry, [*view.headline, *view.detail])
                            if entry is not None and not predictions.empty else (metrics.iloc[0:0], []))
    detail = tables.aggregated_tables(per_backbone, pooled, view.detail) if view.detail else {}
    return ReportData(task, entry, view, runs, metrics, predictions, per_backbone,
                      tables.aggregated_tables(per_backbone, pooled, view.headline), detail, notes + pooled_notes,
                      collect_calibration(runs, entries, predictions, task))


def headline_table_text(results_dir: str | Path, task: str = "prognosis", data: ReportData | None = None) -> str:
    """The headline tables (both aggregations) as plain text, for the command line; ``data``: what
    ``collect(results_dir, task)`` returns, when the caller has it already."""
    data = data if data is not None else collect(results_dir, task)
    percent = [label for metric, label in data.view.headline.items() if metric in data.view.percent]
    units = f"{', '.join(percent)} in %" if percent else "values"
    parts = []
    for name, table in data.headline.items():
        body = (tables.formatted(table, data.view, data.view.headline).to_string() if not table.empty
                else f"(no finished run has {task} {'/'.join(data.view.headline)})")
        parts.append(f"{task}, {name} ({tables.AGGREGATIONS[name]}); {units}:\n{body}")
    problems = tables.problem_runs(data.runs)
    if len(problems):
        parts.append("runs left out:\n" + "\n".join(f"{row.run}: {row.status}: {row.error}"
                                                   for row in problems.itertuples(index=False)))
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------- page
@dataclass
class Section:
    """One part of the report page: a title, text, tables (title → frame) and figures (title → PNG)."""

    title: str
    text: str = ""
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)


def _units_text(view: tables.TaskView) -> str:
    percent = [view.headline.get(m, view.detail.get(m, m)) for m in (*view.headline, *view.detail)
               if m in view.percent]
    return f"{', '.join(percent)} in %; other metrics as values" if percent else "values as computed"


CALIBRATION_TEXT = (
    "Each run's calibration (temperature or Platt scaling of P(class 1)) and decision threshold (the prevalence "
    "rule, Youden's J, or a fixed sensitivity), fitted on its own validation fold (calibration.json), applied to its "
    "own test rows; rows pooled over backbones, folds and seeds. ECE: 15 equal-width bins, of the raw score and of the calibrated "
    "probability; ece_floor: the median ECE of labels drawn from the calibrated probability itself (a perfectly "
    "calibrated model on the same rows shows about this much: an ECE near it is as calibrated as the rows can "
    "tell). At 0.5: the raw score (the model's own decision); at threshold: each run's threshold on its "
    "calibrated probability (threshold_mean: their mean).")
CONFORMAL_TEXT = (
    "Split-conformal prediction sets (a binary task: a class is in the set when 1 − P(class) is within the "
    "validation quantile) or intervals (regional Brixia: the global score 0–18 and each region 0–3), calibrated on "
    "each run's validation fold at level α and applied to its own test rows, pooled over backbones, folds and "
    "seeds: empirical coverage (guaranteed ≥ 1 − α on average over calibration folds) and mean set size or width.")


def _by_protocol_label(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(protocol=frame["protocol"].map(tables.protocol_label)) if not frame.empty else frame


def calibration_sections(data: ReportData) -> list[Section]:
    """The calibration section (a binary task: table and reliability diagrams) and the conformal section, each
    run's ``calibration.json`` applied to its test rows; the runs without one listed in the first of them."""
    found = data.calibration
    if found is None:
        return []
    left_out = {"runs left out (not calibrated)": found.left_out} if len(found.left_out) else {}
    sections = []
    if data.view.scorer == "binary":
        section = Section("Calibration and decision thresholds", CALIBRATION_TEXT,
                          {"calibration": _by_protocol_label(found.calibration), **left_out})
        if not found.rows.empty:
            section.figures["reliability diagrams"] = figures.figure_png(figures.reliability_figure(found.rows))
        sections.append(section)
        left_out = {}
    sections.append(Section("Conformal prediction", CONFORMAL_TEXT,
                            {"conformal": _by_protocol_label(found.conformal), **left_out}))
    return sections


def report_sections(data: ReportData, units: pd.DataFrame, comparisons: Sequence[tuple[str, str]],
                    significance_table: pd.DataFrame, significance_note: str, effects: pd.DataFrame) -> list[Section]:
    """The report's sections in page order (tables and rendered figures)."""
    view = data.view
    friedman, friedman_notes = report_stats.friedman_tests(units, view)
    aggregations = "; ".join(f"<b>{k}</b>: {v}" for k, v in tables.AGGREGATIONS.items())
    pairs = ", ".join(report_stats.comparison_label(*pair)
                      for pair in report_stats.present_comparisons(units, comparisons))
    sections = [
        Section("Runs", f"{int((data.runs['status'] == 'done').sum())} finished of {len(data.runs)} run folders.",
                {"runs per strategy and status": tables.run_counts(data.runs),
                 "failed and unreadable runs": tables.problem_runs(data.runs)}),
        Section("Headline table", f"{aggregations}. {_units_text(view)}.",
                {f"{data.task}, {name}": tables.formatted(t, view, view.headline)
                 for name, t in data.headline.items()}),
    ]
    if data.detail:
        sections.append(Section(DETAIL_TITLES.get(view.scorer, "Further metrics"), _units_text(view) + ".",
                                {f"{data.task}, {name}": tables.formatted(t, view, view.detail)
                                 for name, t in data.detail.items()}))
    sections.append(Section(
        "Significance", f"Pairs (proposed − baseline): {pairs or 'none with runs of this task'}. One-tailed paired "
        "t-test, H1: the proposed strategy is better (higher; lower for errors such as MAE); stars * p<0.05, "
        f"** p<0.01, *** p<0.001; W = Wilcoxon signed-rank; {significance_note}.",
        {"significance": report_stats.significance_display(significance_table, view),
         "proposed − baseline: mean difference, 95% paired bootstrap CI (points of % metrics) and one-tailed "
         "paired tests": report_stats.effects_display(effects, view)}))
    per_backbone = Section("Per backbone", "Mean ± std across folds (std per seed, averaged over seeds); every "
                           "metric is in per_backbone.csv.",
                           {"per backbone": tables.per_backbone_display(data.per_backbone, view)})
    if not data.per_backbone[data.per_backbone["metric"].isin(list(view.headline))].empty:
        per_backbone.figures[f"{' / '.join(view.headline.values())} per backbone"] = figures.figure_png(
            figures.per_backbone_figure(data.per_backbone, view))
    sections.append(per_backbone)
    plots = {}
    if view.roc and not data.predictions.empty:
        plots["ROC curves"] = figures.figure_png(figures.roc_figure(data.predictions))
    if view.confusion and data.entry is not None and not data.predictions.empty:
        plots["confusion matrices"] = figures.figure_png(figures.confusion_figure(data.predictions, data.entry))
    if plots:
        title = " and ".join(plots)
        sections.append(Section(title[0].upper() + title[1:], "Test predictions of each run's home dataset, "
                                "pooled over backbones, folds and seeds.", figures=plots))
    sections += calibration_sections(data)
    cd = Section("Critical difference (Friedman + Holm)", "Average ranks across strategies (1 = best), blocks = "
                 f"the paired units of the significance section; Nemenyi CD at α = 0.05. {' '.join(friedman_notes)}",
                 {"pairwise Wilcoxon, Holm-corrected": report_stats.friedman_frame(friedman),
                  "Nemenyi cliques (α = 0.05)": report_stats.cliques_frame(friedman, view)})
    cd_figure = figures.critical_difference_figure(friedman, view)
    if cd_figure is not None:
        cd.figures["critical-difference diagrams"] = figures.figure_png(cd_figure)
    sections.append(cd)
    curves = figures.training_curves_figure(data.runs[data.runs["status"] == "done"], data.task)
    if curves is not None:
        sections.append(Section("Training curves", f"Validation {data.task} loss per epoch (history.csv), one line "
                                "per run, coloured by backbone.",
                                figures={"training curves": figures.figure_png(curves)}))
    if data.notes:
        sections.append(Section("Notes", "<br>".join(html.escape(n) for n in data.notes)))
    return sections


def _with_index_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The index as leading columns (a plain row number index is dropped)."""
    named = any(name is not None for name in table.index.names)
    return table.reset_index() if named else table.reset_index(drop=True)


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


def _html_table(table: pd.DataFrame) -> str:
    if table.empty:
        return "<p><em>(none)</em></p>"
    frame = _with_index_columns(table)
    frame.columns.name = None
    return frame.to_html(index=False, na_rep="—", border=0, classes="t", float_format=lambda v: f"{v:.4g}")


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


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
        text = section.text.replace("<b>", "**").replace("</b>", "**").replace("<br>", "  \n")
        parts += [f"## {section.title}", "", html.unescape(text), ""]
        for name, table in section.tables.items():
            parts += [f"### {name}", "", markdown_table(table), ""]
    return "\n".join(parts)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    atomic_write_text(frame.to_csv(index=False), path)


def build_report(results_dir: str | Path, out_dir: str | Path | None = None, task: str = "prognosis",
                 comparisons: Sequence[tuple[str, str]] | None = None, data: ReportData | None = None) -> Path:
    """Rebuild the report of ``task`` from the run folders of ``results_dir``; returns the path of ``report.html``.

    ``comparisons``: the (proposed, baseline) pairs to test, default ``report_stats.DEFAULT_COMPARISONS`` (pairs
    without runs of the task are left out). A missing results folder is a DataError and nothing is created.
    ``data``: what ``collect(results_dir, task)`` returns, when the caller has it already.
    """
    results_dir = Path(results_dir)
    pairs = list(report_stats.DEFAULT_COMPARISONS if comparisons is None else comparisons)
    data = data if data is not None else collect(results_dir, task)
    units, note = report_stats.paired_units(data.per_backbone, data.metrics, list(data.view.headline))
    significance_table, note = report_stats.significance(units, note, data.view, pairs)
    effects = report_stats.effect_sizes(units, data.view, pairs)
    out = Path(out_dir) if out_dir is not None else results_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(tables.headline_frame(data.headline, data.view.headline), out / "headline.csv")
    if data.detail:
        _write_csv(tables.headline_frame(data.detail, data.view.detail), out / "detail.csv")
    _write_csv(report_stats.significance_long(significance_table), out / "significance.csv")
    _write_csv(effects, out / "effects.csv")
    _write_csv(data.per_backbone, out / "per_backbone.csv")
    if data.calibration is not None and not data.calibration.rows.empty:
        if not data.calibration.calibration.empty:
            _write_csv(data.calibration.calibration, out / "calibration.csv")
        _write_csv(data.calibration.conformal, out / "conformal.csv")
    sections = report_sections(data, units, pairs, significance_table, note, effects)
    title = f"mdmt report: {data.task} ({results_dir})"
    atomic_write_text(render_markdown(sections, title), out / "report.md")
    page = out / "report.html"
    atomic_write_text(render_html(sections, title), page)
    return page
