"""One image, preprocessed: decode → percentile clip → lung crop → square resize → uint8, and the parameters the
result depends on (what a cache key covers). The cache stores these images; ``mdmt predict`` makes them the
same way for new films.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image

from mdmt.config import DataConfig
from mdmt.errors import ImageReadError
from mdmt.images import normalize_intensity, read_image
from mdmt.lungs.locate import LungBox, crop_to_box, resolve_box

PREPROCESS_VERSION = 3
"""Bump when the preprocessing changes in a way the parameters do not show (invalidates every cache)."""


class Preprocessed(NamedTuple):
    """One preprocessed image, the box it was cropped to, the original image size and the file's sha256."""

    image: np.ndarray
    box: LungBox
    height: int
    width: int
    sha256: str = ""


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear, antialiased (PIL) resize of a float image to ``size × size``."""
    return np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))


def to_uint8(img01: np.ndarray) -> np.ndarray:
    """[0, 1] float → uint8 with rounding."""
    return np.rint(np.clip(img01, 0.0, 1.0) * 255.0).astype(np.uint8)


def preprocess_image(path: str | Path, image_id: str, cfg: DataConfig) -> Preprocessed:
    """read → percentile clip to [0, 1] → crop to the lung box → resize → uint8 (raises ImageReadError)."""
    img = read_image(path)
    img01 = normalize_intensity(img, *cfg.clip_percentiles)
    box = resolve_box(image_id, img01, cfg)
    crop = crop_to_box(img01, box, cfg.crop_margin)
    return Preprocessed(to_uint8(resize_square(crop, cfg.image_size)), box, int(img.shape[0]), int(img.shape[1]))


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def try_preprocess(item: tuple[str, str], cfg: DataConfig) -> Preprocessed | str:
    """``preprocess_image`` plus the file's sha256, an unreadable file turned into its reason (picklable)."""
    path, image_id = item
    try:
        return preprocess_image(path, image_id, cfg)._replace(sha256=file_sha256(path))
    except ImageReadError as exc:
        return exc.reason
    except OSError as exc:  # the file vanished or became unreadable between decoding and hashing
        return f"cannot read: {exc.strerror or exc}"


def file_identity(path: str | Path) -> tuple[int, int]:
    """(size, mtime_ns) of a file, (-1, -1) when it cannot be read."""
    try:
        stat = os.stat(path)
    except OSError:
        return -1, -1
    return stat.st_size, stat.st_mtime_ns


def preprocess_params(cfg: DataConfig) -> dict[str, Any]:
    """The parameters an image's cached pixels depend on (only those of the crop mode in use)."""
    params: dict[str, Any] = {
        "version": PREPROCESS_VERSION,
        "image_size": cfg.image_size,
        "clip_percentiles": list(cfg.clip_percentiles),
        "crop": cfg.crop,
        "crop_margin": cfg.crop_margin,
    }
    if cfg.crop == "lungs":
        from mdmt.lungs.unet import weights_fingerprint

        params["segmenter"] = weights_fingerprint()
    if cfg.crop == "masks":
        params["masks_dir"] = str(Path(cfg.masks_dir or "").resolve())
    if cfg.crop == "boxes":
        boxes = Path(cfg.boxes_file or "")
        params["boxes_file"] = [str(boxes.resolve()), *file_identity(boxes)]
    return params
