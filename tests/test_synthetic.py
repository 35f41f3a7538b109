"""The synthetic twin: real layouts and formats, exact truth, determinism, faults and learnability."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from rich.console import Console
from scipy import ndimage
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

from mdmt.errors import ConfigError
from mdmt.images import normalize_intensity, read_image
from mdmt.sources import read_manifest
from mdmt.sources.aiforcovid import KNOWN_BAD_IDS
from mdmt.synth import (
    AIFORCOVID_BLOCKS,
    COHORT_SEVERE_RATE,
    FAULTS,
    PRESETS,
    SEVERE_RATE,
    VENDORS,
    ZONE_MASK_STEP,
    SynthPreset,
    cohort_sizes,
    draw_profiles,
    generate,
    plan_aiforcovid,
)
from mdmt.tasks import REGIONS

INT64_MAX = 2**63 - 1
SHEETS = {"imgs": "AIforCOVID.xlsx", "imgs_r2": "AIforCOVID_r2.xlsx", "imgs_r3": "AIforCOVID_r3.xlsx"}
ID_PATTERNS = {"imgs": r"P_\d+", "imgs_r2": r"P_[12]_\d+", "imgs_r3": r"P_3_\d+"}
MANIFEST_COLUMNS = ["image", "patient", "center", "outcome", *(f"brixia_{r}" for r in REGIONS), "brixia_global"]
TINY_SEED0_DIGEST = "475224eca4e674e2bfa351a2397a4e5429d6ad4af52dea0f000369b8a73c0807"
"""``tree_digest`` of ``generate(out, "tiny", seed=0)`` with generator version 2 (the lungs' darkness varies per
patient; prognosis slope 2.0), written with pydicom 3.0.2, openpyxl 3.1.5, pandas 3.1.1, Pillow 13.0.0 and numpy
2.4.6 (the versions a fresh install resolved on 2026-12-06; the pin made with earlier versions no longer held). A change
of the generator that moves it must bump ``GENERATOR_VERSION``."""
WRITER_PACKAGES = ("pydicom", "openpyxl", "pandas", "pillow", "numpy")


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def tree_digest(root: Path) -> str:
    """One SHA-256 over every file's relative path and SHA-256."""
    listing = "".join(f"{name} {digest}\n" for name, digest in file_hashes(root).items())
    return hashlib.sha256(listing.encode()).hexdigest()


def truth(root: Path, dataset: str) -> pd.DataFrame:
    return pd.read_csv(root / "_synthetic_truth" / f"{dataset}.csv", dtype={"image_id": str, "patient_id": str},
                       keep_default_na=False, na_values=[""])


def sheets(root: Path) -> pd.DataFrame:
    return pd.concat([pd.read_excel(root / "AIforCOVID" / name, dtype={"ImageFile": str}).assign(folder=folder)
                      for folder, name in SHEETS.items()], ignore_index=True)


def metadata(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "BRIXIA" / "metadata_global_v2.csv", sep=";", dtype=str, encoding="utf-8-sig")


def zone_map(root: Path, dataset: str, image_id: str) -> np.ndarray:
    return np.asarray(Image.open(root / "_synthetic_truth" / "masks" / dataset / f"{image_id}.png")) // ZONE_MASK_STEP


def mask_box(zones: np.ndarray) -> tuple[int, int, int, int]:
    """End-exclusive ``(x0, y0, x1, y1)`` of the nonzero zone codes."""
    rows, cols = np.flatnonzero(zones.any(axis=1)), np.flatnonzero(zones.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    """600 AIforCOVID and 300 cohort patients at 64 px, coupled and decoupled (same seed): enough for rates and AUCs."""
    spec = SynthPreset("probe", 64, 12, 2, dict.fromkeys("ABCDEF", 100))
    roots = {}
    for decoupled in (False, True):
        roots[decoupled] = tmp_path_factory.mktemp(f"probe-{decoupled}")
        generate(roots[decoupled], spec, seed=5, decoupled=decoupled, progress=False, cohort=True)
    return roots


# ------------------------------------------------------------------------------------------------ layout
def test_layout_and_file_counts(tiny_data: Path):
    spec = PRESETS["tiny"]
    assert len(list((tiny_data / "BRIXIA" / "dicom_clean").glob("*.dcm"))) == spec.brixia_images
    listed = sheets(tiny_data)
    on_disk = {folder: sorted(p.stem for p in (tiny_data / "AIforCOVID" / folder).glob("*.dcm")) for folder in SHEETS}
    assert sum(map(len, on_disk.values())) == sum(spec.aiforcovid.values()) == len(listed)
    for folder, ids in on_disk.items():
        assert ids and all(re.fullmatch(ID_PATTERNS[folder], i) for i in ids), (folder, ids)
        assert sorted(listed.loc[listed["folder"] == folder, "ImageFile"]) == ids
    assert listed["Hospital"].value_counts().to_dict() == dict(spec.aiforcovid)
    assert set(listed["Prognosis"]) == {"MILD", "SEVERE"}
    for prefix, center in (("P_2_", "C"), ("P_1_", "F"), ("P_3_", "F")):
        assert set(listed.loc[listed["ImageFile"].str.startswith(prefix), "Hospital"]) == {center}
    masks = list((tiny_data / "_synthetic_truth" / "masks").rglob("*.png"))
    assert len(masks) == spec.brixia_images + sum(spec.aiforcovid.values())


def test_aiforcovid_release_one_ids_lie_in_their_hospital_block(tiny_data: Path):
    listed = sheets(tiny_data)
    release_one = listed[listed["folder"] == "imgs"]
    for image_file, hospital in zip(release_one["ImageFile"], release_one["Hospital"]):
        number = int(image_file.removeprefix("P_"))
        block = next(b for b in AIFORCOVID_BLOCKS if b.release == 1 and any(number in r for r in b.numbers))
        assert block.center == hospital, image_file


def test_clinical_columns_have_ten_to_thirty_percent_blanks(probe: dict[bool, Path]):
    listed = sheets(probe[False])
    for column in ("Age", "Sex", "Temp_C", "WBC", "CRP", "LDH", "D-dimer", "Ox_percentage", "PaO2", "SaO2",
                   "Position", "Death", "Diabetes", "HighBloodPressure"):
        blank = listed[column].isna().mean()
        assert 0.05 <= blank <= 0.35, (column, blank)
    assert listed[["ImageFile", "Hospital", "Prognosis"]].notna().all().all()
    severe = listed["Prognosis"] == "SEVERE"
    assert listed.loc[~severe, "Death"].fillna(0).eq(0).all() and listed.loc[severe, "Death"].mean() > 0.15
    assert listed.loc[severe, "PaO2"].mean() < listed.loc[~severe, "PaO2"].mean()


def test_medium_plan_uses_the_real_id_blocks():
    spec = PRESETS["medium"]
    plans = plan_aiforcovid(spec, 0, draw_profiles(0, spec.image_size))
    ids = [p.image_id for p in plans]
    assert len(ids) == len(set(ids)) == sum(spec.aiforcovid.values())
    assert not set(ids) & KNOWN_BAD_IDS
    by_prefix = pd.Series([re.sub(r"\d+$", "", i) for i in ids]).value_counts().to_dict()
    assert by_prefix == {"P_": 820, "P_3_": 482, "P_1_": 160, "P_2_": 120}
    release_one = sorted(int(i[2:]) for i in ids if i.count("_") == 1)
    assert release_one[0] >= 1 and release_one[-1] <= 844 and 844 - len(release_one) == 24


# ------------------------------------------------------------------------------------------------ BrixIA tables
def test_brixia_metadata_format(tiny_data: Path):
    raw = (tiny_data / "BRIXIA" / "metadata_global_v2.csv").read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf") and raw.splitlines()[0].count(b";") == 13 and b"," not in raw
    table = metadata(tiny_data)
    scores = table["BrixiaScore"]
    assert scores.str.fullmatch(r"[0-3]{6}").all() and scores.str.startswith("0").any()
    digit_sum = scores.map(lambda text: sum(int(c) for c in text))
    assert (digit_sum == table["BrixiaScoreGlobal"].astype(int)).all()
    ids = table["Filename"].str.removesuffix(".dcm")
    assert table["Filename"].str.endswith(".dcm").all() and ids.str.fullmatch(r"\d{16,20}").all()
    assert (ids.map(int) > INT64_MAX).any() and (ids.map(int) <= INT64_MAX).any()
    per_subject = table["Subject"].value_counts()
    assert per_subject.max() >= 2 and len(per_subject) < len(table)
    assert table["StudyDate"].str.fullmatch(r"2020(03\d\d|040[1-4])").all()
    raw_vendors = {spelling for vendor in VENDORS for spelling in vendor.spellings}
    assert set(table["Manufacturer"]) <= raw_vendors and "SIEMENS" in set(table["Manufacturer"])
    assert set(table["PhotometricInterpretation"]) == {"MONOCHROME1", "MONOCHROME2"}


def test_consensus_rows_match_the_flag(tiny_data: Path):
    flagged = set(metadata(tiny_data).query("ConsensusTestset == '1'")["Filename"])
    path = tiny_data / "BRIXIA" / "metadata_consensus_v1.csv"
    assert path.read_text().splitlines()[0].startswith("Filename,MeanA,")
    consensus = pd.read_csv(path, dtype={"Filename": str})
    assert set(consensus["Filename"]) == flagged and len(flagged) == PRESETS["tiny"].brixia_consensus
    means = consensus[[f"Mean{r}" for r in REGIONS]]
    modes = consensus[[f"Mode{r}" for r in REGIONS]]
    assert means.ge(0).all().all() and means.le(3).all().all() and modes.isin([0, 1, 2, 3]).all().all()
    np.testing.assert_allclose(consensus["MeanGlobal"], means.sum(axis=1), atol=1e-6)
    np.testing.assert_array_equal(consensus["ModeGlobal"], modes.sum(axis=1))
    true = truth(tiny_data, "brixia").set_index("image_id").loc[consensus["Filename"].str.removesuffix(".dcm")]
    assert np.abs(means.to_numpy() - true[[f"true_{r}" for r in REGIONS]].to_numpy()).mean() < 0.5


def test_labels_are_the_truth_with_annotator_slips(tiny_data: Path):
    table = truth(tiny_data, "brixia")
    true = table[[f"true_{r}" for r in REGIONS]].to_numpy()
    labelled = table[[f"label_{r}" for r in REGIONS]].to_numpy()
    difference = np.abs(labelled - true)
    assert difference.sum(axis=1).max() <= 1 and 0 < difference.sum() <= 0.3 * len(table)
    by_file = metadata(tiny_data).set_index("Filename")["BrixiaScore"]
    assert list(by_file.loc[table["image_id"] + ".dcm"]) == ["".join(map(str, row)) for row in labelled]


# ------------------------------------------------------------------------------------------------ DICOM
def test_dicoms_match_tables_and_store_monochrome1_inverted(tiny_data: Path):
    meta = metadata(tiny_data).set_index("Filename")
    tables = {"brixia": truth(tiny_data, "brixia"), "aiforcovid": truth(tiny_data, "aiforcovid")}
    seen = {"photometric": set(), "syntax": set(), "bits": set()}
    for dataset, table in tables.items():
        for row in table.itertuples():
            ds = pydicom.dcmread(tiny_data / row.path)
            stored = ds.pixel_array.astype(np.int64)
            assert stored.shape == (row.rows, row.columns) == (ds.Rows, ds.Columns)
            assert ds.PhotometricInterpretation == row.photometric and ds.BitsStored == row.bits_stored
            assert ds.file_meta.TransferSyntaxUID == row.transfer_syntax and ds.Manufacturer == row.manufacturer
            assert ds.PatientID == row.patient_id and stored.max() < 2**ds.BitsStored
            if dataset == "brixia":
                listed = meta.loc[f"{row.image_id}.dcm"]
                assert (ds.Modality, ds.PhotometricInterpretation, str(ds.Rows), str(ds.Columns)) == (
                    listed["Modality"], listed["PhotometricInterpretation"], listed["Rows"], listed["Columns"])
            display = (2**ds.BitsStored - 1) - stored if row.photometric == "MONOCHROME1" else stored
            zones = zone_map(tiny_data, dataset, row.image_id)
            between = display[row.y0:row.y1, (row.x0 + row.x1) // 2 - 1:(row.x0 + row.x1) // 2 + 2]
            assert display[zones > 0].mean() < between.mean(), row.image_id  # dark lungs, bright mediastinum
            seen["photometric"].add(row.photometric)
            seen["syntax"].add(row.transfer_syntax)
            seen["bits"].add(row.bits_stored)
    assert seen["photometric"] == {"MONOCHROME1", "MONOCHROME2"} and len(seen["syntax"]) == 3
    assert len(seen["bits"]) >= 3


def test_truth_boxes_and_zone_masks_are_exact(tiny_data: Path):
    for dataset in ("brixia", "aiforcovid"):
        for row in truth(tiny_data, dataset).itertuples():
            zones = zone_map(tiny_data, dataset, row.image_id)
            assert mask_box(zones) == (row.x0, row.y0, row.x1, row.y1)
            assert ndimage.label(zones > 0)[1] == 2 and set(np.unique(zones)) == set(range(7))
            centre_x = [np.nonzero(zones == k)[1].mean() for k in range(1, 7)]
            centre_y = [np.nonzero(zones == k)[0].mean() for k in range(1, 7)]
            assert max(centre_x[:3]) < zones.shape[1] / 2 < min(centre_x[3:])  # A-C on the image's left
            assert centre_y[0] < centre_y[1] < centre_y[2] and centre_y[3] < centre_y[4] < centre_y[5]


def test_profiles_vary_size_within_the_preset_range(tiny_data: Path):
    table = pd.concat([truth(tiny_data, "brixia"), truth(tiny_data, "aiforcovid")])
    size = PRESETS["tiny"].image_size
    sides = np.concatenate([table["rows"], table["columns"]])
    assert sides.min() >= 0.85 * size and sides.max() <= 1.27 * size
    assert table.groupby(["rows", "columns"]).ngroups >= 4


# ------------------------------------------------------------------------------------------------ determinism
def test_same_seed_is_byte_identical_and_a_new_seed_replaces_it(tiny_data: Path, tmp_path: Path):
    reference = file_hashes(tiny_data)
    out = tmp_path / "twin"
    generate(out, "tiny", seed=0, progress=False)
    assert file_hashes(out) == reference
    generate(out, "tiny", seed=1, progress=False)
    other = file_hashes(out)
    assert len(list((out / "BRIXIA" / "dicom_clean").glob("*.dcm"))) == PRESETS["tiny"].brixia_images
    shared = set(other) & set(reference)
    assert not {k for k in shared if k.endswith(".dcm") and other[k] == reference[k]}
    for name in ("AIforCOVID/AIforCOVID.xlsx", "BRIXIA/metadata_global_v2.csv", "_synthetic_truth/brixia.csv"):
        assert other[name] != reference[name]


def test_tiny_output_is_pinned(tiny_data: Path):
    """The generator writes exactly the pinned bytes for its version (the digest also depends on the pinned
    pydicom, openpyxl, pandas and Pillow versions)."""
    from importlib.metadata import version

    versions = ", ".join(f"{name} {version(name)}" for name in WRITER_PACKAGES)
    assert tree_digest(tiny_data) == TINY_SEED0_DIGEST, f"written with {versions}"


def test_rendering_in_processes_writes_the_same_bytes(tmp_path: Path):
    generate(tmp_path / "twin", "tiny", seed=0, progress=False, workers=2)
    assert tree_digest(tmp_path / "twin") == TINY_SEED0_DIGEST


def test_refuses_to_write_over_foreign_data(tmp_path: Path):
    (tmp_path / "BRIXIA").mkdir()
    (tmp_path / "BRIXIA" / "keep.txt").write_text("real data")
    with pytest.raises(ConfigError, match="not written by the synthetic generator"):
        generate(tmp_path, "tiny", progress=False)
    assert (tmp_path / "BRIXIA" / "keep.txt").is_file()


def test_bad_arguments_are_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="unknown synthetic preset 'huge'"):
        generate(tmp_path, "huge", progress=False)
    with pytest.raises(ConfigError, match="unknown synthetic fault"):
        generate(tmp_path, "tiny", faults=["exploding_file"], progress=False)
    with pytest.raises(ConfigError, match="opacity"):
        generate(tmp_path, "tiny", opacity=-0.1, progress=False)


# ------------------------------------------------------------------------------------------------ faults
def test_each_fault_adds_exactly_its_faulty_item(tiny_data: Path, tmp_path: Path):
    clean = file_hashes(tiny_data)
    summary = generate(tmp_path, "tiny", seed=0, faults=FAULTS, progress=False)
    assert sorted(f.name for f in summary.faults) == sorted(FAULTS)
    item = {f.name: f for f in summary.faults}
    assert len({f.image_id for f in summary.faults}) == len(FAULTS)
    faulty = file_hashes(tmp_path)
    changed = {k for k in set(clean) | set(faulty) if clean.get(k) != faulty.get(k)}
    expected = {item[name].path for name in ("missing_file", "truncated_dicom", "rgb_dicom", "unlisted_file")}
    expected |= {f"_synthetic_truth/masks/aiforcovid/{item['unlisted_file'].image_id}.png"}
    expected |= {"_synthetic_truth/aiforcovid.csv", "_synthetic_truth/params.json"}
    assert {k for k in changed if not k.endswith(".xlsx")} == expected

    listed = sheets(tmp_path)
    missing = item["missing_file"]
    assert not (tmp_path / missing.path).exists() and missing.image_id in set(listed["ImageFile"])
    unlisted = item["unlisted_file"]
    assert (tmp_path / unlisted.path).is_file() and unlisted.image_id not in set(listed["ImageFile"])
    with pytest.raises(Exception):  # noqa: B017  (pydicom raises several types on a cut file)
        pydicom.dcmread(tmp_path / item["truncated_dicom"].path).pixel_array
    rgb = pydicom.dcmread(tmp_path / item["rgb_dicom"].path)
    assert rgb.SamplesPerPixel == 3 and rgb.PhotometricInterpretation == "RGB"
    assert rgb.pixel_array.shape == (rgb.Rows, rgb.Columns, 3) and rgb.pixel_array.std() > 0
    assert listed.loc[listed["Prognosis"] == "UNKNOWN", "ImageFile"].tolist() == [item["bad_label"].image_id]
    duplicated = listed["ImageFile"][listed["ImageFile"].duplicated()].tolist()
    assert duplicated == [item["duplicate_id"].image_id]
    clean_listed = sheets(tiny_data)
    assert len(listed) == len(clean_listed) + 1


# ------------------------------------------------------------------------------------------------ learnability
def test_zone_intensity_follows_the_zone_score_within_a_film(tiny_data: Path):
    """Opacities brighten a zone against the film's other zones, but the lungs' darkness varies from patient to
    patient, so raw brightness across films is a weak read-out of the score: a model has to find the opacities."""
    raw_means, raw_scores, relative_means, relative_scores = [], [], [], []
    for row in truth(tiny_data, "brixia").itertuples():
        image = normalize_intensity(read_image(tiny_data / row.path))
        zones = zone_map(tiny_data, "brixia", row.image_id)
        means = np.array([image[zones == k].mean() for k in range(1, len(REGIONS) + 1)])
        scores = np.array([getattr(row, f"true_{region}") for region in REGIONS])
        raw_means += list(means)
        raw_scores += list(scores)
        relative_means += list(means - means.mean())
        relative_scores += list(scores - scores.mean())
    assert spearmanr(relative_means, relative_scores).statistic > 0.6
    assert spearmanr(raw_means, raw_scores).statistic < 0.5
    assert len(set(raw_scores)) == 4


def test_prognosis_follows_severity_and_the_hospital_rates(probe: dict[bool, Path]):
    table = truth(probe[False], "aiforcovid")
    severe = (table["prognosis"] == "SEVERE").astype(int)
    rates = severe.groupby(table["center"]).mean()
    for center, rate in rates.items():
        assert abs(rate - SEVERE_RATE[center]) < 0.06, (center, rate)
    assert rates["A"] > rates["C"] > max(rates[c] for c in "BDEF")
    assert 0.68 < roc_auc_score(severe, table["true_global"]) < 0.9  # the oracle ceiling, well below 1
    assert abs(roc_auc_score(severe, table["h"]) - 0.5) < 0.1


def test_decoupled_prognosis_follows_heart_size_only(probe: dict[bool, Path]):
    coupled, decoupled = truth(probe[False], "aiforcovid"), truth(probe[True], "aiforcovid")
    pd.testing.assert_series_equal(coupled["true_global"], decoupled["true_global"])  # same images
    severe = (decoupled["prognosis"] == "SEVERE").astype(int)
    assert abs(spearmanr(decoupled["true_global"], severe).statistic) < 0.12
    assert roc_auc_score(severe, decoupled["h"]) > 0.7
    assert (decoupled["prognosis"] != coupled["prognosis"]).mean() > 0.2
    dicom_hashes = [{k: v for k, v in file_hashes(root).items() if k.endswith(".dcm")} for root in probe.values()]
    assert dicom_hashes[0] == dicom_hashes[1]


# ------------------------------------------------------------------------------------------------ summary
def test_summary_counts_and_table(tmp_path: Path):
    summary = generate(tmp_path, "tiny", seed=2, faults=["missing_file"], progress=False)
    table = truth(tmp_path, "aiforcovid")
    assert sum(summary.images["aiforcovid"].values()) == len(list((tmp_path / "AIforCOVID").rglob("*.dcm")))
    assert sum(summary.images["brixia"].values()) == PRESETS["tiny"].brixia_images
    listed = sheets(tmp_path)
    for center, (mild, severe) in summary.class_balance.items():
        hospital = listed[listed["Hospital"] == center]
        assert (mild, severe) == ((hospital["Prognosis"] == "MILD").sum(), (hospital["Prognosis"] == "SEVERE").sum())
    assert summary.faults[0].image_id in set(table["image_id"]) and summary.seconds > 0
    console = Console(record=True, width=120)
    console.print(summary.table())
    text = console.export_text()
    assert "SIEMENS" in text and "missing_file" in text and summary.faults[0].image_id in text


# ------------------------------------------------------------------------------------------------ cohort
def manifest(root: Path) -> pd.DataFrame:
    return pd.read_csv(root / "COHORT" / "manifest.csv", dtype={"patient": str})


def test_cohort_sizes_are_half_of_aiforcovid():
    assert cohort_sizes(PRESETS["small"]) == {"G": 75, "H": 75}
    assert cohort_sizes(PRESETS["tiny"]) == {"G": 9, "H": 9}


def test_cohort_manifest_has_both_labels_on_every_row(tmp_path: Path):
    summary = generate(tmp_path, "tiny", seed=0, progress=False, cohort=True)
    table = manifest(tmp_path)
    assert list(table.columns) == MANIFEST_COLUMNS and table.notna().all().all()
    assert len(table) == sum(cohort_sizes(PRESETS["tiny"]).values()) and table["patient"].is_unique
    assert set(table["center"]) == {"G", "H"} and set(table["outcome"]) == {"MILD", "SEVERE"}
    regions = table[MANIFEST_COLUMNS[4:10]]
    assert regions.isin([0, 1, 2, 3]).all().all() and (regions.sum(axis=1) == table["brixia_global"]).all()
    assert summary.images["cohort"] == {"G": 9, "H": 9} and set(summary.class_balance) == set("ABCDEFGH")

    hidden = truth(tmp_path, "cohort")
    assert list(hidden["path"]) == [f"COHORT/{image}" for image in table["image"]]
    assert (hidden["patient_id"] == table["patient"]).all() and (hidden["prognosis"] == table["outcome"]).all()
    for k, region in enumerate(REGIONS, start=4):
        assert (hidden[f"label_{region}"] == table.iloc[:, k]).all()
    for row in hidden.itertuples():
        ds = pydicom.dcmread(tmp_path / row.path)
        assert ds.PatientID == row.patient_id and ds.pixel_array.shape == (row.rows, row.columns)
        zones = zone_map(tmp_path, "cohort", row.image_id)
        assert mask_box(zones) == (row.x0, row.y0, row.x1, row.y1)

    records = read_manifest(tmp_path / "COHORT" / "manifest.csv", "cohort", image_column="image",
                            patient_column="patient", center_column="center",
                            label_columns={"outcome": "prognosis"}).records
    assert len(records) == len(table) and records["brixia_global"].notna().all()


def test_cohort_is_deterministic_and_changes_no_other_file(tiny_data: Path, tmp_path: Path):
    runs = {}
    for name, seed in (("first", 0), ("again", 0), ("other", 1)):
        generate(tmp_path / name, "tiny", seed=seed, progress=False, cohort=True)
        runs[name] = file_hashes(tmp_path / name)
    assert runs["first"] == runs["again"]
    cohort_files = {k for k in runs["first"] if k.startswith(("COHORT/", "_synthetic_truth/masks/cohort/"))}
    assert runs["first"]["COHORT/manifest.csv"] != runs["other"]["COHORT/manifest.csv"]
    without = file_hashes(tiny_data)
    assert set(runs["first"]) == set(without) | {"_synthetic_truth/cohort.csv"} | cohort_files
    changed = {k for k, v in without.items() if runs["first"][k] != v}
    assert changed == {"_synthetic_truth/params.json", "_synthetic_truth/profiles.csv"}


def test_cohort_outcome_follows_the_lungs_only_when_coupled(probe: dict[bool, Path]):
    coupled, decoupled = manifest(probe[False]), manifest(probe[True])
    assert len(coupled) == 300
    pd.testing.assert_series_equal(coupled["brixia_global"], decoupled["brixia_global"])  # same images and raters
    for table in (coupled, decoupled):
        rates = (table["outcome"] == "SEVERE").groupby(table["center"]).mean()
        assert all(abs(rate - COHORT_SEVERE_RATE[center]) < 0.01 for center, rate in rates.items())
    severe = {mode: (table["outcome"] == "SEVERE").astype(int) for mode, table in (("coupled", coupled),
                                                                                    ("decoupled", decoupled))}
    assert spearmanr(coupled["brixia_global"], severe["coupled"]).statistic > 0.3
    assert abs(spearmanr(decoupled["brixia_global"], severe["decoupled"]).statistic) < 0.15
    heart = truth(probe[True], "cohort")["h"]
    assert roc_auc_score(severe["decoupled"], heart) > 0.7
