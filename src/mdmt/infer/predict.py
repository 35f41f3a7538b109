"""Predict on new films: P(SEVERE), the Brixia bin and the regional scores, with the crop of each film.

Columns of ``predictions.csv`` (and the records of ``predictions.json``), per readable file: ``path``,
``image_id`` (the file stem); with a prognosis head ``p_severe`` (P(SEVERE)) and ``prognosis`` (MILD or
SEVERE, the more probable); with a ``severity_global4`` head ``brixia_bin`` (0–3), ``brixia_bin_range``
(``0-4`` … ``15-18``) and ``p_bin_0`` … ``p_bin_3``; with a regional head (``severity_regions`` or
``severity_ordinal``) ``brixia_A`` … ``brixia_F`` clipped to 0–3, ``brixia_global`` (their sum) and the bin of
that sum; any other head as ``<task>_<column>`` of ``mdmt.losses.decode``; then ``crop_method``, ``crop_ok``,
``crop_note`` and the crop box ``crop_x0`` … ``crop_y1`` in the film's pixels; for a run whose model reads
clinical columns, ``clinical_imputed`` (the columns the film's sheet row left blank, imputed as in training).
Unreadable files, and films the clinical sheet has no usable row for (``mdmt.infer.clinical``), go to
``skipped.csv`` (``path``, ``reason``) and to the ``skipped`` list of the JSON.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mdmt.errors import ConfigError, ImageReadError
from mdmt.evaluate.metrics import REGION_SCORE_RANGE
from mdmt.evaluate.scoring import scorer_of
from mdmt.infer.clinical import IMPUTED_COLUMN, ClinicalSheet, open_clinical_sheet
from mdmt.infer.model_io import TrainedModel, load_trained
from mdmt.infer.preprocess import Film, expand_inputs, load_film, network_input
from mdmt.losses import decode
from mdmt.progress import progress_bar
from mdmt.runs import atomic_write_text, strict_json
from mdmt.tasks import GLOBAL_BIN_EDGES, REGIONS, Task, bin_scores, get_task

PREDICTIONS_CSV = "predictions.csv"
PREDICTIONS_JSON = "predictions.json"
SKIPPED_CSV = "skipped.csv"
SKIPPED_COLUMNS = ["path", "reason"]
BIN_RANGES: tuple[str, ...] = get_task("severity_global4").class_names
PROGNOSIS_CLASSES: tuple[str, ...] = get_task("prognosis").class_names


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
    """The prediction rows, the skipped files (path, reason) and the files written."""

    table: pd.DataFrame
    skipped: pd.DataFrame
    written: list[Path] = field(default_factory=list)


def _bins(values: np.ndarray) -> dict[str, np.ndarray]:
    bins = np.asarray(values).astype(np.int64)
    return {"brixia_bin": bins, "brixia_bin_range": np.array([BIN_RANGES[b] for b in bins], dtype=object)}


def severity_columns(task: Task, raw: torch.Tensor) -> dict[str, np.ndarray]:
    """The Brixia columns of a ``global4`` or ``regions`` severity head (the module docstring lists them)."""
    decoded = decode(task, raw)
    scorer = scorer_of(task)
    if scorer == "global4":
        probabilities = {f"p_bin_{c}": decoded[f"prob_{c}"] for c in range(len(BIN_RANGES))}
        return {**_bins(decoded["y_pred"]), **probabilities}
    if scorer == "regions":
        scores = {f"brixia_{r}": np.clip(decoded[f"y_pred_{r}"].astype(np.float64), *REGION_SCORE_RANGE)
                  for r in REGIONS}
        total = np.sum(list(scores.values()), axis=0)
        return {**scores, "brixia_global": total, **_bins(bin_scores(total, GLOBAL_BIN_EDGES))}
    raise ConfigError(f"task {task.name!r} has no Brixia columns (scorer {scorer!r})")


def head_columns(trained: TrainedModel, outputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Every head's prediction columns for a batch of raw outputs."""
    columns: dict[str, np.ndarray] = {}
    for task in trained.tasks:
        raw = outputs[task.name]
        if task is trained.prognosis and scorer_of(task) == "binary":
            decoded = decode(task, raw)
            columns["p_severe"] = decoded["score"].astype(np.float64)
            columns["prognosis"] = np.array([PROGNOSIS_CLASSES[int(c)] for c in decoded["y_pred"]], dtype=object)
        elif task is trained.severity and scorer_of(task) in ("global4", "regions"):
            columns.update(severity_columns(task, raw))
        else:
            columns.update({f"{task.name}_{k}": v for k, v in decode(task, raw).items()})
    return columns


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
    outputs = trained.outputs(x, clinical)
    table = pd.DataFrame({"path": [str(f.path) for f in films], "image_id": ids,
                          **head_columns(trained, outputs), **film_columns(films)})
    if sheet is not None:
        table[IMPUTED_COLUMN] = sheet.imputed(ids)
    return Batch(films, x, clinical, outputs, table)


def iter_batches(trained: TrainedModel, files: Sequence[Path], batch_size: int, skipped: list[tuple[str, str]],
                 progress: bool = True, sheet: ClinicalSheet | None = None) -> Iterator[Batch]:
    """Batches of up to ``batch_size`` readable files, under a progress bar, with their clinical rows of ``sheet``
    (a clinical run's); an unreadable file, or one without a usable sheet row, is appended to ``skipped`` as
    ``(path, reason)``."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    films: list[Film] = []
    for path in progress_bar(files, "predict", total=len(files), enabled=progress):
        problem = sheet.problem(path.stem) if sheet is not None else None
        if problem is not None:
            skipped.append((str(path), problem))
            continue
        try:
            films.append(load_film(path, trained.config.data))
        except ImageReadError as exc:
            skipped.append((str(path), exc.reason))
            continue
        if len(films) == batch_size:
            yield _batch(trained, films, sheet)
            films = []
    if films:
        yield _batch(trained, films, sheet)


def write_predictions(trained: TrainedModel, table: pd.DataFrame, skipped: pd.DataFrame, out: Path) -> list[Path]:
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
    Unreadable files and films without a usable sheet row are skipped and listed, never fatal."""
    trained = load_trained(run_dir, device)
    sheet = open_clinical_sheet(trained, clinical, clinical_id)
    inputs = expand_inputs(paths)
    skipped = list(inputs.skipped)
    tables = [b.table for b in iter_batches(trained, inputs.files, batch_size, skipped, progress, sheet)]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["path", "image_id"])
    skipped_table = pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)
    return PredictionResult(table, skipped_table, write_predictions(trained, table, skipped_table, Path(out)))
