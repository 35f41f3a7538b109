"""Synthetic twin of BrixIA and AIforCOVID (and, optionally, a third cohort), in the real on-disk formats.

A chest phantom (``anatomy``) carries a latent severity ``s``, which sets the opacities of the six
Brixia zones, and a latent heart size ``h``. A device profile per hospital and per BrixIA vendor
(``devices``) changes only the acquisition: size and aspect, field of view, gamma, contrast, offset,
noise, bits stored, MONOCHROME1 share and transfer syntax. Prognosis follows the true global score (or,
with ``decoupled``, the heart size) through a noisy logistic model (``labels``). The files are those of
the real releases (``writers``, ``sheets``): ``BRIXIA/dicom_clean/*.dcm`` with its metadata and
consensus CSVs, ``AIforCOVID/imgs*/*.dcm`` with one XLSX sheet per release, and, with ``cohort``,
``COHORT/manifest.csv`` with ``COHORT/images/*.dcm`` (hospitals G and H, both labels on every row).

The hidden truth goes to ``_synthetic_truth/``, which the dataset readers never look at:
``brixia.csv``, ``aiforcovid.csv`` and ``cohort.csv`` (one row per image: image_id, patient_id,
center, profile, manufacturer, path, latent ``s`` and ``h``, fault, photometric, bits_stored,
transfer_syntax, rows, columns, the end-exclusive lung box ``x0, y0, x1, y1`` of both lungs (the file
is a valid boxes file for ``mdmt.lungs.locate``), coverage_A..F, true_A..F, true_global; BrixIA adds
label_A..F, label_global, label_text, consensus; AIforCOVID adds release, z, prognosis,
prognosis_intercept; the cohort adds label_A..F, label_global, z, prognosis, prognosis_intercept),
``profiles.csv``, ``params.json`` and ``masks/<dataset>/<image_id>.png`` (40·k inside zone k = 1..6,
0 outside the lungs, at the DICOM's size). Every random draw comes from
``numpy.random.default_rng([seed, stream, index])``: the same seed writes byte-identical files, and the
images do not change with ``decoupled``, with the faults asked for or with ``cohort``.
"""

from mdmt.synth.anatomy import (
    BODY_CENTRE,
    BODY_LEVEL,
    BODY_RADII,
    CALIBRATION_SIZE,
    COVERAGE_NOISE,
    DEFAULT_OPACITY,
    DENSE_LEVEL,
    EDGE_SOFTNESS,
    HEART_BETA,
    HEART_CENTRE,
    HEART_HALF_HEIGHT,
    HEART_WIDTH,
    LUNG_CENTRE_JITTER,
    LUNG_LEVEL,
    LUNG_RADII,
    LUNG_RADIUS_JITTER,
    LUNG_X,
    LUNG_Y,
    MEDIASTINUM_BOTTOM,
    MEDIASTINUM_EDGES,
    MEDIASTINUM_HALF_WIDTH,
    OPACITY_FIELD_SIGMA,
    OPACITY_MASK_SIGMA,
    RIB_AMPLITUDE,
    RIB_BEND,
    RIB_CYCLES,
    RIB_HALF_SPAN,
    SCORE_EDGES,
    SEVERITY_BETA,
    SEVERITY_MEAN,
    ZONE_WEIGHTS,
    Anatomy,
    Rendered,
    draw_anatomy,
    render,
)
from mdmt.synth.clinical_columns import (
    BLANK_RANGE,
    CONDITIONS,
    DEATH_GIVEN_SEVERE,
    MEASUREMENTS,
    Condition,
    Measurement,
    clinical_table,
)
from mdmt.synth.devices import (
    BITS_STORED,
    CONTRAST_RANGE,
    GAMMA_RANGE,
    MONOCHROME1_RANGE,
    NOISE_RANGE,
    OFFSET_RANGE,
    SIDE_RANGE,
    TRANSFER_SYNTAXES,
    VENDORS,
    ZOOM_RANGE,
    DeviceProfile,
    Vendor,
    draw_cohort_profiles,
    draw_profiles,
)
from mdmt.synth.faults import (
    BAD_PROGNOSIS,
    FAULT_DETAILS,
    FAULTS,
    InjectedFault,
    plan_faults,
)
from mdmt.synth.hospitals import (
    AIFORCOVID_BLOCKS,
    CENTERS,
    COHORT_CENTERS,
    COHORT_SEVERE_RATE,
    RELEASE_FOLDERS,
    RELEASE_SHEETS,
    SEVERE_RATE,
    IdBlock,
)
from mdmt.synth.labels import (
    ANNOTATOR_SLIP,
    CONSENSUS_RATERS,
    PROGNOSIS_NOISE,
    PROGNOSIS_SLOPE,
    RATER_SLIP,
    annotate,
    assign_prognosis,
    consensus_table,
)
from mdmt.synth.layout import (
    AIFORCOVID_DIR,
    BRIXIA_DIR,
    BRIXIA_METADATA,
    COHORT_DIR,
    COHORT_IMAGES,
    COHORT_MANIFEST,
    GENERATOR_VERSION,
    PARAMS_FILE,
    TRUTH_DIR,
    ZONE_MASK_STEP,
)
from mdmt.synth.plans import (
    FOLLOW_UP_DRIFT,
    ImagePlan,
    plan_aiforcovid,
    plan_brixia,
    plan_cohort,
)
from mdmt.synth.presets import PRESETS, SynthPreset, cohort_sizes
from mdmt.synth.twin import SynthSummary, generate
from mdmt.synth.writers import DETECTOR_MM, SOP_CLASSES, encode, write_dicom, write_xlsx

__all__ = [
    "AIFORCOVID_BLOCKS", "AIFORCOVID_DIR", "ANNOTATOR_SLIP", "BAD_PROGNOSIS", "BITS_STORED", "BLANK_RANGE",
    "BODY_CENTRE", "BODY_LEVEL", "BODY_RADII", "BRIXIA_DIR", "BRIXIA_METADATA", "CALIBRATION_SIZE", "CENTERS",
    "COHORT_CENTERS", "COHORT_DIR", "COHORT_IMAGES", "COHORT_MANIFEST", "COHORT_SEVERE_RATE", "CONDITIONS",
    "CONSENSUS_RATERS", "CONTRAST_RANGE", "COVERAGE_NOISE", "DEATH_GIVEN_SEVERE", "DEFAULT_OPACITY", "DENSE_LEVEL",
    "DETECTOR_MM", "EDGE_SOFTNESS", "FAULTS", "FAULT_DETAILS", "FOLLOW_UP_DRIFT", "GAMMA_RANGE",
    "GENERATOR_VERSION", "HEART_BETA", "HEART_CENTRE", "HEART_HALF_HEIGHT", "HEART_WIDTH", "LUNG_CENTRE_JITTER",
    "LUNG_LEVEL", "LUNG_RADII", "LUNG_RADIUS_JITTER", "LUNG_X", "LUNG_Y", "MEASUREMENTS", "MEDIASTINUM_BOTTOM",
    "MEDIASTINUM_EDGES", "MEDIASTINUM_HALF_WIDTH", "MONOCHROME1_RANGE", "NOISE_RANGE", "OFFSET_RANGE",
    "OPACITY_FIELD_SIGMA", "OPACITY_MASK_SIGMA", "PARAMS_FILE", "PRESETS", "PROGNOSIS_NOISE", "PROGNOSIS_SLOPE",
    "RATER_SLIP", "RELEASE_FOLDERS", "RELEASE_SHEETS", "RIB_AMPLITUDE", "RIB_BEND", "RIB_CYCLES", "RIB_HALF_SPAN",
    "SCORE_EDGES", "SEVERE_RATE", "SEVERITY_BETA", "SEVERITY_MEAN", "SIDE_RANGE", "SOP_CLASSES",
    "TRANSFER_SYNTAXES", "TRUTH_DIR", "VENDORS", "ZONE_MASK_STEP", "ZONE_WEIGHTS", "ZOOM_RANGE", "Anatomy",
    "Condition", "DeviceProfile", "IdBlock", "ImagePlan", "InjectedFault", "Measurement", "Rendered",
    "SynthPreset", "SynthSummary", "Vendor", "annotate", "assign_prognosis", "clinical_table", "cohort_sizes",
    "consensus_table", "draw_anatomy", "draw_cohort_profiles", "draw_profiles", "encode", "generate",
    "plan_aiforcovid", "plan_brixia", "plan_cohort", "plan_faults", "render", "write_dicom", "write_xlsx",
]
