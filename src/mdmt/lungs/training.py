"""Films with lung masks: the real-film folder layout, folds, crop scoring, the segmenter's training.

A film folder holds ``manifest.csv`` (``id, image, mask, patient``; paths relative to the folder),
``images/`` and ``masks/`` (lung > 0, same size as the image; an empty mask marks a film without
frontal lungs, e.g. a lateral view). ``score_films`` runs a localiser on each film and measures its box
against the box of the human mask: IoU, and how much of the true box the crop window keeps.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mdmt.errors import ConfigError, DataError, ImageReadError
from mdmt.images import normalize_intensity, read_image
from mdmt.lungs.locate import (
    LungBox,
    box_from_mask,
    box_iou,
    crop_window,
    locate_lungs,
    read_mask,
)
from mdmt.lungs.unet import (
    BASE_SIZE,
    HOLDOUT_FILE,
    REBUILD_COMMAND,
    TrainSettings,
    squash,
    train_segmenter,
)

MANIFEST = "manifest.csv"
MANIFEST_COLUMNS = ("id", "image", "mask", "patient")
FOLDS = 5
FOLD_SEED = 0
HOLDOUT_FOLD = 0
"""The patient-grouped fold (of FOLDS, drawn with FOLD_SEED) the shipped weights are not trained on."""
KEEP_TARGET = 0.95
"""A crop keeps a film's lungs when its window holds at least this share of the true lung box."""
FILM_COLUMNS = ["image_id", "patient", "path", "mask_path"]
SCORE_COLUMNS = ["image_id", "patient", "has_lungs", "iou", "keep", "ok", "method", "note", "ms"]


def read_film_folder(root: str | Path) -> pd.DataFrame:
    """``image_id, patient, path, mask_path`` (absolute paths) of a folder in the film layout."""
    root = Path(root)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise DataError(f"{manifest}: no {MANIFEST} (expected columns {', '.join(MANIFEST_COLUMNS)})")
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    missing = [c for c in MANIFEST_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{manifest}: missing column(s) {', '.join(missing)}")
    duplicated = table["id"][table["id"].duplicated()].tolist()
    if duplicated:
        raise DataError(f"{manifest}: id(s) listed twice: {', '.join(duplicated[:5])}")
    return pd.DataFrame({
        "image_id": table["id"],
        "patient": table["patient"].where(table["patient"] != "", table["id"]),
        "path": [str(root / p) for p in table["image"]],
        "mask_path": [str(root / p) for p in table["mask"]],
    })


def film_arrays(films: pd.DataFrame, size: int = BASE_SIZE,
                clip: tuple[float, float] = (2.0, 98.0)) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Films and masks squashed to ``size × size`` (float32 [0, 1], uint8 0/1), and the rows that were readable.

    Images go through ``read_image`` + ``normalize_intensity`` exactly as the cache does; unreadable films
    or masks are left out.
    """
    images, masks, kept = [], [], []
    for row, film in enumerate(films.itertuples(index=False)):
        try:
            img01 = normalize_intensity(read_image(film.path), *clip)
            mask = read_mask(film.mask_path)
        except ImageReadError:
            continue
        images.append(squash(img01, size))
        masks.append(squash((mask > 0).astype(np.float32), size) >= 0.5)
        kept.append(row)
    if not images:
        return np.zeros((0, size, size), np.float32), np.zeros((0, size, size), np.uint8), films.iloc[:0]
    return np.stack(images), np.stack(masks).astype(np.uint8), films.iloc[kept].reset_index(drop=True)


def patient_folds(patients: pd.Series | list[str], k: int = 5, seed: int = 0) -> np.ndarray:
    """A fold number 0..k-1 per film; all films of a patient share a fold, folds hold near-equal film counts.

    Patients are shuffled with ``seed``, then each goes (largest first) to the fold with the fewest films.
    """
    patients = pd.Series(list(patients), dtype=str)
    counts = patients.value_counts(sort=False)
    order = np.random.default_rng(seed).permutation(len(counts))
    shuffled = counts.iloc[order]
    shuffled = shuffled.iloc[np.argsort(-shuffled.to_numpy(), kind="stable")]
    sizes = np.zeros(k, int)
    fold_of: dict[str, int] = {}
    for patient, count in shuffled.items():
        fold = int(np.argmin(sizes))
        fold_of[str(patient)] = fold
        sizes[fold] += count
    return patients.map(fold_of).to_numpy()


def window_keep(box: LungBox, truth: LungBox, shape: tuple[int, ...], margin: float = 0.05) -> float:
    """Share of the true lung box inside the crop window of ``box`` (``crop_window`` with ``margin``)."""
    x0, y0, x1, y1 = crop_window(box, shape, margin)
    inter = max(0, min(x1, truth.x1) - max(x0, truth.x0)) * max(0, min(y1, truth.y1) - max(y0, truth.y0))
    area = (truth.x1 - truth.x0) * (truth.y1 - truth.y0)
    return inter / area if area > 0 else 0.0


def score_films(films: pd.DataFrame, locate: Callable[[np.ndarray], LungBox] = locate_lungs,
                clip: tuple[float, float] = (2.0, 98.0)) -> pd.DataFrame:
    """``locate`` on each film against its mask's box: IoU, kept share of the true box, flag, method, note, ms.

    ``has_lungs`` is False for films whose mask is empty (no frontal lungs; their truth is the full image).
    Unreadable films keep their row with NaN IoU and method ``unreadable``.
    """
    rows = []
    for film in films.itertuples(index=False):
        row = {"image_id": film.image_id, "patient": film.patient}
        try:
            img = read_image(film.path)
            mask = read_mask(film.mask_path)
        except ImageReadError as exc:
            rows.append(row | {"has_lungs": False, "iou": np.nan, "keep": np.nan, "ok": False,
                               "method": "unreadable", "note": exc.reason, "ms": np.nan})
            continue
        start = time.perf_counter()
        img01 = normalize_intensity(img, *clip)
        box = locate(img01)
        ms = 1000 * (time.perf_counter() - start)
        truth = box_from_mask(mask, img.shape)
        rows.append(row | {"has_lungs": truth.ok, "iou": box_iou(box, truth),
                           "keep": window_keep(box, truth, img.shape), "ok": box.ok, "method": box.method,
                           "note": box.note, "ms": ms})
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def film_summary(scores: pd.DataFrame) -> dict[str, float]:
    """Over readable films with lungs: n, mean and 10th-percentile IoU, keep95 share, fallback share
    (crop not flagged ok), full-image share; over films without lungs: their count and the share flagged
    not ok (the right answer for them); and the median ms per film (normalise + locate)."""
    lungs = scores[scores["has_lungs"] & (scores["method"] != "unreadable")]
    without = scores[~scores["has_lungs"] & (scores["method"] != "unreadable")]
    return {
        "n": len(lungs),
        "iou": float(lungs["iou"].mean()),
        "iou_p10": float(lungs["iou"].quantile(0.1)),
        "keep95": float((lungs["keep"] >= KEEP_TARGET).mean()),
        "fallback": float((~lungs["ok"].astype(bool)).mean()),
        "full_image": float((lungs["method"] == "full-image").mean()),
        "n_no_lungs": len(without),
        "no_lungs_flagged": float((~without["ok"].astype(bool)).mean()) if len(without) else float("nan"),
        "ms": float(scores["ms"].median()),
    }


def fit_segmenter(real: pd.DataFrame, twin: pd.DataFrame, settings: TrainSettings | None = None,
                  progress: bool = False) -> dict[str, torch.Tensor]:
    """Train the lung segmenter on real films and twin films (``read_film_folder`` columns)."""
    real_images, real_masks, _ = film_arrays(real)
    twin_images, twin_masks, _ = film_arrays(twin)
    return train_segmenter(
        np.concatenate([real_images, twin_images]),
        np.concatenate([real_masks, twin_masks]),
        np.r_[np.ones(len(real_images), bool), np.zeros(len(twin_images), bool)],
        settings,
        progress=progress,
    )


def write_holdout(path: str | Path, held_out: pd.DataFrame, fold: int, folds: int, fold_seed: int) -> None:
    """Record the real films left out of training (ids, patients, how the fold was drawn); atomic write."""
    path = Path(path)
    payload = {"folds": folds, "fold_seed": fold_seed, "fold": fold,
               "patients": sorted(set(held_out["patient"])), "image_ids": sorted(held_out["image_id"])}
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, path)


def read_holdout(path: str | Path = HOLDOUT_FILE) -> dict[str, Any]:
    """The held-out record ``write_holdout`` wrote; ConfigError naming the file and the rebuild command."""
    path = Path(path)
    try:
        payload = json.loads(path.read_text())
        ids = [str(i) for i in payload["image_ids"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: cannot read the segmenter's held-out films ({type(exc).__name__}: {exc}); "
                          f"rebuild the weights with `{REBUILD_COMMAND}`") from exc
    return payload | {"image_ids": ids}
