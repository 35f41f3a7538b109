"""The label tables of each dataset, in its real format, and the label columns of its truth file.

BrixIA: ``metadata_global_v2.csv`` (``;``-separated, UTF-8 with BOM, Brixia score as six digits) and
``metadata_consensus_v1.csv``. AIforCOVID: one XLSX sheet per release (image id, hospital, clinical
columns, Prognosis). The cohort: ``COHORT/manifest.csv``, the generic table a user would have, with
``image, patient, center, outcome, brixia_A..brixia_F, brixia_global``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mdmt.sources.brixia import CONSENSUS_FILE
from mdmt.synth.clinical_columns import clinical_table
from mdmt.synth.faults import BAD_PROGNOSIS
from mdmt.synth.hospitals import COHORT_SEVERE_RATE, RELEASE_SHEETS, SEVERE_RATE
from mdmt.synth.labels import (
    ANNOTATOR_SLIP,
    annotate,
    assign_prognosis,
    consensus_table,
    standardise,
)
from mdmt.synth.layout import (
    AIFORCOVID_DIR,
    BRIXIA_DIR,
    BRIXIA_METADATA,
    COHORT_DIR,
    COHORT_MANIFEST,
    Stream,
    stream_rng,
)
from mdmt.synth.plans import ImagePlan
from mdmt.synth.writers import write_xlsx
from mdmt.tasks import REGIONS

TRUE_COLUMNS = [f"true_{r}" for r in REGIONS]


@dataclass(frozen=True)
class _Prognosis:
    """One prognosis draw: the standardised cue ``z``, the 0/1 labels and each hospital's intercept."""

    centers: list[str]
    z: np.ndarray
    labels: np.ndarray
    intercepts: dict[str, float]

    @property
    def outcome(self) -> np.ndarray:
        """The labels as the sheets write them."""
        return np.where(self.labels == 1, "SEVERE", "MILD")


def _draw_prognosis(truth: pd.DataFrame, decoupled: bool, rng: np.random.Generator,
                    rates: Mapping[str, float]) -> _Prognosis:
    """Prognosis of the patients in ``truth`` from their true global score (heart size when ``decoupled``)."""
    z = standardise(truth["h" if decoupled else "true_global"].to_numpy(float))
    centers = truth["center"].tolist()
    labels, intercepts = assign_prognosis(z, centers, rng, rates)
    return _Prognosis(centers, z, labels, intercepts)


def _add_prognosis(truth: pd.DataFrame, listed: np.ndarray, drawn: _Prognosis) -> None:
    """Columns z, prognosis and prognosis_intercept (blank on rows that are not ``listed``)."""
    truth["z"], truth["prognosis"], truth["prognosis_intercept"] = np.nan, "", np.nan
    truth.loc[listed, "z"] = np.round(drawn.z, 4)
    truth.loc[listed, "prognosis"] = drawn.outcome
    truth.loc[listed, "prognosis_intercept"] = [round(drawn.intercepts[c], 4) for c in drawn.centers]


def _with_labels(truth: pd.DataFrame, labels: np.ndarray) -> pd.DataFrame:
    """A copy of ``truth`` with the rater labels label_A..F and label_global."""
    truth = truth.copy()
    for k, region in enumerate(REGIONS):
        truth[f"label_{region}"] = labels[:, k]
    truth["label_global"] = labels.sum(axis=1)
    return truth


def _score_text(scores: np.ndarray) -> list[str]:
    return ["".join(str(int(v)) for v in row) for row in scores]


def write_brixia_tables(plans: Sequence[ImagePlan], truth: pd.DataFrame, out: Path, seed: int) -> pd.DataFrame:
    """metadata_global_v2.csv (';', BOM) and metadata_consensus_v1.csv; returns the truth with labels."""
    true_scores = truth[TRUE_COLUMNS].to_numpy()
    labels = annotate(true_scores, stream_rng(seed, Stream.ANNOTATORS, 0), ANNOTATOR_SLIP)
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
                                stream_rng(seed, Stream.ANNOTATORS, 1))
    consensus.to_csv(root / CONSENSUS_FILE, index=False)
    truth = _with_labels(truth, labels)
    truth["label_text"] = metadata["BrixiaScore"].to_numpy()
    truth["consensus"] = [int(p.consensus) for p in plans]
    return truth


def write_aiforcovid_sheets(plans: Sequence[ImagePlan], truth: pd.DataFrame, out: Path, seed: int,
                            decoupled: bool) -> tuple[pd.DataFrame, dict[str, float]]:
    """The three release sheets; returns the truth with z, prognosis and the hospitals' intercepts.

    Only the listed patients (all but an ``unlisted_file``) enter z, the prognosis draw and the clinical
    draw, so that fault changes no other patient's row.
    """
    listed = np.array([p.fault != "unlisted_file" for p in plans])
    patients = [p for p, keep in zip(plans, listed) if keep]
    drawn = _draw_prognosis(truth.loc[listed], decoupled, stream_rng(seed, Stream.PROGNOSIS), SEVERE_RATE)
    sheet = pd.concat([pd.DataFrame({"ImageFile": [p.image_id for p in patients],
                                     "Hospital": [p.center for p in patients]}),
                       clinical_table(patients, drawn.labels, stream_rng(seed, Stream.CLINICAL))], axis=1)
    sheet.insert(len(sheet.columns) - 1, "Prognosis", drawn.outcome)
    faults = np.array([p.fault for p in patients])
    sheet.loc[faults == "bad_label", "Prognosis"] = BAD_PROGNOSIS
    releases = np.array([p.release for p in patients])
    for release, sheet_name in RELEASE_SHEETS.items():
        rows = [i for i in np.flatnonzero(releases == release) for _ in range(1 + (faults[i] == "duplicate_id"))]
        write_xlsx(sheet.iloc[rows].reset_index(drop=True), out / AIFORCOVID_DIR / sheet_name)
    truth = truth.copy()
    truth["release"] = [p.release for p in plans]
    _add_prognosis(truth, listed, drawn)
    return truth, drawn.intercepts


def write_cohort_manifest(plans: Sequence[ImagePlan], truth: pd.DataFrame, out: Path, seed: int,
                          decoupled: bool) -> tuple[pd.DataFrame, dict[str, float]]:
    """``COHORT/manifest.csv`` with both labels on every row; returns the truth with labels and prognosis.

    The Brixia scores carry BrixIA's rater slips; the outcome follows the same model as AIforCOVID's
    prognosis (coupled to the lungs, or to the heart size when ``decoupled``) with the cohort's own
    SEVERE shares. Image paths are relative to the manifest.
    """
    labels = annotate(truth[TRUE_COLUMNS].to_numpy(), stream_rng(seed, Stream.COHORT_ANNOTATORS), ANNOTATOR_SLIP)
    drawn = _draw_prognosis(truth, decoupled, stream_rng(seed, Stream.COHORT_PROGNOSIS), COHORT_SEVERE_RATE)
    manifest = pd.DataFrame({
        "image": [Path(p.relative_path).relative_to(COHORT_DIR).as_posix() for p in plans],
        "patient": [p.patient_id for p in plans],
        "center": [p.center for p in plans],
        "outcome": drawn.outcome,
    })
    for k, region in enumerate(REGIONS):
        manifest[f"brixia_{region}"] = labels[:, k]
    manifest["brixia_global"] = labels.sum(axis=1)
    manifest.to_csv(out / COHORT_DIR / COHORT_MANIFEST, index=False)
    truth = _with_labels(truth, labels)
    _add_prognosis(truth, np.ones(len(truth), dtype=bool), drawn)
    return truth, drawn.intercepts
