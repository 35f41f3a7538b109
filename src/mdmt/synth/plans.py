"""Plans: everything drawn for an image before it is rendered (who, where, which device, which latents).

BrixIA has subjects with follow-up films, 64-bit decimal ids and BrixIA's vendor mix; AIforCOVID has one
film per patient, spread over each hospital's releases and id blocks like the real ones; the cohort has
one film per patient from hospitals G and H.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np

from mdmt.errors import ConfigError
from mdmt.sources.brixia import IMAGE_DIR
from mdmt.synth.anatomy import HEART_BETA, SEVERITY_BETA
from mdmt.synth.devices import VENDORS, DeviceProfile
from mdmt.synth.hospitals import AIFORCOVID_BLOCKS, CENTERS, RELEASE_FOLDERS
from mdmt.synth.layout import (
    AIFORCOVID_DIR,
    BRIXIA_DIR,
    COHORT_DIR,
    COHORT_IMAGES,
    Stream,
    stream_rng,
)
from mdmt.synth.presets import SynthPreset, cohort_sizes

FOLLOW_UP_DRIFT = 0.08
"""Severity random-walk step between a BrixIA subject's images."""
COHORT_PATIENT_NUMBERS = 10**5
"""Cohort patients are ``<center><5 digits>``; their single film is ``<patient>_1``."""


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
        if self.dataset == "cohort":
            return f"{COHORT_DIR}/{COHORT_IMAGES}/{self.image_id}.dcm"
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
    """BrixIA images: subjects with 1+ follow-ups, 64-bit decimal ids, the vendor mix, a consensus subset."""
    rng = stream_rng(seed, Stream.BRIXIA_PLAN)
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


def patient_plan(dataset: str, image_id: str, patient_id: str, center: str, release: int,
                 profile: DeviceProfile, index: int, rng: np.random.Generator) -> ImagePlan:
    """A hospital patient's single film: latents, sex, age and study date drawn from ``rng``."""
    return ImagePlan(
        dataset=dataset, index=index, image_id=image_id, patient_id=patient_id, center=center,
        profile=profile, manufacturer=profile.manufacturers[0], severity=float(rng.beta(*SEVERITY_BETA)),
        heart_size=float(rng.beta(*HEART_BETA)), sex="M" if rng.random() < 0.62 else "F", age=_age(rng, 67.0),
        study_date=_date(int(rng.integers(0, 75))), release=release,
    )


def plan_aiforcovid(preset: SynthPreset, seed: int, profiles: Mapping[str, DeviceProfile]) -> list[ImagePlan]:
    """AIforCOVID patients: per hospital, spread over its releases and id blocks like the real ones."""
    rng = stream_rng(seed, Stream.AIFORCOVID_PLAN)
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
                image_id = f"{block.prefix}{number}"
                plans.append(patient_plan("aiforcovid", image_id, image_id, center, block.release,
                                          profiles[center], len(plans), rng))
    _assign_monochrome1(plans, rng)
    return plans


def plan_cohort(preset: SynthPreset, seed: int, profiles: Mapping[str, DeviceProfile]) -> list[ImagePlan]:
    """Cohort patients of hospitals G and H (sizes from ``cohort_sizes``), one film each."""
    rng = stream_rng(seed, Stream.COHORT_PLAN)
    plans: list[ImagePlan] = []
    for center, count in cohort_sizes(preset).items():
        for number in sorted(rng.choice(COHORT_PATIENT_NUMBERS, size=count, replace=False)):
            patient = f"{center}{number:05d}"
            plans.append(patient_plan("cohort", f"{patient}_1", patient, center, 0, profiles[center], len(plans), rng))
    _assign_monochrome1(plans, rng)
    return plans
