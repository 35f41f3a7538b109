"""Image decoding: DICOM (pydicom) and ordinary image files (Pillow, ``.npy``) → float32 2-D arrays.

``read_image`` returns the stored pixels in the MONOCHROME2 sense (bright = dense), with the modality LUT
(RescaleSlope/Intercept) applied, colour averaged to gray and only the first frame of a multi-frame file.
``normalize_intensity`` then maps any bit depth to [0, 1]. Decoding problems raise
``ImageReadError(path, reason)``; the cache builder records them per file.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from PIL import Image, ImageOps, UnidentifiedImageError
from pydicom.dataset import FileDataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array
from pydicom.uid import UID

from mdmt.errors import ImageReadError

DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic", ""})
"""Suffixes read as DICOM even without the 128-byte preamble and ``DICM`` prefix."""
CODEC_MODULES = ("pylibjpeg", "libjpeg", "openjpeg")
"""Import names of the ``mdmt[codecs]`` extra (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg)."""
CODECS_HINT = "install the codecs extra: pip install 'mdmt[codecs]' (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg)"
_DICM_OFFSET = 128
IMAGE_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8\xff": "JPEG", b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
                    b"GIF8": "GIF", b"BM": "BMP"}
"""Leading bytes of the ordinary image formats (to name one saved under a DICOM name)."""
EXIF_ORIENTATION = 0x0112
_NPY_MAGIC = b"\x93NUMPY"


def _file_kind(path: Path) -> str:
    """``dicom``, ``dicom-forced`` (no ``DICM`` prefix, parsed with ``force=True``), ``npy`` or ``pillow``."""
    try:
        with path.open("rb") as handle:
            head = handle.read(_DICM_OFFSET + 4)
    except OSError as exc:
        raise ImageReadError(path, f"cannot open: {exc.strerror or exc}") from exc
    if head[_DICM_OFFSET:] == b"DICM":
        return "dicom"
    if head.startswith(_NPY_MAGIC):
        return "npy"
    return "dicom-forced" if path.suffix.lower() in DICOM_SUFFIXES else "pillow"


def _check_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file not found" if not path.exists() else "not a regular file")
    if path.stat().st_size == 0:
        raise ImageReadError(path, "empty file (0 bytes)")
    return path


def _read_dataset(path: Path, kind: str, *, stop_before_pixels: bool) -> FileDataset:
    try:
        return pydicom.dcmread(path, force=kind == "dicom-forced", stop_before_pixels=stop_before_pixels)
    except Exception as exc:  # pydicom raises many types (EOFError, struct.error, ValueError...) on bad files
        raise ImageReadError(path, _decode_failure(path, None, exc)) from exc


def _transfer_syntax(ds: FileDataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    return meta.get("TransferSyntaxUID") if meta is not None else None


def _decode_failure(path: Path, ds: FileDataset | None, exc: Exception) -> str:
    """The true reason a file read as DICOM did not decode (``ds`` None: it did not even parse).

    In order: an ordinary image under a DICOM name; not DICOM at all (no ``DICM`` prefix, no pixel data and no
    SOP class); a header that does not parse; no pixel data (cut short, or not an image object); pixel data cut short; a
    compressed transfer syntax whose plugin is missing (named, with the codecs extra); else the decoder's message.
    """
    message = " ".join(str(exc).split()) or type(exc).__name__
    with path.open("rb") as handle:
        head = handle.read(_DICM_OFFSET + 4)
    dicm = head[_DICM_OFFSET:] == b"DICM"  # a DICOM's preamble may hold a TIFF header: DICM decides
    image = None if dicm else next((name for magic, name in IMAGE_SIGNATURES.items() if head.startswith(magic)), None)
    if image is not None:
        return f"{image} image named {path.suffix or 'without a suffix'}, not DICOM (rename it to .{image.lower()})"
    has_pixels = ds is not None and "PixelData" in ds
    if not dicm and not (has_pixels or (ds is not None and "SOPClassUID" in ds)):
        return "not a DICOM file (no DICM preamble and not an image)"
    if ds is None:
        return f"invalid DICOM: {type(exc).__name__}: {message}"
    size = path.stat().st_size
    if not has_pixels:
        return f"no pixel data in {size} bytes (a truncated DICOM, or not an image)"
    syntax = _transfer_syntax(ds)
    try:
        expected = (int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0) * int(ds.get("SamplesPerPixel") or 1)
                    * int(ds.get("NumberOfFrames") or 1) * int(ds.get("BitsAllocated") or 0) // 8)
    except (TypeError, ValueError):  # a malformed size element: the decoder's own message says more
        expected = 0
    stored = len(ds.PixelData or b"")
    if syntax is not None and not syntax.is_compressed and stored < expected:
        return f"truncated DICOM: {stored} of {expected} bytes of pixel data in a {size}-byte file"
    missing = [name for name in CODEC_MODULES if importlib.util.find_spec(name) is None]
    if isinstance(exc, RuntimeError) and syntax is not None and syntax.is_compressed and missing:
        return f"cannot decode transfer syntax '{syntax.name}' ({syntax}): {message}; {CODECS_HINT}"
    return f"cannot decode pixel data: {type(exc).__name__}: {message}"


def _stored_value_range(ds: FileDataset) -> np.ndarray | None:
    """The [min, max] a stored pixel can take (from BitsStored and PixelRepresentation), or None."""
    bits = ds.get("BitsStored")
    if not bits:
        return None
    if ds.get("PixelRepresentation", 0) == 1:
        return np.array([-(2 ** (bits - 1)), 2 ** (bits - 1) - 1], dtype=np.int64)
    return np.array([0, 2**bits - 1], dtype=np.int64)


def _dicom_to_gray(ds: FileDataset, path: Path) -> np.ndarray:
    """Frame 0 as float32 gray: colour → channel mean; gray → modality LUT, then MONOCHROME1 inverted."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    stored_range = _stored_value_range(ds)
    display_range = None
    try:
        pixels = pixel_array(ds, index=0)  # YBR is converted to RGB here
        if photometric == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
        if pixels.ndim == 2:
            pixels = apply_modality_lut(pixels, ds)
            if photometric == "MONOCHROME1" and stored_range is not None:
                display_range = apply_modality_lut(stored_range, ds)
    except Exception as exc:  # pydicom raises AttributeError/ValueError/RuntimeError... for bad pixel data
        raise ImageReadError(path, _decode_failure(path, ds, exc)) from exc
    if pixels.ndim == 3:
        return pixels.astype(np.float32).mean(axis=-1)
    if pixels.ndim != 2:
        raise ImageReadError(path, f"unexpected pixel array shape {pixels.shape}")
    values = pixels.astype(np.float32)
    if photometric == "MONOCHROME1":
        low, high = (display_range if display_range is not None else (values.min(), values.max()))
        values = np.float32(low + high) - values
    return values


def _read_pillow(path: Path) -> np.ndarray:
    """First frame of a PNG/JPEG/TIFF/BMP file, turned upright by its EXIF orientation; 16-bit kept;
    colour → mean of R, G, B (alpha ignored)."""
    try:
        with Image.open(path) as image:
            if image.getexif().get(EXIF_ORIENTATION, 1) != 1:
                image = ImageOps.exif_transpose(image)
            if image.mode not in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "RGB", "RGBA"):
                image = image.convert("RGB")
            pixels = np.asarray(image)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageReadError(path, f"cannot read image: {exc}") from exc
    if pixels.ndim == 3:
        channels = pixels[..., :3] if pixels.shape[-1] >= 3 else pixels[..., :1]
        return channels.astype(np.float32).mean(axis=-1)
    return pixels.astype(np.float32)


def _read_npy(path: Path) -> np.ndarray:
    try:
        pixels = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise ImageReadError(path, f"cannot read array: {exc}") from exc
    if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):
        pixels = pixels[..., :3].mean(axis=-1)
    if pixels.ndim != 2:
        raise ImageReadError(path, f"expected a 2-D array, got shape {pixels.shape}")
    return pixels.astype(np.float32)


def read_image(path: str | Path) -> np.ndarray:
    """Decode one image file to a float32 2-D array in the MONOCHROME2 sense (bright = dense).

    DICOM (detected by the ``DICM`` prefix, or a ``.dcm``/no suffix): first frame, RescaleSlope/Intercept
    (modality LUT) applied, MONOCHROME1 inverted over the stored-value range of ``BitsStored``, colour
    (RGB, YBR converted to RGB by pydicom, palette) averaged to gray. Compressed transfer syntaxes need the
    optional ``mdmt[codecs]`` plugins except RLE, Deflate and what Pillow decodes (8-bit JPEG, JPEG 2000).
    Other files go through Pillow (8- and 16-bit PNG/TIFF at full depth, JPEG turned upright by its EXIF
    orientation) or ``numpy.load`` for ``.npy``.
    Raises ``ImageReadError`` naming the file and the reason.
    """
    path = _check_file(path)
    kind = _file_kind(path)
    if kind == "npy":
        return _read_npy(path)
    if kind == "pillow":
        return _read_pillow(path)
    return _dicom_to_gray(_read_dataset(path, kind, stop_before_pixels=False), path)


def normalize_intensity(img: np.ndarray, low: float = 2.0, high: float = 98.0) -> np.ndarray:
    """Clip to the ``low``–``high`` percentiles and min-max scale to float32 [0, 1].

    When the percentiles coincide (a mostly uniform image) the full min-max range is used; a constant
    image gives zeros, never NaN. Non-finite pixels are ignored for the statistics and set to 0.
    The official code clipped to the 2nd–98th percentile too but never rescaled to
    [0, 1] (its ``MinMax`` normaliser was never active) and never applied RescaleSlope/Intercept, so its
    network inputs kept each device's raw bit depth; here every image ends in [0, 1].
    """
    if not 0.0 <= low < high <= 100.0:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got low={low}, high={high}")
    values = np.asarray(img, dtype=np.float32)
    finite = np.isfinite(values)
    sample = values if finite.all() else values[finite]
    if sample.size == 0:
        return np.zeros(values.shape, dtype=np.float32)
    lo, hi = np.percentile(sample, [low, high]).astype(np.float32)
    if hi <= lo:
        lo, hi = sample.min(), sample.max()
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.float32)
    scaled = np.clip(values, lo, hi)  # float32 throughout: lo maps to exactly 0 and hi to exactly 1
    scaled -= lo
    scaled /= hi - lo
    if sample is not values:
        scaled[~finite] = 0.0
    return scaled


def image_info(path: str | Path) -> dict[str, Any]:
    """Header-only facts for reports: rows, cols, photometric, bits_stored, transfer_syntax, manufacturer.

    DICOM is read with ``stop_before_pixels``; for other files ``photometric`` is the Pillow mode (or the
    array dtype for ``.npy``) and ``transfer_syntax`` the file format.
    """
    path = _check_file(path)
    kind = _file_kind(path)
    if kind.startswith("dicom"):
        ds = _read_dataset(path, kind, stop_before_pixels=True)
        syntax = _transfer_syntax(ds)
        manufacturer = ds.get("Manufacturer")
        return {
            "rows": ds.get("Rows"),
            "cols": ds.get("Columns"),
            "photometric": ds.get("PhotometricInterpretation"),
            "bits_stored": ds.get("BitsStored"),
            "transfer_syntax": syntax.name if syntax is not None else None,
            "manufacturer": str(manufacturer) if manufacturer else None,
        }
    if kind == "npy":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ImageReadError(path, f"cannot read array: {exc}") from exc
        rows, cols = array.shape[:2] if array.ndim >= 2 else (None, None)
        return {"rows": rows, "cols": cols, "photometric": str(array.dtype), "bits_stored": array.dtype.itemsize * 8,
                "transfer_syntax": "NPY", "manufacturer": None}
    try:
        with Image.open(path) as image:
            cols, rows = image.size
            bits = 16 if image.mode.startswith("I;16") else (32 if image.mode in ("I", "F") else 8)
            return {"rows": rows, "cols": cols, "photometric": image.mode, "bits_stored": bits,
                    "transfer_syntax": image.format, "manufacturer": None}
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ImageReadError(path, f"cannot read image: {exc}") from exc
