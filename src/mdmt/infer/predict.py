"""Predict on new films: P(SEVERE), the Brixia bin and the regional scores, with the crop of each film.

Columns of ``predictions.csv`` (and the records of ``predictions.json``), per readable file: ``path``,
``image_id`` (the file stem); then the prognosis and severity heads' own columns (``Task.film_columns``):
``p_severe`` (P(SEVERE)) and ``prognosis`` (MILD or SEVERE, the more probable); for ``severity_global4``
``brixia_bin`` (0–3), ``brixia_bin_range`` (``0-4`` … ``15-18``) and ``p_bin_0`` … ``p_bin_3``; for a regional head
(``severity_regions`` or ``severity_ordinal``) ``brixia_A`` … ``brixia_F`` clipped to 0–3, ``brixia_global`` (their
sum) and its bin (``mdmt.tasks.global_bins``, as in training and evaluation); any other head as
``<task>_<column>`` of ``Task.decode``; for a run with ``calibration.json`` (fitted on its calib or validation part,
``mdmt.evaluate.calibration``), ``p_severe_calibrated`` (the calibrated P(SEVERE)), ``prognosis_at_threshold`` (MILD
or SEVERE at the run's decision threshold on it) and ``prognosis_set`` (the conformal prediction set: ``MILD``,
``SEVERE``, ``MILD|SEVERE`` or empty), and for a regional head the conformal intervals ``brixia_global_low``,
``brixia_global_high`` and ``brixia_A_low``, ``brixia_A_high`` … ``brixia_F_high`` (sets and intervals hold the truth
with probability >= 1 - ``calibration.alpha`` over films like those it was fitted on); a run without it gets none of
these and one note; for a run with
``ood_features.npz``, ``ood_distance`` and ``ood_flag`` (``mdmt.infer.guard``); then ``crop_method``, ``crop_ok``,
``crop_note`` and the crop box ``crop_x0`` … ``crop_y1`` in the film's pixels; for a run whose model reads
clinical columns, ``clinical_imputed`` (the columns the film's sheet row left blank, imputed as in training).
Unreadable files, films the clinical sheet has no usable row for (``mdmt.infer.clinical_sheet``) and films the guard
refuses (not a frontal chest film, ``mdmt.infer.guard``) go to ``skipped.csv`` (``path``, ``reason``) and to the
``skipped`` list of the JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mdmt.errors import ConfigError, DataError, ImageReadError
from mdmt.evaluate import calibration as calib
from mdmt.infer.clinical_sheet import IMPUTED_COLUMN, ClinicalSheet, open_clinical_sheet
from mdmt.infer.films import Film, expand_inputs, load_film, network_input
from mdmt.infer.guard import OOD_COLUMNS, film_refusal, guard_notes, ood_columns
from mdmt.infer.model_io import TrainedModel, load_trained
from mdmt.progress import progress_bar
from mdmt.runs import CALIBRATION_FILE, atomic_write_text, predictions_file, strict_json
from mdmt.tasks import Task
from mdmt.train.feature_stats import descriptors

PREDICTIONS_CSV = "predictions.csv"
PREDICTIONS_JSON = "predictions.json"
SKIPPED_CSV = "skipped.csv"
SKIPPED_COLUMNS = ["path", "reason"]


@dataclass
class Batch:
    """Preprocessed films, their network input (and encoded clinical features), every head's raw outputs and the
    prediction rows."""

    films: list[Film]
    x: torch.Tensor
    clinical: torch.Tensor | None
    outputs: dict[str, torch.Tensor]
    table: pd.DataFrame


@dataclass
class PredictionResult:
    """The prediction rows, the skipped files (path, reason), the files written and the guard's notes."""

    table: pd.DataFrame
    skipped: pd.DataFrame
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def head_columns(trained: TrainedModel, outputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Every head's prediction columns for a batch of raw outputs: the run's prognosis and severity heads name
    theirs (``Task.film_columns``), any other head writes ``<task>_<column>``."""
    columns: dict[str, np.ndarray] = {}
    for task in trained.tasks:
        columns.update(task.film_columns(outputs[task.name], named=task in (trained.prognosis, trained.severity)))
    return columns


def _binary_film_columns(task: Task, fitted: Mapping[str, Any], table: pd.DataFrame) -> dict[str, np.ndarray]:
    probability_column = f"p_{task.class_names[1].lower()}"
    binary = calib.BinaryCalibration.from_dict(fitted["binary"])
    probability = binary.apply(table[probability_column].to_numpy(np.float64))
    names = np.asarray(task.class_names, dtype=object)
    members = calib.BinaryConformal.from_dict(fitted["sets"]).predict_set(probability)
    return {f"{probability_column}_calibrated": probability,
            f"{task.name}_at_threshold": names[(probability >= binary.threshold).astype(np.int64)],
            f"{task.name}_set": np.array(["|".join(names[m]) for m in members], dtype=object)}


def _interval_film_columns(task: Task, fitted: Mapping[str, Any], table: pd.DataFrame) -> dict[str, np.ndarray]:
    low, high = calib.IntervalConformal.from_dict(fitted["global"]).predict_interval(
        table["brixia_global"].to_numpy(np.float64))
    regions = [f"brixia_{g}" for g in task.group_names()]
    lows, highs = calib.IntervalConformal.from_dict(fitted["regions"]).predict_interval(
        table[regions].to_numpy(np.float64))
    columns = {"brixia_global_low": low, "brixia_global_high": high}
    for i, name in enumerate(regions):
        columns |= {f"{name}_low": lows[:, i], f"{name}_high": highs[:, i]}
    return columns


def calibration_columns(trained: TrainedModel, table: pd.DataFrame) -> tuple[dict[str, np.ndarray], list[str]]:
    """The columns of the run's ``calibration.json`` (module docstring) for the scored films ``table``, and a note
    for a run without one (or a head it did not calibrate); DataError naming the file when it cannot be read."""
    path = trained.run_dir / CALIBRATION_FILE
    if not path.is_file():
        hint = ("`mdmt report --rescore` on its results folder fits it from the run's validation predictions"
                if any(trained.run_dir.glob(predictions_file("*", "val"))) else "train the run again to get them")
        note = (f"{trained.run_dir}: no {CALIBRATION_FILE} (a run trained before mdmt calibrated on the validation "
                f"fold): no calibrated probability, threshold class, conformal set or interval columns; {hint}")
        return {}, [note]
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: unreadable ({error})") from None
    columns: dict[str, np.ndarray] = {}
    notes = []
    for task in (trained.prognosis, trained.severity):
        if task is None or task.scorer not in ("binary", "regions"):
            continue
        fitted = stored.get(task.name) if isinstance(stored, dict) else None
        if not isinstance(fitted, dict) or "error" in fitted:
            reason = fitted["error"] if isinstance(fitted, dict) else f"no {task.name} entry"
            notes.append(f"{path}: {task.name} not calibrated ({reason}): no calibrated columns for it")
            continue
        columns_of = _binary_film_columns if task.scorer == "binary" else _interval_film_columns
        try:
            columns |= columns_of(task, fitted, table)
        except (KeyError, TypeError, ValueError) as error:
            raise DataError(f"{path}: the {task.name} entry is unreadable ({error!r})") from None
    return columns, notes


def film_columns(films: Sequence[Film]) -> dict[str, list[object]]:
    """The crop of each film: method, flag, note and box in the film's pixels."""
    return {
        "crop_method": [f.box.method for f in films],
        "crop_ok": [bool(f.box.ok) for f in films],
        "crop_note": [f.box.note for f in films],
        **{f"crop_{c}": [int(getattr(f.box, c)) for f in films] for c in ("x0", "y0", "x1", "y1")},
    }


def _batch(trained: TrainedModel, films: list[Film], sheet: ClinicalSheet | None) -> Batch:
    x = network_input([f.image for f in films], trained)
    ids = [f.image_id for f in films]
    clinical = sheet.features(ids) if sheet is not None else None
    features, outputs = trained.features_and_outputs(x, clinical)
    ood = ood_columns(trained.feature_stats, descriptors(features, x)) if trained.feature_stats is not None else {}
    table = pd.DataFrame({"path": [str(f.path) for f in films], "image_id": ids,
                          **head_columns(trained, outputs), **ood, **film_columns(films)})
    if sheet is not None:
        table[IMPUTED_COLUMN] = sheet.imputed(ids)
    return Batch(films, x, clinical, outputs, table)


def iter_batches(trained: TrainedModel, files: Sequence[Path], batch_size: int, skipped: list[tuple[str, str]],
                 progress: bool = True, sheet: ClinicalSheet | None = None) -> Iterator[Batch]:
    """Batches of up to ``batch_size`` readable files, under a progress bar, with their clinical rows of ``sheet``
    (a clinical run's); an unreadable file, one without a usable sheet row, or a film the guard refuses
    (``film_refusal``) is appended to ``skipped`` as ``(path, reason)``."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    films: list[Film] = []
    for path in progress_bar(files, "predict", total=len(files), enabled=progress):
        problem = sheet.problem(path.stem) if sheet is not None else None
        if problem is not None:
            skipped.append((str(path), problem))
            continue
        try:
            film = load_film(path, trained.config.data)
            refusal = film_refusal(film, trained.config.data)
        except ImageReadError as exc:
            skipped.append((str(path), exc.reason))
            continue
        if refusal is not None:
            skipped.append((str(path), refusal))
            continue
        films.append(film)
        if len(films) == batch_size:
            yield _batch(trained, films, sheet)
            films = []
    if films:
        yield _batch(trained, films, sheet)


def write_film_predictions(trained: TrainedModel, table: pd.DataFrame, skipped: pd.DataFrame, out: Path
                           ) -> list[Path]:
    """``predictions.csv``, ``predictions.json`` and ``skipped.csv`` in ``out`` (each written atomically)."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {"run": str(trained.run_dir), "tasks": [t.name for t in trained.tasks],
               "predictions": table.to_dict("records"), "skipped": skipped.to_dict("records")}
    paths = [out / PREDICTIONS_CSV, out / PREDICTIONS_JSON, out / SKIPPED_CSV]
    atomic_write_text(table.to_csv(index=False), paths[0])
    atomic_write_text(json.dumps(strict_json(payload), indent=2, allow_nan=False) + "\n", paths[1])
    atomic_write_text(skipped.to_csv(index=False), paths[2])
    return paths


def predict_files(run_dir: str | Path, paths: Iterable[str | Path], out: str | Path, batch_size: int = 16,
                  device: str = "cpu", progress: bool = True, clinical: str | Path | None = None,
                  clinical_id: str = "ImageFile") -> PredictionResult:
    """Predict every file (folders expanded) with the finished run in ``run_dir`` and write the results to
    ``out``; a clinical run reads each film's row of the sheet ``clinical`` (matched by ``clinical_id``).
    Unreadable files, films without a usable sheet row and films the guard refuses are skipped and listed, never
    fatal."""
    trained = load_trained(run_dir, device)
    sheet = open_clinical_sheet(trained, clinical, clinical_id)
    inputs = expand_inputs(paths)
    skipped = list(inputs.skipped)
    tables = [b.table for b in iter_batches(trained, inputs.files, batch_size, skipped, progress, sheet)]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["path", "image_id"])
    calibrated, notes = calibration_columns(trained, table) if tables else ({}, [])
    at = next((i for i, c in enumerate(table.columns) if c in (*OOD_COLUMNS, "crop_method")), len(table.columns))
    for offset, (name, values) in enumerate(calibrated.items()):
        table.insert(at + offset, name, values)
    skipped_table = pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)
    return PredictionResult(table, skipped_table, write_film_predictions(trained, table, skipped_table, Path(out)),
                            notes + guard_notes(trained, table))
