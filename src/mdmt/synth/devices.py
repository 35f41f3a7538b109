"""Device profiles: the acquisition of each hospital and BrixIA vendor, drawn once from the seed.

A profile changes only how a phantom is acquired and stored: image size and aspect, field of view,
gamma, contrast, offset, noise, bits stored, the share of MONOCHROME1 files and the transfer syntax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from mdmt.synth.hospitals import CENTERS, COHORT_CENTERS
from mdmt.synth.layout import Stream, stream_rng

BITS_STORED = (10, 12, 14, 16)
TRANSFER_SYNTAXES = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian), str(RLELossless))
SIDE_RANGE = (0.875, 1.25)
"""Rows and columns of a profile = preset size × U(SIDE_RANGE), a multiple of 4."""
ZOOM_RANGE, GAMMA_RANGE, CONTRAST_RANGE = (0.92, 1.08), (0.75, 1.3), (0.75, 1.25)
OFFSET_RANGE, NOISE_RANGE, MONOCHROME1_RANGE = (-0.08, 0.08), (0.02, 0.07), (0.15, 0.85)


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
"""BrixIA's vendor mix (images per vendor in the real release); hospitals draw their vendor from the first five."""
HOSPITAL_VENDORS = 5


@dataclass(frozen=True)
class DeviceProfile:
    """Acquisition of one hospital or BrixIA vendor (drawn once from the seed)."""

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
    """``count`` picks that use every option about equally often, in random order (from a random first
    option when there are fewer picks than options)."""
    start = int(rng.integers(len(options))) if count < len(options) else 0
    tiled = [options[(start + i) % len(options)] for i in range(count)]
    return [tiled[i] for i in rng.permutation(count)]


def _side(size: int, rng: np.random.Generator) -> int:
    return int(4 * round(size * rng.uniform(*SIDE_RANGE) / 4))


def _hospital_owners(centers: Sequence[str], rng: np.random.Generator) -> list[tuple[str, tuple[str, ...], str]]:
    """(name, manufacturer spellings, modality) of each hospital, its vendor drawn from the first five."""
    vendors = [VENDORS[i] for i in rng.integers(0, HOSPITAL_VENDORS, size=len(centers))]
    return [(center, vendor.spellings[:1], vendor.modality) for center, vendor in zip(centers, vendors)]


def _draw(owners: Sequence[tuple[str, tuple[str, ...], str]], image_size: int,
          rng: np.random.Generator) -> dict[str, DeviceProfile]:
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


def draw_profiles(seed: int, image_size: int) -> dict[str, DeviceProfile]:
    """The six AIforCOVID hospital profiles (keys A–F) and one per BrixIA vendor group."""
    rng = stream_rng(seed, Stream.PROFILES)
    owners = _hospital_owners(CENTERS, rng) + [(v.group, v.spellings, v.modality) for v in VENDORS]
    return _draw(owners, image_size, rng)


def draw_cohort_profiles(seed: int, image_size: int) -> dict[str, DeviceProfile]:
    """The profiles of the cohort's hospitals (keys G, H), from a stream of their own."""
    rng = stream_rng(seed, Stream.COHORT_PROFILES)
    return _draw(_hospital_owners(COHORT_CENTERS, rng), image_size, rng)
