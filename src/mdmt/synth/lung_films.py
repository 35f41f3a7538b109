"""The twin's films with their truth masks, as training films for the lung segmenter (``mdmt.lungs.training``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mdmt.synth.layout import TRUTH_DIR
from mdmt.synth.twin import generate

TWIN_DATASETS = ("brixia", "aiforcovid")
TWIN_PRESET = "small"
TWIN_SEED = 1
"""Seed of the twin the segmenter trains on (the benchmarks score it on the twin of seed 0)."""
TWIN_FILMS = 240
"""Twin films in the training set."""


def read_twin_films(root: str | Path, datasets: tuple[str, ...] = TWIN_DATASETS) -> pd.DataFrame:
    """The synthetic twin's films with their truth masks, in the columns of ``mdmt.lungs.training.read_film_folder``."""
    root = Path(root)
    tables = []
    for dataset in datasets:
        truth = pd.read_csv(root / TRUTH_DIR / f"{dataset}.csv", dtype={"image_id": str, "patient_id": str})
        masks = root / TRUTH_DIR / "masks" / dataset
        tables.append(pd.DataFrame({
            "image_id": truth["image_id"],
            "patient": dataset + ":" + truth["patient_id"],
            "path": [str(root / p) for p in truth["path"]],
            "mask_path": [str(masks / f"{i}.png") for i in truth["image_id"]],
        }))
    return pd.concat(tables, ignore_index=True)


def twin_training_films(scratch: str | Path, count: int = TWIN_FILMS, seed: int = TWIN_SEED) -> pd.DataFrame:
    """Generate the synthetic twin (preset ``TWIN_PRESET``, ``seed``) under ``scratch`` and pick ``count``
    of its films at random (seeded) for training."""
    generate(scratch, preset=TWIN_PRESET, seed=seed, progress=False)
    films = read_twin_films(scratch)
    pick = np.sort(np.random.default_rng(seed).permutation(len(films))[:count])
    return films.iloc[pick].reset_index(drop=True)
