"""Task heads: pooled features ``(B, F)`` → the task's raw outputs ``(B, task.n_outputs)``, or, for a segmentation
task, the backbone's last feature map ``(B, F, h, w)`` → its mask logits.

``HEADS`` holds the paper's two heads and the mask decoder:

- ``mlp``: Linear(F,128) → ReLU → Dropout → Linear(128,32) → ReLU → Dropout → Linear(32,n), Xavier-uniform
  weights and biases 0.01 (the official code's prognosis head, ``Head_Morbidity``); ``hidden`` sets the widths;
- ``linear``: ReLU → Dropout → Linear(F,n) with PyTorch's default init (the official code's severity head,
  ``area_Global_output``);
- ``mask_decoder``: the feature map → 1×1 conv → ReLU → 3×3 conv → ReLU → 1×1 conv to one logit per cell,
  upsampled (bilinear) to the task's ``size`` × ``size`` grid and flattened row-major. Its ``spatial`` attribute
  tells ``MultiTaskModel`` to hand it the feature map instead of the pooled features.

A new head is one ``@HEADS.register(name, Params)`` factory ``(params, task=..., in_features=...) -> nn.Module``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mdmt.config import PluginRef
from mdmt.errors import ConfigError
from mdmt.registry import Registry
from mdmt.tasks import Task

MLP_BIAS = 0.01

HEADS: Registry[nn.Module] = Registry("head")


@dataclass
class LinearParams:
    """``linear``: the dropout probability before the layer."""

    dropout: float = 0.5

    def check(self, task: Task) -> None:
        """ConfigError unless the dropout is in [0, 1)."""
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"task {task.name!r}: head params.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class MLPParams(LinearParams):
    """``mlp``: the hidden layers' widths and their dropout probability."""

    hidden: list[int] = field(default_factory=lambda: [128, 32])

    def check(self, task: Task) -> None:
        """ConfigError unless the dropout is in [0, 1) and every width is positive."""
        super().check(task)
        if any(width < 1 for width in self.hidden):
            raise ConfigError(f"task {task.name!r}: head params.hidden must be positive widths, got {self.hidden}")


@HEADS.register("mlp", MLPParams, "Linear-ReLU-Dropout per hidden width, then Linear; Xavier init, biases 0.01")
def mlp_head(params: MLPParams, task: Task, in_features: int) -> nn.Sequential:
    """The paper's prognosis MLP."""
    params.check(task)
    layers: list[nn.Module] = []
    previous = in_features
    for width in params.hidden:
        layers += [nn.Linear(previous, width), nn.ReLU(), nn.Dropout(params.dropout)]
        previous = width
    layers.append(nn.Linear(previous, task.n_outputs))
    for layer in layers:
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.constant_(layer.bias, MLP_BIAS)
    return nn.Sequential(*layers)


@HEADS.register("linear", LinearParams, "ReLU → Dropout → Linear with PyTorch's default init")
def linear_head(params: LinearParams, task: Task, in_features: int) -> nn.Sequential:
    """The paper's severity head."""
    params.check(task)
    return nn.Sequential(nn.ReLU(), nn.Dropout(params.dropout), nn.Linear(in_features, task.n_outputs))


@dataclass
class DecoderParams:
    """``mask_decoder``: the channels of its hidden convolutions."""

    width: int = 32

    def check(self, task: Task) -> None:
        """ConfigError unless the width is positive."""
        if self.width < 1:
            raise ConfigError(f"task {task.name!r}: head params.width must be positive, got {self.width}")


class MaskDecoder(nn.Module):
    """``(B, C, h, w)`` feature map → ``(B, size²)`` mask logits (bilinear upsampling to ``size`` × ``size``)."""

    spatial = True

    def __init__(self, in_channels: int, size: int, width: int = 32):
        super().__init__()
        self.size = size
        self.layers = nn.Sequential(nn.Conv2d(in_channels, width, 1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1),
                                    nn.ReLU(), nn.Conv2d(width, 1, 1))

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        """The mask logits, flattened row-major."""
        logits = F.interpolate(self.layers(feature_map), size=(self.size, self.size), mode="bilinear",
                               align_corners=False)
        return logits.flatten(1)


@HEADS.register("mask_decoder", DecoderParams, "feature map → 1×1 conv → 3×3 conv → 1×1 conv, upsampled: mask logits")
def mask_decoder_head(params: DecoderParams, task: Task, in_features: int) -> MaskDecoder:
    """The light decoder of a segmentation task (``in_features``: the channels of the last feature map)."""
    params.check(task)
    return MaskDecoder(in_features, task.size, params.width)


def build_head(ref: PluginRef | str, task: Task, in_features: int) -> nn.Module:
    """The head a config entry names, giving ``(B, task.n_outputs)`` raw outputs from ``in_features`` features;
    ConfigError when a segmentation task gets a pooled head or another task the mask decoder."""
    ref = PluginRef.of(ref)
    head = HEADS.build(ref, f"task {task.name!r}: head {ref.name!r} params", task=task, in_features=in_features)
    if getattr(head, "spatial", False) != task.pixel_targets:
        raise ConfigError(f"task {task.name!r} ({task.kind}) cannot take head {ref.name!r}: "
                          f"{'a mask task needs the mask_decoder' if task.pixel_targets else 'it predicts no mask'}")
    return head
