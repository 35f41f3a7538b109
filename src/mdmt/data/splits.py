"""Patient-level splits: stratified k-fold (the paper's rotation), leave-one-center-out, official split files.
(Over 400 lines on purpose: the three split kinds share the patient checks and the reporting of dropped rows.)

A ``Split`` holds arrays of ``image_id`` strings. Every constructor checks that no patient (AIforCOVID:
the image; BrixIA: the ``Subject``) falls in two parts of a fold, and reports by id the rows it leaves out
(``Split.dropped`` and a logged warning) instead of losing them silently. Ids an official split file lists
but the records lack are kept by part in ``Split.missing``. Byte-identical images under two ids are kept on
one side: ``merge_duplicate_patients`` groups their patients before k-fold or LOCO, ``keep_groups_apart``
drops the copies an official split puts on another side. ``carve_calibration`` moves a share of a fold's
validation patients into the optional ``calib`` part.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import train_test_split

from mdmt.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PARTS: tuple[str, ...] = ("train", "val", "test")
"""The parts every split has (an official split file each)."""
CALIB = "calib"
"""The optional part carved out of val (``carve_calibration``): it fits calibration, never trains nor selects."""
DROPPED_COLUMNS = ["image_id", "reason"]
OFFICIAL_KINDS: dict[str, str] = {"AFC": "AFC", "BX": "BX", "aiforcovid": "AFC", "brixia": "BX"}
"""Folder of the official split files for each dataset name."""
OFFICIAL_FOLDERS: tuple[str, ...] = ("5", "10", "loCo")
"""The protocol folders of the official split files (``mdmt.protocols`` names them)."""
AFC_CLASSES: dict[str, float] = {"MILD": 0.0, "SEVERE": 1.0}
BRIXIA_REGIONS: tuple[str, ...] = tuple(f"brixia_{r}" for r in "ABCDEF")
SHOWN_IDS = 10
"""How many ids a warning or an error lists before it says ``…``."""


def _show(ids: Sequence[str]) -> str:
    ids = list(ids)
    return ", ".join(map(str, ids[:SHOWN_IDS])) + (" …" if len(ids) > SHOWN_IDS else "")


def _empty_dropped() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=str) for c in DROPPED_COLUMNS})


def _ids(values: Sequence[str] | np.ndarray | pd.Series) -> np.ndarray:
    return np.asarray(list(map(str, values)), dtype=str)


def _no_ids() -> np.ndarray:
    return _ids([])


@dataclass
class Split:
    """One fold: ``image_id`` arrays of the three parts (and of ``calib`` when carved), plus the ids left out of all
    of them (and why)."""

    protocol: str
    fold: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    dropped: pd.DataFrame = field(default_factory=_empty_dropped)
    missing: dict[str, list[str]] = field(default_factory=dict)
    """Part → ids the split file lists that are not in the records (set by ``restrict``)."""
    calib: np.ndarray = field(default_factory=_no_ids)
    """Former val ids that fit calibration (``carve_calibration``); empty when none were carved."""

    def parts(self) -> dict[str, np.ndarray]:
        """``{"train": ids, "val": ids, "test": ids}``, with ``"calib": ids`` after val when that part is not empty
        (most held-out last)."""
        calib = {CALIB: self.calib} if len(self.calib) else {}
        return {"train": self.train, "val": self.val, **calib, "test": self.test}

    def check(self, records: pd.DataFrame | None = None, group: str = "patient_id") -> None:
        """DataError when an id repeats or a patient falls in two parts.

        Without ``records`` (or for ids absent from them) each image is its own patient.
        """
        patient_of: Mapping[str, str] = {}
        if records is not None:
            _require(records, ("image_id", group))
            patient_of = dict(zip(records["image_id"].astype(str), records[group].astype(str)))
        owner: dict[str, str] = {}
        clashes: dict[str, set[str]] = {}
        for part, ids in self.parts().items():
            repeated = pd.Index(ids)[pd.Index(ids).duplicated()]
            if len(repeated):
                raise DataError(f"{self.protocol} fold {self.fold}: ids listed twice in {part}: {_show(repeated)}")
            for patient in {patient_of.get(i, i) for i in ids}:
                if owner.setdefault(patient, part) != part:
                    clashes.setdefault(patient, {owner[patient]}).add(part)
        if clashes:
            named = [f"{p} ({'/'.join(sorted(parts))})" for p, parts in sorted(clashes.items())]
            raise DataError(f"{self.protocol} fold {self.fold}: {len(clashes)} patient(s) in two parts: {_show(named)}")


def _require(records: pd.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in columns if c not in records.columns]
    if missing:
        raise DataError(f"records table lacks column(s) {', '.join(missing)} (has {', '.join(map(str, records.columns))})")


def _drop_unlabelled(records: pd.DataFrame, label: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(labelled rows, dropped[image_id, reason]); the dropped ids are logged."""
    unlabelled = pd.to_numeric(records[label], errors="coerce").isna()
    dropped = pd.DataFrame({"image_id": records.loc[unlabelled, "image_id"].astype(str),
                            "reason": f"no {label} label"}).reset_index(drop=True)
    if len(dropped):
        log.warning("splits: %d image(s) without a %r label left out of every fold: %s",
                    len(dropped), label, _show(dropped["image_id"]))
    return records.loc[~unlabelled], dropped


def _patients(records: pd.DataFrame, group: str, columns: Sequence[str]) -> pd.DataFrame:
    """One row per patient, sorted by patient id, with ``columns`` taken from the patient's first image."""
    first = records.astype({group: str}).drop_duplicates(group, keep="first")
    return first[[group, *columns]].sort_values(group, kind="stable").reset_index(drop=True)


def _make_split(
    protocol: str, fold: int, records: pd.DataFrame, part_of: pd.Series, group: str, dropped: pd.DataFrame
) -> Split:
    """A Split from a per-image part label (``train``/``val``/``test``; NaN = not in this fold), checked."""
    ids = records["image_id"].astype(str).to_numpy()
    labels = part_of.to_numpy()
    split = Split(protocol, fold, *(ids[labels == part] for part in PARTS), dropped=dropped.reset_index(drop=True))
    split.check(records, group)
    return split


def kfold_splits(
    records: pd.DataFrame,
    k: int = 5,
    seed: int = 0,
    label: str = "prognosis",
    strata: Sequence[str] = ("label", "center"),
    group: str = "patient_id",
) -> list[Split]:
    """Stratified patient-level k-fold with the paper's rotation (fold i tests on part i, validates on part i − 1).

    Patients (sorted by id; stratum = label × center of their first image in table order) are shuffled per
    stratum (strata in sorted order) with ``numpy.random.default_rng(seed)`` and cut into ``k`` chunks.
    Fold i: test = chunk i, val = chunk (i − 1) mod k (so val(i) = test(i − 1)), train = the other k − 2
    chunks (60/20/20 for k = 5). Unlike the paper, a stratum's remainder patients are not lost: they go one
    each to the next chunks in a round-robin that carries over from stratum to stratum, so every patient is
    tested exactly once and chunk sizes differ by at most one patient. Images without ``label`` are left
    out (``Split.dropped``, logged).
    """
    if k < 3:
        raise ConfigError(f"kfold_splits: k must be at least 3 (train, val and test chunks), got {k}")
    strata_columns = [label if s == "label" else s for s in strata]
    _require(records, ["image_id", group, label, *strata_columns])
    labelled, dropped = _drop_unlabelled(records, label)
    patients = _patients(labelled, group, strata_columns)
    keys = patients[strata_columns].astype(str).agg("|".join, axis=1)
    rng = np.random.default_rng(seed)
    chunk = np.empty(len(patients), dtype=np.int64)
    offset = 0
    for key in sorted(keys.unique()):
        members = rng.permutation(np.flatnonzero(keys.to_numpy() == key))
        base, extra = divmod(len(members), k)
        sizes = base + (((np.arange(k) - offset) % k) < extra)
        chunk[members] = np.repeat(np.arange(k), sizes)
        offset = (offset + extra) % k
    chunk_of_image = labelled[group].astype(str).map(dict(zip(patients[group], chunk)))
    folds = []
    for fold in range(k):
        part = pd.Series("train", index=labelled.index)
        part[chunk_of_image == fold] = "test"
        part[chunk_of_image == (fold - 1) % k] = "val"
        folds.append(_make_split(f"cv{k}", fold, labelled, part, group, dropped))
    return folds


def _two_ways(
    patients: pd.DataFrame, group: str, label: str, size: float, seed: int, what: str
) -> tuple[set[str], set[str]]:
    """Patients split into (kept, moved), ``size`` of them moved (a fraction, or a count), stratified by label when
    every class has at least two patients (``what`` names the split in the log)."""
    ids = patients[group].to_numpy()
    labels = patients[label].to_numpy()
    try:
        kept, moved = train_test_split(ids, test_size=size, random_state=seed, shuffle=True, stratify=labels)
    except ValueError:
        log.info("%s: a class has too few patients to stratify; splitting unstratified", what)
        kept, moved = train_test_split(ids, test_size=size, random_state=seed, shuffle=True)
    return set(kept), set(moved)


def loco_splits(
    records: pd.DataFrame,
    centers: Sequence[str] | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    label: str = "prognosis",
    group: str = "patient_id",
) -> list[Split]:
    """Leave-one-center-out: fold i tests on every image of ``centers[i]``.

    The patients of the other centers are shuffled (``seed``) and ``val_fraction`` of them go to val,
    stratified by ``label`` (unstratified when a class is too small), the rest to train. Default order:
    sorted centers (the paper's is ``ProtocolConfig.loco_centers``: A, D, E, F, B, C). A patient with images
    in the held-out center and elsewhere is a test patient; its other images are left out of that fold.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"loco_splits: val_fraction must be in (0, 1), got {val_fraction}")
    _require(records, ["image_id", group, label, "center"])
    labelled, dropped = _drop_unlabelled(records, label)
    center = labelled["center"].astype(str)
    present = sorted(center.unique())
    order = list(present if centers is None else centers)
    unknown = sorted(set(order) - set(present))
    if unknown:
        raise ConfigError(f"loco_splits: center(s) {', '.join(unknown)} not in the records (present: {', '.join(present)})")
    patient = labelled[group].astype(str)
    folds = []
    for fold, held_out in enumerate(order):
        test_patients = set(patient[center == held_out])
        elsewhere = patient.isin(test_patients) & (center != held_out)
        pool = labelled[~patient.isin(test_patients)]
        train, val = _two_ways(_patients(pool, group, [label]), group, label, val_fraction, seed, "loco validation")
        part = pd.Series(np.nan, index=labelled.index, dtype=object)
        part[center == held_out] = "test"
        part[patient.isin(train)] = "train"
        part[patient.isin(val)] = "val"
        moved = pd.DataFrame({"image_id": labelled.loc[elsewhere, "image_id"].astype(str),
                              "reason": f"patient also imaged in held-out center {held_out}"})
        if len(moved):
            log.warning("loco fold %d: %d image(s) of test patients taken in other centers left out: %s",
                        fold, len(moved), _show(moved["image_id"]))
        folds.append(_make_split("loco", fold, labelled, part, group, pd.concat([dropped, moved])))
    return folds


# ------------------------------------------------------------------------------------------ official files
def _official_folder(directory: str | Path, kind: str, protocol: str | None = None) -> Path:
    if kind not in OFFICIAL_KINDS:
        raise ConfigError(f"official splits: unknown dataset {kind!r}; choose one of {', '.join(OFFICIAL_KINDS)}")
    folder = Path(directory) / OFFICIAL_KINDS[kind]
    if protocol is not None:
        if protocol not in OFFICIAL_FOLDERS:
            raise ConfigError(f"official splits: unknown protocol folder {protocol!r}; choose one of "
                              f"{', '.join(OFFICIAL_FOLDERS)}")
        folder = folder / protocol
    if not folder.is_dir():
        raise DataError(f"official splits: folder not found: {folder}")
    return folder


def _fold_dirs(folder: Path) -> list[Path]:
    """Fold sub-folders in numeric order (never directory-listing order)."""
    return sorted((p for p in folder.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))


def read_split_file(path: str | Path) -> pd.DataFrame:
    """One official split file (space-separated, header) with every column read as a string."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"official splits: file not found: {path}")
    try:
        table = pd.read_csv(path, sep=r"\s+", dtype=str)
    except ValueError as exc:  # empty, not UTF-8 text, or rows of uneven length
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise DataError(f"{path}: not a split file (a header 'img …' and one id per line): {reason}") from exc
    if "img" not in table.columns:
        raise DataError(f"{path}: no 'img' column in the header (columns: {', '.join(table.columns)})")
    return table


def official_splits(directory: str | Path, protocol: str = "5", kind: str = "AFC", name: str | None = None
                    ) -> list[Split]:
    """The paper's split files ``<directory>/<kind>/<protocol>/<fold>/{train,val,test}.txt``, folds in numeric order.

    ``kind``: ``AFC``/``aiforcovid`` or ``BX``/``brixia``; ``protocol``: the folder ``5``, ``10`` or ``loCo``;
    ``name``: the splits' protocol name (default: the folder). The files list images, so the check here is
    image-level (BrixIA patients: ``Split.check(records)`` with the Subject column).
    """
    folder = _official_folder(directory, kind, protocol)
    folds = _fold_dirs(folder)
    if not folds:
        raise DataError(f"official splits: no numbered fold folders in {folder}")
    name = name or protocol
    splits = []
    for fold_dir in folds:
        ids = [_ids(read_split_file(fold_dir / f"{part}.txt")["img"]) for part in PARTS]
        split = Split(name, int(fold_dir.name), *ids)
        split.check()
        splits.append(split)
    return splits


def _scores(ids: pd.Series, scores: pd.Series, source: Path) -> np.ndarray:
    """``[1000]`` → regional scores (0, 0, 1, 0, 0, 0): the files lost the leading zeros; left-pad to 6."""
    digits = scores.astype(str).str.strip().str.removeprefix("[").str.removesuffix("]")
    bad = ~digits.str.fullmatch(r"[0-3]{1,6}")
    if bad.any():
        raise DataError(f"{source}: scores not of the form [ABCDEF] with digits 0-3 for ids {_show(ids[bad])}")
    padded = digits.str.zfill(6)
    return np.array([[float(c) for c in s] for s in padded], dtype=np.float64).reshape(-1, 6)


def _official_centers(folder: Path) -> pd.Series:
    """``image_id → center`` from every fold file under ``folder`` (all.txt has no centers)."""
    files = sorted(p for p in folder.glob("*/*/*.txt") if p.parent.name.isdigit())
    tables = [read_split_file(p)[["img", "center"]] for p in files]
    pairs = pd.concat(tables).dropna().drop_duplicates() if tables else pd.DataFrame(columns=["img", "center"])
    conflicting = pairs["img"][pairs["img"].duplicated()]
    if len(conflicting):
        raise DataError(f"{folder}: ids with two different centers across the fold files: {_show(conflicting.unique())}")
    return pairs.set_index("img")["center"]


def official_labels(directory: str | Path, kind: str = "AFC") -> pd.DataFrame:
    """``<kind>/all.txt`` as a records-like table (``image_id``, ``patient_id`` = image id, ``center``, labels).

    AFC: ``prognosis`` (MILD 0, SEVERE 1). BX: ``brixia_A``…``brixia_F`` from the zero-padded score
    strings, ``brixia_global`` and the raw ``label_dim``. The center comes from the fold files; an id no
    fold file lists has center NaN (logged).
    """
    folder = _official_folder(directory, kind)
    source = folder / "all.txt"
    table = read_split_file(source)
    ids = table["img"].astype(str)
    out = pd.DataFrame({"image_id": ids, "patient_id": ids})
    if OFFICIAL_KINDS[kind] == "AFC":
        label = table["label"].str.strip().str.upper()
        unknown = ~label.isin(list(AFC_CLASSES))
        if unknown.any():
            raise DataError(f"{source}: labels other than MILD/SEVERE for ids {_show(ids[unknown])}")
        out["prognosis"] = label.map(AFC_CLASSES).astype(float)
        out["dataset"] = "aiforcovid"
    else:
        regions = _scores(ids, table["scores"], source)
        out[list(BRIXIA_REGIONS)] = regions
        out["brixia_global"] = regions.sum(axis=1)
        out["label_dim"] = table["label_dim"]
        out["dataset"] = "brixia"
    out["center"] = ids.map(_official_centers(folder))
    unplaced = out.loc[out["center"].isna(), "image_id"]
    if len(unplaced):
        log.warning("%s: %d id(s) in no fold file, center unknown: %s", source, len(unplaced), _show(unplaced))
    return out


def restrict(split: Split, records: pd.DataFrame) -> Split:
    """``split`` limited to the ids in ``records``; the others are logged, added to ``dropped`` and kept by part
    in ``missing``."""
    _require(records, ["image_id"])
    known = list(set(records["image_id"].astype(str)))
    kept = {part: ids[np.isin(ids, known)] for part, ids in split.parts().items()}
    missing = {part: ids[~np.isin(ids, known)].tolist() for part, ids in split.parts().items()}
    absent = [i for ids in missing.values() for i in ids]
    if absent:
        log.warning("%s fold %d: %d split id(s) not in the records left out: %s",
                    split.protocol, split.fold, len(absent), _show(absent))
    dropped = pd.concat([split.dropped, pd.DataFrame({"image_id": absent, "reason": "not in the records"})])
    return replace(split, **kept, dropped=dropped.reset_index(drop=True), missing=missing)


def merge_duplicate_patients(records: pd.DataFrame, column: str, group: str = "patient_id") -> pd.DataFrame:
    """``records`` with every patient sharing an equal ``column`` value (a file hash) with another patient, directly
    or through a chain, given the ``group`` of the first such patient in table order (a copy; for splitting only).

    Rows without a ``column`` value, or a table without that column, are left as they are.
    """
    if column not in records.columns:
        return records
    patients = records[group].astype(str)
    order = {p: i for i, p in enumerate(dict.fromkeys(patients))}
    parent = {p: p for p in order}

    def root(patient: str) -> str:
        while parent[patient] != patient:
            patient = parent[patient]
        return patient

    shared = records[column].notna() & records[column].duplicated(keep=False)
    for _, members in patients[shared].groupby(records.loc[shared, column], sort=False):
        roots = sorted({root(p) for p in members}, key=order.__getitem__)
        for other in roots[1:]:
            parent[other] = roots[0]
    return records.assign(**{group: patients.map(root)})


def keep_groups_apart(split: Split, records: pd.DataFrame, group: str = "patient_id") -> Split:
    """``split`` with each ``group`` in one part only: images outside the group's most held-out part (test, then
    val, then train) are moved to ``dropped`` (logged). For fixed splits whose groups are merged duplicates."""
    _require(records, ["image_id", group])
    group_of = dict(zip(records["image_id"].astype(str), records[group].astype(str), strict=True))
    home: dict[str, str] = {}
    for part, ids in reversed(split.parts().items()):
        for image_id in ids:
            home.setdefault(group_of.get(image_id, image_id), part)
    kept, moved = {}, []
    for part, ids in split.parts().items():
        stays = np.array([home[group_of.get(i, i)] == part for i in ids], dtype=bool)
        kept[part] = ids[stays]
        moved += [(i, f"byte-identical to an image in {home[group_of.get(i, i)]}") for i in ids[~stays]]
    if not moved:
        return split
    log.warning("%s fold %d: %d image(s) byte-identical to an image in another part left out: %s",
                split.protocol, split.fold, len(moved), _show([i for i, _ in moved]))
    dropped = pd.concat([split.dropped, pd.DataFrame(moved, columns=DROPPED_COLUMNS)])
    return replace(split, **kept, dropped=dropped.reset_index(drop=True))


def carve_calibration(split: Split, records: pd.DataFrame, fraction: float, seed: int = 0, label: str = "prognosis",
                      group: str = "patient_id") -> Split:
    """``split`` with ``fraction`` of its val patients moved to ``calib`` (``split`` itself for 0).

    ``ceil(fraction × n)`` of the n val patients move, at least one and never all (a val part with fewer than two
    patients is left whole, logged); they are drawn with ``seed``, stratified by ``label`` of each patient's first
    image when every class has two patients, and every image of a ``group`` moves with it (so ``records`` with
    merged duplicates keep byte-identical images together). Val ids absent from ``records`` stay in val.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"carve_calibration: fraction must be >= 0 and < 1, got {fraction}")
    if fraction == 0.0:
        return split
    _require(records, ["image_id", group, label])
    ids = records["image_id"].astype(str)
    patients = _patients(records[ids.isin(split.val)], group, [label])
    if len(patients) < 2:
        log.warning("%s fold %d: %d validation patient(s), too few to carve a calibration part out of; none carved",
                    split.protocol, split.fold, len(patients))
        return split
    size = min(max(math.ceil(fraction * len(patients)), 1), len(patients) - 1)
    patients = patients.assign(**{label: patients[label].astype(str)})  # unlabelled patients are a class of their own
    _, moved = _two_ways(patients, group, label, size, seed, "calibration part")
    patient_of = dict(zip(ids, records[group].astype(str)))
    to_calib = np.array([patient_of.get(i, i) in moved for i in split.val], dtype=bool)
    return replace(split, val=split.val[~to_calib], calib=split.val[to_calib])


def split_sizes(splits: Sequence[Split]) -> pd.DataFrame:
    """Table of part sizes per fold (``fold``, ``train``, ``val``, ``test``, ``dropped``; ``calib`` when carved)."""
    return pd.DataFrame([{"fold": s.fold, **{p: len(ids) for p, ids in s.parts().items()}, "dropped": len(s.dropped)}
                         for s in splits])

