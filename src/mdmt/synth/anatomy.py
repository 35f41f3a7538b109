"""The chest phantom: body, lungs, ribs, mediastinum and heart, opacities in the six zones, the device shift.

The geometry and the opacity model were calibrated on 64 × 64 px images, where a small CNN trained on
the twin shows the multi-task gain in minutes: a soft elliptical body, two dark lung ellipses with
faint ribs (their darkness varies from patient to patient), a bright mediastinum and a heart whose
half-width follows a latent heart size ``h``. A latent severity ``s`` sets the target coverage of
smoothed-noise opacities in the six Brixia zones (three equal heights per lung, A–C on the image's
left); each zone score is read from the RENDERED coverage, not from ``s``. The opacity strength is a
knob of the benchmark: 0.28 makes the severity task easy, 0.14 makes the opacities subtle, and the
default 0.19 lies between.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.special import expit

from mdmt.synth.devices import DeviceProfile

CALIBRATION_SIZE = 64
"""Side (px) of the calibration images; pixel sizes below are at this scale and grow with the image."""
BODY_CENTRE, BODY_RADII, BODY_LEVEL = (0.5, 0.56), (0.44, 0.56), 0.55
LUNG_X, LUNG_Y, LUNG_RADII, LUNG_LEVEL = (0.31, 0.69), 0.47, (0.13, 0.30), -0.38
LUNG_CENTRE_JITTER, LUNG_RADIUS_JITTER = 0.012, 0.03
LUNG_LEVEL_SD = 0.10
"""Per-patient spread (sd) of the lung field's darkness: habitus, depth of inspiration, exposure. It keeps the mean
brightness of the lungs from being a clean read-out of the opacity coverage, so a model has to find the opacities."""
RIB_AMPLITUDE, RIB_CYCLES, RIB_BEND = 0.04, 9, 0.06
"""Rib stripes: 9 cycles over a lung height, descending by RIB_BEND at x = 0.5 ± RIB_HALF_SPAN."""
RIB_HALF_SPAN = 0.32
MEDIASTINUM_HALF_WIDTH, MEDIASTINUM_BOTTOM, MEDIASTINUM_EDGES = 0.055, 0.82, (0.01, 0.02)
HEART_CENTRE, HEART_HALF_HEIGHT = (0.56, 0.64), 0.11
HEART_WIDTH = (0.07, 0.09)
"""Heart half-width = 0.07 + 0.09 * h."""
DENSE_LEVEL = 0.15
"""Mediastinum and heart brightness above the soft tissue."""
EDGE_SOFTNESS = 0.06
"""Width of the soft edge, in units of the normalised elliptical radius."""
ZONE_WEIGHTS = (0.6, 0.9, 1.2)
"""Target coverage of the upper/middle/lower zone = clip(s * w + N(0, 0.08), 0, 1)."""
COVERAGE_NOISE = 0.08
OPACITY_FIELD_SIGMA, OPACITY_MASK_SIGMA = 2.5, 1.0
SCORE_EDGES = (0.10, 0.30, 0.55)
"""Rendered coverage < 0.10 → 0, < 0.30 → 1, < 0.55 → 2, else 3."""
DEFAULT_OPACITY = 0.19
SEVERITY_BETA = HEART_BETA = (2.0, 3.0)
"""The latents: severity s ~ Beta(2, 3) and heart size h ~ Beta(2, 3), independent."""
SEVERITY_MEAN = SEVERITY_BETA[0] / sum(SEVERITY_BETA)


@dataclass(frozen=True)
class Anatomy:
    """Patient geometry in normalised image coordinates (x to the right, y down, both 0–1)."""

    lung_x: tuple[float, float]
    lung_y: tuple[float, float]
    lung_rx: tuple[float, float]
    lung_ry: tuple[float, float]
    heart_x: float
    heart_size: float
    """The latent h ~ Beta(2, 3): heart half-width = 0.07 + 0.09 h."""
    lung_level: float = LUNG_LEVEL


def draw_anatomy(heart_size: float, rng: np.random.Generator) -> Anatomy:
    """Lung positions and radii jittered by 1–2 % around the calibrated geometry."""
    centre = rng.normal(0.0, LUNG_CENTRE_JITTER, size=(2, 2))
    radius = 1.0 + rng.normal(0.0, LUNG_RADIUS_JITTER, size=(2, 2))
    return Anatomy(
        lung_x=(LUNG_X[0] + centre[0, 0], LUNG_X[1] + centre[1, 0]),
        lung_y=(LUNG_Y + centre[0, 1], LUNG_Y + centre[1, 1]),
        lung_rx=(LUNG_RADII[0] * radius[0, 0], LUNG_RADII[0] * radius[1, 0]),
        lung_ry=(LUNG_RADII[1] * radius[0, 1], LUNG_RADII[1] * radius[1, 1]),
        heart_x=HEART_CENTRE[0] + float(rng.normal(0.0, LUNG_CENTRE_JITTER)),
        heart_size=float(heart_size),
        lung_level=LUNG_LEVEL + float(rng.normal(0.0, LUNG_LEVEL_SD)),
    )


@dataclass
class Rendered:
    """One phantom: detector image, zone map and the zone truth."""

    image: np.ndarray
    """float32 in [0, 1], bright = dense (MONOCHROME2 sense), after the device shift."""
    zones: np.ndarray
    """uint8: 0 outside the lungs, k = 1..6 inside zone A..F."""
    coverage: np.ndarray
    """(6,) rendered opacity coverage per zone (mean of the blurred opacity mask over the zone)."""
    scores: np.ndarray
    """(6,) true zone scores 0–3 from ``coverage``."""

    def lung_box(self) -> tuple[int, int, int, int]:
        """End-exclusive ``(x0, y0, x1, y1)`` of the union of both lungs."""
        rows = np.flatnonzero(self.zones.any(axis=1))
        cols = np.flatnonzero(self.zones.any(axis=0))
        return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _soft_ellipse(u: np.ndarray, v: np.ndarray, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    radius = np.sqrt(((u - cx) / rx) ** 2 + ((v - cy) / ry) ** 2)
    return expit((1.0 - radius) / EDGE_SOFTNESS).astype(np.float32)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(sizes))


def _zone_map(lungs: Sequence[np.ndarray]) -> np.ndarray:
    """Each lung (> 0.5, largest piece) cut into three equal heights: codes 1–3 image left, 4–6 image right."""
    zones = np.zeros(lungs[0].shape, dtype=np.uint8)
    for side, soft in enumerate(lungs):
        inside = _largest_component(soft > 0.5)
        rows = np.flatnonzero(inside.any(axis=1))
        top, height = rows[0], rows[-1] - rows[0] + 1
        band = np.clip((np.arange(zones.shape[0]) - top) * 3 // height, 0, 2).astype(np.uint8)
        zones[inside] = np.broadcast_to((1 + 3 * side + band)[:, None], zones.shape)[inside]
    return zones


def _correlated_noise(shape: tuple[int, int], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise smoothed with ``sigma`` px and rescaled to unit variance."""
    white = rng.standard_normal(shape, dtype=np.float32)
    if sigma < 0.5:
        return white
    return ndimage.gaussian_filter(white, sigma) * np.float32(2.0 * sigma * np.sqrt(np.pi))


def _opacities(zones: np.ndarray, severity: float, scale: float,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Blurred opacity mask (float32 0–1) and the rendered coverage of each zone."""
    targets = np.clip(severity * np.tile(ZONE_WEIGHTS, 2) + rng.normal(0.0, COVERAGE_NOISE, size=6), 0.0, 1.0)
    field_ = ndimage.gaussian_filter(rng.standard_normal(zones.shape, dtype=np.float32), OPACITY_FIELD_SIGMA * scale)
    mask = np.zeros(zones.shape, dtype=np.float32)
    inside = [zones == k for k in range(1, 7)]
    for zone, target in zip(inside, targets):
        if target > 0.0:
            threshold = np.quantile(field_[zone], 1.0 - target)
            mask[zone & (field_ >= threshold)] = 1.0
    blurred = ndimage.gaussian_filter(mask, OPACITY_MASK_SIGMA * scale)
    coverage = np.array([blurred[zone].mean() for zone in inside])
    return blurred, coverage


def render(anatomy: Anatomy, severity: float, profile: DeviceProfile, opacity: float,
           rng: np.random.Generator) -> Rendered:
    """Draw one chest phantom at the profile's size with opacities for ``severity`` and the device shift."""
    rows, cols = profile.rows, profile.columns
    scale = min(rows, cols) / CALIBRATION_SIZE
    v = (0.5 + ((np.arange(rows, dtype=np.float32) + 0.5) / rows - 0.5) / profile.zoom)[:, None]
    u = (0.5 + ((np.arange(cols, dtype=np.float32) + 0.5) / cols - 0.5) / profile.zoom)[None, :]
    body = _soft_ellipse(u, v, *BODY_CENTRE, *BODY_RADII)
    heart_rx = HEART_WIDTH[0] + HEART_WIDTH[1] * anatomy.heart_size
    heart = _soft_ellipse(u, v, anatomy.heart_x, HEART_CENTRE[1], heart_rx, HEART_HALF_HEIGHT)
    mediastinum = (expit((MEDIASTINUM_HALF_WIDTH - np.abs(u - 0.5)) / MEDIASTINUM_EDGES[0])
                   * expit((MEDIASTINUM_BOTTOM - v) / MEDIASTINUM_EDGES[1])).astype(np.float32)
    dense = np.maximum(heart, mediastinum) * body
    lungs = [_soft_ellipse(u, v, anatomy.lung_x[i], anatomy.lung_y[i], anatomy.lung_rx[i], anatomy.lung_ry[i])
             * (1.0 - dense) for i in range(2)]
    lung = lungs[0] + lungs[1]
    zones = _zone_map(lungs)
    lung_top = min(y - ry for y, ry in zip(anatomy.lung_y, anatomy.lung_ry))
    bent = v - lung_top - RIB_BEND * ((u - 0.5) / RIB_HALF_SPAN) ** 2
    ribs = np.sin(2.0 * np.pi * RIB_CYCLES * bent / (2 * LUNG_RADII[1]))
    image = body * BODY_LEVEL + dense * DENSE_LEVEL + lung * (anatomy.lung_level + RIB_AMPLITUDE * ribs.astype(np.float32))
    mask, coverage = _opacities(zones, severity, scale, rng)
    image += np.float32(opacity) * mask
    image = (np.clip(image, 0.0, 1.0) ** np.float32(profile.gamma) * np.float32(profile.contrast)
             + np.float32(profile.offset)
             + np.float32(profile.noise_sd) * _correlated_noise(image.shape, 0.5 * scale, rng))
    scores = np.searchsorted(SCORE_EDGES, coverage, side="right")
    return Rendered(np.clip(image, 0.0, 1.0).astype(np.float32), zones, coverage, scores)
