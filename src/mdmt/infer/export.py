"""``mdmt export``: the inference network as ONNX or TorchScript, with ``preprocessing.json`` beside it.

The exported graph takes the network input, ``image``: float32 ``(B, 3, S, S)`` with ``S = model.input_size``
(the film decoded, clipped to the percentiles, cropped, resized to ``data.image_size`` as uint8, divided by
255, resized to ``S``, the gray channel repeated three times, then ``(x - mean) / std``; ``mdmt.infer.preprocess``
does all of it). It returns one raw output per head, in ``preprocessing.json``'s task order, named after the
task; the JSON gives each task's decoding (``mdmt.losses.decode``): a classification head's ``groups × classes``
logits take a softmax per group, an ordinal head's ``groups × (classes − 1)`` logits a sigmoid each (the score
is how many exceed 0.5), a regression head gives one value per group (regional Brixia scores are clipped to
0–3). The lung crop is not in the graph.

A run whose model reads clinical columns is exported with a second input, ``clinical``: float32 ``(B, D)``, the
encoded clinical vector. ``preprocessing.json``'s ``clinical`` entry holds what builds it from a sheet row: the
columns, each numeric column's training mean and standard deviation (a blank is 0, the mean), each text column's
training categories (one-hot; an unseen one gets no bit), a missing indicator after each column, and the
``features`` order of the vector.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from mdmt.clinical import ClinicalEncoder
from mdmt.errors import ConfigError
from mdmt.infer.extras import require
from mdmt.infer.model_io import TrainedModel, load_trained
from mdmt.runs import atomic_target, atomic_write_text
from mdmt.tasks import Task, group_names

ExportFormat = Literal["onnx", "torchscript"]
FORMATS: dict[str, str] = {"onnx": "model.onnx", "torchscript": "model.pt"}
"""Format → the file name of the exported network."""
PREPROCESSING_FILE = "preprocessing.json"
INPUT_NAME = "image"
CLINICAL_INPUT = "clinical"
ONNX_OPSET = 17
DECODING = {
    "classification": "softmax over each group's n_classes logits; the predicted class is the argmax",
    "ordinal": "sigmoid of each group's n_classes - 1 logits (P(score > k)); the score is how many exceed 0.5",
    "regression": "one value per group (regional Brixia scores: clip to 0-3)",
}


class InferenceNetwork(nn.Module):
    """``image (, clinical) → tuple of raw head outputs`` in the run's task order (what the exported graph
    computes)."""

    def __init__(self, trained: TrainedModel):
        super().__init__()
        self.model = trained.model
        self.names = [t.name for t in trained.tasks]
        self.inputs = [INPUT_NAME, CLINICAL_INPUT] if trained.encoder is not None else [INPUT_NAME]

    def forward(self, image: torch.Tensor, *clinical: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every head's raw outputs ``(B, n_outputs)``."""
        outputs = self.model(image, *clinical)
        return tuple(outputs[name] for name in self.names)


def _task_info(task: Task) -> dict[str, object]:
    return {"name": task.name, "kind": task.kind, "outputs": task.n_outputs, "groups": group_names(task),
            "n_classes": task.n_classes, "class_names": list(task.class_names), "decoding": DECODING[task.kind]}


def preprocessing(trained: TrainedModel, model_file: str) -> dict[str, object]:
    """What a consumer of the exported network needs: the preprocessing parameters and each output's decoding."""
    data, model_cfg = trained.config.data, trained.config.model
    mean, std = trained.normalization
    return {
        "model_file": model_file,
        "run": str(trained.run_dir.resolve()),
        "backbone": asdict(model_cfg.backbone),
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, model_cfg.input_size, model_cfg.input_size],
                  "dtype": "float32"},
        "image_size": data.image_size,
        "input_size": model_cfg.input_size,
        "clip_percentiles": list(data.clip_percentiles),
        "crop": data.crop,
        "crop_margin": data.crop_margin,
        "mean": list(mean),
        "std": list(std),
        "steps": [
            "decode the film to gray (DICOM: modality LUT, MONOCHROME1 inverted; colour: mean of R, G, B)",
            "clip to the clip_percentiles and scale to [0, 1]",
            "crop to the lung box of the crop mode, enlarged by crop_margin and squared (crop 'none': whole film)",
            "resize to image_size x image_size (bilinear, antialiased) and round to uint8",
            "divide by 255, resize to input_size (bilinear, antialiased) when it differs",
            "repeat the gray channel 3 times, subtract mean and divide by std per channel",
        ],
        "outputs": [_task_info(t) for t in trained.tasks],
        **({"clinical": _clinical_info(trained.encoder)} if trained.encoder is not None else {}),
    }


def _clinical_info(encoder: ClinicalEncoder) -> dict[str, object]:
    return {
        "input": {"name": CLINICAL_INPUT, "shape": ["batch", encoder.dim], "dtype": "float32"},
        **encoder.to_dict(),
        "steps": [
            ("per column, in order: a numeric column gives (value - mean) / std, 0 when blank (numeric: [mean, "
             "std]); a text column gives one 0/1 bit per training category (categories), none when blank or unseen"),
            "then the column's missing indicator: 1 when blank, else 0",
            "the vector follows the features order",
        ],
    }


def _example(trained: TrainedModel) -> tuple[torch.Tensor, ...]:
    size = trained.config.model.input_size
    image = torch.zeros(2, 3, size, size, device=trained.device)
    if trained.encoder is None:
        return (image,)
    return image, torch.zeros(2, trained.encoder.dim, device=trained.device)


def _write_onnx(network: InferenceNetwork, example: tuple[torch.Tensor, ...], path: Path) -> None:
    require("onnx", "ONNX export")
    axes = {name: {0: "batch"} for name in [*network.inputs, *network.names]}
    with atomic_target(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter: a simple graph
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the input widths checked are the export's
        torch.onnx.export(network, example, str(tmp), input_names=network.inputs, output_names=network.names,
                          dynamic_axes=axes, opset_version=ONNX_OPSET, dynamo=False)


def _write_torchscript(network: InferenceNetwork, example: tuple[torch.Tensor, ...], path: Path) -> None:
    with atomic_target(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still the portable format
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.jit.save(torch.jit.trace(network, example), str(tmp))


def export_run(run_dir: str | Path, fmt: ExportFormat, out: str | Path, device: str = "cpu") -> list[Path]:
    """Write the finished run's network in ``fmt`` (``model.onnx`` or ``model.pt``) and ``preprocessing.json``
    (with the clinical encoder of a run that reads clinical columns) into ``out``; returns both paths."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}")
    trained = load_trained(run_dir, device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    network = InferenceNetwork(trained).eval()
    model_path = out / FORMATS[fmt]
    with torch.no_grad():
        (_write_onnx if fmt == "onnx" else _write_torchscript)(network, _example(trained), model_path)
    info_path = out / PREPROCESSING_FILE
    atomic_write_text(json.dumps(preprocessing(trained, model_path.name), indent=2) + "\n", info_path)
    return [model_path, info_path]
