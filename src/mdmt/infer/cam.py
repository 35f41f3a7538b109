"""Evidence maps of one head: Grad-CAM (the ``grad-cam`` package) and its variants on the last convolutional stage of
any backbone or on a module named by the caller, or occlusion (``occlusion_maps``: blur a patch, see how far the
head's scalar falls).

Each head is reduced to one scalar per image, the quantity whose evidence the map shows: the task's
``cam_scalar`` (``mdmt.tasks``: the log-odds of SEVERE for prognosis, the predicted global score for a regional
Brixia head, the expected class index for a multi-class one).

The target layer is the backbone's last child module that is or holds an ``nn.Conv2d`` before its global
pooling (ResNet ``layer4``, DenseNet and MobileNet ``features``, ShuffleNet ``conv5``, GoogLeNet
``inception5b``), except where ``TARGET_LAYERS`` names a later one (timm's EfficientNet: ``bn2``, the
normalisation and activation after ``conv_head``). A stage that ends in a max or average pooling (``tiny_cnn``'s
and VGG's ``features``) is read before that pooling, at twice the grid (as the Grad-CAM paper reads VGG): the
pooling only subsamples the same evidence, and ``tiny_cnn``'s last grid is 3 × 3 at the demo's 48 px. A caller may
name another module instead (``infer.cam_layer``, a dotted path inside the backbone). ``GRAD_CAM_METHODS`` names
the package's gradient-weighted variants that read the same activations and gradients.

Each map is the positive part of the weighted activations, upsampled to the input and divided by its maximum. It
is not shifted by its minimum as ``pytorch_grad_cam`` does for display: a map whose evidence has a floor over the
whole film keeps it, so its mass in a region is that region's share of the evidence.

Occlusion needs no gradient and no target layer. On lung-cropped 128 px ``tiny_cnn`` models trained on real scored
films (``benchmarks/explain_real.py``, out of fold, two training seeds), Grad-CAM of the last stage put 0.97–1.19×
the lungs' share of the film in the lungs, below an even map over the crop (1.24×), and its variants there
1.02–1.19×; HiResCAM and LayerCAM of the first block (``features.2``, a 128 × 128 grid) put 1.50–1.54× there (the
same networks untrained: 1.03–1.08×), and occlusion with patches of an eighth of the side 1.82–1.83×: the coarse
last grid of this small network misplaces evidence that the network does take from the lungs. ``EXPLAIN_MAPS``
names them all for ``mdmt explain --map``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from mdmt.errors import ConfigError
from mdmt.infer.extras import require
from mdmt.models.multitask import MultiTaskModel
from mdmt.tasks import Task

TARGET_LAYERS: dict[str, str] = {"EfficientNet": "bn2"}
"""Backbone class name → the target layer where the generic rule stops short of the last activation."""
GLOBAL_POOLS = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
SUBSAMPLING_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
EVIDENCE_FLOOR = 1e-7
"""A map's peak (activation × gradient, in the head scalar's units) below which it is float noise, not evidence."""


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


def target_layer(backbone: nn.Module, name: str = "") -> nn.Module:
    """The module whose output Grad-CAM weighs: the submodule ``name`` of the backbone (a dotted path such as
    ``features.2``) when given, else ``TARGET_LAYERS`` for the backbone's class, else its last child that is or holds
    a ``Conv2d`` before the global pooling (a ``Sequential`` ending in a subsampling pooling: the module before that
    pooling)."""
    if name:
        try:
            return backbone.get_submodule(name)
        except AttributeError:
            convolutional = [n for n, m in backbone.named_modules() if n and _has_conv(m)]
            raise ConfigError(f"backbone {type(backbone).__name__} has no module {name!r}; modules holding a "
                              f"convolution: {', '.join(convolutional[:12])}"
                              f"{', …' if len(convolutional) > 12 else ''}") from None
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
    while isinstance(chosen, nn.Sequential) and len(chosen) > 1 and isinstance(chosen[-1], SUBSAMPLING_POOLS):
        chosen = chosen[-2]
    return chosen


def evidence_maps(cams: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Raw maps ``(B, h, w)`` → ``(B, *size)`` float32: the positive part, bilinear to ``size``, divided by each
    map's maximum; a map whose peak is below ``EVIDENCE_FLOOR`` is all zero."""
    maps = F.interpolate(torch.from_numpy(np.maximum(cams, 0)).float()[:, None], size=size, mode="bilinear",
                         align_corners=False)[:, 0]
    peaks = maps.flatten(1).amax(dim=1)[:, None, None]
    return torch.where(peaks > EVIDENCE_FLOOR, maps / peaks.clamp_min(EVIDENCE_FLOOR), 0.0).numpy()


GRAD_CAM_METHODS: dict[str, str] = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "hirescam": "HiResCAM",
                                    "layercam": "LayerCAM", "xgradcam": "XGradCAM"}
"""The gradient-weighted maps of the ``grad-cam`` package, by the name ``mdmt explain --map`` takes."""


def grad_cams(model: MultiTaskModel, task: Task, x: torch.Tensor, clinical: torch.Tensor | None = None,
              method: str = "gradcam", layer: str = "") -> np.ndarray:
    """Grad-CAM (or another of ``GRAD_CAM_METHODS``) of ``task``'s head for the network input ``x`` (and the
    clinical features ``clinical`` of a model that fuses them), weighing ``target_layer(backbone, layer)``:
    ``(B, H, W)`` float32 (``evidence_maps``: each map in [0, 1], all zeros where no region raises the head's
    scalar). A clinical term adds to the logits without touching the image features, so the map shows the image
    branch's evidence."""
    gradcam = require("pytorch_grad_cam", "Grad-CAM")
    if method not in GRAD_CAM_METHODS:
        raise ConfigError(f"Grad-CAM method must be one of {', '.join(GRAD_CAM_METHODS)}, got {method!r}")
    target = target_layer(model.backbone, layer)
    training = model.training
    explainer = getattr(gradcam, GRAD_CAM_METHODS[method])(model=HeadScalar(model, task, clinical),
                                                           target_layers=[target])
    recorded = explainer.activations_and_grads
    try:
        with torch.enable_grad():
            model.zero_grad()
            recorded(x).sum().backward()
        cams = explainer.get_cam_image(x, target, None, recorded.activations[0].numpy(),
                                       recorded.gradients[0].numpy(), eigen_smooth=False)
    finally:
        recorded.release()
        model.zero_grad()
        model.train(training)
    return evidence_maps(cams, tuple(x.shape[-2:]))


def occlusion_maps(model: MultiTaskModel, task: Task, x: torch.Tensor, clinical: torch.Tensor | None = None,
                   share: float = 0.125) -> np.ndarray:
    """How far ``task``'s scalar falls when a square patch of the input (``share`` of its side, placed every half
    patch) is replaced by its blurred copy, averaged over the patches covering each pixel: ``(B, H, W)`` float32,
    scaled as Grad-CAM's (``evidence_maps``). One forward pass per patch position and batch (225 at the default)."""
    head = HeadScalar(model, task, clinical)
    height, width = x.shape[-2:]
    patch = max(2, round(min(height, width) * share))
    stride = max(1, patch // 2)
    blurred = gaussian_blur(x, kernel_size=2 * (patch // 2) + 1, sigma=patch / 4)
    total, count = torch.zeros(x.shape[0], height, width), torch.zeros(height, width)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            base = head(x)[:, 0].float().cpu()
            for top in sorted({*range(0, height - patch + 1, stride), height - patch}):
                for left in sorted({*range(0, width - patch + 1, stride), width - patch}):
                    window = (..., slice(top, top + patch), slice(left, left + patch))
                    masked = x.clone()
                    masked[window] = blurred[window]
                    total[window] += (base - head(masked)[:, 0].float().cpu())[:, None, None]
                    count[window[1:]] += 1
    finally:
        model.train(training)
    return evidence_maps((total / count).numpy(), (height, width))


EXPLAIN_MAPS: dict[str, Callable[..., np.ndarray]] = {
    **{name: partial(grad_cams, method=name) for name in GRAD_CAM_METHODS}, "occlusion": occlusion_maps}
"""``infer.explain_map``: the map ``mdmt explain`` draws, ``fn(model, task, x, clinical)``; the Grad-CAM ones also
take ``layer`` (``infer.cam_layer``)."""
