"""Scored films: a folder of films with radiologists' Brixia scores → records table.

Layout of the folder: ``manifest.csv`` (``id, image, patient``, optional ``mask`` and any other columns; paths
relative to the folder), ``images/``, ``masks/``, and ``brixia-scores.csv`` with one row per scored film: ``id``,
optional ``patient``, the label ``S-A`` … ``S-F``, ``S-Global`` (regions 0–3, global = their sum), and optionally a
second rater's ``J-A`` … ``J-F``, ``J-Global`` (kept as ``junior_A`` … ``junior_F``, ``junior_global``, never a
label). Every film of the manifest is a record; a film without a scores row has NaN labels. A scores row with a
missing or out-of-range score, a global score that is not the sum of its regions, an id scored twice, a patient
other than the manifest's, or no film in the manifest is dropped with the reason, and so is its film.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from mdmt.errors import DataError
from mdmt.sources.tables import (
    MASK_PATH,
    RECORD_COLUMNS,
    SourceTable,
    existing_dir,
    find_column,
    make_source_table,
    read_table,
)
from mdmt.tasks import REGION_COLUMNS, REGIONS

MANIFEST_FILE = "manifest.csv"
SCORES_FILE = "brixia-scores.csv"
CENTER = "all"
SCORE_MAX = 3
SCORE_NAMES: tuple[str, ...] = (*REGIONS, "Global")
"""Suffixes of a rater's score columns (``S-A`` … ``S-F``, ``S-Global``)."""
LABEL_TARGETS: tuple[str, ...] = (*REGION_COLUMNS, "brixia_global")
JUNIOR_COLUMNS: tuple[str, ...] = (*(f"junior_{r}" for r in REGIONS), "junior_global")
"""Extra record columns: the second rater's scores (NaN where blank or not a number)."""


def _rater_columns(scores: pd.DataFrame, prefix: str, source: Path, required: bool) -> list[str] | None:
    """The 7 score columns of one rater (``S-``, ``J-``); None for an absent optional rater, DataError for a part."""
    found = [find_column(scores, [prefix + name], source, required=False) for name in SCORE_NAMES]
    if not required and not any(found):
        return None
    return [column or find_column(scores, [prefix + name], source) for column, name in zip(found, SCORE_NAMES)]


def _score_problem(row: pd.Series, columns: list[str]) -> str | None:
    """Why a row's senior scores cannot be a label (None when they can)."""
    values = []
    for column in columns:
        cell = row[column]
        if pd.isna(cell):
            return f"missing score: {column} is blank"
        number = pd.to_numeric(cell, errors="coerce")
        top = SCORE_MAX * len(REGIONS) if column == columns[-1] else SCORE_MAX
        if pd.isna(number):
            return f"not a score: {column} = {cell!r}"
        if not float(number).is_integer() or not 0 <= number <= top:
            return f"score outside 0-{top}: {column} = {cell}"
        values.append(int(number))
    if values[-1] != sum(values[:-1]):
        return f"global not the sum of the regions: {columns[-1]} = {values[-1]}, regions sum to {sum(values[:-1])}"
    return None


def _scores_problems(scores: pd.DataFrame, films: pd.DataFrame, listed: set[str], senior: list[str],
                     patient: str | None) -> Iterator[tuple[str, str]]:
    """(id, reason) of every scores row that cannot label one of ``films``; each reason names the file's row(s). A row
    of a film the manifest lists but that was dropped already (``listed`` minus ``films``) is not named again."""
    ids = scores["_id"]
    for index, row in scores.iterrows():
        where = f" ({SCORES_FILE} row {index + 2})"
        image_id = row["_id"]
        twins = [str(i + 2) for i in scores.index[ids == image_id]]
        if pd.isna(image_id):
            yield "", "blank id" + where
        elif len(twins) > 1:
            yield image_id, f"duplicate id: scored in {SCORES_FILE} rows {', '.join(twins)}"
        elif image_id not in listed:
            yield image_id, f"no film: id not in {MANIFEST_FILE}" + where
        elif image_id not in films.index:
            continue
        elif (problem := _score_problem(row, senior)) is not None:
            yield image_id, problem + where
        elif patient is not None and pd.notna(row[patient]) and row[patient] != films.at[image_id, "patient_id"]:
            yield image_id, (f"patient mismatch: {row[patient]!r}, {MANIFEST_FILE} says "
                             f"{films.at[image_id, 'patient_id']!r}" + where)


def read_scored_films(root: str | Path, name: str = "scored_films") -> SourceTable:
    """Read a scored-film folder: every film of ``manifest.csv``, labelled by the senior's scores where it has them.

    DataError for a missing folder, file or column, or an id listed twice in the manifest. A manifest row with a
    blank id or image, or whose image file is missing, and every bad scores row (see the module) are dropped with
    the reason; a film whose scores row is dropped is left out too.
    """
    folder = existing_dir(root, "scored films folder")
    manifest_path, scores_path = folder / MANIFEST_FILE, folder / SCORES_FILE
    for path in (manifest_path, scores_path):
        if not path.is_file():
            raise DataError(f"{folder}: no {path.name} (a scored-film folder holds {MANIFEST_FILE} and {SCORES_FILE})")
    manifest = read_table(manifest_path)
    id_col, image_col, patient_col = (find_column(manifest, [c], manifest_path) for c in ("id", "image", "patient"))
    mask_col = find_column(manifest, ["mask"], manifest_path, required=False)
    listed = manifest[id_col].dropna()
    if listed.duplicated().any():
        raise DataError(f"{manifest_path}: id(s) listed twice: {', '.join(listed[listed.duplicated()].head(5))}")

    dropped: list[dict[str, str]] = []
    films = pd.DataFrame({
        "image_id": manifest[id_col],
        "patient_id": manifest[patient_col].fillna(manifest[id_col]),
        "center": CENTER,
        "path": [str(folder / p) if pd.notna(p) else "" for p in manifest[image_col]],
    })
    if mask_col is not None:
        films[MASK_PATH] = [str(folder / p) if pd.notna(p) else np.nan for p in manifest[mask_col]]
    extras = [c for c in manifest.columns if c not in (id_col, image_col, patient_col, mask_col)]
    clashes = sorted(set(extras) & {*RECORD_COLUMNS, *JUNIOR_COLUMNS, MASK_PATH})
    if clashes:
        raise DataError(f"{manifest_path}: column(s) {clashes} clash with record columns; rename them")
    films[extras] = manifest[extras]
    usable = pd.Series(True, index=films.index)
    for index, film in films.iterrows():
        if pd.isna(film["image_id"]) or not film["path"]:
            reason = f"blank {id_col if pd.isna(film['image_id']) else image_col}: {MANIFEST_FILE} row {index + 2}"
        elif not Path(film["path"]).is_file():
            reason = f"file not found: {film['path']}"
        else:
            continue
        usable[index] = False
        dropped.append({"image_id": "" if pd.isna(film["image_id"]) else film["image_id"], "path": film["path"],
                        "reason": reason})
    films = films[usable].set_index("image_id", drop=False)

    scores = read_table(scores_path)
    scores["_id"] = scores[find_column(scores, ["id"], scores_path)]
    senior = _rater_columns(scores, "S-", scores_path, required=True) or []
    junior = _rater_columns(scores, "J-", scores_path, required=False)
    patient = find_column(scores, ["patient"], scores_path, required=False)
    bad: set[str] = set()
    for image_id, reason in _scores_problems(scores, films, set(listed), senior, patient):
        bad.add(image_id)
        path = films.at[image_id, "path"] if image_id in films.index else ""
        dropped.append({"image_id": image_id, "path": path, "reason": reason})
    good = scores[~scores["_id"].isin(bad) & scores["_id"].notna()].set_index("_id")
    for target, column in zip(LABEL_TARGETS, senior):
        films[target] = pd.to_numeric(good[column], errors="coerce").reindex(films.index)
    for target, column in zip(JUNIOR_COLUMNS, junior or []):
        films[target] = pd.to_numeric(good[column], errors="coerce").reindex(films.index)
    return make_source_table(films[~films.index.isin(bad)], dropped, name)
