"""The report, rebuilt from fake run folders (no training): tables checked against hand computations, for the
prognosis and severity tasks, the permuted-MDMT control, unreadable runs and read-only results folders."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats as scipy_stats
from sklearn.metrics import accuracy_score, recall_score
from test_store import (
    PROGNOSIS_STRATEGIES,
    fake_metric_values,
    folder_state,
    make_read_only,
    make_writable,
    write_fake_run,
)

from mdmt.errors import DataError
from mdmt.evaluate.report import build_report, headline_table_text
from mdmt.evaluate.scoring import write_metrics
from mdmt.runs import RunSpec
from mdmt.store import FAILED_FILE
from mdmt.tasks import get_task

BACKBONES = ("resnet18", "densenet121", "vgg11", "mobilenet_v2", "googlenet")
FOLDS = {"cv5": 3, "loco": 2}
SEEDS = (0, 1)
STRATEGIES = (*PROGNOSIS_STRATEGIES, "mdmt_permuted")
FIGURES = ("ACC / F1 / G-mean per backbone", "ROC curves", "confusion matrices", "critical-difference diagrams",
           "training curves")


def prognosis_specs(backbones=BACKBONES, seeds=SEEDS, strategies=STRATEGIES) -> list[RunSpec]:
    return [RunSpec(s, b, p, f, seed) for b in backbones for s in strategies for p, n in FOLDS.items()
            for f in range(n) for seed in seeds]


def write_study(results: Path, backbones=BACKBONES, seeds=SEEDS) -> list[RunSpec]:
    specs = prognosis_specs(backbones, seeds)
    for spec in specs:
        write_fake_run(results, spec)
    for backbone in backbones:  # BrixIA runs: no prognosis metrics, must not enter the tables
        write_fake_run(results, RunSpec("stl_severity", backbone, "cv5", 0, 0))
    return specs


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, Path, list[RunSpec]]:
    results = tmp_path_factory.mktemp("results")
    specs = write_study(results)
    return results, build_report(results), specs


def test_headline_per_fold_mean_equals_the_hand_computed_mean(study):
    results, page, specs = study
    headline = pd.read_csv(page.parent / "headline.csv").set_index(["aggregation", "strategy"])
    assert list(headline.loc["per-fold mean"].index) == ["stl_prognosis", "ft", "mdmt_permuted", "mdmt"]
    for strategy in STRATEGIES:
        for protocol, label in (("cv5", "CV"), ("loco", "LOCO")):
            for metric, column in (("accuracy", "ACC"), ("f1_weighted", "F1"), ("gmean", "G-mean")):
                # every backbone has every fold and seed, so the mean of means is the plain mean over runs
                by_hand = np.mean([fake_metric_values(s)[metric] for s in specs
                                   if s.strategy == strategy and s.protocol == protocol])
                assert headline.loc[("per-fold mean", strategy), f"{label} {column}"] == pytest.approx(by_hand)


def test_per_backbone_std_is_across_folds_averaged_over_seeds(study):
    results, page, specs = study
    table = pd.read_csv(page.parent / "per_backbone.csv")
    row = table[(table.strategy == "mdmt") & (table.backbone == "vgg11") & (table.protocol == "cv5")
                & (table.metric == "gmean")].iloc[0]
    per_seed = [[fake_metric_values(RunSpec("mdmt", "vgg11", "cv5", f, seed))["gmean"] for f in range(FOLDS["cv5"])]
                for seed in SEEDS]
    assert row["mean"] == pytest.approx(np.mean(per_seed))
    assert row["std"] == pytest.approx(np.mean([np.std(v, ddof=1) for v in per_seed]))
    assert row["runs"] == FOLDS["cv5"] * len(SEEDS)
    assert set(table.strategy) == set(STRATEGIES)


def test_headline_pooled_equals_metrics_of_the_concatenated_predictions(study):
    results, page, specs = study
    headline = pd.read_csv(page.parent / "headline.csv").set_index(["aggregation", "strategy"])
    for strategy in ("stl_prognosis", "mdmt"):
        accuracy, gmean = [], []
        for backbone in BACKBONES:
            for seed in SEEDS:
                pooled = pd.concat(pd.read_csv(RunSpec(strategy, backbone, "loco", f, seed).run_dir(results)
                                               / "predictions_prognosis.csv") for f in range(FOLDS["loco"]))
                predicted = (pooled["score"] >= 0.5).astype(int)
                accuracy.append(accuracy_score(pooled["y_true"], predicted))
                gmean.append(np.sqrt(recall_score(pooled["y_true"], predicted, pos_label=1)
                                     * recall_score(pooled["y_true"], predicted, pos_label=0)))
        assert headline.loc[("pooled", strategy), "LOCO ACC"] == pytest.approx(np.mean(accuracy))
        assert headline.loc[("pooled", strategy), "LOCO G-mean"] == pytest.approx(np.mean(gmean))


def test_significance_pairs_backbones_one_tailed(study):
    results, page, specs = study
    table = pd.read_csv(page.parent / "significance.csv")
    per_backbone = pd.read_csv(page.parent / "per_backbone.csv")

    def values(strategy: str, column: str) -> np.ndarray:
        rows = per_backbone[(per_backbone.strategy == strategy) & (per_backbone.protocol == "cv5")
                            & (per_backbone.metric == "f1_weighted")]
        return rows.set_index("backbone").loc[sorted(BACKBONES), column].to_numpy()

    cell = table[(table.protocol == "cv5") & (table.metric == "f1_weighted")].set_index("comparison")
    mean_p = scipy_stats.ttest_rel(values("mdmt", "mean"), values("ft", "mean"), alternative="greater").pvalue
    std_p = scipy_stats.ttest_rel(values("mdmt", "std"), values("stl_prognosis", "std"), alternative="less").pvalue
    assert cell.loc["Mean (μ↑) MDMT vs FT", "p"] == pytest.approx(mean_p)
    assert cell.loc["Std (σ↓) MDMT vs STL", "p"] == pytest.approx(std_p)
    assert set(cell["n"]) == {len(BACKBONES)}
    assert len(table) == 2 * 3 * 2 * 3  # μ and σ × 3 pairs (STL, FT, permuted) × 2 protocols × 3 metrics
    assert f"paired over {len(BACKBONES)} backbones" in page.read_text()


def _images(page: Path) -> dict[str, Image.Image]:
    found = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page.read_text())
    return {alt: Image.open(io.BytesIO(base64.b64decode(data))) for alt, data in found}


def test_the_page_embeds_every_figure_and_both_tables(study):
    results, page, specs = study
    images = _images(page)
    assert sorted(images) == sorted(FIGURES)
    for alt, image in images.items():
        assert image.format == "PNG" and min(image.size) > 200, alt
        assert len(np.unique(np.asarray(image.convert("L")))) > 10, f"{alt} is blank"
    text = page.read_text()
    for title in ("prognosis, per-fold mean", "prognosis, pooled", "Significance", "failed and unreadable runs",
                  "Further metrics", "Nemenyi cliques"):
        assert title in text
    markdown = (page.parent / "report.md").read_text()
    assert "| strategy | CV ACC | CV F1 | CV G-mean | LOCO ACC | LOCO F1 | LOCO G-mean |" in markdown
    assert "| strategy | CV AUC | CV sensitivity | CV specificity |" in markdown


def test_cli_text_shows_the_headline_in_percent(study):
    results, page, specs = study
    text = headline_table_text(results)
    headline = pd.read_csv(page.parent / "headline.csv").set_index(["aggregation", "strategy"])
    assert f"{100 * headline.loc[('per-fold mean', 'mdmt'), 'CV ACC']:.1f}" in text
    assert "pooled" in text and "LOCO G-mean" in text


def test_one_backbone_pairs_runs_over_folds_and_seeds(tmp_path):
    write_study(tmp_path, backbones=("resnet18",))
    page = build_report(tmp_path, tmp_path / "out", comparisons=[("mdmt", "stl_prognosis"), ("mdmt", "ft")])
    table = pd.read_csv(page.parent / "significance.csv")
    assert not table["comparison"].str.startswith("Std").any()
    cell = table[(table.protocol == "cv5") & (table.metric == "accuracy")
                 & (table.comparison == "Mean (μ↑) MDMT vs STL")].iloc[0]
    units = [(f, seed) for f in range(FOLDS["cv5"]) for seed in SEEDS]
    mdmt = [fake_metric_values(RunSpec("mdmt", "resnet18", "cv5", f, s))["accuracy"] for f, s in units]
    stl = [fake_metric_values(RunSpec("stl_prognosis", "resnet18", "cv5", f, s))["accuracy"] for f, s in units]
    assert cell["n"] == len(units)
    assert cell["p"] == pytest.approx(scipy_stats.ttest_rel(mdmt, stl, alternative="greater").pvalue)
    assert "folds × seeds" in page.read_text()


def test_two_backbones_pair_the_runs_not_the_backbones(tmp_path):
    backbones = ("resnet18", "vgg11")
    write_study(tmp_path, backbones=backbones)
    table = pd.read_csv(build_report(tmp_path, tmp_path / "out").parent / "significance.csv")
    assert set(table.comparison) == {"Mean (μ↑) MDMT vs STL", "Mean (μ↑) MDMT vs FT", "Mean (μ↑) MDMT vs permuted MDMT"}
    cell = table[(table.protocol == "loco") & (table.metric == "gmean")
                 & (table.comparison == "Mean (μ↑) MDMT vs FT")].iloc[0]
    assert cell["n"] == len(backbones) * FOLDS["loco"] * len(SEEDS)


def test_rebuilt_from_run_dirs_alone_with_failed_runs_listed(tmp_path):
    write_study(tmp_path, backbones=("resnet18", "vgg11"), seeds=(0,))
    first = build_report(tmp_path, tmp_path / "a")
    broken = RunSpec("mdmt", "vgg11", "loco", 5, 0)
    broken.run_dir(tmp_path).mkdir(parents=True)
    (broken.run_dir(tmp_path) / FAILED_FILE).write_text("Traceback (most recent call last):\nRuntimeError: CUDA OOM")
    second = build_report(tmp_path, tmp_path / "b")
    assert (first.parent / "headline.csv").read_bytes() == (second.parent / "headline.csv").read_bytes()
    text = second.read_text()
    assert broken.key in text and "RuntimeError: CUDA OOM" in text
    assert broken.key not in first.read_text()


def test_an_unreadable_run_is_listed_not_raised(tmp_path):
    write_study(tmp_path, backbones=("resnet18",), seeds=(0,))
    spoiled = RunSpec("mdmt", "resnet18", "cv5", 1, 0)
    (spoiled.run_dir(tmp_path) / "metrics.json").write_text("{truncated")
    page = build_report(tmp_path, tmp_path / "out")
    text = page.read_text()
    assert spoiled.key in text and "unreadable" in text
    per_backbone = pd.read_csv(page.parent / "per_backbone.csv")
    row = per_backbone[(per_backbone.strategy == "mdmt") & (per_backbone.protocol == "cv5")].iloc[0]
    assert row["runs"] == FOLDS["cv5"] - 1


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(study, tmp_path):
    results, page, specs = study
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-sync",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (2000, 1200)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, tables and plots, not one colour
    dom = subprocess.run(["chromium", *flags, "--dump-dom", page.as_uri()], check=True, capture_output=True,
                         text=True, timeout=120).stdout
    sources = re.findall(r'<img [^>]*src="([^"]+)"', dom)
    assert len(sources) == len(FIGURES)
    for source in sources:  # every image is an embedded PNG that decodes
        assert source.startswith("data:image/png;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))).size[0] > 200


def test_effects_hold_the_paired_mean_difference_inside_its_bootstrap_ci(study):
    results, page, specs = study
    effects = pd.read_csv(page.parent / "effects.csv")
    per_backbone = pd.read_csv(page.parent / "per_backbone.csv")
    rows = per_backbone[(per_backbone.protocol == "loco") & (per_backbone.metric == "accuracy")].set_index("backbone")
    mdmt = rows[rows.strategy == "mdmt"].loc[sorted(BACKBONES), "mean"].to_numpy()
    stl = rows[rows.strategy == "stl_prognosis"].loc[sorted(BACKBONES), "mean"].to_numpy()
    row = effects[(effects.protocol == "loco") & (effects.metric == "accuracy")
                  & (effects.comparison == "MDMT − STL")].iloc[0]
    assert row["mean_diff"] == pytest.approx((mdmt - stl).mean())
    assert row["ci_low"] <= row["mean_diff"] <= row["ci_high"] and row["ci_low"] < row["ci_high"]
    assert row["n"] == len(BACKBONES) and row["wins"] == int((mdmt > stl).sum())
    assert row["p"] == pytest.approx(scipy_stats.ttest_rel(mdmt, stl, alternative="greater").pvalue)
    assert len(effects) == 3 * 2 * 3  # 3 pairs × 2 protocols × 3 metrics
    assert "bootstrap CI" in page.read_text()


def test_mdmt_minus_permuted_mdmt_shows_its_paired_test_and_bootstrap_interval(study):
    results, page, specs = study
    effects = pd.read_csv(page.parent / "effects.csv")
    per_backbone = pd.read_csv(page.parent / "per_backbone.csv")
    rows = per_backbone[(per_backbone.protocol == "cv5") & (per_backbone.metric == "accuracy")].set_index("backbone")
    mdmt = rows[rows.strategy == "mdmt"].loc[sorted(BACKBONES), "mean"].to_numpy()
    permuted = rows[rows.strategy == "mdmt_permuted"].loc[sorted(BACKBONES), "mean"].to_numpy()
    row = effects[(effects.comparison == "MDMT − permuted MDMT") & (effects.protocol == "cv5")
                  & (effects.metric == "accuracy")].iloc[0]
    assert (row["proposed"], row["baseline"], row["n"]) == ("mdmt", "mdmt_permuted", len(BACKBONES))
    assert row["mean_diff"] == pytest.approx((mdmt - permuted).mean())
    assert row["p"] == pytest.approx(scipy_stats.ttest_rel(mdmt, permuted, alternative="greater").pvalue)
    assert row["p_wilcoxon"] == pytest.approx(scipy_stats.wilcoxon(mdmt, permuted, alternative="greater").pvalue)
    assert row["ci_low"] < row["mean_diff"] < row["ci_high"]
    text = page.read_text()
    cell = f"{100 * row['mean_diff']:+.1f} [{100 * row['ci_low']:+.1f}, {100 * row['ci_high']:+.1f}]"
    assert "MDMT − permuted MDMT" in text and cell in text and f"{row['p']:.3g}" in text
    significance = pd.read_csv(page.parent / "significance.csv")
    assert "Mean (μ↑) MDMT vs permuted MDMT" in set(significance.comparison)


def test_comparisons_can_be_chosen(tmp_path):
    write_study(tmp_path, backbones=("resnet18",), seeds=(0,))
    page = build_report(tmp_path, tmp_path / "out", comparisons=[("ft", "stl_prognosis"), ("mdmt3", "mdmt")])
    assert set(pd.read_csv(page.parent / "effects.csv").comparison) == {"FT − STL"}  # no mdmt3 runs: left out
    assert set(pd.read_csv(page.parent / "significance.csv").comparison) == {"Mean (μ↑) FT vs STL"}


# --------------------------------------------------------------------------------------------- severity
def write_severity_run(results: Path, spec: RunSpec, task: str, n_images: int = 16) -> Path:
    """A run folder with one severity head's predictions (BrixIA test images), scored by ``write_metrics``."""
    rng = np.random.default_rng(zlib.crc32(f"{task}/{spec.key}".encode()))
    definition = get_task(task)
    run_dir = spec.run_dir(results)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "spec.json").write_text(spec.to_json())
    (run_dir / "tasks.json").write_text(json.dumps({task: definition.entry(["brixia"], "brixia")}))
    table = pd.DataFrame({"image_id": [f"{10 ** 15 + i}" for i in range(n_images)], "patient_id": "s",
                          "center": "X", "dataset": "brixia", "fold": spec.fold})
    noise = {"mdmt": 0.5, "mdmt_permuted": 0.8}.get(spec.strategy, 0.9)
    if task == "severity_regions":
        truth = rng.integers(0, 4, (n_images, 6)).astype(float)
        predicted = truth + rng.normal(0.1, noise, truth.shape)  # some below 0 or above 3: clipped when scored
    else:
        truth = rng.integers(0, 4, (n_images, 1)).astype(float)
        predicted = np.clip(truth + np.round(rng.normal(0, noise, truth.shape)), 0, 3)
    table[definition.prediction_columns("y_true")] = truth
    table[definition.prediction_columns("y_pred")] = predicted
    table.to_csv(run_dir / f"predictions_{task}.csv", index=False)
    pd.DataFrame({"epoch": [0, 1], "seconds": 1.0, f"val_{task}_loss": [1.0, 0.8]}).to_csv(run_dir / "history.csv",
                                                                                          index=False)
    write_metrics(run_dir)
    (run_dir / "DONE").write_text("done\n")
    return run_dir


SEVERITY_STRATEGIES = ("stl_severity", "mdmt_permuted", "mdmt")


def write_severity_study(results: Path, task: str) -> list[RunSpec]:
    specs = [RunSpec(s, b, "cv5", f, seed) for s in SEVERITY_STRATEGIES for b in ("resnet18", "vgg11")
             for f in range(3) for seed in (0, 1)]
    for spec in specs:
        write_severity_run(results, spec, task)
    return specs


def test_a_severity_only_study_reports_mae_kappa_and_per_region_scores(tmp_path):
    specs = write_severity_study(tmp_path / "results", "severity_regions")
    page = build_report(tmp_path / "results", tmp_path / "out", task="severity_regions")
    headline = pd.read_csv(page.parent / "headline.csv").set_index(["aggregation", "strategy"])
    assert list(headline.columns) == ["CV MAE", "CV r", "CV R²", "CV global κ"]
    assert list(headline.loc["per-fold mean"].index) == ["stl_severity", "mdmt_permuted", "mdmt"]
    for strategy in SEVERITY_STRATEGIES:  # every backbone has every fold and seed: the mean of means is the mean
        maes = []
        for spec in (s for s in specs if s.strategy == strategy):
            table = pd.read_csv(spec.run_dir(tmp_path / "results") / "predictions_severity_regions.csv")
            truth = table[[f"y_true_{r}" for r in "ABCDEF"]].to_numpy()
            predicted = np.clip(table[[f"y_pred_{r}" for r in "ABCDEF"]].to_numpy(), 0, 3)
            maes.append(np.abs(predicted - truth).mean())
        assert headline.loc[("per-fold mean", strategy), "CV MAE"] == pytest.approx(np.mean(maes))
    detail = pd.read_csv(page.parent / "detail.csv")
    assert {f"CV MAE {r}" for r in "ABCDEF"} <= set(detail.columns) and "CV global MAE" in detail.columns
    effects = pd.read_csv(page.parent / "effects.csv").set_index(["comparison", "metric"])
    assert set(effects.index.get_level_values("comparison")) == {"MDMT − STL (severity)", "MDMT − permuted MDMT"}
    mae = effects.loc[("MDMT − STL (severity)", "mae")]
    assert mae["mean_diff"] < 0 and mae["p"] < 0.05  # lower MAE is better: the one-tailed test looks that way
    text = page.read_text()
    assert "Per-region scores" in text and "CV MAE A" in text
    images = _images(page)
    assert "ROC curves" not in images and "confusion matrices" not in images
    assert {"MAE / r / R² / global κ per backbone", "critical-difference diagrams", "training curves"} <= set(images)
    printed = headline_table_text(tmp_path / "results", "severity_regions")
    assert "CV MAE" in printed and f"{headline.loc[('per-fold mean', 'mdmt'), 'CV MAE']:.3f}" in printed


def test_a_severity_class_task_reports_accuracy_f1_and_kappa_with_confusion_matrices(tmp_path):
    write_severity_study(tmp_path, "severity_global4")
    page = build_report(tmp_path, tmp_path / "out", task="severity_global4")
    headline = pd.read_csv(page.parent / "headline.csv")
    assert list(headline.columns) == ["aggregation", "strategy", "CV ACC", "CV F1", "CV κ"]
    assert headline["CV κ"].notna().all() and len(headline) == 2 * len(SEVERITY_STRATEGIES)
    images = _images(page)
    assert "confusion matrices" in images and "ROC curves" not in images


def test_the_prognosis_metrics_are_those_of_each_runs_home_dataset(tmp_path):
    """A task labelled by two datasets: the pooled headline uses only the home rows."""
    entry = get_task("prognosis").entry(["aiforcovid", "cohort2"], "aiforcovid")
    truths = {}
    for fold in range(2):
        spec = RunSpec("mdmt", "resnet18", "cv5", fold, 0)
        run_dir = spec.run_dir(tmp_path)
        run_dir.mkdir(parents=True)
        (run_dir / "spec.json").write_text(spec.to_json())
        (run_dir / "tasks.json").write_text(json.dumps({"prognosis": entry}))
        rng = np.random.default_rng(fold)
        home = pd.DataFrame({"image_id": [f"h{fold}{i}" for i in range(20)], "dataset": "aiforcovid",
                             "y_true": rng.integers(0, 2, 20), "score": rng.uniform(0, 1, 20)})
        other = pd.DataFrame({"image_id": [f"o{fold}{i}" for i in range(20)], "dataset": "cohort2",
                              "y_true": 1, "score": 0.0})  # all wrong: would drag accuracy down if mixed in
        table = pd.concat([home, other]).assign(patient_id="p", center="A", fold=fold)
        table["y_pred"] = (table["score"] >= 0.5).astype(int)
        table.to_csv(run_dir / "predictions_prognosis.csv", index=False)
        metrics = write_metrics(run_dir)
        assert {"prognosis@aiforcovid", "prognosis@cohort2"} <= set(metrics)
        (run_dir / "DONE").write_text("done\n")
        truths[fold] = home
    headline = pd.read_csv(build_report(tmp_path, tmp_path / "out").parent / "headline.csv").set_index("aggregation")
    pooled = pd.concat(truths.values())
    assert headline.loc["pooled", "CV ACC"] == pytest.approx(accuracy_score(pooled["y_true"], pooled["score"] >= 0.5))


# --------------------------------------------------------------------------------------------- folders
def test_a_missing_results_folder_is_an_error_and_creates_nothing(tmp_path):
    missing = tmp_path / "no-such-results"
    with pytest.raises(DataError, match="no-such-results"):
        build_report(missing, tmp_path / "out")
    with pytest.raises(DataError, match="no-such-results"):
        headline_table_text(missing)
    assert list(tmp_path.iterdir()) == []


def test_a_report_writes_nothing_into_the_results_folder_it_reads(tmp_path):
    """A report elsewhere leaves the results folder as it was (no file, no time changed), writable or read-only."""
    results = tmp_path / "results"
    write_study(results, backbones=("resnet18",), seeds=(0,))
    before = folder_state(results)
    build_report(results, tmp_path / "first")
    assert folder_state(results) == before
    changed = make_read_only(results)
    try:
        page = build_report(results, tmp_path / "elsewhere")
    finally:
        make_writable(changed)
    assert (page.parent / "headline.csv").read_bytes() == (tmp_path / "first" / "headline.csv").read_bytes()
    assert folder_state(results) == before


def test_report_and_store_import_no_torch():
    code = ("import sys, mdmt.evaluate.report, mdmt.store; "
            "assert 'torch' not in sys.modules; assert not any(m.startswith('mdmt.train') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_mdmt_report_on_a_missing_folder_is_an_error_without_torch(tmp_path):
    missing = tmp_path / "absent-results"
    code = ("import sys; from mdmt.cli import main; code = main(['report', sys.argv[1]]); "
            "assert 'torch' not in sys.modules; sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code, str(missing)], capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "absent-results" in result.stderr and "does not exist" in result.stderr
    assert list(tmp_path.iterdir()) == []
