"""Preprocess each image once into a memory-mapped uint8 cache keyed by its inputs and parameters.
(Over 400 lines on purpose: building, keying, verifying and opening the cache are one file format, and each half of
a split would restate it.)

Layout of ``<root>/<dataset>-<key[:16]>/``: ``images.u8`` (N × S × S uint8, row i = image i),
``records.csv`` (the records of the cached images plus crop columns and ``content_sha256``, the sha256 of the
source file), ``crops.csv`` (each film's crop box, method and quality flag, to open in a spreadsheet),
``failed.csv`` (unreadable images), ``dropped.csv`` (rows the reader dropped), ``duplicates.csv`` (ids whose
file is byte-identical to an earlier id's), ``meta.json`` (with the sha256 of every table and of ``images.u8``)
and the ``COMPLETE`` marker, written last. A cache built with ``masks=True`` (for a segmentation task) also holds
``masks.u8`` (N × S × S uint8, 0 or 1): each record's ``mask_path`` cropped to the same lung box and resized to the
same square as its film (bilinear, antialiased, then thresholded at one half), and the records column
``mask_present`` (the mask file was given, read and has foreground in the crop); its key differs from the key
without masks, so a cache built without them stays valid for runs that do not ask for them.

A build happens in ``<dir>.tmp-<pid>``: the free space is checked first, the images are streamed to disk (never
written through a memory map), every file is fsynced, and the folder is renamed into place only when complete;
on any failure it is removed. A cache whose files do not match ``meta.json`` is rebuilt. The images' content is
checked against their sha256 by ``verify_images`` (a whole read of the file: ``build_cache`` rebuilds a cache that
fails it, a run refuses one); the size alone would let bytes overwritten in place pass.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable
from contextlib import ExitStack, closing
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from mdmt.cache.crop_qc import crop_table
from mdmt.cache.preprocess import (
    Preprocessed,
    file_identity,
    file_sha256,
    preprocess_params,
    resize_square,
    try_preprocess,
)
from mdmt.config import DataConfig
from mdmt.errors import DataError, ImageReadError
from mdmt.lungs.locate import crop_to_box, find_mask, read_mask
from mdmt.parallel import ordered_map
from mdmt.progress import progress_bar
from mdmt.runs import atomic_write_text
from mdmt.sources import SourceTable
from mdmt.sources.tables import MASK_PATH
from mdmt.tasks import MASK_PRESENT

log = logging.getLogger(__name__)


IMAGES_FILE = "images.u8"
RECORDS_FILE = "records.csv"
FAILED_FILE = "failed.csv"
DROPPED_FILE = "dropped.csv"
DUPLICATES_FILE = "duplicates.csv"
MASKS_FILE = "masks.u8"
MASKS_CHECKSUM = "masks_sha256"
CROPS_FILE = "crops.csv"
"""Every film's crop: id, path, status (ok, doubtful, fallback), method, reason, box and its share of the film."""
META_FILE = "meta.json"
IMAGES_CHECKSUM = "images_sha256"
"""``meta.json`` key: the sha256 of ``images.u8`` as the build wrote it."""
COMPLETE_FILE = "COMPLETE"
CONTENT_HASH = "content_sha256"
"""Records column: sha256 of the image file's bytes (byte-identical files under two ids share it)."""
STRING_COLUMNS = ("image_id", "patient_id", "center", "path", "dataset", "reason", "crop_method", "crop_note",
                  CONTENT_HASH, "duplicate_of")
"""Columns always re-read as strings (20-digit ids must not become numbers)."""
ISSUE_COLUMNS = ["image_id", "path", "reason"]
SPACE_MARGIN = 64 * 2**20
"""Free bytes a build needs beyond its images (tables, metadata, the file system's own)."""
SHOWN_DUPLICATES = 10
"""Duplicate pairs named one per line in the build's warning; the rest are in ``duplicates.csv``."""
CROP_COLUMNS = [
    "crop_ok",
    "crop_method",
    "crop_note",
    "box_x0",
    "box_y0",
    "box_x1",
    "box_y1",
    "orig_height",
    "orig_width",
]


@dataclass
class ImageCache:
    """A complete cache: ``images[i]`` is the preprocessed image of ``records.iloc[i]``."""

    path: Path
    key: str
    images: np.ndarray
    records: pd.DataFrame
    failed: pd.DataFrame
    meta: dict[str, Any]
    dropped: pd.DataFrame
    duplicates: pd.DataFrame
    masks: np.ndarray | None = None
    """``masks[i]`` is the cropped lung mask (0/1) of ``records.iloc[i]``; None for a cache built without masks."""

    def __len__(self) -> int:
        return len(self.records)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        """Pickle as a re-open of the path (cheap for DataLoader workers; the memmap is not copied)."""
        return open_cache, (str(self.path),)


def cache_key(records: pd.DataFrame, cfg: DataConfig, masks: bool = False) -> str:
    """sha256 over the parameters, the records table and each input file's (id, path, size, mtime_ns); with
    ``masks``, also each mask file's identity (a key without masks is the key the cache had before masks existed)."""
    params = preprocess_params(cfg) | ({"masks": MASKS_FILE} if masks else {})
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    digest.update(records.to_csv(index=False).encode())
    for image_id, path in zip(records["image_id"], records["path"], strict=True):
        size, mtime = file_identity(path)
        digest.update(f"{image_id}\0{path}\0{size}\0{mtime}\n".encode())
        if cfg.crop == "masks":
            mask = find_mask(cfg.masks_dir or "", str(image_id))
            digest.update(f"{mask}\0{file_identity(mask) if mask else ''}\n".encode())
    if masks:
        for path in _mask_paths(records):
            digest.update(f"{path}\0{file_identity(path) if path else ''}\n".encode())
    return digest.hexdigest()


def _mask_paths(records: pd.DataFrame) -> list[str]:
    """Each record's ``mask_path`` as text, ``""`` where it has none (or the table has no such column)."""
    if MASK_PATH not in records:
        return [""] * len(records)
    return ["" if pd.isna(p) or not str(p).strip() else str(p) for p in records[MASK_PATH]]


def crop_mask(path: str, result: Preprocessed, cfg: DataConfig) -> np.ndarray | None:
    """The mask file ``path`` as its film was preprocessed in ``result``: brought to the film's size (nearest) if it
    differs, cropped to the same box and margin, resized to the same square (bilinear, antialiased) and thresholded
    at one half into uint8 0/1; None when the mask cannot be read or has no foreground in the crop."""
    try:
        mask = read_mask(path) > 0
    except ImageReadError:
        return None
    if mask.shape != (result.height, result.width):
        mask = np.asarray(Image.fromarray(mask).resize((result.width, result.height), Image.NEAREST))
    crop = crop_to_box(mask.astype(np.float32), result.box, cfg.crop_margin)
    square = (resize_square(crop, cfg.image_size) >= 0.5).astype(np.uint8)
    return square if square.any() else None


def _text_columns(table: pd.DataFrame) -> list[str]:
    """Columns holding text (kept as text on re-read, so ``"20200315"`` or ``"007"`` stay strings)."""
    return [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]


def _read_table(path: Path, text_columns: Iterable[str] = ()) -> pd.DataFrame:
    """A cache table: id columns as exact strings, other ``text_columns`` as strings with blanks NaN."""
    columns = pd.read_csv(path, nrows=0).columns
    exact = {c: str for c in STRING_COLUMNS if c in columns}
    text = {c: str for c in text_columns if c in columns and c not in exact}
    return pd.read_csv(path, converters=exact, dtype=text)


def _read_meta(path: Path) -> dict[str, Any]:
    """``meta.json`` with the fields ``open_cache`` relies on checked (DataError naming the file)."""
    file = path / META_FILE
    try:
        meta = json.loads(file.read_text())
        meta["shape"] = [int(n) for n in meta["shape"]]
        if len(meta["shape"]) != 3 or not isinstance(meta["key"], str) or not isinstance(meta["tables"], dict):
            raise ValueError("shape, key or tables malformed")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{file}: unreadable cache metadata ({type(exc).__name__}: {exc})") from exc
    return meta


def _arrays(meta: dict[str, Any]) -> dict[str, str]:
    """The cache's array files and the ``meta.json`` key of each one's sha256 (masks only where built with them)."""
    return {IMAGES_FILE: IMAGES_CHECKSUM, **({MASKS_FILE: MASKS_CHECKSUM} if MASKS_CHECKSUM in meta else {})}


def _check_files(path: Path, meta: dict[str, Any]) -> None:
    """DataError naming the first file that is missing, of the wrong size (arrays) or not as written (tables)."""
    expected = int(np.prod(meta["shape"]))
    for name in _arrays(meta):
        array = path / name
        try:
            size = array.stat().st_size
        except OSError as exc:
            raise DataError(f"{array}: cannot read the cached images ({exc.strerror or exc})") from exc
        if size != expected:
            raise DataError(f"{array}: {size} bytes, expected {expected} ({meta['shape'][0]} images of "
                            f"{meta['shape'][1]}×{meta['shape'][2]}): truncated or corrupt")
    for name, digest in meta["tables"].items():
        table = path / name
        try:
            actual = file_sha256(table)
        except OSError as exc:
            raise DataError(f"{table}: cannot read the cache table ({exc.strerror or exc})") from exc
        if actual != digest:
            raise DataError(f"{table}: contents differ from what {META_FILE} recorded (truncated or corrupt)")


def open_cache(path: str | Path) -> ImageCache:
    """Open a complete cache directory (images memory-mapped read-only).

    DataError naming the file when the marker is missing, ``meta.json`` is unreadable or lacks a checksum,
    ``images.u8`` has the wrong size or a table is not the one the build wrote. The images' content is not read
    here (``verify_images`` does it), so a loader worker re-opens a cache at no cost.
    """
    path = Path(path)
    if not (path / COMPLETE_FILE).is_file():
        raise DataError(f"{path}: not a complete image cache (no {COMPLETE_FILE} marker)")
    meta = _read_meta(path)
    missing = [name for name in (RECORDS_FILE, FAILED_FILE, DROPPED_FILE, DUPLICATES_FILE)
               if name not in meta["tables"]] + ([] if isinstance(meta.get(IMAGES_CHECKSUM), str) else [IMAGES_FILE])
    if missing:
        raise DataError(f"{path / META_FILE}: no checksum for {', '.join(missing)} (written by an older mdmt)")
    _check_files(path, meta)
    shape = tuple(meta["shape"])
    arrays = {name: np.memmap(path / name, dtype=np.uint8, mode="r", shape=shape) if shape[0] > 0
              else np.zeros(shape, dtype=np.uint8) for name in _arrays(meta)}
    images = arrays[IMAGES_FILE]
    return ImageCache(
        path=path,
        key=meta["key"],
        images=images,
        records=_read_table(path / RECORDS_FILE, meta.get("text_columns", ())),
        failed=_read_table(path / FAILED_FILE),
        meta=meta,
        dropped=_read_table(path / DROPPED_FILE),
        duplicates=_read_table(path / DUPLICATES_FILE),
        masks=arrays.get(MASKS_FILE),
    )


_VERIFIED: set[tuple[str, int, int]] = set()
"""(images.u8, size, mtime_ns) of the caches whose images this process has found to match their checksum."""


def _check_images(cache: ImageCache) -> None:
    """DataError naming ``images.u8`` (or ``masks.u8``) when its sha256 is not the one ``meta.json`` recorded at
    the build.

    Hashing reads the whole file: 1.2 s for a paper-sized cache (6,280 images of 256 px, 392.5 MiB, from the page
    cache, on 2 cores shared with other work; ``benchmarks/cache_checksum.py``), so a process hashes a cache once
    and again only when the file's size or modification time changed.
    """
    for name, checksum in _arrays(cache.meta).items():
        images = cache.path / name
        try:
            stat = images.stat()
            seen = (str(images), stat.st_size, stat.st_mtime_ns)
            if seen in _VERIFIED:
                continue
            digest = file_sha256(images)
        except OSError as exc:
            raise DataError(f"{images}: cannot read the cached images ({exc.strerror or exc})") from exc
        if digest != cache.meta[checksum]:
            raise DataError(f"{images}: contents differ from the sha256 {META_FILE} recorded at the build (bytes "
                            f"overwritten or corrupt)")
        _VERIFIED.add(seen)


def verify_images(cache: ImageCache) -> ImageCache:
    """``cache`` once its images match their checksum (``_check_images``); a run's DataError otherwise, naming the
    file and how to rebuild the cache."""
    try:
        _check_images(cache)
    except DataError as exc:
        raise DataError(f"{exc}; the cache is refused: `mdmt prepare` rebuilds it") from None
    return cache


def _dataset_name(records: pd.DataFrame) -> str:
    names = records["dataset"].dropna().unique() if "dataset" in records else []
    name = str(names[0]) if len(names) else "dataset"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _remove_dead_builds(root: Path) -> None:
    """Delete ``<cache>.tmp-<pid>`` folders under ``root`` whose building process no longer exists."""
    for tmp in root.glob("*.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # alive, owned by another user


def _versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0]}
    for package in ("mdmt", "numpy", "pillow", "pydicom", "scipy", "pandas"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "absent"
    return versions


def _check_space(final: Path, n_images: int, size: int) -> None:
    """DataError naming the cache folder ``final`` when the disk of its (existing) parent cannot hold ``n_images``
    images of ``size × size`` bytes."""
    needed = n_images * size * size + SPACE_MARGIN
    free = shutil.disk_usage(final.parent).free
    if free < needed:
        raise DataError(f"{final}: not enough free disk space for the image cache: {needed} bytes needed "
                        f"({n_images} images of {size}×{size} plus {SPACE_MARGIN} spare), {free} free")


def _write_images(
    records: pd.DataFrame, cfg: DataConfig, images_path: Path, name: str, progress: bool, workers: int,
    masks_path: Path | None = None,
) -> tuple[list[int], list[dict[str, Any]], list[dict[str, str]]]:
    """Preprocess every row (in ``workers`` processes, 0: this one) and stream the images to ``images_path``
    (fsynced), and with ``masks_path`` each row's cropped mask there (``crop_mask``; zeros where none).

    Returns the kept row numbers, their crop columns and file hash (and ``mask_present``), and the failures.
    """
    items = [(str(p), str(i)) for p, i in zip(records["path"], records["image_id"], strict=True)]
    mask_paths = _mask_paths(records)
    kept: list[int] = []
    added: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    with open(images_path, "wb") as out, ExitStack() as stack:
        mask_out = stack.enter_context(open(masks_path, "wb")) if masks_path is not None else None
        results = stack.enter_context(closing(ordered_map(functools.partial(try_preprocess, cfg=cfg), items,
                                                          workers)))
        for row, result in enumerate(progress_bar(results, f"caching {name}", total=len(items), enabled=progress)):
            path, image_id = items[row]
            if isinstance(result, str):
                if not cfg.skip_unreadable:
                    raise ImageReadError(path, result)
                failures.append({"image_id": image_id, "path": path, "reason": result})
                continue
            out.write(np.ascontiguousarray(result.image, dtype=np.uint8).tobytes())
            box = result.box
            values = [box.ok, box.method, box.note, box.x0, box.y0, box.x1, box.y1, result.height, result.width,
                      result.sha256]
            added.append(dict(zip([*CROP_COLUMNS, CONTENT_HASH], values, strict=True)))
            if mask_out is not None:
                mask = crop_mask(mask_paths[row], result, cfg) if mask_paths[row] else None
                mask_out.write(np.zeros_like(result.image).tobytes() if mask is None else mask.tobytes())
                added[-1][MASK_PRESENT] = mask is not None
            kept.append(row)
        for handle in (out, mask_out):
            if handle is not None:
                handle.flush()
                os.fsync(handle.fileno())
    return kept, added, failures


def duplicate_table(records: pd.DataFrame) -> pd.DataFrame:
    """One row per image whose file is byte-identical to an earlier image's: image_id, duplicate_of, sha256."""
    first = records.groupby(CONTENT_HASH, sort=False)["image_id"].transform("first")
    table = pd.DataFrame({"image_id": records["image_id"], "duplicate_of": first, CONTENT_HASH: records[CONTENT_HASH]})
    return table[records[CONTENT_HASH].duplicated()].reset_index(drop=True)


def _write_table(table: pd.DataFrame, path: Path) -> str:
    """``table`` written as CSV through an fsync and a rename; returns the sha256 of its bytes."""
    data = table.to_csv(index=False)
    atomic_write_text(data, path)
    return hashlib.sha256(data.encode("utf-8")).hexdigest()


def _build(
    records: pd.DataFrame, dropped: pd.DataFrame, cfg: DataConfig, key: str, final: Path, progress: bool,
    workers: int, masks: bool = False,
) -> None:
    """Build the cache in ``<final>.tmp-<pid>`` and rename it to ``final``; the temp folder never outlives a failure."""
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _check_space(final, len(records) * (2 if masks else 1), cfg.image_size)
        tmp.mkdir(parents=True)
        kept, added, failures = _write_images(records, cfg, tmp / IMAGES_FILE, final.name, progress, workers,
                                              tmp / MASKS_FILE if masks else None)
        cached = records.iloc[kept].reset_index(drop=True)
        added_columns = [*CROP_COLUMNS, CONTENT_HASH, *([MASK_PRESENT] if masks else [])]
        cached = pd.concat([cached, pd.DataFrame(added, columns=added_columns)], axis=1)
        tables = {
            RECORDS_FILE: cached,
            CROPS_FILE: crop_table(cached),
            FAILED_FILE: pd.DataFrame(failures, columns=ISSUE_COLUMNS),
            DROPPED_FILE: dropped.reindex(columns=ISSUE_COLUMNS),
            DUPLICATES_FILE: duplicate_table(cached),
        }
        meta = {
            "key": key,
            "dataset": final.name.rsplit("-", 1)[0],
            "params": preprocess_params(cfg),
            "shape": [len(kept), cfg.image_size, cfg.image_size],
            "text_columns": _text_columns(cached),
            "n_input": len(records),
            "n_failed": len(failures),
            "n_dropped": len(dropped),
            "n_duplicates": len(tables[DUPLICATES_FILE]),
            "n_crop_failsoft": int(sum(not c["crop_ok"] for c in added)),
            "tables": {name: _write_table(table, tmp / name) for name, table in tables.items()},
            IMAGES_CHECKSUM: file_sha256(tmp / IMAGES_FILE),
            **({MASKS_CHECKSUM: file_sha256(tmp / MASKS_FILE)} if masks else {}),
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_text(json.dumps(meta, indent=2), tmp / META_FILE)
        atomic_write_text(key + "\n", tmp / COMPLETE_FILE)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / COMPLETE_FILE).is_file():
                raise
            shutil.rmtree(tmp)  # another process finished the same cache first
    except OSError as exc:  # read-only folder, full disk, a file that vanished
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{final.parent}: cannot write the image cache ({exc})") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _open_existing(final: Path) -> ImageCache | None:
    """The cache at ``final`` if it opens and its images match their checksum; a folder there that does not is
    removed with a warning (to rebuild)."""
    if not final.exists():
        return None
    try:
        cache = open_cache(final)
        _check_images(cache)
        return cache
    except DataError as exc:
        log.warning("%s; rebuilding the cache", exc)
        shutil.rmtree(final, ignore_errors=True)
        return None


def _warn_duplicates(cache: ImageCache) -> None:
    """One warning line per byte-identical pair (the first few), naming both ids."""
    name = cache.meta["dataset"]
    for row in cache.duplicates.head(SHOWN_DUPLICATES).itertuples(index=False):
        log.warning("%s: %s and %s are byte-identical files (sha256 %s…); every split keeps them on one side",
                    name, row.duplicate_of, row.image_id, str(getattr(row, CONTENT_HASH))[:12])
    if len(cache.duplicates) > SHOWN_DUPLICATES:
        log.warning("%s: %d more byte-identical file(s) listed in %s", name,
                    len(cache.duplicates) - SHOWN_DUPLICATES, cache.path / DUPLICATES_FILE)


def build_cache(source: SourceTable, cfg: DataConfig, root: str | Path, progress: bool = True, workers: int = 0,
                masks: bool = False) -> ImageCache:
    """Preprocess ``source.records`` into ``<root>/<dataset>-<key[:16]>/``, reusing a complete cache with that key.
    ``workers`` processes preprocess the images (``runtime.workers``; 0: this one); the cache is the same.
    ``masks`` also caches each record's ``mask_path`` aligned with its film (``masks.u8``, for segmentation tasks).

    ``source`` is a ``SourceTable`` (``records``, ``dropped``). Unreadable images are listed in ``failed``
    when ``cfg.skip_unreadable``; otherwise the first one raises ``ImageReadError`` naming the file. A cache
    folder that does not open (corrupt or truncated files) is rebuilt with a warning.
    """
    records = source.records.reset_index(drop=True)
    missing = [c for c in ("image_id", "path") if c not in records.columns]
    if missing:
        raise DataError(f"records table lacks column(s) {', '.join(missing)}")
    duplicated = records["image_id"][records["image_id"].duplicated()].astype(str).tolist()
    if duplicated:
        raise DataError(f"duplicate image_id(s) in the records table: {', '.join(duplicated[:5])}")
    records["image_id"] = records["image_id"].astype(str)
    key = cache_key(records, cfg, masks)
    final = Path(root) / f"{_dataset_name(records)}-{key[:16]}"
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{final.parent}: cannot create the cache folder ({exc})") from exc
    _remove_dead_builds(final.parent)
    cache = _open_existing(final)
    if cache is None:
        _build(records, source.dropped, cfg, key, final, progress, workers, masks)
        cache = open_cache(final)
        _warn_duplicates(cache)
    if not cfg.skip_unreadable and len(cache.failed):
        first = cache.failed.iloc[0]
        raise ImageReadError(first["path"], first["reason"])
    return cache


def counts_by_reason(table: pd.DataFrame, top: int | None = None) -> str:
    """``"3 (2× file not found; 1× invalid DICOM)"``: counts by the reason's text before its first colon.

    ``top`` keeps the most frequent reasons only (the others are counted as ``…``).
    """
    if table.empty:
        return "0"
    counts = table["reason"].astype(str).str.split(":").str[0].value_counts()
    shown = [f"{n}× {reason}" for reason, n in counts.head(top).items()]
    return f"{len(table)} (" + "; ".join(shown) + ("; …" if len(shown) < len(counts) else "") + ")"


def summary_table(caches: dict[str, ImageCache]) -> pd.DataFrame:
    """One row per dataset: cached, dropped and failed counts (with reasons), crop fail-soft count, path."""
    rows = [
        {
            "dataset": name,
            "cached": len(cache.records),
            "dropped": counts_by_reason(cache.dropped),
            "failed": counts_by_reason(cache.failed),
            "duplicates": len(cache.duplicates),
            "crop_failsoft": int((~cache.records["crop_ok"].astype(bool)).sum()),
            "path": str(cache.path),
        }
        for name, cache in caches.items()
    ]
    return pd.DataFrame(rows)


def print_summary(caches: dict[str, ImageCache]) -> None:
    """Print ``summary_table`` as a rich table."""
    from rich.console import Console
    from rich.table import Table

    summary = summary_table(caches)
    table = Table(title="image caches")
    for column in summary.columns:
        table.add_column(column)
    for row in summary.itertuples(index=False):
        table.add_row(*map(str, row))
    Console().print(table)
