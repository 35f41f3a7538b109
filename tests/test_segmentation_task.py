"""The segmentation task kind: masks cached aligned with the crop, moved with the image by augmentation, the
indicator-masked loss, the mask decoder's output, a one-batch overfit, and pooled models left as they were."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mdmt.cache.image_cache import build_cache, cache_key
from mdmt.config import AugmentConfig, DataConfig, ModelConfig
from mdmt.data.augment import BatchAugmenter
from mdmt.data.batches import CachedImageDataset, MultiSourceDataset, mask_targets
from mdmt.errors import ConfigError
from mdmt.losses import task_losses
from mdmt.models.multitask import build_model
from mdmt.tasks import MASK_PRESENT, TASKS, SegmentationTask, dice_scores, get_task

SIZE = 32


def lung_mask(size: int = 8) -> SegmentationTask:
    return TASKS.build({"name": "lung_mask", "params": {"size": size}}, name="lung_mask")


def films(tmp_path, count: int = 3) -> SimpleNamespace:
    """Films whose bright rectangle is exactly their mask (a different one per film; the last film has no mask)."""
    rows = []
    for i in range(count):
        film = np.zeros((100, 80), dtype=np.uint8)
        film[30 + 5 * i:75, 15:55 + 5 * i] = 255
        path, mask = tmp_path / f"f{i}.png", tmp_path / f"m{i}.png"
        Image.fromarray(film).save(path)
        Image.fromarray(film).save(mask)
        rows.append({"image_id": f"f{i}", "patient_id": f"p{i}", "center": "A", "path": str(path), "dataset": "toy",
                     "mask_path": str(mask) if i < count - 1 else np.nan})
    boxes = tmp_path / "boxes.csv"
    pd.DataFrame({"image_id": [r["image_id"] for r in rows], "x0": 8, "y0": 20, "x1": 70, "y1": 92}).to_csv(boxes)
    return SimpleNamespace(records=pd.DataFrame(rows), dropped=pd.DataFrame(columns=["image_id", "path", "reason"]),
                           config=DataConfig(image_size=SIZE, crop="boxes", boxes_file=str(boxes)))


def test_mask_is_cached_aligned_with_the_film_crop(tmp_path):
    source = films(tmp_path)
    cache = build_cache(source, source.config, tmp_path / "cache", progress=False, masks=True)
    assert cache.masks is not None and cache.masks.shape == cache.images.shape
    assert cache.records[MASK_PRESENT].tolist() == [True, True, False]
    for row in range(2):  # the film was cropped to the box and resized: its bright part is the mask, pixel by pixel
        assert 0.1 < cache.masks[row].mean() < 0.9
        np.testing.assert_array_equal(cache.masks[row], (cache.images[row] >= 128).astype(np.uint8))
    assert not cache.masks[2].any()
    plain = build_cache(source, source.config, tmp_path / "cache", progress=False)
    assert plain.masks is None and plain.path != cache.path
    assert cache_key(source.records, source.config) == plain.key != cache.key
    np.testing.assert_array_equal(plain.images, cache.images)


def test_flip_and_affine_move_image_and_mask_together():
    task = lung_mask(SIZE)
    images = torch.zeros(4, 1, SIZE, SIZE)
    images[:, :, 6:20, 4:14] = 1.0
    targets = {task.name: images.flatten(1).clone()}
    for cfg in (AugmentConfig(p=1.0, shift=0.0, zoom=0.0, rotation=0.0, flip=True, elastic=False),
                AugmentConfig(p=1.0, shift=0.1, zoom=0.1, rotation=10.0, flip=True, elastic=True)):
        moved, out = BatchAugmenter(cfg, [task])(images, targets, torch.Generator().manual_seed(3))
        assert not torch.equal(moved, images)
        torch.testing.assert_close(out[task.name], moved.flatten(1))


def test_mask_targets_follow_the_image_at_a_coarser_grid():
    task = lung_mask(8)
    images = torch.zeros(2, 1, SIZE, SIZE)
    images[:, :, 8:24, 4:12] = 1.0
    targets = {task.name: mask_targets(images[:, 0].numpy().astype(np.uint8), np.arange(2), 8)}
    moved, out = BatchAugmenter(AugmentConfig(p=1.0, shift=0.0, zoom=0.0, rotation=0.0, flip=True, elastic=False),
                                [task])(images, targets, torch.Generator().manual_seed(0))
    coarse = torch.nn.functional.adaptive_avg_pool2d(moved, 8).flatten(1)
    torch.testing.assert_close(out[task.name], coarse)
    grid = out[task.name].reshape(2, 8, 8)  # the rectangle of cells 1-2 is now in cells 5-6
    assert grid[:, 2:6, 5:7].min() == 1.0 and grid[:, :, :5].max() == 0.0


def test_rows_without_a_mask_add_nothing_to_the_loss(tmp_path):
    source = films(tmp_path)
    cache = build_cache(source, source.config, tmp_path / "cache", progress=False, masks=True)
    task = lung_mask(8)
    batch = CachedImageDataset(cache, [0, 1, 2], [task]).__getitems__([0, 1, 2])
    assert batch["present"][task.name].tolist() == [True, True, False]
    outputs = torch.randn(3, 64, requires_grad=True)
    loss = task_losses({task.name: outputs}, batch["targets"], batch["present"], [task])[task.name]
    loss.backward()
    assert loss > 0 and outputs.grad[:2].abs().sum() > 0
    assert outputs.grad[2].abs().sum() == 0
    mixed = MultiSourceDataset([CachedImageDataset(cache, [0, 1], [task]),
                                CachedImageDataset(cache, [2], [get_task("severity_regions")])])
    gathered = mixed.__getitems__([2, 0])
    assert gathered["present"][task.name].tolist() == [False, True]
    torch.testing.assert_close(gathered["targets"][task.name][1], batch["targets"][task.name][0])
    assert gathered["targets"][task.name][0].abs().sum() == 0


def test_decoder_gives_the_mask_grid_and_pooled_heads_are_unchanged():
    task, severity = lung_mask(16), get_task("severity_regions")
    model_cfg = ModelConfig(backbone="tiny_cnn", weights="none")
    torch.manual_seed(0)
    pooled = build_model(model_cfg, [severity]).eval()
    torch.manual_seed(0)
    both = build_model(model_cfg, [severity, task]).eval()
    x = torch.randn(2, 3, 64, 64)
    outputs = both(x)
    assert outputs[task.name].shape == (2, 256)
    torch.testing.assert_close(outputs[severity.name], pooled(x)[severity.name], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="mask_decoder"):
        build_model(ModelConfig(backbone="tiny_cnn", weights="none", heads={"lung_mask": "linear"}), [task])


def test_one_batch_overfit_drives_dice_up(one_torch_thread):
    torch.manual_seed(0)
    task, side = lung_mask(8), 2 * SIZE
    masks = np.zeros((4, side, side), dtype=np.uint8)
    for i in range(4):
        masks[i, 8 + 4 * i:40 + 2 * i, 12:52 - 4 * i] = 1
    images = torch.from_numpy(masks).float().unsqueeze(1).expand(-1, 3, -1, -1) + 0.1 * torch.randn(4, 3, side, side)
    targets = {task.name: mask_targets(masks, np.arange(4), 8)}
    present = {task.name: torch.ones(4, dtype=torch.bool)}
    model = build_model(ModelConfig(backbone="tiny_cnn", weights="none"), [task])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def dice() -> float:  # in training mode: the batch's own normalisation statistics
        with torch.no_grad():
            probabilities = torch.sigmoid(model(images)[task.name]).numpy()
        return float(dice_scores(probabilities, targets[task.name].numpy()).mean())

    before = dice()
    for _ in range(40):
        optimizer.zero_grad()
        task_losses(model(images), targets, present, [task])[task.name].backward()
        optimizer.step()
    assert dice() > max(0.8, before + 0.2)


def test_mdmt_train_learns_severity_and_lung_masks_from_real_films(real_films, tmp_path):
    """``mdmt train`` with the scored films and tasks [severity, lung_mask]: unscored films join the folds for their
    masks, the lung-mask predictions carry each film's true mask share from the cache, severity only scored films."""
    import yaml

    from mdmt.cli import main
    from mdmt.sources.scored_films import read_scored_films

    manifest = pd.read_csv(real_films / "manifest.csv", dtype=str)
    scored = set(pd.read_csv(real_films / "brixia-scores.csv", dtype=str)["id"])
    ids = [*[i for i in manifest["id"] if i in scored][:10], *[i for i in manifest["id"] if i not in scored][:10]]
    folder = tmp_path / "films"
    folder.mkdir()
    subset = manifest[manifest["id"].isin(ids)].copy()
    for column in ("image", "mask"):
        subset[column] = [str(real_films / p) for p in subset[column]]
    subset.to_csv(folder / "manifest.csv", index=False)
    scores = pd.read_csv(real_films / "brixia-scores.csv", dtype=str)
    scores[scores["id"].isin(ids)].to_csv(folder / "brixia-scores.csv", index=False)
    config = {
        "data": {"datasets": {"real": {"name": "scored_films", "params": {"root": str(folder)}}},
                 "image_size": 32, "crop": "none", "cache_dir": str(tmp_path / "cache")},
        "model": {"backbone": "tiny_cnn", "weights": "none", "input_size": 32, "severity_task": "severity_regions"},
        "train": {"batch_size": 8, "max_epochs": 1},
        "protocol": {"dataset": "real", "cv_folds": 3},
        "strategies": {"masks": {"params": {"datasets": ["real"], "tasks": ["severity", "lung_mask"]}}},
        "runtime": {"device": "cpu", "threads": 1},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", "--config", str(tmp_path / "config.yaml"), "--set", "run.strategy=masks",
                 "--results-dir", str(tmp_path / "results")]) == 0
    run = next((tmp_path / "results").rglob("DONE")).parent
    masks = pd.read_csv(run / "predictions_lung_mask.csv", dtype={"image_id": str})
    severity = pd.read_csv(run / "predictions_severity_regions.csv", dtype={"image_id": str})
    assert set(severity["image_id"]) <= scored
    assert set(masks["image_id"]) - scored, "no unscored film in the test fold: they were left out of the folds"
    records = read_scored_films(folder, "real").records.set_index("image_id")
    assert masks["y_true"].between(0.05, 0.95).all()  # a lung mask's share of a film: neither empty nor full
    assert masks["image_id"].isin(records.index).all() and masks["y_pred"].between(0, 1).all()
