"""Datasets over an in-memory image array, their mix across sources, the batch sampler and the loader."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from mdmt.config import RuntimeConfig, TrainConfig
from mdmt.data.batches import (
    CachedImageDataset,
    ImageArrays,
    MixedBatchSampler,
    MultiSourceDataset,
    batch_counts,
    make_loader,
)
from mdmt.errors import ConfigError, DataError
from mdmt.tasks import REGION_COLUMNS, get_task

SIZE = 8


def aiforcovid(n: int = 10) -> ImageArrays:
    images = (np.arange(n)[:, None, None] * 10 + np.zeros((1, SIZE, SIZE))).astype(np.uint8)
    records = pd.DataFrame({"image_id": [f"P_{i}" for i in range(n)],
                            "prognosis": [float(i % 2) if i != 3 else np.nan for i in range(n)]})
    return ImageArrays(images, records)


def brixia(n: int = 6) -> ImageArrays:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, SIZE, SIZE), dtype=np.uint8)
    scores = rng.integers(0, 4, (n, 6)).astype(float)
    records = pd.DataFrame(scores, columns=list(REGION_COLUMNS)).assign(
        image_id=[str(10**18 + i) for i in range(n)], brixia_global=scores.sum(axis=1))
    return ImageArrays(images, records)


TASKS = [get_task("prognosis"), get_task("severity_regions")]


def test_items_index_precomputed_targets():
    cache = aiforcovid()
    rows = np.array([7, 3, 0])
    dataset = CachedImageDataset(cache, rows, TASKS, source=2)
    expected, present = TASKS[0].encode(cache.records.iloc[rows])
    assert len(dataset) == 3
    for i, row in enumerate(rows):
        item = dataset[i]
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (1, SIZE, SIZE)
        assert torch.equal(item["image"][0], torch.from_numpy(cache.images[row]))
        assert item["targets"]["prognosis"].tolist() == expected[i].tolist()
        assert bool(item["present"]["prognosis"]) == present[i]
        assert not item["present"]["severity_regions"]  # AIforCOVID has no Brixia columns
        assert item["row"] == row and item["source"] == 2
    assert dataset[1]["present"]["prognosis"].item() is False  # P_3 has no label


def test_item_image_is_a_copy_of_the_cache():
    cache = aiforcovid()
    item = CachedImageDataset(cache, [1], TASKS)[0]
    item["image"].fill_(0)
    assert cache.images[1].max() == 10


def test_from_cache_maps_ids_and_names_unknown_ones():
    cache = brixia()
    dataset = CachedImageDataset.from_cache(cache, [str(10**18 + 4), str(10**18 + 1)], TASKS)
    assert dataset.rows.tolist() == [4, 1]
    targets, _ = TASKS[1].encode(cache.records.iloc[[4, 1]])
    assert torch.equal(dataset[0]["targets"]["severity_regions"], torch.from_numpy(targets[0]))
    with pytest.raises(DataError, match="P_404"):
        CachedImageDataset.from_cache(cache, ["P_404"], TASKS)
    with pytest.raises(DataError, match="out of range"):
        CachedImageDataset(cache, [6], TASKS)


def test_multisource_items_carry_every_task_and_collate():
    afc = CachedImageDataset(aiforcovid(), np.arange(10), [TASKS[0]])
    bx = CachedImageDataset(brixia(), np.arange(6), [TASKS[1]])
    mixed = MultiSourceDataset([afc, bx])
    assert len(mixed) == 16 and mixed.source_sizes == [10, 6]
    item = mixed[12]
    assert item["source"] == 1 and item["row"] == 2
    assert not item["present"]["prognosis"] and item["targets"]["prognosis"].tolist() == [0.0]
    loader = make_loader(mixed, TrainConfig(batch_size=16))
    batch = next(iter(loader))
    assert batch["image"].shape == (16, 1, SIZE, SIZE) and batch["image"].dtype == torch.uint8
    assert batch["targets"]["severity_regions"].shape == (16, 6)
    assert batch["source"].tolist() == [0] * 10 + [1] * 6
    assert batch["present"]["prognosis"].tolist() == [i != 3 for i in range(10)] + [False] * 6
    assert batch["present"]["severity_regions"].tolist() == [False] * 10 + [True] * 6


def assert_same_batch(got, expected, where="batch"):
    if isinstance(expected, dict):
        assert set(got) == set(expected), where
        for key in expected:
            assert_same_batch(got[key], expected[key], f"{where}.{key}")
    else:
        assert got.dtype == expected.dtype and got.shape == expected.shape and torch.equal(got, expected), where


def test_whole_batch_fetch_equals_collating_the_items():
    """``__getitems__`` (one fancy index per source) gives exactly what collating item by item gives, in the order
    asked, for one source, for mixed sources and with clinical features."""
    clinical = np.arange(30, dtype=np.float32).reshape(10, 3)
    afc = CachedImageDataset(aiforcovid(), np.arange(10)[::-1], [TASKS[0]], clinical=clinical)
    mixed = MultiSourceDataset([CachedImageDataset(aiforcovid(), np.arange(10), [TASKS[0]]),
                                CachedImageDataset(brixia(), np.arange(6), [TASKS[1]])])
    rng = np.random.default_rng(0)
    for dataset in (afc, mixed):
        for size in (1, 5, len(dataset)):
            indices = rng.permutation(len(dataset))[:size].tolist()
            expected = torch.utils.data.default_collate([dataset[i] for i in indices])
            assert_same_batch(dataset.__getitems__(indices), expected)
    with pytest.raises(IndexError):
        mixed.__getitems__([0, 16])


def test_dataset_pickles_for_workers():
    dataset = CachedImageDataset(aiforcovid(), [2, 5], TASKS)
    clone = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(clone[1]["image"], dataset[1]["image"]) and clone[1]["row"] == 5


# ------------------------------------------------------------------------------------------ sampler
def test_natural_mode_covers_every_index_once_per_epoch():
    sampler = MixedBatchSampler([30, 70], batch_size=16, mode="natural", seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 7 and [len(b) for b in batches] == [16] * 6 + [4]
    assert sorted(i for b in batches for i in b) == list(range(100))
    sampler.drop_last = True
    assert len(sampler) == 6 and len(list(sampler)) == 6


def test_order_depends_only_on_seed_and_epoch():
    a, b = MixedBatchSampler([50, 50], 10, seed=3), MixedBatchSampler([50, 50], 10, seed=3)
    for sampler in (a, b):
        sampler.set_epoch(2)
    assert list(a) == list(b) == list(a)  # repeatable, as after a resume
    b.set_epoch(3)
    assert list(a) != list(b)
    assert list(MixedBatchSampler([50, 50], 10, seed=4)) != list(MixedBatchSampler([50, 50], 10, seed=3))


@pytest.mark.parametrize("ratio,sizes", [(0.5, [30, 200]), (0.25, [200, 30]), ([0.5, 0.25, 0.25], [40, 100, 10])])
def test_ratio_mode_batch_composition(ratio, sizes):
    batch_size = 12
    sampler = MixedBatchSampler(sizes, batch_size, mode="ratio", ratio=ratio, seed=0)
    counts = batch_counts(batch_size, [ratio, 1 - ratio] if isinstance(ratio, float) else ratio)
    assert sum(counts) == batch_size
    offsets = np.cumsum([0] + sizes)
    batches = list(sampler)
    for batch in batches:
        sources = np.searchsorted(offsets, batch, side="right") - 1
        assert np.bincount(sources, minlength=len(sizes)).tolist() == counts
    seen = Counter(i for b in batches for i in b)
    assert set(seen) == set(range(sum(sizes)))  # every sample of every source at least once
    longest = max(range(len(sizes)), key=lambda s: sizes[s] / counts[s])
    assert len(batches) == -(-sizes[longest] // counts[longest])


def test_ratio_mode_rejects_bad_shares():
    with pytest.raises(ConfigError):
        MixedBatchSampler([10, 10], 8, mode="ratio", ratio=[0.5, 0.6])
    with pytest.raises(ConfigError):
        MixedBatchSampler([10, 0], 8, mode="ratio", ratio=0.5)
    with pytest.raises(ConfigError):
        MixedBatchSampler([10], 8, mode="mixed")


def test_loader_with_sampler_and_workers_is_deterministic():
    dataset = MultiSourceDataset([CachedImageDataset(aiforcovid(), np.arange(10), TASKS),
                                  CachedImageDataset(brixia(), np.arange(6), TASKS)])

    def epoch_rows(workers: int, epoch: int) -> list[list[int]]:
        sampler = MixedBatchSampler(dataset.source_sizes, 4, seed=5)
        loader = make_loader(dataset, TrainConfig(batch_size=4), batch_sampler=sampler,
                             runtime=RuntimeConfig(loader_workers=workers))
        sampler.set_epoch(epoch)
        return [(b["source"] * 100 + b["row"]).tolist() for b in loader]

    assert epoch_rows(0, 1) == epoch_rows(2, 1)
    assert epoch_rows(0, 1) != epoch_rows(0, 2)


def test_shuffled_loader_follows_set_epoch():
    dataset = CachedImageDataset(aiforcovid(), np.arange(10), TASKS)
    loader = make_loader(dataset, TrainConfig(batch_size=4), shuffle=True, seed=0)
    first = [b["row"].tolist() for b in loader]
    loader.batch_sampler.set_epoch(1)
    second = [b["row"].tolist() for b in loader]
    loader.batch_sampler.set_epoch(0)
    assert [b["row"].tolist() for b in loader] == first != second
    assert sorted(sum(first, [])) == list(range(10))
    unshuffled = make_loader(dataset, TrainConfig(batch_size=4))
    assert sum((b["row"].tolist() for b in unshuffled), []) == list(range(10))


def test_mixing_datasets_with_and_without_clinical_features_is_refused():
    with_features = CachedImageDataset(aiforcovid(), np.arange(4), [TASKS[0]], clinical=np.zeros((10, 2), np.float32))
    with pytest.raises(ConfigError, match="clinical features for some"):
        MultiSourceDataset([with_features, CachedImageDataset(brixia(), np.arange(3), [TASKS[1]])])
