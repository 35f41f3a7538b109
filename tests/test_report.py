"""The report, rebuilt from fake run directories (no training): tables checked against hand computations."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import stats as scipy_stats
from sklearn.metrics import accuracy_score, recall_score
from test_store import PROGNOSIS_STRATEGIES, fake_metric_values, write_fake_run

from mdmt.evaluate.report import build_report, headline_table_text
from mdmt.experiments.store import FAILED_FILE, INDEX_FILE
from mdmt.train.run import RunSpec

BACKBONES = ("resnet18", "densenet121", "vgg11", "mobilenet_v2", "googlenet")
FOLDS = {"cv5": 3, "loco": 2}
SEEDS = (0, 1)
FIGURES = ("ACC / F1 / G-mean per backbone", "ROC curves", "confusion matrices", "critical-difference diagrams",
           "training curves")


def prognosis_specs(backbones=BACKBONES, seeds=SEEDS) -> list[RunSpec]:
    return [RunSpec(s, b, p, f, seed) for b in backbones for s in PROGNOSIS_STRATEGIES for p, n in FOLDS.items()
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
    assert set(headline.loc["per-fold mean"].index) == set(PROGNOSIS_STRATEGIES)
    for strategy in PROGNOSIS_STRATEGIES:
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
    assert set(table.strategy) == set(PROGNOSIS_STRATEGIES)


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
    assert len(table) == 4 * 2 * 3  # 4 comparisons × 2 protocols × 3 metrics
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
    for title in ("prognosis, per-fold mean", "prognosis, pooled", "Significance", "failed runs"):
        assert title in text
    markdown = (page.parent / "report.md").read_text()
    assert "| strategy | CV ACC | CV F1 | CV G-mean | LOCO ACC | LOCO F1 | LOCO G-mean |" in markdown


def test_cli_text_shows_the_headline_in_percent(study):
    results, page, specs = study
    text = headline_table_text(results)
    headline = pd.read_csv(page.parent / "headline.csv").set_index(["aggregation", "strategy"])
    assert f"{100 * headline.loc[('per-fold mean', 'mdmt'), 'CV ACC']:.1f}" in text
    assert "pooled" in text and "LOCO G-mean" in text


def test_one_backbone_pairs_runs_over_folds_and_seeds(tmp_path):
    write_study(tmp_path, backbones=("resnet18",))
    page = build_report(tmp_path, tmp_path / "out")
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
    cell = table[(table.protocol == "loco") & (table.metric == "gmean")
                 & (table.comparison == "Mean (μ↑) MDMT vs FT")].iloc[0]
    assert cell["n"] == len(backbones) * FOLDS["loco"] * len(SEEDS)


def test_rebuilt_from_run_dirs_alone_with_failed_runs_listed(tmp_path):
    write_study(tmp_path, backbones=("resnet18", "vgg11"), seeds=(0,))
    first = build_report(tmp_path, tmp_path / "a")
    broken = RunSpec("mdmt", "vgg11", "loco", 5, 0)
    broken.run_dir(tmp_path).mkdir(parents=True)
    (broken.run_dir(tmp_path) / FAILED_FILE).write_text("Traceback (most recent call last):\nRuntimeError: CUDA OOM")
    (tmp_path / INDEX_FILE).unlink()
    second = build_report(tmp_path, tmp_path / "b")
    assert (first.parent / "headline.csv").read_bytes() == (second.parent / "headline.csv").read_bytes()
    text = second.read_text()
    assert broken.key in text and "RuntimeError: CUDA OOM" in text
    assert broken.key not in first.read_text()


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
                  & (effects.comparison == "MDMT − stl_prognosis")].iloc[0]
    assert row["mean_diff"] == pytest.approx((mdmt - stl).mean())
    assert row["ci_low"] <= row["mean_diff"] <= row["ci_high"] and row["ci_low"] < row["ci_high"]
    assert row["n"] == len(BACKBONES) and row["wins"] == int((mdmt > stl).sum())
    assert len(effects) == 2 * 2 * 3  # 2 comparisons × 2 protocols × 3 metrics
    assert "bootstrap CI" in page.read_text()
