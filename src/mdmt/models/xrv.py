"""Backbones pretrained on chest X-rays by torchxrayvision (Cohen et al., MIDL 2022; the ``xrv`` extra):
``xrv_densenet121`` and ``xrv_resnet50``, the two the paper's official code also trains.

Each is torchvision's model with torchxrayvision's one-channel first convolution, the same state-dict keys as
torchxrayvision's weight files, and its pathology classifier dropped: mdmt's heads read the pooled features.
mdmt feeds three identical gray channels; the backbone reads the first. Its normalisation is torchxrayvision's
``xrv.datasets.normalize``, [0, 1] → [-1024, 1024], written as mdmt's ``(x - mean) / std`` with mean 0.5 and
std 1/2048, and its input side is the one its weights were trained at (224 for DenseNet-121, 512 for
ResNet-50): a forward pass at another side is a ConfigError, so a run with another ``model.input_size`` is
refused before it trains.

``model.weights``: ``none`` (random init), a torchxrayvision weight set of the architecture (e.g.
``densenet121-res224-all``, ``resnet50-res512-all``), loaded by torchxrayvision from its cache folder
(``~/.torchxrayvision/models_data/``), which it downloads into unless ``HF_HUB_OFFLINE`` is set, or the path of
a weight file: a state dict, or torchxrayvision's pickled DenseNet, read weights-only with its classes
allow-listed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mdmt.errors import ConfigError
from mdmt.models.backbones import (
    BACKBONES,
    WEIGHT_SET_PREFIXES,
    Backbone,
    Stats,
    load_weights_file,
)
from mdmt.registry import NoParams

XRV_MEAN: Stats = (0.5, 0.5, 0.5)
XRV_STD: Stats = (1 / 2048, 1 / 2048, 1 / 2048)
"""``(x - 0.5) * 2048 = 2048 x - 1024``: torchxrayvision's [0, 1] → [-1024, 1024]."""
IGNORED_STATE = ("op_threshs",)
"""State entries of a torchxrayvision model that are not features (its operating points)."""


@dataclass(frozen=True)
class XrvModel:
    """A torchxrayvision model as the torchvision model it patches."""

    torchvision_name: str
    stem: str
    """The first convolution, replaced by a one-channel one."""
    classifier: str
    """The pathology classifier, dropped."""
    xrv_class: str
    """The torchxrayvision class that loads a named weight set."""
    xrv_body: str
    """Its submodule holding the torchvision keys ("" for itself)."""
    input_size: int
    weight_sets: str
    """The prefix of its weight sets' names."""


XRV_MODELS: dict[str, XrvModel] = {
    "xrv_densenet121": XrvModel("densenet121", "features.conv0", "classifier", "DenseNet", "", 224,
                                "densenet121-res224-"),
    "xrv_resnet50": XrvModel("resnet50", "conv1", "fc", "ResNet", "model", 512, "resnet50-res512-"),
}


@dataclass(frozen=True)
class GrayInput:
    """Forward pre-hook: refuses a side other than ``size`` and passes on the first of the three gray channels."""

    name: str
    size: int

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        if tuple(x.shape[-2:]) != (self.size, self.size):
            raise ConfigError(f"backbone {self.name!r} reads {self.size}×{self.size} inputs, the size its "
                              f"torchxrayvision weights were trained at; got {tuple(x.shape[-2:])}: set "
                              f"model.input_size: {self.size}")
        return (x[:, :1], *args[1:])


def _xrv() -> Any:
    try:
        import torchxrayvision
    except ImportError:
        raise ConfigError("torchxrayvision weights need the torchxrayvision package: install mdmt[xrv] "
                          "(pip install 'mdmt[xrv]')") from None
    return torchxrayvision


def _downloads_off() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def _replace(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def weight_set_state(spec: XrvModel, name: str, weights: str) -> dict[str, torch.Tensor]:
    """The state dict of torchxrayvision weight set ``weights``, loaded by torchxrayvision (cache, else download
    unless ``HF_HUB_OFFLINE``); a ConfigError in one line names the file to place in its cache otherwise."""
    xrv = _xrv()
    known = sorted(k for k in xrv.models.model_urls if k.startswith(spec.weight_sets))
    if weights not in known:
        raise ConfigError(f"backbone {name!r}: unknown torchxrayvision weight set {weights!r}; known: "
                          f"{', '.join(known)}")
    url = xrv.models.model_urls[weights]["weights_url"]
    file = Path(xrv.utils.get_cache_dir()).expanduser() / url.rsplit("/", 1)[-1]
    place = f"copy {url} to {file} or pass the file's path as model.weights"
    cached = file.is_file()
    if not cached and _downloads_off():
        raise ConfigError(f"backbone {name!r}: torchxrayvision weight set {weights!r} is not in its cache and "
                          f"downloads are off (HF_HUB_OFFLINE=1): {place}, or set HF_HUB_OFFLINE=0 to let "
                          f"torchxrayvision download it")
    try:
        net = getattr(xrv.models, spec.xrv_class)(weights=weights)
    except Exception as exc:  # requests' errors offline, torch's for a damaged file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"backbone {name!r}: torchxrayvision could not {'load' if cached else 'download'} "
                          f"weight set {weights!r} ({type(exc).__name__}: {reason}); {place}") from exc
    return net.get_submodule(spec.xrv_body).state_dict()


def _pickled_model_classes(xrv: Any) -> list[type]:
    """The classes of torchxrayvision's pickled DenseNet weight files, for a weights-only load."""
    models = xrv.models
    return [models.DenseNet, models._DenseBlock, models._DenseLayer, models._Transition, nn.Sequential, nn.Conv2d,
            nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Linear, set]


def _build_xrv(params: NoParams, name: str, weights: str) -> Backbone:
    """torchvision's model with torchxrayvision's one-channel stem, without classifier, with ``weights``."""
    import torchvision  # here, not at the top: importing it costs a second that tiny_cnn runs never pay

    spec = XRV_MODELS[name]
    if weights == "imagenet":
        raise ConfigError(f"backbone {name!r} has no ImageNet weights: name a torchxrayvision weight set "
                          f"({spec.weight_sets}...), a local file or none")
    model = torchvision.models.get_model(spec.torchvision_name, weights=None)
    stem = model.get_submodule(spec.stem)
    _replace(model, spec.stem, nn.Conv2d(1, stem.out_channels, stem.kernel_size, stem.stride, stem.padding,
                                         bias=False))
    width = model.get_submodule(spec.classifier).in_features
    _replace(model, spec.classifier, nn.Identity())
    ignored = (f"{spec.classifier}.", *IGNORED_STATE)
    if weights.startswith(spec.weight_sets):
        state = weight_set_state(spec, name, weights)
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith(ignored)})
    elif weights != "none":
        with torch.serialization.safe_globals(_pickled_model_classes(_xrv())):
            load_weights_file(model, weights, ignored)
    model.register_forward_pre_hook(GrayInput(name, spec.input_size))
    return Backbone(model, width, name, XRV_MEAN, XRV_STD)


for _name, _spec in XRV_MODELS.items():
    BACKBONES.add(_name, _build_xrv, NoParams, f"{_spec.torchvision_name} pretrained on chest X-rays "
                                               f"(torchxrayvision, {_spec.input_size} px, mdmt[xrv])")
    WEIGHT_SET_PREFIXES[_name] = _spec.weight_sets
