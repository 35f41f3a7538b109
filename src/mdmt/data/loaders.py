"""The loaders of one run: its split's rows in each cache, the mixed training loader, validation, calibration and
test loaders.

Training mixes the run's datasets per ``train.mix``; a dataset the strategy permutes has its label columns
permuted among its training images (the control), while validation, calibration and test keep the true labels.
Model selection sees the validation part only; the ``calib`` part (when a split has one) is only predicted. Split
ids the cache does not hold (unreadable or dropped images) are left out and named.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from rich.console import Console
from torch.utils.data import DataLoader

from mdmt.cache.image_cache import ImageCache
from mdmt.config import Config
from mdmt.data.batches import (
    CachedImageDataset,
    MixedBatchSampler,
    MultiSourceDataset,
    make_loader,
)
from mdmt.data.splits import CALIB, Split
from mdmt.errors import DataError
from mdmt.tasks import Task

console = Console(stderr=True)


def rows_of(records: pd.DataFrame, ids: Any, what: str) -> np.ndarray:
    """Row numbers of ``ids`` in ``records``, sorted; ids missing from the cache are reported by id."""
    index = pd.Index(records["image_id"].astype(str))
    wanted = pd.Index(pd.Series(ids, dtype=str))
    positions = index.get_indexer(wanted)
    missing = wanted[positions < 0]
    if len(missing):
        console.print(f"{what}: {len(missing)} split id(s) not in the image cache (unreadable or dropped), "
                      f"left out: {', '.join(missing[:20])}{' …' if len(missing) > 20 else ''}", style="yellow",
                      markup=False, highlight=False, soft_wrap=True)
    return np.sort(positions[positions >= 0])


def split_rows(caches: Mapping[str, ImageCache], splits: Mapping[str, Split], part: str) -> dict[str, np.ndarray]:
    """Each dataset's cache rows of one split part; DataError when a part is empty."""
    out = {name: rows_of(cache.records, getattr(splits[name], part), f"{name} {part}")
           for name, cache in caches.items()}
    empty = [name for name, rows in out.items() if len(rows) == 0]
    if empty:
        raise DataError(f"the {part} part of this fold is empty for dataset(s) {', '.join(empty)}")
    return out


def permute_labels(records: pd.DataFrame, rows: np.ndarray, columns: tuple[str, ...], seed: int) -> pd.DataFrame:
    """A copy of ``records`` whose ``columns`` are permuted together across ``rows`` (drawn with ``seed``).

    Each image of ``rows`` gets the whole label set of another image of ``rows``; other rows keep theirs.
    """
    rows = np.asarray(rows)
    present = [c for c in columns if c in records.columns]
    out = records.copy()
    order = np.random.default_rng(seed).permutation(len(rows))
    out.loc[out.index[rows], present] = records.iloc[rows[order]][present].to_numpy()
    return out


@dataclass
class RunData:
    """The loaders of one run: training (mixed), validation (all datasets, for model selection), and per dataset its
    training, validation and test images in cache-row order, true labels (``parts['train']``, ``parts['val']``,
    ``parts['test']``), and its calibration images for the datasets whose split has them (``parts['calib']``, only
    when one has)."""

    train: DataLoader
    val: DataLoader
    parts: dict[str, dict[str, DataLoader]]


def build_data(
    config: Config, caches: Mapping[str, ImageCache], splits: Mapping[str, Split], tasks: list[Task], seed: int,
    permute: Mapping[str, Iterable[str]] | None = None, clinical: Mapping[str, np.ndarray] | None = None,
    shard: Callable[[Any], Any] | None = None,
) -> RunData:
    """Training loader (the datasets of ``caches`` mixed in their order per ``train.mix``), validation, calibration
    (where carved) and test loaders.

    ``permute`` (dataset → its label columns) permutes those labels among that dataset's training images;
    ``clinical`` (dataset → encoded features of every cache row) adds ``clinical`` to the items; ``shard`` wraps the
    training batch sampler (this rank's shard under data parallelism).
    """
    features = clinical or {}
    train_rows = split_rows(caches, splits, "train")
    train_caches = dict(caches)
    for name, columns in (permute or {}).items():
        records = permute_labels(caches[name].records, train_rows[name], tuple(columns), seed)
        train_caches[name] = dataclasses.replace(caches[name], records=records)
    train_sets = [CachedImageDataset(train_caches[name], train_rows[name], tasks, clinical=features.get(name))
                  for name in caches]
    sampler = MixedBatchSampler([len(d) for d in train_sets], config.train.batch_size, config.train.mix,
                                config.train.mix_ratio, seed)
    if shard is not None:
        sampler = shard(sampler)
    train = make_loader(MultiSourceDataset(train_sets), config.train, seed=seed, batch_sampler=sampler,
                        runtime=config.runtime)
    val_rows = split_rows(caches, splits, "val")
    val = make_loader(MultiSourceDataset([CachedImageDataset(caches[n], val_rows[n], tasks, clinical=features.get(n))
                                          for n in caches]), config.train, runtime=config.runtime)
    rows_of_part = {"train": train_rows, "val": val_rows, "test": split_rows(caches, splits, "test")}
    carved = {name: cache for name, cache in caches.items() if CALIB in splits[name].parts()}
    if carved:
        rows_of_part[CALIB] = split_rows(carved, splits, CALIB)
    parts = {part: {name: make_loader(CachedImageDataset(caches[name], rows, tasks, clinical=features.get(name)),
                                      config.train, runtime=config.runtime)
                    for name, rows in part_rows.items()}
             for part, part_rows in rows_of_part.items()}
    return RunData(train, val, parts)
