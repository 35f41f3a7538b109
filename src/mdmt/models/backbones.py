"""Backbone registry: a config entry → a feature extractor ``(B, 3, H, W) → (B, F)``, its feature width ``F``
and the normalisation statistics its input expects.

``BACKBONES`` holds ``tiny_cnn`` (a small CNN for tests and the demo), the 18 backbones of the paper, and two
families: any torchvision classification model, and any timm model when timm is installed (``timm/<name>``
forces timm where torchvision has the same name). The ImageNet classifier is removed: the module ends with the
pooled features. A new backbone is one ``@BACKBONES.register(name, Params)`` factory
``(params, name=..., weights=...) -> Backbone`` in any imported module.

Params of the torchvision and timm models: ``kwargs`` (constructor arguments, e.g. timm's ``drop_rate``) and
``mean`` / ``std`` (3 floats each) overriding the model's own statistics: ImageNet's for torchvision and
``tiny_cnn``, the ``pretrained_cfg`` ones for timm (``(0.5, 0.5, 0.5)`` for the Inception and TF-ported
models, among them the paper's ``efficientnet_b1_pruned``).

Weights (``weights``): ``none`` (random init), ``imagenet`` (torchvision's DEFAULT weights / timm's
pretrained ones; an offline machine gets a ConfigError telling how to supply them), or the path of a local
``.pt`` / ``.pth`` / ``.safetensors`` state dict (``module.`` / ``backbone.`` prefixes stripped, classifier
keys ignored, every other key must match). ``mdmt.models.xrv`` adds the chest X-ray backbones of
torchxrayvision, whose ``model.weights`` may also name one of its weight sets (``WEIGHT_SET_PREFIXES``).
"""

from __future__ import annotations

import difflib
import importlib.util
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch
from torch import nn

from mdmt.config import PluginRef
from mdmt.data.augment import IMAGENET_MEAN, IMAGENET_STD
from mdmt.errors import ConfigError, load_refusal
from mdmt.registry import Registry

TORCHVISION_PAPER_BACKBONES: tuple[str, ...] = (
    "densenet121", "densenet161", "densenet169", "densenet201",
    "googlenet",
    "mobilenet_v2",
    "resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2",
    "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
)  # fmt: skip
TIMM_PAPER_BACKBONES: tuple[str, ...] = (
    "efficientnet_b0", "efficientnet_b1_pruned", "efficientnet_es", "efficientnet_es_pruned", "efficientnet_lite0",
)  # fmt: skip
PAPER_BACKBONES: tuple[str, ...] = TORCHVISION_PAPER_BACKBONES + TIMM_PAPER_BACKBONES
"""The 18 backbones the paper compares (13 from torchvision, 5 from timm)."""

TIMM_PREFIX = "timm/"
WEIGHT_SUFFIXES: tuple[str, ...] = (".pt", ".pth", ".safetensors")
STRIPPED_KEY_PREFIXES: tuple[str, ...] = ("module.", "backbone.")
CHECKPOINT_CONTAINER_KEYS: tuple[str, ...] = ("state_dict", "model")
MDMT_HEADS_PREFIX = "heads."  # task heads of an mdmt checkpoint (best.pt), never part of a backbone
WEIGHT_SET_PREFIXES: dict[str, str] = {}
"""Backbone name → the prefix of the named weight sets its ``model.weights`` may give besides none, imagenet and a
path (filled by the module registering such a backbone)."""

Stats = tuple[float, float, float]


@dataclass
class Backbone:
    """A feature extractor without classifier: ``module(x)`` gives ``(B, feature_dim)`` pooled features of an
    input normalised with ``(x - mean) / std`` per channel."""

    module: nn.Module
    feature_dim: int
    name: str
    mean: Stats = IMAGENET_MEAN
    std: Stats = IMAGENET_STD


@dataclass
class Normalisation:
    """Per-channel input statistics overriding the backbone's own (None: keep them)."""

    mean: Stats | None = None
    std: Stats | None = None

    def resolve(self, name: str, mean: Stats, std: Stats) -> tuple[Stats, Stats]:
        """These statistics where given, else ``mean`` / ``std`` (of backbone ``name``); a std must be positive."""
        resolved = (self.mean or mean, self.std or std)
        if min(resolved[1]) <= 0:
            raise ConfigError(f"backbone {name!r} params.std must be positive, got {resolved[1]}")
        return resolved


@dataclass
class TinyCNNParams(Normalisation):
    """``tiny_cnn``: channel multiplier ``width`` of the 16-32-64-64 channels."""

    width: float = 1.0


@dataclass
class ModelParams(Normalisation):
    """A torchvision or timm model: ``kwargs`` go to its constructor."""

    kwargs: dict[str, Any] = field(default_factory=dict)


class TinyCNN(nn.Module):
    """Four conv3x3-BN-ReLU-maxpool blocks (16-32-64-64 channels × ``width``) and global average pooling."""

    BASE_CHANNELS: tuple[int, ...] = (16, 32, 64, 64)

    def __init__(self, width: float = 1.0):
        super().__init__()
        if width <= 0:
            raise ConfigError(f"backbone 'tiny_cnn' params.width must be positive, got {width}")
        channels = [max(1, round(c * width)) for c in self.BASE_CHANNELS]
        blocks: list[nn.Module] = []
        previous = 3
        for out in channels:
            blocks += [nn.Conv2d(previous, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2)]
            previous = out
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = previous

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``(B, feature_dim)``."""
        return torch.flatten(self.pool(self.features(x)), 1)


# ----------------------------------------------------------------------------------------- weights files
def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local ``.pt`` / ``.pth`` / ``.safetensors`` file, unwrapped from ``{"state_dict"|"model": ...}``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise several types for a corrupt or foreign file
        raise ConfigError(f"{path}: not a readable torch state dict ({load_refusal(exc)})") from exc
    if isinstance(state, nn.Module):  # a pickled model whose classes the caller allow-listed (torch safe_globals)
        state = state.state_dict()
    while isinstance(state, Mapping) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        inner = next((state[k] for k in CHECKPOINT_CONTAINER_KEYS if k in state), None)
        if inner is None:
            raise ConfigError(f"{path}: holds no tensors (keys: {sorted(state)[:10]})")
        state = inner
    if not isinstance(state, Mapping):
        raise ConfigError(f"{path}: expected a state dict, found {type(state).__name__}")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _strip_prefixes(key: str) -> str:
    while key.startswith(STRIPPED_KEY_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def load_weights_file(module: nn.Module, path: str | Path, ignored_prefixes: tuple[str, ...]) -> None:
    """Load a local state dict into ``module``: prefixes stripped, classifier keys (``ignored_prefixes``) and
    mdmt task heads ignored, every other key strict."""
    ignored = (*ignored_prefixes, MDMT_HEADS_PREFIX)
    state = {_strip_prefixes(k): v for k, v in read_state_dict(path).items()}
    state = {k: v for k, v in state.items() if not k.startswith(ignored)}
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise ConfigError(f"{path}: does not fit the backbone: {exc}") from exc
    problems = []
    if result.missing_keys:
        problems.append(f"missing keys {result.missing_keys[:10]} ({len(result.missing_keys)} in all)")
    if result.unexpected_keys:
        problems.append(f"unexpected keys {result.unexpected_keys[:10]} ({len(result.unexpected_keys)} in all)")
    if problems:
        raise ConfigError(f"{path}: does not match the backbone: {'; '.join(problems)}")


def _is_weights_path(weights: str) -> bool:
    return weights.endswith(WEIGHT_SUFFIXES) or "/" in weights or "\\" in weights


# ----------------------------------------------------------------------------------------- classifier removal
def _remove_head(model: nn.Module) -> tuple[int, str]:
    """Replace the classifier (the last Linear or Conv2d layer) and the Dropout layers right before it in the same
    parent by Identity, so the module ends with the pooled features. Returns (feature width, classifier name)."""
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not names:
        raise ConfigError(f"{type(model).__name__}: no Linear or Conv2d classifier layer to remove")
    name = names[-1]
    head = model.get_submodule(name)
    width = head.in_features if isinstance(head, nn.Linear) else head.in_channels
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    siblings = list(parent.named_children())
    position = [n for n, _ in siblings].index(attr)
    setattr(parent, attr, nn.Identity())
    for sibling, module in reversed(siblings[:position]):
        if not isinstance(module, nn.Dropout):
            break
        setattr(parent, sibling, nn.Identity())
    return width, name


# ----------------------------------------------------------------------------------------- builders
BACKBONES: Registry[Backbone] = Registry("backbone")


def _torchvision_names() -> list[str]:
    import torchvision  # here, not at the top: importing it costs a second, and tiny_cnn runs never need it

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _download_failed(name: str, exc: Exception, cache_hint: str) -> ConfigError:
    return ConfigError(
        f"backbone {name!r}: the ImageNet weights could not be downloaded ({type(exc).__name__}: {exc}); this "
        f"machine has no network. Either pre-populate the cache ({cache_hint}) or pass a local state dict "
        f"(model.weights: /path/to/file.pth)"
    )


def _build_torchvision(params: ModelParams, name: str, weights: str) -> Backbone:
    """A torchvision classification model (``torchvision.models.get_model``) without its classifier."""
    import torchvision

    enum = torchvision.models.get_model_weights(name).DEFAULT if weights == "imagenet" else None
    options = dict(params.kwargs)
    if name in ("googlenet", "inception_v3"):  # train mode then returns a tensor, not a namedtuple
        options = {"aux_logits": False, **({} if enum else {"init_weights": True}), **options}
    try:
        model = torchvision.models.get_model(name, weights=enum, **options)
    except (URLError, OSError) as exc:
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        file = enum.url.rsplit("/", 1)[-1] if enum else "the weights file"
        raise _download_failed(name, exc, f"copy {file} into {hub}, i.e. $TORCH_HOME/hub/checkpoints") from exc
    except TypeError as exc:  # an unknown constructor argument
        raise ConfigError(f"backbone {name!r} params.kwargs: {exc}") from exc
    width, head = _remove_head(model)
    if weights not in ("none", "imagenet"):
        load_weights_file(model, weights, (head + ".", "aux1.", "aux2.", "AuxLogits."))
    return Backbone(model, width, name, *params.resolve(name, IMAGENET_MEAN, IMAGENET_STD))


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ConfigError("timm backbones need the timm package: install mdmt[timm] "
                          "(pip install 'mdmt[timm]')") from None
    return timm


def _model_stats(model: nn.Module, key: str, default: Stats) -> Stats:
    """A timm model's ``pretrained_cfg[key]`` when it has 3 values, else ``default``."""
    value = getattr(model, "pretrained_cfg", {}).get(key)
    if value is None or len(value) != 3:
        return default
    return (float(value[0]), float(value[1]), float(value[2]))


def _build_timm(params: ModelParams, name: str, weights: str) -> Backbone:
    """A timm model (``timm.create_model`` with ``num_classes=0``) and its own normalisation statistics."""
    timm = _timm()
    model_name = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(model_name):
        raise _unknown(name, timm.list_models())
    try:
        model = timm.create_model(model_name, pretrained=weights == "imagenet", num_classes=0, **params.kwargs)
    except (URLError, OSError) as exc:
        raise _download_failed(name, exc, "run once with network access, copy the Hugging Face cache "
                                          "$HF_HOME/hub (default ~/.cache/huggingface/hub) here and set "
                                          "HF_HUB_OFFLINE=1, which also skips the retries") from exc
    except TypeError as exc:  # an unknown constructor argument
        raise ConfigError(f"backbone {name!r} params.kwargs: {exc}") from exc
    if weights not in ("none", "imagenet"):
        classifier = model.pretrained_cfg.get("classifier", "classifier")
        classifiers = classifier if isinstance(classifier, (list, tuple)) else (classifier,)
        load_weights_file(model, weights, tuple(f"{c}." for c in classifiers))
    stats = _model_stats(model, "mean", IMAGENET_MEAN), _model_stats(model, "std", IMAGENET_STD)
    # with num_classes=0 a model with a pre-logits head (MobileNetV3) outputs head_hidden_size features
    features = getattr(model, "head_hidden_size", None) or model.num_features
    return Backbone(model, int(features), name, *params.resolve(name, *stats))


@BACKBONES.register("tiny_cnn", TinyCNNParams, "four conv blocks (16-32-64-64 channels × width), tests and demo")
def _build_tiny_cnn(params: TinyCNNParams, name: str, weights: str) -> Backbone:
    """``TinyCNN(width)``; ImageNet weights do not exist for it."""
    if weights == "imagenet":
        raise ConfigError("backbone 'tiny_cnn' has no ImageNet weights; use weights: none or a local file")
    model = TinyCNN(params.width)
    if weights != "none":
        load_weights_file(model, weights, ())
    return Backbone(model, model.feature_dim, name, *params.resolve(name, IMAGENET_MEAN, IMAGENET_STD))


for _name in TORCHVISION_PAPER_BACKBONES:
    BACKBONES.add(_name, _build_torchvision, ModelParams, "paper backbone (torchvision)")
for _name in TIMM_PAPER_BACKBONES:
    BACKBONES.add(_name, _build_timm, ModelParams, "paper backbone (timm)")
BACKBONES.add_family(lambda name: name in _torchvision_names(), _build_torchvision, ModelParams,
                     "any torchvision classification model (torchvision.models.list_models())")


def _is_timm_name(name: str) -> bool:
    return name.startswith(TIMM_PREFIX) or _timm().is_model(name)


if importlib.util.find_spec("timm") is not None:
    BACKBONES.add_family(_is_timm_name, _build_timm, ModelParams,
                         "any timm model (timm.list_models(); timm/<name> where torchvision has the name)")


def _unknown(name: str, candidates: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name.removeprefix(TIMM_PREFIX), candidates, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; `mdmt info` lists them"
    return ConfigError(f"unknown backbone {name!r}{hint}")


def _timm_names() -> list[str]:
    try:
        return list(_timm().list_models())
    except ConfigError:
        return []


def list_backbones(include_timm: bool = False) -> list[str]:
    """Buildable names: the registered ones (the paper's 18, ``tiny_cnn``), torchvision's classification models
    (and timm's if asked)."""
    names = BACKBONES.names()
    names += [n for n in _torchvision_names() if n not in names]
    if include_timm:
        names += [n for n in _timm_names() if n not in names]
    return names


def build_backbone(ref: PluginRef | str, weights: str = "none") -> Backbone:
    """The feature extractor a config entry names (``{name, params}`` or a name) with ``weights``
    (none | imagenet | path | one of the backbone's weight sets)."""
    ref = PluginRef.of(ref)
    prefix = WEIGHT_SET_PREFIXES.get(ref.name)
    named = prefix is not None and weights.startswith(prefix)
    if weights not in ("none", "imagenet") and not named and not _is_weights_path(weights):
        sets = f", a {prefix}* weight set" if prefix else ""
        raise ConfigError(f"model.weights must be none, imagenet{sets} or a path to a {'/'.join(WEIGHT_SUFFIXES)} "
                          f"file; got {weights!r}")
    return BACKBONES.build(ref, name=ref.name, weights=weights)
