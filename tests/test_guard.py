"""The guard against the wrong film: films without frontal lungs are refused with the reason, and the
out-of-distribution statistics flag films unlike the training films."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.infer_runs import train_tiny_run
from PIL import Image

from mdmt.cli import main
from mdmt.config import DataConfig
from mdmt.errors import ConfigError, DataError
from mdmt.infer.films import load_film
from mdmt.infer.guard import NOT_FRONTAL, film_refusal
from mdmt.infer.model_io import load_trained
from mdmt.infer.predict import predict_files
from mdmt.lungs.locate import NO_LUNG_FIELD
from mdmt.train.feature_stats import (
    FEATURE_STATS_FILE,
    FeatureStats,
    film_descriptors,
    fit_feature_stats,
    read_feature_stats,
    write_feature_stats,
)

DOUBTFUL_FRONTAL = "figure1-5e73d7ae897e27ff066a30cb-98"
"""The one real frontal film whose lung segmentation fails a plausibility check (one lung field found)."""


def real_film(root: Path, lateral: bool, skip: str = "") -> Path:
    """The first real film (by id) that is a lateral view (empty human lung mask) or a frontal one."""
    manifest = pd.read_csv(root / "manifest.csv").sort_values("id")
    for row in manifest.itertuples():
        empty = not (np.asarray(Image.open(root / row.mask)) > 0).any()
        if empty == lateral and row.id != skip:
            return root / row.image
    raise AssertionError("no such film")


def noise_film(path: Path) -> Path:
    """A film of uniform noise: no lungs."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 160), dtype=np.uint8)).save(path)
    return path


def batches(images: np.ndarray, size: int = 32):
    """Cached uint8 films as the loaders' batches (``image``: ``(B, 1, S, S)``)."""
    for start in range(0, len(images), size):
        yield {"image": torch.from_numpy(np.array(images[start:start + size]))[:, None]}


@pytest.mark.parametrize("crop", ["lungs", "none"])
def test_real_laterals_and_a_doubtful_segmentation_are_refused_with_the_reason(real_films, crop):
    data = DataConfig(image_size=48, crop=crop)
    lateral = film_refusal(load_film(real_film(real_films, lateral=True), data), data)
    assert lateral == f"{NOT_FRONTAL}: no lungs found: {NO_LUNG_FIELD}"
    doubtful = load_film(real_films / "images" / f"{DOUBTFUL_FRONTAL}.png", data)
    assert film_refusal(doubtful, data) == (f"{NOT_FRONTAL}: the lung segmentation failed its plausibility check: "
                                            f"segmenter found one lung field (21% of the image), need two")
    frontal = load_film(real_film(real_films, lateral=False, skip=DOUBTFUL_FRONTAL), data)
    assert film_refusal(frontal, data) is None
    assert frontal.box.method == ("unet" if crop == "lungs" else "none")  # the crop itself is the run's


def test_feature_stats_flag_one_percent_of_their_distribution_and_most_of_a_shifted_one():
    rng = np.random.default_rng(0)
    dim = 8
    mixing = rng.normal(size=(dim, dim))
    covariance = mixing @ mixing.T + 0.1 * np.eye(dim)
    stats = fit_feature_stats(rng.multivariate_normal(np.zeros(dim), covariance, size=20000))
    fresh = rng.multivariate_normal(np.zeros(dim), covariance, size=20000)

    def flagged(features: np.ndarray) -> float:
        return float(np.mean(stats.distance(features) > stats.threshold))

    assert 0.007 <= flagged(fresh) <= 0.013
    exact = np.sqrt(np.einsum("ij,jk,ik->i", fresh, np.linalg.inv(covariance), fresh))
    np.testing.assert_allclose(stats.distance(fresh), exact, rtol=0.03)
    # the same shift is far along the direction of least variance (6 of its standard deviations), near along the
    # direction of most variance
    values, vectors = np.linalg.eigh(covariance)
    step = 6 * np.sqrt(values[0])
    assert flagged(fresh + step * vectors[:, 0]) > 0.9
    assert flagged(fresh + step * vectors[:, -1]) < 0.02
    assert stats.n_films == 20000 and stats.quantile == 0.99


def test_feature_stats_round_trip_and_refuse_files_that_are_not_theirs(tmp_path):
    stats = fit_feature_stats(np.random.default_rng(1).normal(size=(300, 5)))
    path = stats.save(tmp_path / FEATURE_STATS_FILE)
    loaded = FeatureStats.load(path)
    for name in ("mean", "precision"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(stats, name))
    assert (loaded.threshold, loaded.quantile, loaded.n_films) == (stats.threshold, stats.quantile, stats.n_films)
    assert read_feature_stats(tmp_path).threshold == stats.threshold and read_feature_stats(tmp_path / "x") is None
    np.savez(tmp_path / "pickled.npz", mean=np.array([{"x": 1}], dtype=object), precision=np.eye(1), threshold=1.0,
             quantile=0.99, n_films=3)
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    np.savez(tmp_path / "shapes.npz", mean=np.zeros(3), precision=np.eye(2), threshold=1.0, quantile=0.99, n_films=3)
    for name in ("pickled", "broken", "shapes"):
        with pytest.raises(DataError, match=f"{name}.npz"):
            FeatureStats.load(tmp_path / f"{name}.npz")


@pytest.fixture(scope="module")
def run_dir(tiny_config, tiny_caches, tmp_path_factory) -> Path:
    """A finished tiny MDMT run without feature statistics (as runs trained before them)."""
    run = train_tiny_run(tiny_config, tmp_path_factory.mktemp("guard-runs"))
    assert (run / FEATURE_STATS_FILE).is_file()  # a run keeps them now; an older run's folder has none
    (run / FEATURE_STATS_FILE).unlink()
    return run


@pytest.fixture(scope="module")
def run_with_stats(run_dir, tiny_caches, tmp_path_factory) -> Path:
    """A copy of the run with ``ood_features.npz`` of every cached twin film."""
    copy = Path(shutil.copytree(run_dir, tmp_path_factory.mktemp("guard-stats") / "run"))
    trained = load_trained(copy)
    images = np.concatenate([cache.images[:] for cache in tiny_caches.values()])
    write_feature_stats(trained.model, batches(images), trained.device, copy, trained.config.model.input_size)
    return copy


def test_predict_scores_with_the_ood_columns_and_lists_refused_films(run_with_stats, tiny_caches, tmp_path):
    records = tiny_caches["brixia"].records.head(3)
    noise = noise_film(tmp_path / "noise.png")
    result = predict_files(run_with_stats, [*records["path"], noise], tmp_path / "out", progress=False)
    assert list(result.skipped["path"]) == [str(noise)]
    assert result.skipped["reason"].iloc[0].startswith(f"{NOT_FRONTAL}: no lungs found")
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert list(table["path"]) == list(records["path"])
    # predict describes a film exactly as the statistics' training side described its cached image
    trained = load_trained(run_with_stats)
    cached = film_descriptors(trained.model, batches(tiny_caches["brixia"].images[:3]), trained.device,
                              trained.config.model.input_size)
    np.testing.assert_allclose(table["ood_distance"], trained.feature_stats.distance(cached), rtol=1e-4)
    assert (table["ood_flag"] == (table["ood_distance"] > trained.feature_stats.threshold)).all()
    assert pd.read_csv(tmp_path / "out" / "skipped.csv")["path"].tolist() == [str(noise)]


def test_a_real_film_is_flagged_and_only_laterals_exit_1(run_with_stats, tiny_caches, real_films, tmp_path, capsys):
    frontal = real_film(real_films, lateral=False, skip=DOUBTFUL_FRONTAL)
    twin = tiny_caches["aiforcovid"].records["path"].head(4).tolist()
    table = predict_files(run_with_stats, [frontal, *twin], tmp_path / "a", progress=False).table.set_index("path")
    assert bool(table.loc[str(frontal), "ood_flag"])
    assert table.loc[str(frontal), "ood_distance"] > 2 * table.loc[twin, "ood_distance"].max()
    lateral = real_film(real_films, lateral=True)
    assert main(["predict", "--run", str(run_with_stats), str(lateral), "--out", str(tmp_path / "b")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"skipped {lateral}: {NOT_FRONTAL}: no lungs found: {NO_LUNG_FIELD}"
    assert err[1] == "no film predicted: all 1 file(s) skipped, each for the reason above"


def test_a_run_without_statistics_predicts_with_one_message(run_dir, tiny_caches, tmp_path, capsys):
    film = tiny_caches["brixia"].records["path"].iloc[0]
    assert main(["predict", "--run", str(run_dir), film, "--out", str(tmp_path)]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if FEATURE_STATS_FILE in line]
    expected = (f"{run_dir}: no {FEATURE_STATS_FILE} (a run trained before mdmt kept it): the films are not checked "
                f"for being out of the training distribution (no ood_distance / ood_flag columns); train the run "
                f"again to get them")
    assert notes == [expected]
    assert not {"ood_distance", "ood_flag"} & set(pd.read_csv(tmp_path / "predictions.csv").columns)


def test_statistics_of_another_model_are_refused(run_dir, tmp_path):
    copy = Path(shutil.copytree(run_dir, tmp_path / "run"))
    fit_feature_stats(np.random.default_rng(2).normal(size=(50, 3))).save(copy / FEATURE_STATS_FILE)
    with pytest.raises(ConfigError, match=f"{FEATURE_STATS_FILE}: statistics of 3 features"):
        load_trained(copy)
