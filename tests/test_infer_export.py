"""``mdmt export``: ONNX (run in onnxruntime) and TorchScript match PyTorch on real and synthetic films, with the
preprocessing parameters beside them."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.infer_runs import train_tiny_run

from mdmt.cli import main
from mdmt.errors import ConfigError
from mdmt.infer.export import PREPROCESSING_FILE, export_run
from mdmt.infer.films import load_film, network_input
from mdmt.infer.model_io import load_trained

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def run_dir(tiny_config, tiny_caches, tmp_path_factory) -> Path:
    return train_tiny_run(tiny_config, tmp_path_factory.mktemp("export-runs"))


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exported")
    assert main(["export", "--run", str(run_dir), "--format", "onnx", "--out", str(out)]) == 0
    export_run(run_dir, "torchscript", out)
    return out


def _films(paths: list[Path], run_dir: Path) -> tuple[torch.Tensor, dict[str, np.ndarray], list[str]]:
    """Network input of ``paths`` and PyTorch's outputs per head."""
    trained = load_trained(run_dir)
    x = network_input([load_film(p, trained.config.data).image for p in paths], trained)
    return x, {k: v.numpy() for k, v in trained.outputs(x).items()}, [t.name for t in trained.tasks]


def _check_onnx(exported: Path, x: torch.Tensor, expected: dict[str, np.ndarray], names: list[str]) -> None:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == names
    for name, got in zip(names, session.run(None, {"image": x.numpy()}), strict=True):
        np.testing.assert_allclose(got, expected[name], atol=TOLERANCE, rtol=0)


def _check_torchscript(exported: Path, x: torch.Tensor, expected: dict[str, np.ndarray], names: list[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        network = torch.jit.load(str(exported / "model.pt"))
    with torch.no_grad():
        for name, got in zip(names, network(x), strict=True):
            np.testing.assert_allclose(got.numpy(), expected[name], atol=TOLERANCE, rtol=0)


def test_exports_match_pytorch_on_synthetic_films(run_dir, exported, tiny_data):
    paths = sorted((tiny_data / "BRIXIA" / "dicom_clean").glob("*.dcm"))[:5]
    paths += sorted((tiny_data / "AIforCOVID" / "imgs").glob("*.dcm"))[:4]
    x, expected, names = _films(paths, run_dir)
    _check_onnx(exported, x, expected, names)
    _check_torchscript(exported, x, expected, names)


def test_exports_match_pytorch_on_real_films(run_dir, exported, real_films):
    x, expected, names = _films(sorted((real_films / "images").glob("*.png"))[:7], run_dir)
    _check_onnx(exported, x, expected, names)
    _check_torchscript(exported, x, expected, names)


def test_preprocessing_json_describes_the_input_and_every_output(run_dir, exported):
    info = json.loads((exported / PREPROCESSING_FILE).read_text())
    trained = load_trained(run_dir)
    data = trained.config.data
    assert (info["image_size"], info["input_size"], info["crop"]) == (data.image_size, 48, "lungs_classical")
    assert info["clip_percentiles"] == list(data.clip_percentiles)
    assert [info["mean"], info["std"]] == [list(v) for v in trained.normalization]
    outputs = {o["name"]: o for o in info["outputs"]}
    assert outputs["prognosis"]["class_names"] == ["MILD", "SEVERE"] and outputs["prognosis"]["outputs"] == 2
    assert outputs["severity_regions"]["groups"] == ["A", "B", "C", "D", "E", "F"]
    assert info["input"]["shape"] == ["batch", 3, 48, 48]


def test_an_unknown_format_is_refused(run_dir, tmp_path):
    with pytest.raises(ConfigError, match="format"):
        export_run(run_dir, "tflite", tmp_path)  # type: ignore[arg-type]
