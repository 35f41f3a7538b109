"""``protocol.calibration_fraction``: a ``calib`` part carved out of each fold's validation patients (seeded,
stratified, patient-grouped, twins kept together) that never trains or selects and that calibration is fitted on;
0 leaves the splits, the run's inputs and its files as they were."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mdmt.cache.image_cache import CONTENT_HASH
from mdmt.config import Config, load_config, to_dict
from mdmt.data.datasets import Dataset
from mdmt.data.splits import CALIB, carve_calibration, kfold_splits
from mdmt.errors import ConfigError
from mdmt.evaluate.scoring import rescore
from mdmt.protocols import dataset_split, get_protocol, split_groups, split_ids
from mdmt.runs import (
    CALIBRATION_FILE,
    changed_inputs,
    fingerprint,
    predictions_file,
    run_inputs,
)

CENTERS = {"A": 0.6, "B": 0.3, "C": 0.45}
"""Center → share of severe patients."""
TWINS = ("T0", "T1")
"""Two images, of two patients, with the same bytes: the splits treat them as one patient."""


def table(seed: int = 0) -> pd.DataFrame:
    """40 patients per center, every 4th with two images, and the twin pair (same content hash) in center A."""
    rng = np.random.default_rng(seed)
    rows = []
    for center, severe in CENTERS.items():
        for p in range(40):
            label = float(rng.random() < severe)
            for image in range(2 if p % 4 == 0 else 1):
                rows.append({"image_id": f"{center}{p}_{image}", "patient_id": f"{center}{p}", "center": center,
                             "prognosis": label, CONTENT_HASH: f"h{center}{p}_{image}"})
    rows += [{"image_id": twin, "patient_id": f"P{twin}", "center": "A", "prognosis": 1.0, CONTENT_HASH: "same"}
             for twin in TWINS]
    return pd.DataFrame(rows)


def official_dir(folder: Path, records: pd.DataFrame) -> Path:
    """5 folds of AFC split files cutting the records' patients into 60/20/20 by position (rotating)."""
    patients = sorted(records["patient_id"].unique())
    for fold in range(5):
        side = {p: {0: "test", 1: "val"}.get((i + fold) % 5, "train") for i, p in enumerate(patients)}
        part = records["patient_id"].map(side)
        for name in ("train", "val", "test"):
            path = folder / "AFC" / "5" / str(fold) / f"{name}.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            ids = records.loc[part == name, "image_id"]
            path.write_text("img label center\n" + "".join(f"{i} MILD A\n" for i in ids))
    return folder


def config_with(fraction: float, folder: Path) -> Config:
    return load_config(None, [{"protocol": {"dataset": "toy", "loco_centers": list(CENTERS),
                                            "official_splits_dir": str(folder),
                                            "calibration_fraction": fraction}}])


def toy(official_kind: str | None = "AFC") -> Dataset:
    return Dataset("toy", lambda: None, ("prognosis",), lambda r: r["prognosis"].to_numpy(float), official_kind)


PROTOCOLS = [("cv5", 0), ("cv5", 3), ("loco", 1), ("official-cv5", 2)]


# ------------------------------------------------------------------------------------------- (a) fraction 0
@pytest.mark.parametrize(("protocol", "fold"), PROTOCOLS)
def test_fraction_zero_gives_the_protocols_own_split_and_no_calib_part(tmp_path, protocol, fold):
    records = table()
    config = config_with(0.0, official_dir(tmp_path, records))
    assert load_config(None, []).protocol.calibration_fraction == 0.0  # the default
    split = dataset_split(toy(), records, protocol, fold, config, seed=0)
    own = get_protocol(protocol).splits(toy(), records, config, 0)[fold]  # what the protocol alone makes
    for part in ("train", "val", "test"):
        assert np.array_equal(getattr(split, part), getattr(own, part)), part
    assert len(split.calib) == 0 and list(split.parts()) == ["train", "val", "test"]
    assert list(split_ids({"toy": split})["toy"]) == ["train", "val", "test"]  # the inputs' split hash as before
    assert carve_calibration(split, split_groups(records), 0.0) is split


def test_fraction_zero_leaves_the_config_fingerprint_as_before_and_any_other_value_changes_it():
    default, carved = load_config(None, []), load_config(None, [{"protocol": {"calibration_fraction": 0.25}}])
    before = fingerprint(to_dict(default))
    assert "calibration_fraction" not in before["protocol"]  # runs recorded before the key existed stay reusable
    after = fingerprint(to_dict(carved))
    assert after["protocol"]["calibration_fraction"] == 0.25
    assert changed_inputs(run_inputs(to_dict(default), {}, {}), run_inputs(to_dict(carved), {}, {})) == [
        "config.protocol.calibration_fraction"]


# ------------------------------------------------------------------------------------------- (b) fraction 0.5
def _patient_of(records: pd.DataFrame) -> dict[str, str]:
    grouped = split_groups(records)
    return dict(zip(grouped["image_id"], grouped["patient_id"], strict=True))


@pytest.mark.parametrize(("protocol", "fold"), PROTOCOLS)
def test_half_of_the_val_patients_move_to_calib_stratified_and_never_beside_another_part(tmp_path, protocol, fold):
    records = table()
    folder = official_dir(tmp_path, records)
    before = dataset_split(toy(), records, protocol, fold, config_with(0.0, folder), seed=0)
    split = dataset_split(toy(), records, protocol, fold, config_with(0.5, folder), seed=0)
    assert list(split.parts()) == ["train", "val", CALIB, "test"]
    assert np.array_equal(split.train, before.train) and np.array_equal(split.test, before.test)
    assert set(split.val) | set(split.calib) == set(before.val) and not set(split.val) & set(split.calib)
    patient = _patient_of(records)
    sides = {part: {patient[i] for i in ids} for part, ids in split.parts().items()}
    others = sides["train"] | sides["val"] | sides["test"]
    assert not sides[CALIB] & others
    old_val = {patient[i] for i in before.val}
    assert len(sides[CALIB]) == math.ceil(0.5 * len(old_val))
    label = records.assign(patient=records["image_id"].map(patient)).groupby("patient")["prognosis"].first()
    for part in ("val", CALIB):
        assert set(label[list(sides[part])]) == {0.0, 1.0}, part  # both classes on both sides
    for value in (0.0, 1.0):  # stratified: each class cut in half, to one patient
        in_val = (label[list(old_val)] == value).sum()
        assert abs((label[list(sides[CALIB])] == value).sum() - in_val / 2) <= 1
    twin_sides = {part for part, ids in split.parts().items() if set(TWINS) & set(ids)}
    assert len(twin_sides) <= 1  # byte-identical images stay together


def test_the_carve_is_deterministic_for_a_seed_and_moves_other_patients_for_another(tmp_path):
    records = table()
    config = config_with(0.5, official_dir(tmp_path, records))
    first = dataset_split(toy(), records, "official-cv5", 0, config, seed=0)
    again = dataset_split(toy(), records.copy(), "official-cv5", 0, config, seed=0)  # not the memo: a new frame
    other = dataset_split(toy(), records.copy(), "official-cv5", 0, config, seed=1)
    assert np.array_equal(first.calib, again.calib) and np.array_equal(first.val, again.val)
    assert np.array_equal(first.train, other.train)  # the files fix the split; the seed draws the calib part
    assert set(first.calib) != set(other.calib)


def test_carving_keeps_one_val_patient_and_leaves_a_single_patient_val_whole():
    records = table()
    fold = kfold_splits(records, k=5, seed=0)[0]
    patients = len({p for p in records.set_index("image_id").loc[fold.val, "patient_id"]})
    almost_all = carve_calibration(fold, records, 0.99, seed=0)
    assert len(set(records.set_index("image_id").loc[almost_all.val, "patient_id"])) == 1
    assert len(set(records.set_index("image_id").loc[almost_all.calib, "patient_id"])) == patients - 1
    alone = dataclasses.replace(fold, val=fold.val[:1])
    assert carve_calibration(alone, records, 0.5, seed=0) is alone


# ------------------------------------------------------------------------------------------- (d) bad values
@pytest.mark.parametrize("value", [1.0, -0.1, 1.5])
def test_a_fraction_outside_zero_to_one_is_a_config_error(value):
    allowed = rf"protocol\.calibration_fraction = {value} is not allowed: must be in \[0, 1\)"
    with pytest.raises(ConfigError, match=allowed):
        load_config(None, [{"protocol": {"calibration_fraction": value}}])
    with pytest.raises(ConfigError, match="fraction must be >= 0 and < 1"):
        carve_calibration(kfold_splits(table(), k=5)[0], table(), value)


# ------------------------------------------------------------------------------------------- (c) a tiny run
def _run(tiny_config: Config, results: Path, fraction: float) -> tuple[Path, Config]:
    from mdmt.runs import RunSpec
    from mdmt.train.run import train_run

    config = dataclasses.replace(
        tiny_config, results_dir=str(results),
        protocol=dataclasses.replace(tiny_config.protocol, calibration_fraction=fraction),
        train=dataclasses.replace(tiny_config.train, max_epochs=1),
        calibration=dataclasses.replace(tiny_config.calibration, alpha=0.25))
    return train_run(config, RunSpec("stl_prognosis", "tiny_cnn", "cv5", 0, 0), progress=False), config


def _home_split(config: Config, caches, fraction: float):
    from mdmt.data.datasets import select

    config = dataclasses.replace(config, protocol=dataclasses.replace(config.protocol,
                                                                      calibration_fraction=fraction))
    dataset = select(config, ["aiforcovid"])["aiforcovid"]
    return dataset_split(dataset, caches["aiforcovid"].records, "cv5", 0, config, 0)


def test_a_run_with_a_calib_part_predicts_it_and_fits_calibration_on_it_alone(tiny_config, tiny_caches, tmp_path,
                                                                               one_torch_thread):
    run_dir, config = _run(tiny_config, tmp_path / "results", 0.5)
    whole, split = _home_split(config, tiny_caches, 0.0), _home_split(config, tiny_caches, 0.5)
    assert len(split.calib) and len(split.val)
    calib = pd.read_csv(run_dir / predictions_file("prognosis", CALIB))
    val = pd.read_csv(run_dir / predictions_file("prognosis", "val"))
    test = pd.read_csv(run_dir / predictions_file("prognosis"))
    assert list(calib.columns) == list(val.columns) == list(test.columns)
    assert set(calib["image_id"].astype(str)) == set(split.calib)  # the calib part, every image labelled
    assert set(val["image_id"].astype(str)) == set(split.val)  # only the rows that chose the epoch
    assert set(calib["image_id"].astype(str)) | set(val["image_id"].astype(str)) == set(whole.val)
    fitted = json.loads((run_dir / CALIBRATION_FILE).read_text())["prognosis"]
    assert "error" not in fitted and fitted["part"] == CALIB
    assert fitted["sets"]["n_calibration"] == len(calib) < len(whole.val)
    inputs = json.loads((run_dir / "inputs.json").read_text())
    assert inputs["config"]["protocol"]["calibration_fraction"] == 0.5
    assert "- prognosis: fitted on the calibration part (held out of model selection) (binary." in (
        run_dir / "model_card.md").read_text()
    (run_dir / CALIBRATION_FILE).unlink()
    assert rescore(tmp_path / "results") == 1  # mdmt report --rescore fits it again from the files
    assert json.loads((run_dir / CALIBRATION_FILE).read_text())["prognosis"] == fitted


def test_a_run_without_a_calib_part_writes_no_calib_file_and_fits_on_val(tiny_config, tiny_caches, tmp_path,
                                                                         one_torch_thread):
    run_dir, config = _run(tiny_config, tmp_path / "results", 0.0)
    assert not list(run_dir.glob(f"{CALIB}_*"))
    val = pd.read_csv(run_dir / predictions_file("prognosis", "val"))
    assert set(val["image_id"].astype(str)) == set(_home_split(config, tiny_caches, 0.0).val)
    fitted = json.loads((run_dir / CALIBRATION_FILE).read_text())["prognosis"]
    assert fitted["part"] == "val" and fitted["sets"]["n_calibration"] == len(val)
    assert "- prognosis: fitted on the validation fold (binary." in (run_dir / "model_card.md").read_text()
    assert "calibration_fraction" not in json.loads((run_dir / "inputs.json").read_text())["config"]["protocol"]


def test_model_selection_sees_the_val_part_only(tiny_config, tiny_caches):
    from mdmt.data.loaders import build_data
    from mdmt.tasks import get_task

    splits = {"aiforcovid": _home_split(tiny_config, tiny_caches, 0.5)}
    caches = {"aiforcovid": tiny_caches["aiforcovid"]}
    data = build_data(tiny_config, caches, splits, [get_task("prognosis")], seed=0)
    assert len(data.val.dataset) == len(splits["aiforcovid"].val)  # the loader the engine selects on
    assert len(data.parts[CALIB]["aiforcovid"].dataset) == len(splits["aiforcovid"].calib)
    assert set(data.parts) == {"train", "val", CALIB, "test"}
    without = build_data(tiny_config, caches, {"aiforcovid": _home_split(tiny_config, tiny_caches, 0.0)},
                         [get_task("prognosis")], seed=0)
    assert set(without.parts) == {"train", "val", "test"}
