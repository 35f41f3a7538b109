"""Out-of-distribution statistics of a trained model's view of its training films.

A film is described by the trained backbone's pooled features and a ``THUMBNAIL × THUMBNAIL`` thumbnail of its
network input (the crop's mean intensity over a grid): ``descriptors``. At the end of a run the training fold's
films are described once (eval mode); the mean and the inverse of the Ledoit-Wolf shrunk covariance of their
descriptors, and the 99th percentile of their Mahalanobis distances to that mean, are the run's
``ood_features.npz`` (plain arrays, read with ``allow_pickle=False``). ``mdmt predict`` measures each new film's
distance and flags a film beyond the threshold (``mdmt.infer.guard``): it lies where fewer than 1 % of the training
films lie.

The thumbnail is there because pooled features alone miss real films: with six MDMT runs of the demo (``tiny_cnn``
trained on the synthetic twin, two twin seeds) they flagged 56-91 % of the real frontal films the guard lets
through; with the thumbnail 100 % on each run, at 1.1-3.8 % of the twin's own test films
(``benchmarks/guard_real.py``). Global average pooling keeps what the heads need and drops the film's layout, where
a film from elsewhere differs first.
"""

from __future__ import annotations

import io
import math
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.distance import cdist
from sklearn.covariance import LedoitWolf

from mdmt.data.augment import to_network_input
from mdmt.errors import DataError
from mdmt.models.multitask import MultiTaskModel
from mdmt.runs import atomic_write_bytes

FEATURE_STATS_FILE = "ood_features.npz"
OOD_QUANTILE = 0.99
"""The share of the training films' distances below the flagging threshold."""
THUMBNAIL = 4
"""Side of the grid of mean input intensities that ``descriptors`` adds to the pooled features."""
ARRAYS = ("mean", "precision", "threshold", "quantile", "n_films")


@dataclass(frozen=True)
class FeatureStats:
    """Mean ``(D,)`` and precision ``(D, D)`` (inverse shrunk covariance) of ``n_films`` training films' pooled
    features, and ``threshold``: the ``quantile`` of their Mahalanobis distances."""

    mean: np.ndarray
    precision: np.ndarray
    threshold: float
    quantile: float
    n_films: int

    @property
    def dim(self) -> int:
        """The number of features."""
        return int(self.mean.shape[0])

    def distance(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``features`` ``(N, D)`` to the training films' mean."""
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise DataError(f"feature statistics of {self.dim} features cannot measure features of shape "
                            f"{features.shape}")
        if len(features) == 0:
            return np.zeros(0)
        return cdist(features, self.mean[None], "mahalanobis", VI=self.precision)[:, 0]

    def save(self, path: str | Path) -> Path:
        """Write the statistics as an ``.npz`` of plain arrays (atomically)."""
        buffer = io.BytesIO()
        np.savez(buffer, mean=self.mean, precision=self.precision, threshold=np.float64(self.threshold),
                 quantile=np.float64(self.quantile), n_films=np.int64(self.n_films))
        atomic_write_bytes(buffer.getvalue(), path)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """The statistics ``save`` wrote; DataError naming the file when it is not such a file."""
        try:
            with np.load(path, allow_pickle=False) as stored:
                values: dict[str, Any] = {name: stored[name] for name in ARRAYS}
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(f"{path}: unreadable feature statistics ({type(exc).__name__}: {exc})") from None
        mean, precision = np.asarray(values["mean"], np.float64), np.asarray(values["precision"], np.float64)
        threshold = float(values["threshold"])
        if (mean.ndim != 1 or precision.shape != (len(mean), len(mean)) or not math.isfinite(threshold)
                or not np.isfinite(precision).all()):
            raise DataError(f"{path}: feature statistics of inconsistent shapes (mean {mean.shape}, precision "
                            f"{precision.shape}) or non-finite values")
        return cls(mean, precision, threshold, float(values["quantile"]), int(values["n_films"]))


def fit_feature_stats(features: np.ndarray, quantile: float = OOD_QUANTILE) -> FeatureStats:
    """Mean, Ledoit-Wolf precision and the ``quantile`` of the Mahalanobis distances of ``features`` ``(N, D)``."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2 or not np.isfinite(features).all():
        raise DataError(f"feature statistics need two or more finite feature rows, got shape {features.shape}")
    shrunk = LedoitWolf().fit(features)
    stats = FeatureStats(shrunk.location_, shrunk.precision_, 0.0, quantile, len(features))
    threshold = float(np.quantile(stats.distance(features), quantile))
    return FeatureStats(stats.mean, stats.precision, threshold, quantile, len(features))


def descriptor_dim(model: MultiTaskModel) -> int:
    """The length of the model's ``descriptors``."""
    return model.feature_dim + THUMBNAIL**2


def descriptors(features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Films described for the out-of-distribution statistics: their pooled backbone ``features`` ``(B, D)`` and
    the mean intensity of their network input ``x`` ``(B, 3, H, W)`` over a ``THUMBNAIL × THUMBNAIL`` grid
    (``(B, D + THUMBNAIL²)``, float32, on ``features``' device)."""
    thumbnail = F.adaptive_avg_pool2d(x[:, :1].float(), THUMBNAIL).flatten(1)
    return torch.cat([features.float(), thumbnail.to(features.device)], dim=1)


@torch.no_grad()
def film_descriptors(model: MultiTaskModel, loader: Iterable[Mapping[str, Any]], device: torch.device,
                     input_size: int | None = None) -> np.ndarray:
    """The ``descriptors`` ``(N, descriptor_dim)`` of every image of ``loader``'s batches (``image``: cached uint8
    ``(B, 1, S, S)``), made network input as training does, on ``device`` in eval mode (the model's mode is
    restored)."""
    training = model.training
    model.to(device).eval()
    parts = []
    try:
        for batch in loader:
            x = to_network_input(batch["image"].to(device), input_size, *model.normalization)
            parts.append(descriptors(model.features(x), x).double().cpu().numpy())
    finally:
        model.train(training)
    return np.concatenate(parts) if parts else np.zeros((0, descriptor_dim(model)))


def write_feature_stats(model: MultiTaskModel, loader: Iterable[Mapping[str, Any]], device: torch.device,
                        run_dir: str | Path, input_size: int | None = None) -> Path:
    """``ood_features.npz`` in ``run_dir``: the statistics of the ``film_descriptors`` of the training films of
    ``loader``."""
    stats = fit_feature_stats(film_descriptors(model, loader, device, input_size))
    return stats.save(Path(run_dir) / FEATURE_STATS_FILE)


def read_feature_stats(run_dir: str | Path) -> FeatureStats | None:
    """The run's ``ood_features.npz``, or None for a run without one (trained before the file existed)."""
    path = Path(run_dir) / FEATURE_STATS_FILE
    return FeatureStats.load(path) if path.is_file() else None
