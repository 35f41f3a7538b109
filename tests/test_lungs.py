"""Lung localisation (segmenter and classical), the square crop, user boxes/masks, IoU against the twin's truth."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from scipy import ndimage

from mdmt.config import DataConfig
from mdmt.errors import ConfigError, DataError
from mdmt.lungs.locate import (
    NO_LUNG_FIELD,
    LungBox,
    box_from_mask,
    box_iou,
    boxes_from_file,
    crop_to_box,
    crop_window,
    localiser_iou,
    locate_lungs,
    locate_lungs_classical,
    otsu_threshold,
    otsu_thresholds,
    read_mask,
    resolve_box,
    segmented_box,
)
from mdmt.lungs.unet import (
    BASE_SIZE,
    REBUILD_COMMAND,
    TrainSettings,
    segment,
    train_segmenter,
)


def chest_phantom(height: int, width: int, seed: int) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Dark air, bright body ellipse, two dark lung ellipses (jittered), noise; returns image and true lung box."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.full((height, width), 0.05)
    img[((xx - width / 2) / (0.46 * width)) ** 2 + ((yy - 0.58 * height) / (0.62 * height)) ** 2 < 1] = 0.7
    lungs = np.zeros((height, width), bool)
    for cx in (0.3, 0.7):
        cx, cy = cx + rng.uniform(-0.03, 0.03), 0.47 + rng.uniform(-0.04, 0.04)
        rx, ry = rng.uniform(0.11, 0.15), rng.uniform(0.22, 0.3)
        lungs |= ((xx - cx * width) / (rx * width)) ** 2 + ((yy - cy * height) / (ry * height)) ** 2 < 1
    img[lungs] = 0.3 + 0.05 * rng.random()
    img = ndimage.gaussian_filter(img, 1.5) + rng.normal(0, 0.03, img.shape)
    rows, cols = np.nonzero(lungs)
    return np.clip(img, 0, 1).astype(np.float32), (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)


def coordinate_image(height: int, width: int) -> np.ndarray:
    """Each pixel holds its own flat index, so a crop tells exactly which window it came from."""
    return np.arange(height * width, dtype=np.int64).reshape(height, width)


@pytest.mark.parametrize(("height", "width", "seed"), [(200, 180, 0), (320, 260, 1), (150, 220, 2), (512, 420, 3)])
def test_classical_localiser_matches_phantom_box(height, width, seed):
    img, truth = chest_phantom(height, width, seed)
    box = locate_lungs_classical(img)
    assert box.ok and box.method == "classical"
    assert box_iou(box, truth) > 0.9


@pytest.mark.parametrize(
    "image", [np.full((128, 128), 0.5, np.float32), np.random.default_rng(0).random((96, 80)).astype(np.float32)]
)
@pytest.mark.parametrize("locate", [locate_lungs, locate_lungs_classical])
def test_locate_lungs_fails_soft_to_full_image(image, locate):
    box = locate(image)
    assert not box.ok and box.method == "full-image"
    assert (box.x0, box.y0, box.x1, box.y1) == (0, 0, image.shape[1], image.shape[0])
    assert box.note


def test_otsu_separates_modes():
    rng = np.random.default_rng(0)
    low, mid, high = rng.normal(0.1, 0.02, 500), rng.normal(0.45, 0.02, 500), rng.normal(0.8, 0.02, 500)
    two = otsu_threshold(np.concatenate([low, high]))
    assert low.max() < two <= high.min()
    cut_low, cut_high = otsu_thresholds(np.concatenate([low, mid, high]), classes=3)
    assert low.max() < cut_low <= mid.min() and mid.max() < cut_high <= high.min()
    assert otsu_threshold(np.full(10, 0.3)) == pytest.approx(0.3)


def test_box_iou():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0


def test_crop_is_square_with_margin_and_real_pixels():
    img = coordinate_image(200, 300)
    box = LungBox(100, 50, 200, 110, "test", True)  # 100 wide, 60 high
    x0, y0, x1, y1 = crop_window(box, img.shape, margin=0.05)
    # margin: ((100*5)//100)//2 = 2 px per side horizontally, ((60*5)//100)//2 = 1 vertically
    assert (x0, x1) == (98, 202)
    assert x1 - x0 == y1 - y0 == 104
    assert (y0 + y1) / 2 == pytest.approx((49 + 111) / 2, abs=0.5)  # extended symmetrically
    crop = crop_to_box(img, box)
    np.testing.assert_array_equal(crop, img[y0:y1, x0:x1])


def test_crop_window_shifts_at_border_instead_of_padding():
    img = coordinate_image(200, 300)
    box = LungBox(250, 0, 300, 150, "test", True)  # tall box at the right edge
    crop = crop_to_box(img, box, margin=0.0)
    assert crop.shape == (150, 150)
    assert crop[0, -1] == img[0, 299]  # window shifted left, still square, still real pixels


def test_crop_cut_at_border_when_square_impossible():
    img = coordinate_image(100, 300)
    crop = crop_to_box(img, LungBox(10, 10, 290, 90, "test", True), margin=0.05)
    assert crop.shape[0] == 100 and crop.shape[1] > 100


def test_full_image_box_crop_is_identity():
    img = coordinate_image(90, 70)
    np.testing.assert_array_equal(crop_to_box(img, LungBox(0, 0, 70, 90, "none", True)), img)


def test_box_from_mask_two_largest_components_scaled():
    mask = np.zeros((100, 80), np.uint8)
    mask[20:70, 10:35] = 255
    mask[25:75, 45:70] = 255
    mask[90:95, 0:3] = 255  # small speck: ignored
    box = box_from_mask(mask, shape=(200, 160))
    assert (box.x0, box.y0, box.x1, box.y1) == (20, 40, 140, 150)
    assert box.ok and box.method == "masks"
    assert not box_from_mask(np.zeros((10, 10))).ok


def test_boxes_from_file_csv_and_xlsx(tmp_path):
    table = pd.DataFrame(
        {"image_id": ["00012345678901234567", "P_1"], "x0": [1, 2], "y0": [3, 4], "x1": [10, 20], "y1": [30, 40]}
    )
    table.to_csv(tmp_path / "boxes.csv", index=False)
    table.to_excel(tmp_path / "boxes.xlsx", index=False)
    for name in ("boxes.csv", "boxes.xlsx"):
        boxes = boxes_from_file(tmp_path / name)
        assert set(boxes) == {"00012345678901234567", "P_1"}
        assert (boxes["P_1"].x0, boxes["P_1"].y1) == (2, 40)
    table.drop(columns="y1").to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(DataError, match="y1"):
        boxes_from_file(tmp_path / "bad.csv")


def test_resolve_box_dispatch(tmp_path):
    img, truth = chest_phantom(120, 100, 0)
    mask = np.zeros((60, 50), np.uint8)
    mask[10:40, 5:20] = 1
    mask[12:42, 28:45] = 1
    Image.fromarray(mask * 255).save(tmp_path / "img1.png")
    pd.DataFrame({"image_id": ["img1"], "x0": [5], "y0": [6], "x1": [500], "y1": [60]}).to_csv(
        tmp_path / "b.csv", index=False
    )

    assert resolve_box("img1", img, DataConfig(crop="lungs")) == locate_lungs(img)
    classical = resolve_box("img1", img, DataConfig(crop="lungs_classical"))  # type: ignore[arg-type]
    assert classical == locate_lungs_classical(img) and classical.method == "classical"
    none = resolve_box("img1", img, DataConfig(crop="none"))
    assert none.ok and (none.x1, none.y1) == (100, 120)
    from_mask = resolve_box("img1", img, DataConfig(crop="masks", masks_dir=str(tmp_path)))
    assert (from_mask.x0, from_mask.y0, from_mask.x1, from_mask.y1) == (10, 20, 90, 84)
    missing = resolve_box("img2", img, DataConfig(crop="masks", masks_dir=str(tmp_path)))
    assert not missing.ok and "img2" in missing.note
    from_file = resolve_box("img1", img, DataConfig(crop="boxes", boxes_file=str(tmp_path / "b.csv")))
    assert (from_file.x0, from_file.x1, from_file.ok) == (5, 100, True)  # clipped to the image
    with pytest.raises(ConfigError):
        resolve_box("img1", img, DataConfig(crop="masks"))
    with pytest.raises(ConfigError, match="lungs_classical"):
        resolve_box("img1", img, DataConfig(crop="lung"))  # type: ignore[arg-type]


def synthetic_truth(root, dataset: str) -> pd.DataFrame:
    """The generator's truth table with absolute image paths."""
    truth = pd.read_csv(root / "_synthetic_truth" / f"{dataset}.csv", dtype={"image_id": str})
    return truth.assign(path=[str(root / p) for p in truth["path"]], dataset=dataset)


@pytest.mark.parametrize("locate", [locate_lungs, locate_lungs_classical])
@pytest.mark.parametrize("dataset", ["brixia", "aiforcovid"])
def test_locate_lungs_iou_on_tiny_synthetic(tiny_data, dataset, locate):
    table = localiser_iou(synthetic_truth(tiny_data, dataset), locate=locate)
    learned = locate is locate_lungs  # the classical fallback suffers more from lungs of varying darkness
    assert len(table) >= 36
    assert table["iou"].mean() >= (0.9 if learned else 0.85)
    assert table["iou"].quantile(0.1) >= (0.75 if learned else 0.7)
    assert table["ok"].mean() >= (0.95 if learned else 0.9)


def test_box_from_synthetic_masks_matches_truth(tiny_data):
    truth = synthetic_truth(tiny_data, "brixia").head(10)
    for row in truth.itertuples():
        mask = read_mask(tiny_data / "_synthetic_truth" / "masks" / "brixia" / f"{row.image_id}.png")
        box = box_from_mask(mask, (row.rows, row.columns))
        assert box_iou(box, (row.x0, row.y0, row.x1, row.y1)) > 0.95


def lung_map(size: int = 128, left=(0.3, 0.47, 0.13, 0.27), right=(0.7, 0.47, 0.13, 0.27)) -> np.ndarray:
    """A probability map with two elliptical lungs ``(cx, cy, rx, ry)`` (fractions of the side)."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    prob = np.zeros((size, size), np.float32)
    for cx, cy, rx, ry in (left, right):
        prob[((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1] = 0.95
    return prob


def test_segmented_box_scales_a_plausible_pair_to_the_image():
    prob = lung_map()
    box, reason = segmented_box(prob, (1000, 800))
    assert reason == "" and box.ok and box.method == "unet"
    rows, cols = np.nonzero(prob > 0.5)
    expected = (cols.min() * 800 // 128, rows.min() * 1000 // 128,
                -(-(cols.max() + 1) * 800 // 128), -(-(rows.max() + 1) * 1000 // 128))
    assert (box.x0, box.y0, box.x1, box.y1) == expected


def test_segmented_box_joins_a_piece_split_off_a_lung():
    prob = lung_map(left=(0.3, 0.42, 0.13, 0.22))
    prob[92:100, 30:46] = 0.9  # base of the left lung beyond a band of consolidation
    box, reason = segmented_box(prob, (128, 128))
    assert reason == "" and box.y1 == 100
    prob[120:126, 60:70] = 0.9  # a blob below the heart, in no lung's columns: ignored
    assert segmented_box(prob, (128, 128))[0].y1 == 100


@pytest.mark.parametrize(
    ("prob", "reason"),
    [
        (np.zeros((128, 128), np.float32), NO_LUNG_FIELD),
        (lung_map(right=(0.3, 0.47, 0.13, 0.27)), "one lung field"),
        (lung_map(right=(0.75, 0.47, 0.08, 0.17)), "lung areas differ"),
        (lung_map(left=(0.3, 0.47, 0.2, 0.15), right=(0.7, 0.47, 0.1, 0.3)), "lung heights differ"),
        (lung_map(left=(0.3, 0.475, 0.13, 0.325), right=(0.7, 0.575, 0.13, 0.225)), "apices are not level"),
        (lung_map(left=(0.3, 0.39, 0.13, 0.19), right=(0.7, 0.5, 0.13, 0.3)), "bases are not level"),
        (lung_map(left=(0.25, 0.3, 0.2, 0.12), right=(0.75, 0.3, 0.2, 0.12)), "lung box height/width"),
    ],
    ids=["empty", "one", "areas", "heights", "apices", "bases", "upper-half-only"],
)
def test_segmented_box_flags_implausible_lungs(prob, reason):
    box, why = segmented_box(prob, (600, 600))
    assert box is None and reason in why


def test_missing_or_corrupt_weights_name_the_file_and_the_rebuild_command(tmp_path):
    img, _ = chest_phantom(200, 180, 0)
    missing = tmp_path / "none.pt"
    with pytest.raises(ConfigError, match="none.pt.*not found.*train_lung_segmenter") as error:
        locate_lungs(img, weights=missing)
    assert REBUILD_COMMAND in str(error.value)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(ConfigError, match="corrupt.pt.*cannot read.*train_lung_segmenter"):
        segment(img, weights=corrupt)


def test_training_is_deterministic():
    rng = np.random.default_rng(0)
    images = rng.random((6, BASE_SIZE, BASE_SIZE), dtype=np.float32)
    masks = np.zeros(images.shape, np.uint8)
    masks[:, 60:200, 40:110] = masks[:, 60:200, 146:216] = 1
    real = np.array([True] * 4 + [False] * 2)
    settings = TrainSettings(steps=2, batch_size=4, threads=1)
    first = train_segmenter(images, masks, real, settings)
    again = train_segmenter(images, masks, real, settings)
    other = train_segmenter(images, masks, real, TrainSettings(steps=2, batch_size=4, threads=1, seed=1))
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


@pytest.mark.timeout(120)
def test_segmenter_runs_in_workers_forked_after_multithreaded_torch():
    img, _ = chest_phantom(300, 260, 1)
    torch.nn.functional.conv2d(torch.rand(8, 16, 96, 96), torch.rand(16, 16, 3, 3))  # parent's thread pool in use
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("fork")) as pool:
        boxes = list(pool.map(locate_lungs, [img, img]))
    assert boxes == [locate_lungs(img)] * 2
