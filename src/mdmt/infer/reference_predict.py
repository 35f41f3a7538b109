"""Reference inference for an ``mdmt export --format onnx`` folder: numpy, pydicom, Pillow and onnxruntime only.

    python reference_predict.py FILE [FILE ...] [--export DIR] [--out predictions.csv]

Reads ``preprocessing.json``, ``lungs.onnx`` and ``model.onnx`` from the export folder (default: this script's
folder) and writes, as CSV (standard output without ``--out``), the columns of ``mdmt predict``: ``path``,
``image_id``, each head's columns, then the crop (``crop_method``, ``crop_ok``, ``crop_note``, ``crop_x0`` ...
``crop_y1``). The steps are mdmt's: decode the film (DICOM: modality LUT, MONOCHROME1 inverted, colour averaged;
PNG/JPEG: EXIF orientation, colour averaged), clip to the percentiles, find the lung box with the exported
segmenter (a film without a plausible pair of lungs is not scored: it is named on standard error, as ``mdmt
predict`` lists it in ``skipped.csv``), square crop with margin, Pillow bilinear resize to ``image_size``, uint8,
the network input (resized as torch does when ``input_size`` differs), the network, each head decoded.

Not covered: the crop modes other than ``lungs`` and ``none``, runs that read clinical columns, and the
out-of-distribution columns (``ood_distance``, ``ood_flag``), which need the backbone's features.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pydicom
from PIL import Image, ImageOps
from pydicom.pixels import apply_color_lut, apply_modality_lut, pixel_array

DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ""}
PILLOW_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F", "RGB", "RGBA")
BIN_EDGES, BIN_NAMES = (4.5, 9.5, 14.5), ("0-4", "5-9", "10-14", "15-18")  # Brixia global 0-4, 5-9, 10-14, 15-18
NO_LUNG_FIELD = "segmenter found no lung field of plausible size"
NOT_FRONTAL = "not scored, not a frontal chest film"
FAILED_CHECK = "the lung segmentation failed its plausibility check"
BOX_COLUMNS = ("crop_x0", "crop_y0", "crop_x1", "crop_y1")


# ------------------------------------------------------------------------------------------------ the film
def read_gray(path: Path) -> np.ndarray:
    """The film as float32 gray, bright = dense (``mdmt.images.read_image``)."""
    with path.open("rb") as handle:
        dicm = handle.read(132)[128:] == b"DICM"
    if dicm or path.suffix.lower() in DICOM_SUFFIXES:
        ds = pydicom.dcmread(path, force=True)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
        pixels = pixel_array(ds, index=0)
        if photometric == "PALETTE COLOR":
            pixels = apply_color_lut(pixels, ds)
        if pixels.ndim == 3:
            return pixels.astype(np.float32).mean(axis=-1)
        values = apply_modality_lut(pixels, ds).astype(np.float32)
        if photometric == "MONOCHROME1":
            bits = ds.get("BitsStored")
            if bits:
                signed = ds.get("PixelRepresentation", 0) == 1
                stored = [-(2 ** (bits - 1)), 2 ** (bits - 1) - 1] if signed else [0, 2**bits - 1]
                low, high = apply_modality_lut(np.array(stored, dtype=np.int64), ds)
            else:
                low, high = values.min(), values.max()
            values = np.float32(low + high) - values
        return values
    with Image.open(path) as image:
        if image.getexif().get(0x0112, 1) != 1:
            image = ImageOps.exif_transpose(image)
        if image.mode not in PILLOW_MODES:
            image = image.convert("RGB")
        pixels = np.asarray(image)
    if pixels.ndim == 3:
        return (pixels[..., :3] if pixels.shape[-1] >= 3 else pixels[..., :1]).astype(np.float32).mean(axis=-1)
    return pixels.astype(np.float32)


def clip_percentiles(img: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip to the percentiles and scale to [0, 1] in float32 (``normalize_intensity``)."""
    finite = np.isfinite(img)
    sample = img if finite.all() else img[finite]
    if sample.size == 0:
        return np.zeros(img.shape, dtype=np.float32)
    lo, hi = np.percentile(sample, [low, high]).astype(np.float32)
    if hi <= lo:
        lo, hi = sample.min(), sample.max()
    if hi <= lo:
        return np.zeros(img.shape, dtype=np.float32)
    scaled = np.clip(img, lo, hi)
    scaled -= lo
    scaled /= hi - lo
    if sample is not img:
        scaled[~finite] = 0.0
    return scaled


def pil_resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Pillow's antialiased bilinear resize of a float image (mdmt's ``resize_square`` and ``squash``)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(img, dtype=np.float32)).resize((width, height),
                                                                                           Image.BILINEAR))


# ------------------------------------------------------------------------------------------------ the lungs
def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components numbered 1.. in the raster order of their first pixel (``scipy.ndimage.label``)."""
    big = mask.size
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), big)
    while True:  # every pixel takes the smallest index of its component
        padded = np.pad(labels, 1, constant_values=big)
        smaller = np.minimum.reduce([labels, padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]])
        smaller = np.where(mask, smaller.ravel()[np.minimum(smaller, big - 1)], big)  # then that pixel's label
        if np.array_equal(smaller, labels):
            break
        labels = smaller
    roots, numbered = np.unique(labels, return_inverse=True)
    numbered = numbered.reshape(mask.shape) + 1
    count = len(roots) - (roots[-1] == big)
    return np.where(mask, numbered, 0), int(count)


def lung_box(prob: np.ndarray, shape: tuple[int, int], segmenter: dict) -> tuple[tuple[int, int, int, int] | None, str]:
    """The union box of a plausible pair of lungs, scaled to ``shape``, or None and the reason
    (``mdmt.lungs.locate.segmented_box`` with the checks of ``segmenter['checks']``)."""
    c = segmenter["checks"]
    height, width = prob.shape
    sy, sx = shape[0] / height, shape[1] / width
    labels, count = components(prob > segmenter["threshold"])
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:] / prob.size
    pieces = [i for i in np.argsort(-areas, kind="stable") if areas[i] >= c["min_piece"]]
    if not pieces or areas[pieces[0]] < c["min_lung"]:
        return None, NO_LUNG_FIELD
    if len(pieces) < 2 or areas[pieces[1]] < c["min_lung"]:
        return None, f"segmenter found one lung field ({areas[pieces[0]]:.0%} of the image), need two"
    spans = []  # per label: (row start, row stop, col start, col stop)
    for index in range(1, count + 1):
        rows, cols = np.nonzero(labels == index)
        spans.append((rows.min(), rows.max() + 1, cols.min(), cols.max() + 1))
    left, right = sorted(pieces[:2], key=lambda i: spans[i][2])
    (l0, l1, lx0, lx1), (r0, r1, rx0, rx1) = spans[left], spans[right]
    top, bottom = min(l0, r0), max(l1, r1)
    box_h, box_w = (bottom - top) * sy, (rx1 - lx0) * sx
    small, large = sorted([areas[left], areas[right]])
    checks = [
        (min(lx1, rx1) - max(lx0, rx0) <= 0.25 * min(lx1 - lx0, rx1 - rx0),
         "the two lung fields do not lie side by side"),
        (small >= c["min_area_ratio"] * large, f"lung areas differ {large / small:.1f}-fold"),
        (min(l1 - l0, r1 - r0) >= c["min_height_ratio"] * max(l1 - l0, r1 - r0),
         f"lung heights differ: {l1 - l0} vs {r1 - r0} of {height} rows"),
        (min(l1, r1) - max(l0, r0) >= c["min_overlap"] * min(l1 - l0, r1 - r0), "the two lung fields are not level"),
        (abs(l0 - r0) <= c["max_apex_gap"] * (bottom - top), "the lung apices are not level"),
        (abs(l1 - r1) <= c["max_base_gap"] * (bottom - top), "the lung bases are not level"),
        (c["box_aspect"][0] <= box_h / box_w <= c["box_aspect"][1],
         f"lung box height/width {box_h / box_w:.2f} outside {c['box_aspect'][0]}-{c['box_aspect'][1]}"),
    ]
    for y0, y1, x0, x1 in (spans[left], spans[right]):
        aspect = (y1 - y0) * sy / ((x1 - x0) * sx)
        checks.append((c["lung_aspect"][0] <= aspect <= c["lung_aspect"][1],
                       f"a lung of height/width {aspect:.2f} outside {c['lung_aspect'][0]}-{c['lung_aspect'][1]}"))
    for passed, reason in checks:
        if not passed:
            return None, reason
    chosen = [left, right]
    for piece in pieces[2:]:  # pieces that consolidation split off a lung, below or above it
        y0, y1, x0, x1 = spans[piece]
        for ly0, ly1, lx0_, lx1_ in (spans[left], spans[right]):
            inside = min(x1, lx1_) - max(x0, lx0_) >= 0.5 * (x1 - x0)
            if inside and max(ly0 - y1, y0 - ly1) <= c["fragment_gap"] * height:
                chosen.append(piece)
                break
    rows, cols = np.nonzero(np.isin(labels, np.asarray(chosen) + 1))
    x1, y1 = min(int(shape[1]), math.ceil((cols.max() + 1) * sx)), min(int(shape[0]), math.ceil((rows.max() + 1) * sy))
    return (math.floor(cols.min() * sx), math.floor(rows.min() * sy), x1, y1), ""


def lung_verdict(img01: np.ndarray, segmenter: dict, lungs: onnxruntime.InferenceSession
                 ) -> tuple[tuple[int, int, int, int] | None, str]:
    """The segmenter's lung box of the film, or None and why ``mdmt predict`` does not score it (its guard)."""
    if img01.ndim != 2 or min(img01.shape) < 16:
        return None, f"{NOT_FRONTAL}: {FAILED_CHECK}: image of shape {img01.shape} is too small to localise"
    size = segmenter["work_size"]
    squashed = np.clip(pil_resize(img01, size, size), 0.0, 1.0)[None, None]
    box, reason = lung_box(lungs.run(None, {segmenter["input"]: squashed})[0][0, 0], img01.shape, segmenter)
    if box is None:
        return None, f"{NOT_FRONTAL}: " + (f"no lungs found: {reason}" if reason == NO_LUNG_FIELD else
                                            f"{FAILED_CHECK}: {reason}")
    return box, ""


def crop_window(box: tuple[int, int, int, int], shape: tuple[int, int], margin: float) -> tuple[int, int, int, int]:
    """The box enlarged by ``margin`` and squared with real pixels (``mdmt.lungs.locate.crop_window``)."""
    def grow(start: int, stop: int, limit: int) -> tuple[int, int]:
        pad = int((stop - start) * margin + 1e-9) // 2
        return max(0, start - pad), min(limit, stop + pad)

    def extend(start: int, stop: int, side: int, limit: int) -> tuple[int, int]:
        side = min(side, limit)
        start = min(max(0, start - (side - (stop - start)) // 2), limit - side)
        return start, start + side

    x0, x1 = grow(box[0], box[2], shape[1])
    y0, y1 = grow(box[1], box[3], shape[0])
    side = max(x1 - x0, y1 - y0)
    (x0, x1), (y0, y1) = extend(x0, x1, side, shape[1]), extend(y0, y1, side, shape[0])
    return x0, y0, x1, y1


# ------------------------------------------------------------------------------------------------ the network
def torch_resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` weights of torch's antialiased bilinear resize, in torch's float32 arithmetic."""
    f32 = np.float32
    scale = f32(n_in) / f32(n_out)
    support = scale if scale >= 1.0 else f32(1.0)
    invscale = f32(1.0 / np.float64(scale)) if scale >= 1.0 else f32(1.0)
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    for i in range(n_out):
        center = f32(np.float64(scale) * (i + 0.5))
        lo = max(int(np.float64(f32(center - support)) + 0.5), 0)
        hi = min(int(np.float64(f32(center + support)) + 0.5), n_in)
        taps = []
        for j in range(lo, hi):
            x = abs(f32((np.float64(f32(j) - center) + 0.5) * np.float64(invscale)))  # float, double, float
            taps.append(f32(1.0 - x) if x < 1.0 else f32(0.0))
        total = f32(0.0)
        for w in taps:
            total = f32(total + w)
        weights[i, lo:hi] = [f32(w / total) for w in taps]
    return weights


def network_input(image: np.ndarray, info: dict) -> np.ndarray:
    """uint8 ``(S, S)`` → float32 ``(1, 3, input_size, input_size)``: /255, resize as torch does, normalise."""
    x = image.astype(np.float32) / np.float32(255.0)
    size = info["input_size"]
    if size != x.shape[-1]:
        x = torch_resize_weights(x.shape[0], size) @ x @ torch_resize_weights(x.shape[1], size).T
    mean = np.asarray(info["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(info["std"], dtype=np.float32)[:, None, None]
    return ((x[None] - mean) / std)[None].astype(np.float32)


def column(base: str, group: str) -> str:
    """``base`` for a one-group head, else ``base_<group>`` (``mdmt.tasks.prediction_column``)."""
    return f"{base}_{group}" if group else base


def head_columns(raw: np.ndarray, head: dict) -> dict[str, object]:
    """One film's columns of one head (``Task.film_columns``), from its raw outputs."""
    groups, kind = head["groups"], head["kind"]
    grouped = raw.reshape(len(groups), -1).astype(np.float32)
    decoded: dict[str, object] = {}
    for j, g in enumerate(groups):
        name = functools.partial(column, group=g)
        if kind == "classification":
            e = np.exp(grouped[j] - grouped[j].max())
            prob = e / e.sum()
            decoded[name("y_pred")] = int(np.argmax(grouped[j]))
            if len(prob) == 2:
                decoded[name("score")] = float(prob[1])
            else:
                decoded.update({f"{name('prob')}_{c}": float(p) for c, p in enumerate(prob)})
        elif kind == "ordinal":
            exceed = np.float32(1.0) / (np.float32(1.0) + np.exp(-grouped[j]))
            decoded[name("expected")] = float(exceed.sum())
            decoded[name("y_pred")] = int((exceed > 0.5).sum())
        else:
            decoded[name("y_pred")] = float(grouped[j, 0])
    if head["named"] and head["scorer"] == "binary":
        return {f"p_{head['class_names'][1].lower()}": decoded["score"],
                head["name"]: head["class_names"][decoded["y_pred"]]}
    if head["named"] and head["scorer"] == "global4":
        bin_ = decoded["y_pred"]
        return {"brixia_bin": bin_, "brixia_bin_range": BIN_NAMES[bin_],
                **{f"p_bin_{c}": decoded[f"prob_{c}"] for c in range(head["n_classes"])}}
    if head["named"] and head["scorer"] == "regions":
        scores = {f"brixia_{g}": min(3.0, max(0.0, float(decoded[f"y_pred_{g}"]))) for g in groups}
        total = float(np.sum(list(scores.values())))
        bin_ = int(np.digitize(total, BIN_EDGES))
        return {**scores, "brixia_global": total, "brixia_bin": bin_, "brixia_bin_range": BIN_NAMES[bin_]}
    return {f"{head['name']}_{k}": v for k, v in decoded.items()}


def predict(path: Path, info: dict, model: onnxruntime.InferenceSession,
            lungs: onnxruntime.InferenceSession) -> dict[str, object] | str:
    """One film's row of ``predictions.csv``, or why it is not scored."""
    img01 = clip_percentiles(read_gray(path), *info["clip_percentiles"])
    box, refusal = lung_verdict(img01, info["segmenter"], lungs)
    if box is None:
        return refusal
    if info["crop"] == "none":
        box = (0, 0, img01.shape[1], img01.shape[0])
    x0, y0, x1, y1 = crop_window(box, img01.shape, info["crop_margin"])
    cut = pil_resize(img01[y0:y1, x0:x1], info["image_size"], info["image_size"])
    image = np.rint(np.clip(cut, 0.0, 1.0) * 255.0).astype(np.uint8)
    raw = model.run(None, {info["input"]["name"]: network_input(image, info)})
    row: dict[str, object] = {"path": str(path), "image_id": path.stem}
    for head, output in zip(info["outputs"], raw, strict=True):
        columns = head_columns(output[0], head)
        if list(columns) != head["columns"]:
            raise SystemExit(f"error: head {head['name']}: columns {list(columns)}, the export lists {head['columns']}")
        row.update(columns)
    method = "unet" if info["crop"] == "lungs" else "none"
    return row | {"crop_method": method, "crop_ok": True, "crop_note": ""} | dict(zip(BOX_COLUMNS, box))


def main(argv: list[str] | None = None) -> int:
    """Predict the films; skipped ones are named on standard error. Exit code 1 when none was scored."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="DICOM, PNG or JPEG films")
    parser.add_argument("--export", type=Path, default=Path(__file__).resolve().parent, help="the export folder")
    parser.add_argument("--out", type=Path, default=None, help="CSV file to write (default: standard output)")
    args = parser.parse_args(argv)
    info = json.loads((args.export / "preprocessing.json").read_text())
    if "clinical" in info or info["crop"] not in ("lungs", "none"):
        raise SystemExit(f"error: this script covers crop 'lungs' or 'none' without clinical input (crop "
                         f"{info['crop']!r}{', clinical input' if 'clinical' in info else ''})")
    providers = ["CPUExecutionProvider"]
    model = onnxruntime.InferenceSession(str(args.export / info["model_file"]), providers=providers)
    lungs = onnxruntime.InferenceSession(str(args.export / info["segmenter"]["file"]), providers=providers)
    rows = []
    for path in args.files:
        result = predict(path, info, model, lungs)
        if isinstance(result, str):
            print(f"skipped {path}: {result}", file=sys.stderr)
        else:
            rows.append(result)
    if not rows:
        return 1
    with args.out.open("w", newline="") if args.out else contextlib.nullcontext(sys.stdout) as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
