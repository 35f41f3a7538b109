"""Planted faults: each adds exactly one faulty AIforCOVID item, the edge cases a reader must survive."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from mdmt.errors import ConfigError
from mdmt.synth.devices import DeviceProfile
from mdmt.synth.hospitals import AIFORCOVID_BLOCKS, IdBlock
from mdmt.synth.layout import Stream, stream_rng
from mdmt.synth.plans import ImagePlan, patient_plan

FAULTS: tuple[str, ...] = ("missing_file", "truncated_dicom", "rgb_dicom", "unlisted_file", "bad_label", "duplicate_id")
"""Each adds exactly one faulty AIforCOVID item."""
FAULT_DETAILS = {
    "missing_file": "listed in its sheet, no DICOM on disk",
    "truncated_dicom": "DICOM cut to half its bytes",
    "rgb_dicom": "valid DICOM with SamplesPerPixel 3 (RGB, 8 bits)",
    "unlisted_file": "DICOM on disk that no sheet lists",
    "bad_label": "Prognosis 'UNKNOWN' in its sheet",
    "duplicate_id": "its sheet row appears twice",
}
BAD_PROGNOSIS = "UNKNOWN"


@dataclass
class InjectedFault:
    """One planted fault: which, where, and what a reader should see."""

    name: str
    dataset: str
    image_id: str
    path: str
    detail: str


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
    rng = stream_rng(seed, Stream.FAULTS)
    targets = rng.permutation(len(plans))
    for position, name in enumerate(FAULTS):
        if name not in faults:
            continue
        if name == "unlisted_file":
            block, image_id = _unused_aiforcovid_id(plans, rng)
            extra = patient_plan("aiforcovid", image_id, image_id, block.center, block.release,
                                 profiles[block.center], len(plans), rng)
            extra.fault = name
            plans.append(extra)
        else:
            plans[targets[position]].fault = name


def injected_faults(plans: Sequence[ImagePlan]) -> list[InjectedFault]:
    """The faults planted in ``plans``, with what a reader should see."""
    return [InjectedFault(p.fault, p.dataset, p.image_id, p.relative_path, FAULT_DETAILS[p.fault])
            for p in plans if p.fault]
