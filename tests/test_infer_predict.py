"""``mdmt predict``: the training preprocessing and predictions on new files, every format, bad files listed,
and the run folders it refuses."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.dicom_fixtures import write_dicom
from helpers.infer_runs import train_tiny_run, write_variants

from mdmt.cli import main
from mdmt.errors import ConfigError, DataError
from mdmt.images import normalize_intensity, read_image
from mdmt.infer.films import expand_inputs, load_film
from mdmt.infer.model_io import load_trained
from mdmt.infer.predict import predict_files
from mdmt.runs import BEST_CHECKPOINT, DONE_FILE, FAILED_FILE, TASKS_FILE
from mdmt.tasks import REGIONS
from mdmt.train.checkpoints import save_checkpoint

REGION_COLUMNS = [f"brixia_{r}" for r in REGIONS]


@pytest.fixture(scope="module")
def run_dir(tiny_config, tiny_caches, tmp_path_factory) -> Path:
    """A finished MDMT run with the prognosis and the regional severity heads."""
    return train_tiny_run(tiny_config, tmp_path_factory.mktemp("infer-runs"))


def training_predictions(run_dir: Path, caches: dict, task: str, dataset: str) -> pd.DataFrame:
    """Training's own test predictions of a few films of ``task``, with each film's path and cache row."""
    truth = pd.read_csv(run_dir / f"predictions_{task}.csv", dtype={"image_id": str}).head(5)
    records = caches[dataset].records.reset_index(drop=True).reset_index().set_index("image_id")
    rows = records.loc[truth["image_id"]]
    return truth.assign(path=rows["path"].to_numpy(), row=rows["index"].to_numpy()).set_index("image_id")


def _copy_run(run_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / "run"))


@pytest.mark.parametrize("task, dataset", [("prognosis", "aiforcovid"), ("severity_regions", "brixia")])
def test_preprocessing_and_predictions_equal_trainings_own(run_dir, tiny_caches, tmp_path, task, dataset):
    truth = training_predictions(run_dir, tiny_caches, task, dataset)
    trained = load_trained(run_dir)
    for film in truth.itertuples():
        assert np.array_equal(load_film(film.path, trained.config.data).image, tiny_caches[dataset].images[film.row])
    result = predict_files(run_dir, truth["path"], tmp_path, batch_size=3, progress=False)
    got = result.table.set_index("image_id").loc[truth.index]
    if task == "prognosis":
        np.testing.assert_allclose(got["p_severe"], truth["score"], atol=1e-5)
    else:
        expected = np.clip(truth[[f"y_pred_{r}" for r in REGIONS]].to_numpy(), 0, 3)
        np.testing.assert_allclose(got[REGION_COLUMNS].to_numpy(), expected, atol=1e-5)


def test_every_format_is_predicted_and_bad_files_are_listed(run_dir, tiny_data, tmp_path):
    dicoms = sorted((tiny_data / "BRIXIA" / "dicom_clean").glob("*.dcm"))[:3]
    films = tmp_path / "films"
    variants = write_variants(dicoms[0], films / "converted")
    pixels = np.rint((1 - normalize_intensity(read_image(dicoms[1]))) * 4000).astype(np.uint16)  # a chest film
    write_dicom(films / "nested" / "mono1.dcm", pixels, photometric="MONOCHROME1", bits_stored=12)
    (films / "broken.dcm").write_bytes(b"DICM but not really a DICOM file")
    (films / "empty.png").write_bytes(b"")
    (films / "notes.txt").write_text("not an image")
    missing = tmp_path / "absent.jpg"
    result = predict_files(run_dir, [*dicoms, films, missing], tmp_path / "out", batch_size=4, progress=False)

    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert len(table) == len(result.table) == 3 + 3  # DICOMs, JPEG, 16-bit PNG, MONOCHROME1 DICOM
    assert set(table["path"]) >= {str(variants["jpeg"]), str(variants["png16"]), str(films / "nested" / "mono1.dcm")}
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert set(skipped["path"]) == {str(films / "broken.dcm"), str(films / "empty.png"), str(missing)}
    assert skipped["reason"].str.len().gt(0).all()
    assert "empty file" in skipped.set_index("path").loc[str(films / "empty.png"), "reason"]

    assert ((table["p_severe"] >= 0) & (table["p_severe"] <= 1)).all()
    assert set(table["prognosis"]) <= {"MILD", "SEVERE"}
    assert table[REGION_COLUMNS].ge(0).all().all() and table[REGION_COLUMNS].le(3).all().all()
    np.testing.assert_allclose(table["brixia_global"], table[REGION_COLUMNS].sum(axis=1), atol=1e-9)
    assert table["brixia_bin"].between(0, 3).all()
    assert {"crop_method", "crop_ok", "crop_note", "crop_x0", "crop_y1"} <= set(table.columns)

    payload = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert len(payload["predictions"]) == len(table) and len(payload["skipped"]) == len(skipped)
    assert payload["tasks"] == ["prognosis", "severity_regions"]


def test_real_films_are_predicted(run_dir, real_films, tmp_path):
    images = sorted((real_films / "images").glob("*.png"))[:6]
    result = predict_files(run_dir, images, tmp_path, progress=False)
    assert len(result.table) == len(images) and result.skipped.empty
    assert result.table["p_severe"].between(0, 1).all()


def test_a_global_bin_head_gives_the_bin_and_its_probabilities(tiny_config, tiny_caches, tiny_data, tmp_path):
    run = train_tiny_run(tiny_config, tmp_path / "results", severity_task="severity_global4")
    dicoms = sorted((tiny_data / "BRIXIA" / "dicom_clean").glob("*.dcm"))[:4]
    table = predict_files(run, dicoms, tmp_path / "out", progress=False).table
    probabilities = table[[f"p_bin_{c}" for c in range(4)]]
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (table["brixia_bin"] == probabilities.to_numpy().argmax(axis=1)).all()
    assert set(table["brixia_bin_range"]) <= {"0-4", "5-9", "10-14", "15-18"}
    assert "brixia_A" not in table.columns


def test_folders_are_expanded_once_each(tiny_data):
    folder = tiny_data / "BRIXIA" / "dicom_clean"
    first = sorted(folder.glob("*.dcm"))[0]
    inputs = expand_inputs([folder, first])
    assert len(inputs.files) == len(list(folder.glob("*.dcm"))) and not inputs.skipped


# ------------------------------------------------------------------------------------------------- refusals
def test_an_unfinished_or_failed_run_is_refused(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path)
    (run / DONE_FILE).unlink()
    with pytest.raises(ConfigError, match="unfinished"):
        load_trained(run)
    (run / FAILED_FILE).write_text("boom")
    with pytest.raises(ConfigError, match=f"{run}.*failed"):
        load_trained(run)


def test_a_folder_that_is_not_a_run_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="not a run folder"):
        load_trained(tmp_path)
    with pytest.raises(ConfigError, match="not found"):
        load_trained(tmp_path / "absent")


def test_a_missing_or_foreign_checkpoint_is_refused(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path)
    state = torch.load(run / BEST_CHECKPOINT, weights_only=True)["model"]
    (run / BEST_CHECKPOINT).unlink()
    with pytest.raises(DataError, match="checkpoint not found"):
        load_trained(run)
    torch.save({"state_dict": state}, run / BEST_CHECKPOINT)  # another program's checkpoint
    with pytest.raises(DataError, match="not an mdmt checkpoint"):
        load_trained(run)
    other_heads = {k.replace("heads.severity_regions.", "heads.severity_global4."): v for k, v in state.items()}
    save_checkpoint({"model": other_heads}, run / BEST_CHECKPOINT)
    with pytest.raises(ConfigError, match="holds heads"):
        load_trained(run)
    wider = {k: torch.cat([v, v]) if k.endswith("features.0.weight") else v for k, v in state.items()}
    save_checkpoint({"model": wider}, run / BEST_CHECKPOINT)
    with pytest.raises(ConfigError, match="does not fit"):
        load_trained(run)


def test_a_task_list_from_another_version_is_refused(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path)
    entries = json.loads((run / TASKS_FILE).read_text())
    entries["severity_regions"]["groups"] = ["A", "B"]
    (run / TASKS_FILE).write_text(json.dumps(entries))
    with pytest.raises(ConfigError, match="another version"):
        load_trained(run)


class _Planted:
    """Pickles as a call that writes a marker file (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "executed"))


@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_a_planted_pickle_is_never_executed(run_dir, tmp_path, writer):
    run = _copy_run(run_dir, tmp_path)
    marker = tmp_path / "pwned"
    planted = {"format": 2, "model": _Planted(marker)}
    if writer == "pickle":
        (run / BEST_CHECKPOINT).write_bytes(pickle.dumps(planted, protocol=2))
    else:
        torch.save(planted, run / BEST_CHECKPOINT)
    with pytest.raises(DataError, match="not a readable mdmt checkpoint") as refused:
        load_trained(run)
    assert not marker.exists()
    message = str(refused.value)  # one line naming the file and what it holds, never how to load it unsafely
    assert message.startswith(f"{run / BEST_CHECKPOINT}: ") and "\n" not in message
    assert "Unsupported global: GLOBAL " in message
    assert not any(word in message for word in ("weights_only", "safe_globals", "can still be loaded", "trust"))


# ------------------------------------------------------------------------------------------------- command line
def _truncated_png(tmp_path: Path) -> Path:
    """A PNG cut after its signature, under a folder name long enough that its path passes 80 columns."""
    bad = tmp_path / ("films-from-the-admissions-archive-" * 3) / "bad.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert len(f"skipped {bad}") > 100
    return bad


def test_cli_predict_writes_the_files_and_lists_skipped(run_dir, tiny_data, tmp_path, capsys):
    dicom = sorted((tiny_data / "BRIXIA" / "dicom_clean").glob("*.dcm"))[0]
    bad = _truncated_png(tmp_path)
    out = tmp_path / "out"
    assert main(["predict", "--run", str(run_dir), str(dicom), str(bad), "--out", str(out), "--batch-size", "2"]) == 0
    printed = capsys.readouterr()
    skipped = [line for line in printed.err.splitlines() if line.startswith("skipped ")]
    assert len(skipped) == 1 and skipped[0].startswith(f"skipped {bad}: ")  # on standard error, one unbroken line
    assert "skipped " + str(bad) not in printed.out and f"1 film(s) predicted, 1 skipped → {out}" in printed.out
    assert {p.name for p in out.iterdir()} == {"predictions.csv", "predictions.json", "skipped.csv"}


@pytest.mark.parametrize("command", ["predict", "explain"])
def test_cli_exits_1_when_no_film_could_be_read(run_dir, tmp_path, capsys, command):
    bad = _truncated_png(tmp_path)
    assert main([command, "--run", str(run_dir), str(bad), str(tmp_path / "absent.dcm"),
                 "--out", str(tmp_path / "out")]) == 1
    printed = capsys.readouterr()
    lines = printed.err.splitlines()
    assert sorted(line.split(": ")[0] for line in lines[:2]) == [f"skipped {tmp_path / 'absent.dcm'}", f"skipped {bad}"]
    assert lines[2] == f"no film {command}ed: all 2 file(s) skipped, each for the reason above"
    assert "skipped" not in printed.out
    assert len(pd.read_csv(tmp_path / "out" / "skipped.csv")) == 2


def test_cli_predict_on_an_unfinished_run_exits_2_with_one_line(tmp_path, capsys):
    assert main(["predict", "--run", str(tmp_path), str(tmp_path / "x.dcm")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not a run folder" in err and "Traceback" not in err
