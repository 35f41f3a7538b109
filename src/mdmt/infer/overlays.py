"""Drawing the explanations: Grad-CAM heat maps over the film, the six Brixia zones, contact sheets.

Everything is drawn on the image the network saw (the run's crop, resized), scaled up to at least
``DISPLAY`` pixels. The Brixia zones are a drawing aid, not a segmentation: the lung box found by the run's
crop (``data.crop``), mapped into the crop, is split at its vertical midline into the right lung (image left,
zones A top, B middle, C bottom) and the left lung (image right, D, E, F), and each half into three bands of
equal height: thirds of each lung's height inside the crop. With ``crop: none`` or a crop that fell back to
the whole film, the box is the whole image and the zones are its halves and thirds.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mdmt.infer.extras import require
from mdmt.runs import atomic_target
from mdmt.tasks import REGIONS

DISPLAY = 256
"""Smallest side (px) of a written overlay."""
TILE = 160
"""Side (px) of one picture on a contact sheet."""
CAPTION = 30
ZONE_ALPHA = 0.35
SCORE_COLOURS = ((40, 200, 60), (255, 215, 0), (255, 140, 0), (230, 40, 40))
"""Fill of a zone whose predicted score rounds to 0, 1, 2, 3."""
OUTLINE = (0, 200, 255)
Box = tuple[float, float, float, float]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def display(image: Image.Image) -> Image.Image:
    """``image`` scaled up (bilinear) so that its smaller side is at least ``DISPLAY``."""
    scale = max(1.0, DISPLAY / min(image.size))
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)


def cam_overlay(image: np.ndarray, cam: np.ndarray) -> Image.Image:
    """The gray uint8 ``image`` with the [0, 1] ``cam`` (any size, resized to the image) as a jet heat map."""
    show = require("pytorch_grad_cam.utils.image", "Grad-CAM overlays").show_cam_on_image
    height, width = image.shape
    cam = np.asarray(Image.fromarray(cam.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR))
    rgb = np.repeat(image[..., None].astype(np.float32) / 255.0, 3, axis=2)
    return display(Image.fromarray(show(rgb, np.clip(cam, 0.0, 1.0), use_rgb=True)))


def zone_boxes(lung_box: Box, window: Box, size: int) -> list[Box]:
    """Zones A–F as ``(x0, y0, x1, y1)`` in an image of ``size`` px cut from ``window`` of the film, from the
    ``lung_box`` (both in film pixels): image-left half A, B, C and image-right half D, E, F, top to bottom."""
    wx0, wy0, wx1, wy1 = window
    sx, sy = size / (wx1 - wx0), size / (wy1 - wy0)
    x0, y0 = (lung_box[0] - wx0) * sx, (lung_box[1] - wy0) * sy
    x1, y1 = (lung_box[2] - wx0) * sx, (lung_box[3] - wy0) * sy
    middle, third = (x0 + x1) / 2, (y1 - y0) / 3
    return [(left, y0 + band * third, right, y0 + (band + 1) * third)
            for left, right in ((x0, middle), (middle, x1)) for band in range(3)]


def zone_overlay(image: np.ndarray, zones: Sequence[Box], scores: Sequence[float] | None, caption: str) -> Image.Image:
    """The gray uint8 ``image`` with the six zones outlined and lettered, filled by ``scores`` (0–3) and the
    score written in each when given, and ``caption`` at the top."""
    base = display(Image.fromarray(image).convert("RGB"))
    scale = base.width / image.shape[1]
    fill = Image.new("RGBA", base.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(fill)
    font = _font(max(10, base.width // 22))
    for index, (region, zone) in enumerate(zip(REGIONS, zones, strict=True)):
        box = tuple(v * scale for v in zone)
        colour = SCORE_COLOURS[int(np.clip(np.rint(scores[index]), 0, 3))] if scores is not None else None
        if colour is not None:
            draw.rectangle(box, fill=(*colour, round(255 * ZONE_ALPHA)))
        draw.rectangle(box, outline=(*OUTLINE, 255), width=2)
        label = f"{region} {scores[index]:.1f}" if scores is not None else region
        draw.text((box[0] + 4, box[1] + 3), label, fill=(255, 255, 255, 255), font=font,
                  stroke_width=2, stroke_fill=(0, 0, 0, 255))
    picture = Image.alpha_composite(base.convert("RGBA"), fill).convert("RGB")
    ImageDraw.Draw(picture).text((4, base.height - font.size - 6), caption, fill=(255, 255, 255), font=font,
                                 stroke_width=2, stroke_fill=(0, 0, 0))
    return picture


def save_png(image: Image.Image, path: Path) -> Path:
    """Write ``image`` as PNG through a temporary file and a rename."""
    with atomic_target(path) as tmp:
        image.save(tmp, format="PNG")
    return path


class ContactSheets:
    """Rows of pictures (one row per film, a caption under each picture), written ``per_sheet`` rows to a PNG
    (``contact-sheet-001.png``, …) as they fill."""

    def __init__(self, out: Path, columns: Sequence[str], per_sheet: int = 12):
        self.out = out
        self.columns = list(columns)
        self.per_sheet = per_sheet
        self.rows: list[tuple[list[Image.Image], str]] = []
        self.written: list[Path] = []
        self.font = _font(11)

    def add(self, pictures: Sequence[Image.Image], caption: str) -> None:
        """One film's pictures (one per column) and its caption; writes a sheet when ``per_sheet`` rows wait."""
        self.rows.append(([p.resize((TILE, TILE), Image.BILINEAR) for p in pictures], caption))
        if len(self.rows) == self.per_sheet:
            self.flush()

    def flush(self) -> None:
        """Write the waiting rows as the next sheet (nothing when none wait)."""
        if not self.rows:
            return
        header = CAPTION // 2
        sheet = Image.new("RGB", (len(self.columns) * TILE, header + len(self.rows) * (TILE + CAPTION)), (0, 0, 0))
        draw = ImageDraw.Draw(sheet)
        for column, title in enumerate(self.columns):
            draw.text((column * TILE + 4, 2), title, fill=(0, 200, 255), font=self.font)
        for row, (pictures, caption) in enumerate(self.rows):
            top = header + row * (TILE + CAPTION)
            for column, picture in enumerate(pictures):
                sheet.paste(picture, (column * TILE, top))
            draw.text((4, top + TILE + 2), caption, fill=(255, 255, 255), font=self.font)
        self.out.mkdir(parents=True, exist_ok=True)
        self.written.append(save_png(sheet, self.out / f"contact-sheet-{len(self.written) + 1:03d}.png"))
        self.rows = []
