"""Files → network input, exactly as training preprocesses them.

``mdmt.cache.preprocess.preprocess_image`` decodes the file (DICOM, PNG, JPEG), clips it to the run's intensity
percentiles, crops it with the run's ``data.crop`` mode and resizes it to ``data.image_size`` as uint8 (what
the image cache stores); ``mdmt.data.augment.to_network_input`` then resizes it to ``model.input_size`` and
normalises it with the backbone's statistics (what the training loop feeds the network).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mdmt.cache.preprocess import preprocess_image
from mdmt.config import DataConfig
from mdmt.data.augment import to_network_input
from mdmt.errors import ConfigError, ImageReadError
from mdmt.images import DICOM_SUFFIXES
from mdmt.infer.model_io import TrainedModel
from mdmt.lungs.locate import LungBox, crop_window

IMAGE_SUFFIXES = frozenset(s for s in DICOM_SUFFIXES if s) | {".png", ".jpg", ".jpeg"}
"""Suffixes taken from a folder (any case); files without a suffix are read too, as DICOM."""


@dataclass(frozen=True)
class Film:
    """One preprocessed file: the cached-size uint8 image, its crop box and the original size."""

    path: Path
    image: np.ndarray
    box: LungBox
    height: int
    width: int

    @property
    def image_id(self) -> str:
        """The file stem (what ``data.crop: masks | boxes`` look the film up by)."""
        return self.path.stem

    def window(self, margin: float) -> tuple[int, int, int, int]:
        """The ``(x0, y0, x1, y1)`` pixels of the original film the image was cut from."""
        return crop_window(self.box, (self.height, self.width), margin)


@dataclass
class Inputs:
    """The files to predict on, and the paths skipped with their reason."""

    files: list[Path]
    skipped: list[tuple[str, str]]


def _in_folder(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and (p.suffix.lower() in IMAGE_SUFFIXES or p.suffix == ""))


def expand_inputs(paths: Iterable[str | Path]) -> Inputs:
    """Files as given and the image files under folders (recursive, sorted); a path that does not exist or a
    folder without image files is skipped with the reason; each file is taken once."""
    files: list[Path] = []
    skipped: list[tuple[str, str]] = []
    seen: set[Path] = set()
    for given in map(Path, paths):
        if given.is_dir():
            found = _in_folder(given)
            if not found:
                skipped.append((str(given), f"folder holds no {'/'.join(sorted(IMAGE_SUFFIXES))} files"))
        elif given.exists():
            found = [given]
        else:
            skipped.append((str(given), "file not found"))
            found = []
        for path in found:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                files.append(path)
    if not files and not skipped:
        raise ConfigError("no image paths given")
    return Inputs(files, skipped)


def load_film(path: str | Path, data: DataConfig) -> Film:
    """``preprocess_image`` of one file with the run's data config (raises ImageReadError)."""
    path = Path(path)
    try:
        done = preprocess_image(path, path.stem, data)
    except OSError as exc:  # vanished or unreadable between listing and decoding
        raise ImageReadError(path, f"cannot read: {exc.strerror or exc}") from exc
    return Film(path, done.image, done.box, done.height, done.width)


def network_input(images: Sequence[np.ndarray] | np.ndarray, trained: TrainedModel) -> torch.Tensor:
    """uint8 images ``(B, S, S)`` → the network input ``(B, 3, input_size, input_size)`` of the run."""
    batch = torch.from_numpy(np.ascontiguousarray(np.stack(list(images))))[:, None]
    return to_network_input(batch, trained.config.model.input_size, *trained.normalization)
