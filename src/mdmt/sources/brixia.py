"""BrixIA reader: ``dicom_clean/`` + ``metadata_global_v2.csv`` → records table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mdmt.errors import DataError
from mdmt.sources.tables import (
    KNOWN_BAD_REASON,
    ImageFolders,
    SourceTable,
    existing_dir,
    find_column,
    first_ids,
    image_id_of,
    make_source_table,
    read_table,
)
from mdmt.tasks import REGION_COLUMNS, REGIONS

IMAGE_DIR = "dicom_clean"
METADATA_FILES = ("metadata_global_v2.csv", "metadata_global_v1.csv")
CONSENSUS_FILE = "metadata_consensus_v1.csv"
KNOWN_BAD_IDS = frozenset({"1773596264454332092"})
"""The official exclusion list of BrixIA images (unusable films named by the dataset's authors)."""
MANUFACTURER_GROUPS = {
    "AGFA-GEVAERT": "AGFA",
    "CARESTREAM HEALTH": "CARESTREAM",
    "VILLA SISTEMI MEDICALI": "VSM",
    "FUJIFILM CORPORATION": "FUJIFILM",
}
"""Upper-cased raw Manufacturer → center group (as the official code); other values stay upper-cased."""
UNKNOWN_CENTER = "UNKNOWN"
EXTRA_COLUMNS = {
    "photometric": "PhotometricInterpretation",
    "modality": "Modality",
    "sex": "Sex",
    "age5": "AgeAtStudyDateFiveYear",
    "study_date": "StudyDate",
}
"""Record column → metadata column, copied when present (NaN otherwise)."""
_TRUE_VALUES = frozenset({"1", "1.0", "true", "yes"})


def center_of(manufacturer: pd.Series) -> pd.Series:
    """Grouped manufacturer: upper-cased, vendor aliases merged, blank → ``UNKNOWN``."""
    upper = manufacturer.str.upper()
    return upper.map(MANUFACTURER_GROUPS).fillna(upper).fillna(UNKNOWN_CENTER)


def parse_scores(scores: pd.Series, globals_: pd.Series | None, filenames: pd.Series, source: Path) -> pd.DataFrame:
    """``BrixiaScore`` strings → brixia_A..F and brixia_global (floats, NaN where blank).

    The score is left-padded with zeros to 6 digits (leading zeros are lost when a tool parsed it as a
    number). A given ``BrixiaScoreGlobal`` must equal the digit sum; it is the global label of rows
    without a regional score.
    """
    digits = scores.str.replace(r"\.0+$", "", regex=True)
    invalid = scores.notna() & ~digits.str.fullmatch(r"[0-3]{1,6}").fillna(False).astype(bool)
    if invalid.any():
        examples = [f"{f}: {v!r}" for f, v in zip(filenames[invalid], scores[invalid])][:5]
        raise DataError(f"{source}: BrixiaScore must be up to 6 digits 0-3; got {examples}")
    padded = digits.str.zfill(6)
    table = pd.DataFrame({column: pd.to_numeric(padded.str[i]) for i, column in enumerate(REGION_COLUMNS)},
                         index=scores.index).astype(float)
    digit_sum = table.sum(axis=1, min_count=len(REGIONS))
    if globals_ is None:
        table["brixia_global"] = digit_sum
        return table
    stated = pd.to_numeric(globals_, errors="coerce")
    unparsed = globals_.notna() & stated.isna()
    mismatch = stated.notna() & digit_sum.notna() & (stated != digit_sum)
    if unparsed.any() or mismatch.any():
        bad = unparsed | mismatch
        examples = [f"{f}: BrixiaScoreGlobal {g!r} vs BrixiaScore {s!r}"
                    for f, g, s in zip(filenames[bad], globals_[bad], scores[bad])][:5]
        raise DataError(f"{source}: BrixiaScoreGlobal differs from the digit sum of BrixiaScore for {examples}")
    table["brixia_global"] = digit_sum.fillna(stated).astype(float)
    return table


def _metadata_file(root: Path) -> Path:
    for name in METADATA_FILES:
        if (root / name).is_file():
            return root / name
    raise DataError(f"{root}: no BrixIA metadata file; expected {' or '.join(METADATA_FILES)}")


def read_brixia(root: str | Path, *, exclude_known_bad: bool = True) -> SourceTable:
    """Read BrixIA into a records table (ids are strings; patient = ``Subject``; center = grouped vendor).

    Extra columns: ``manufacturer`` (raw), ``consensus_test`` (bool), ``photometric``, ``modality``, ``sex``,
    ``age5``, ``study_date``. Rows are dropped, with the reason, for the official exclusion list, a blank
    Subject or a missing file; DICOMs in ``dicom_clean/`` that the metadata does not list are reported too.
    A metadata file without ``Manufacturer`` (v1) gives every image the center ``all``.
    """
    root = existing_dir(root, "BrixIA root")
    image_dir = existing_dir(root / IMAGE_DIR, "BrixIA image folder")
    metadata = _metadata_file(root)
    table = read_table(metadata)
    file_col, subject_col, score_col = (find_column(table, [key], metadata)
                                        for key in ("Filename", "Subject", "BrixiaScore"))
    global_col = find_column(table, ["BrixiaScoreGlobal"], metadata, required=False)
    if table[file_col].isna().any():
        raise DataError(f"{metadata}: rows {(table.index[table[file_col].isna()] + 2).tolist()[:5]} have no Filename")
    ids = table[file_col].map(image_id_of)
    duplicated = ids.duplicated(keep=False)
    if duplicated.any():
        raise DataError(f"{metadata}: duplicate Filename {sorted(set(first_ids(table, duplicated, file_col)))}")
    labels = parse_scores(table[score_col], table[global_col] if global_col else None, table[file_col], metadata)
    manufacturer_col = find_column(table, ["Manufacturer"], metadata, required=False)
    consensus_col = find_column(table, ["ConsensusTestset"], metadata, required=False)
    records = pd.DataFrame({"image_id": ids, "patient_id": table[subject_col]}, index=table.index)
    records["center"] = center_of(table[manufacturer_col]) if manufacturer_col else "all"
    records = pd.concat([records, labels], axis=1)
    records["manufacturer"] = table[manufacturer_col] if manufacturer_col else float("nan")
    records["consensus_test"] = (table[consensus_col].str.lower().isin(_TRUE_VALUES) if consensus_col
                                 else False)
    for column, source_column in EXTRA_COLUMNS.items():
        found = find_column(table, [source_column], metadata, required=False)
        records[column] = table[found] if found else float("nan")
    records["age5"] = pd.to_numeric(records["age5"], errors="coerce")

    folders = ImageFolders([image_dir])
    paths: dict[int, str] = {}
    dropped = []
    for index, filename in table[file_col].items():
        found = folders.find(filename)
        expected = image_dir / ImageFolders.candidates(filename)[0]
        drop = {"image_id": records.at[index, "image_id"], "path": str(found or expected)}
        if exclude_known_bad and drop["image_id"] in KNOWN_BAD_IDS:
            dropped.append({**drop, "reason": KNOWN_BAD_REASON})
        elif pd.isna(records.at[index, "patient_id"]):
            dropped.append({**drop, "reason": f"no Subject: {metadata.name} row {index + 2}"})
        elif found is None:
            dropped.append({**drop, "reason": f"file not found: {expected}"})
        else:
            paths[index] = str(found)
    for path in folders.unclaimed():
        dropped.append({"image_id": image_id_of(path.name), "path": str(path),
                        "reason": f"not listed in {metadata.name}"})
    records = records.loc[list(paths)]
    records["path"] = pd.Series(paths)
    return make_source_table(records, dropped, "brixia")


def read_brixia_consensus(root: str | Path) -> pd.DataFrame:
    """The consensus test set (``metadata_consensus_v1.csv`` in ``root``, or that file itself).

    Columns: image_id, mean_A..F, mode_A..F, mean_global, mode_global (floats). Accepts ``MeanGlobal`` /
    ``ModeGlobal`` and the website's ``S-Global`` / ``J-Global`` spellings, and ``Filename`` in any case.
    """
    path = Path(root).expanduser().absolute()
    if path.is_dir():
        path = path / CONSENSUS_FILE
    if not path.is_file():
        raise DataError(f"BrixIA consensus file not found: {path}")
    table = read_table(path)
    file_col = find_column(table, ["Filename"], path)
    sources = {f"mean_{r}": [f"Mean{r}"] for r in REGIONS}
    sources |= {f"mode_{r}": [f"Mode{r}"] for r in REGIONS}
    sources |= {"mean_global": ["MeanGlobal", "S-Global"], "mode_global": ["ModeGlobal", "J-Global"]}
    out = pd.DataFrame({"image_id": table[file_col].map(image_id_of)})
    for column, spellings in sources.items():
        found = find_column(table, spellings, path)
        values = pd.to_numeric(table[found], errors="coerce")
        unparsed = table[found].notna() & values.isna()
        if unparsed.any():
            raise DataError(f"{path}: column {found!r} is not numeric for {first_ids(table, unparsed, file_col)}")
        out[column] = values.astype(float)
    return out.reset_index(drop=True)
