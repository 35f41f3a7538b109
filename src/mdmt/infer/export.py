"""``mdmt export``: the inference network as ONNX or TorchScript, with ``preprocessing.json`` beside it.

The exported graph takes the network input, ``image``: float32 ``(B, 3, S, S)`` with ``S = model.input_size``
(the film decoded, clipped to the percentiles, cropped, resized to ``data.image_size`` as uint8, divided by
255, resized to ``S``, the gray channel repeated three times, then ``(x - mean) / std``; ``mdmt.infer.films``
does all of it). It returns one raw output per head, in ``preprocessing.json``'s task order, named after the
task; the JSON gives each task's decoding (``mdmt.losses.decode``): a classification head's ``groups × classes``
logits take a softmax per group, an ordinal head's ``groups × (classes − 1)`` logits a sigmoid each (the score
is how many exceed 0.5), a regression head gives one value per group (regional Brixia scores are clipped to
0–3). ``columns`` lists the columns ``mdmt predict`` writes for the head (``named``: the run's prognosis or
severity head, whose ``scorer`` names them). The lung crop is not in the graph: the lung segmenter is exported
beside it (``lungs.onnx`` / ``lungs.pt``: ``film`` float32 ``(B, 1, 128, 128)``, the [0, 1] film squashed to the
working size, → ``lungs``, the lung probability per pixel), and ``preprocessing.json``'s ``segmenter`` entry holds
the rules that turn its map into the lung box (``mdmt.lungs.locate.segmented_box``): the crop of a ``crop: lungs``
run, and under every crop mode the guard of ``mdmt predict`` (a film without a plausible pair of lungs is not
scored, ``mdmt.infer.guard``).

An ONNX export also holds ``reference_predict.py``, a standalone script (numpy, pydicom, Pillow, onnxruntime; no
torch, no mdmt) that goes from DICOM/PNG/JPEG files to the columns of ``mdmt predict``, and every export holds the
run's model card (``metadata.json``, ``model_card.md``; ``mdmt.model_card``).

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

from mdmt.clinical_encoder import ClinicalEncoder
from mdmt.errors import ConfigError
from mdmt.infer.extras import require
from mdmt.infer.model_io import TrainedModel, load_trained
from mdmt.lungs import locate as lungs
from mdmt.lungs.unet import WORK_SIZE, load_segmenter, weights_fingerprint
from mdmt.model_card import write_model_card
from mdmt.runs import atomic_target, atomic_write_text
from mdmt.tasks import Task

ExportFormat = Literal["onnx", "torchscript"]
FORMATS: dict[str, str] = {"onnx": "model.onnx", "torchscript": "model.pt"}
"""Format → the file name of the exported network."""
SEGMENTER_FILES: dict[str, str] = {"onnx": "lungs.onnx", "torchscript": "lungs.pt"}
"""Format → the file name of the exported lung segmenter."""
SEGMENTER_INPUT, SEGMENTER_OUTPUT = "film", "lungs"
REFERENCE_SCRIPT = "reference_predict.py"
"""The standalone script an ONNX export holds (its source: ``mdmt/infer/reference_predict.py``)."""
PREPROCESSING_FILE = "preprocessing.json"
INPUT_NAME = "image"
CLINICAL_INPUT = "clinical"
ONNX_OPSET = 17


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


class LungNetwork(nn.Module):
    """``film (B, 1, S, S)`` in [0, 1] → lung probability ``(B, 1, S, S)``, ``S = WORK_SIZE``: the shipped segmenter
    as ``mdmt.lungs.unet.segment`` runs it."""

    def __init__(self) -> None:
        super().__init__()
        self.unet = load_segmenter()
        self.inputs, self.names = [SEGMENTER_INPUT], [SEGMENTER_OUTPUT]

    def forward(self, film: torch.Tensor) -> torch.Tensor:
        """The sigmoid of the U-Net's logits."""
        return torch.sigmoid(self.unet(film))


def _segmenter_info(model_file: str) -> dict[str, object]:
    return {
        "file": model_file, "input": SEGMENTER_INPUT, "output": SEGMENTER_OUTPUT, "work_size": WORK_SIZE,
        "weights_sha256_16": weights_fingerprint(), "threshold": lungs.SEG_THRESHOLD,
        "checks": {"min_piece": lungs.SEG_MIN_PIECE, "min_lung": lungs.SEG_MIN_LUNG,
                   "min_area_ratio": lungs.SEG_MIN_AREA_RATIO, "min_height_ratio": lungs.SEG_MIN_HEIGHT_RATIO,
                   "min_overlap": lungs.SEG_MIN_OVERLAP, "max_apex_gap": lungs.SEG_MAX_APEX_GAP,
                   "max_base_gap": lungs.SEG_MAX_BASE_GAP, "box_aspect": list(lungs.SEG_BOX_ASPECT),
                   "lung_aspect": list(lungs.SEG_LUNG_ASPECT), "fragment_gap": lungs.SEG_FRAGMENT_GAP},
        "steps": [
            ("resize the clipped [0, 1] film to work_size x work_size (bilinear, antialiased, aspect not kept), "
             "clip to [0, 1]"),
            ("lung pixels: probability > threshold; 4-connected pieces; the two largest must pass the checks "
             "(mdmt.lungs.locate.segmented_box), pieces split off a lung join it"),
            ("the box of the chosen pieces, scaled to the film; a film without a plausible pair of lungs is not "
             "scored (mdmt.infer.guard)"),
        ],
    }


def _output_info(trained: TrainedModel, task: Task) -> dict[str, object]:
    named = task in (trained.prognosis, trained.severity)
    columns = task.film_columns(torch.zeros(1, task.n_outputs), named=named)
    return {**task.export_info(), "scorer": task.scorer, "named": named, "columns": list(columns)}


def preprocessing(trained: TrainedModel, model_file: str, segmenter_file: str) -> dict[str, object]:
    """What a consumer of the exported network needs: the preprocessing parameters, the exported lung segmenter
    (``segmenter_file``) and each output's decoding."""
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
        "segmenter": _segmenter_info(segmenter_file),
        "outputs": [_output_info(trained, t) for t in trained.tasks],
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


def _write_onnx(network: InferenceNetwork | LungNetwork, example: tuple[torch.Tensor, ...], path: Path) -> None:
    require("onnx", "ONNX export")
    axes = {name: {0: "batch"} for name in [*network.inputs, *network.names]}
    with atomic_target(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter: a simple graph
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the input widths checked are the export's
        torch.onnx.export(network, example, str(tmp), input_names=network.inputs, output_names=network.names,
                          dynamic_axes=axes, opset_version=ONNX_OPSET, dynamo=False)


def _write_torchscript(network: InferenceNetwork | LungNetwork, example: tuple[torch.Tensor, ...],
                       path: Path) -> None:
    with atomic_target(path) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated but still the portable format
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.jit.save(torch.jit.trace(network, example), str(tmp))


def export_run(run_dir: str | Path, fmt: ExportFormat, out: str | Path, device: str = "cpu") -> list[Path]:
    """Write the finished run's network in ``fmt`` (``model.onnx`` or ``model.pt``), the lung segmenter
    (``lungs.onnx`` or ``lungs.pt``), ``preprocessing.json`` (with the clinical encoder of a run that reads clinical
    columns), ``reference_predict.py`` (ONNX) and the model card into ``out``; returns the paths written."""
    if fmt not in FORMATS:
        raise ConfigError(f"export format {fmt!r} is not one of {', '.join(FORMATS)}")
    trained = load_trained(run_dir, device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    network = InferenceNetwork(trained).eval()
    model_path = out / FORMATS[fmt]
    write = _write_onnx if fmt == "onnx" else _write_torchscript
    paths = [model_path, out / SEGMENTER_FILES[fmt], out / PREPROCESSING_FILE]
    with torch.no_grad():
        write(network, _example(trained), model_path)
        write(LungNetwork().eval(), (torch.zeros(2, 1, WORK_SIZE, WORK_SIZE),), paths[1])
    info = preprocessing(trained, model_path.name, paths[1].name)
    atomic_write_text(json.dumps(info, indent=2) + "\n", paths[2])
    if fmt == "onnx":
        paths.append(out / REFERENCE_SCRIPT)
        atomic_write_text(Path(__file__).with_name(REFERENCE_SCRIPT).read_text(), paths[-1])
    return paths + write_model_card(run_dir, out, info)
