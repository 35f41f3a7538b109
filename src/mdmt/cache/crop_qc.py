"""Crop quality control from a cache's records: the per-film crop table, issue lines and contact sheets.

Each cached film carries its crop box, method and flag (``crop_ok``, ``crop_method``, ``crop_note``,
``box_x0..box_y1``, ``orig_height``, ``orig_width``). A crop is ``ok``; a ``fallback`` (the full image,
the localiser gave up); or ``doubtful`` (not flagged ok, but a box other than the full image was used).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from mdmt.errors import DataError, ImageReadError
from mdmt.images import normalize_intensity, read_image

BOX_FIELDS = ("box_x0", "box_y0", "box_x1", "box_y1")
RECORD_COLUMNS = ("image_id", "path", "crop_ok", "crop_method", "crop_note", *BOX_FIELDS, "orig_height", "orig_width")
TABLE_COLUMNS = ["image_id", "path", "status", "method", "ok", "reason", "x0", "y0", "x1", "y1", "box_share"]
STATUS_ORDER = {"fallback": 0, "doubtful": 1, "ok": 2}
STATUS_COLOURS = {"fallback": (230, 40, 40), "doubtful": (255, 165, 0), "ok": (40, 200, 60)}
TILE = 200
"""Side (px) of one film's tile on a contact sheet (the caption goes below it)."""
CAPTION = 28
COLUMNS = 6


def _check(records: pd.DataFrame) -> None:
    missing = [c for c in RECORD_COLUMNS if c not in records.columns]
    if missing:
        raise DataError(f"cache records lack crop column(s) {', '.join(missing)}")


def _flag(values: pd.Series) -> pd.Series:
    """``crop_ok`` as bool, whether it was read back as bool, 0/1 or ``"True"``/``"False"`` text."""
    if values.dtype == bool:
        return values
    return values.astype(str).str.strip().str.lower().isin(["true", "1", "1.0"])


def crop_table(records: pd.DataFrame) -> pd.DataFrame:
    """One row per cached film: id, path, status (ok / doubtful / fallback), method, ok, reason, the box
    ``x0, y0, x1, y1`` in original pixels and the box's share of the image area; problem films first."""
    _check(records)
    ok = _flag(records["crop_ok"]).to_numpy()
    method = records["crop_method"].fillna("").astype(str).to_numpy()
    status = np.where(ok, "ok", np.where(method == "full-image", "fallback", "doubtful"))
    box = records[list(BOX_FIELDS)].astype(int).to_numpy()
    area = records["orig_height"].astype(float).to_numpy() * records["orig_width"].astype(float).to_numpy()
    share = (box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]) / np.where(area > 0, area, np.nan)
    table = pd.DataFrame({
        "image_id": records["image_id"].astype(str).to_numpy(),
        "path": records["path"].astype(str).to_numpy(),
        "status": status,
        "method": method,
        "ok": ok,
        "reason": records["crop_note"].fillna("").astype(str).to_numpy(),
        "x0": box[:, 0], "y0": box[:, 1], "x1": box[:, 2], "y1": box[:, 3],
        "box_share": np.round(share, 4),
    }, columns=TABLE_COLUMNS)
    order = table["status"].map(STATUS_ORDER).to_numpy()
    return table.iloc[np.argsort(order, kind="stable")].reset_index(drop=True)


def crop_issue_lines(records: pd.DataFrame, dataset: str) -> list[str]:
    """One line per fallback or doubtful crop: ``<dataset> <id>: <status> (<method>): <reason>``."""
    table = crop_table(records)
    issues = table[table["status"] != "ok"]
    return [f"{dataset} {row.image_id}: {row.status} ({row.method}): {row.reason or 'no reason recorded'}"
            for row in issues.itertuples(index=False)]


def _tile(row: pd.Series, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> Image.Image:
    """The film scaled into TILE × TILE with its box drawn in the status colour, and a caption below."""
    tile = Image.new("RGB", (TILE, TILE + CAPTION), (24, 24, 24))
    draw = ImageDraw.Draw(tile)
    colour = STATUS_COLOURS[row["status"]]
    try:
        img01 = normalize_intensity(read_image(row["path"]))
    except ImageReadError as exc:
        draw.text((4, TILE // 2), f"unreadable: {exc.reason}"[:40], fill=(230, 40, 40), font=font)
    else:
        height, width = img01.shape
        scale = TILE / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        thumb = Image.fromarray(np.rint(img01 * 255).astype(np.uint8)).resize(size, Image.BILINEAR).convert("RGB")
        left, top = (TILE - size[0]) // 2, (TILE - size[1]) // 2
        tile.paste(thumb, (left, top))
        x0, y0, x1, y1 = (row[c] * scale for c in ("x0", "y0", "x1", "y1"))
        draw.rectangle((left + x0, top + y0, left + x1 - 1, top + y1 - 1), outline=colour, width=2)
    if row["status"] != "ok":
        draw.rectangle((0, 0, TILE - 1, TILE + CAPTION - 1), outline=colour, width=3)
    draw.text((4, TILE + 2), str(row["image_id"])[:30], fill=(255, 255, 255), font=font)
    draw.text((4, TILE + 14), f"{row['method']} · {row['status']}"[:34], fill=colour, font=font)
    return tile


def write_contact_sheets(records: pd.DataFrame, out_dir: str | Path, per_sheet: int = 30) -> list[Path]:
    """PNG contact sheets ``contact-sheet-001.png``, ... under ``out_dir``: each film with its box drawn
    (green ok, orange doubtful, red fallback, the last two also framed), id and method below; fallbacks
    and doubtful crops come first. Returns the written paths (none for no records)."""
    if per_sheet < 1:
        raise ValueError(f"per_sheet must be at least 1, got {per_sheet}")
    table = crop_table(records)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    font = ImageFont.load_default(size=11)
    written = []
    for number, start in enumerate(range(0, len(table), per_sheet), start=1):
        rows = table.iloc[start : start + per_sheet]
        columns = min(COLUMNS, len(rows))
        sheet = Image.new("RGB", (columns * TILE, -(-len(rows) // columns) * (TILE + CAPTION)), (0, 0, 0))
        for index, (_, row) in enumerate(rows.iterrows()):
            sheet.paste(_tile(row, font), ((index % columns) * TILE, (index // columns) * (TILE + CAPTION)))
        path = out_dir / f"contact-sheet-{number:03d}.png"
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        sheet.save(tmp, format="PNG")
        os.replace(tmp, path)
        written.append(path)
    return written
