"""Datasets as plug-ins: a dataset is one registered object that reads its records, names the label columns it
carries, says how it is split, and builds its image cache.

Built-ins: ``aiforcovid`` (the three releases: prognosis, hospitals A–F), ``brixia`` (regional Brixia scores,
vendors as centers), ``table`` (any CSV/XLSX manifest: image path, patient, optional center, label columns
mapped to record columns) and ``scored_films`` (a film folder with radiologists' Brixia scores). A study names its
datasets in ``data.datasets`` (id → ``{name, params}``); a run trains on the datasets its strategy lists, and its
tasks are masked per sample by the labels each dataset has.

Which fold of a dataset a run uses is the protocol's business (``mdmt.protocols``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mdmt.cache.image_cache import (
    ImageCache,
    build_cache,
    counts_by_reason,
    print_summary,
)
from mdmt.config import Config, PluginRef
from mdmt.errors import ConfigError, DataError
from mdmt.registry import Registry
from mdmt.sources import (
    KNOWN_BAD_REASON,
    LABEL_COLUMNS,
    SourceTable,
    read_aiforcovid,
    read_brixia,
    read_manifest,
    read_scored_films,
)
from mdmt.sources.manifest import ROW_COLUMN
from mdmt.sources.tables import MASK_PATH
from mdmt.tasks import MASK_PRESENT, REGION_COLUMNS, get_task, global4_targets


@dataclass(frozen=True)
class Dataset:
    """A study's dataset: how to read it, which label columns it has, and how it is split.

    ``stratify(records)`` gives the label its CV folds are stratified by (with the center); ``official_kind``
    names its folder among the official split files (``AFC``, ``BX``), None when it has none.
    """

    id: str
    read: Callable[[], SourceTable]
    label_columns: tuple[str, ...]
    stratify: Callable[[pd.DataFrame], np.ndarray]
    official_kind: str | None = None
    supports_loco: bool = True

    def labels_task(self, columns: tuple[str, ...]) -> bool:
        """Whether this dataset carries every column a task reads."""
        return set(columns) <= set(self.label_columns)

    def cache(self, config: Config, progress: bool = True) -> ImageCache:
        """Read the records and build (or reuse) the image cache under ``data.cache_dir``.

        DataError (``check_losses``) before caching when the reader's drops alone are too many, and after it
        when no image is readable or the drops and unreadable images together are too many.
        """
        source = self.read()
        seen = len(source.records) + len(source.dropped)
        limit = config.data.max_drop_fraction
        check_losses(self.id, seen, len(source.records), source.dropped, limit)
        cache = build_cache(source, config.data, config.data.cache_dir, progress=progress,
                            workers=config.runtime.workers, masks=MASK_PATH in source.records)
        check_losses(self.id, seen, len(cache), pd.concat([cache.dropped, cache.failed]), limit)
        return cache


def check_losses(dataset_id: str, seen: int, kept: int, lost: pd.DataFrame, limit: float) -> None:
    """DataError naming the dataset, the counts and the top reasons when ``kept`` is 0, or when the ``lost`` rows
    (``image_id``, ``reason``; the official exclusion list does not count) are more than ``limit`` of the
    ``seen`` input rows."""
    counted = lost[lost["reason"].astype(str) != KNOWN_BAD_REASON]
    first = "; ".join(f"{r.image_id}: {r.reason}" for r in counted.head(3).itertuples()) or "none"
    if kept == 0:
        raise DataError(f"dataset {dataset_id!r}: no readable image ({seen} input row(s); first reasons: {first})")
    if seen and len(counted) > limit * seen:
        raise DataError(
            f"dataset {dataset_id!r}: {len(counted)} of {seen} input rows lost ({len(counted) / seen:.0%}), more "
            f"than data.max_drop_fraction = {limit:g} (1.0 allows any); by reason: "
            f"{counts_by_reason(counted, top=5)}; first: {first}")


DATASETS: Registry[Dataset] = Registry("dataset")


def _prognosis_label(records: pd.DataFrame) -> np.ndarray:
    return pd.to_numeric(records["prognosis"], errors="coerce").to_numpy()


@dataclass
class RootParams:
    """A dataset in its distributed folder layout."""

    root: str = ""


def _root(params: RootParams, dataset_id: str) -> str:
    if not params.root:
        raise ConfigError(f"data.datasets.{dataset_id}.params.root is not set (the dataset's folder)")
    return params.root


@DATASETS.register("aiforcovid", RootParams, "AIforCOVID: 3 releases, prognosis MILD/SEVERE, hospitals A-F")
def aiforcovid(params: RootParams, dataset_id: str) -> Dataset:
    """AIforCOVID from its root (imgs*/ + AIforCOVID*.xlsx)."""
    return Dataset(dataset_id, lambda: read_aiforcovid(_root(params, dataset_id)), ("prognosis",),
                   _prognosis_label, official_kind="AFC")


@DATASETS.register("brixia", RootParams, "BrixIA: 6 regional Brixia scores 0-3, vendors as centers")
def brixia(params: RootParams, dataset_id: str) -> Dataset:
    """BrixIA from its root (dicom_clean/ + metadata_global_v2.csv)."""
    return Dataset(dataset_id, lambda: read_brixia(_root(params, dataset_id)), (*REGION_COLUMNS, "brixia_global"),
                   global4_targets, official_kind="BX", supports_loco=False)


@DATASETS.register("scored_films", RootParams, "a film folder with Brixia scores: manifest.csv + brixia-scores.csv")
def scored_films(params: RootParams, dataset_id: str) -> Dataset:
    """Films of one folder labelled by a radiologist's Brixia scores (``mdmt.sources.scored_films``)."""
    return Dataset(dataset_id, lambda: read_scored_films(_root(params, dataset_id), dataset_id),
                   (*REGION_COLUMNS, "brixia_global", MASK_PRESENT), _scored_or_not, supports_loco=False)


def _scored_or_not(records: pd.DataFrame) -> np.ndarray:
    """The global score's bin, and a stratum of its own (-1) for unscored films: they carry only a lung mask, which
    a segmentation task learns from, so the folds split them too."""
    return np.nan_to_num(global4_targets(records), nan=-1.0)


@dataclass
class TableParams:
    """A dataset described by a CSV/XLSX manifest, one row per image."""

    path: str = ""
    image_column: str = "path"
    id_column: str | None = None
    patient_column: str | None = None
    center_column: str | None = None
    label_columns: dict[str, str] = field(default_factory=dict)
    """Sheet column → record column (``prognosis``, ``brixia_A``…``brixia_F``, ``brixia_global``, or the column
    of an extra task); sheet columns already named like a record column are taken as they are."""
    stratify: str | None = None
    """Record column the CV folds are stratified by (default: prognosis, else the global Brixia bin, else none)."""


def _prognosis_codes(values: pd.Series, rows: pd.Series, where: str) -> pd.Series:
    """Prognosis cells as 0/1: numbers 0/1 or the class names MILD/SEVERE (any case); anything else is an error."""
    names = {name.upper(): float(i) for i, name in enumerate(get_task("prognosis").class_names)}
    out = []
    for row, value in values.items():
        if pd.isna(value):
            out.append(np.nan)
            continue
        text = str(value).strip().upper()
        number = pd.to_numeric(text, errors="coerce")
        code = names.get(text, float(number) if number in (0, 1) else None)
        if code is None:
            raise DataError(f"{where} row {rows[row]}: prognosis value {value!r} is not MILD/SEVERE or 0/1")
        out.append(code)
    return pd.Series(out, index=values.index, dtype=float)


def _numeric_labels(values: pd.Series, rows: pd.Series, column: str, where: str) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce")
    bad = numbers.isna() & values.notna()
    if bad.any():
        row = bad.idxmax()
        raise DataError(f"{where} row {rows[row]}: {column} value {values[row]!r} is not a number")
    return numbers.astype(float)


def read_table_dataset(params: TableParams, dataset_id: str) -> SourceTable:
    """The manifest read into a records table, with built-in label columns parsed (bad cells are errors)."""
    if not params.path:
        raise ConfigError(f"data.datasets.{dataset_id}.params.path is not set (the manifest file)")
    options = {k: v for k, v in asdict(params).items() if k != "stratify"}
    table = read_manifest(params.path, dataset_id, columns=options)
    records = table.records.copy()
    where = f"{Path(params.path).name} ({dataset_id})"
    if "prognosis" in records and records["prognosis"].notna().any():
        records["prognosis"] = _prognosis_codes(records["prognosis"], records[ROW_COLUMN], where)
    for column in (*REGION_COLUMNS, "brixia_global"):
        if column in records and records[column].notna().any():
            records[column] = _numeric_labels(records[column], records[ROW_COLUMN], column, where)
    _stratify_column(params, dataset_id, records)
    return SourceTable(records, table.dropped)


def _stratify_column(params: TableParams, dataset_id: str, records: pd.DataFrame) -> str | None:
    """``params.stratify``; ConfigError naming it and the dataset when the records have no such column."""
    column = params.stratify
    if column is not None and column not in records:
        raise ConfigError(f"data.datasets.{dataset_id}.params.stratify: no column {column!r} in the records of "
                          f"{Path(params.path).name} (columns: {', '.join(map(str, records.columns))})")
    return column


def _table_label_columns(params: TableParams) -> tuple[str, ...]:
    targets = list(params.label_columns.values())
    return tuple(dict.fromkeys([*targets, *LABEL_COLUMNS]))


def _table_stratify(params: TableParams, dataset_id: str) -> Callable[[pd.DataFrame], np.ndarray]:
    def stratify(records: pd.DataFrame) -> np.ndarray:
        column = _stratify_column(params, dataset_id, records)
        if column is None:
            if records["prognosis"].notna().any():
                return _prognosis_label(records)
            if records["brixia_global"].notna().any():
                return global4_targets(records)
            return np.zeros(len(records))
        return pd.factorize(records[column])[0].astype(float)

    return stratify


@DATASETS.register("table", TableParams, "any CSV/XLSX manifest: image, patient, center, label columns")
def table(params: TableParams, dataset_id: str) -> Dataset:
    """A manifest dataset; LOCO needs its center column."""
    return Dataset(dataset_id, lambda: read_table_dataset(params, dataset_id), _table_label_columns(params),
                   _table_stratify(params, dataset_id), supports_loco=params.center_column is not None)


# --------------------------------------------------------------------------------------------- the study
def study_datasets(config: Config) -> dict[str, Dataset]:
    """Every dataset of ``data.datasets``, in config order (id → Dataset)."""
    if not config.data.datasets:
        raise ConfigError("no dataset configured: set data.datasets (for example data.datasets.aiforcovid."
                          "params.root=DIR, or --aiforcovid-root DIR)")
    out = {}
    for dataset_id, ref in config.data.datasets.items():
        ref = PluginRef.of(ref).named(dataset_id)
        out[dataset_id] = DATASETS.build(ref, f"data.datasets.{dataset_id}.params", dataset_id=dataset_id)
    return out


def select(config: Config, ids: list[str] | tuple[str, ...]) -> dict[str, Dataset]:
    """The datasets ``ids`` of the study (ConfigError naming an id that is not configured)."""
    available = study_datasets(config)
    missing = [i for i in ids if i not in available]
    if missing:
        raise ConfigError(f"dataset(s) {missing} are not configured in data.datasets (configured: "
                          f"{', '.join(available)})")
    return {i: available[i] for i in ids}


def prepare(config: Config, ids: list[str] | tuple[str, ...] | None = None, progress: bool = True
            ) -> dict[str, ImageCache]:
    """Build (or reuse) the image cache of each dataset ``ids`` (default: all configured)."""
    datasets = study_datasets(config) if ids is None else select(config, ids)
    caches = {i: d.cache(config, progress) for i, d in datasets.items()}
    if progress:
        print_summary(caches)
    return caches


__all__ = ["DATASETS", "Dataset", "prepare", "select", "study_datasets"]
