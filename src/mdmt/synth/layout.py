"""Names on disk, the generator version and the random streams that every part of the twin shares."""

from __future__ import annotations

import enum

import numpy as np

from mdmt.sources.tables import SYNTHETIC_MARKER

GENERATOR_VERSION = 2
"""Bump when the same seed and parameters start to write different files."""

BRIXIA_DIR, AIFORCOVID_DIR = "BRIXIA", "AIforCOVID"
TRUTH_DIR, PARAMS_FILE = SYNTHETIC_MARKER.parts
"""``PARAMS_FILE`` is written last into ``TRUTH_DIR``; it marks a folder this generator may overwrite."""
COHORT_DIR, COHORT_MANIFEST, COHORT_IMAGES = "COHORT", "manifest.csv", "images"
"""The optional third dataset: ``COHORT/manifest.csv`` and its films in ``COHORT/images/``."""
BRIXIA_METADATA = "metadata_global_v2.csv"
ZONE_MASK_STEP = 40
"""Truth mask PNGs hold ``40 * k`` for zone k = 1..6 (A..F) and 0 outside the lungs."""


class Stream(enum.IntEnum):
    """Independent random streams: ``default_rng([seed, stream, index...])``.

    A new dataset takes new stream numbers, so that adding it shifts no draw of the others.
    """

    PROFILES = 1
    BRIXIA_PLAN = 2
    AIFORCOVID_PLAN = 3
    BRIXIA_RENDER = 4
    AIFORCOVID_RENDER = 5
    PROGNOSIS = 6
    ANNOTATORS = 7
    CLINICAL = 8
    FAULTS = 9
    COHORT_PROFILES = 10
    COHORT_PLAN = 11
    COHORT_RENDER = 12
    COHORT_PROGNOSIS = 13
    COHORT_ANNOTATORS = 14


def stream_rng(seed: int, stream: Stream, *index: int) -> np.random.Generator:
    """The generator of one stream (and item ``index``) for ``seed``."""
    return np.random.default_rng([seed, int(stream), *index])
