"""``mdmt explain``: Grad-CAM of the prognosis and severity heads on every backbone family, overlays, Brixia
zones and the contact sheet."""

from __future__ import annotations

import sys
import typing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers.infer_runs import train_tiny_run
from PIL import Image

from mdmt.cli import main
from mdmt.config import InferConfig, ModelConfig, PluginRef
from mdmt.errors import ConfigError
from mdmt.infer.cam import (
    EXPLAIN_MAPS,
    GRAD_CAM_METHODS,
    grad_cams,
    occlusion_maps,
    target_layer,
)
from mdmt.infer.explain import explain_files
from mdmt.infer.overlays import DISPLAY, cam_overlay, zone_boxes
from mdmt.models.multitask import build_model
from mdmt.tasks import get_task

TASKS = [get_task("prognosis"), get_task("severity_regions")]
FAMILIES = {
    "tiny_cnn": "features.14",  # the last ReLU, before the stage's final max pooling
    "resnet18": "layer4",
    "densenet121": "features",
    "efficientnet_b0": "bn2",
    "mobilenet_v2": "features",
    "shufflenet_v2_x0_5": "conv5",
    "googlenet": "inception5b",
}
"""One backbone of each family in the registry → the layer Grad-CAM should weigh."""


@pytest.fixture(scope="module")
def run_dir(tiny_config, tiny_caches, tmp_path_factory) -> Path:
    return train_tiny_run(tiny_config, tmp_path_factory.mktemp("explain-runs"))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_grad_cam_works_on_every_backbone_family(name, one_torch_thread):
    if name.startswith("efficientnet"):
        pytest.importorskip("timm")
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=PluginRef(name), weights="none"), TASKS).eval()
    assert target_layer(model.backbone) is model.backbone.get_submodule(FAMILIES[name])
    x = torch.randn(2, 3, 64, 64)
    for task in TASKS:
        cams = grad_cams(model, task, x)
        assert cams.shape == (2, 64, 64) and np.isfinite(cams).all()
        assert cams.min() >= 0 and cams.max() <= 1 + 1e-6
        for cam in cams:  # each map is scaled to [0, 1], or all zero when nothing raises the head's scalar
            assert cam.max() == 0 or cam.max() > 0.5
    assert not model.training


def _averaging_tiny_cnn():
    """A ``tiny_cnn`` severity model whose every conv averages its 3 × 3 inputs and whose head sums the pooled
    features: its global score grows with the bright pixels of the film, wherever they are."""
    model = build_model(ModelConfig(backbone=PluginRef("tiny_cnn"), weights="none"), TASKS[1:]).eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.fill_(1.0 / (9 * module.in_channels))
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.reset_parameters()
                module.reset_running_stats()
            elif isinstance(module, torch.nn.Linear):
                module.weight.fill_(0.1)
                module.bias.zero_()
    return model


def test_the_map_holds_the_evidence_where_it_is(one_torch_thread):
    model = _averaging_tiny_cnn()
    x = -torch.ones(1, 3, 48, 48)  # the demo's input size; dark everywhere (no evidence) ...
    x[..., 30:38, 6:14] = 1.0  # ... but for one bright square in the lower-left quarter
    cam = grad_cams(model, TASKS[1], x)[0]
    assert cam[24:, :24].sum() / cam.sum() > 0.75  # 0.62 on the 3 x 3 grid after the last max pooling
    flat = grad_cams(model, TASKS[1], torch.full((1, 3, 48, 48), 0.5))[0]  # every pixel raises the score
    assert flat.max() == pytest.approx(1.0) and flat.min() > 0.3  # not shifted to zero by its own minimum


@pytest.mark.parametrize("method", list(GRAD_CAM_METHODS))
def test_every_grad_cam_method_finds_the_evidence_at_the_last_stage_and_at_the_first_block(method, one_torch_thread):
    model = _averaging_tiny_cnn()
    x = -torch.ones(1, 3, 48, 48)
    x[..., 30:38, 6:14] = 1.0
    last = grad_cams(model, TASKS[1], x, method=method)[0]
    assert last[24:, :24].sum() / last.sum() > 0.75
    first = grad_cams(model, TASKS[1], x, method=method, layer="features.2")[0]  # 48 x 48: the block before pooling
    assert first.max() == pytest.approx(1.0) and first[26:42, 2:18].sum() / first.sum() > 0.99


def test_a_named_target_layer_is_that_module_and_a_wrong_name_lists_the_right_ones():
    model = build_model(ModelConfig(backbone=PluginRef("tiny_cnn"), weights="none"), TASKS)
    assert target_layer(model.backbone, "features.2") is model.backbone.features[2]
    with pytest.raises(ConfigError, match=r"no module 'features\.99'.*features\.0"):
        target_layer(model.backbone, "features.99")


def test_the_config_offers_exactly_the_maps_explain_draws():
    assert set(typing.get_args(typing.get_type_hints(InferConfig)["explain_map"])) == set(EXPLAIN_MAPS)


def test_head_scalars_are_the_log_odds_and_the_global_score():
    raw = torch.randn(5, 2)
    probability = TASKS[0].decode(raw)["score"]
    np.testing.assert_allclose(torch.sigmoid(TASKS[0].cam_scalar(raw)).numpy(), probability, atol=1e-6)
    regions = torch.randn(5, 6)
    np.testing.assert_allclose(TASKS[1].cam_scalar(regions).numpy(), regions.sum(dim=1).numpy(), atol=1e-6)
    bins = torch.tensor([[0.0, 0.0, 0.0, 50.0]])
    assert float(get_task("severity_global4").cam_scalar(bins)) == pytest.approx(3.0)


def test_zones_are_thirds_of_each_lung_inside_the_crop():
    zones = zone_boxes((10, 20, 90, 80), (0, 0, 100, 100), 50)  # lung box inside a 100 px window, drawn at 50 px
    assert zones[0] == pytest.approx((5, 10, 25, 20))  # A: image left (right lung), top third
    assert zones[2] == pytest.approx((5, 30, 25, 40))  # C: bottom third
    assert zones[5] == pytest.approx((25, 30, 45, 40))  # F: image right (left lung), bottom third


def test_overlay_is_an_rgb_picture_of_display_size():
    image = np.tile(np.arange(48, dtype=np.uint8) * 5, (48, 1))
    overlay = cam_overlay(image, np.random.default_rng(0).random((12, 12)).astype(np.float32))
    assert overlay.mode == "RGB" and min(overlay.size) >= DISPLAY


def _check_outputs(result, out: Path, heads: list[str]) -> None:
    table = pd.read_csv(out / "predictions.csv")
    for head in [*heads, "zones"]:
        for name in table[f"overlay_{head}"]:
            with Image.open(out / name) as picture:
                assert picture.format == "PNG" and min(picture.size) >= DISPLAY
    assert (out / "contact-sheet-001.png").is_file()
    assert len(result.table) == len(table)


def test_explain_writes_overlays_zones_and_a_contact_sheet(run_dir, tiny_data, tmp_path):
    dicoms = sorted((tiny_data / "BRIXIA" / "dicom_clean").glob("*.dcm"))[:3]
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not a film")
    out = tmp_path / "out"
    result = explain_files(run_dir, [*dicoms, broken], out, batch_size=2, progress=False)
    _check_outputs(result, out, ["prognosis", "severity_regions"])
    assert list(result.skipped["path"]) == [str(broken)]


def test_explain_on_real_films(run_dir, real_films, tmp_path):
    images = sorted((real_films / "images").glob("*.png"))[:4]
    result = explain_files(run_dir, images, tmp_path, progress=False)
    _check_outputs(result, tmp_path, ["prognosis", "severity_regions"])


def test_cli_explain_and_the_missing_extra(run_dir, tiny_data, tmp_path, monkeypatch, capsys):
    dicom = sorted((tiny_data / "BRIXIA" / "dicom_clean").glob("*.dcm"))[0]
    assert main(["explain", "--run", str(run_dir), str(dicom), "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "contact-sheet-001.png").is_file()
    monkeypatch.setitem(sys.modules, "pytorch_grad_cam", None)
    with pytest.raises(ConfigError, match=r"mdmt\[infer\]"):
        explain_files(run_dir, [dicom], tmp_path / "b", progress=False)
    capsys.readouterr()
    assert main(["explain", "--run", str(run_dir), str(dicom), "--out", str(tmp_path / "c")]) == 2
    assert "mdmt[infer]" in capsys.readouterr().err


def test_occlusion_finds_the_evidence_and_nothing_on_a_featureless_film(one_torch_thread):
    """The occlusion map of the averaging model: its mass where the bright square is (blurring it lowers the global
    score), and all zero on a flat film (blurring changes nothing, so nothing falls)."""
    model = _averaging_tiny_cnn()
    x = -torch.ones(1, 3, 48, 48)
    x[..., 30:38, 6:14] = 1.0
    occlusion = occlusion_maps(model, TASKS[1], x)[0]
    assert occlusion.max() == pytest.approx(1.0) and occlusion[24:, :24].sum() / occlusion.sum() > 0.75
    assert not occlusion_maps(model, TASKS[1], torch.full((1, 3, 48, 48), 0.5))[0].any()
    row, column = np.unravel_index(occlusion.argmax(), occlusion.shape)
    assert 30 - 6 <= row < 38 + 6 and 6 - 6 <= column < 14 + 6  # the peak within a patch of the square


def test_cli_explain_draws_occlusion_maps_and_predict_has_no_map_option(run_dir, tiny_data, tmp_path, capsys):
    dicom = sorted((tiny_data / "BRIXIA" / "dicom_clean").glob("*.dcm"))[0]
    assert main(["explain", "--run", str(run_dir), str(dicom), "--out", str(tmp_path / "a"), "--map", "occlusion"]) == 0
    overlays = sorted((tmp_path / "a").glob("0000-*_severity_regions.png"))
    assert len(overlays) == 1 and overlays[0].stat().st_size > 0
    with pytest.raises(SystemExit):
        main(["predict", "--run", str(run_dir), str(dicom), "--out", str(tmp_path / "b"), "--map", "occlusion"])
    assert "unrecognized arguments: --map" in capsys.readouterr().err
    first_block = ["explain", "--run", str(run_dir), str(dicom), "--cam-layer", "features.2"]
    assert main([*first_block, "--out", str(tmp_path / "c"), "--map", "layercam"]) == 0
    assert len(sorted((tmp_path / "c").glob("0000-*_severity_regions.png"))) == 1
    capsys.readouterr()
    assert main([*first_block, "--out", str(tmp_path / "d"), "--map", "occlusion"]) == 2
    assert "the occlusion map has none" in capsys.readouterr().err
