"""Synthetic twin of BrixIA and AIforCOVID, written in the real on-disk formats (datasets.md §4).

The phantom and the label model are the calibrated prototype's (shared/docs/synthetic-calibration.md):
a soft elliptical body, two dark lung ellipses with faint ribs, a bright mediastinum and a heart whose
width follows a latent heart size ``h``. A latent severity ``s`` sets the coverage of smoothed-noise
opacities in the six Brixia zones (three equal heights per lung, A–C on the image's left) and each zone
score is read from the RENDERED coverage. A device profile per AIforCOVID hospital and per BrixIA vendor
changes only the acquisition: size and aspect, field of view, gamma, contrast, offset, noise, bits
stored, MONOCHROME1 share and transfer syntax. AIforCOVID prognosis follows the true global score
(or, with ``decoupled``, the heart size) through a noisy logistic model.

The hidden truth goes to ``_synthetic_truth/``, which the dataset readers never look at:
``brixia.csv`` and ``aiforcovid.csv`` (one row per image: image_id, patient_id, center, profile,
manufacturer, path, latent ``s`` and ``h``, fault, photometric, bits_stored, transfer_syntax, rows, columns,
the end-exclusive lung box ``x0, y0, x1, y1`` of both lungs (the file is a valid boxes file for
``mdmt.data.lungs``), coverage_A..F, true_A..F, true_global; BrixIA adds label_A..F, label_global,
label_text, consensus; AIforCOVID adds release, z, prognosis, prognosis_intercept), ``profiles.csv``,
``params.json`` and ``masks/<dataset>/<image_id>.png`` (40·k inside zone k = 1..6, 0 outside the lungs,
at the DICOM's size). Every random draw comes from
``numpy.random.default_rng([seed, stream, index])``: the same seed writes byte-identical files, and the
images do not change with ``decoupled`` or with the faults asked for.
"""

from __future__ import annotations

import enum
import io
import json
import re
import shutil
import time
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, generate_uid
from rich.table import Table
from scipy import ndimage
from scipy.special import expit

from mdmt.data.sources.aiforcovid import KNOWN_BAD_IDS as AIFORCOVID_KNOWN_BAD_IDS
from mdmt.data.sources.aiforcovid import RELEASES
from mdmt.data.sources.brixia import CONSENSUS_FILE, IMAGE_DIR
from mdmt.errors import ConfigError
from mdmt.progress import progress_bar
from mdmt.tasks import REGIONS

GENERATOR_VERSION = 1
"""Bump when the same seed and parameters start to write different files."""

BRIXIA_DIR, AIFORCOVID_DIR, TRUTH_DIR = "BRIXIA", "AIforCOVID", "_synthetic_truth"
BRIXIA_METADATA = "metadata_global_v2.csv"
PARAMS_FILE = "params.json"
"""Written last into ``_synthetic_truth/``; marks a folder this generator may overwrite."""
ZONE_MASK_STEP = 40
"""Truth mask PNGs hold ``40 * k`` for zone k = 1..6 (A..F) and 0 outside the lungs."""

# ----------------------------------------------------------------------------- phantom (calibrated prototype)
CALIBRATION_SIZE = 64
"""Side (px) of the prototype's images; pixel sizes below are at this scale and grow with the image."""
BODY_CENTRE, BODY_RADII, BODY_LEVEL = (0.5, 0.56), (0.44, 0.56), 0.55
LUNG_X, LUNG_Y, LUNG_RADII, LUNG_LEVEL = (0.31, 0.69), 0.47, (0.13, 0.30), -0.38
LUNG_CENTRE_JITTER, LUNG_RADIUS_JITTER = 0.012, 0.03
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
SEVERITY_MEAN = SEVERITY_BETA[0] / sum(SEVERITY_BETA)
FOLLOW_UP_DRIFT = 0.08
"""Severity random-walk step between a BrixIA subject's images."""

# ----------------------------------------------------------------------------- labels
PROGNOSIS_SLOPE, PROGNOSIS_NOISE = 1.2, 0.5
ANNOTATOR_SLIP = 0.15
"""Chance that the BrixIA CSV label moves one zone by ±1."""
CONSENSUS_RATERS, RATER_SLIP = 5, 0.2
"""Simulated consensus raters; each zone of each rater moves by ±1 with this chance."""
DEATH_GIVEN_SEVERE = 0.33

# ----------------------------------------------------------------------------- device profiles
BITS_STORED = (10, 12, 14, 16)
TRANSFER_SYNTAXES = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian), str(RLELossless))
SOP_CLASSES = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}
"""CR Image Storage; Digital X-Ray Image Storage – For Presentation."""
SIDE_RANGE = (0.875, 1.25)
"""Rows and columns of a profile = preset size × U(SIDE_RANGE), a multiple of 4."""
ZOOM_RANGE, GAMMA_RANGE, CONTRAST_RANGE = (0.92, 1.08), (0.75, 1.3), (0.75, 1.25)
OFFSET_RANGE, NOISE_RANGE, MONOCHROME1_RANGE = (-0.08, 0.08), (0.02, 0.07), (0.15, 0.85)
DETECTOR_MM = 430.0
"""Detector width used for ImagerPixelSpacing."""


@dataclass(frozen=True)
class Vendor:
    """A BrixIA device vendor: group (the reader's center), raw spellings, modality, real image count."""

    group: str
    spellings: tuple[str, ...]
    modality: str
    real_images: int


VENDORS = (
    Vendor("SIEMENS", ("SIEMENS",), "CR", 2197),
    Vendor("CARESTREAM", ("CARESTREAM HEALTH",), "DX", 1804),
    Vendor("AGFA", ("Agfa-Gevaert", "AGFA"), "CR", 576),
    Vendor("KODAK", ("KODAK",), "CR", 73),
    Vendor("VSM", ("VILLA SISTEMI MEDICALI",), "DX", 28),
    Vendor("FUJIFILM", ("FUJIFILM Corporation",), "CR", 15),
    Vendor("DIGITEC", ("DIGITEC",), "DX", 1),
)
"""BrixIA vendor mix (datasets.md §1.5); AIforCOVID hospitals draw their vendor from the first five."""


@dataclass(frozen=True)
class IdBlock:
    """AIforCOVID ids of one center in one release (datasets.md §2.2): ``prefix + number``."""

    center: str
    release: int
    prefix: str
    numbers: tuple[range, ...]
    real_patients: int

    def available(self) -> list[int]:
        """The block's numbers that are not on the official exclusion list."""
        return [n for r in self.numbers for n in r if f"{self.prefix}{n}" not in AIFORCOVID_KNOWN_BAD_IDS]


AIFORCOVID_BLOCKS = (
    IdBlock("A", 1, "P_", (range(1, 121),), 120),
    IdBlock("D", 1, "P_", (range(121, 263),), 139),
    IdBlock("E", 1, "P_", (range(263, 372),), 101),
    IdBlock("F", 1, "P_", (range(372, 547), range(685, 845)), 325),
    IdBlock("B", 1, "P_", (range(547, 654),), 104),
    IdBlock("C", 1, "P_", (range(654, 685),), 31),
    IdBlock("F", 2, "P_1_", (range(1, 164),), 160),  # 163 listed, 3 of them on the exclusion list
    IdBlock("C", 2, "P_2_", (range(1, 123),), 120),
    IdBlock("F", 3, "P_3_", (range(1, 501),), 482),
)
CENTERS = ("A", "B", "C", "D", "E", "F")
SEVERE_RATE = {"A": 85 / 120, "B": 45 / 104, "C": 81 / 151, "D": 63 / 139, "E": 46 / 101, "F": 426 / 970}
"""Share of SEVERE per hospital over all releases (datasets.md §2.2)."""
RELEASE_FOLDERS = {release: folder for release, folder, _ in RELEASES}
RELEASE_SHEETS = {release: sheet for release, _, sheet in RELEASES}


@dataclass(frozen=True)
class SynthPreset:
    """Sizes of one generated twin (datasets.md §4.9)."""

    name: str
    image_size: int
    brixia_images: int
    brixia_consensus: int
    aiforcovid: Mapping[str, int]
    """Patients per hospital; each hospital's patients are spread over its releases like the real ones."""
    opacity: float = DEFAULT_OPACITY


def _real_patients(center: str) -> int:
    return sum(block.real_patients for block in AIFORCOVID_BLOCKS if block.center == center)


PRESETS: dict[str, SynthPreset] = {
    "tiny": SynthPreset("tiny", 128, 48, 6, dict.fromkeys(CENTERS, 6)),
    "small": SynthPreset("small", 256, 600, 20, {"A": 40, "B": 35, "C": 50, "D": 45, "E": 35, "F": 95}),
    "medium": SynthPreset("medium", 256, 2000, 60, {c: _real_patients(c) for c in CENTERS}),
}


# ----------------------------------------------------------------------------- clinical sheet columns
@dataclass(frozen=True)
class Measurement:
    """A continuous clinical column: N(mean + severity_effect * s, sd), clipped, rounded."""

    name: str
    mean: float
    sd: float
    severity_effect: float
    low: float
    high: float
    decimals: int


@dataclass(frozen=True)
class Condition:
    """A 0/1 clinical column: logit(base) + per_decade * (age - 65) / 10 + severity_effect * (s - E[s])."""

    name: str
    base: float
    per_decade: float = 0.0
    severity_effect: float = 0.0


MEASUREMENTS = (
    Measurement("Temp_C", 37.6, 0.7, 0.6, 35.5, 41.0, 1),
    Measurement("DaysFever", 5.0, 3.0, 2.0, 0.0, 30.0, 0),
    Measurement("WBC", 7.0, 2.5, 3.0, 1.0, 30.0, 2),
    Measurement("RBC", 4.6, 0.6, -0.3, 2.5, 6.5, 2),
    Measurement("CRP", 60.0, 50.0, 80.0, 0.1, 400.0, 1),
    Measurement("Fibrinogen", 550.0, 150.0, 150.0, 150.0, 1200.0, 0),
    Measurement("Glucose", 115.0, 30.0, 25.0, 60.0, 400.0, 0),
    Measurement("PCT", 0.3, 0.5, 0.6, 0.01, 20.0, 2),
    Measurement("LDH", 300.0, 90.0, 200.0, 100.0, 1500.0, 0),
    Measurement("INR", 1.1, 0.15, 0.1, 0.8, 3.0, 2),
    Measurement("D-dimer", 900.0, 700.0, 1200.0, 100.0, 10000.0, 0),
    Measurement("Ox_percentage", 95.0, 3.0, -9.0, 60.0, 100.0, 0),
    Measurement("PaO2", 78.0, 14.0, -25.0, 30.0, 150.0, 0),
    Measurement("SaO2", 95.0, 3.0, -8.0, 60.0, 100.0, 1),
    Measurement("PaCO2", 36.0, 5.0, -2.0, 20.0, 70.0, 0),
    Measurement("pH", 7.44, 0.04, 0.02, 7.1, 7.7, 2),
)
CONDITIONS = (
    Condition("Positivity at admission", 0.9),
    Condition("Cough", 0.55),
    Condition("DifficultyInBreathing", 0.3, severity_effect=2.0),
    Condition("CardiovascularDisease", 0.3, 0.5),
    Condition("IschemicHeartDisease", 0.12, 0.5),
    Condition("AtrialFibrillation", 0.1, 0.6),
    Condition("HeartFailure", 0.06, 0.6),
    Condition("Ictus", 0.05, 0.5),
    Condition("HighBloodPressure", 0.45, 0.5),
    Condition("Diabetes", 0.18, 0.3),
    Condition("Dementia", 0.06, 0.9),
    Condition("BPCO", 0.08, 0.4),
    Condition("Cancer", 0.1, 0.3),
    Condition("Chronic Kidney disease", 0.07, 0.5),
    Condition("RespiratoryFailure", 0.15, severity_effect=2.5),
    Condition("Obesity", 0.15),
    Condition("Position", 0.3, severity_effect=1.5),
)
"""``Position`` 1 = supine (more likely when severe)."""
BLANK_RANGE = (0.10, 0.30)
"""Share of blank cells per clinical column."""

# ----------------------------------------------------------------------------- faults
FAULTS: tuple[str, ...] = ("missing_file", "truncated_dicom", "rgb_dicom", "unlisted_file", "bad_label", "duplicate_id")
"""Each adds exactly one faulty AIforCOVID item (datasets.md §4.2 edge cases)."""
FAULT_DETAILS = {
    "missing_file": "listed in its sheet, no DICOM on disk",
    "truncated_dicom": "DICOM cut to half its bytes",
    "rgb_dicom": "valid DICOM with SamplesPerPixel 3 (RGB, 8 bits)",
    "unlisted_file": "DICOM on disk that no sheet lists",
    "bad_label": "Prognosis 'UNKNOWN' in its sheet",
    "duplicate_id": "its sheet row appears twice",
}
BAD_PROGNOSIS = "UNKNOWN"


class _Stream(enum.IntEnum):
    """Independent random streams: ``default_rng([seed, stream, index...])``."""

    PROFILES = 1
    BRIXIA_PLAN = 2
    AIFORCOVID_PLAN = 3
    BRIXIA_RENDER = 4
    AIFORCOVID_RENDER = 5
    PROGNOSIS = 6
    ANNOTATORS = 7
    CLINICAL = 8
    FAULTS = 9


def _rng(seed: int, stream: _Stream, *index: int) -> np.random.Generator:
    return np.random.default_rng([seed, int(stream), *index])


# ----------------------------------------------------------------------------- device profiles
@dataclass(frozen=True)
class DeviceProfile:
    """Acquisition of one AIforCOVID hospital or BrixIA vendor (drawn once from the seed)."""

    name: str
    manufacturers: tuple[str, ...]
    modality: str
    rows: int
    columns: int
    zoom: float
    gamma: float
    contrast: float
    offset: float
    noise_sd: float
    bits_stored: int
    transfer_syntax: str
    monochrome1_share: float


def _spread(options: Sequence, count: int, rng: np.random.Generator) -> list:
    """``count`` picks that use every option about equally often, in random order."""
    tiled = [options[i % len(options)] for i in range(count)]
    return [tiled[i] for i in rng.permutation(count)]


def _side(size: int, rng: np.random.Generator) -> int:
    return int(4 * round(size * rng.uniform(*SIDE_RANGE) / 4))


def draw_profiles(seed: int, image_size: int) -> dict[str, DeviceProfile]:
    """The six AIforCOVID hospital profiles (keys A–F) and one per BrixIA vendor group."""
    rng = _rng(seed, _Stream.PROFILES)
    hospital_vendors = [VENDORS[i] for i in rng.integers(0, 5, size=len(CENTERS))]
    owners = [(center, vendor.spellings[:1], vendor.modality) for center, vendor in zip(CENTERS, hospital_vendors)]
    owners += [(vendor.group, vendor.spellings, vendor.modality) for vendor in VENDORS]
    bits = _spread(BITS_STORED, len(owners), rng)
    syntaxes = _spread(TRANSFER_SYNTAXES, len(owners), rng)
    return {
        name: DeviceProfile(
            name=name,
            manufacturers=spellings,
            modality=modality,
            rows=_side(image_size, rng),
            columns=_side(image_size, rng),
            zoom=float(rng.uniform(*ZOOM_RANGE)),
            gamma=float(rng.uniform(*GAMMA_RANGE)),
            contrast=float(rng.uniform(*CONTRAST_RANGE)),
            offset=float(rng.uniform(*OFFSET_RANGE)),
            noise_sd=float(rng.uniform(*NOISE_RANGE)),
            bits_stored=int(bits[i]),
            transfer_syntax=syntaxes[i],
            monochrome1_share=float(rng.uniform(*MONOCHROME1_RANGE)),
        )
        for i, (name, spellings, modality) in enumerate(owners)
    }


# ----------------------------------------------------------------------------- phantom
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


def draw_anatomy(heart_size: float, rng: np.random.Generator) -> Anatomy:
    """Lung positions and radii jittered by 1–2 % around the prototype's geometry."""
    centre = rng.normal(0.0, LUNG_CENTRE_JITTER, size=(2, 2))
    radius = 1.0 + rng.normal(0.0, LUNG_RADIUS_JITTER, size=(2, 2))
    return Anatomy(
        lung_x=(LUNG_X[0] + centre[0, 0], LUNG_X[1] + centre[1, 0]),
        lung_y=(LUNG_Y + centre[0, 1], LUNG_Y + centre[1, 1]),
        lung_rx=(LUNG_RADII[0] * radius[0, 0], LUNG_RADII[0] * radius[1, 0]),
        lung_ry=(LUNG_RADII[1] * radius[0, 1], LUNG_RADII[1] * radius[1, 1]),
        heart_x=HEART_CENTRE[0] + float(rng.normal(0.0, LUNG_CENTRE_JITTER)),
        heart_size=float(heart_size),
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
    image = body * BODY_LEVEL + dense * DENSE_LEVEL + lung * (LUNG_LEVEL + RIB_AMPLITUDE * ribs.astype(np.float32))
    mask, coverage = _opacities(zones, severity, scale, rng)
    image += np.float32(opacity) * mask
    image = (np.clip(image, 0.0, 1.0) ** np.float32(profile.gamma) * np.float32(profile.contrast)
             + np.float32(profile.offset)
             + np.float32(profile.noise_sd) * _correlated_noise(image.shape, 0.5 * scale, rng))
    scores = np.searchsorted(SCORE_EDGES, coverage, side="right")
    return Rendered(np.clip(image, 0.0, 1.0).astype(np.float32), zones, coverage, scores)


def encode(image01: np.ndarray, bits_stored: int, monochrome1: bool) -> np.ndarray:
    """uint16 stored values over the ``bits_stored`` range; MONOCHROME1 stores the inverted values."""
    top = 2**bits_stored - 1
    stored = np.rint(image01 * top).astype(np.uint16)
    return (top - stored).astype(np.uint16) if monochrome1 else stored


# ----------------------------------------------------------------------------- plans
@dataclass
class ImagePlan:
    """Everything drawn before rendering one image (the truth row grows from it)."""

    dataset: str
    index: int
    image_id: str
    patient_id: str
    center: str
    profile: DeviceProfile
    manufacturer: str
    severity: float
    heart_size: float
    sex: str
    age: int
    study_date: str
    release: int = 0
    study_id: str = ""
    consensus: bool = False
    monochrome1: bool = False
    fault: str = ""

    @property
    def relative_path(self) -> str:
        """Path of the DICOM under the output root."""
        if self.dataset == "brixia":
            return f"{BRIXIA_DIR}/{IMAGE_DIR}/{self.image_id}.dcm"
        return f"{AIFORCOVID_DIR}/{RELEASE_FOLDERS[self.release]}/{self.image_id}.dcm"


def _largest_remainder(weights: Sequence[float], total: int, minimum: int = 0) -> list[int]:
    """Integer counts proportional to ``weights`` summing to ``total``; counts below ``minimum`` are raised
    by taking from the largest count, when ``total`` allows it."""
    weights = np.asarray(weights, dtype=float)
    share = weights / weights.sum() * total
    counts = np.floor(share).astype(int)
    for i in np.argsort(-(share - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    if total >= minimum * len(counts):
        for i in np.flatnonzero(counts < minimum):
            need = minimum - counts[i]
            counts[i] += need
            counts[np.argmax(counts)] -= need
    return counts.tolist()


def _assign_monochrome1(plans: Sequence[ImagePlan], rng: np.random.Generator) -> None:
    """Per profile, round(share × n) images (at least one and not all, when n ≥ 2) become MONOCHROME1."""
    by_profile: dict[str, list[ImagePlan]] = {}
    for plan in plans:
        by_profile.setdefault(plan.profile.name, []).append(plan)
    for name in sorted(by_profile):
        group = by_profile[name]
        share = group[0].profile.monochrome1_share
        count = min(max(round(share * len(group)), 1), len(group) - 1) if len(group) >= 2 else int(rng.random() < share)
        for i in rng.choice(len(group), size=count, replace=False):
            group[i].monochrome1 = True


def _date(day: int) -> str:
    return (date(2020, 3, 1) + timedelta(days=int(day))).strftime("%Y%m%d")


def _age(rng: np.random.Generator, mean: float) -> int:
    return int(np.clip(round(rng.normal(mean, 13.0)), 20, 98))


def plan_brixia(preset: SynthPreset, seed: int, profiles: Mapping[str, DeviceProfile]) -> list[ImagePlan]:
    """BrixIA images: subjects with 1+ follow-ups, 64-bit decimal ids, vendor mix of §1.5, a consensus subset."""
    rng = _rng(seed, _Stream.BRIXIA_PLAN)
    counts = _largest_remainder([v.real_images for v in VENDORS], preset.brixia_images)
    vendors = [vendor for vendor, count in zip(VENDORS, counts) for _ in range(count)]
    vendors = [vendors[i] for i in rng.permutation(len(vendors))]
    image_ids: list[str] = []
    while len(image_ids) < preset.brixia_images:
        candidate = str(rng.integers(10**15, 2**64, dtype=np.uint64))
        if candidate not in image_ids:
            image_ids.append(candidate)
    plans: list[ImagePlan] = []
    subjects: set[int] = set()
    while len(plans) < preset.brixia_images:
        subject = int(rng.integers(10**6, 10**7))
        if subject in subjects:
            continue
        subjects.add(subject)
        severity, heart = rng.beta(*SEVERITY_BETA), rng.beta(*HEART_BETA)
        sex, age, day = ("M" if rng.random() < 0.65 else "F"), _age(rng, 63.0), int(rng.integers(3, 25))
        for _ in range(min(1 + rng.poisson(0.8), preset.brixia_images - len(plans))):
            vendor = vendors[len(plans)]
            profile = profiles[vendor.group]
            plans.append(ImagePlan(
                dataset="brixia", index=len(plans), image_id=image_ids[len(plans)], patient_id=str(subject),
                center=vendor.group, profile=profile,
                manufacturer=vendor.spellings[int(rng.integers(len(vendor.spellings)))],
                severity=float(severity), heart_size=float(heart), sex=sex, age=age, study_date=_date(day),
                study_id=str(int(rng.integers(10**7, 10**8))),
            ))
            severity = float(np.clip(severity + rng.normal(0.0, FOLLOW_UP_DRIFT), 0.01, 0.99))
            day = min(day + int(rng.integers(1, 8)), 34)
    for i in rng.choice(len(plans), size=min(preset.brixia_consensus, len(plans)), replace=False):
        plans[i].consensus = True
    _assign_monochrome1(plans, rng)
    return plans


def plan_aiforcovid(preset: SynthPreset, seed: int, profiles: Mapping[str, DeviceProfile]) -> list[ImagePlan]:
    """AIforCOVID patients: per hospital, spread over its releases and id blocks like the real ones (§2.2)."""
    rng = _rng(seed, _Stream.AIFORCOVID_PLAN)
    plans: list[ImagePlan] = []
    for center in sorted(preset.aiforcovid):
        if center not in CENTERS:
            raise ConfigError(f"preset {preset.name!r}: hospital {center!r} is not one of {CENTERS}")
        blocks = [block for block in AIFORCOVID_BLOCKS if block.center == center]
        counts = _largest_remainder([b.real_patients for b in blocks], preset.aiforcovid[center], minimum=1)
        for block, count in zip(blocks, counts):
            available = block.available()
            if count > len(available):
                raise ConfigError(f"preset {preset.name!r}: {count} patients for hospital {center} release "
                                  f"{block.release} but only {len(available)} ids {block.prefix}<n> exist")
            for number in sorted(rng.choice(available, size=count, replace=False)):
                plans.append(_aiforcovid_plan(f"{block.prefix}{number}", center, block.release,
                                              profiles[center], len(plans), rng))
    _assign_monochrome1(plans, rng)
    return plans


def _aiforcovid_plan(image_id: str, center: str, release: int, profile: DeviceProfile, index: int,
                     rng: np.random.Generator) -> ImagePlan:
    return ImagePlan(
        dataset="aiforcovid", index=index, image_id=image_id, patient_id=image_id, center=center,
        profile=profile, manufacturer=profile.manufacturers[0], severity=float(rng.beta(*SEVERITY_BETA)),
        heart_size=float(rng.beta(*HEART_BETA)), sex="M" if rng.random() < 0.62 else "F", age=_age(rng, 67.0),
        study_date=_date(int(rng.integers(0, 75))), release=release,
    )


def _unused_aiforcovid_id(plans: Sequence[ImagePlan], rng: np.random.Generator) -> tuple[IdBlock, str]:
    """A release-1 id that no patient uses (for the ``unlisted_file`` fault)."""
    used = {plan.image_id for plan in plans}
    free = [(block, f"{block.prefix}{n}") for block in AIFORCOVID_BLOCKS if block.release == 1
            for n in block.available() if f"{block.prefix}{n}" not in used]
    return free[int(rng.integers(len(free)))]


def plan_faults(faults: Sequence[str], plans: list[ImagePlan], seed: int,
                profiles: Mapping[str, DeviceProfile]) -> None:
    """Mark one AIforCOVID patient per fault (distinct, fixed by the seed); ``unlisted_file`` adds one."""
    if faults and len(plans) < len(FAULTS):
        raise ConfigError(f"faults need at least {len(FAULTS)} AIforCOVID patients, the preset has {len(plans)}")
    rng = _rng(seed, _Stream.FAULTS)
    targets = rng.permutation(len(plans))
    for position, name in enumerate(FAULTS):
        if name not in faults:
            continue
        if name == "unlisted_file":
            block, image_id = _unused_aiforcovid_id(plans, rng)
            extra = _aiforcovid_plan(image_id, block.center, block.release, profiles[block.center], len(plans), rng)
            extra.fault = name
            plans.append(extra)
        else:
            plans[targets[position]].fault = name


# ----------------------------------------------------------------------------- labels
def assign_prognosis(z: np.ndarray, centers: Sequence[str],
                     rng: np.random.Generator) -> tuple[np.ndarray, dict[str, float]]:
    """SEVERE (1) / MILD (0) with P(SEVERE) = sigmoid(1.2 z + b_center + N(0, 0.5)).

    Drawn as ``1.2 z + N(0, 0.5) + Logistic(0, 1) > -b_center``, which is that Bernoulli draw; the
    intercept ``b_center`` is set per hospital so that exactly round(n × real SEVERE share) patients are
    SEVERE (datasets.md §2.2), which keeps both classes in every hospital even at the tiny preset.
    Returns the labels and the intercept of each hospital.
    """
    centers = np.asarray(centers)
    latent = PROGNOSIS_SLOPE * z + rng.normal(0.0, PROGNOSIS_NOISE, size=len(z)) + rng.logistic(0.0, 1.0, size=len(z))
    labels = np.zeros(len(z), dtype=int)
    intercepts: dict[str, float] = {}
    for center in sorted(set(centers.tolist())):
        members = np.flatnonzero(centers == center)
        severe = int(round(SEVERE_RATE[center] * len(members)))
        order = members[np.argsort(-latent[members], kind="stable")]
        labels[order[:severe]] = 1
        ranked = latent[order]
        upper = ranked[severe - 1] if severe > 0 else ranked[0] + 1.0
        lower = ranked[severe] if severe < len(members) else ranked[-1] - 1.0
        intercepts[center] = float(-(upper + lower) / 2.0)
    return labels, intercepts


def _standardise(values: np.ndarray) -> np.ndarray:
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


def clinical_table(plans: Sequence[ImagePlan], prognosis: np.ndarray, rng: np.random.Generator) -> pd.DataFrame:
    """Clinical columns of datasets.md §2.3 drawn from severity, age and outcome, with 10–30 % blanks."""
    severity = np.array([plan.severity for plan in plans])
    age = np.array([plan.age for plan in plans], dtype=float)
    n = len(plans)
    columns: dict[str, pd.Series] = {
        "Age": pd.Series(age.astype(int), dtype="Int64"),
        "Sex": pd.Series([int(plan.sex == "M") for plan in plans], dtype="Int64"),
    }
    for item in MEASUREMENTS:
        values = np.clip(rng.normal(item.mean + item.severity_effect * severity, item.sd), item.low, item.high)
        rounded = np.round(values, item.decimals) if item.decimals else np.rint(values).astype(int)
        columns[item.name] = pd.Series(rounded, dtype=float if item.decimals else "Int64")
    for item in CONDITIONS:
        logit = (np.log(item.base / (1 - item.base)) + item.per_decade * (age - 65.0) / 10.0
                 + item.severity_effect * (severity - SEVERITY_MEAN))
        columns[item.name] = pd.Series((rng.random(n) < expit(logit)).astype(int), dtype="Int64")
    columns["Death"] = pd.Series(((prognosis == 1) & (rng.random(n) < DEATH_GIVEN_SEVERE)).astype(int), dtype="Int64")
    table = pd.DataFrame(columns)
    for name in table.columns:
        blank = rng.random(n) < rng.uniform(*BLANK_RANGE)
        table.loc[blank, name] = pd.NA
    return table


# ----------------------------------------------------------------------------- writers
def _uid(seed: int, *parts: str) -> str:
    return str(generate_uid(entropy_srcs=["mdmt-synthetic", str(GENERATOR_VERSION), str(seed), *parts]))


def write_dicom(path: Path, pixels: np.ndarray, plan: ImagePlan, seed: int, *, photometric: str,
                bits_stored: int, transfer_syntax: str) -> None:
    """One valid DICOM (datasets.md §3.3) with header facts consistent with the sheets and fixed UIDs."""
    sop_class = SOP_CLASSES[plan.profile.modality]
    instance = _uid(seed, plan.dataset, plan.image_id, "instance")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, instance
    ds.StudyInstanceUID = _uid(seed, plan.dataset, plan.image_id, "study")
    ds.SeriesInstanceUID = _uid(seed, plan.dataset, plan.image_id, "series")
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = plan.study_date
    ds.StudyTime = "120000"
    ds.StudyID = plan.study_id or "1"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Modality = plan.profile.modality
    ds.Manufacturer = plan.manufacturer
    ds.ManufacturerModelName = f"SYNTHETIC {plan.profile.modality} {plan.profile.name}"
    ds.InstitutionName = f"Hospital {plan.center}" if plan.dataset == "aiforcovid" else "Brescia (synthetic)"
    ds.PatientID = plan.patient_id
    ds.PatientSex = plan.sex
    ds.PatientAge = f"{plan.age:03d}Y"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "AP" if plan.profile.modality == "DX" else "PA"
    spacing = f"{DETECTOR_MM / pixels.shape[1]:.4f}"
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.set_pixel_data(np.ascontiguousarray(pixels), photometric, bits_stored, generate_instance_uid=False)
    if photometric.startswith("MONOCHROME"):
        ds.WindowCenter, ds.WindowWidth = 2 ** (bits_stored - 1), 2**bits_stored
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    if transfer_syntax == RLELossless:
        ds.compress(RLELossless, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


_XLSX_TIMESTAMP = re.compile(rb"(<dcterms:(?:created|modified)[^>]*>)[^<]*(</dcterms:)")
_FIXED_TIME = (2020, 6, 1, 0, 0, 0)


def write_xlsx(table: pd.DataFrame, path: Path) -> None:
    """The table as the first sheet of ``path``, byte-identical for the same table (fixed zip and core times)."""
    buffer = io.BytesIO()
    table.to_excel(buffer, index=False, engine="openpyxl")
    with zipfile.ZipFile(buffer) as source, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename == "docProps/core.xml":
                data = _XLSX_TIMESTAMP.sub(rb"\g<1>2020-06-01T00:00:00Z\g<2>", data)
            target.writestr(zipfile.ZipInfo(info.filename, date_time=_FIXED_TIME), data, zipfile.ZIP_DEFLATED)


# ----------------------------------------------------------------------------- summary
@dataclass
class InjectedFault:
    """One planted fault: which, where, and what a reader should see."""

    name: str
    dataset: str
    image_id: str
    path: str
    detail: str


@dataclass
class SynthSummary:
    """What ``generate`` wrote."""

    out: Path
    preset: str
    seed: int
    decoupled: bool
    opacity: float
    images: dict[str, dict[str, int]]
    """DICOM files on disk per dataset and center (AIforCOVID hospital / BrixIA vendor group)."""
    class_balance: dict[str, tuple[int, int]]
    """AIforCOVID (MILD, SEVERE) patients per hospital, as listed in the sheets."""
    brixia_global_mean: float
    seconds: float
    faults: list[InjectedFault] = field(default_factory=list)

    def table(self) -> Table:
        """A rich table of counts per dataset and center, class balance and faults."""
        table = Table(title=f"synthetic twin '{self.preset}' seed {self.seed}"
                            f"{' (decoupled)' if self.decoupled else ''}, opacity {self.opacity:g},"
                            f" {self.seconds:.1f} s")
        for column in ("dataset", "center", "images", "MILD / SEVERE"):
            table.add_column(column)
        for dataset, centers in self.images.items():
            for center, count in centers.items():
                balance = self.class_balance.get(center) if dataset == "aiforcovid" else None
                table.add_row(dataset, center, str(count), f"{balance[0]} / {balance[1]}" if balance else "")
        table.caption = (f"BrixIA mean global score {self.brixia_global_mean:.2f}; faults: "
                         + (", ".join(f"{f.name} ({f.image_id})" for f in self.faults) or "none"))
        return table


# ----------------------------------------------------------------------------- generate
def _resolve_preset(preset: str | SynthPreset) -> SynthPreset:
    if isinstance(preset, SynthPreset):
        return preset
    if preset not in PRESETS:
        raise ConfigError(f"unknown synthetic preset {preset!r}; known: {sorted(PRESETS)}")
    return PRESETS[preset]


def _check_preset(spec: SynthPreset) -> None:
    if spec.image_size < 32 or spec.brixia_images < 1 or not 0 <= spec.brixia_consensus <= spec.brixia_images:
        raise ConfigError(f"preset {spec.name!r}: needs image_size >= 32, brixia_images >= 1 and "
                          f"0 <= brixia_consensus <= brixia_images")
    if not spec.aiforcovid or min(spec.aiforcovid.values()) < 1:
        raise ConfigError(f"preset {spec.name!r}: every AIforCOVID hospital needs at least one patient")


def _prepare_out(out: Path) -> None:
    """Remove a previous synthetic twin in ``out``; refuse to write over anything else."""
    if (out / TRUTH_DIR / PARAMS_FILE).is_file():
        for name in (BRIXIA_DIR, AIFORCOVID_DIR, TRUTH_DIR):
            shutil.rmtree(out / name, ignore_errors=True)
    else:
        clashes = [name for name in (BRIXIA_DIR, AIFORCOVID_DIR, TRUTH_DIR) if (out / name).exists()]
        if clashes:
            raise ConfigError(f"{out}: {clashes} exist but were not written by the synthetic generator "
                              f"(no {TRUTH_DIR}/{PARAMS_FILE}); choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)


def _write_image(plan: ImagePlan, rendered: Rendered, out: Path, seed: int) -> dict[str, object]:
    """Write the DICOM (applying the plan's file fault) and the zone mask; return the truth facts."""
    path = out / plan.relative_path
    profile = plan.profile
    photometric = "MONOCHROME1" if plan.monochrome1 else "MONOCHROME2"
    bits, syntax = profile.bits_stored, profile.transfer_syntax
    if plan.fault == "rgb_dicom":
        gray = np.rint(rendered.image * 255).astype(np.uint8)
        pixels = np.stack([gray, gray, np.rint(gray * 0.85).astype(np.uint8)], axis=-1)
        photometric, bits, syntax = "RGB", 8, str(ExplicitVRLittleEndian)
    else:
        pixels = encode(rendered.image, bits, plan.monochrome1)
    if plan.fault != "missing_file":
        write_dicom(path, pixels, plan, seed, photometric=photometric, bits_stored=bits, transfer_syntax=syntax)
    if plan.fault == "truncated_dicom":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    mask_path = out / TRUTH_DIR / "masks" / plan.dataset / f"{plan.image_id}.png"
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rendered.zones * ZONE_MASK_STEP).astype(np.uint8)).save(mask_path)
    x0, y0, x1, y1 = rendered.lung_box()
    return {
        "photometric": photometric, "bits_stored": bits, "transfer_syntax": syntax,
        "rows": profile.rows, "columns": profile.columns, "x0": x0, "y0": y0, "x1": x1, "y1": y1,
        **{f"coverage_{r}": round(float(c), 4) for r, c in zip(REGIONS, rendered.coverage)},
        **{f"true_{r}": int(s) for r, s in zip(REGIONS, rendered.scores)},
        "true_global": int(rendered.scores.sum()),
    }


def _truth_base(plan: ImagePlan) -> dict[str, object]:
    return {"image_id": plan.image_id, "patient_id": plan.patient_id, "center": plan.center,
            "profile": plan.profile.name, "manufacturer": plan.manufacturer, "path": plan.relative_path,
            "s": round(plan.severity, 4), "h": round(plan.heart_size, 4), "fault": plan.fault}


def _score_text(scores: np.ndarray) -> list[str]:
    return ["".join(str(int(v)) for v in row) for row in scores]


def _write_brixia(plans: Sequence[ImagePlan], truth: pd.DataFrame, out: Path, seed: int) -> pd.DataFrame:
    """metadata_global_v2.csv (';', BOM) and metadata_consensus_v1.csv; returns the truth with labels."""
    true_scores = truth[[f"true_{r}" for r in REGIONS]].to_numpy()
    labels = annotate(true_scores, _rng(seed, _Stream.ANNOTATORS, 0), ANNOTATOR_SLIP)
    metadata = pd.DataFrame({
        "Filename": [f"{p.image_id}.dcm" for p in plans],
        "StudyDate": [p.study_date for p in plans],
        "Modality": [p.profile.modality for p in plans],
        "StudyId": [p.study_id for p in plans],
        "Subject": [p.patient_id for p in plans],
        "Sex": [p.sex for p in plans],
        "AgeAtStudyDateFiveYear": [p.age // 5 for p in plans],
        "BrixiaScore": _score_text(labels),
        "BrixiaScoreGlobal": labels.sum(axis=1),
        "ConsensusTestset": [int(p.consensus) for p in plans],
        "Manufacturer": [p.manufacturer for p in plans],
        "PhotometricInterpretation": truth["photometric"].to_numpy(),
        "Rows": truth["rows"].to_numpy(),
        "Columns": truth["columns"].to_numpy(),
    })
    root = out / BRIXIA_DIR
    metadata.to_csv(root / BRIXIA_METADATA, sep=";", index=False, encoding="utf-8-sig")
    chosen = np.flatnonzero([p.consensus for p in plans])
    consensus = consensus_table([plans[i].image_id for i in chosen], true_scores[chosen],
                                _rng(seed, _Stream.ANNOTATORS, 1))
    consensus.to_csv(root / CONSENSUS_FILE, index=False)
    truth = truth.copy()
    for k, region in enumerate(REGIONS):
        truth[f"label_{region}"] = labels[:, k]
    truth["label_global"] = labels.sum(axis=1)
    truth["label_text"] = metadata["BrixiaScore"].to_numpy()
    truth["consensus"] = [int(p.consensus) for p in plans]
    return truth


def _write_aiforcovid(plans: Sequence[ImagePlan], truth: pd.DataFrame, out: Path, seed: int,
                      decoupled: bool) -> tuple[pd.DataFrame, dict[str, float]]:
    """The three release sheets; returns the truth with z, prognosis and the hospitals' intercepts.

    Only the listed patients (all but an ``unlisted_file``) enter z, the prognosis draw and the clinical
    draw, so that fault changes no other patient's row.
    """
    listed = np.array([p.fault != "unlisted_file" for p in plans])
    patients = [p for p, keep in zip(plans, listed) if keep]
    cue = truth.loc[listed, "h" if decoupled else "true_global"].to_numpy(float)
    z = _standardise(cue)
    prognosis, intercepts = assign_prognosis(z, [p.center for p in patients], _rng(seed, _Stream.PROGNOSIS))
    outcome = np.where(prognosis == 1, "SEVERE", "MILD")
    sheet = pd.concat([pd.DataFrame({"ImageFile": [p.image_id for p in patients],
                                     "Hospital": [p.center for p in patients]}),
                       clinical_table(patients, prognosis, _rng(seed, _Stream.CLINICAL))], axis=1)
    sheet.insert(len(sheet.columns) - 1, "Prognosis", outcome)
    faults = np.array([p.fault for p in patients])
    sheet.loc[faults == "bad_label", "Prognosis"] = BAD_PROGNOSIS
    releases = np.array([p.release for p in patients])
    for release, sheet_name in RELEASE_SHEETS.items():
        rows = [i for i in np.flatnonzero(releases == release) for _ in range(1 + (faults[i] == "duplicate_id"))]
        write_xlsx(sheet.iloc[rows].reset_index(drop=True), out / AIFORCOVID_DIR / sheet_name)
    truth = truth.copy()
    truth["release"] = [p.release for p in plans]
    truth["z"], truth["prognosis"], truth["prognosis_intercept"] = np.nan, "", np.nan
    truth.loc[listed, "z"] = np.round(z, 4)
    truth.loc[listed, "prognosis"] = outcome
    truth.loc[listed, "prognosis_intercept"] = [round(intercepts[p.center], 4) for p in patients]
    return truth, intercepts


def generate(out: str | Path, preset: str | SynthPreset = "small", seed: int = 0, decoupled: bool = False,
             faults: Sequence[str] = (), opacity: float | None = None, progress: bool = True) -> SynthSummary:
    """Write the synthetic BrixIA + AIforCOVID twin under ``out`` (layout of datasets.md §4.2).

    ``preset`` is a name of ``PRESETS`` or a ``SynthPreset``; ``opacity`` overrides its opacity strength
    (0.19 by default; the prototype's "subtle" setting is 0.14). ``decoupled`` makes prognosis follow the
    heart size instead of the lung severity (negative control; the images stay the same). Each name in
    ``faults`` (see ``FAULTS``) plants exactly one faulty AIforCOVID item. A previous twin in ``out`` is
    replaced; other data there is never overwritten.
    """
    start = time.perf_counter()
    spec = _resolve_preset(preset)
    _check_preset(spec)
    unknown = sorted(set(faults) - set(FAULTS))
    if unknown:
        raise ConfigError(f"unknown synthetic fault(s) {unknown}; known: {list(FAULTS)}")
    if int(seed) != seed or seed < 0:
        raise ConfigError(f"synthetic seed must be a non-negative integer, got {seed!r}")
    strength = spec.opacity if opacity is None else float(opacity)
    if strength < 0:
        raise ConfigError(f"synthetic opacity must be >= 0, got {strength}")
    seed, out = int(seed), Path(out)
    _prepare_out(out)
    for folder in (f"{BRIXIA_DIR}/{IMAGE_DIR}", *(f"{AIFORCOVID_DIR}/{f}" for f in RELEASE_FOLDERS.values())):
        (out / folder).mkdir(parents=True, exist_ok=True)

    profiles = draw_profiles(seed, spec.image_size)
    brixia = plan_brixia(spec, seed, profiles)
    aiforcovid = plan_aiforcovid(spec, seed, profiles)
    plan_faults(faults, aiforcovid, seed, profiles)
    rows: dict[str, list[dict[str, object]]] = {"brixia": [], "aiforcovid": []}
    streams = {"brixia": _Stream.BRIXIA_RENDER, "aiforcovid": _Stream.AIFORCOVID_RENDER}
    for plan in progress_bar([*brixia, *aiforcovid], "synthetic images", enabled=progress):
        rng = _rng(seed, streams[plan.dataset], plan.index)
        rendered = render(draw_anatomy(plan.heart_size, rng), plan.severity, plan.profile, strength, rng)
        rows[plan.dataset].append(_truth_base(plan) | _write_image(plan, rendered, out, seed))

    brixia_truth = _write_brixia(brixia, pd.DataFrame(rows["brixia"]), out, seed)
    afc_truth, intercepts = _write_aiforcovid(aiforcovid, pd.DataFrame(rows["aiforcovid"]), out, seed, decoupled)
    truth_dir = out / TRUTH_DIR
    brixia_truth.to_csv(truth_dir / "brixia.csv", index=False)
    afc_truth.to_csv(truth_dir / "aiforcovid.csv", index=False)
    profile_table = pd.DataFrame([asdict(p) | {"manufacturers": "|".join(p.manufacturers)} for p in profiles.values()])
    profile_table.round(4).to_csv(truth_dir / "profiles.csv", index=False)

    injected = [InjectedFault(p.fault, p.dataset, p.image_id, p.relative_path, FAULT_DETAILS[p.fault])
                for p in aiforcovid if p.fault]
    params = {"generator_version": GENERATOR_VERSION, "preset": asdict(spec),
              "seed": seed, "decoupled": decoupled, "opacity": strength, "faults": sorted(set(faults)),
              "prognosis_intercepts": {c: round(b, 4) for c, b in intercepts.items()}}
    (truth_dir / PARAMS_FILE).write_text(json.dumps(params, indent=2) + "\n")

    on_disk = {name: truth[truth["fault"] != "missing_file"] for name, truth in
               (("brixia", brixia_truth), ("aiforcovid", afc_truth))}
    listed = afc_truth[afc_truth["prognosis"] != ""]
    balance = {c: (int((g["prognosis"] == "MILD").sum()), int((g["prognosis"] == "SEVERE").sum()))
               for c, g in listed.groupby("center")}
    return SynthSummary(
        out=out, preset=spec.name, seed=seed, decoupled=decoupled, opacity=strength,
        images={name: {str(c): int(n) for c, n in t["center"].value_counts().sort_index().items()}
                for name, t in on_disk.items()},
        class_balance=balance, brixia_global_mean=float(brixia_truth["label_global"].mean()),
        seconds=time.perf_counter() - start, faults=injected,
    )
