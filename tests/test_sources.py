"""Dataset readers: AIforCOVID sheets, BrixIA CSV quirks, manifests, the registry and the bad-input cases."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers.dicom_fixtures import write_dicom
from PIL import Image

from mdmt.data.datasets import TableParams, read_table_dataset
from mdmt.errors import ConfigError, DataError, ImageReadError
from mdmt.images import read_image
from mdmt.sources import (
    KNOWN_BAD_REASON,
    RECORD_COLUMNS,
    read_aiforcovid,
    read_brixia,
    read_brixia_consensus,
    read_manifest,
    read_source,
)
from mdmt.tasks import REGION_COLUMNS

PIXELS = np.arange(64, dtype=np.uint16).reshape(8, 8) * 50
BIG_ID = "17735962644543320921"  # 20 digits, above the int64 range
SMALL_ID = "1000000000000001"  # 16 digits


def touch_images(folder: Path, names: list[str]) -> None:
    """Image files as named (a real tiny DICOM; readers only look at names, never at pixels)."""
    for name in names:
        write_dicom(folder / name, PIXELS)


# ----------------------------------------------------------------------------------------------- AIforCOVID
def afc_sheet(rows: list[tuple]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["ImageFile", "Hospital", "Prognosis", "Age", "D-dimer"])


def make_aiforcovid(root: Path, sheets: dict[str, pd.DataFrame], images: dict[str, list[str]]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name, frame in sheets.items():
        frame.to_excel(root / name, index=False)
    for folder, names in images.items():
        (root / folder).mkdir(exist_ok=True)
        touch_images(root / folder, names)
    return root


@pytest.fixture()
def afc_root(tmp_path: Path) -> Path:
    r1 = afc_sheet([("P_1", "A", "MILD", 70, 1.5), ("P_2", "a", " severe ", 55, None), ("P_3", "B", None, 80, 0.4),
                    ("P_4", "B", "Mild", 61, 2.0)])
    r2 = afc_sheet([("P_1_5", "F", "SEVERE", 66, 3.0), ("P_2_3.dcm", "C", "MILD", 49, 1.0),
                    ("P_1_16", "F", "MILD", 50, 1.0)]).rename(columns={"D-dimer": "D_dimer"})
    r3 = afc_sheet([("P_3_7", "F", "MILD", 90, None), ("P_3_8", "F", "SEVERE", 40, 0.2)])
    images = {"imgs": ["P_1.dcm", "P_2.dcm", "P_3.dcm", "P_99.dcm"],
              "imgs_r2": ["P_1_5.dcm", "P_2_3.dcm", "P_1_16.dcm"], "imgs_r3": ["P_3_7.dcm"]}
    root = make_aiforcovid(tmp_path / "AIforCOVID", {"AIforCOVID.xlsx": r1, "AIforCOVID_r2.xlsx": r2,
                                                     "AIforCOVID_r3.xlsx": r3}, images)
    Image.fromarray(PIXELS.astype(np.uint8)).save(root / "imgs_r3" / "P_3_8.png")
    return root


def test_aiforcovid_reads_all_releases(afc_root: Path):
    table = read_aiforcovid(afc_root)
    records = table.records.set_index("image_id")
    assert list(table.records.columns[: len(RECORD_COLUMNS)]) == list(RECORD_COLUMNS)
    assert list(records.index) == ["P_1", "P_2", "P_3", "P_1_5", "P_2_3", "P_3_7", "P_3_8"]
    assert records.loc["P_1", "prognosis"] == 0.0 and records.loc["P_2_3", "prognosis"] == 0.0
    assert records.loc["P_2", "prognosis"] == 1.0 and records.loc["P_1_5", "prognosis"] == 1.0
    assert np.isnan(records.loc["P_3", "prognosis"])  # blank label: row kept, label NaN
    assert records.loc["P_2", "center"] == "A" and records.loc["P_2_3", "center"] == "C"
    assert records["release"].tolist() == [1, 1, 1, 2, 2, 3, 3]
    assert (records.index == records["patient_id"]).all() and (records["dataset"] == "aiforcovid").all()
    assert records.loc["P_3_8", "path"] == str(afc_root / "imgs_r3" / "P_3_8.png")
    assert records.loc["P_2_3", "path"] == str(afc_root / "imgs_r2" / "P_2_3.dcm")
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in records["path"])
    assert records[list(REGION_COLUMNS) + ["brixia_global"]].isna().all().all()
    # clinical columns under their sheet names, numeric, with spelling variants kept side by side
    assert records["Age"].dtype == float and records.loc["P_3_7", "Age"] == 90
    assert records.loc["P_1", "D-dimer"] == 1.5 and np.isnan(records.loc["P_1", "D_dimer"])
    assert records.loc["P_1_5", "D_dimer"] == 3.0 and np.isnan(records.loc["P_1_5", "D-dimer"])


def test_aiforcovid_drops_with_reasons(afc_root: Path):
    dropped = read_aiforcovid(afc_root).dropped.set_index("image_id")["reason"].to_dict()
    assert dropped == {
        "P_4": f"file not found: {afc_root / 'imgs' / 'P_4.dcm'}",
        "P_1_16": KNOWN_BAD_REASON,
        "P_99": "not listed in any sheet",
    }
    kept = read_aiforcovid(afc_root, exclude_known_bad=False).records["image_id"]
    assert "P_1_16" in set(kept)


def test_aiforcovid_report_counts(afc_root: Path):
    text = read_aiforcovid(afc_root).report()
    assert "aiforcovid: 7 images, 7 patients, 4 centers (A 2, B 1, C 1, F 3)" in text
    assert "prognosis 6" in text and "dropped: 3" in text
    assert "file not found: 1 (P_4)" in text and f"{KNOWN_BAD_REASON}: 1 (P_1_16)" in text


def test_aiforcovid_file_in_another_release_folder_is_found(tmp_path: Path):
    root = make_aiforcovid(tmp_path, {"AIforCOVID_r2.xlsx": afc_sheet([("P_1_1", "F", "MILD", 1, 1)])},
                           {"imgs": ["P_1_1.dcm"]})
    assert read_aiforcovid(root).records["path"].tolist() == [str(root / "imgs" / "P_1_1.dcm")]


def test_aiforcovid_unknown_prognosis_names_file_row_id_and_value(tmp_path: Path):
    sheet = afc_sheet([("P_1", "A", "MILD", 1, 1), ("P_2", "A", "DEAD", 1, 1)])
    root = make_aiforcovid(tmp_path, {"AIforCOVID.xlsx": sheet}, {"imgs": ["P_1.dcm", "P_2.dcm"]})
    with pytest.raises(DataError, match=r"AIforCOVID\.xlsx.*row 3 P_2: 'DEAD'"):
        read_aiforcovid(root)


def test_aiforcovid_duplicate_ids_across_sheets(tmp_path: Path):
    sheets = {"AIforCOVID.xlsx": afc_sheet([("P_1", "A", "MILD", 1, 1)]),
              "AIforCOVID_r3.xlsx": afc_sheet([("P_3_1", "F", "MILD", 1, 1), ("P_1.dcm", "F", "MILD", 1, 1)])}
    root = make_aiforcovid(tmp_path, sheets, {"imgs": ["P_1.dcm"]})
    with pytest.raises(DataError, match=r"P_1 \(AIforCOVID\.xlsx row 2, AIforCOVID_r3\.xlsx row 3\)"):
        read_aiforcovid(root)


def test_aiforcovid_blank_hospital_is_dropped(tmp_path: Path):
    sheet = afc_sheet([("P_1", None, "MILD", 1, 1), ("P_2", "B", "MILD", 1, 1)])
    root = make_aiforcovid(tmp_path, {"AIforCOVID.xlsx": sheet}, {"imgs": ["P_1.dcm", "P_2.dcm"]})
    table = read_aiforcovid(root)
    assert table.records["image_id"].tolist() == ["P_2"]
    assert table.dropped["reason"].tolist() == ["no Hospital: AIforCOVID.xlsx row 2"]


def test_aiforcovid_structural_errors(tmp_path: Path):
    with pytest.raises(DataError, match="AIforCOVID root not found"):
        read_aiforcovid(tmp_path / "missing")
    (tmp_path / "empty" / "imgs").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no AIforCOVID sheet.*AIforCOVID\.xlsx"):
        read_aiforcovid(tmp_path / "empty")
    sheet = afc_sheet([("P_1", "A", "MILD", 1, 1)]).drop(columns="Hospital")
    root = make_aiforcovid(tmp_path / "nohosp", {"AIforCOVID.xlsx": sheet}, {"imgs": ["P_1.dcm"]})
    with pytest.raises(DataError, match=r"AIforCOVID\.xlsx: missing column 'Hospital'; available columns"):
        read_aiforcovid(root)
    sheet = afc_sheet([("P_1", "A", "MILD", 1, 1)]).rename(columns={"Age": "release"})
    root = make_aiforcovid(tmp_path / "clash", {"AIforCOVID.xlsx": sheet}, {"imgs": ["P_1.dcm"]})
    with pytest.raises(DataError, match=r"AIforCOVID\.xlsx: columns \['release'\] clash"):
        read_aiforcovid(root)
    root = make_aiforcovid(tmp_path / "noimgs", {"AIforCOVID.xlsx": afc_sheet([("P_1", "A", "MILD", 1, 1)])}, {})
    with pytest.raises(DataError, match="no AIforCOVID image folder"):
        read_aiforcovid(root)


def test_aiforcovid_row_without_image_file_is_an_error(tmp_path: Path):
    sheet = afc_sheet([("P_1", "A", "MILD", 1, 1), (None, "B", "MILD", 1, 1)])
    root = make_aiforcovid(tmp_path, {"AIforCOVID.xlsx": sheet}, {"imgs": ["P_1.dcm"]})
    with pytest.raises(DataError, match=r"AIforCOVID\.xlsx: rows \[3\] have no ImageFile"):
        read_aiforcovid(root)


def test_reader_does_not_decode_pixels(tmp_path: Path):
    root = make_aiforcovid(tmp_path, {"AIforCOVID.xlsx": afc_sheet([("P_1", "A", "MILD", 1, 1)])}, {"imgs": []})
    (root / "imgs" / "P_1.dcm").write_bytes(b"garbage")
    assert read_aiforcovid(root).records["image_id"].tolist() == ["P_1"]


# ----------------------------------------------------------------------------------------------- BrixIA
BRIXIA_HEADER = ["Filename", "StudyDate", "Modality", "Subject", "Sex", "AgeAtStudyDateFiveYear", "BrixiaScore",
                 "BrixiaScoreGlobal", "ConsensusTestset", "Manufacturer", "PhotometricInterpretation"]
BRIXIA_ROWS = [
    [f"{BIG_ID}.dcm", "20200304", "CR", "S1", "M", "14", "011022", "6", "0", "Agfa-Gevaert", "MONOCHROME1"],
    [f"{SMALL_ID}.dcm", "20200305", "DX", "S1", "M", "14", "11023", "7", "1", "CARESTREAM HEALTH", "MONOCHROME2"],
    ["00012345678901234567.dcm", "20200306", "DX", "S2", "F", "16", "333333", "18", "0", "Villa Sistemi Medicali",
     "MONOCHROME2"],
    ["2222222222222222.dcm", "20200307", "CR", "S3", "F", "12", "0", "0", "0", "FUJIFILM Corporation", "MONOCHROME1"],
    ["3333333333333333.dcm", "20200308", "CR", "S4", "M", "", "", "", "0", "Philips", "MONOCHROME2"],
    ["4444444444444444.dcm", "20200308", "CR", "S4", "M", "9", "100000", "1", "0", "SIEMENS", "MONOCHROME2"],
    ["1773596264454332092.dcm", "20200309", "CR", "S5", "M", "9", "1", "1", "0", "SIEMENS", "MONOCHROME2"],
]


def write_brixia_csv(path: Path, rows: list[list[str]], header: list[str] = BRIXIA_HEADER, sep: str = ";",
                     bom: bool = True) -> None:
    text = "\n".join(sep.join(row) for row in [header, *rows]) + "\n"
    path.write_text(text, encoding="utf-8-sig" if bom else "utf-8")


def make_brixia(root: Path, rows: list[list[str]] = BRIXIA_ROWS, on_disk: list[str] | None = None, **csv) -> Path:
    names = [row[0] for row in rows] if on_disk is None else on_disk
    (root / "dicom_clean").mkdir(parents=True)
    touch_images(root / "dicom_clean", names)
    write_brixia_csv(root / "metadata_global_v2.csv", rows, **csv)
    return root


def test_brixia_reads_ids_as_strings_and_pads_scores(tmp_path: Path):
    root = make_brixia(tmp_path / "BRIXIA", on_disk=[r[0] for r in BRIXIA_ROWS[:-2]] + ["5555555555555555.dcm"])
    table = read_brixia(root)
    records = table.records.set_index("image_id")
    assert list(table.records.columns[: len(RECORD_COLUMNS)]) == list(RECORD_COLUMNS)
    assert list(records.index) == [BIG_ID, SMALL_ID, "00012345678901234567", "2222222222222222", "3333333333333333"]
    assert records.loc[BIG_ID, REGION_COLUMNS].tolist() == [0, 1, 1, 0, 2, 2]
    assert records.loc[SMALL_ID, REGION_COLUMNS].tolist() == [0, 1, 1, 0, 2, 3]  # "11023" lost its leading zero
    assert records.loc["2222222222222222", list(REGION_COLUMNS) + ["brixia_global"]].tolist() == [0] * 7
    assert records["brixia_global"].tolist()[:3] == [6, 7, 18]
    assert records.loc["3333333333333333", list(REGION_COLUMNS) + ["brixia_global"]].isna().all()
    assert records["prognosis"].isna().all()
    assert records["center"].tolist() == ["AGFA", "CARESTREAM", "VSM", "FUJIFILM", "PHILIPS"]
    assert records.loc[BIG_ID, "manufacturer"] == "Agfa-Gevaert"
    assert records["patient_id"].tolist() == ["S1", "S1", "S2", "S3", "S4"]
    assert records["consensus_test"].tolist() == [False, True, False, False, False]
    assert records.loc[BIG_ID, "photometric"] == "MONOCHROME1" and records.loc[SMALL_ID, "modality"] == "DX"
    assert records.loc[BIG_ID, "study_date"] == "20200304" and records.loc["00012345678901234567", "sex"] == "F"
    assert records.loc["00012345678901234567", "age5"] == 16 and np.isnan(records.loc["3333333333333333", "age5"])
    assert records.loc[BIG_ID, "path"] == str(root / "dicom_clean" / f"{BIG_ID}.dcm")
    assert "brixia: 5 images, 4 patients, 5 centers" in table.report()
    assert "labelled: brixia regions 4, brixia_global 4" in table.report()
    dropped = table.dropped.set_index("image_id")["reason"].to_dict()
    assert dropped == {
        "4444444444444444": f"file not found: {root / 'dicom_clean' / '4444444444444444.dcm'}",
        "1773596264454332092": KNOWN_BAD_REASON,
        "5555555555555555": "not listed in metadata_global_v2.csv",
    }


def test_brixia_blank_subject_is_dropped(tmp_path: Path):
    rows = [BRIXIA_ROWS[0], BRIXIA_ROWS[1][:3] + [""] + BRIXIA_ROWS[1][4:]]
    table = read_brixia(make_brixia(tmp_path, rows))
    assert table.records["image_id"].tolist() == [BIG_ID]
    assert table.dropped.values.tolist() == [[SMALL_ID, str(tmp_path / "dicom_clean" / f"{SMALL_ID}.dcm"),
                                              "no Subject: metadata_global_v2.csv row 3"]]


def test_brixia_v1_with_commas_and_no_bom(tmp_path: Path):
    root = make_brixia(tmp_path, BRIXIA_ROWS[:2])
    (root / "metadata_global_v2.csv").rename(root / "metadata_global_v1.csv")
    write_brixia_csv(root / "metadata_global_v1.csv", BRIXIA_ROWS[:2], sep=",", bom=False)
    records = read_brixia(root).records
    assert records["image_id"].tolist() == [BIG_ID, SMALL_ID] and records["brixia_global"].tolist() == [6, 7]


def test_brixia_without_manufacturer_column_uses_one_center(tmp_path: Path):
    header = [c for c in BRIXIA_HEADER if c != "Manufacturer"]
    rows = [[v for c, v in zip(BRIXIA_HEADER, row) if c != "Manufacturer"] for row in BRIXIA_ROWS[:2]]
    root = make_brixia(tmp_path, rows, header=header)
    assert read_brixia(root).records["center"].tolist() == ["all", "all"]


def test_brixia_global_mismatch_names_the_filename(tmp_path: Path):
    rows = [BRIXIA_ROWS[0], BRIXIA_ROWS[1][:7] + ["8"] + BRIXIA_ROWS[1][8:]]
    with pytest.raises(DataError, match=rf"BrixiaScoreGlobal.*{SMALL_ID}\.dcm"):
        read_brixia(make_brixia(tmp_path, rows))


@pytest.mark.parametrize("score", ["0140x2", "400000", "1234567"])
def test_brixia_invalid_score_names_the_filename(tmp_path: Path, score: str):
    rows = [BRIXIA_ROWS[0][:6] + [score, ""] + BRIXIA_ROWS[0][8:]]
    with pytest.raises(DataError, match=rf"BrixiaScore must be.*{BIG_ID}\.dcm: '{score}'"):
        read_brixia(make_brixia(tmp_path, rows))


def test_brixia_structural_errors(tmp_path: Path):
    with pytest.raises(DataError, match="BrixIA root not found"):
        read_brixia(tmp_path / "nope")
    (tmp_path / "noimg").mkdir()
    with pytest.raises(DataError, match="BrixIA image folder not found"):
        read_brixia(tmp_path / "noimg")
    (tmp_path / "nometa" / "dicom_clean").mkdir(parents=True)
    with pytest.raises(DataError, match="metadata_global_v2.csv or metadata_global_v1.csv"):
        read_brixia(tmp_path / "nometa")
    header = [c for c in BRIXIA_HEADER if c != "Subject"]
    rows = [[v for c, v in zip(BRIXIA_HEADER, row) if c != "Subject"] for row in BRIXIA_ROWS[:1]]
    with pytest.raises(DataError, match=r"missing column 'Subject'; available columns: \['Filename'"):
        read_brixia(make_brixia(tmp_path / "nosubject", rows, header=header))
    with pytest.raises(DataError, match=rf"duplicate Filename \['{BIG_ID}\.dcm'\]"):
        read_brixia(make_brixia(tmp_path / "dup", [BRIXIA_ROWS[0], BRIXIA_ROWS[0]], on_disk=[]))


def test_brixia_consensus_accepts_both_spellings(tmp_path: Path):
    means = [0.2, 1.0, 1.4, 0.0, 2.2, 2.0]
    modes = [0, 1, 1, 0, 2, 2]
    for globals_, filename in ((["MeanGlobal", "ModeGlobal"], "Filename"), (["S-Global", "J-Global"], "filename")):
        header = [filename] + [f"Mean{r}" for r in "ABCDEF"] + [f"Mode{r}" for r in "ABCDEF"] + globals_
        row = [f"{BIG_ID}.dcm"] + [str(v) for v in means + modes] + [str(sum(means)), str(sum(modes))]
        folder = tmp_path / globals_[0]
        folder.mkdir()
        (folder / "metadata_consensus_v1.csv").write_text(",".join(header) + "\n" + ",".join(row) + "\n")
        table = read_brixia_consensus(folder)
        assert table["image_id"].tolist() == [BIG_ID]
        assert table[[f"mean_{r}" for r in "ABCDEF"]].iloc[0].tolist() == means
        assert table[[f"mode_{r}" for r in "ABCDEF"]].iloc[0].tolist() == modes
        assert table.loc[0, "mean_global"] == pytest.approx(sum(means)) and table.loc[0, "mode_global"] == 6
    (tmp_path / "bad.csv").write_text("Filename,MeanA\nx.dcm,1\n")
    with pytest.raises(DataError, match="missing column 'MeanB'"):
        read_brixia_consensus(tmp_path / "bad.csv")
    with pytest.raises(DataError, match="consensus file not found"):
        read_brixia_consensus(tmp_path / "empty-dir-that-does-not-exist")


# ----------------------------------------------------------------------------------------------- manifests
@pytest.fixture()
def manifest_dir(tmp_path: Path) -> Path:
    touch_images(tmp_path / "images", ["a.dcm", "b.dcm", "c.dcm"])
    touch_images(tmp_path / "elsewhere", ["d.dcm"])
    frame = pd.DataFrame({
        "file": ["images/a.dcm", "images/b.dcm", str(tmp_path / "elsewhere" / "d.dcm"), "images/missing.dcm",
                 "images/c.dcm"],
        "uid": ["0001", "0002", "0003", "0004", None],
        "pid": ["p1", "p1", "p2", "p3", "p4"],
        "site": ["X", "Y", "X", "X", "Y"],
        "outcome": ["1", "0", "", "1", "0"],
        "effusion": ["yes", "no", "yes", "", "no"],
        "note": ["n1", "n2", "n3", "n4", "n5"],
    })
    frame.to_csv(tmp_path / "manifest.csv", index=False)
    frame.to_excel(tmp_path / "manifest.xlsx", index=False)
    return tmp_path


@pytest.mark.parametrize("file", ["manifest.csv", "manifest.xlsx"])
def test_manifest_maps_columns(manifest_dir: Path, file: str):
    table = read_manifest(manifest_dir / file, "mycxr", image_column="file", id_column="uid", patient_column="pid",
                          center_column="site", label_columns={"outcome": "prognosis", "effusion": "effusion"})
    records = table.records.set_index("image_id")
    assert list(records.index) == ["0001", "0002", "0003"]  # ids stay strings with their zeros
    assert records["path"].tolist() == [str(manifest_dir / "images" / "a.dcm"), str(manifest_dir / "images" / "b.dcm"),
                                        str(manifest_dir / "elsewhere" / "d.dcm")]
    assert records["patient_id"].tolist() == ["p1", "p1", "p2"] and records["center"].tolist() == ["X", "Y", "X"]
    assert records["prognosis"].tolist()[:2] == [1.0, 0.0] and np.isnan(records.loc["0003", "prognosis"])
    assert records["effusion"].tolist() == ["yes", "no", "yes"]  # text labels left for the task encoder
    assert records["note"].tolist() == ["n1", "n2", "n3"] and (records["dataset"] == "mycxr").all()
    assert table.dropped["reason"].tolist() == [f"file not found: {manifest_dir / 'images' / 'missing.dcm'}",
                                                f"blank uid: {file} row 6"]


def test_manifest_defaults_and_config_mapping(manifest_dir: Path):
    table = read_manifest(manifest_dir / "manifest.csv", "plain", image_column="file")
    assert table.records["image_id"].tolist() == ["a", "b", "d", "c"]
    assert (table.records["patient_id"] == table.records["image_id"]).all()
    assert (table.records["center"] == "all").all() and table.records["prognosis"].isna().all()
    params = TableParams(path=str(manifest_dir / "manifest.csv"), image_column="file", patient_column="pid",
                         label_columns={"outcome": "prognosis"})
    via_plugin = read_table_dataset(params, "cfg")
    direct = read_manifest(params.path, "cfg", image_column="file", patient_column="pid",
                           label_columns={"outcome": "prognosis"})
    pd.testing.assert_frame_equal(via_plugin.records, direct.records)
    with pytest.raises(ConfigError, match="unknown option"):
        read_manifest(params.path, "cfg", columns={"image_colum": "file"})


@pytest.mark.parametrize(("column", "value", "fragment"), [
    ("outcome", "MODERATE", "row 6: prognosis value 'MODERATE'"),
    ("score_a", "two", "row 6: brixia_A value 'two'"),
])
def test_table_labels_that_do_not_parse_name_the_row_and_value(manifest_dir: Path, column, value, fragment):
    frame = pd.read_csv(manifest_dir / "manifest.csv", dtype=str)
    frame["outcome"] = ["SEVERE", "mild", "1", "0", "Mild"]
    frame["score_a"] = ["0", "3", "2", "1", "0"]
    path = manifest_dir / "labels.csv"
    frame.to_csv(path, index=False)
    params = TableParams(path=str(path), image_column="file", label_columns={"outcome": "prognosis",
                                                                             "score_a": "brixia_A"})
    records = read_table_dataset(params, "t").records
    assert records["prognosis"].tolist() == [1.0, 0.0, 1.0, 0.0]  # names in any case, or 0/1
    assert records["brixia_A"].tolist() == [0.0, 3.0, 2.0, 0.0]
    frame.loc[4, column] = value  # file row 6, after the row of a missing file (dropped)
    frame.to_csv(path, index=False)
    with pytest.raises(DataError, match=fragment):
        read_table_dataset(params, "t")


def test_manifest_errors(manifest_dir: Path):
    with pytest.raises(DataError, match=r"missing column 'subject'; available columns: \['file', 'uid'"):
        read_manifest(manifest_dir / "manifest.csv", "m", image_column="file", patient_column="subject")
    with pytest.raises(DataError, match="missing column 'path'"):
        read_manifest(manifest_dir / "manifest.csv", "m")
    with pytest.raises(DataError, match="not found"):
        read_manifest(manifest_dir / "nope.csv", "m")
    with pytest.raises(ConfigError, match="cannot target"):
        read_manifest(manifest_dir / "manifest.csv", "m", image_column="file", label_columns={"site": "center"})
    pd.DataFrame({"file": ["images/a.dcm", "images/a.dcm"]}).to_csv(manifest_dir / "dup.csv", index=False)
    with pytest.raises(DataError, match=r"duplicate image_id \['a'\]"):
        read_manifest(manifest_dir / "dup.csv", "m", image_column="file")


def test_read_source_registry(afc_root: Path, manifest_dir: Path):
    assert read_source("aiforcovid", afc_root).records.equals(read_aiforcovid(afc_root).records)
    assert len(read_source("manifest", manifest_dir / "manifest.csv", name="m", image_column="file").records) == 4
    with pytest.raises(ConfigError, match="unknown dataset kind 'chexpert'"):
        read_source("chexpert", afc_root)


# ----------------------------------------------------------------------------------------------- synthetic twin
def test_readers_load_the_synthetic_tiny_twin(request: pytest.FixtureRequest):
    pytest.importorskip("mdmt.synth")
    root: Path = request.getfixturevalue("tiny_data")
    afc = read_aiforcovid(root / "AIforCOVID")
    brixia = read_brixia(root / "BRIXIA")
    for table in (afc, brixia):
        records = table.records
        assert len(records) > 0 and records["image_id"].is_unique
        assert all(isinstance(i, str) for i in records["image_id"])
        assert all(Path(p).is_file() for p in records["path"])
        assert set(table.dropped["image_id"]).isdisjoint(records["image_id"])
    assert set(afc.records["center"]) <= set("ABCDEF") and afc.records["prognosis"].isin([0.0, 1.0]).all()
    labelled = brixia.records.dropna(subset=["brixia_global"])
    np.testing.assert_array_equal(labelled[list(REGION_COLUMNS)].sum(axis=1), labelled["brixia_global"])
    consensus = read_brixia_consensus(root / "BRIXIA")
    flagged = set(brixia.records.loc[brixia.records["consensus_test"], "image_id"])
    assert flagged and flagged <= set(consensus["image_id"])
    decoded, failed = 0, []
    for path in pd.concat([afc.records["path"], brixia.records["path"]]):
        try:
            image = read_image(path)
        except ImageReadError as error:  # the generator may plant one unreadable file per dataset
            failed.append(error.path)
            continue
        assert image.ndim == 2 and np.isfinite(image).all() and image.std() > 0
        decoded += 1
    assert decoded >= len(afc.records) + len(brixia.records) - 2, failed


def test_a_brixia_folder_converted_to_png_and_jpeg_still_matches_its_metadata(tiny_data: Path, tmp_path: Path):
    from PIL import Image as PILImage

    from mdmt.images import normalize_intensity, read_image

    root = tmp_path / "BRIXIA"
    shutil.copytree(tiny_data / "BRIXIA", root)
    dicoms = sorted((root / "dicom_clean").glob("*.dcm"))
    converted = {}
    for path, suffix in zip(dicoms[:4], (".png", ".jpg", ".png", ".jpeg")):
        pixels = (normalize_intensity(read_image(path)) * 255).astype(np.uint8)
        target = path.with_suffix(suffix)
        PILImage.fromarray(pixels).save(target)
        path.unlink()
        converted[path.stem] = target
    table = read_brixia(root)
    records = table.records.set_index("image_id")
    assert len(records) + len(table.dropped) == len(dicoms) and table.dropped.empty
    for image_id, target in converted.items():
        assert records.loc[image_id, "path"] == str(target)
        assert read_image(target).shape == read_image(records.loc[image_id, "path"]).shape
