"""The model card: the fields of a tiny run's card with the values its folder and its splits give, the bootstrap
intervals, calibration when the run holds it, and the synthetic-data warning of predict."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from helpers.infer_runs import train_tiny_run
from sklearn.metrics import roc_auc_score

import mdmt
from mdmt.cli import main
from mdmt.config import CalibrationConfig
from mdmt.data.datasets import select
from mdmt.evaluate import calibration as calib
from mdmt.evaluate.scoring import read_predictions, rescore, run_entries
from mdmt.model_card import (
    CARD_JSON,
    CARD_MD,
    INTENDED_USE,
    SYNTHETIC_LICENCE,
    _ratio,
    _roc_auc,
    bootstrap_intervals,
    card_metadata,
    headline_statistics,
    recalibrate,
    source_commit,
    synthetic_warning,
    write_model_card,
)
from mdmt.protocols import build_splits
from mdmt.runs import (
    CALIBRATION_FILE,
    CONFIG_FILE,
    INPUTS_FILE,
    METRICS_FILE,
    TASKS_FILE,
    RunSpec,
)
from mdmt.train.run import resolved_config

RESAMPLES = 300


@pytest.fixture(scope="module")
def run_dir(tiny_config, tiny_caches, tmp_path_factory) -> Path:
    return train_tiny_run(tiny_config, tmp_path_factory.mktemp("card-runs"))


@pytest.fixture(scope="module")
def card(run_dir) -> dict:
    return card_metadata(run_dir, resamples=RESAMPLES)


def _copy_with_config(run_dir: Path, folder: Path, **data: object) -> Path:
    """A copy of the run folder (same layout depth) whose ``config.yaml`` has ``data`` keys replaced."""
    copy = folder / "runs" / "mdmt" / "tiny_cnn" / "cv5" / "fold0" / "seed0"
    shutil.copytree(run_dir, copy)
    config = yaml.safe_load((copy / CONFIG_FILE).read_text())
    config["data"].update(data)
    (copy / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    return copy


def test_card_names_the_version_the_fingerprint_and_the_tasks(run_dir, card):
    inputs = json.loads((run_dir / INPUTS_FILE).read_text())
    assert card["version"] == mdmt.__version__
    fingerprint = hashlib.sha256(json.dumps(inputs["config"], sort_keys=True).encode()).hexdigest()
    assert card["config_fingerprint"] == fingerprint
    assert card["tasks"] == json.loads((run_dir / TASKS_FILE).read_text())
    assert card["run"] | {"folder": None} == {"strategy": "mdmt", "backbone": "tiny_cnn", "protocol": "cv5", "fold": 0,
                                              "seed": 0, "folder": None}
    image = card["network_data_format"]["inputs"]["image"]
    assert image["spatial_shape"] == [48, 48] and image["preprocessing"]["crop"] == "lungs_classical"
    assert card["intended_use"] == INTENDED_USE == "research; not for clinical decisions"


def test_card_commit_is_the_checkout_head(card):
    repo = Path(mdmt.__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        pytest.skip("mdmt is not running from a git checkout")
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=False)
    if head.returncode != 0:
        pytest.skip(f"git cannot read the checkout: {head.stderr.strip()}")
    assert card["mdmt_commit"] == head.stdout.strip() == source_commit()[0]


def test_training_data_sizes_match_the_runs_split(tiny_config, tiny_caches, run_dir, card):
    config = resolved_config(tiny_config, RunSpec("mdmt", "tiny_cnn", "cv5", 0, 0))
    splits = build_splits(config, select(config, ["aiforcovid", "brixia"]), tiny_caches, "cv5", 0, 0)
    assert [d["dataset"] for d in card["training_data"]] == ["aiforcovid", "brixia"]
    for data in card["training_data"]:
        assert data["synthetic"] is True and data["licence"] == SYNTHETIC_LICENCE
        assert data["parts_from"] == "caches"
        records = tiny_caches[data["dataset"]].records.set_index("image_id")
        for part, ids in splits[data["dataset"]].parts().items():
            rows = records.loc[list(ids)]
            summary = data["parts"][part]
            assert summary["images"] == len(ids) > 0
            assert summary["patients"] == rows["patient_id"].nunique()
            assert summary["centers"] == rows["center"].value_counts().sort_index().to_dict()


def test_metrics_equal_metrics_json_and_intervals_hold_the_point(run_dir, card):
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    assert set(card["eval_metrics"]) == set(metrics) == {"prognosis", "severity_regions"}
    for key, result in card["eval_metrics"].items():
        assert result["values"] == metrics[key]
        table = read_predictions(run_dir / f"predictions_{key}.csv")
        assert result["n"] == len(table) == metrics[key]["n"]
        assert set(result["ci95"]) >= ({"accuracy", "roc_auc"} if key == "prognosis" else {"mae", "global_mae"})
        for metric, (low, high) in result["ci95"].items():
            assert low <= metrics[key][metric] <= high, (key, metric)


def test_headline_statistics_reproduce_the_scorer(run_dir):
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    for task, entry in run_entries(run_dir).items():
        table = read_predictions(run_dir / f"predictions_{task}.csv")
        for metric, statistic in headline_statistics(entry, table).items():
            assert statistic(np.arange(len(table))[None])[0] == pytest.approx(metrics[task][metric], abs=1e-12)


def test_roc_auc_statistic_is_sklearns_with_ties():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 2, 60)
    score = np.round(rng.random(60) + 0.3 * truth, 1)  # rounded: many ties
    idx = rng.integers(0, 60, (20, 60))
    expected = [roc_auc_score(truth[i], score[i]) for i in idx]
    np.testing.assert_allclose(_roc_auc(truth, score)(idx), expected, atol=1e-12)


def test_bootstrap_interval_of_a_proportion_is_near_the_normal_one():
    correct = np.r_[np.ones(140), np.zeros(60)]
    low, high = bootstrap_intervals({"accuracy": _ratio(correct)}, len(correct), resamples=2000)["accuracy"]
    half = 1.96 * np.sqrt(0.7 * 0.3 / 200)
    assert low == pytest.approx(0.7 - half, abs=0.01) and high == pytest.approx(0.7 + half, abs=0.01)
    again = [bootstrap_intervals({"a": _ratio(correct)}, 200, 500) for _ in range(2)]
    assert again[0] == again[1]  # seeded


def test_without_the_caches_the_test_part_comes_from_the_predictions(run_dir, tmp_path):
    copy = _copy_with_config(run_dir, tmp_path, cache_dir=str(tmp_path / "no-cache"))
    data = {d["dataset"]: d for d in card_metadata(copy, resamples=50)["training_data"]}
    for name, task in (("aiforcovid", "prognosis"), ("brixia", "severity_regions")):
        table = pd.read_csv(copy / f"predictions_{task}.csv", dtype=str)
        assert data[name]["parts_from"] == "predictions"
        assert data[name]["parts"] == {"test": {"images": len(table), "patients": table["patient_id"].nunique(),
                                                "centers": table["center"].value_counts().sort_index().to_dict()}}


def test_written_card_holds_the_metrics_and_the_limits(run_dir, tmp_path):
    out = tmp_path / "card"
    paths = write_model_card(run_dir, out)
    assert paths == [out / CARD_JSON, out / CARD_MD]
    written = json.loads(paths[0].read_text())
    metrics = json.loads((run_dir / METRICS_FILE).read_text())
    assert written["name"] == "mdmt tiny_cnn cv5 fold 0 seed 0"
    assert written["eval_metrics"]["prognosis"]["values"] == metrics["prognosis"]
    text = paths[1].read_text()
    n = int(metrics["prognosis"]["n"])
    assert f"| prognosis | aiforcovid | {n} | accuracy | {metrics['prognosis']['accuracy']:.4g} | [" in text
    assert "**Intended use: research; not for clinical decisions.**" in text
    assert "- Trained on synthetic films (aiforcovid, brixia): its outputs say nothing about real patients." in text


def test_calibration_is_measured_on_the_test_fold(run_dir, tmp_path, card):
    stored = json.loads((run_dir / CALIBRATION_FILE).read_text()) if (run_dir / CALIBRATION_FILE).is_file() else {}
    for task, fitted in stored.items():  # the tiny run's validation folds are too small for alpha = 0.1
        if "error" in fitted:
            assert card["calibration"]["tasks"][task] == {"status": "not fitted", "reason": fitted["error"]}
    copy = _copy_with_config(run_dir, tmp_path)
    (copy / CALIBRATION_FILE).unlink(missing_ok=True)
    bare = card_metadata(copy, resamples=50)
    assert bare["calibration"] == {"status": "not fitted", "tasks": {}}
    assert any(limit.startswith("prognosis: not calibrated") for limit in bare["known_limits"])

    def plant(temperature: float, quantile: float, half_width: float) -> dict:
        total = calib.IntervalConformal(0.1, (6 * half_width,), 0.0, 18.0, 20)
        regions = calib.IntervalConformal(0.1, (half_width,) * 6, 0.0, 3.0, 20)
        maps = {"prognosis": {"binary": calib.BinaryCalibration(temperature, 0.5).to_dict(),
                              "sets": calib.BinaryConformal(0.1, quantile, 20).to_dict()},
                "severity_regions": {"global": total.to_dict(), "regions": regions.to_dict()}}
        (copy / CALIBRATION_FILE).write_text(json.dumps(maps))
        result = card_metadata(copy, resamples=50)["calibration"]
        assert result["status"] == "fitted"
        return {task: entry["test"] for task, entry in result["tasks"].items()}

    n = len(read_predictions(copy / "predictions_prognosis.csv"))
    wide = plant(1.0, 1.0, 3.0)  # identity map, every class in every set, intervals over the whole range
    assert wide["prognosis"]["ece"] == pytest.approx(wide["prognosis"]["ece_uncalibrated"], abs=1e-9)
    assert (wide["prognosis"]["sets_coverage"], wide["prognosis"]["sets_mean_size"], wide["prognosis"]["sets_n"]) == (
        1.0, 2.0, n)
    severity = wide["severity_regions"]
    assert (severity["global_coverage"], severity["global_mean_width"]) == (1.0, 18.0)
    assert (severity["regions_coverage"], severity["regions_mean_width"]) == (1.0, 3.0)
    narrow = plant(4.0, 0.0, 0.0)  # a flattening map, no class in any set, zero-width intervals
    assert narrow["prognosis"]["ece"] != pytest.approx(narrow["prognosis"]["ece_uncalibrated"], abs=1e-6)
    assert (narrow["prognosis"]["sets_coverage"], narrow["prognosis"]["sets_empty"]) == (0.0, 1.0)
    # the flattening map puts every film in the bins around 0.5: a perfectly calibrated model would show less error
    assert 0 < narrow["prognosis"]["ece_floor"] < wide["prognosis"]["ece_floor"]
    assert narrow["severity_regions"]["global_mean_width"] == 0.0
    text = write_model_card(copy)[1].read_text()
    assert "- prognosis: fitted on the validation fold (binary.temperature 4, " in text
    assert "on the test fold: ece_uncalibrated " in text and "sets_coverage 0, " in text


def test_synthetic_warning_from_the_card_or_the_config(run_dir, tmp_path):
    assert "trained on synthetic data (aiforcovid, brixia" in synthetic_warning(run_dir)
    real = _copy_with_config(run_dir, tmp_path)
    (real / CARD_JSON).unlink()  # without its card, the run's data are read from its config
    config = yaml.safe_load((real / CONFIG_FILE).read_text())
    for name in ("aiforcovid", "brixia"):  # the same datasets copied where no twin marker lies beside them
        source = Path(config["data"]["datasets"][name]["params"]["root"])
        shutil.copytree(source, tmp_path / "real" / source.name)
        config["data"]["datasets"][name]["params"]["root"] = str(tmp_path / "real" / source.name)
    (real / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
    assert synthetic_warning(real) is None
    write_model_card(real)  # the card, once written, is what the warning reads
    card = json.loads((real / CARD_JSON).read_text())
    card["training_data"][0]["synthetic"] = True
    (real / CARD_JSON).write_text(json.dumps(card))
    assert "(aiforcovid, mdmt's twin)" in synthetic_warning(real)


def test_predict_prints_one_warning_line_for_a_synthetic_model(run_dir, tiny_data, tmp_path, capsys):
    film = min((tiny_data / "AIforCOVID" / "imgs").glob("*.dcm"))
    assert main(["predict", "--run", str(run_dir), str(film), "--out", str(tmp_path / "p")]) == 0
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "synthetic" in line] == [synthetic_warning(run_dir)]


def test_recalibrating_refits_every_run_with_the_settings_given_and_records_them(run_dir, tmp_path):
    """``mdmt report --recalibrate`` (``recalibrate``): calibration.json is fitted again with the
    settings given, the run's config.yaml and model card say so, its metrics and everything else in its config
    stay; ``--rescore`` alone then keeps the run's (new) settings."""
    copy = _copy_with_config(run_dir, tmp_path)
    config_before = yaml.safe_load((copy / CONFIG_FILE).read_text())
    metrics_before = json.loads((copy / "metrics.json").read_text())
    settings = CalibrationConfig(method="platt", threshold="youden", alpha=0.5)
    assert recalibrate(tmp_path, settings) == 1
    fitted = json.loads((copy / CALIBRATION_FILE).read_text())["prognosis"]
    assert (fitted["binary"]["method"], fitted["binary"]["threshold_rule"], fitted["sets"]["alpha"]) == (
        "platt", "youden", 0.5)
    config_after = yaml.safe_load((copy / CONFIG_FILE).read_text())
    assert config_after["calibration"] == {"method": "platt", "threshold": "youden", "target_sensitivity": 0.9,
                                           "alpha": 0.5}
    assert {k: v for k, v in config_after.items() if k != "calibration"} == {
        k: v for k, v in config_before.items() if k != "calibration"}
    assert json.loads((copy / "metrics.json").read_text()) == metrics_before
    card = json.loads((copy / CARD_JSON).read_text())
    assert card["calibration"]["tasks"]["prognosis"]["fitted"]["binary"]["threshold_rule"] == "youden"
    assert "binary.threshold_rule youden" in (copy / CARD_MD).read_text()
    assert rescore(tmp_path) == 1  # the run's own settings are now the ones recorded
    assert json.loads((copy / CALIBRATION_FILE).read_text())["prognosis"] == fitted
