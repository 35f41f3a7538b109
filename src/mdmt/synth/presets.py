"""Sizes of a generated twin: the named presets and their checks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from mdmt.errors import ConfigError
from mdmt.synth.anatomy import DEFAULT_OPACITY
from mdmt.synth.hospitals import CENTERS, COHORT_CENTERS, real_patients


@dataclass(frozen=True)
class SynthPreset:
    """Sizes of one generated twin: image side (px), BrixIA images and consensus subset, AIforCOVID patients."""

    name: str
    image_size: int
    brixia_images: int
    brixia_consensus: int
    aiforcovid: Mapping[str, int]
    """Patients per hospital; each hospital's patients are spread over its releases like the real ones."""
    opacity: float = DEFAULT_OPACITY


PRESETS: dict[str, SynthPreset] = {
    "tiny": SynthPreset("tiny", 128, 48, 6, dict.fromkeys(CENTERS, 6)),
    "small": SynthPreset("small", 256, 600, 20, {"A": 40, "B": 35, "C": 50, "D": 45, "E": 35, "F": 95}),
    "medium": SynthPreset("medium", 256, 2000, 60, {c: real_patients(c) for c in CENTERS}),
}


def resolve_preset(preset: str | SynthPreset) -> SynthPreset:
    """The preset itself, or the one of ``PRESETS`` with that name."""
    if isinstance(preset, SynthPreset):
        return preset
    if preset not in PRESETS:
        raise ConfigError(f"unknown synthetic preset {preset!r}; known: {sorted(PRESETS)}")
    return PRESETS[preset]


def check_preset(spec: SynthPreset) -> None:
    """Raise a ConfigError for sizes the generator cannot write."""
    if spec.image_size < 32 or spec.brixia_images < 1 or not 0 <= spec.brixia_consensus <= spec.brixia_images:
        raise ConfigError(f"preset {spec.name!r}: needs image_size >= 32, brixia_images >= 1 and "
                          f"0 <= brixia_consensus <= brixia_images")
    if not spec.aiforcovid or min(spec.aiforcovid.values()) < 1:
        raise ConfigError(f"preset {spec.name!r}: every AIforCOVID hospital needs at least one patient")


def cohort_sizes(spec: SynthPreset) -> dict[str, int]:
    """Patients per cohort hospital: half the preset's AIforCOVID patients, shared evenly by G and H."""
    total = max(sum(spec.aiforcovid.values()) // 2, len(COHORT_CENTERS))
    share, extra = divmod(total, len(COHORT_CENTERS))
    return {center: share + (i < extra) for i, center in enumerate(COHORT_CENTERS)}
