"""Dataset readers: each turns one dataset on disk into a records table (docs/architecture.md, docs/formats.md).

A reader never raises for one missing or bad file: it drops the row and says why in
``SourceTable.dropped``. It raises ``DataError`` for structural problems (missing root, sheet or
column, unknown label value, duplicate id). Unreadable pixel data is found later by the cache builder.
The helpers the readers share live in ``mdmt.sources.tables``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mdmt.errors import ConfigError
from mdmt.sources.aiforcovid import read_aiforcovid
from mdmt.sources.brixia import read_brixia, read_brixia_consensus
from mdmt.sources.manifest import read_manifest
from mdmt.sources.scored_films import read_scored_films
from mdmt.sources.tables import (
    DROPPED_COLUMNS,
    ID_COLUMNS,
    IMAGE_SUFFIXES,
    KNOWN_BAD_REASON,
    LABEL_COLUMNS,
    RECORD_COLUMNS,
    ImageFolders,
    SourceTable,
    existing_dir,
    find_column,
    first_ids,
    image_id_of,
    make_source_table,
    numeric_where_possible,
    read_table,
    sniff_delimiter,
)

READERS: dict[str, Callable[..., SourceTable]] = {
    "aiforcovid": read_aiforcovid,
    "brixia": read_brixia,
    "manifest": read_manifest,
    "scored_films": read_scored_films,
}


def read_source(kind: str, path: str | Path, **opts: Any) -> SourceTable:
    """Read a dataset with the reader registered as ``kind`` (``aiforcovid``, ``brixia``, ``manifest``,
    ``scored_films``)."""
    if kind not in READERS:
        raise ConfigError(f"unknown dataset kind {kind!r}; known kinds: {sorted(READERS)}")
    return READERS[kind](path, **opts)


__all__ = [
    "DROPPED_COLUMNS",
    "ID_COLUMNS",
    "IMAGE_SUFFIXES",
    "ImageFolders",
    "KNOWN_BAD_REASON",
    "LABEL_COLUMNS",
    "READERS",
    "RECORD_COLUMNS",
    "SourceTable",
    "existing_dir",
    "find_column",
    "first_ids",
    "image_id_of",
    "make_source_table",
    "numeric_where_possible",
    "read_aiforcovid",
    "read_brixia",
    "read_brixia_consensus",
    "read_manifest",
    "read_scored_films",
    "read_source",
    "read_table",
    "sniff_delimiter",
]
