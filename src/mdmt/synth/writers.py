"""File writers: DICOM films with consistent headers and fixed UIDs, byte-stable XLSX, the truth masks."""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from mdmt.synth.anatomy import Rendered
from mdmt.synth.layout import GENERATOR_VERSION, TRUTH_DIR, ZONE_MASK_STEP
from mdmt.synth.plans import ImagePlan
from mdmt.tasks import REGIONS

SOP_CLASSES = {"CR": "1.2.840.10008.5.1.4.1.1.1", "DX": "1.2.840.10008.5.1.4.1.1.1.1"}
"""CR Image Storage; Digital X-Ray Image Storage – For Presentation."""
DETECTOR_MM = 430.0
"""Detector width used for ImagerPixelSpacing."""
_XLSX_TIMESTAMP = re.compile(rb"(<dcterms:(?:created|modified)[^>]*>)[^<]*(</dcterms:)")
_FIXED_TIME = (2020, 6, 1, 0, 0, 0)


def encode(image01: np.ndarray, bits_stored: int, monochrome1: bool) -> np.ndarray:
    """uint16 stored values over the ``bits_stored`` range; MONOCHROME1 stores the inverted values."""
    top = 2**bits_stored - 1
    stored = np.rint(image01 * top).astype(np.uint16)
    return (top - stored).astype(np.uint16) if monochrome1 else stored


def _uid(seed: int, *parts: str) -> str:
    return str(generate_uid(entropy_srcs=["mdmt-synthetic", str(GENERATOR_VERSION), str(seed), *parts]))


def write_dicom(path: Path, pixels: np.ndarray, plan: ImagePlan, seed: int, *, photometric: str,
                bits_stored: int, transfer_syntax: str) -> None:
    """One valid DICOM whose header facts (patient, modality, vendor, size, photometry) match the tables.

    The file meta and the dataset carry the CR or DX storage class of the profile's modality, UIDs
    derived from the seed and the image id, ImagerPixelSpacing for a 43 cm detector and, for grayscale,
    a full-range window and the Presentation LUT Shape of the photometric interpretation.
    """
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
    ds.InstitutionName = "Brescia (synthetic)" if plan.dataset == "brixia" else f"Hospital {plan.center}"
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


def write_image(plan: ImagePlan, rendered: Rendered, out: Path, seed: int) -> dict[str, object]:
    """Write the DICOM (applying the plan's file fault) and the zone mask; return the image's truth row.

    The row holds the plan (ids, center, profile, vendor, path, latents ``s`` and ``h``, fault), the
    stored format, the end-exclusive lung box ``x0, y0, x1, y1`` and the rendered coverage and true
    score of each zone with their sum.
    """
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
        "image_id": plan.image_id, "patient_id": plan.patient_id, "center": plan.center,
        "profile": plan.profile.name, "manufacturer": plan.manufacturer, "path": plan.relative_path,
        "s": round(plan.severity, 4), "h": round(plan.heart_size, 4), "fault": plan.fault,
        "photometric": photometric, "bits_stored": bits, "transfer_syntax": syntax,
        "rows": profile.rows, "columns": profile.columns, "x0": x0, "y0": y0, "x1": x1, "y1": y1,
        **{f"coverage_{r}": round(float(c), 4) for r, c in zip(REGIONS, rendered.coverage)},
        **{f"true_{r}": int(s) for r, s in zip(REGIONS, rendered.scores)},
        "true_global": int(rendered.scores.sum()),
    }
