"""A run that fuses clinical data, used on new films: ``mdmt predict``, ``explain`` and ``export`` with a clinical
sheet (rows matched to films by id, encoded with the run's training-fold encoder), and every bad input."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.infer_runs import train_tiny_run

from mdmt.cli import main
from mdmt.config import PluginRef
from mdmt.errors import ConfigError
from mdmt.infer.cam import grad_cams
from mdmt.infer.clinical_sheet import IMPUTED_COLUMN
from mdmt.infer.explain import explain_files
from mdmt.infer.export import PREPROCESSING_FILE, export_run
from mdmt.infer.films import load_film, network_input
from mdmt.infer.model_io import load_trained
from mdmt.infer.predict import predict_files
from mdmt.runs import RunSpec, predictions_file
from mdmt.sources.tables import read_table
from mdmt.train.run import train_run

COLUMNS = ["Age", "Sex", "LDH", "PaO2", "SaO2", "RespiratoryFailure"]
TOLERANCE = 1e-4


def _train(tiny_config, results: Path, name: str, **params) -> Path:
    stage = {"datasets": ["aiforcovid", "brixia"], "tasks": ["prognosis", "severity"], "clinical": COLUMNS, **params}
    config = dataclasses.replace(
        tiny_config, results_dir=str(results),
        strategies={**tiny_config.strategies, name: PluginRef("train", stage)},
        model=dataclasses.replace(tiny_config.model, severity_task="severity_regions"),
        train=dataclasses.replace(tiny_config.train, max_epochs=1),
    )
    return train_run(config, RunSpec(name, "tiny_cnn", "cv5", 0, 0), progress=False)


@pytest.fixture(scope="module")
def run_dir(tiny_config, tiny_caches, tmp_path_factory) -> Path:
    """A finished one-epoch ``mdmt_clinical`` run (logit fusion, the clinical term kept at the regression's)."""
    return _train(tiny_config, tmp_path_factory.mktemp("clinical-runs"), "mdmt_clinical")


@pytest.fixture(scope="module")
def sheet(tiny_data) -> pd.DataFrame:
    """The tiny twin's first AIforCOVID sheet as read in training (every cell text or blank)."""
    return read_table(tiny_data / "AIforCOVID" / "AIforCOVID.xlsx")


@pytest.fixture(scope="module")
def test_films(run_dir, tiny_caches) -> pd.DataFrame:
    """Training's own test predictions of prognosis, with each film's path."""
    truth = pd.read_csv(run_dir / predictions_file("prognosis"), dtype={"image_id": str})
    records = tiny_caches["aiforcovid"].records.set_index("image_id")
    return truth.assign(path=records.loc[truth["image_id"], "path"].to_numpy()).set_index("image_id")


def _write(table: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False)
    return path


def _films_in(sheet: pd.DataFrame, test_films: pd.DataFrame, n: int) -> pd.DataFrame:
    ids = sheet["ImageFile"].map(lambda name: Path(name).stem)
    return test_films.loc[[i for i in test_films.index if i in set(ids)][:n]]


# ------------------------------------------------------------------------------------------------- training
def test_the_clinical_term_is_the_training_folds_logistic_regression(tiny_config, run_dir, tiny_caches, tmp_path):
    """The fused model starts from (and, not trainable, keeps) clinical_only's solution: same coefficients, so
    the clinical term's test probabilities are clinical_only's; the image branch adds a residual."""
    baseline = _train(tiny_config, tmp_path, "clinical_only", datasets=["aiforcovid"], tasks=["prognosis"],
                      estimator="clinical_logistic")
    trained = load_trained(run_dir)
    records = tiny_caches["aiforcovid"].records.set_index("image_id")
    expected = pd.read_csv(baseline / predictions_file("prognosis"), dtype={"image_id": str})
    features = torch.from_numpy(trained.encoder.transform(records.loc[expected["image_id"]]))
    with torch.no_grad():
        logits = trained.model.clinical["prognosis"](features)
    np.testing.assert_allclose(torch.softmax(logits, dim=1)[:, 1].numpy(), expected["score"], atol=1e-6)
    assert not any(name.startswith("clinical.") for name, _ in trained.model.named_parameters())
    assert torch.count_nonzero(trained.model.clinical["prognosis"].weight[1]) == trained.encoder.dim


def test_a_trainable_clinical_term_moves_and_runs_are_deterministic(tiny_config, run_dir, tmp_path):
    tuned = _train(tiny_config, tmp_path / "a", "mdmt_clinical", clinical_trainable=True)
    again = _train(tiny_config, tmp_path / "b", "mdmt_clinical", clinical_trainable=True)
    first, second = (pd.read_csv(d / predictions_file("prognosis")) for d in (tuned, again))
    pd.testing.assert_frame_equal(first, second)  # same config and seed: the same numbers
    fixed, moved = (load_trained(d).model.clinical["prognosis"] for d in (run_dir, tuned))
    assert not torch.allclose(fixed.weight, moved.weight)  # trained from the regression's start


# ------------------------------------------------------------------------------------------------- predict
def test_predictions_with_the_sheet_equal_trainings_own(run_dir, sheet, test_films, tmp_path):
    films = _films_in(sheet, test_films, 6)
    assert len(films) >= 3
    result = predict_files(run_dir, films["path"], tmp_path / "out", batch_size=4, progress=False,
                           clinical=_write(sheet, tmp_path / "sheet.csv"))
    got = result.table.set_index("image_id").loc[films.index]
    np.testing.assert_allclose(got["p_severe"], films["score"], atol=1e-5)
    assert result.skipped.empty and IMPUTED_COLUMN in pd.read_csv(tmp_path / "out" / "predictions.csv").columns


def test_an_excel_sheet_with_another_id_column_and_a_blank_value(run_dir, sheet, test_films, tmp_path):
    stems = sheet["ImageFile"].map(lambda n: Path(n).stem)
    films = _films_in(sheet[sheet["LDH"].notna()], test_films, 2)
    rows = sheet[stems.isin(films.index)].assign(film=stems).drop(columns="ImageFile").set_index("film", drop=False)
    rows = rows.loc[films.index]
    blank = rows.copy()
    blank.loc[films.index[0], "LDH"] = np.nan
    path = tmp_path / "sheet.xlsx"
    blank.to_excel(path, index=False)
    result = predict_files(run_dir, films["path"], tmp_path / "out", progress=False, clinical=path,
                           clinical_id="film")
    table = result.table.set_index("image_id")
    assert table.loc[films.index[0], IMPUTED_COLUMN] == ";".join(c for c in COLUMNS if pd.isna(blank.iloc[0][c]))
    assert "LDH" in table.loc[films.index[0], IMPUTED_COLUMN].split(";")
    np.testing.assert_allclose(table.loc[films.index[1], "p_severe"], films.iloc[1]["score"], atol=1e-5)
    # the blank is imputed as in training: the training mean (0 after scaling) and the missing indicator
    trained = load_trained(run_dir)
    x = network_input([load_film(films.iloc[0]["path"], trained.config.data).image], trained)
    features = trained.encoder.transform(blank.iloc[:1])
    names = trained.encoder.names
    assert features[0, names.index("LDH")] == 0.0 and features[0, names.index("LDH_missing")] == 1.0
    expected = torch.softmax(trained.outputs(x, torch.from_numpy(features))["prognosis"], dim=1)[0, 1]
    np.testing.assert_allclose(table.loc[films.index[0], "p_severe"], float(expected), atol=1e-5)
    assert abs(table.loc[films.index[0], "p_severe"] - films.iloc[0]["score"]) > 1e-4  # LDH mattered


def test_films_without_a_usable_row_are_skipped_by_name(run_dir, sheet, test_films, tmp_path):
    films = _films_in(sheet, test_films, 3)
    stems = sheet["ImageFile"].map(lambda n: Path(n).stem)
    kept = sheet[stems.isin(films.index[:2])].copy()
    kept.loc[kept["ImageFile"].map(lambda n: Path(n).stem) == films.index[1], "PaO2"] = "high"
    result = predict_files(run_dir, films["path"], tmp_path / "out", progress=False,
                           clinical=_write(kept, tmp_path / "sheet.csv"))
    assert list(result.table["image_id"]) == [films.index[0]]
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv").set_index("path")["reason"]
    assert len(skipped) == 2
    assert f"no row with ImageFile '{films.index[2]}'" in skipped[films.iloc[2]["path"]]
    assert "not a number: PaO2 = 'high'" in skipped[films.iloc[1]["path"]]


@pytest.mark.parametrize("change, match", [
    (lambda s: s.drop(columns=["LDH", "Sex"]), r"lacks column\(s\) \['Sex', 'LDH'\]"),
    (lambda s: s.rename(columns={"ImageFile": "file"}), r"lacks column\(s\) \['ImageFile'\]"),
    (lambda s: pd.concat([s, s.head(1)]), "several rows"),
])
def test_a_bad_sheet_is_refused_before_any_film(run_dir, sheet, test_films, tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        predict_files(run_dir, test_films["path"][:2], tmp_path / "out", progress=False,
                      clinical=_write(change(sheet), tmp_path / "sheet.csv"))
    assert not (tmp_path / "out").exists()


def test_a_clinical_run_needs_a_sheet_and_an_image_run_takes_none(run_dir, tiny_config, sheet, test_films,
                                                                   tmp_path, capsys):
    films = [str(p) for p in test_films["path"][:2]]
    assert main(["predict", "--run", str(run_dir), *films, "--out", str(tmp_path / "a")]) == 2
    message = " ".join(capsys.readouterr().err.split())
    assert "--clinical" in message and "'LDH'" in message and "'RespiratoryFailure'" in message
    image_only = train_tiny_run(tiny_config, tmp_path / "image-run")
    sheet_path = _write(sheet, tmp_path / "sheet.csv")
    with pytest.raises(ConfigError, match="reads no clinical columns"):
        predict_files(image_only, films, tmp_path / "b", progress=False, clinical=sheet_path)
    assert main(["predict", "--run", str(run_dir), *films, "--clinical", str(sheet_path), "--out",
                 str(tmp_path / "c")]) == 0
    assert len(pd.read_csv(tmp_path / "c" / "predictions.csv")) == 2
    assert main(["predict", "--run", str(run_dir), *films, "--set", f"infer.clinical={sheet_path}",
                 "--set", "infer.clinical_id=ImageFile", "--out", str(tmp_path / "d")]) == 0


# ------------------------------------------------------------------------------------------------- explain
def test_explain_a_clinical_run(run_dir, sheet, test_films, tmp_path):
    films = _films_in(sheet, test_films, 2)
    result = explain_files(run_dir, films["path"], tmp_path / "out", progress=False,
                           clinical=_write(sheet, tmp_path / "sheet.csv"))
    assert len(result.table) == 2 and (tmp_path / "out" / result.table["overlay_prognosis"][0]).is_file()
    np.testing.assert_allclose(result.table.set_index("image_id").loc[films.index, "p_severe"], films["score"],
                               atol=1e-5)
    # the clinical term adds to the logits: the map (the image branch's evidence) does not depend on it
    trained = load_trained(run_dir)
    x = network_input([load_film(p, trained.config.data).image for p in films["path"]], trained)
    zeros, shifted = torch.zeros(2, trained.encoder.dim), torch.full((2, trained.encoder.dim), 3.0)
    maps = [grad_cams(trained.model, trained.prognosis, x, c) for c in (zeros, shifted)]
    assert maps[0].shape == (2, 48, 48) and maps[0].max() > 0
    np.testing.assert_allclose(maps[0], maps[1], atol=1e-5)


# ------------------------------------------------------------------------------------------------- export
def _vector(info: dict, row: pd.Series) -> np.ndarray:
    """The clinical vector built from ``preprocessing.json`` alone, as its steps say."""
    out: list[float] = []
    for name in info["columns"]:
        value = row[name]
        blank = pd.isna(value)
        if name in info["numeric"]:
            mean, std = info["numeric"][name]
            out.append(0.0 if blank else (float(value) - mean) / std)
        else:
            out += [float(not blank and str(value) == c) for c in info["categories"][name]]
        out.append(float(blank))
    return np.array(out, dtype=np.float32)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_takes_the_image_and_the_clinical_vector(run_dir, sheet, test_films, tmp_path, fmt):
    ort = pytest.importorskip("onnxruntime") if fmt == "onnx" else None
    export_run(run_dir, fmt, tmp_path)
    info = json.loads((tmp_path / PREPROCESSING_FILE).read_text())["clinical"]
    trained = load_trained(run_dir)
    assert info["input"] == {"name": "clinical", "shape": ["batch", trained.encoder.dim], "dtype": "float32"}
    assert info["features"] == trained.encoder.names and info["columns"] == COLUMNS
    films = _films_in(sheet, test_films, 5)
    rows = sheet.set_index(sheet["ImageFile"].map(lambda n: Path(n).stem)).loc[films.index]
    built = np.stack([_vector(info, row) for _, row in rows.iterrows()])
    np.testing.assert_allclose(built, trained.encoder.transform(rows), atol=1e-6)
    x = network_input([load_film(p, trained.config.data).image for p in films["path"]], trained)
    expected = trained.outputs(x, torch.from_numpy(built))
    if ort is not None:
        session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["image", "clinical"]
        got = session.run(None, {"image": x.numpy(), "clinical": built})
    else:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated
            got = [t.numpy() for t in torch.jit.load(str(tmp_path / "model.pt"))(x, torch.from_numpy(built))]
    for task, values in zip([t.name for t in trained.tasks], got, strict=True):
        np.testing.assert_allclose(values, expected[task].numpy(), atol=TOLERANCE, rtol=0)
    probabilities = torch.softmax(torch.from_numpy(got[0]), dim=1)[:, 1].numpy()
    np.testing.assert_allclose(probabilities, films["score"], atol=TOLERANCE)
