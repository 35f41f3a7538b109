"""Torch datasets over the image cache, their concatenation across datasets, and the batch sampler that mixes them.

Items are dicts: ``image`` uint8 ``(1, S, S)``, ``targets`` {task: float32 ``(target_dim,)``}, ``present``
{task: bool}, ``source`` (index of the dataset in the mix) and ``row`` (row of the image in its cache).
Targets are encoded once per dataset; ``__getitem__`` only indexes, so workers do no label work and the
images stay uint8 until the batch reaches the training device. A segmentation task's targets are pixels: gathered
per batch from the cache's masks (``ImageCache.masks``), area-downsampled to the task's grid and flattened
(``mask_targets``); its indicator is still encoded once.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from mdmt.config import RuntimeConfig, TrainConfig
from mdmt.errors import ConfigError, DataError
from mdmt.tasks import Task

Item = dict[str, Any]
MixMode = Literal["natural", "ratio"]


class ImageSource(Protocol):
    """What a dataset needs from a cache: ``images[i]`` is the image of ``records.iloc[i]``."""

    images: np.ndarray
    records: pd.DataFrame


@dataclass(frozen=True)
class ImageArrays:
    """An in-memory ``ImageSource`` (an ``ImageCache`` without files): uint8 ``(N, S, S)`` and its records."""

    images: np.ndarray
    records: pd.DataFrame


def mask_targets(masks: np.ndarray | None, rows: np.ndarray, size: int) -> torch.Tensor:
    """The cached masks of ``rows`` (0/1 uint8 ``(N, S, S)``) as float targets ``(len(rows), size²)``: the share of
    each ``size`` × ``size`` cell inside the mask (area downsampling), row-major; zeros when ``masks`` is None."""
    if masks is None:
        return torch.zeros(len(rows), size * size)
    pixels = torch.from_numpy(np.asarray(masks[rows], dtype=np.float32)).unsqueeze(1)
    return F.adaptive_avg_pool2d(pixels, size).flatten(1)


class CachedImageDataset(Dataset):
    """The images ``rows`` of a cache with every task's targets, encoded once with ``task.encode``.

    ``cache`` is anything with ``.images`` (``(N, S, S)`` uint8, usually a memmap) and ``.records``
    (row i = image i): an ``ImageCache`` or an ``ImageArrays``. The dataset keeps the cache object, not
    its array, so pickling it for DataLoader workers re-opens an ``ImageCache`` instead of copying images;
    it keeps task names and target widths, not the ``Task`` objects (their encoders are not picklable).
    A segmentation task's targets (``mask_sizes``: its grid side) are read from ``cache.masks`` per batch.
    """

    def __init__(self, cache: ImageSource, rows: Sequence[int] | np.ndarray, tasks: Sequence[Task], source: int = 0,
                 clinical: np.ndarray | None = None):
        images, records = cache.images, cache.records
        if images.ndim != 3 or images.dtype != np.uint8 or len(images) != len(records):
            raise DataError(f"image cache: expected uint8 images (N, S, S) with N = {len(records)} records, "
                            f"got {images.dtype} {tuple(images.shape)}")
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        outside = self.rows[(self.rows < 0) | (self.rows >= len(records))]
        if len(outside):
            raise DataError(f"image cache has {len(records)} rows; rows out of range: {outside[:10].tolist()}")
        self.cache = cache
        self.source = int(source)
        self.target_dims = {task.name: task.target_dim for task in tasks}
        self.mask_sizes = {task.name: task.size for task in tasks if task.pixel_targets}
        subset = records.iloc[self.rows].reset_index(drop=True)
        self.targets: dict[str, torch.Tensor] = {}
        self.present: dict[str, torch.Tensor] = {}
        for task in tasks:
            targets, present = task.encode(subset)
            if not task.pixel_targets:
                self.targets[task.name] = torch.from_numpy(targets)
            elif present.any() and getattr(cache, "masks", None) is None:
                raise DataError(f"task {task.name!r}: the image cache has no masks (build it with masks=True)")
            self.present[task.name] = torch.from_numpy(present)
        self.clinical = None if clinical is None else torch.from_numpy(np.asarray(clinical, np.float32)[self.rows])
        """Encoded clinical features of the rows (``mdmt.clinical_encoder``); items carry them as ``clinical``."""

    @classmethod
    def from_cache(cls, cache: ImageSource, ids: Sequence[str], tasks: Sequence[Task], source: int = 0) -> CachedImageDataset:
        """The images with these ``image_id`` values; DataError naming the ids the cache does not hold."""
        index = pd.Index(cache.records["image_id"].astype(str))
        wanted = pd.Index([str(i) for i in ids])
        rows = index.get_indexer(wanted)
        unknown = wanted[rows < 0]
        if len(unknown):
            raise DataError(f"{len(unknown)} id(s) not in the image cache: {', '.join(unknown[:10])}"
                            f"{' …' if len(unknown) > 10 else ''}")
        return cls(cache, rows, tasks, source)

    @property
    def image_size(self) -> int:
        """Side ``S`` of the cached images."""
        return int(self.cache.images.shape[-1])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> Item:
        row = int(self.rows[index])
        item = {
            "image": torch.from_numpy(np.array(self.cache.images[row], copy=True)).unsqueeze(0),
            "targets": {name: values[index] for name, values in self.targets.items()}
            | {name: targets[0] for name, targets in self._mask_targets(np.array([row])).items()},
            "present": {name: values[index] for name, values in self.present.items()},
            "source": self.source,
            "row": row,
        }
        if self.clinical is not None:
            item["clinical"] = self.clinical[index]
        return item

    def __getitems__(self, indices: Sequence[int]) -> Item:
        """The items at ``indices`` already collated (what ``default_collate`` makes of them), from one fancy index
        into the cache instead of one read and one dict per item; the DataLoader calls it for whole batches."""
        index = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        rows = self.rows[index.numpy()]
        batch = {
            "image": torch.from_numpy(np.asarray(self.cache.images[rows])).unsqueeze(1),
            "targets": {name: values[index] for name, values in self.targets.items()} | self._mask_targets(rows),
            "present": {name: values[index] for name, values in self.present.items()},
            "source": torch.full((len(rows),), self.source, dtype=torch.int64),
            "row": torch.from_numpy(rows),
        }
        if self.clinical is not None:
            batch["clinical"] = self.clinical[index]
        return batch

    def _mask_targets(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        """Each segmentation task's targets for cache ``rows``."""
        return {name: mask_targets(getattr(self.cache, "masks", None), rows, size)
                for name, size in self.mask_sizes.items()}


class MultiSourceDataset(Dataset):
    """Datasets one after the other (index = offset of the dataset + index within it).

    Every item carries the union of the datasets' tasks (a task a dataset lacks: target zeros, present
    False), so batches that mix datasets collate, and ``source`` = the dataset's position in the list.
    """

    def __init__(self, datasets: Sequence[CachedImageDataset]):
        if not datasets:
            raise ConfigError("MultiSourceDataset needs at least one dataset")
        self.datasets = list(datasets)
        self.target_dims: dict[str, int] = {}
        for dataset in self.datasets:
            for name, dim in dataset.target_dims.items():
                if self.target_dims.setdefault(name, dim) != dim:
                    raise ConfigError(f"task {name!r} has target_dim {self.target_dims[name]} in one dataset "
                                      f"and {dim} in another")
        self.offsets = np.cumsum([0] + [len(d) for d in self.datasets])
        # whole batches are gathered from these: per item its source, its cache row, every task's target and flag
        self.sources = np.repeat(np.arange(len(self.datasets), dtype=np.int64), [len(d) for d in self.datasets])
        self.rows = np.concatenate([d.rows for d in self.datasets])
        self.mask_sizes = {name: size for d in self.datasets for name, size in d.mask_sizes.items()}
        self.targets = {name: torch.cat([d.targets.get(name, torch.zeros(len(d), dim, dtype=torch.float32))
                                         for d in self.datasets]) for name, dim in self.target_dims.items()
                        if name not in self.mask_sizes}
        self.present = {name: torch.cat([d.present.get(name, torch.zeros(len(d), dtype=torch.bool))
                                         for d in self.datasets]) for name in self.target_dims}
        with_clinical = [d.clinical is not None for d in self.datasets]
        if any(with_clinical) and not all(with_clinical):
            raise ConfigError("MultiSourceDataset: clinical features for some of the datasets only (give the others "
                              "zeros, as mdmt.train.run does)")
        self.clinical = torch.cat([d.clinical for d in self.datasets]) if all(with_clinical) else None

    @property
    def source_sizes(self) -> list[int]:
        """Number of items of each dataset, in order (what ``MixedBatchSampler`` takes)."""
        return np.diff(self.offsets).tolist()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> Item:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} items")
        source = int(np.searchsorted(self.offsets, index, side="right")) - 1
        item = self.datasets[source][index - int(self.offsets[source])]
        for name, dim in self.target_dims.items():
            if name not in item["targets"]:
                item["targets"][name] = torch.zeros(dim, dtype=torch.float32)
                item["present"][name] = torch.tensor(False)
        item["source"] = source
        return item

    def __getitems__(self, indices: Sequence[int]) -> Item:
        """The items at ``indices`` already collated, in the order asked (a task a source lacks: zero targets, present
        False): one fancy index into each source's cache, one gather per target, flag and clinical table."""
        index = np.asarray(indices, dtype=np.int64)
        if len(index) and not (0 <= index.min() and index.max() < len(self)):
            raise IndexError(f"indices out of range for {len(self)} items")
        sources, rows = self.sources[index], self.rows[index]
        first = self.datasets[0].cache.images
        images = np.empty((len(index), *first.shape[1:]), dtype=first.dtype)
        masks = {name: torch.zeros(len(index), size * size) for name, size in self.mask_sizes.items()}
        for source in np.unique(sources):
            where = sources == source
            images[where] = self.datasets[source].cache.images[rows[where]]
            for name, targets in self.datasets[source]._mask_targets(rows[where]).items():
                masks[name][torch.from_numpy(where)] = targets
        at = torch.from_numpy(index)
        batch = {
            "image": torch.from_numpy(images).unsqueeze(1),
            "targets": {name: values[at] for name, values in self.targets.items()} | masks,
            "present": {name: values[at] for name, values in self.present.items()},
            "source": torch.from_numpy(sources),
            "row": torch.from_numpy(rows),
        }
        if self.clinical is not None:
            batch["clinical"] = self.clinical[at]
        return batch


def already_collated(batch: Item) -> Item:
    """The DataLoader's ``collate_fn`` for datasets whose ``__getitems__`` returns a collated batch."""
    return batch


def batch_counts(batch_size: int, ratios: Sequence[float]) -> list[int]:
    """Samples of each source per batch: differences of ``round(B · cumulative ratio)`` (they sum to B)."""
    cumulative = np.round(np.cumsum(ratios) * batch_size).astype(int)
    return np.diff(np.concatenate([[0], cumulative])).tolist()


class MixedBatchSampler:
    """Batches of indices into a ``MultiSourceDataset``, reshuffled each epoch from ``(seed, epoch)``.

    - ``natural`` (the paper): one shuffle of the union; batches hold the sources in their natural
      proportion; an epoch is one pass over every sample.
    - ``ratio``: every batch holds ``round(ratio · B)`` samples of source 0 and the rest of source 1
      (``ratio`` may be a list with one share per source, summing to 1). An epoch is as many batches as
      the source that needs the most takes to be passed once; the other sources are cycled, each cycle a
      fresh permutation, so within an epoch every sample is seen and the smaller sources more than once.
      With ``drop_last`` the epoch stops before the longest source's pass would need a partial batch
      (``floor`` instead of ``ceil``); otherwise its last batch tops up from that source's next permutation.

    The order depends only on ``(seed, epoch)``: call ``set_epoch`` before each epoch (the engine does),
    so a resumed run and any number of workers see the same batches.
    """

    def __init__(
        self,
        source_sizes: Sequence[int],
        batch_size: int,
        mode: MixMode = "natural",
        ratio: float | Sequence[float] = 0.5,
        seed: int = 0,
        drop_last: bool = False,
    ):
        self.source_sizes = [int(n) for n in source_sizes]
        if batch_size < 1 or not self.source_sizes or min(self.source_sizes) < 0 or sum(self.source_sizes) == 0:
            raise ConfigError(f"MixedBatchSampler: need batch_size >= 1 and samples, got batch_size={batch_size}, "
                              f"sizes={self.source_sizes}")
        if mode not in ("natural", "ratio"):
            raise ConfigError(f"MixedBatchSampler: mode must be 'natural' or 'ratio', not {mode!r}")
        self.batch_size = int(batch_size)
        self.mode = mode
        self.seed = int(seed)
        self.drop_last = drop_last
        self.epoch = 0
        self.offsets = np.cumsum([0] + self.source_sizes)
        self.counts: list[int] = []
        if mode == "ratio":
            self.counts = batch_counts(self.batch_size, self._ratios(ratio))
            empty = [i for i, (c, n) in enumerate(zip(self.counts, self.source_sizes)) if c > 0 and n == 0]
            if empty:
                raise ConfigError(f"MixedBatchSampler: source(s) {empty} have a share of each batch but no samples")

    def _ratios(self, ratio: float | Sequence[float]) -> list[float]:
        n = len(self.source_sizes)
        ratios = [float(ratio), 1.0 - float(ratio)] if isinstance(ratio, (int, float)) else [float(r) for r in ratio]
        if len(ratios) != n or min(ratios) < 0 or not np.isclose(sum(ratios), 1.0):
            raise ConfigError(f"MixedBatchSampler: ratio {ratio!r} must give {n} non-negative shares summing to 1 "
                              f"(a single number is the share of source 0 of two)")
        return ratios

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.mode == "natural":
            total = sum(self.source_sizes)
            return total // self.batch_size if self.drop_last else -(-total // self.batch_size)
        passes = [n / c for n, c in zip(self.source_sizes, self.counts) if c > 0]
        return int(np.floor(max(passes))) if self.drop_last else int(np.ceil(max(passes)))

    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def __iter__(self) -> Iterator[list[int]]:
        rng = self._rng()
        if self.mode == "natural":
            order = rng.permutation(int(self.offsets[-1]))
            for batch in np.array_split(order, np.arange(self.batch_size, len(order), self.batch_size)):
                if len(batch) == self.batch_size or not self.drop_last:
                    yield batch.tolist()
            return
        n_batches = len(self)
        streams = []
        for source, count in enumerate(self.counts):
            needed = n_batches * count
            cycles = -(-needed // self.source_sizes[source]) if count else 0
            stream = [rng.permutation(self.source_sizes[source]) for _ in range(cycles)]
            streams.append(int(self.offsets[source]) + np.concatenate(stream)[:needed] if stream else np.zeros(0, int))
        for b in range(n_batches):
            batch = np.concatenate([s[b * c:(b + 1) * c] for s, c in zip(streams, self.counts)])
            yield rng.permutation(batch).tolist()


def seed_worker(worker_id: int) -> None:
    """Seed ``random`` and numpy in a DataLoader worker from its torch seed (set from the loader's generator)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def make_loader(
    dataset: Dataset,
    train: TrainConfig,
    shuffle: bool = False,
    seed: int = 0,
    batch_sampler: MixedBatchSampler | Any | None = None,
    runtime: RuntimeConfig | None = None,
) -> DataLoader:
    """A DataLoader with ``train.batch_size`` and ``runtime.loader_workers`` (default ``RuntimeConfig()``), a seeded
    generator and seeded workers.

    ``shuffle`` uses a one-source ``MixedBatchSampler`` (order from ``(seed, epoch)``, so it resumes);
    a given ``batch_sampler`` overrides both. Memory is pinned when training on CUDA.
    """
    runtime = runtime or RuntimeConfig()
    if batch_sampler is None and shuffle:
        batch_sampler = MixedBatchSampler([len(dataset)], train.batch_size, "natural", seed=seed)
    workers = int(runtime.loader_workers)
    common: dict[str, Any] = {
        "num_workers": workers,
        "worker_init_fn": seed_worker,
        "generator": torch.Generator().manual_seed(seed),
        "pin_memory": runtime.device != "cpu" and torch.cuda.is_available(),
        "persistent_workers": workers > 0,
    }
    if hasattr(dataset, "__getitems__"):
        common["collate_fn"] = already_collated
    if batch_sampler is not None:
        return DataLoader(dataset, batch_sampler=batch_sampler, **common)
    return DataLoader(dataset, batch_size=train.batch_size, shuffle=False, **common)
