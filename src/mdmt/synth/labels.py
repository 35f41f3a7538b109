"""The label models: prognosis from the latents, BrixIA's rater slips and its consensus raters.

Prognosis follows the true global Brixia score (or, with ``decoupled``, the heart size, which does not
depend on the lungs) through a noisy logistic model. Its slope, 2.0, puts the oracle (the true global score) at
AUC 0.81 and cross-validated accuracy 0.74 on the ``small`` preset; the calibration study's 1.2 gave only 0.70
and 0.65 here, where each hospital's intercept is set to its real SEVERE share.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from mdmt.synth.hospitals import SEVERE_RATE
from mdmt.tasks import REGIONS

PROGNOSIS_SLOPE, PROGNOSIS_NOISE = 2.0, 0.5
ANNOTATOR_SLIP = 0.15
"""Chance that a rater's label of an image moves one zone by ±1."""
CONSENSUS_RATERS, RATER_SLIP = 5, 0.2
"""Simulated consensus raters; each zone of each rater moves by ±1 with this chance."""


def assign_prognosis(z: np.ndarray, centers: Sequence[str], rng: np.random.Generator,
                     rates: Mapping[str, float] = SEVERE_RATE) -> tuple[np.ndarray, dict[str, float]]:
    """SEVERE (1) / MILD (0) with P(SEVERE) = sigmoid(2 z + b_center + N(0, 0.5)).

    Drawn as ``2 z + N(0, 0.5) + Logistic(0, 1) > -b_center``, which is that Bernoulli draw; the
    intercept ``b_center`` is set per hospital so that exactly round(n × ``rates[center]``) patients are
    SEVERE (by default the real AIforCOVID shares), which keeps both classes in every hospital even at
    the tiny preset. Returns the labels and the intercept of each hospital.
    """
    centers = np.asarray(centers)
    latent = PROGNOSIS_SLOPE * z + rng.normal(0.0, PROGNOSIS_NOISE, size=len(z)) + rng.logistic(0.0, 1.0, size=len(z))
    labels = np.zeros(len(z), dtype=int)
    intercepts: dict[str, float] = {}
    for center in sorted(set(centers.tolist())):
        members = np.flatnonzero(centers == center)
        severe = int(round(rates[center] * len(members)))
        order = members[np.argsort(-latent[members], kind="stable")]
        labels[order[:severe]] = 1
        ranked = latent[order]
        upper = ranked[severe - 1] if severe > 0 else ranked[0] + 1.0
        lower = ranked[severe] if severe < len(members) else ranked[-1] - 1.0
        intercepts[center] = float(-(upper + lower) / 2.0)
    return labels, intercepts


def standardise(values: np.ndarray) -> np.ndarray:
    """Zero mean, unit standard deviation (a constant stays at zero)."""
    sd = values.std()
    return (values - values.mean()) / (sd if sd > 0 else 1.0)


def annotate(scores: np.ndarray, rng: np.random.Generator, slip: float) -> np.ndarray:
    """Rater labels: each row moves one random zone by ±1 (clipped to 0–3) with chance ``slip``."""
    labels = scores.copy()
    for row in np.flatnonzero(rng.random(len(scores)) < slip):
        zone = rng.integers(6)
        labels[row, zone] = np.clip(labels[row, zone] + rng.choice((-1, 1)), 0, 3)
    return labels


def consensus_table(image_ids: Sequence[str], scores: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    """``metadata_consensus_v1.csv`` rows: Mean/Mode of 5 simulated raters around the true scores."""
    raters = np.stack([np.clip(scores + (rng.random(scores.shape) < RATER_SLIP) * rng.choice((-1, 1), scores.shape),
                               0, 3) for _ in range(CONSENSUS_RATERS)])
    means = np.round(raters.mean(axis=0), 1)
    modes = np.apply_along_axis(lambda votes: np.bincount(votes, minlength=4).argmax(), 0, raters)
    table = pd.DataFrame({"Filename": [f"{i}.dcm" for i in image_ids]})
    for k, region in enumerate(REGIONS):
        table[f"Mean{region}"] = means[:, k]
    for k, region in enumerate(REGIONS):
        table[f"Mode{region}"] = modes[:, k]
    table["MeanGlobal"] = np.round(means.sum(axis=1), 1)
    table["ModeGlobal"] = modes.sum(axis=1)
    return table
