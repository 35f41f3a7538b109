"""What every reader shares: the records table's columns, ``SourceTable``, reading a sheet, finding a column,
and listing a dataset's image files."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mdmt.errors import DataError
from mdmt.tasks import REGION_COLUMNS

ID_COLUMNS: tuple[str, ...] = ("image_id", "patient_id", "center", "path", "dataset")
LABEL_COLUMNS: tuple[str, ...] = ("prognosis", *REGION_COLUMNS, "brixia_global")
RECORD_COLUMNS: tuple[str, ...] = ID_COLUMNS + LABEL_COLUMNS
DROPPED_COLUMNS: tuple[str, ...] = ("image_id", "path", "reason")
KNOWN_BAD_REASON = "known bad (official exclusion list)"
IMAGE_SUFFIXES: tuple[str, ...] = (".dcm", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".dicom")
"""Files counted as images in a dataset folder; the first four are tried, in order, for a bare id."""
_BARE_ID_SUFFIXES = IMAGE_SUFFIXES[:4]
_EXAMPLES = 5  # ids quoted in an error message
_LABEL_GROUPS = {"prognosis": ("prognosis",), "brixia regions": REGION_COLUMNS, "brixia_global": ("brixia_global",)}

MASK_PATH = "mask_path"
"""Optional records column: the film's lung mask file (absolute path), NaN where it has none (``scored_films``);
an image cache built with masks reads it, and ``mdmt.data.datasets`` builds masks when a dataset's records have it."""

SYNTHETIC_MARKER = Path("_synthetic_truth") / "params.json"
"""The file a generated (synthetic) dataset holds at its root: the twin writes it last, the model card and
``predict``'s warning look for it, so no production module needs the twin itself."""


@dataclass
class SourceTable:
    """A reader's output: ``records`` (one row per usable image) and ``dropped`` (image_id, path, reason)."""

    records: pd.DataFrame
    dropped: pd.DataFrame

    @property
    def name(self) -> str:
        """The dataset name (the ``dataset`` column), or ``dataset`` when there are no records."""
        names = self.records["dataset"].unique() if len(self.records) else []
        return str(names[0]) if len(names) else "dataset"

    def report(self) -> str:
        """A few lines: counts of images, patients and centers, labelled rows, and drops by reason."""
        records = self.records
        centers = records["center"].value_counts().sort_index()
        lines = [
            f"{self.name}: {len(records)} images, {records['patient_id'].nunique()} patients, "
            f"{len(centers)} centers ({', '.join(f'{c} {n}' for c, n in centers.items())})"
        ]
        counts = {name: int(records[list(columns)].notna().all(axis=1).sum())
                  for name, columns in _LABEL_GROUPS.items()}
        labelled = [f"{name} {n}" for name, n in counts.items() if n]
        lines.append("labelled: " + (", ".join(labelled) if labelled else "none"))
        lines.append(f"dropped: {len(self.dropped)}")
        kinds = self.dropped["reason"].str.split(":").str[0]
        for kind, ids in self.dropped.groupby(kinds, sort=True)["image_id"]:
            shown = ", ".join(ids.head(_EXAMPLES)) + (", ..." if len(ids) > _EXAMPLES else "")
            lines.append(f"  {kind}: {len(ids)} ({shown})")
        return "\n".join(lines)


def make_source_table(records: pd.DataFrame, dropped: Iterable[Mapping[str, str]], dataset: str) -> SourceTable:
    """Standard column order and types: id columns str, missing label columns NaN, extras after them."""
    records = records.reset_index(drop=True).copy()
    records["dataset"] = dataset
    for column in LABEL_COLUMNS:
        if column not in records:
            records[column] = float("nan")
    for column in ID_COLUMNS:
        records[column] = records[column].astype(str)
    duplicated = records["image_id"][records["image_id"].duplicated()].unique().tolist()
    if duplicated:
        raise DataError(f"dataset {dataset!r}: duplicate image_id {duplicated[:_EXAMPLES]}")
    extras = [c for c in records.columns if c not in RECORD_COLUMNS]
    dropped_table = pd.DataFrame(list(dropped), columns=list(DROPPED_COLUMNS)).astype(str)
    return SourceTable(records[list(RECORD_COLUMNS) + extras], dropped_table)


def existing_dir(path: str | Path, what: str) -> Path:
    """``path`` as an absolute Path; DataError naming it when it is not a folder."""
    folder = Path(path).expanduser().absolute()
    if not folder.is_dir():
        raise DataError(f"{what} not found: {folder} is not a folder")
    return folder


def sniff_delimiter(path: Path) -> str:
    """The most frequent of ``;``, ``,`` and tab in the header line (``,`` when none occurs)."""
    with path.open(encoding="utf-8-sig", errors="replace") as handle:
        header = handle.readline()
    return max((",", ";", "\t"), key=header.count)


def read_table(path: Path) -> pd.DataFrame:
    """A CSV (delimiter sniffed, optional BOM) or the first sheet of an Excel file; every cell str or NaN.

    Column names and cells are stripped; blank cells become NaN and fully blank rows are removed
    (the index keeps the original row numbers: file row = index + 2).
    """
    try:
        if path.suffix.lower() in (".xlsx", ".xlsm", ".xls"):
            frame = pd.read_excel(path, sheet_name=0, header=0, dtype=str)
        else:
            frame = pd.read_csv(path, sep=sniff_delimiter(path), dtype=str, encoding="utf-8-sig")
    except Exception as exc:  # pandas/openpyxl raise many types for an unreadable table
        raise DataError(f"{path}: cannot read table: {type(exc).__name__}: {exc}") from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    frame = frame.apply(lambda column: column.str.strip()).replace("", float("nan"))
    return frame.dropna(how="all")


def find_column(frame: pd.DataFrame, spellings: Sequence[str], source: Path, required: bool = True) -> str | None:
    """The frame's column matching one of ``spellings`` (case-insensitive, first spelling first)."""
    by_lower = {str(c).lower(): str(c) for c in frame.columns}
    for spelling in spellings:
        if spelling.lower() in by_lower:
            return by_lower[spelling.lower()]
    if required:
        wanted = " or ".join(repr(s) for s in spellings)
        raise DataError(f"{source}: missing column {wanted}; available columns: {list(frame.columns)}")
    return None


def numeric_where_possible(values: pd.Series) -> pd.Series:
    """Float when every non-blank value parses as a number, else the values unchanged."""
    numbers = pd.to_numeric(values, errors="coerce")
    return numbers.astype(float) if numbers.notna().sum() == values.notna().sum() else values


def image_id_of(name: str) -> str:
    """The id a file name stands for: the name without a known image suffix."""
    path = Path(name)
    return path.stem if path.suffix.lower() in IMAGE_SUFFIXES else name


class ImageFolders:
    """The image files of some folders, listed once: lookup by name, and the files no row claimed."""

    def __init__(self, folders: Sequence[Path]):
        self.folders = [folder for folder in folders if folder.is_dir()]
        self._files = {
            folder: {p.name.lower(): p for p in sorted(folder.iterdir())
                     if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES}
            for folder in self.folders
        }
        self.claimed: set[Path] = set()

    @staticmethod
    def candidates(name: str) -> list[str]:
        """File names tried for ``name``, in order: itself when it has an image suffix, then its stem with each
        other suffix (a folder converted from DICOM to PNG or JPEG still matches a sheet naming ``.dcm``
        files); a bare id gets each suffix."""
        path = Path(name)
        if path.suffix.lower() in IMAGE_SUFFIXES:
            return [name] + [path.stem + s for s in _BARE_ID_SUFFIXES if s != path.suffix.lower()]
        return [name + suffix for suffix in _BARE_ID_SUFFIXES]

    def find(self, name: str, first: Path | None = None) -> Path | None:
        """The file for ``name``, searched in ``first`` then the other folders; marks it claimed."""
        order = ([first] if first in self._files else []) + [f for f in self.folders if f != first]
        for folder in order:
            for candidate in self.candidates(name):
                found = self._files[folder].get(candidate.lower())
                if found is not None:
                    self.claimed.add(found)
                    return found
        return None

    def unclaimed(self) -> list[Path]:
        """Image files in the folders that no ``find`` returned, sorted."""
        return sorted(p for files in self._files.values() for p in files.values() if p not in self.claimed)


def first_ids(frame: pd.DataFrame, mask: pd.Series, column: str) -> list[str]:
    """Up to a few values of ``column`` where ``mask`` holds (for error messages)."""
    return frame.loc[mask, column].astype(str).head(_EXAMPLES).tolist()
