"""Crop quality control: the per-film crop table, issue lines by id and the PNG contact sheets."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mdmt.cache.crop_qc import crop_issue_lines, crop_table, write_contact_sheets
from mdmt.errors import DataError


def records_with_images(tmp_path, count: int = 5) -> pd.DataFrame:
    """Cache-style records of ``count`` 120 × 100 PNG films: film 1 fell back, film 3 is doubtful."""
    rows = []
    for i in range(count):
        path = tmp_path / f"film{i}.png"
        Image.fromarray(np.full((120, 100), 40 * (i + 1), np.uint8)).save(path)
        fallback, doubtful = i == 1, i == 3
        box = (0, 0, 100, 120) if fallback else (10, 12, 90, 102)
        rows.append({
            "image_id": f"{i:05d}", "path": str(path), "dataset": "demo",
            "crop_ok": not (fallback or doubtful),
            "crop_method": "full-image" if fallback else ("classical" if doubtful else "unet"),
            "crop_note": "no lungs found: segmenter found no lung field" if fallback
            else ("doubtful: the lung bases are not level" if doubtful else np.nan),
            "box_x0": box[0], "box_y0": box[1], "box_x1": box[2], "box_y1": box[3],
            "orig_height": 120, "orig_width": 100,
        })
    return pd.DataFrame(rows)


def test_crop_table_status_reason_and_share(tmp_path):
    records = records_with_images(tmp_path)
    table = crop_table(records)
    assert list(table["image_id"]) == ["00001", "00003", "00000", "00002", "00004"]  # problems first
    assert list(table["status"]) == ["fallback", "doubtful", "ok", "ok", "ok"]
    assert table.loc[0, "box_share"] == 1.0
    assert table.loc[2, "box_share"] == pytest.approx(80 * 90 / 12000)
    assert table.loc[1, "reason"] == "doubtful: the lung bases are not level"
    assert table.loc[2, "reason"] == "" and table.loc[2, "method"] == "unet"


def test_crop_table_reads_flags_written_as_text(tmp_path):
    records = records_with_images(tmp_path)
    path = tmp_path / "records.csv"
    records.to_csv(path, index=False)
    again = pd.read_csv(path, dtype={"crop_ok": str, "image_id": str})
    assert list(crop_table(again)["status"]) == list(crop_table(records)["status"])


def test_crop_issue_lines_by_id_with_reason(tmp_path):
    lines = crop_issue_lines(records_with_images(tmp_path), "brixia")
    assert lines == [
        "brixia 00001: fallback (full-image): no lungs found: segmenter found no lung field",
        "brixia 00003: doubtful (classical): doubtful: the lung bases are not level",
    ]


def test_crop_qc_needs_the_crop_columns(tmp_path):
    with pytest.raises(DataError, match="crop_note"):
        crop_table(records_with_images(tmp_path).drop(columns="crop_note"))


def test_contact_sheets_split_and_draw_boxes(tmp_path):
    records = records_with_images(tmp_path, count=5)
    records.loc[4, "path"] = str(tmp_path / "gone.png")  # unreadable: still gets a tile
    sheets = write_contact_sheets(records, tmp_path / "qc", per_sheet=2)
    assert [p.name for p in sheets] == ["contact-sheet-001.png", "contact-sheet-002.png", "contact-sheet-003.png"]
    assert not list((tmp_path / "qc").glob("*.tmp-*"))
    first = np.asarray(Image.open(sheets[0]))
    assert first.shape == (228, 400, 3)
    # the fallback film comes first: its box is the full image, drawn in red on its tile's edge
    red = (first[..., 0] > 200) & (first[..., 1] < 80) & (first[..., 2] < 80)
    assert red[:200, :200].sum() > 400
    # the doubtful film second: orange box
    orange = (first[..., 0] > 200) & (abs(first[..., 1].astype(int) - 165) < 30) & (first[..., 2] < 60)
    assert orange[:200, 200:].sum() > 300
    last = np.asarray(Image.open(sheets[2]))
    assert last.shape == (228, 200, 3)
    assert write_contact_sheets(records.iloc[:0], tmp_path / "empty") == []
