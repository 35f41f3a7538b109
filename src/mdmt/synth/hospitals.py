"""The hospitals: AIforCOVID's six (A–F) with their real id blocks and outcome rates, and the cohort's two (G, H).

AIforCOVID names each image by its patient: release 1 uses ``P_<n>`` with one block of numbers per
hospital, release 2 ``P_1_<n>`` (hospital F) and ``P_2_<n>`` (hospital C), release 3 ``P_3_<n>``
(hospital F). A few ids of the real releases are on the official exclusion list and are never used.
"""

from __future__ import annotations

from dataclasses import dataclass

from mdmt.sources.aiforcovid import KNOWN_BAD_IDS as AIFORCOVID_KNOWN_BAD_IDS
from mdmt.sources.aiforcovid import RELEASES


@dataclass(frozen=True)
class IdBlock:
    """AIforCOVID ids of one center in one release: ``prefix + number``."""

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
"""Share of SEVERE per AIforCOVID hospital over all releases, as in the real sheets."""
RELEASE_FOLDERS = {release: folder for release, folder, _ in RELEASES}
RELEASE_SHEETS = {release: sheet for release, _, sheet in RELEASES}

COHORT_CENTERS = ("G", "H")
COHORT_SEVERE_RATE = {"G": 0.45, "H": 0.38}
"""Share of SEVERE in the cohort's two hospitals (close to AIforCOVID's overall 0.47)."""


def real_patients(center: str) -> int:
    """Patients of one AIforCOVID hospital over all real releases."""
    return sum(block.real_patients for block in AIFORCOVID_BLOCKS if block.center == center)
