"""Datasets as plug-ins: a dataset is one registered object that reads its records, names the label columns it
carries, says how it is split, and builds its image cache.

Built-ins: ``aiforcovid`` (the three releases: prognosis, hospitals A–F), ``brixia`` (regional Brixia scores,
vendors as centers) and ``table`` (any CSV/XLSX manifest: image path, patient, optional center, label columns
mapped to record columns). A study names its datasets in ``data.datasets`` (id → ``{name, params}``); a run
trains on the datasets its strategy lists, and its tasks are masked per sample by the labels each dataset has.

Protocols: ``protocol.dataset`` defines them (k-fold CV, leave-one-center-out on its center column, the
official split files). Every other dataset of a run follows with its own stratified patient-level CV fold:
the same fold index under CV, fold ``protocol.paired_cv_fold`` under LOCO.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mdmt.config import Config, PluginRef
from mdmt.data import splits as split_lib
from mdmt.data.cache import (
    CONTENT_HASH,
    ImageCache,
    build_cache,
    counts_by_reason,
    print_summary,
)
from mdmt.data.sources import (
    KNOWN_BAD_REASON,
    LABEL_COLUMNS,
    SourceTable,
    read_aiforcovid,
    read_brixia,
    read_manifest,
)
from mdmt.data.sources.manifest import ROW_COLUMN
from mdmt.data.splits import Split
from mdmt.errors import ConfigError, DataError
from mdmt.registry import Registry
from mdmt.tasks import GLOBAL_BIN_EDGES, REGION_COLUMNS, bin_scores, get_task

PROTOCOLS: tuple[str, ...] = ("cv5", "loco", "official-cv5", "official-loco")
FOLLOWER_PROTOCOL = {"cv5": "cv5", "loco": "cv5", "official-cv5": "official-cv5", "official-loco": "official-cv5"}
"""The protocol a following dataset uses under each protocol of the protocol-defining dataset."""
STRATUM = "_stratum"


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
        cache = build_cache(source, config.data, config.data.cache_dir, progress=progress)
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


def _severity_label(records: pd.DataFrame) -> np.ndarray:
    return bin_scores(pd.to_numeric(records["brixia_global"], errors="coerce").to_numpy(), GLOBAL_BIN_EDGES)


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
                   _severity_label, official_kind="BX", supports_loco=False)


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
                return _severity_label(records)
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


# --------------------------------------------------------------------------------------------- splits
def loco_centers(config: Config, records: pd.DataFrame) -> list[str]:
    """LOCO fold order: the configured centers present in ``records``, then any other center, sorted."""
    present = set(records["center"].astype(str))
    listed = [c for c in config.protocol.loco_centers if c in present]
    return listed + sorted(present - set(listed))


def _official_dir(config: Config) -> Path:
    if not config.protocol.official_splits_dir:
        raise ConfigError("protocol.official_splits_dir must be set for the official-cv5 / official-loco protocols")
    return Path(config.protocol.official_splits_dir)


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")


def paired_fold(protocol: str, fold: int, config: Config) -> tuple[str, int]:
    """The (protocol, fold) a dataset that does not define the protocol uses in run (protocol, fold)."""
    _check_protocol(protocol)
    follower = FOLLOWER_PROTOCOL[protocol]
    return follower, fold if follower == protocol else config.protocol.paired_cv_fold


def _pick(folds: list[Split], fold: int, what: str) -> Split:
    if not 0 <= fold < len(folds):
        raise ConfigError(f"{what}: fold {fold} does not exist (folds 0..{len(folds) - 1})")
    return folds[fold]


def _cv(dataset: Dataset, records: pd.DataFrame, config: Config, seed: int) -> list[Split]:
    labelled = records.assign(**{STRATUM: dataset.stratify(records)})
    return split_lib.kfold_splits(labelled, k=config.protocol.cv_folds, seed=seed, label=STRATUM)


def split_groups(records: pd.DataFrame) -> pd.DataFrame:
    """``records`` as the splits see them: patients sharing a byte-identical image merged into one patient."""
    return split_lib.merge_duplicate_patients(records, CONTENT_HASH)


def dataset_folds(dataset: Dataset, records: pd.DataFrame, protocol: str, config: Config, seed: int) -> list[Split]:
    """Every fold of ``protocol`` for ``dataset`` (a following dataset gets its follower protocol's folds).

    Byte-identical images never fall on two sides: k-fold and LOCO split ``split_groups(records)``; an official
    fold is limited to the ids of ``records`` (the others in ``Split.missing``) and a copy the files put on
    another side than its twin is left out (``Split.dropped``).
    """
    _check_protocol(protocol)
    grouped = split_groups(records)
    defines = dataset.id == config.protocol.dataset
    if not defines:
        protocol = FOLLOWER_PROTOCOL[protocol]
    if protocol.startswith("official-") and dataset.official_kind is None:
        protocol = "cv5"
    if protocol == "cv5":
        return _cv(dataset, grouped, config, seed)
    if protocol == "loco":
        if not dataset.supports_loco:
            raise ConfigError(f"dataset {dataset.id!r} has no centers for leave-one-center-out")
        labelled = grouped.assign(**{STRATUM: dataset.stratify(grouped)})
        return split_lib.loco_splits(labelled, centers=loco_centers(config, grouped),
                                     val_fraction=config.protocol.loco_val_fraction, seed=seed, label=STRATUM)
    folds = [split_lib.restrict(split, records)
             for split in split_lib.official_splits(_official_dir(config), protocol, dataset.official_kind or "")]
    for split in folds:
        split.check(records)  # a patient the files put in two parts is an error, not a duplicate to drop
    return [split_lib.keep_groups_apart(split, grouped) for split in folds]


SPLIT_MEMO_SIZE = 256
"""Splits ``dataset_split`` keeps per process (a grid worker's runs share their folds: 44 in the demo)."""
_split_memo: dict[tuple[object, ...], tuple[pd.DataFrame, Split]] = {}


def dataset_split(dataset: Dataset, records: pd.DataFrame, protocol: str, fold: int, config: Config, seed: int
                  ) -> Split:
    """The split of ``dataset`` in run (protocol, fold), checked at patient level (duplicate images merged).

    A k-fold or LOCO split is computed from ``records`` alone, so it is kept for the next run of this process
    that asks with the same records object (a grid worker opens each cache once), dataset, protocol section and
    seed; official splits are read from their files every time.
    """
    if dataset.id != config.protocol.dataset:
        protocol, fold = paired_fold(protocol, fold, config)
    key = (id(records), dataset.id, repr(config.data.datasets.get(dataset.id)), repr(config.protocol), protocol,
           fold, seed)
    kept = _split_memo.get(key)
    if kept is not None and kept[0] is records:  # the memo holds the frame, so its id is not reused meanwhile
        return kept[1]
    split = _pick(dataset_folds(dataset, records, protocol, config, seed), fold, f"{dataset.id} {protocol}")
    split.check(split_groups(records))
    if not protocol.startswith("official-"):
        if len(_split_memo) >= SPLIT_MEMO_SIZE:
            _split_memo.pop(next(iter(_split_memo)))
        _split_memo[key] = (records, split)
    return split


def build_splits(config: Config, datasets: dict[str, Dataset], caches: dict[str, ImageCache], protocol: str,
                 fold: int, seed: int) -> dict[str, Split]:
    """The split of every dataset of a run."""
    return {i: dataset_split(d, caches[i].records, protocol, fold, config, seed) for i, d in datasets.items()}


def protocol_folds(protocol: str, config: Config, centers: list[str] | None = None) -> list[int]:
    """The fold indices of ``protocol``. LOCO has one fold per center: ``centers`` (those in the data, from
    ``loco_centers``) when given, else one per ``protocol.loco_centers``."""
    _check_protocol(protocol)
    if protocol == "cv5":
        return list(range(config.protocol.cv_folds))
    if protocol == "loco":
        return list(range(len(centers if centers is not None else config.protocol.loco_centers)))
    kind = "AFC"
    if config.protocol.dataset in config.data.datasets:
        kind = select(config, [config.protocol.dataset])[config.protocol.dataset].official_kind or kind
    return list(range(len(split_lib.official_splits(_official_dir(config), protocol, kind))))


def split_ids(splits: dict[str, Split]) -> dict[str, dict[str, list[str]]]:
    """dataset → part → sorted ids (what a run's inputs fingerprint records)."""
    return {name: {part: sorted(map(str, ids)) for part, ids in split.parts().items()}
            for name, split in splits.items()}


def empty_parts(splits: dict[str, Split]) -> list[str]:
    """``dataset/part`` of every empty part (a run cannot train, select or test on nothing)."""
    return [f"{name}/{part}" for name, split in splits.items() for part, ids in split.parts().items() if len(ids) == 0]


__all__ = ["DATASETS", "PROTOCOLS", "Dataset", "build_splits", "dataset_split", "paired_fold",
           "prepare", "protocol_folds", "select", "study_datasets"]
