"""``mdmt predict`` with the run's calibration.json: the calibrated probability, the class at the run's threshold,
the conformal prediction set and the Brixia intervals per film, equal to the fitted maps applied by hand; a run
without calibration.json gets one note and none of these columns."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers.infer_runs import train_tiny_run

from mdmt.cli import main
from mdmt.config import CalibrationConfig
from mdmt.errors import DataError
from mdmt.evaluate.calibration import BinaryCalibration
from mdmt.infer.predict import predict_files
from mdmt.runs import CALIBRATION_FILE
from mdmt.tasks import REGIONS

CALIBRATED = ["p_severe_calibrated", "prognosis_at_threshold", "prognosis_set", "brixia_global_low",
              "brixia_global_high", *[f"brixia_{r}_{end}" for r in REGIONS for end in ("low", "high")]]


@pytest.fixture(scope="module")
def run_dir(tiny_config, tiny_caches, tmp_path_factory) -> Path:
    """A finished MDMT run (prognosis and regional severity heads) whose calibration.json fitted both heads: the tiny
    twin's validation folds hold 7 and 8 home films, too few for alpha = 0.1 (9), enough for 0.25."""
    config = dataclasses.replace(tiny_config, calibration=CalibrationConfig(alpha=0.25))
    run_dir = train_tiny_run(config, tmp_path_factory.mktemp("calibrated-run"))
    fitted = json.loads((run_dir / CALIBRATION_FILE).read_text())
    assert set(fitted) == {"prognosis", "severity_regions"} and not any("error" in f for f in fitted.values())
    return run_dir


@pytest.fixture(scope="module")
def films(tiny_caches) -> list[Path]:
    """Six films of each dataset."""
    return [Path(p) for name in ("aiforcovid", "brixia") for p in tiny_caches[name].records["path"].head(6)]


def test_calibrated_columns_are_the_fitted_maps_applied_to_each_film(run_dir, films, tmp_path):
    table = predict_files(run_dir, films, tmp_path, progress=False).table
    assert [c for c in table.columns if c in CALIBRATED] == CALIBRATED
    assert table.columns.get_loc("brixia_bin_range") + 1 == table.columns.get_loc("p_severe_calibrated")
    assert table.columns.get_loc("brixia_F_high") < table.columns.get_loc("crop_method")
    fitted = json.loads((run_dir / CALIBRATION_FILE).read_text())
    binary = BinaryCalibration.from_dict(fitted["prognosis"]["binary"])
    logit = np.log(table["p_severe"] / (1 - table["p_severe"]))
    probability = 1 / (1 + np.exp(-(logit / binary.temperature + binary.bias)))
    np.testing.assert_allclose(table["p_severe_calibrated"], probability, rtol=1e-6)
    assert list(table["prognosis_at_threshold"]) == ["SEVERE" if p >= binary.threshold else "MILD"
                                                     for p in probability]
    quantile = fitted["prognosis"]["sets"]["quantile"]
    expected_sets = ["|".join(name for name, p in (("MILD", 1 - q), ("SEVERE", q)) if 1 - p <= quantile)
                     for q in probability]
    assert list(table["prognosis_set"].fillna("")) == expected_sets
    width = fitted["severity_regions"]["global"]["half_width"][0]
    np.testing.assert_allclose(table["brixia_global_low"], np.clip(table["brixia_global"] - width, 0, 18))
    np.testing.assert_allclose(table["brixia_global_high"], np.clip(table["brixia_global"] + width, 0, 18))
    for region, half in zip(REGIONS, fitted["severity_regions"]["regions"]["half_width"]):
        np.testing.assert_allclose(table[f"brixia_{region}_low"], np.clip(table[f"brixia_{region}"] - half, 0, 3))
        np.testing.assert_allclose(table[f"brixia_{region}_high"], np.clip(table[f"brixia_{region}"] + half, 0, 3))
    written = pd.read_csv(tmp_path / "predictions.csv", keep_default_na=False)
    assert list(written["prognosis_set"]) == expected_sets


def test_a_run_without_calibration_json_says_so_once_and_writes_no_calibrated_column(run_dir, films, tmp_path,
                                                                                     capsys):
    older = Path(shutil.copytree(run_dir, tmp_path / "run"))
    (older / CALIBRATION_FILE).unlink()
    out = tmp_path / "out"
    assert main(["predict", "--run", str(older), *map(str, films), "--out", str(out), "--batch-size", "4"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if CALIBRATION_FILE in line]
    assert len(notes) == 1 and notes[0].startswith(f"{older}: no {CALIBRATION_FILE}")
    assert "mdmt report --rescore" in notes[0]  # the run has its validation predictions to fit it from
    written = pd.read_csv(out / "predictions.csv")
    assert len(written) == len(films) and not set(CALIBRATED) & set(written.columns)
    assert "p_severe" in written.columns


def test_a_head_that_was_not_calibrated_gets_a_note_and_no_columns(run_dir, films, tmp_path):
    partial = Path(shutil.copytree(run_dir, tmp_path / "run"))
    fitted = json.loads((partial / CALIBRATION_FILE).read_text())
    fitted["severity_regions"] = {"error": "alpha=0.1 needs at least 9 calibration samples, got 8"}
    (partial / CALIBRATION_FILE).write_text(json.dumps(fitted))
    result = predict_files(partial, films, tmp_path / "out", progress=False)
    assert [n for n in result.notes if "not calibrated" in n] == [
        f"{partial / CALIBRATION_FILE}: severity_regions not calibrated (alpha=0.1 needs at least 9 calibration "
        "samples, got 8): no calibrated columns for it"]
    assert [c for c in result.table.columns if c in CALIBRATED] == CALIBRATED[:3]


def test_a_damaged_calibration_json_is_one_error_naming_it(run_dir, films, tmp_path):
    damaged = Path(shutil.copytree(run_dir, tmp_path / "run"))
    fitted = json.loads((damaged / CALIBRATION_FILE).read_text())
    del fitted["prognosis"]["binary"]["temperature"]
    (damaged / CALIBRATION_FILE).write_text(json.dumps(fitted))
    with pytest.raises(DataError, match=f"{damaged / CALIBRATION_FILE}: the prognosis entry is unreadable"):
        predict_files(damaged, films[:2], tmp_path / "out", progress=False)
