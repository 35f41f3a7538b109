"""Preprocess each image once into a memory-mapped uint8 cache keyed by its inputs and parameters.

Layout of ``<root>/<dataset>-<key[:16]>/``: ``images.u8`` (N × S × S uint8, row i = image i),
``records.csv`` (the records of the cached images plus crop columns), ``crops.csv`` (each film's crop box, method
and quality flag, to open in a spreadsheet), ``failed.csv`` (unreadable images),
``dropped.csv`` (rows the reader dropped), ``meta.json`` and the ``COMPLETE`` marker, written last.
A build happens in ``<dir>.tmp-<pid>`` and is renamed into place only when complete.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
from PIL import Image

from mdmt.config import DataConfig
from mdmt.data.crop_qc import crop_table
from mdmt.data.dicom import normalize_intensity, read_image
from mdmt.data.lungs import LungBox, crop_to_box, find_mask, resolve_box
from mdmt.data.sources import SourceTable
from mdmt.errors import DataError, ImageReadError
from mdmt.progress import progress_bar

PREPROCESS_VERSION = 2
"""Bump when the preprocessing changes in a way the parameters do not show (invalidates every cache)."""

IMAGES_FILE = "images.u8"
RECORDS_FILE = "records.csv"
FAILED_FILE = "failed.csv"
DROPPED_FILE = "dropped.csv"
CROPS_FILE = "crops.csv"
"""Every film's crop: id, path, status (ok, doubtful, fallback), method, reason, box and its share of the film."""
META_FILE = "meta.json"
COMPLETE_FILE = "COMPLETE"
STRING_COLUMNS = ("image_id", "patient_id", "center", "path", "dataset", "reason", "crop_method", "crop_note")
"""Columns always re-read as strings (20-digit ids must not become numbers)."""
ISSUE_COLUMNS = ["image_id", "path", "reason"]
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

    def __len__(self) -> int:
        return len(self.records)

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        """Pickle as a re-open of the path (cheap for DataLoader workers; the memmap is not copied)."""
        return open_cache, (str(self.path),)


class Preprocessed(NamedTuple):
    """One preprocessed image, the box it was cropped to and the original image size."""

    image: np.ndarray
    box: LungBox
    height: int
    width: int


def resize_square(img: np.ndarray, size: int) -> np.ndarray:
    """Bilinear, antialiased (PIL) resize of a float image to ``size × size``."""
    return np.asarray(Image.fromarray(img.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))


def to_uint8(img01: np.ndarray) -> np.ndarray:
    """[0, 1] float → uint8 with rounding."""
    return np.rint(np.clip(img01, 0.0, 1.0) * 255.0).astype(np.uint8)


def preprocess_image(path: str | Path, image_id: str, cfg: DataConfig) -> Preprocessed:
    """read → percentile clip to [0, 1] → crop to the lung box → resize → uint8 (raises ImageReadError)."""
    img = read_image(path)
    img01 = normalize_intensity(img, *cfg.clip_percentiles)
    box = resolve_box(image_id, img01, cfg)
    crop = crop_to_box(img01, box, cfg.crop_margin)
    return Preprocessed(to_uint8(resize_square(crop, cfg.image_size)), box, int(img.shape[0]), int(img.shape[1]))


def _try_preprocess(item: tuple[str, str], cfg: DataConfig) -> Preprocessed | str:
    """``preprocess_image`` with an unreadable file turned into its reason (picklable across processes)."""
    path, image_id = item
    try:
        return preprocess_image(path, image_id, cfg)
    except ImageReadError as exc:
        return exc.reason


def _file_identity(path: str | Path) -> tuple[int, int]:
    try:
        stat = os.stat(path)
    except OSError:
        return -1, -1
    return stat.st_size, stat.st_mtime_ns


def preprocess_params(cfg: DataConfig) -> dict[str, Any]:
    """The parameters an image's cached pixels depend on (only those of the crop mode in use)."""
    params: dict[str, Any] = {
        "version": PREPROCESS_VERSION,
        "image_size": cfg.image_size,
        "clip_percentiles": list(cfg.clip_percentiles),
        "crop": cfg.crop,
        "crop_margin": cfg.crop_margin,
    }
    if cfg.crop == "lungs":
        from mdmt.data.lung_unet import weights_fingerprint

        params["segmenter"] = weights_fingerprint()
    if cfg.crop == "masks":
        params["masks_dir"] = str(Path(cfg.masks_dir or "").resolve())
    if cfg.crop == "boxes":
        boxes = Path(cfg.boxes_file or "")
        params["boxes_file"] = [str(boxes.resolve()), *_file_identity(boxes)]
    return params


def cache_key(records: pd.DataFrame, cfg: DataConfig) -> str:
    """sha256 over the parameters, the records table and each input file's (id, path, size, mtime_ns)."""
    digest = hashlib.sha256(json.dumps(preprocess_params(cfg), sort_keys=True).encode())
    digest.update(records.to_csv(index=False).encode())
    for image_id, path in zip(records["image_id"], records["path"], strict=True):
        size, mtime = _file_identity(path)
        digest.update(f"{image_id}\0{path}\0{size}\0{mtime}\n".encode())
        if cfg.crop == "masks":
            mask = find_mask(cfg.masks_dir or "", str(image_id))
            digest.update(f"{mask}\0{_file_identity(mask) if mask else ''}\n".encode())
    return digest.hexdigest()


def _text_columns(table: pd.DataFrame) -> list[str]:
    """Columns holding text (kept as text on re-read, so ``"20200315"`` or ``"007"`` stay strings)."""
    return [c for c in table.columns if not pd.api.types.is_numeric_dtype(table[c])]


def _read_table(path: Path, text_columns: Iterable[str] = ()) -> pd.DataFrame:
    """A cache table: id columns as exact strings, other ``text_columns`` as strings with blanks NaN."""
    columns = pd.read_csv(path, nrows=0).columns
    exact = {c: str for c in STRING_COLUMNS if c in columns}
    text = {c: str for c in text_columns if c in columns and c not in exact}
    return pd.read_csv(path, converters=exact, dtype=text)


def open_cache(path: str | Path) -> ImageCache:
    """Open a complete cache directory (images memory-mapped read-only)."""
    path = Path(path)
    if not (path / COMPLETE_FILE).is_file():
        raise DataError(f"{path}: not a complete image cache (no {COMPLETE_FILE} marker)")
    meta = json.loads((path / META_FILE).read_text())
    shape = tuple(meta["shape"])
    images = (
        np.memmap(path / IMAGES_FILE, dtype=np.uint8, mode="r", shape=shape)
        if shape[0] > 0
        else np.zeros(shape, dtype=np.uint8)
    )
    records = _read_table(path / RECORDS_FILE, meta.get("text_columns", ()))
    if len(records) != shape[0]:
        raise DataError(f"{path / RECORDS_FILE}: {len(records)} rows for {shape[0]} cached images")
    return ImageCache(
        path=path,
        key=meta["key"],
        images=images,
        records=records,
        failed=_read_table(path / FAILED_FILE),
        meta=meta,
        dropped=_read_table(path / DROPPED_FILE),
    )


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


def _preprocessed(items: list[tuple[str, str]], cfg: DataConfig, stack: ExitStack) -> Iterable[Preprocessed | str]:
    """Results in input order: in-process, or from ``cfg.workers`` processes in chunks."""
    work = functools.partial(_try_preprocess, cfg=cfg)
    if cfg.workers <= 0:
        return map(work, items)
    pool = stack.enter_context(ProcessPoolExecutor(max_workers=cfg.workers))
    stack.callback(pool.shutdown, cancel_futures=True)
    chunk = max(1, min(32, len(items) // (4 * cfg.workers)))
    return pool.map(work, items, chunksize=chunk)


def _write_images(
    records: pd.DataFrame, cfg: DataConfig, images_path: Path, name: str, progress: bool
) -> tuple[list[int], list[dict[str, Any]], list[dict[str, str]]]:
    """Preprocess every row into ``images_path``; returns kept row numbers, their crop info and failures."""
    size = cfg.image_size
    items = [(str(p), str(i)) for p, i in zip(records["path"], records["image_id"], strict=True)]
    images = np.memmap(images_path, dtype=np.uint8, mode="w+", shape=(max(1, len(items)), size, size))
    kept: list[int] = []
    crops: list[dict[str, Any]] = []
    failures: list[dict[str, str]] = []
    with ExitStack() as stack:
        results: Iterator[Preprocessed | str] = iter(_preprocessed(items, cfg, stack))
        for row, result in enumerate(progress_bar(results, f"caching {name}", total=len(items), enabled=progress)):
            path, image_id = items[row]
            if isinstance(result, str):
                if not cfg.skip_unreadable:
                    raise ImageReadError(path, result)
                failures.append({"image_id": image_id, "path": path, "reason": result})
                continue
            images[len(kept)] = result.image
            box = result.box
            values = [box.ok, box.method, box.note, box.x0, box.y0, box.x1, box.y1, result.height, result.width]
            crops.append(dict(zip(CROP_COLUMNS, values, strict=True)))
            kept.append(row)
    images.flush()
    del images
    os.truncate(images_path, len(kept) * size * size)
    return kept, crops, failures


def _build(
    records: pd.DataFrame, dropped: pd.DataFrame, cfg: DataConfig, key: str, final: Path, progress: bool
) -> None:
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        kept, crops, failures = _write_images(records, cfg, tmp / IMAGES_FILE, final.name, progress)
        cached = records.iloc[kept].reset_index(drop=True)
        cached = pd.concat([cached, pd.DataFrame(crops, columns=CROP_COLUMNS)], axis=1)
        cached.to_csv(tmp / RECORDS_FILE, index=False)
        crop_table(cached).to_csv(tmp / CROPS_FILE, index=False)
        pd.DataFrame(failures, columns=ISSUE_COLUMNS).to_csv(tmp / FAILED_FILE, index=False)
        dropped.reindex(columns=ISSUE_COLUMNS).to_csv(tmp / DROPPED_FILE, index=False)
        meta = {
            "key": key,
            "dataset": final.name.rsplit("-", 1)[0],
            "params": preprocess_params(cfg),
            "shape": [len(kept), cfg.image_size, cfg.image_size],
            "text_columns": _text_columns(cached),
            "n_input": len(records),
            "n_failed": len(failures),
            "n_dropped": len(dropped),
            "n_crop_failsoft": int(sum(not c["crop_ok"] for c in crops)),
            "versions": _versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        (tmp / COMPLETE_FILE).write_text(key + "\n")
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / COMPLETE_FILE).is_file():
                raise
            shutil.rmtree(tmp)  # another process finished the same cache first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def build_cache(source: SourceTable, cfg: DataConfig, root: str | Path, progress: bool = True) -> ImageCache:
    """Preprocess ``source.records`` into ``<root>/<dataset>-<key[:16]>/``, reusing a complete cache with that key.

    ``source`` is a ``SourceTable`` (``records``, ``dropped``). Unreadable images are listed in ``failed``
    when ``cfg.skip_unreadable``; otherwise the first one raises ``ImageReadError`` naming the file.
    """
    records = source.records.reset_index(drop=True)
    missing = [c for c in ("image_id", "path") if c not in records.columns]
    if missing:
        raise DataError(f"records table lacks column(s) {', '.join(missing)}")
    duplicated = records["image_id"][records["image_id"].duplicated()].astype(str).tolist()
    if duplicated:
        raise DataError(f"duplicate image_id(s) in the records table: {', '.join(duplicated[:5])}")
    records["image_id"] = records["image_id"].astype(str)
    key = cache_key(records, cfg)
    final = Path(root) / f"{_dataset_name(records)}-{key[:16]}"
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_builds(final.parent)
    if not (final / COMPLETE_FILE).is_file():
        shutil.rmtree(final, ignore_errors=True)
        _build(records, source.dropped, cfg, key, final, progress)
    cache = open_cache(final)
    if not cfg.skip_unreadable and len(cache.failed):
        first = cache.failed.iloc[0]
        raise ImageReadError(first["path"], first["reason"])
    return cache


def _counts_by_reason(table: pd.DataFrame) -> str:
    """``"3 (2× file not found; 1× invalid DICOM)"``: counts by the reason's text before its first colon."""
    if table.empty:
        return "0"
    counts = table["reason"].str.split(":").str[0].value_counts()
    return f"{len(table)} (" + "; ".join(f"{n}× {reason}" for reason, n in counts.items()) + ")"


def summary_table(caches: dict[str, ImageCache]) -> pd.DataFrame:
    """One row per dataset: cached, dropped and failed counts (with reasons), crop fail-soft count, path."""
    rows = [
        {
            "dataset": name,
            "cached": len(cache.records),
            "dropped": _counts_by_reason(cache.dropped),
            "failed": _counts_by_reason(cache.failed),
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
