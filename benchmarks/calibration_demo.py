"""Calibration, thresholds and conformal prediction on the demo's test folds, against the targets of the issue.

Reads a results folder (``mdmt demo --out D`` writes ``D/results``) through the report's own tables
(``mdmt.evaluate.report_calibration``: each run's ``calibration.json``, fitted on its calib part when the runs have
one (``protocol.calibration_fraction``), else on its validation part, applied to its own test rows, pooled per
strategy and protocol); trains and writes nothing. Prints per strategy and protocol the ECE (15 bins) before and
after calibration, the balanced accuracy at 0.5 and at the runs' thresholds, the coverage and mean size of the
prognosis sets and the coverage and mean width of the global Brixia interval; how many rows the maps were fitted
on; on CV, both calibration methods fitted again from the prediction files (in memory) with the ECE a perfectly
calibrated model would show on the same rows (labels drawn from the calibrated probability, 200 draws: the
estimator's noise floor); the spread of the pooled CV coverage of prognosis sets that are exchangeable by
construction, with these runs' calibration and test sizes (the coverage target's noise floor); and whether each
target holds on the pooled CV test predictions, and a closing summary line per folder:

- MDMT's ECE after calibration <= 0.05, and >= 30 % below the raw ECE when that is above 0.05;
- balanced accuracy at the chosen threshold >= at 0.5, for every strategy;
- at alpha = 0.1, coverage in [0.88, 0.95] for the prognosis sets and the global Brixia interval.

    mdmt demo --out demo-output [--set protocol.calibration_fraction=0.5]
    python benchmarks/calibration_demo.py demo-output/results

The demo's 300 twin patients give 600 pooled test rows per strategy, on which a perfectly calibrated model's ECE
is already about 0.05; the twin at AIforCOVID's size (1,582 patients, CV only, 7 minutes on 2 cores) resolves
the targets:

    mdmt demo --preset medium --set 'grid.protocols=[cv5]' --out demo-medium
    python benchmarks/calibration_demo.py demo-medium/results
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from mdmt.config import CalibrationConfig
from mdmt.evaluate import calibration as calib
from mdmt.evaluate.report import collect
from mdmt.evaluate.report_calibration import binary_columns, calibration_table, conformal_table
from mdmt.evaluate.scoring import calibration_rows, fit_calibration, read_predictions
from mdmt.runs import CALIBRATION_FILE, DONE_FILE, RUNS_DIR

ALPHA = 0.1
RULES = ("prevalence", "youden")
"""The threshold rules compared (``sensitivity`` aims at another target)."""
DEFAULT_RULE = CalibrationConfig().threshold
COVERAGE = (0.88, 0.95)
ECE_TARGET, ECE_DROP = 0.05, 0.30
SEVERITY = "severity_regions"
STRATEGIES = {"stl_prognosis": "STL", "stl_severity": "STL severity", "ft": "FT",
              "mdmt_permuted": "MDMT, BrixIA labels permuted", "mdmt": "MDMT"}
PROTOCOLS = {"cv5": "CV", "loco": "LOCO"}
HOME = "aiforcovid"
"""The prognosis task's home dataset."""


def _cell(value: float, spec: str = ".3f") -> str:
    return "—" if pd.isna(value) else f"{value:{spec}}"


def tables(results: Path) -> pd.DataFrame:
    """One row per strategy × protocol: the calibration and conformal columns of both tasks at ALPHA."""
    prognosis = collect(results, "prognosis").calibration
    severity = collect(results, SEVERITY).calibration
    if prognosis is None or prognosis.rows.empty:
        raise SystemExit(f"{results}: no run has a {CALIBRATION_FILE} with prognosis (an older results folder?)")
    keys = ["strategy", "protocol"]
    sets = prognosis.conformal[prognosis.conformal["alpha"] == ALPHA].set_index(keys)
    table = prognosis.calibration.set_index(keys).join(sets[["coverage", "mean_size"]].add_prefix("set_"))
    if severity is not None and not severity.conformal.empty:
        intervals = severity.conformal[(severity.conformal["alpha"] == ALPHA)
                                       & (severity.conformal["interval"] == "global")].set_index(keys)
        table = table.join(intervals[["coverage", "mean_width"]].add_prefix("global_"), how="outer")
    return table


def validation_sizes(results: Path) -> dict[tuple[str, str], list[int]]:
    """Per task and protocol, the number of rows each run's conformal map was calibrated on."""
    sizes: dict[tuple[str, str], list[int]] = {}
    for path in sorted((results / RUNS_DIR).glob(f"*/*/*/fold*/seed*/{CALIBRATION_FILE}")):
        fitted, protocol = json.loads(path.read_text()), path.parents[2].name
        for task, part in (("prognosis", "sets"), (SEVERITY, "global")):
            if part in fitted.get(task, {}):
                sizes.setdefault((task, protocol), []).append(int(fitted[task][part]["n_calibration"]))
    return sizes


def coverage_spread(sizes: list[tuple[int, int]], draws: int = 20000) -> tuple[float, float, float]:
    """5th and 95th percentile of the pooled coverage of split-conformal sets over runs of (calibration rows, test
    rows) ``sizes`` when calibration and test films are exchangeable, and the chance it falls outside COVERAGE.

    Given its calibration rows, a run's coverage is Beta(n + 1 - l, l) with l = floor((n + 1) alpha) (Vovk 2012);
    its test hits are binomial from it (seeded). Runs are drawn independently: runs sharing a validation fold (two
    training seeds) spread wider, so the chance is a lower bound."""
    rng = np.random.default_rng(0)
    hits = np.zeros(draws)
    for n_cal, n_test in sizes:
        low = int(np.floor(round((n_cal + 1) * ALPHA, 9)))  # the rank mdmt's conformal quantile takes
        hits += rng.binomial(n_test, rng.beta(n_cal + 1 - low, low, size=draws))
    pooled = hits / sum(n for _, n in sizes)
    outside = float(np.mean((pooled < COVERAGE[0]) | (pooled > COVERAGE[1])))
    return float(np.quantile(pooled, 0.05)), float(np.quantile(pooled, 0.95)), outside


def run_sizes(results: Path, strategy: str) -> list[tuple[int, int]]:
    """(prognosis calibration rows, prognosis test rows) of each finished CV run of ``strategy``."""
    sizes = []
    for done in sorted((results / RUNS_DIR).glob(f"{strategy}/*/cv5/fold*/seed*/{DONE_FILE}")):
        fitted = json.loads((done.parent / CALIBRATION_FILE).read_text()).get("prognosis", {})
        if "sets" in fitted:
            sizes.append((int(fitted["sets"]["n_calibration"]),
                          len(_home_rows(done.parent / "predictions_prognosis.csv"))))
    return sizes


def _home_rows(path: Path) -> pd.DataFrame:
    rows = read_predictions(path)
    return rows[rows["dataset"] == HOME]


def _nonconformity(rows: pd.DataFrame) -> float:
    """Mean 1 - P(true class) of calibrated rows: what the conformal quantile is taken of."""
    return float(np.mean(np.where(rows["y_true"] == 1, 1 - rows["calibrated"], rows["calibrated"])))


def refitted_cv_rows(results: Path, settings: CalibrationConfig) -> pd.DataFrame:
    """Every finished CV run's prognosis rows of its home dataset with its calibration fitted again with
    ``settings`` (in memory) applied: its test rows (``part`` test) and the rows it was fitted on (``part`` val:
    the calib part when the run has one, else val)."""
    parts = []
    runs = sorted(p.parent for p in (results / RUNS_DIR).glob(f"*/*/cv5/fold*/seed*/{DONE_FILE}")
                  if (p.parent / "val_predictions_prognosis.csv").is_file())
    for run_dir in runs:
        fitted = fit_calibration(run_dir, settings).get("prognosis", {})
        if "binary" not in fitted:
            continue
        fitted_on = calibration_rows(run_dir, "prognosis", HOME)
        for part, rows in (("test", _home_rows(run_dir / "predictions_prognosis.csv")), ("val", fitted_on[2])):
            parts.append(rows.assign(strategy=run_dir.parents[3].name, protocol="cv5", key=str(run_dir),
                                     part=part, **binary_columns(fitted, rows)))
    return pd.concat(parts, ignore_index=True)


def methods_on_cv(results: Path) -> pd.DataFrame:
    """Per strategy, on the pooled CV test rows: ECE raw, and per method (fitted again on each run's validation
    rows, in memory) the ECE, its noise floor, the coverage of the prognosis sets and the mean nonconformity score
    on the rows calibration is fitted on (the calib part when the runs have one, else val) against the test rows."""
    records = {}
    for method in ("temperature", "platt"):
        both = refitted_cv_rows(results, CalibrationConfig(method=method, alpha=ALPHA))
        pooled = both[both["part"] == "test"]
        table = calibration_table(pooled).set_index("strategy")
        coverage = conformal_table(pooled, {"scorer": "binary"}).set_index("strategy")["coverage"]
        for strategy, group in pooled.groupby("strategy"):
            calibrated = group["calibrated"].to_numpy()
            floor = calib.ece_floor(calibrated), calib.ece_floor(calibrated, 0.9)
            records.setdefault(strategy, {"ece_raw": table.loc[strategy, "ece_raw"]})
            val = both[(both["strategy"] == strategy) & (both["part"] == "val")]
            records[strategy] |= {f"ece_{method}": table.loc[strategy, "ece_calibrated"],
                                  f"floor_{method}": f"{floor[0]:.3f} / {floor[1]:.3f}",
                                  f"coverage_{method}": coverage.loc[strategy],
                                  f"score_{method}": f"{_nonconformity(val):.3f} / {_nonconformity(group):.3f}"}
    return pd.DataFrame.from_dict(records, orient="index").loc[[s for s in STRATEGIES if s in records]]


def rules_on_cv(results: Path) -> pd.DataFrame:
    """Per strategy, on the pooled CV test rows: the balanced accuracy at 0.5 and, per threshold rule (fitted again
    on each run's calibration rows, in memory; the cut on the score does not depend on the calibration method),
    the balanced accuracy at the runs' thresholds and their mean."""
    records: dict[str, dict[str, float]] = {}
    for rule in RULES:
        both = refitted_cv_rows(results, CalibrationConfig(threshold=rule, alpha=ALPHA))
        table = calibration_table(both[both["part"] == "test"]).set_index("strategy")
        for strategy, row in table.iterrows():
            records.setdefault(strategy, {"balanced_accuracy_at_0.5": row["balanced_accuracy_at_0.5"]})
            records[strategy] |= {f"bacc_{rule}": row["balanced_accuracy_at_threshold"],
                                  f"threshold_{rule}": row["threshold_mean"]}
    return pd.DataFrame.from_dict(records, orient="index").loc[[s for s in STRATEGIES if s in records]]


def print_table(table: pd.DataFrame) -> None:
    print("| strategy | protocol | runs | ECE raw | ECE calibrated | BAcc at 0.5 | BAcc at threshold | mean threshold "
          "| set coverage | set size | Brixia global coverage | global width |")
    print("|---" * 12 + "|")
    order = [(s, p) for s in STRATEGIES for p in PROTOCOLS if (s, p) in table.index]
    for strategy, protocol in order:
        row = table.loc[(strategy, protocol)]
        runs = "—" if pd.isna(row.get("runs")) else str(int(row["runs"]))
        cells = [_cell(row.get(c)) for c in ("ece_raw", "ece_calibrated", "balanced_accuracy_at_0.5",
                                              "balanced_accuracy_at_threshold", "threshold_mean", "set_coverage",
                                              "set_mean_size", "global_coverage", "global_mean_width")]
        print(f"| {STRATEGIES[strategy]} | {PROTOCOLS[protocol]} | {runs} | " + " | ".join(cells) + " |")


def lowered_by_threshold(rules: pd.DataFrame, rule: str) -> list[str]:
    """The strategies whose balanced accuracy at the thresholds of ``rule`` is below that at 0.5."""
    return [s for s, r in rules.iterrows() if r[f"bacc_{rule}"] < r["balanced_accuracy_at_0.5"]]


def targets(table: pd.DataFrame, rules: pd.DataFrame) -> list[tuple[str, bool]]:
    """Each issue target on the pooled CV test predictions, with whether it holds: the runs' own calibration maps
    and sets, and the thresholds of the default rule fitted again (``rules_on_cv``)."""
    cv = table.xs("cv5", level="protocol")
    mdmt = cv.loc["mdmt"]
    raw, calibrated = mdmt["ece_raw"], mdmt["ece_calibrated"]
    drop = 1 - calibrated / raw
    ece_ok = calibrated <= ECE_TARGET and (raw <= ECE_TARGET or drop >= ECE_DROP)
    out = [(f"MDMT ECE {raw:.3f} -> {calibrated:.3f} ({-drop:+.0%}; target <= {ECE_TARGET}, and >= {ECE_DROP:.0%} "
            f"lower when the raw ECE is above {ECE_TARGET})", bool(ece_ok))]
    worse = lowered_by_threshold(rules, DEFAULT_RULE)
    out.append((f"balanced accuracy at the threshold ({DEFAULT_RULE}, the default rule) >= at 0.5 for every "
                f"strategy (below: {', '.join(worse) or 'none'})", not worse))
    for column, label in (("set_coverage", "prognosis set"), ("global_coverage", "Brixia global interval")):
        values = cv[column].dropna()
        inside = values.between(*COVERAGE)
        out.append((f"{label} coverage in [{COVERAGE[0]}, {COVERAGE[1]}] for every strategy: "
                    + ", ".join(f"{s} {v:.3f}" for s, v in values.items()), bool(inside.all())))
    return out


def summary_row(results: Path, table: pd.DataFrame, methods: pd.DataFrame, rules: pd.DataFrame) -> list[str]:
    """One folder's line of the closing summary: prognosis calibration rows per run, MDMT's ECE raw -> calibrated
    and its noise floor (median), per threshold rule the strategies whose balanced accuracy it lowered below 0.5's
    (and the mean gain over the strategies), the coverage range of the prognosis sets and of the global Brixia
    interval, and how many targets hold."""
    cv = table.xs("cv5", level="protocol")
    sets, intervals = cv["set_coverage"].dropna(), cv["global_coverage"].dropna()
    held = [holds for _, holds in targets(table, rules)]
    per_rule = [f"{'; '.join(STRATEGIES[s] for s in lowered_by_threshold(rules, rule)) or 'none'} "
                f"({(rules[f'bacc_{rule}'] - rules['balanced_accuracy_at_0.5']).mean():+.3f})" for rule in RULES]
    return [str(results), f"{np.median([n for n, _ in run_sizes(results, 'mdmt')]):.0f}",
            f"{cv.loc['mdmt', 'ece_raw']:.3f} → {cv.loc['mdmt', 'ece_calibrated']:.3f}",
            methods.loc["mdmt", "floor_temperature"].split(" / ")[0], *per_rule,
            f"{sets.min():.3f}–{sets.max():.3f}", f"{intervals.min():.3f}–{intervals.max():.3f}",
            f"{sum(held)} of {len(held)}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", type=Path, help="results folders (mdmt demo --out D: D/results)")
    args = parser.parse_args()
    summary = []
    for results in args.results:
        table = tables(results)
        print(f"\n{results}: pooled test predictions per strategy and protocol, alpha = {ALPHA}")
        print_table(table)
        for (task, protocol), sizes in sorted(validation_sizes(results).items()):
            print(f"{task}, {PROTOCOLS.get(protocol, protocol)}: calibration rows per run median "
                  f"{np.median(sizes):.0f} ({min(sizes)} to {max(sizes)}), {len(sizes)} runs")
        methods = methods_on_cv(results)
        print("\nCV, both methods fitted again on each run's calibration rows; ECE floor: median / 90th percentile "
              "for labels drawn from the calibrated probability")
        print("| strategy | ECE raw | ECE temperature | floor | ECE Platt | floor | set coverage temperature "
              "| set coverage Platt | 1 − P(true) calibration rows / test (temperature) |")
        print("|---" * 9 + "|")
        for strategy, row in methods.iterrows():
            cells = [_cell(row["ece_raw"]), _cell(row["ece_temperature"]), row["floor_temperature"],
                     _cell(row["ece_platt"]), row["floor_platt"], _cell(row["coverage_temperature"]),
                     _cell(row["coverage_platt"]), row["score_temperature"]]
            print(f"| {STRATEGIES[strategy]} | " + " | ".join(cells) + " |")
        sizes = {s: run_sizes(results, s) for s in STRATEGIES}
        spreads = {s: coverage_spread(sizes[s]) for s in STRATEGIES if sizes[s]}
        inside_all = float(np.prod([1 - outside for _, _, outside in spreads.values()]))
        print(f"\nCV prognosis sets exchangeable by construction (alpha = {ALPHA}), pooled coverage 5th-95th "
              "percentile and chance outside the target: "
              + "; ".join(f"{STRATEGIES[s]} {lo:.3f}-{hi:.3f}, {out:.0%}" for s, (lo, hi, out) in spreads.items())
              + f"; every strategy inside: {inside_all:.0%} (runs independent: an upper bound)")
        rules = rules_on_cv(results)
        print("\nCV, the threshold rules fitted again on each run's calibration rows: balanced accuracy at the runs' "
              "thresholds (their mean)")
        print("| strategy | BAcc at 0.5 | " + " | ".join(RULES) + " |")
        print("|---" * (2 + len(RULES)) + "|")
        for strategy, row in rules.iterrows():
            print(f"| {STRATEGIES[strategy]} | {row['balanced_accuracy_at_0.5']:.3f} | "
                  + " | ".join(f"{row[f'bacc_{r}']:.3f} ({row[f'threshold_{r}']:.3f})" for r in RULES) + " |")
        for text, holds in targets(table, rules):
            print(f"target {'HOLDS' if holds else 'FAILS'}: {text}")
        summary.append(summary_row(results, table, methods, rules))
    print("\nSummary, CV (MDMT's ECE floor: the median for a perfectly calibrated model on the same rows)")
    print("| results | calibration rows per run | MDMT ECE raw → calibrated | floor | "
          + " | ".join(f"below 0.5's BAcc, {rule} (mean gain)" for rule in RULES)
          + " | set coverage | Brixia global coverage | targets holding |")
    print("|---" * (7 + len(RULES)) + "|")
    for row in summary:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
