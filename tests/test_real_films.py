"""The lung crop on real films the shipped segmenter never saw, in every image format and on damaged films.

The shipped weights were trained without one patient-grouped fold of ``../shared/data/real-cxr-lungs``
(listed in ``lung_unet_holdout.json``); these tests score only that fold against the human lung masks.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.dicom_fixtures import write_dicom
from PIL import Image, ImageDraw, ImageFont

from mdmt.cache.preprocess import preprocess_image
from mdmt.config import DataConfig
from mdmt.images import normalize_intensity, read_image
from mdmt.lungs.locate import box_from_mask, read_mask
from mdmt.lungs.training import (
    FOLD_SEED,
    FOLDS,
    film_summary,
    patient_folds,
    read_film_folder,
    read_holdout,
    score_films,
)
from mdmt.lungs.unet import HOLDOUT_FILE, WEIGHTS_FILE, read_weights

TARGET_IOU, TARGET_KEEP95, TARGET_FALLBACK = 0.85, 0.97, 0.05
DAMAGED_KEEP95 = 0.95
"""Rotated films: at most one film in 20 may lose more than 5 % of its lung box (measured: 1 of 25, at 94.8 %)."""


@pytest.fixture(scope="module")
def held_out(real_films) -> pd.DataFrame:
    """The real films of the fold the shipped weights were not trained on."""
    films = read_film_folder(real_films)
    ids = set(read_holdout()["image_ids"])
    table = films[films["image_id"].isin(ids)].reset_index(drop=True)
    assert len(table) == len(ids) >= 20
    return table


@pytest.fixture(scope="module")
def frontal(held_out) -> pd.DataFrame:
    """The held-out films whose mask holds lungs (frontal views), read once: image (uint8) and mask."""
    rows = []
    for film in held_out.itertuples(index=False):
        mask = read_mask(film.mask_path) > 0
        if mask.any():
            image = np.asarray(Image.open(film.path).convert("L"))
            rows.append({"image_id": film.image_id, "image": image, "mask": mask})
    return pd.DataFrame(rows)


def test_holdout_is_a_whole_patient_fold(real_films):
    films = read_film_folder(real_films)
    holdout = read_holdout()
    folds = patient_folds(films["patient"], holdout["folds"], holdout["fold_seed"])
    assert (holdout["folds"], holdout["fold_seed"]) == (FOLDS, FOLD_SEED)
    expected = films[folds == holdout["fold"]]
    assert sorted(expected["image_id"]) == holdout["image_ids"]
    assert set(films.loc[folds != holdout["fold"], "patient"]).isdisjoint(holdout["patients"])


def test_shipped_segmenter_meets_the_targets_on_held_out_films(held_out):
    scores = score_films(held_out)
    summary = film_summary(scores)
    assert summary["n"] >= 20
    assert summary["iou"] >= TARGET_IOU
    assert summary["keep95"] >= TARGET_KEEP95
    assert summary["fallback"] <= TARGET_FALLBACK
    # films without frontal lungs (lateral views) fall back to the full image, with the reason
    lateral = scores[~scores["has_lungs"]]
    assert (lateral["method"] == "full-image").all() and not lateral["ok"].any()
    assert lateral["note"].str.contains("no lungs found").all()


def write_folder(root, films: pd.DataFrame, save) -> None:
    """A film folder (manifest, images, masks) with each film written by ``save(image, mask, stem)``."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for film in films.itertuples(index=False):
        image_name, mask = save(film.image, film.mask, root / "images" / film.image_id)
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / f"{film.image_id}.png")
        rows.append({"id": film.image_id, "image": f"images/{image_name}", "mask": f"masks/{film.image_id}.png",
                     "patient": film.image_id})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)


def as_png8(image, mask, stem):
    Image.fromarray(image).save(stem.with_suffix(".png"))
    return stem.name + ".png", mask


def as_png16(image, mask, stem):
    Image.fromarray((image.astype(np.uint16) * 257 + 40).astype(np.uint16)).save(stem.with_suffix(".png"))
    return stem.name + ".png", mask


def as_jpeg(image, mask, stem):
    Image.fromarray(image).save(stem.with_suffix(".jpg"), quality=85)
    return stem.name + ".jpg", mask


def as_dicom_monochrome1(image, mask, stem):
    write_dicom(stem.with_suffix(".dcm"), (4095 - image.astype(np.uint16) * 16).astype(np.uint16),
                photometric="MONOCHROME1", bits_stored=12)
    return stem.name + ".dcm", mask


def with_text(image, mask, stem):
    """Burned-in markers and captions in large bright letters, one across the lung fields."""
    rng = np.random.default_rng(len(stem.name))
    canvas = Image.fromarray(image)
    draw = ImageDraw.Draw(canvas)
    height, width = image.shape
    font = ImageFont.load_default(size=max(12, height // 14))
    for word, (x, y) in zip(["PORTABLE", "AP SUPINE", "L", "2020-03-14 08:42"],
                            [(0.05, 0.03), (0.3, 0.45), (0.85, 0.1), (0.4, 0.9)], strict=True):
        draw.text((x * width + rng.integers(0, 10), y * height), word, fill=255, font=font)
    canvas.save(stem.with_suffix(".png"))
    return stem.name + ".png", mask


def with_borders(image, mask, stem):
    """Black collimation borders: 12 % of the side added on the left and top, 8 % on the right and bottom."""
    height, width = image.shape
    pad = ((int(0.12 * height), int(0.08 * height)), (int(0.12 * width), int(0.08 * width)))
    Image.fromarray(np.pad(image, pad)).save(stem.with_suffix(".png"))
    return stem.name + ".png", np.pad(mask, pad)


def rotated(image, mask, stem):
    """Rotated by 10 degrees (the film's corners black)."""
    angle = 10 if len(stem.name) % 2 else -10
    Image.fromarray(image).rotate(angle, Image.BILINEAR, expand=True).save(stem.with_suffix(".png"))
    turned = Image.fromarray(mask.astype(np.uint8) * 255).rotate(angle, Image.NEAREST, expand=True)
    return stem.name + ".png", np.asarray(turned) > 0


def cut_off(image, mask, stem):
    """The right edge cut off through the lung on the image's right (10 % of the lung box width)."""
    truth = box_from_mask(mask)
    stop = truth.x1 - int(0.1 * (truth.x1 - truth.x0))
    Image.fromarray(image[:, :stop]).save(stem.with_suffix(".png"))
    return stem.name + ".png", mask[:, :stop]


@pytest.mark.parametrize(
    ("save", "keep95"),
    [(as_png8, TARGET_KEEP95), (as_png16, TARGET_KEEP95), (as_jpeg, TARGET_KEEP95),
     (as_dicom_monochrome1, TARGET_KEEP95), (with_text, TARGET_KEEP95), (with_borders, TARGET_KEEP95),
     (rotated, DAMAGED_KEEP95), (cut_off, TARGET_KEEP95)],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_crop_quality_holds_across_formats_and_damage(frontal, tmp_path, save, keep95):
    write_folder(tmp_path, frontal, save)
    summary = film_summary(score_films(read_film_folder(tmp_path)))
    assert summary["n"] == len(frontal)
    assert summary["iou"] >= TARGET_IOU
    assert summary["keep95"] >= keep95
    assert summary["fallback"] <= TARGET_FALLBACK


@pytest.mark.parametrize("save", [as_png16, as_jpeg, as_dicom_monochrome1], ids=lambda f: f.__name__)
def test_formats_decode_to_the_same_normalised_film(frontal, tmp_path, save):
    film = frontal.iloc[0]
    name, _ = save(film.image, film.mask, tmp_path / "film")
    reference = normalize_intensity(film.image.astype(np.float32))
    decoded = normalize_intensity(read_image(tmp_path / name))
    assert decoded.shape == reference.shape
    assert np.abs(decoded - reference).mean() < (0.02 if save is as_jpeg else 1e-3)
    cached = preprocess_image(tmp_path / name, "film", DataConfig(image_size=64))
    assert cached.box.ok and cached.box.method == "unet" and cached.image.shape == (64, 64)


def test_jpeg_exif_orientation_is_applied(frontal, tmp_path):
    film = frontal.iloc[0]
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display turns it 90 degrees clockwise
    Image.fromarray(np.rot90(film.image, 1).copy()).save(tmp_path / "turned.jpg", quality=95, exif=exif)
    decoded = read_image(tmp_path / "turned.jpg")
    assert decoded.shape == film.image.shape
    assert np.abs(normalize_intensity(decoded) - normalize_intensity(film.image.astype(np.float32))).mean() < 0.02


@pytest.mark.slow
def test_training_script_rebuilds_the_shipped_weights_bit_for_bit(real_films, tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "train_lung_segmenter.py"
    out = tmp_path / "lung_unet.pt"
    subprocess.run([sys.executable, str(script), "--data", str(real_films), "--out", str(out)], check=True)
    rebuilt, shipped = read_weights(out), read_weights(WEIGHTS_FILE)
    assert rebuilt["settings"] == shipped["settings"] and rebuilt["trained_on"] == shipped["trained_on"]
    assert all(torch.equal(rebuilt["state_dict"][k], v) for k, v in shipped["state_dict"].items())
    assert read_holdout(tmp_path / HOLDOUT_FILE.name) == read_holdout()
