"""Shared fixtures: the tiny synthetic twin and its caches, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` synthetic AIforCOVID + BrixIA twin (seed 0), in the real formats."""
    from mdmt.synth import generate

    out = tmp_path_factory.mktemp("tiny-synthetic")
    generate(out, preset="tiny", seed=0, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_config(tiny_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """A config pointing at the tiny twin with a small cache size and a short schedule."""
    from mdmt.config import load_config, parse_override

    work = tmp_path_factory.mktemp("tiny-work")
    overrides = [
        f"data.datasets.aiforcovid.params.root={tiny_data / 'AIforCOVID'}",
        f"data.datasets.brixia.params.root={tiny_data / 'BRIXIA'}",
        f"data.cache_dir={work / 'cache'}",
        "data.image_size=48",
        "data.crop=lungs_classical",
        f"results_dir={work / 'results'}",
        "model.backbone=tiny_cnn",
        "model.input_size=48",
        "train.batch_size=16",
        "train.max_epochs=3",
        "train.warmup_epochs=0",
        "runtime.threads=1",
        "runtime.device=cpu",
    ]
    return load_config(None, [parse_override(o) for o in overrides])


@pytest.fixture(scope="session")
def tiny_caches(tiny_config):
    """The image caches of the tiny twin ({"aiforcovid": ImageCache, "brixia": ImageCache})."""
    from mdmt.data.datasets import prepare

    return prepare(tiny_config, progress=False)


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
"""``../shared/data`` beside the repository root: data the project reads but never copies."""
REQUIRE_SHARED_DATA = "MDMT_REQUIRE_SHARED_DATA"


def _shared_data(name: str) -> Path:
    """``SHARED_DATA / name``; a missing folder skips the test, or fails it when MDMT_REQUIRE_SHARED_DATA=1 (CI)."""
    folder = SHARED_DATA / name
    if not folder.is_dir():
        reason = f"shared data folder {folder} not found (expected beside the repository root)"
        if os.environ.get(REQUIRE_SHARED_DATA) == "1":
            pytest.fail(f"{reason}; {REQUIRE_SHARED_DATA}=1 requires it")
        pytest.skip(reason)
    return folder


@pytest.fixture(scope="session")
def real_films() -> Path:
    """The real chest films with human lung masks (``../shared/data/real-cxr-lungs``)."""
    return _shared_data("real-cxr-lungs")


@pytest.fixture(scope="session")
def official_splits_dir() -> Path:
    """The official split files (``../shared/data/official-splits``)."""
    return _shared_data("official-splits")


@pytest.fixture
def one_torch_thread():
    """One torch thread for the test: the machine's cores are shared, and oversubscribed threads make steps crawl."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
