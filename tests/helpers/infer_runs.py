"""Finished tiny runs to predict, explain and export with, and films written in other formats."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
from PIL import Image

from mdmt.config import Config
from mdmt.images import normalize_intensity, read_image
from mdmt.runs import RunSpec
from mdmt.train.run import train_run


def train_tiny_run(tiny_config: Config, results: Path, severity_task: str = "severity_regions") -> Path:
    """A finished one-epoch ``mdmt`` run of ``tiny_cnn`` on the tiny twin (cv5 fold 0, seed 0, CPU)."""
    config = dataclasses.replace(
        tiny_config,
        results_dir=str(results),
        model=dataclasses.replace(tiny_config.model, severity_task=severity_task),
        train=dataclasses.replace(tiny_config.train, max_epochs=1),
    )
    return train_run(config, RunSpec("mdmt", "tiny_cnn", "cv5", 0, 0), progress=False)


def write_variants(source: Path, folder: Path) -> dict[str, Path]:
    """``source`` (any readable film) written as an 8-bit JPEG and a 16-bit PNG in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    img01 = normalize_intensity(read_image(source))
    jpeg, png16 = folder / f"{source.stem}.jpg", folder / f"{source.stem}-16bit.png"
    Image.fromarray(np.rint(img01 * 255).astype(np.uint8)).save(jpeg, quality=95)
    Image.fromarray(np.rint(img01 * 65535).astype(np.uint16)).save(png16)
    return {"jpeg": jpeg, "png16": png16}
