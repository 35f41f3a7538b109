"""The clinical sheet of new films: rows matched to films by id, encoded with the run's training-fold encoder.

A run whose model reads clinical columns needs a CSV or Excel sheet (read as training reads AIforCOVID's sheets:
``mdmt.sources.tables.read_table``) with one row per film and every column the run's encoder lists. The
``id_column`` (``infer.clinical_id``, default ``ImageFile``) names each row's film: its file name or stem
(``P_1_10.dcm`` and ``P_1_10`` both match the film ``P_1_10.png``). The run's saved encoder (fitted on its training
fold) then encodes each row exactly as in training: a blank value is imputed with the training mean and flagged
by its missing indicator; a category first seen here gets no one-hot bit.

A sheet without the id column or one of the encoder's columns, or with an id twice, is a ConfigError before any
film is read. A film without a row, or whose row holds text in a numeric column, is skipped with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from mdmt.clinical_encoder import ClinicalEncoder
from mdmt.errors import ConfigError
from mdmt.infer.model_io import TrainedModel
from mdmt.sources.tables import image_id_of, read_table

IMPUTED_COLUMN = "clinical_imputed"
"""Prediction column: the clinical columns a film's row left blank (imputed as in training), ``;``-separated."""


@dataclass
class ClinicalSheet:
    """A sheet's rows by film id, and the run's encoder."""

    path: Path
    id_column: str
    rows: pd.DataFrame
    """One row per film id (the index), the encoder's columns as text or NaN."""
    encoder: ClinicalEncoder

    def problem(self, image_id: str) -> str | None:
        """Why the film ``image_id`` cannot be predicted from this sheet, or None."""
        if image_id not in self.rows.index:
            return f"no row with {self.id_column} {image_id!r} in the clinical sheet {self.path}"
        row = self.rows.loc[image_id]
        bad = [f"{name} = {row[name]!r}" for name in self.encoder.numeric
               if pd.notna(row[name]) and pd.isna(pd.to_numeric(row[name], errors="coerce"))]
        return f"clinical sheet {self.path}: not a number: {', '.join(bad)}" if bad else None

    def features(self, image_ids: Sequence[str]) -> torch.Tensor:
        """The encoded features ``(B, D)`` of the films (each must have a row without a ``problem``)."""
        return torch.from_numpy(self.encoder.transform(self.rows.loc[list(image_ids)]))

    def imputed(self, image_ids: Sequence[str]) -> list[str]:
        """Per film, the clinical columns its row leaves blank."""
        blank = self.rows.loc[list(image_ids), self.encoder.columns].isna()
        return [";".join(name for name in self.encoder.columns if flags[name]) for _, flags in blank.iterrows()]


def read_clinical_sheet(path: str | Path, id_column: str, encoder: ClinicalEncoder) -> ClinicalSheet:
    """The sheet at ``path`` with its rows keyed by ``id_column`` (ConfigError naming what it lacks)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"clinical sheet not found: {path}")
    table = read_table(path)
    missing = [c for c in [id_column, *encoder.columns] if c not in table.columns]
    if missing:
        raise ConfigError(f"clinical sheet {path} lacks column(s) {missing} that the run needs (it has "
                          f"{list(table.columns)[:40]}); the id column is set by --clinical-id (infer.clinical_id)")
    table = table[table[id_column].notna()]
    ids = table[id_column].map(image_id_of)
    repeated = sorted(set(ids[ids.duplicated()]))
    if repeated:
        raise ConfigError(f"clinical sheet {path}: {id_column} names these films on several rows: {repeated[:10]}")
    return ClinicalSheet(path, id_column, table[encoder.columns].set_axis(pd.Index(ids, name=id_column)), encoder)


def open_clinical_sheet(trained: TrainedModel, sheet: str | Path | None, id_column: str) -> ClinicalSheet | None:
    """The clinical sheet a run needs: ConfigError when a clinical run gets none (naming the columns it needs) or
    a run without clinical inputs gets one."""
    if trained.encoder is None:
        if sheet is not None:
            raise ConfigError(f"{trained.run_dir}: the run's model reads no clinical columns; drop --clinical "
                              f"(infer.clinical)")
        return None
    if sheet is None:
        raise ConfigError(f"{trained.run_dir}: the run's model reads clinical columns; give a sheet with "
                          f"--clinical SHEET.csv|xlsx (infer.clinical) holding an {id_column} column and "
                          f"{trained.encoder.columns}")
    return read_clinical_sheet(sheet, id_column, trained.encoder)

