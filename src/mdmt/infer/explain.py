"""``mdmt explain``: Grad-CAM overlays of the prognosis and severity heads, the Brixia zones, contact sheets.

For each readable film ``<n>-<stem>`` (``n`` its position, so films with the same name do not collide) it
writes ``<n>-<stem>_<task>.png`` per explained head (``cam`` says what each head's map shows),
``<n>-<stem>_zones.png`` (the six zones of ``overlays`` with the predicted regional scores, or the predicted
bin when the run's severity head has no regional scores) and ``contact-sheet-NNN.png`` (input, each head's
map and the zones, one row per film), plus the ``predict`` files with the overlay names as extra columns.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd
from PIL import Image

from mdmt.errors import ConfigError
from mdmt.infer.cam import EXPLAIN_MAPS, GRAD_CAM_METHODS
from mdmt.infer.clinical_sheet import open_clinical_sheet
from mdmt.infer.films import Film, expand_inputs
from mdmt.infer.guard import guard_notes
from mdmt.infer.model_io import TrainedModel, load_trained
from mdmt.infer.overlays import (
    ContactSheets,
    cam_overlay,
    display,
    save_png,
    zone_boxes,
    zone_overlay,
)
from mdmt.infer.predict import (
    SKIPPED_COLUMNS,
    Batch,
    PredictionResult,
    iter_batches,
    write_film_predictions,
)
from mdmt.tasks import REGIONS, Task

CAPTION_CHARS = 100
ZONES = "zones"


def explained_tasks(trained: TrainedModel) -> list[Task]:
    """The heads ``explain`` maps: prognosis and the Brixia severity head, those the run has."""
    tasks = [t for t in (trained.prognosis, trained.severity) if t is not None]
    if not tasks:
        raise ConfigError(f"{trained.run_dir}: the run has neither a prognosis nor a severity head to explain")
    return tasks


def summary(row: pd.Series) -> str:
    """One line of a film's predictions: P(SEVERE), the Brixia global score and bin, those the run gives."""
    parts = []
    if "p_severe" in row:
        parts.append(f"P(SEVERE) {row['p_severe']:.2f}")
    if "brixia_global" in row:
        parts.append(f"Brixia {row['brixia_global']:.1f}")
    if "brixia_bin_range" in row:
        parts.append(f"bin {row['brixia_bin_range']}")
    return " · ".join(parts)


def zones_picture(film: Film, row: pd.Series, trained: TrainedModel) -> Image.Image:
    """The zone overlay of one film with its predicted regional scores (when the severity head has them)."""
    box = film.box
    zones = zone_boxes((box.x0, box.y0, box.x1, box.y1), film.window(trained.config.data.crop_margin),
                       film.image.shape[0])
    scores = [float(row[f"brixia_{r}"]) for r in REGIONS] if "brixia_A" in row else None
    return zone_overlay(film.image, zones, scores, summary(row))


def _explain_batch(trained: TrainedModel, batch: Batch, tasks: list[Task], out: Path, start: int,
                   sheets: ContactSheets, explain_map: str, cam_layer: str) -> pd.DataFrame:
    layer = {"layer": cam_layer} if cam_layer else {}
    cams = {t.name: EXPLAIN_MAPS[explain_map](trained.model, t, batch.x, batch.clinical, **layer) for t in tasks}
    table = batch.table.copy()
    names: dict[str, list[str]] = {name: [] for name in [*cams, ZONES]}
    for i, film in enumerate(batch.films):
        stem = f"{start + i:04d}-{film.image_id}"
        row = table.iloc[i]
        pictures = {name: cam_overlay(film.image, maps[i]) for name, maps in cams.items()}
        pictures[ZONES] = zones_picture(film, row, trained)
        for name, picture in pictures.items():
            names[name].append(save_png(picture, out / f"{stem}_{name}.png").name)
        caption = f"{film.image_id} · {summary(row)} · crop {film.box.method}{'' if film.box.ok else ' (flagged)'}"
        sheets.add([display(Image.fromarray(film.image).convert("RGB")), *pictures.values()],
                   caption[:CAPTION_CHARS])
    for name, files in names.items():
        table[f"overlay_{name}"] = files
    return table


def explain_files(run_dir: str | Path, paths: Iterable[str | Path], out: str | Path, batch_size: int = 16,
                  device: str = "cpu", progress: bool = True, clinical: str | Path | None = None,
                  clinical_id: str = "ImageFile", explain_map: str = "gradcam", cam_layer: str = ""
                  ) -> PredictionResult:
    """Evidence maps (``explain_map``: Grad-CAM, a variant of it weighing the backbone module ``cam_layer`` (empty:
    the last convolutional stage), or occlusion; ``mdmt.infer.cam.EXPLAIN_MAPS``) and zone overlays of
    every file (folders expanded) with the finished run in ``run_dir``, written to ``out`` with contact sheets and
    the predictions; a clinical run reads each film's row of the sheet ``clinical`` (matched by ``clinical_id``).
    Unreadable files and films without a usable row are skipped and listed."""
    if explain_map not in EXPLAIN_MAPS:
        raise ConfigError(f"explain_map must be one of {', '.join(EXPLAIN_MAPS)}, got {explain_map!r}")
    if cam_layer and explain_map not in GRAD_CAM_METHODS:
        raise ConfigError(f"cam_layer names the layer of a Grad-CAM map; the {explain_map} map has none")
    trained = load_trained(run_dir, device)
    sheet = open_clinical_sheet(trained, clinical, clinical_id)
    tasks = explained_tasks(trained)
    inputs = expand_inputs(paths)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sheets = ContactSheets(out, ["input", *(t.name for t in tasks), ZONES])
    skipped = list(inputs.skipped)
    tables: list[pd.DataFrame] = []
    for batch in iter_batches(trained, inputs.files, batch_size, skipped, progress, sheet):
        tables.append(_explain_batch(trained, batch, tasks, out, sum(len(t) for t in tables), sheets, explain_map,
                                     cam_layer))
    sheets.flush()
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["path", "image_id"])
    skipped_table = pd.DataFrame(skipped, columns=SKIPPED_COLUMNS)
    written = write_film_predictions(trained, table, skipped_table, out) + sheets.written
    return PredictionResult(table, skipped_table, written, guard_notes(trained, table))
