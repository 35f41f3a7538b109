"""The guard against the wrong film: films ``predict`` must not score, and the out-of-distribution flag.

A film is refused (listed in ``skipped.csv`` with the reason, never scored) when the lung segmenter
(``mdmt.lungs.locate.locate_lungs``) does not find a plausible pair of frontal lungs on it: a lateral view or any
film without lungs ("no lungs found"), or a segmentation that fails one of its plausibility checks (two lung
fields side by side, of similar size and height, level, shaped like lungs; the reason names the check). Under
``data.crop: lungs`` that is the film's own crop box; under any other crop mode the segmenter runs on the decoded
film for the guard alone. On the 126 shared real films it refuses the 11 lateral views and 1 of the 115 frontal
films (``benchmarks/guard_real.py``). The shipped segmenter was trained on 90 of those frontal films; out of sample
(``benchmarks/lung_real.py``, each fold segmented by a model trained without it) all 11 laterals and none of the
frontal films fall back.

A scored film of a run that holds ``ood_features.npz`` gets ``ood_distance``, the Mahalanobis distance of its
descriptors (pooled backbone features and an input thumbnail, ``mdmt.train.feature_stats``) to the training
films', and ``ood_flag``, True beyond the 99th percentile of the training films' distances.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from mdmt.config import DataConfig
from mdmt.images import normalize_intensity, read_image
from mdmt.infer.films import Film
from mdmt.infer.model_io import TrainedModel
from mdmt.lungs.locate import LungBox, locate_lungs
from mdmt.train.feature_stats import FEATURE_STATS_FILE, FeatureStats

NO_LUNGS = "no lungs found"
"""How ``locate_lungs`` opens the note of a film without a lung field."""
DOUBTFUL = "doubtful: "
CLASSICAL_FALLBACK = "; classical localiser"
"""What ``locate_lungs`` puts around the failed plausibility check when it falls back to the classical localiser."""
NOT_FRONTAL = "not scored, not a frontal chest film"
OOD_COLUMNS = ("ood_distance", "ood_flag")


def lung_verdict(film: Film, data: DataConfig) -> LungBox:
    """The lung segmenter's box of ``film``: its crop box under ``data.crop: lungs``, else the segmenter run on
    the film decoded and clipped as the run does (raises ImageReadError)."""
    if data.crop == "lungs":
        return film.box
    return locate_lungs(normalize_intensity(read_image(film.path), *data.clip_percentiles))


def refusal_reason(box: LungBox) -> str | None:
    """Why a film whose lung segmenter gave ``box`` must not be scored, or None (``box.ok``)."""
    if box.ok:
        return None
    if box.note.startswith(NO_LUNGS):
        return f"{NOT_FRONTAL}: {box.note}"
    check = box.note.removeprefix(DOUBTFUL).split(CLASSICAL_FALLBACK)[0]
    return f"{NOT_FRONTAL}: the lung segmentation failed its plausibility check: {check}"


def film_refusal(film: Film, data: DataConfig) -> str | None:
    """Why ``film`` must not be scored by a run preprocessing with ``data`` (``refusal_reason`` of its
    ``lung_verdict``), or None."""
    return refusal_reason(lung_verdict(film, data))


def ood_columns(stats: FeatureStats, features: torch.Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """``ood_distance`` and ``ood_flag`` (distance above the training films' threshold) of pooled features."""
    distance = stats.distance(np.asarray(features, dtype=np.float64))
    return {"ood_distance": distance, "ood_flag": distance > stats.threshold}


def guard_notes(trained: TrainedModel, table: pd.DataFrame) -> list[str]:
    """One line on the out-of-distribution check of the scored films ``table``: how many it flagged, or that the
    run has no feature statistics to check them with."""
    stats = trained.feature_stats
    if stats is None:
        note = (f"{trained.run_dir}: no {FEATURE_STATS_FILE} (a run trained before mdmt kept it): the films are not "
                f"checked for being out of the training distribution (no {' / '.join(OOD_COLUMNS)} columns); train "
                f"the run again to get them")
        return [note]
    flagged = int(table["ood_flag"].sum()) if len(table) else 0
    if not flagged:
        return []
    note = (f"{flagged} of {len(table)} scored film(s) flagged out of distribution (ood_flag): their features are "
            f"farther from the training films' than {stats.quantile:.0%} of the run's {stats.n_films} training films "
            f"(Mahalanobis distance > {stats.threshold:.2f}); their predictions extrapolate")
    return [note]
