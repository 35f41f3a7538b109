"""Evaluation protocols: which fold of which dataset a run trains, validates and tests on.

A protocol is one registered object (``PROTOCOLS``): ``cv5`` (stratified patient-level k-fold, ``protocol.cv_folds``
folds with the paper's rotation), ``loco`` (leave one center out, in ``protocol.loco_centers`` order), and the
paper's split files ``official-cv5``, ``official-cv10`` and ``official-loco`` (``protocol.official_splits_dir``).

``protocol.dataset`` (default ``aiforcovid``) is the dataset the protocol is defined on. Every other dataset of a
run *follows* (``follow``): under a CV protocol it uses the same fold of its own CV protocol (its own stratified
k-fold, or its official 5-fold files), under LOCO fold ``protocol.paired_cv_fold`` of that CV protocol.
``run_fold`` applies that rule once for a whole run: a run whose datasets do not include ``protocol.dataset``
(STL severity) is a run of the follower's (protocol, fold), which the grid settles when it expands.

Whatever the protocol, ``dataset_split`` then moves ``protocol.calibration_fraction`` of the fold's validation
patients into the ``calib`` part (``splits.carve_calibration``, stratified by the dataset's label as the split is).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from mdmt.cache.image_cache import CONTENT_HASH, ImageCache
from mdmt.config import Config
from mdmt.data import splits as split_lib
from mdmt.data.datasets import Dataset, select
from mdmt.data.splits import Split
from mdmt.errors import ConfigError
from mdmt.registry import NoParams, Registry

STRATUM = "_stratum"


def split_groups(records: pd.DataFrame) -> pd.DataFrame:
    """``records`` as the splits see them: patients sharing a byte-identical image merged into one patient."""
    return split_lib.merge_duplicate_patients(records, CONTENT_HASH)


def loco_centers(config: Config, records: pd.DataFrame) -> list[str]:
    """LOCO fold order: the configured centers present in ``records``, then any other center, sorted."""
    present = set(records["center"].astype(str))
    listed = [c for c in config.protocol.loco_centers if c in present]
    return listed + sorted(present - set(listed))


def _stratified(dataset: Dataset, records: pd.DataFrame) -> pd.DataFrame:
    return records.assign(**{STRATUM: dataset.stratify(records)})


@dataclass(frozen=True)
class Protocol:
    """How the folds of a protocol are made, and which protocol the datasets that follow it use."""

    name: str
    follower: str
    """The protocol of the datasets that follow this one (a CV protocol follows itself)."""

    def follow(self, fold: int, config: Config) -> tuple[str, int]:
        """The (protocol, fold) a following dataset uses in fold ``fold`` of this protocol."""
        return self.follower, fold if self.follower == self.name else config.protocol.paired_cv_fold

    def folds(self, config: Config, centers: list[str] | None = None) -> list[int]:
        """The fold indices (``centers``: LOCO's centers in the data, when known)."""
        raise NotImplementedError

    def splits(self, dataset: Dataset, records: pd.DataFrame, config: Config, seed: int) -> list[Split]:
        """Every fold of ``dataset`` under this protocol. Byte-identical images never fall on two sides."""
        raise NotImplementedError


class KFold(Protocol):
    """Stratified patient-level k-fold with the paper's rotation (validation = the previous fold's test)."""

    def folds(self, config: Config, centers: list[str] | None = None) -> list[int]:
        """``protocol.cv_folds`` folds."""
        return list(range(config.protocol.cv_folds))

    def splits(self, dataset: Dataset, records: pd.DataFrame, config: Config, seed: int) -> list[Split]:
        """k folds of ``split_groups(records)`` stratified by the dataset's label."""
        return split_lib.kfold_splits(_stratified(dataset, split_groups(records)), k=config.protocol.cv_folds,
                                      seed=seed, label=STRATUM)


class LeaveOneCenterOut(Protocol):
    """One fold per center: its patients are the test set, a stratified fraction of the rest validates."""

    def folds(self, config: Config, centers: list[str] | None = None) -> list[int]:
        """One fold per center of the data, or of ``protocol.loco_centers`` without data."""
        return list(range(len(centers if centers is not None else config.protocol.loco_centers)))

    def splits(self, dataset: Dataset, records: pd.DataFrame, config: Config, seed: int) -> list[Split]:
        """A fold per center in ``loco_centers`` order (a dataset without centers is an error)."""
        if not dataset.supports_loco:
            raise ConfigError(f"dataset {dataset.id!r} has no centers for leave-one-center-out")
        grouped = split_groups(records)
        return split_lib.loco_splits(_stratified(dataset, grouped), centers=loco_centers(config, grouped),
                                     val_fraction=config.protocol.loco_val_fraction, seed=seed, label=STRATUM)


@dataclass(frozen=True)
class OfficialSplits(Protocol):
    """The paper's split files ``<official_splits_dir>/<AFC|BX>/<folder>/<fold>/{train,val,test}.txt``."""

    folder: str = "5"

    def _directory(self, config: Config) -> Path:
        if not config.protocol.official_splits_dir:
            raise ConfigError(f"protocol.official_splits_dir must be set for the {self.name} protocol")
        return Path(config.protocol.official_splits_dir)

    def _read(self, config: Config, kind: str) -> list[Split]:
        return split_lib.official_splits(self._directory(config), self.folder, kind, self.name)

    def folds(self, config: Config, centers: list[str] | None = None) -> list[int]:
        """As many folds as the files of ``protocol.dataset`` (AIforCOVID's without data) have."""
        kind = "AFC"
        if config.protocol.dataset in config.data.datasets:
            kind = select(config, [config.protocol.dataset])[config.protocol.dataset].official_kind or kind
        return list(range(len(self._read(config, kind))))

    def splits(self, dataset: Dataset, records: pd.DataFrame, config: Config, seed: int) -> list[Split]:
        """The files' folds limited to the ids of ``records`` (the others in ``Split.missing``), a copy the files
        put on another side than its twin left out (``Split.dropped``); a dataset without split files gets
        k-fold."""
        if dataset.official_kind is None:
            return PROTOCOLS.build("cv5", name="cv5").splits(dataset, records, config, seed)
        grouped = split_groups(records)
        folds = [split_lib.restrict(split, records) for split in self._read(config, dataset.official_kind)]
        for split in folds:
            split.check(records)  # a patient the files put in two parts is an error, not a duplicate to drop
        return [split_lib.keep_groups_apart(split, grouped) for split in folds]


PROTOCOLS: Registry[Protocol] = Registry("protocol")
"""Protocol plug-ins: ``factory(params, name=...) -> Protocol``."""

_BUILTIN: dict[str, tuple[Protocol, str]] = {
    "cv5": (KFold("cv5", "cv5"), "stratified patient-level k-fold (protocol.cv_folds), the paper's rotation"),
    "loco": (LeaveOneCenterOut("loco", "cv5"), "leave one center out; other datasets follow cv5"),
    "official-cv5": (OfficialSplits("official-cv5", "official-cv5", "5"), "the paper's 5-fold split files"),
    "official-cv10": (OfficialSplits("official-cv10", "official-cv10", "10"), "the paper's 10-fold split files"),
    "official-loco": (OfficialSplits("official-loco", "official-cv5", "loCo"),
                      "the paper's leave-one-center-out split files; other datasets follow official-cv5"),
}
for _name, (_protocol, _summary) in _BUILTIN.items():
    PROTOCOLS.add(_name, lambda params, name, protocol=_protocol: protocol, NoParams, _summary)


def get_protocol(name: str) -> Protocol:
    """The registered protocol ``name``."""
    return PROTOCOLS.build(name, name=name)


def run_fold(protocol: str, fold: int, datasets: Iterable[str], config: Config) -> tuple[str, int]:
    """The (protocol, fold) of a run on ``datasets`` asked for in fold ``fold`` of ``protocol``: the same when they
    include ``protocol.dataset``, else the fold they follow."""
    chosen = get_protocol(protocol)
    return (protocol, fold) if config.protocol.dataset in datasets else chosen.follow(fold, config)


# --------------------------------------------------------------------------------------------- one run's splits
def _pick(folds: list[Split], fold: int, what: str) -> Split:
    if not 0 <= fold < len(folds):
        raise ConfigError(f"{what}: fold {fold} does not exist (folds 0..{len(folds) - 1})")
    return folds[fold]


SPLIT_MEMO_SIZE = 256
"""Splits ``dataset_split`` keeps per process (a grid process's runs share their folds: 44 in the demo)."""
_split_memo: dict[tuple[object, ...], tuple[pd.DataFrame, Split]] = {}


def dataset_split(dataset: Dataset, records: pd.DataFrame, protocol: str, fold: int, config: Config, seed: int
                  ) -> Split:
    """The split of ``dataset`` in run (protocol, fold) (``run_fold`` for that dataset) with its ``calib`` part
    carved out of val (``protocol.calibration_fraction``, ``seed``), checked at patient level (duplicate images
    merged).

    A k-fold or LOCO split depends on ``records`` alone, so it is kept for the next run of this process that asks
    with the same records object, dataset, protocol section and seed (the key holds the frame, so its ``id`` is not
    reused meanwhile); official splits are read from their files every time. Kept because it pays: rerunning the
    finished 98-run demo grid (every run found done) took 0.60× the wall time with it (6.6 s against 11.1 s, median
    of 7 alternating pairs, 0.55–0.63, 2 idle cores, at 3befcea).
    """
    protocol, fold = run_fold(protocol, fold, [dataset.id], config)
    key = (id(records), dataset.id, repr(config.data.datasets.get(dataset.id)), repr(config.protocol), protocol,
           fold, seed)
    kept = _split_memo.get(key)
    if kept is not None and kept[0] is records:
        return kept[1]
    split = _pick(get_protocol(protocol).splits(dataset, records, config, seed), fold, f"{dataset.id} {protocol}")
    grouped = split_groups(records)
    if config.protocol.calibration_fraction > 0:  # at 0 the dataset's labels are not even read: today's splits
        split = split_lib.carve_calibration(split, _stratified(dataset, grouped),
                                            config.protocol.calibration_fraction, seed, label=STRATUM)
    split.check(grouped)
    if not protocol.startswith("official-"):
        if len(_split_memo) >= SPLIT_MEMO_SIZE:
            _split_memo.pop(next(iter(_split_memo)))
        _split_memo[key] = (records, split)
    return split


def build_splits(config: Config, datasets: dict[str, Dataset], caches: dict[str, ImageCache], protocol: str,
                 fold: int, seed: int) -> dict[str, Split]:
    """The split of every dataset of a run."""
    return {i: dataset_split(d, caches[i].records, protocol, fold, config, seed) for i, d in datasets.items()}


def split_ids(splits: dict[str, Split]) -> dict[str, dict[str, list[str]]]:
    """dataset → part → sorted ids (what a run's inputs fingerprint records)."""
    return {name: {part: sorted(map(str, ids)) for part, ids in split.parts().items()}
            for name, split in splits.items()}


def empty_parts(splits: dict[str, Split]) -> list[str]:
    """``dataset/part`` of every empty part (a run cannot train, select or test on nothing)."""
    return [f"{name}/{part}" for name, split in splits.items() for part, ids in split.parts().items() if len(ids) == 0]
