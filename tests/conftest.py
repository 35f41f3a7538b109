"""Shared fixtures: the tiny synthetic twin and its caches, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` synthetic AIforCOVID + BrixIA twin (seed 0), in the real formats."""
    from mdmt.data.synthetic import generate

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
        "train.threads=1",
    ]
    return load_config(None, [parse_override(o) for o in overrides])


@pytest.fixture(scope="session")
def tiny_caches(tiny_config):
    """The image caches of the tiny twin ({"aiforcovid": ImageCache, "brixia": ImageCache})."""
    from mdmt.data.datasets import prepare

    return prepare(tiny_config, progress=False)
