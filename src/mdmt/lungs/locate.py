"""Lung field localisation and the square lung-box crop.
(Over 400 lines on purpose: the learned and classical localisers, their plausibility checks and the box arithmetic
make one decision, the lung box.)

The paper crops the union of the two lung boxes on the unmasked image. ``locate_lungs`` segments the lungs
with a compact U-Net (``mdmt.lungs.unet``) and flags its box ok only when the segmentation is a
plausible pair of lungs; otherwise it falls back to the classical localiser (the dark fields inside the
bright body, one per half, on a ~128 px copy) or to the full image, with the reason in ``note``.
Users can supply their own boxes (CSV/XLSX) or masks instead (``DataConfig.crop``).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from mdmt.config import DataConfig
from mdmt.errors import ConfigError, DataError, ImageReadError
from mdmt.images import normalize_intensity, read_image
from mdmt.lungs.unet import WEIGHTS_FILE, segment

WORK_SIZE = 128
"""Long side (px) of the copy the localiser works on."""

AIR_OPENING = 0.03
"""Radius (fraction of the long side) of the opening that keeps only wide background air (no leaks into lungs)."""
BODY_RIM = 0.05
"""Outer rim of the body (fraction of the long side) where thin soft tissue looks as dark as lung."""
LUNG_OPENING = 0.04
"""Radius (fraction of the long side) of the opening that cuts thin dark bridges between lung and rim."""
MIN_LUNG_AREA = 0.03
"""Smallest plausible lung field, as a fraction of the image area."""
MIN_LUNG_HEIGHT = 0.15
"""Shortest plausible lung field, as a fraction of the image height."""
MIN_FRAGMENT_AREA = 0.004
"""Smallest piece of a lung split by opacities that joins its lung (fraction of the image area)."""
MAX_FRAGMENT_GAP = 0.1
"""Largest vertical gap between a lung and a piece of it (fraction of the image height)."""
MASK_SUFFIXES = (".png", ".tif", ".tiff")
CROP_MODES = ("lungs", "lungs_classical", "none", "masks", "boxes")
BOX_COLUMNS = ("x0", "y0", "x1", "y1")


@dataclass(frozen=True)
class LungBox:
    """A pixel box ``[x0, x1) × [y0, y1)``; ``ok`` False: a fallback (classical box or full image), see ``note``."""

    x0: int
    y0: int
    x1: int
    y1: int
    method: str
    ok: bool
    note: str = ""


def full_image_box(shape: tuple[int, ...], note: str, method: str = "full-image", ok: bool = False) -> LungBox:
    """The whole image as a box (the fail-soft answer, or ``crop: none``)."""
    return LungBox(0, 0, int(shape[1]), int(shape[0]), method, ok, note)


def box_iou(a: LungBox | tuple[int, int, int, int], b: LungBox | tuple[int, int, int, int]) -> float:
    """Intersection over union of two ``(x0, y0, x1, y1)`` boxes (end-exclusive)."""
    ax0, ay0, ax1, ay1 = (a.x0, a.y0, a.x1, a.y1) if isinstance(a, LungBox) else a
    bx0, by0, bx1, by1 = (b.x0, b.y0, b.x1, b.y1) if isinstance(b, LungBox) else b
    inter = max(0, min(ax1, bx1) - max(ax0, bx0)) * max(0, min(ay1, by1) - max(ay0, by0))
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def otsu_thresholds(values: np.ndarray, classes: int = 2, bins: int = 64) -> list[float]:
    """Multi-level Otsu: the ``classes - 1`` cuts of a 1-D sample maximising the between-class variance."""
    values = np.asarray(values, dtype=np.float64).ravel()
    if np.ptp(values) == 0:
        return [float(values[0])] * (classes - 1)
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    weight = np.concatenate([[0.0], np.cumsum(hist / hist.sum())])
    moment = np.concatenate([[0.0], np.cumsum(hist / hist.sum() * centers)])
    cuts = np.array(list(itertools.combinations(range(1, bins), classes - 1)))
    bounds = np.column_stack([np.zeros(len(cuts), int), cuts, np.full(len(cuts), bins)])
    class_weight = np.diff(weight[bounds], axis=1)
    class_moment = np.diff(moment[bounds], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        between = np.where(class_weight > 0, class_moment**2 / class_weight, -np.inf).sum(axis=1)
    return [float(edges[c]) for c in cuts[int(np.argmax(between))]]


def otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    """Otsu's two-class threshold (pixels below it form the dark class)."""
    return otsu_thresholds(values, 2, bins)[0]


def _downsample(img01: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Antialiased bilinear copy with long side WORK_SIZE; returns it and the (x, y) scale factors."""
    height, width = img01.shape
    scale = min(1.0, WORK_SIZE / max(height, width))
    size = (max(8, round(width * scale)), max(8, round(height * scale)))
    small = np.asarray(Image.fromarray(img01.astype(np.float32), mode="F").resize(size, Image.BILINEAR))
    return small, size[0] / width, size[1] / height


def _disk(radius: int) -> np.ndarray:
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx**2 + yy**2 <= radius**2


def _body_mask(small: np.ndarray) -> np.ndarray:
    """Everything but the background: the darkest of three intensity classes, wide, connected to the border."""
    smooth = ndimage.gaussian_filter(small, 1.5)
    air = ndimage.binary_opening(
        smooth < otsu_thresholds(smooth, 3)[0], structure=_disk(round(AIR_OPENING * max(small.shape)))
    )
    labels, _ = ndimage.label(air)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    background = np.isin(labels, border[border > 0])
    body = ndimage.binary_fill_holes(~background)
    return body if body.mean() > 0.25 else np.ones_like(body)


def _lung_fields(small: np.ndarray, body: np.ndarray) -> tuple[np.ndarray, int]:
    """Dark (Otsu within the body), opened, hole-filled components away from the body's thin outer rim."""
    side = max(small.shape)
    smooth = ndimage.gaussian_filter(small, 1.0)
    inner = ndimage.binary_erosion(body, structure=_disk(round(BODY_RIM * side)), border_value=0)
    dark = (smooth < otsu_threshold(smooth[body])) & inner
    dark = ndimage.binary_opening(dark, structure=_disk(round(LUNG_OPENING * side)))
    labels, count = ndimage.label(ndimage.binary_fill_holes(dark))
    return labels, count


def _pick_lungs(labels: np.ndarray, count: int, body: np.ndarray) -> tuple[list[int], str]:
    """Labels of the lung fields: the largest plausible one in each half of the body (one label when the two
    are merged) plus the pieces below or above it that opacities split off."""
    objects = ndimage.find_objects(labels)
    areas = ndimage.sum_labels(np.ones(labels.shape), labels, index=np.arange(1, count + 1))
    cols = np.nonzero(body.any(axis=0))[0]
    rows = np.nonzero(body.any(axis=1))[0]
    mid_x = (cols[0] + cols[-1] + 1) / 2
    lowest_centre = rows[0] + 0.85 * (rows[-1] + 1 - rows[0])
    sides: dict[int, list[str]] = {}
    for index, (ys, xs) in enumerate(objects, start=1):
        share_left = (labels[ys, xs.start : max(xs.start, int(mid_x))] == index).sum() / areas[index - 1]
        sides[index] = ["left", "right"] if 0.25 <= share_left <= 0.75 else ["left" if share_left > 0.5 else "right"]
    best: dict[str, int] = {}
    for index, (ys, _) in enumerate(objects, start=1):
        tall = ys.stop - ys.start >= MIN_LUNG_HEIGHT * labels.shape[0]
        if areas[index - 1] < MIN_LUNG_AREA * labels.size or not tall or (ys.start + ys.stop) / 2 > lowest_centre:
            continue
        for side in sides[index]:
            if side not in best or areas[index - 1] > areas[best[side] - 1]:
                best[side] = index
    if len(best) < 2:
        return [], f"found a lung field in {len(best)} half(s) of the body, need both"
    left, right = (objects[best[side] - 1][0] for side in ("left", "right"))
    overlap = min(left.stop, right.stop) - max(left.start, right.start)
    if overlap < 0.5 * min(left.stop - left.start, right.stop - right.start):
        return [], "the two lung fields do not lie side by side"
    chosen = set(best.values())
    for index, (ys, xs) in enumerate(objects, start=1):
        if index in chosen or areas[index - 1] < MIN_FRAGMENT_AREA * labels.size or len(sides[index]) > 1:
            continue
        lung_ys, lung_xs = objects[best[sides[index][0]] - 1]
        gap = max(lung_ys.start - ys.stop, ys.start - lung_ys.stop)
        shared = min(xs.stop, lung_xs.stop) - max(xs.start, lung_xs.start)
        if gap <= MAX_FRAGMENT_GAP * labels.shape[0] and shared >= 0.5 * (xs.stop - xs.start):
            chosen.add(index)
    return sorted(chosen), ""


def locate_lungs_classical(img01: np.ndarray) -> LungBox:
    """Classical union box of the two dark lung fields of a [0, 1] image (bright = dense), method
    ``classical``; the full image when implausible."""
    if img01.ndim != 2 or min(img01.shape) < 16:
        return full_image_box(img01.shape[:2], f"image of shape {img01.shape} is too small to localise")
    small, sx, sy = _downsample(img01)
    body = _body_mask(small)
    labels, count = _lung_fields(small, body)
    chosen, note = _pick_lungs(labels, count, body) if count else ([], "no dark field inside the body")
    if not chosen:
        return full_image_box(img01.shape, note)
    rows, cols = np.nonzero(np.isin(labels, chosen))
    box = (
        math.floor(cols.min() / sx),
        math.floor(rows.min() / sy),
        min(img01.shape[1], math.ceil((cols.max() + 1) / sx)),
        min(img01.shape[0], math.ceil((rows.max() + 1) / sy)),
    )
    if box[2] - box[0] < 0.3 * img01.shape[1] or box[3] - box[1] < 0.25 * img01.shape[0]:
        return full_image_box(img01.shape, f"lung box {box} implausibly small")
    return LungBox(*box, method="classical", ok=True)


SEG_THRESHOLD = 0.5
"""Segmenter probability above which a pixel is lung."""
SEG_MIN_PIECE = 0.004
"""Smallest segmented piece kept (fraction of the image area); smaller ones are noise."""
SEG_MIN_LUNG = 0.04
"""Smallest plausible lung (fraction of the image area; human masks: 0.085 and up)."""
SEG_MIN_AREA_RATIO = 0.45
"""Smaller lung / larger lung, by area (human masks: 0.67 and up)."""
SEG_MIN_HEIGHT_RATIO = 0.6
"""Shorter lung / taller lung, by height (human masks: 0.73 and up)."""
SEG_MIN_OVERLAP = 0.75
"""Shared rows of the two lungs / height of the shorter one (human masks: 0.88 and up)."""
SEG_MAX_APEX_GAP = 0.2
"""Largest difference of the two apices, as a share of the lung box height (human masks: up to 0.10)."""
SEG_MAX_BASE_GAP = 0.35
"""Largest difference of the two bases, as a share of the lung box height (human masks: up to 0.26)."""
SEG_BOX_ASPECT = (0.45, 1.5)
"""Plausible lung box height / width in pixels, the vertical extent against the thorax (human masks: 0.61-1.17)."""
SEG_LUNG_ASPECT = (0.8, 3.5)
"""Plausible height / width of each lung in pixels (human masks: 1.13-2.61)."""
SEG_FRAGMENT_GAP = 0.1
"""Largest vertical gap between a lung and a piece that consolidation split off it (fraction of the height)."""
NO_LUNG_FIELD = "segmenter found no lung field of plausible size"


def _extent(part: slice) -> int:
    return part.stop - part.start


def segmented_box(prob: np.ndarray, shape: tuple[int, ...]) -> tuple[LungBox | None, str]:
    """The lung box (method ``unet``, ok) of a segmenter probability map, scaled to an image of ``shape``,
    or None and the reason when the segmentation is not a plausible pair of lungs.

    Plausible: two large pieces side by side (one per lung), similar in area and height, level with each
    other, each lung and their union box shaped like lungs (height against width, in image pixels).
    Pieces that consolidation split off a lung (below or above it, within its columns) join its box.
    """
    height, width = prob.shape
    sy, sx = shape[0] / height, shape[1] / width
    labels, count = ndimage.label(prob > SEG_THRESHOLD)
    areas = ndimage.sum_labels(np.ones(prob.shape), labels, index=np.arange(1, count + 1)) / prob.size
    pieces = [i for i in np.argsort(-areas, kind="stable") if areas[i] >= SEG_MIN_PIECE]
    if not pieces or areas[pieces[0]] < SEG_MIN_LUNG:
        return None, NO_LUNG_FIELD
    if len(pieces) < 2 or areas[pieces[1]] < SEG_MIN_LUNG:
        return None, f"segmenter found one lung field ({areas[pieces[0]]:.0%} of the image), need two"
    objects = ndimage.find_objects(labels)
    left, right = sorted(pieces[:2], key=lambda i: objects[i][1].start)
    (ly, lx), (ry, rx) = objects[left], objects[right]
    shared_cols = min(lx.stop, rx.stop) - max(lx.start, rx.start)
    shared_rows = min(ly.stop, ry.stop) - max(ly.start, ry.start)
    top, bottom = min(ly.start, ry.start), max(ly.stop, ry.stop)
    box_h, box_w = (bottom - top) * sy, (rx.stop - lx.start) * sx
    small, large = sorted([areas[left], areas[right]])
    checks = [
        (shared_cols <= 0.25 * min(_extent(lx), _extent(rx)), "the two lung fields do not lie side by side"),
        (small >= SEG_MIN_AREA_RATIO * large, f"lung areas differ {large / small:.1f}-fold"),
        (min(_extent(ly), _extent(ry)) >= SEG_MIN_HEIGHT_RATIO * max(_extent(ly), _extent(ry)),
         f"lung heights differ: {_extent(ly)} vs {_extent(ry)} of {height} rows"),
        (shared_rows >= SEG_MIN_OVERLAP * min(_extent(ly), _extent(ry)), "the two lung fields are not level"),
        (abs(ly.start - ry.start) <= SEG_MAX_APEX_GAP * (bottom - top), "the lung apices are not level"),
        (abs(ly.stop - ry.stop) <= SEG_MAX_BASE_GAP * (bottom - top), "the lung bases are not level"),
        (SEG_BOX_ASPECT[0] <= box_h / box_w <= SEG_BOX_ASPECT[1],
         f"lung box height/width {box_h / box_w:.2f} outside {SEG_BOX_ASPECT[0]}-{SEG_BOX_ASPECT[1]}"),
    ]
    for ys, xs in (objects[left], objects[right]):
        aspect = _extent(ys) * sy / (_extent(xs) * sx)
        checks.append((SEG_LUNG_ASPECT[0] <= aspect <= SEG_LUNG_ASPECT[1],
                       f"a lung of height/width {aspect:.2f} outside {SEG_LUNG_ASPECT[0]}-{SEG_LUNG_ASPECT[1]}"))
    for passed, reason in checks:
        if not passed:
            return None, reason
    chosen = [left, right]
    for piece in pieces[2:]:
        ys, xs = objects[piece]
        for lung_ys, lung_xs in (objects[left], objects[right]):
            gap = max(lung_ys.start - ys.stop, ys.start - lung_ys.stop)
            inside = min(xs.stop, lung_xs.stop) - max(xs.start, lung_xs.start) >= 0.5 * _extent(xs)
            if inside and gap <= SEG_FRAGMENT_GAP * height:
                chosen.append(piece)
                break
    rows, cols = np.nonzero(np.isin(labels, np.asarray(chosen) + 1))
    box = (
        math.floor(cols.min() * sx),
        math.floor(rows.min() * sy),
        min(int(shape[1]), math.ceil((cols.max() + 1) * sx)),
        min(int(shape[0]), math.ceil((rows.max() + 1) * sy)),
    )
    return LungBox(*box, method="unet", ok=True), ""


def locate_lungs(img01: np.ndarray, weights: str | Path = WEIGHTS_FILE) -> LungBox:
    """Union box of the two lungs of a [0, 1] image (bright = dense), from the U-Net segmenter.

    ok only when the segmentation is a plausible pair of lungs (``segmented_box``). Otherwise ``ok`` is
    False and ``note`` says why: no lung field found → the full image; an implausible one → the classical
    localiser's box when it finds one, else the full image. Missing or corrupt weights raise ConfigError.
    """
    if img01.ndim != 2 or min(img01.shape) < 16:
        return full_image_box(img01.shape[:2], f"image of shape {img01.shape} is too small to localise")
    box, reason = segmented_box(segment(img01, weights), img01.shape)
    if box is not None:
        return box
    if reason == NO_LUNG_FIELD:
        return full_image_box(img01.shape, f"no lungs found: {reason}")
    classical = locate_lungs_classical(img01)
    if classical.ok:
        return LungBox(classical.x0, classical.y0, classical.x1, classical.y1, "classical", False,
                       f"doubtful: {reason}; classical localiser's box used")
    return full_image_box(img01.shape, f"{reason}; classical localiser: {classical.note}")


def crop_window(box: LungBox, shape: tuple[int, ...], margin: float = 0.05) -> tuple[int, int, int, int]:
    """The ``(x0, y0, x1, y1)`` window ``crop_to_box`` cuts: box + margin, squared with real pixels."""
    height, width = int(shape[0]), int(shape[1])

    def grow(start: int, stop: int, limit: int) -> tuple[int, int]:
        pad = int((stop - start) * margin + 1e-9) // 2
        return max(0, start - pad), min(limit, stop + pad)

    def extend(start: int, stop: int, side: int, limit: int) -> tuple[int, int]:
        side = min(side, limit)
        start -= (side - (stop - start)) // 2
        start = min(max(0, start), limit - side)
        return start, start + side

    x0, x1 = grow(box.x0, box.x1, width)
    y0, y1 = grow(box.y0, box.y1, height)
    side = max(x1 - x0, y1 - y0)
    x0, x1 = extend(x0, x1, side, width)
    y0, y1 = extend(y0, y1, side, height)
    return x0, y0, x1, y1


def crop_to_box(img: np.ndarray, box: LungBox, margin: float = 0.05) -> np.ndarray:
    """Crop ``img`` to the box enlarged by ``margin`` and squared with real pixels (non-square only at borders)."""
    x0, y0, x1, y1 = crop_window(box, img.shape, margin)
    return img[y0:y1, x0:x1]


def boxes_from_file(path: str | Path) -> dict[str, LungBox]:
    """Lung boxes from a CSV/XLSX with ``image_id``, ``x0``, ``y0``, ``x1``, ``y1`` columns."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: boxes file not found")
    reader = pd.read_excel if path.suffix.lower() in (".xlsx", ".xls") else pd.read_csv
    table = reader(path, dtype={"image_id": str})
    missing = [c for c in ("image_id", *BOX_COLUMNS) if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}")
    boxes: dict[str, LungBox] = {}
    for row in table.itertuples(index=False):
        image_id = str(row.image_id).strip()
        try:
            coords = [int(getattr(row, c)) for c in BOX_COLUMNS]
        except (TypeError, ValueError) as exc:
            raise DataError(
                f"{path}: image_id {image_id}: box {[getattr(row, c) for c in BOX_COLUMNS]} is not integer"
            ) from exc
        if coords[2] <= coords[0] or coords[3] <= coords[1]:
            raise DataError(f"{path}: image_id {image_id}: empty box {coords}")
        if image_id in boxes:
            raise DataError(f"{path}: image_id {image_id} appears twice")
        boxes[image_id] = LungBox(*coords, method="boxes", ok=True)
    return boxes


@functools.lru_cache(maxsize=4)
def _boxes_cached(path: str, mtime_ns: int) -> dict[str, LungBox]:
    return boxes_from_file(path)


def find_mask(masks_dir: str | Path, image_id: str) -> Path | None:
    """``<masks_dir>/<image_id>.(png|tif|tiff)``, or None."""
    for suffix in MASK_SUFFIXES:
        candidate = Path(masks_dir) / f"{image_id}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def read_mask(path: str | Path) -> np.ndarray:
    """A mask image as a 2-D array (colour masks are reduced to their maximum over channels)."""
    try:
        with Image.open(path) as image:
            mask = np.asarray(image)
    except (OSError, ValueError) as exc:
        raise ImageReadError(path, f"cannot read mask: {exc}") from exc
    return mask.max(axis=-1) if mask.ndim == 3 else mask


def box_from_mask(mask: np.ndarray, shape: tuple[int, ...] | None = None) -> LungBox:
    """Union box of the two largest components of ``mask`` (> 0), scaled to an image of ``shape``.

    Scaling the box is what resizing the mask to the image first would give, up to a pixel of rounding.
    """
    shape = tuple(shape or mask.shape)
    labels, count = ndimage.label(mask > 0)
    if count == 0:
        return full_image_box(shape, "empty mask")
    areas = ndimage.sum_labels(np.ones(mask.shape), labels, index=np.arange(1, count + 1))
    keep = np.argsort(areas)[::-1][:2] + 1
    rows, cols = np.nonzero(np.isin(labels, keep))
    sy, sx = shape[0] / mask.shape[0], shape[1] / mask.shape[1]
    return LungBox(
        math.floor(cols.min() * sx),
        math.floor(rows.min() * sy),
        min(shape[1], math.ceil((cols.max() + 1) * sx)),
        min(shape[0], math.ceil((rows.max() + 1) * sy)),
        method="masks",
        ok=True,
    )


def _clip_to(box: LungBox, shape: tuple[int, ...]) -> LungBox:
    x0, y0 = max(0, box.x0), max(0, box.y0)
    x1, y1 = min(int(shape[1]), box.x1), min(int(shape[0]), box.y1)
    if x1 <= x0 or y1 <= y0:
        return full_image_box(shape, f"box {box.x0, box.y0, box.x1, box.y1} lies outside the {shape} image")
    return LungBox(x0, y0, x1, y1, box.method, box.ok, box.note)


def resolve_box(image_id: str, img01: np.ndarray, cfg: DataConfig) -> LungBox:
    """The crop box of one image as ``cfg.crop`` asks: located lungs, none, a mask file or a boxes file."""
    if cfg.crop == "lungs":
        return locate_lungs(img01)
    if cfg.crop == "lungs_classical":
        return locate_lungs_classical(img01)
    if cfg.crop == "none":
        return full_image_box(img01.shape, "", method="none", ok=True)
    if cfg.crop == "masks":
        if not cfg.masks_dir:
            raise ConfigError("data.crop = masks needs data.masks_dir")
        if not Path(cfg.masks_dir).is_dir():
            raise ConfigError(f"data.masks_dir: {cfg.masks_dir} is not a folder (data.crop = masks reads "
                              f"<masks_dir>/<image_id>.png|tif|tiff)")
        mask_path = find_mask(cfg.masks_dir, image_id)
        if mask_path is None:
            return full_image_box(img01.shape, f"no mask {image_id}.(png|tif|tiff) in {cfg.masks_dir}")
        return box_from_mask(read_mask(mask_path), img01.shape)
    if cfg.crop == "boxes":
        if not cfg.boxes_file:
            raise ConfigError("data.crop = boxes needs data.boxes_file")
        path = Path(cfg.boxes_file)
        if not path.is_file():
            raise DataError(f"{path}: boxes file not found")
        box = _boxes_cached(str(path), path.stat().st_mtime_ns).get(str(image_id))
        if box is None:
            return full_image_box(img01.shape, f"no box for {image_id} in {path}")
        return _clip_to(box, img01.shape)
    raise ConfigError(f"data.crop: {cfg.crop!r} is not one of {', '.join(map(repr, CROP_MODES))}")


def localiser_iou(truth: pd.DataFrame, clip: tuple[float, float] = (2.0, 98.0),
                  locate: Callable[[np.ndarray], LungBox] = locate_lungs) -> pd.DataFrame:
    """``locate`` (default ``locate_lungs``) on each image of ``truth`` (``image_id``, ``path``, true
    ``x0, y0, x1, y1``) and its box IoU.

    Returns ``image_id``, ``dataset``, ``center`` (when ``truth`` has them), ``iou``, ``ok``, ``method``,
    ``note``. An unreadable image keeps its row with IoU NaN, method ``unreadable`` and the reason in ``note``.
    """
    rows = []
    for record in truth.to_dict("records"):
        row = {
            "image_id": str(record["image_id"]),
            "dataset": record.get("dataset", ""),
            "center": record.get("center", ""),
        }
        try:
            box = locate(normalize_intensity(read_image(record["path"]), *clip))
        except ImageReadError as exc:
            rows.append(row | {"iou": float("nan"), "ok": False, "method": "unreadable", "note": exc.reason})
            continue
        true_box = tuple(int(record[c]) for c in BOX_COLUMNS)
        rows.append(row | {"iou": box_iou(box, true_box), "ok": box.ok, "method": box.method, "note": box.note})
    return pd.DataFrame(rows, columns=["image_id", "dataset", "center", "iou", "ok", "method", "note"])
