"""AIforCOVID reader: three release sheets + flat DICOM folders → records table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mdmt.errors import DataError
from mdmt.sources.tables import (
    KNOWN_BAD_REASON,
    RECORD_COLUMNS,
    ImageFolders,
    SourceTable,
    existing_dir,
    find_column,
    image_id_of,
    make_source_table,
    numeric_where_possible,
    read_table,
)

RELEASES: tuple[tuple[int, str, str], ...] = (
    (1, "imgs", "AIforCOVID.xlsx"),
    (2, "imgs_r2", "AIforCOVID_r2.xlsx"),
    (3, "imgs_r3", "AIforCOVID_r3.xlsx"),
)
"""(release, image folder, sheet) as distributed; the sheets are concatenated."""
KNOWN_BAD_IDS = frozenset(
    {"P_3_391", "P_3_377", "P_3_20", "P_3_108", "P_1_16", "P_3_341", "P_3_411", "P_3_208", "P_1_47", "P_1_118"}
)
"""The official exclusion list (images the authors found unusable), matched by id: the official code compared them
with a ``.dcm`` suffix and so excluded none."""
PROGNOSIS_CLASSES = {"MILD": 0.0, "SEVERE": 1.0}
KEY_COLUMNS = ("ImageFile", "Hospital", "Prognosis")


def _read_sheet(sheet: Path, release: int, folder: Path) -> pd.DataFrame:
    """One release sheet → image_file, image_id, center, prognosis, release, sheet, row, folder + clinical."""
    table = read_table(sheet)
    image_col, hospital_col, prognosis_col = (find_column(table, [key], sheet) for key in KEY_COLUMNS)
    rows = table.index + 2  # Excel row number (header is row 1)
    no_id = table[image_col].isna()
    if no_id.any():
        raise DataError(f"{sheet}: rows {rows[no_id].tolist()[:5]} have no {image_col}")
    prognosis_text = table[prognosis_col].str.upper()
    prognosis = prognosis_text.map(PROGNOSIS_CLASSES).astype(float)
    unknown = prognosis_text.notna() & prognosis.isna()
    if unknown.any():
        examples = [f"row {r} {i}: {v!r}" for r, i, v in zip(rows[unknown], table.loc[unknown, image_col],
                                                                table.loc[unknown, prognosis_col])][:5]
        raise DataError(f"{sheet}: column {prognosis_col!r} must be MILD or SEVERE; got {examples}")
    clinical = table.drop(columns=[image_col, hospital_col, prognosis_col]).apply(numeric_where_possible)
    keys = pd.DataFrame(
        {
            "image_file": table[image_col],
            "image_id": table[image_col].map(image_id_of),
            "center": table[hospital_col].str.upper(),
            "prognosis": prognosis,
            "release": release,
            "sheet": sheet.name,
            "row": rows,
            "folder": str(folder),
        },
        index=table.index,
    )
    clashes = sorted(set(clinical.columns) & (set(keys.columns) | set(RECORD_COLUMNS)))
    if clashes:
        raise DataError(f"{sheet}: columns {clashes} clash with record columns; rename them in the sheet")
    return pd.concat([keys, clinical], axis=1)


def _check_unique(table: pd.DataFrame) -> None:
    """DataError naming every duplicated ImageFile with the sheets and rows it appears in."""
    duplicated = table["image_id"].duplicated(keep=False)
    if duplicated.any():
        places = (table[duplicated].groupby("image_id", sort=True)
                  .apply(lambda g: ", ".join(f"{s} row {r}" for s, r in zip(g["sheet"], g["row"]))))
        listed = "; ".join(f"{i} ({where})" for i, where in places.head(5).items())
        raise DataError(f"duplicate ImageFile in the AIforCOVID sheets: {listed}")


def read_aiforcovid(root: str | Path, *, exclude_known_bad: bool = True) -> SourceTable:
    """Read AIforCOVID (any of the three releases) into a records table.

    Labels: Prognosis MILD → 0, SEVERE → 1, blank → NaN. Extra columns: ``release`` (1/2/3) and every
    clinical column under its sheet name (numeric where every value parses). A row is dropped, with the
    reason, when its id is on the official exclusion list, its Hospital is blank or its file is missing;
    image files that no sheet lists are reported as dropped too.
    """
    root = existing_dir(root, "AIforCOVID root")
    present = [(release, root / folder, root / sheet)
               for release, folder, sheet in RELEASES if (root / sheet).is_file()]
    if not present:
        raise DataError(f"{root}: no AIforCOVID sheet found; expected any of {[s for _, _, s in RELEASES]}")
    if not any((root / folder).is_dir() for _, folder, _ in RELEASES):
        raise DataError(f"{root}: no AIforCOVID image folder found; expected any of {[f for _, f, _ in RELEASES]}")
    table = pd.concat([_read_sheet(sheet, release, folder) for release, folder, sheet in present], ignore_index=True)
    _check_unique(table)
    folders = ImageFolders([root / folder for _, folder, _ in RELEASES])
    paths: dict[int, str] = {}
    dropped = []
    for index, row in table.iterrows():
        found = folders.find(row["image_file"], first=Path(row["folder"]))
        expected = Path(row["folder"]) / ImageFolders.candidates(row["image_file"])[0]
        drop = {"image_id": row["image_id"], "path": str(found or expected)}
        if exclude_known_bad and row["image_id"] in KNOWN_BAD_IDS:
            dropped.append({**drop, "reason": KNOWN_BAD_REASON})
        elif pd.isna(row["center"]):
            dropped.append({**drop, "reason": f"no Hospital: {row['sheet']} row {row['row']}"})
        elif found is None:
            dropped.append({**drop, "reason": f"file not found: {expected}"})
        else:
            paths[index] = str(found)
    for path in folders.unclaimed():
        dropped.append({"image_id": image_id_of(path.name), "path": str(path), "reason": "not listed in any sheet"})
    records = table.loc[list(paths)].drop(columns=["image_file", "sheet", "row", "folder"])
    records["path"] = pd.Series(paths)
    records["patient_id"] = records["image_id"]
    return make_source_table(records, dropped, "aiforcovid")
