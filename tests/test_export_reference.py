"""``mdmt export`` of the whole pipeline: the lung segmenter beside the network, and ``reference_predict.py``, which
reproduces ``mdmt predict`` from a DICOM/PNG file in a process where torch and mdmt cannot be imported."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers.infer_runs import train_tiny_run
from scipy import ndimage

from mdmt.images import normalize_intensity, read_image
from mdmt.infer.export import PREPROCESSING_FILE, REFERENCE_SCRIPT, export_run
from mdmt.infer.guard import OOD_COLUMNS
from mdmt.infer.predict import predict_files
from mdmt.lungs import locate as lungs
from mdmt.lungs.unet import WORK_SIZE, segment, squash
from mdmt.model_card import CARD_JSON, CARD_MD

ort = pytest.importorskip("onnxruntime")
TOLERANCE = 1e-4
BLOCKED = ("torch", "mdmt")


@pytest.fixture(scope="module")
def lungs_run(tiny_config, tmp_path_factory) -> Path:
    """A finished tiny run that crops with the lung segmenter (``data.crop: lungs``)."""
    config = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, crop="lungs"))
    return train_tiny_run(config, tmp_path_factory.mktemp("reference-runs"))


@pytest.fixture(scope="module")
def exported(lungs_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference-export")
    names = [p.name for p in export_run(lungs_run, "onnx", out)]
    assert names == ["model.onnx", "lungs.onnx", PREPROCESSING_FILE, REFERENCE_SCRIPT, CARD_JSON, CARD_MD]
    return out


@pytest.fixture(scope="module")
def without_torch(tmp_path_factory) -> dict[str, str]:
    """An environment whose ``import torch`` and ``import mdmt`` raise ImportError (stand-ins first on the path)."""
    folder = tmp_path_factory.mktemp("blocked")
    for name in BLOCKED:
        (folder / name).mkdir()
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked in this test')\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(folder), "HF_HUB_OFFLINE": "1"}
    for name in BLOCKED:
        check = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True,
                               check=False)
        assert check.returncode != 0 and f"{name} is blocked" in check.stderr
    return env


@pytest.fixture(scope="module")
def script():
    """The reference script as a module of this process (for its pieces)."""
    spec = importlib.util.spec_from_file_location("reference_predict", Path(__file__).parents[1] / "src" / "mdmt"
                                                  / "infer" / REFERENCE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compare(run_dir: Path, exported: Path, paths: list[Path], env: dict[str, str], tmp: Path) -> pd.DataFrame:
    """Run ``mdmt predict`` here and the exported script without torch; assert the same films, skipped films and
    columns (numbers within TOLERANCE); return predict's table."""
    result = predict_files(run_dir, paths, tmp / "predict", progress=False)
    done = subprocess.run([sys.executable, str(exported / REFERENCE_SCRIPT), *map(str, paths), "--out",
                           str(tmp / "reference.csv")], env=env, cwd=tmp, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    read = {"dtype": {"image_id": str}, "keep_default_na": False}
    expected = pd.read_csv(result.written[0], **read).drop(columns=list(OOD_COLUMNS), errors="ignore")
    got = pd.read_csv(tmp / "reference.csv", **read)
    assert list(got.columns) == list(expected.columns)
    assert got["path"].tolist() == expected["path"].tolist()
    for column in expected.columns:
        if expected[column].dtype.kind == "f":
            np.testing.assert_allclose(got[column], expected[column], atol=TOLERANCE, rtol=0, err_msg=column)
        else:
            assert got[column].astype(str).tolist() == expected[column].astype(str).tolist(), column
    skipped = [f"skipped {row.path}: {row.reason}" for row in result.skipped.itertuples(index=False)]
    assert [line for line in done.stderr.splitlines() if line.startswith("skipped ")] == skipped
    return expected


def test_reference_script_matches_predict_on_real_films_without_torch(lungs_run, exported, without_torch,
                                                                     real_films, tmp_path):
    images = real_films / "images"
    paths = sorted(images.glob("*.png"))[:6] + sorted(images.glob("*-L.png"))[:1]  # six films and a lateral view
    table = _compare(lungs_run, exported, paths, without_torch, tmp_path)
    assert len(table) >= 5 and set(table["crop_method"]) == {"unet"}
    assert table["p_severe"].between(0, 1).all() and table["brixia_global"].between(0, 18).all()


def test_reference_script_matches_predict_on_dicom_films(lungs_run, exported, without_torch, tiny_data, tmp_path):
    truth = pd.read_csv(tiny_data / "_synthetic_truth" / "aiforcovid.csv", dtype=str)
    kinds = truth.drop_duplicates(["photometric", "transfer_syntax", "bits_stored"])  # MONOCHROME1, RLE, 10-14 bit
    paths = [tiny_data / p for p in kinds["path"]]
    assert len(paths) >= 6 and set(kinds["photometric"]) == {"MONOCHROME1", "MONOCHROME2"}
    assert len(_compare(lungs_run, exported, paths, without_torch, tmp_path)) >= 4


def test_exported_segmenter_is_the_shipped_one(exported, real_films):
    info = json.loads((exported / PREPROCESSING_FILE).read_text())["segmenter"]
    assert (info["file"], info["work_size"], info["threshold"]) == ("lungs.onnx", WORK_SIZE, lungs.SEG_THRESHOLD)
    assert info["checks"]["box_aspect"] == list(lungs.SEG_BOX_ASPECT)
    session = ort.InferenceSession(str(exported / "lungs.onnx"), providers=["CPUExecutionProvider"])
    for path in sorted((real_films / "images").glob("*.png"))[:3]:
        img01 = normalize_intensity(read_image(path))
        film = np.clip(squash(img01, WORK_SIZE), 0.0, 1.0)[None, None]
        got = session.run(None, {info["input"]: film})[0][0, 0]
        np.testing.assert_allclose(got, segment(img01), atol=1e-5, rtol=0)


def test_export_card_describes_the_exported_network(exported):
    card = json.loads((exported / CARD_JSON).read_text())
    info = json.loads((exported / PREPROCESSING_FILE).read_text())
    image = card["network_data_format"]["inputs"]["image"]["preprocessing"]
    assert (image["mean"], image["std"], image["crop"]) == (info["mean"], info["std"], "lungs")
    outputs = card["network_data_format"]["outputs"]
    channels = {name: output["num_channels"] for name, output in outputs.items()}
    assert channels == {output["name"]: output["outputs"] for output in info["outputs"]}
    assert [d["synthetic"] for d in card["training_data"]] == [True, True]


def test_reference_resize_is_torchs(script):
    rng = np.random.default_rng(0)
    for size, target in ((256, 224), (48, 64), (100, 37)):
        image = rng.integers(0, 256, (size, size)).astype(np.float32) / np.float32(255)
        expected = F.interpolate(torch.from_numpy(image)[None, None], size=(target, target), mode="bilinear",
                                 antialias=True, align_corners=False)[0, 0].numpy()
        weights = script.torch_resize_weights(size, target)
        np.testing.assert_allclose(weights @ image @ weights.T, expected, atol=1e-6, rtol=0)


def test_reference_components_are_scipys_labels(script):
    rng = np.random.default_rng(1)
    for _ in range(10):
        mask = ndimage.gaussian_filter(rng.random((WORK_SIZE, WORK_SIZE)), rng.uniform(1, 4)) > 0.5
        labels, count = script.components(mask)
        expected, expected_count = ndimage.label(mask)
        assert count == expected_count and np.array_equal(labels, expected)
