"""Grad-CAM of one head (the ``grad-cam`` package) on the last convolutional stage of any backbone.

Each head is reduced to one scalar per image, the quantity whose evidence the map shows: the task's
``cam_scalar`` (``mdmt.tasks``: the log-odds of SEVERE for prognosis, the predicted global score for a regional
Brixia head, the expected class index for a multi-class one).

The target layer is the backbone's last child module that is or holds an ``nn.Conv2d`` before its global
pooling (ResNet ``layer4``, DenseNet and MobileNet ``features``, ShuffleNet ``conv5``, GoogLeNet
``inception5b``, ``tiny_cnn`` ``features``), except where ``TARGET_LAYERS`` names a later one (timm's
EfficientNet: ``bn2``, the normalisation and activation after ``conv_head``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from mdmt.errors import ConfigError
from mdmt.infer.extras import require
from mdmt.models.multitask import MultiTaskModel
from mdmt.tasks import Task

TARGET_LAYERS: dict[str, str] = {"EfficientNet": "bn2"}
"""Backbone class name → the target layer where the generic rule stops short of the last activation."""
GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


class HeadScalar(nn.Module):
    """``x → (B, 1)``: one head's scalar (``Task.cam_scalar``) of a multi-task model, what Grad-CAM explains; a model
    that fuses clinical features reads the batch's ``clinical`` ``(B, D)`` with the films."""

    def __init__(self, model: MultiTaskModel, task: Task, clinical: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.task = task
        self.clinical = clinical

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The head's scalar as a one-column output."""
        extra = () if self.clinical is None else (self.clinical.to(x.device),)
        return self.task.cam_scalar(self.model(x, *extra)[self.task.name])[:, None]


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in module.modules())


def _is_global_pool(module: nn.Module) -> bool:
    return isinstance(module, GLOBAL_POOLS) or "AdaptivePool" in type(module).__name__


def target_layer(backbone: nn.Module) -> nn.Module:
    """The module whose output Grad-CAM weighs: ``TARGET_LAYERS`` for the backbone's class, else its last child
    that is or holds a ``Conv2d`` before the global pooling."""
    named = TARGET_LAYERS.get(type(backbone).__name__)
    if named is not None:
        return backbone.get_submodule(named)
    chosen = None
    for child in backbone.children():
        if _is_global_pool(child):
            break
        if _has_conv(child):
            chosen = child
    if chosen is None:
        raise ConfigError(f"backbone {type(backbone).__name__}: no convolutional stage to explain with Grad-CAM")
    return chosen


def grad_cams(model: MultiTaskModel, task: Task, x: torch.Tensor, clinical: torch.Tensor | None = None) -> np.ndarray:
    """Grad-CAM of ``task``'s head for the network input ``x`` (and the clinical features ``clinical`` of a model
    that fuses them): ``(B, H, W)`` float32, each map scaled to [0, 1] (all zeros where no region raises the
    head's scalar). A clinical term adds to the logits without touching the image features, so the map shows
    the image branch's evidence."""
    gradcam = require("pytorch_grad_cam", "Grad-CAM")
    targets = require("pytorch_grad_cam.utils.model_targets", "Grad-CAM")
    explainer = gradcam.GradCAM(model=HeadScalar(model, task, clinical),
                                target_layers=[target_layer(model.backbone)])
    training = model.training
    try:
        with torch.enable_grad():
            maps = explainer(input_tensor=x, targets=[targets.ClassifierOutputTarget(0)] * x.shape[0])
    finally:
        explainer.activations_and_grads.release()
        model.train(training)
    return np.asarray(maps, dtype=np.float32)
