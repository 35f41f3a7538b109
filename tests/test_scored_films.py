"""Scored-film folders (manifest + Brixia scores of two raters): the reader, its bad rows, the dataset plug-in, and a
smoke run of ``benchmarks/severity_real.py`` on a few real films."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mdmt.config import PluginRef
from mdmt.data.datasets import DATASETS
from mdmt.errors import DataError
from mdmt.sources import RECORD_COLUMNS, read_source
from mdmt.sources.scored_films import JUNIOR_COLUMNS, read_scored_films
from mdmt.tasks import REGION_COLUMNS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "severity_real.py"
SCORE_COLUMNS = [f"{rater}-{name}" for rater in "SJ" for name in (*"ABCDEF", "Global")]


def score_row(image_id: str, patient: str, senior: list[int | str], junior: list[int | str] | None = None) -> dict:
    """A scores row; the global scores are the sums of the regions unless given as a 7th value."""
    def full(regions: list) -> list:
        return regions if len(regions) == 7 else [*regions, sum(r for r in regions if isinstance(r, int))]

    values = full(senior) + full(junior if junior is not None else senior)
    return {"id": image_id, "patient": patient, **dict(zip(SCORE_COLUMNS, values))}


def write_folder(root: Path, films: list[tuple[str, str]], scores: list[dict], missing: tuple[str, ...] = ()) -> Path:
    """A scored-film folder: an 8×8 PNG per film (except ``missing``), the manifest and the scores file."""
    (root / "images").mkdir(parents=True)
    for image_id, _ in films:
        if image_id not in missing:
            Image.fromarray(np.full((8, 8), 100, np.uint8)).save(root / "images" / f"{image_id}.png")
    pd.DataFrame({"id": [f for f, _ in films], "image": [f"images/{f}.png" for f, _ in films],
                  "mask": [f"masks/{f}.png" for f, _ in films], "patient": [p for _, p in films],
                  "width": 8}).to_csv(root / "manifest.csv", index=False)
    pd.DataFrame(scores).to_csv(root / "brixia-scores.csv", index=False)
    return root


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    films = [("f1", "p1"), ("f2", "p1"), ("f3", "p2"), ("f4", "p3"), ("f5", "p4"), ("f6", "p5"), ("f7", "p6"),
             ("f8", "p7"), ("f9", "p8"), ("f10", "p9")]
    scores = [
        score_row("f1", "p1", [0, 1, 2, 3, 0, 1], [0, 1, 1, 3, 0, 0]),   # good: global 7, junior 5
        score_row("f2", "p1", [3, 3, 3, 3, 3, 3]),                      # good: global 18
        score_row("f3", "p2", [1, "", 2, 0, 0, 0]),                     # missing region B
        score_row("f4", "p3", [1, 4, 0, 0, 0, 0, 5]),                   # region outside 0-3
        score_row("f5", "p4", [1, 1, 1, 1, 1, 1, 7]),                   # global 7 != 6
        score_row("ghost", "px", [0, 0, 0, 0, 0, 0]),                   # no film
        score_row("f6", "p5", [1, 0, 0, 0, 0, 0]),                      # scored twice
        score_row("f6", "p5", [2, 0, 0, 0, 0, 0]),
        score_row("f7", "p6", [0, 0, 0, 0, 0, 0]),                      # film's file missing: named once, by the film
        score_row("f8", "p7", [1, 1, 0, 0, "x", 0]),                    # not a number
        score_row("f9", "someone-else", [0, 0, 0, 0, 0, 0]),            # patient differs from the manifest's
    ]
    return write_folder(tmp_path / "films", films, scores, missing=("f7",))


def test_reader_keeps_good_rows_and_names_every_bad_one(folder: Path):
    table = read_scored_films(folder, "scored")
    records = table.records.set_index("image_id")
    # f10 has no scores row: kept, unlabelled; the good rows carry the senior's scores as labels
    assert sorted(records.index) == ["f1", "f10", "f2"]
    assert list(table.records.columns[:len(RECORD_COLUMNS)]) == list(RECORD_COLUMNS)
    assert records.loc["f1", list(REGION_COLUMNS)].tolist() == [0, 1, 2, 3, 0, 1]
    assert (records.loc["f1", "brixia_global"], records.loc["f2", "brixia_global"]) == (7, 18)
    assert records.loc["f10", [*REGION_COLUMNS, "brixia_global"]].isna().all()
    assert math.isnan(records.loc["f1", "prognosis"])
    reasons = dict(zip(table.dropped["image_id"] + "#" + table.dropped.groupby("image_id").cumcount().astype(str),
                       table.dropped["reason"]))
    assert reasons == {
        "f7#0": f"file not found: {folder / 'images' / 'f7.png'}",
        "f3#0": "missing score: S-B is blank (brixia-scores.csv row 4)",
        "f4#0": "score outside 0-3: S-B = 4 (brixia-scores.csv row 5)",
        "f5#0": "global not the sum of the regions: S-Global = 7, regions sum to 6 (brixia-scores.csv row 6)",
        "ghost#0": "no film: id not in manifest.csv (brixia-scores.csv row 7)",
        "f6#0": "duplicate id: scored in brixia-scores.csv rows 8, 9",
        "f6#1": "duplicate id: scored in brixia-scores.csv rows 8, 9",
        "f8#0": "not a score: S-E = 'x' (brixia-scores.csv row 11)",
        "f9#0": "patient mismatch: 'someone-else', manifest.csv says 'p8' (brixia-scores.csv row 12)",
    }
    paths = dict(zip(table.dropped["image_id"], table.dropped["path"]))
    assert paths["f3"] == str(folder / "images" / "f3.png") and paths["ghost"] == ""
    assert "dropped: 9" in table.report()


def test_junior_scores_masks_and_manifest_extras_are_kept(folder: Path):
    records = read_scored_films(folder, "scored").records.set_index("image_id")
    assert records.loc["f1", list(JUNIOR_COLUMNS)].tolist() == [0, 1, 1, 3, 0, 0, 5]
    assert records.loc["f2", "junior_global"] == 18
    assert records.loc["f10", list(JUNIOR_COLUMNS)].isna().all()
    assert records.loc["f1", "mask_path"] == str(folder / "masks" / "f1.png")
    assert records.loc["f1", "width"] == "8"
    assert (records["center"] == "all").all()


def test_without_junior_columns_and_with_a_missing_senior_column(folder: Path):
    scores = pd.read_csv(folder / "brixia-scores.csv")
    scores.drop(columns=[c for c in scores.columns if c.startswith("J-")]).to_csv(folder / "brixia-scores.csv",
                                                                                   index=False)
    records = read_scored_films(folder, "scored").records
    assert not set(JUNIOR_COLUMNS) & set(records.columns)
    scores.drop(columns=["S-C"]).to_csv(folder / "brixia-scores.csv", index=False)
    with pytest.raises(DataError, match="missing column 'S-C'"):
        read_scored_films(folder, "scored")
    (folder / "brixia-scores.csv").unlink()
    with pytest.raises(DataError, match="no brixia-scores.csv"):
        read_scored_films(folder, "scored")


def test_a_manifest_id_listed_twice_is_an_error(tmp_path: Path):
    root = write_folder(tmp_path / "twice", [("a", "p"), ("a", "q")], [score_row("a", "p", [0] * 6)])
    with pytest.raises(DataError, match="id\\(s\\) listed twice: a"):
        read_scored_films(root)


def test_dataset_plugin_groups_films_by_patient_in_its_folds(tmp_path: Path):
    films = [(f"f{i}", f"p{i // 2}") for i in range(12)]  # 6 patients with 2 films each
    scores = [score_row(f, p, [i % 4, 0, 0, 0, 0, 0]) for i, (f, p) in enumerate(films)]
    root = write_folder(tmp_path / "pairs", films, scores)
    dataset = DATASETS.build(PluginRef("scored_films", {"root": str(root)}), "test", dataset_id="pairs")
    assert dataset.labels_task(REGION_COLUMNS) and not dataset.supports_loco
    records = dataset.read().records
    assert len(records) == 12 and records["dataset"].eq("pairs").all()
    assert read_source("scored_films", root, name="pairs").records.equals(records)
    from mdmt.data import splits

    folds = splits.kfold_splits(records.assign(stratum=dataset.stratify(records)), k=3, seed=0, label="stratum")
    patient = dict(zip(records["image_id"], records["patient_id"]))
    for split in folds:
        sides = [{patient[i] for i in ids} for ids in split.parts().values()]
        assert sum(map(len, sides)) == 6  # no patient on two sides
    assert sorted(i for split in folds for i in split.test) == sorted(records["image_id"])


def real_subset(real_films: Path, folder: Path, ids: pd.Series) -> Path:
    """A scored-film folder of some real films: their manifest rows (absolute paths: nothing copied) and scores."""
    scores = pd.read_csv(real_films / "brixia-scores.csv", dtype=str)
    manifest = pd.read_csv(real_films / "manifest.csv", dtype=str)
    manifest = manifest[manifest["id"].isin(ids)].copy()
    for column in ("image", "mask"):
        manifest[column] = [str(real_films / p) for p in manifest[column]]
    folder.mkdir()
    manifest.to_csv(folder / "manifest.csv", index=False)
    scores[scores["id"].isin(ids)].to_csv(folder / "brixia-scores.csv", index=False)
    return folder


def run_benchmark(args: list[str], cache: Path, capsys: pytest.CaptureFixture[str],
                  monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict[str, str]]:
    """``benchmarks/severity_real.py`` in this process (1 seed, 2 epochs, 32 px, no pretraining unless ``args`` say
    otherwise): its output and last line's fields."""
    spec = importlib.util.spec_from_file_location("severity_real", SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "severity_real", benchmark)  # its dataclasses look their module up
    spec.loader.exec_module(benchmark)
    threads = torch.get_num_threads()
    try:
        benchmark.main(["--seeds", "0", "--epochs", "2", "--pretrain", "none", "--size", "32", "--crop", "none",
                        "--workers", "0", "--cache", str(cache), *args])
    finally:
        torch.set_num_threads(threads)  # the yardstick trains on one thread
    out = capsys.readouterr().out
    return out, dict(part.split("=") for part in out.strip().splitlines()[-1].split())


def test_benchmark_smoke_on_ten_real_films(real_films: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                           monkeypatch: pytest.MonkeyPatch):
    """2-fold CV on 10 scored films, then 6 films → 4 others: the last line parses and its numbers are finite."""
    ids = pd.read_csv(real_films / "brixia-scores.csv", dtype=str)["id"].head(10)
    ten = real_subset(real_films, tmp_path / "ten", ids)
    out, figures = run_benchmark(["--data", str(ten), "--folds", "2", "--json", str(tmp_path / "cv.json")],
                                 tmp_path / "cache", capsys, monkeypatch)
    assert set(figures) == {"mae", "const", "n"} and figures["n"] == "10"
    assert all(math.isfinite(float(v)) for v in figures.values()) and float(figures["const"]) > 0
    assert "seed 0 fold 2/2" in out and "10 scored films used, 0 row(s) left out" in out
    saved = json.loads((tmp_path / "cv.json").read_text())
    assert saved["mean"]["global_mae"] == pytest.approx(float(figures["mae"]), abs=1e-4)
    assert sorted(p["image_id"] for p in saved["predictions"]) == sorted(ids)  # each film scored once

    train = real_subset(real_films, tmp_path / "train", ids.head(6))
    test = real_subset(real_films, tmp_path / "test", ids.tail(4))
    out, figures = run_benchmark(["--train", str(train), "--test", str(test)], tmp_path / "cache", capsys,
                                 monkeypatch)
    assert figures["n"] == "4" and math.isfinite(float(figures["mae"]))
    assert "trained on train, scored on test" in out and "seed 0 fold 1/1" in out


def benchmark_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    """``benchmarks/severity_real.py`` loaded as a module."""
    spec = importlib.util.spec_from_file_location("severity_real", SCRIPT)
    benchmark = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "severity_real", benchmark)  # its dataclasses look their module up
    spec.loader.exec_module(benchmark)
    return benchmark


def test_the_absolute_error_loss_is_the_regression_task_with_another_loss(monkeypatch: pytest.MonkeyPatch):
    """``--loss l1``: the same ``severity_regions`` task (name, columns, mirror map, decoding) whose loss, per film,
    is the mean absolute error over the six regions where mdmt's is the mean squared error."""
    benchmark = benchmark_module(monkeypatch)
    squared, absolute = benchmark.severity_task("mse"), benchmark.severity_task("l1")
    assert squared is benchmark.get_task(benchmark.TASK)
    assert (absolute.name, absolute.columns, absolute.flip_perm) == (squared.name, squared.columns, squared.flip_perm)
    outputs = torch.tensor([[0.0, 1.0, 2.0, 3.0, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]])
    targets = torch.tensor([[1.0, 1.0, 0.0, 3.0, 0.0, 3.0], [1.0, 1.0, 1.0, 1.0, 1.0, 3.0]])
    torch.testing.assert_close(absolute.loss(outputs, targets), torch.tensor([6.5 / 6, 2 / 6]))
    torch.testing.assert_close(squared.loss(outputs, targets), torch.tensor([14.25 / 6, 4 / 6]))
    np.testing.assert_array_equal(absolute.decode(outputs)["y_pred_A"], squared.decode(outputs)["y_pred_A"])


def ten_films(real_films: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any, Any]:
    """``benchmarks/severity_real.py`` loaded as a module, its config at 32 px and 2 epochs, and the first ten scored
    films read through it."""
    benchmark = benchmark_module(monkeypatch)
    ids = pd.read_csv(real_films / "brixia-scores.csv", dtype=str)["id"].head(10)
    args = benchmark.argparse.Namespace(backbone="tiny_cnn", size=32, crop="none", epochs=2,
                                        cache=str(tmp_path / "cache"), set=[])
    config = benchmark.make_config(args)
    return benchmark, config, benchmark.read_films(real_subset(real_films, tmp_path / "ten", ids), config)


def test_benchmark_members_average_the_models_of_their_own_seeds(real_films: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    """``--members 2``: each film's regions are the mean of the single model of the seed and the single model of
    seed + MEMBER_SEED_STRIDE, and the two differ (so the mean is not one of them)."""
    benchmark, config, films = ten_films(real_films, tmp_path, monkeypatch)
    rows, test_rows = np.arange(6), np.arange(6, 10)
    threads = torch.get_num_threads()
    try:
        one, _ = benchmark.fit_and_predict(config, films, rows, films, test_rows, seed=0)
        other, _ = benchmark.fit_and_predict(config, films, rows, films, test_rows, seed=benchmark.MEMBER_SEED_STRIDE)
        both, info = benchmark.fit_and_predict(config, films, rows, films, test_rows, seed=0, members=2)
    finally:
        torch.set_num_threads(threads)
    assert np.abs(one - other).max() > 1e-3
    np.testing.assert_allclose(both, (one + other) / 2, atol=1e-6)
    assert len(info["best_epochs"]) == 2


def test_tta_makes_the_regions_mirror_symmetric(real_films: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``--tta``: a film's regions are the mean of the model's regions of the film and of its mirror image with the
    lungs swapped back, so scoring the mirror images instead gives the same regions with the lungs swapped."""
    benchmark, config, films = ten_films(real_films, tmp_path, monkeypatch)
    rows, test_rows = np.arange(6), np.arange(6, 10)
    threads = torch.get_num_threads()
    try:
        model, _ = benchmark.train_model(config, films, rows, seed=0)
        mirror = benchmark.mirrored(films)
        both, plain = benchmark.regions_with_mirror(model, config, films, test_rows, mirror)
        swapped = benchmark.Films("mirror", mirror, 0)  # the mirror images as the films, the originals as their mirror
        again, _ = benchmark.regions_with_mirror(model, config, swapped, test_rows, films.cache)
        alone, same = benchmark.regions_with_mirror(model, config, films, test_rows, None)
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(again[:, list(benchmark.REGION_FLIP)], both, atol=1e-5)
    assert np.abs(both - plain).max() > 1e-4  # the mirror image changes the prediction
    np.testing.assert_array_equal(alone, plain)
    np.testing.assert_array_equal(same, plain)


def test_a_blend_averages_its_arms_regions(real_films: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``--pretrain blend``: a fold's regions are the mean of its arms' (one from scratch, one from a given backbone),
    each trained as it would be alone."""
    benchmark, config, films = ten_films(real_films, tmp_path, monkeypatch)
    fold = benchmark.Fold(0, 0, 1, np.arange(6), films, np.arange(6, 10))
    threads = torch.get_num_threads()
    try:
        model, _ = benchmark.train_model(config, films, np.arange(4), seed=5)
        start = {key: value.detach().clone() for key, value in model.state_dict().items()}
        scratch, pretrained = benchmark.Arm(films, config), benchmark.Arm(films, config, {0: start})
        tables = [benchmark.run_fold(arms, 1, False, False, fold)[0] for arms in ([scratch], [pretrained],
                                                                            [scratch, pretrained])]
    finally:
        torch.set_num_threads(threads)
    columns = [c for c in tables[0] if c.startswith("pred_")]
    one, other, both = (t[columns].to_numpy() for t in tables)
    assert np.abs(one - other).max() > 1e-3
    np.testing.assert_allclose(both, (one + other) / 2, atol=1e-6)


def test_refit_trains_on_every_row_for_the_first_runs_epochs_at_its_rates(real_films: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch):
    """``--refit``: a second network trains on all of the fold's training films (the validation fifth too) for the
    first run's best epoch count, each epoch at the first run's learning rate (``ReplayLR`` sets any sequence of
    rates, one its plateau scheduler would never draw); the model returned is the second's."""
    benchmark, config, films = ten_films(real_films, tmp_path, monkeypatch)
    config = benchmark.replace(config, train=benchmark.replace(
        config.train, max_epochs=8, warmup_epochs=6, early_stopping=100, scheduler_patience=0, scheduler_factor=0.5))
    runs = []

    def recorded(*args, **kwargs):
        result = fit(*args, **kwargs)
        runs.append((args[4], len(args[2].dataset), result))
        return result

    fit = benchmark.fit
    monkeypatch.setattr(benchmark, "fit", recorded)
    rows = np.arange(8)
    threads = torch.get_num_threads()
    try:
        plain, _ = benchmark.train_model(config, films, rows, seed=0)
        model, info = benchmark.train_model(config, films, rows, seed=0, refit=True)
    finally:
        torch.set_num_threads(threads)
    (_, fitted, first), (_, _, same), (schedule, everything, second) = runs
    assert same.best_epoch == first.best_epoch and fitted == info["fit"] < everything == info["refit"] == len(rows)
    assert schedule.max_epochs == first.best_epoch + 1 == second.epochs_run
    assert second.history["lr"].tolist() == first.history["lr"].tolist()[:schedule.max_epochs]
    rates = [1e-3, 2e-4, 3e-3, 5e-4]  # a rise: no plateau scheduler draws it
    tasks = [benchmark.get_task(benchmark.TASK)]
    short = benchmark.replace(config, train=benchmark.replace(config.train, max_epochs=len(rates)))
    _, replayed = benchmark.train_network(short, tasks, films.cache, rows, rows[:2], 0, None,
                                          benchmark.LAST_CHECKPOINT, (benchmark.ReplayLR(rates),))
    assert replayed.history["lr"].tolist() == rates
    test_rows = np.arange(8, 10)
    assert np.abs(benchmark.predict_regions(model, config, films.cache, test_rows)
                  - benchmark.predict_regions(plain, config, films.cache, test_rows)).max() > 1e-4


def test_the_loss_option_reaches_the_engine(real_films: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A fold trained with ``--loss l1`` hands the engine the absolute-error task (which is also the selection's
    validation loss); the default hands it mdmt's own."""
    benchmark, config, films = ten_films(real_films, tmp_path, monkeypatch)
    handed = []

    def engine(model, tasks, *args, **kwargs):
        handed.append(tasks[0])
        raise InterruptedError  # what was handed is all this test needs

    monkeypatch.setattr(benchmark, "fit", engine)
    for loss in benchmark.LOSSES:
        with pytest.raises(InterruptedError):
            benchmark.train_model(config, benchmark.replace(films, severity_loss=loss), np.arange(8), seed=0)
    assert [type(task) for task in handed] == [benchmark.RegressionTask, benchmark.AbsoluteErrorTask]
    assert handed[0] is benchmark.get_task(benchmark.TASK)


def test_the_default_blend_trains_on_a_folder_without_lung_masks(real_films: Path, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch):
    """The defaults (the MDMT model averaged with a twin-pretrained one) need no masks: a training folder without
    them trains severity alone in the MDMT arm."""
    ids = pd.read_csv(real_films / "brixia-scores.csv", dtype=str)["id"].head(10)
    folder = real_subset(real_films, tmp_path / "bare", ids)
    manifest = pd.read_csv(folder / "manifest.csv", dtype=str)
    manifest.assign(mask="").to_csv(folder / "manifest.csv", index=False)
    out, figures = run_benchmark(["--data", str(folder), "--folds", "2", "--pretrain", "blend", "--twin-preset", "tiny",
                                  "--pretrain-epochs", "1"], tmp_path / "cache", capsys, monkeypatch)
    assert "bare: 10 films, 0 with a lung mask" in out and "seed 0 twin pretraining" in out
    assert "models' best epochs" in out  # two models per fold
    assert figures["n"] == "10" and math.isfinite(float(figures["mae"]))
