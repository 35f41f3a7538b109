"""Manifest reader: a user dataset described by a CSV/XLSX table (one row per image) → records table."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from mdmt.errors import ConfigError, DataError
from mdmt.sources.tables import (
    ID_COLUMNS,
    LABEL_COLUMNS,
    SourceTable,
    find_column,
    make_source_table,
    numeric_where_possible,
    read_table,
)

DEFAULT_CENTER = "all"
ROW_COLUMN = "manifest_row"
"""Extra column: the row of the manifest file each record comes from."""
OPTIONS = ("image_column", "patient_column", "center_column", "id_column", "label_columns")
"""Keyword options of ``read_manifest`` (also accepted as the ``columns`` mapping, e.g. a ManifestConfig)."""


def read_manifest(
    path: str | Path,
    name: str,
    *,
    image_column: str = "path",
    patient_column: str | None = None,
    center_column: str | None = None,
    id_column: str | None = None,
    label_columns: Mapping[str, str] | None = None,
    columns: Mapping[str, Any] | None = None,
) -> SourceTable:
    """Read a manifest: image path (relative to the manifest's folder, or absolute), ids, center, labels.

    ``id_column`` defaults to the image file stem, ``patient_column`` to the id and ``center_column`` to
    the constant ``all``. ``label_columns`` maps manifest column → record column (e.g.
    ``{"Outcome": "prognosis"}``); a label column is float when every value is numeric, else its text is
    kept for the task encoder. Other columns are kept as extras. ``columns`` gives the same options as a
    mapping (the keys of ``mdmt.config.ManifestConfig``; ``name`` and ``path`` there are ignored).
    A row with a blank key or a missing file is dropped with the reason.
    """
    if columns is not None:
        unknown = sorted(set(columns) - {"name", "path", *OPTIONS})
        if unknown:
            raise ConfigError(f"manifest {name!r}: unknown option(s) {unknown}; known: {list(OPTIONS)}")
        return read_manifest(path, name, **{key: columns[key] for key in OPTIONS if key in columns})
    if not name:
        raise ConfigError(f"manifest {path}: a dataset name is required")
    manifest = Path(path).expanduser().absolute()
    if not manifest.is_file():
        raise DataError(f"manifest {name!r} not found: {manifest}")
    table = read_table(manifest)
    label_columns = dict(label_columns or {})
    clashes = sorted(set(label_columns.values()) & set(ID_COLUMNS))
    if clashes:
        raise ConfigError(f"manifest {name!r}: label_columns cannot target the record columns {clashes}")
    keys = {"path": image_column, "image_id": id_column, "patient_id": patient_column, "center": center_column}
    found = {key: find_column(table, [column], manifest) for key, column in keys.items() if column}
    labels = {find_column(table, [column], manifest): target for column, target in label_columns.items()}
    labels |= {c: c for c in table.columns if c in LABEL_COLUMNS and c not in labels and c not in found.values()}
    extras = [c for c in table.columns if c not in found.values() and c not in labels]
    reserved = sorted(set(extras) & set(ID_COLUMNS) | set(extras) & set(labels.values()))
    if reserved:
        raise DataError(f"{manifest}: column(s) {reserved} clash with record columns; name them in the "
                        "manifest options or rename them")

    records = pd.DataFrame(index=table.index)
    records[ROW_COLUMN] = table.index + 2  # the file row (header = row 1), for messages about a cell
    records["path"] = [str(p if Path(p).is_absolute() else manifest.parent / p) if pd.notna(p) else p
                       for p in table[found["path"]]]
    records["image_id"] = table[found["image_id"]] if "image_id" in found else records["path"].map(
        lambda p: Path(p).stem if pd.notna(p) else p)
    records["patient_id"] = table[found["patient_id"]] if "patient_id" in found else records["image_id"]
    records["center"] = table[found["center"]] if "center" in found else DEFAULT_CENTER
    for column, target in labels.items():
        records[target] = numeric_where_possible(table[column])
    for column in extras:
        records[column] = table[column]

    kept, dropped = [], []
    for index, row in records.iterrows():
        blank = [found.get(key, key) for key in ("path", "image_id", "patient_id", "center") if pd.isna(row[key])]
        if blank:
            reason = f"blank {', '.join(blank)}: {manifest.name} row {index + 2}"
        elif not Path(row["path"]).is_file():
            reason = f"file not found: {row['path']}"
        else:
            kept.append(index)
            continue
        dropped.append({"image_id": str(row["image_id"]), "path": str(row["path"]), "reason": reason})
    return make_source_table(records.loc[kept], dropped, name)
