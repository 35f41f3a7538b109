"""One shared backbone feeding named task heads, and the backbone-state helpers of the strategies.

The backbone runs once per forward pass and every head reads the same features (the official code ran it
once per head). State-dict keys are ``backbone.<...>`` and ``heads.<task>.<...>``. A spatial head (the mask decoder
of a segmentation task) reads the backbone's last feature map, the input of its global pooling, caught by a hook
that exists only in models with such a head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from mdmt.config import ModelConfig, PluginRef
from mdmt.errors import ConfigError
from mdmt.models.backbones import Backbone, Stats, build_backbone
from mdmt.models.heads import build_head
from mdmt.tasks import Task

BACKBONE_PREFIX = "backbone."
SEVERITY_ALIAS = "severity"
"""A ``model.heads`` key standing for ``model.severity_task``."""


class ClinicalTerm(nn.Module):
    """``clinical (B, D) → clinical @ weight.T + bias (B, n_outputs)``: the clinical part of a fused head's logits.

    ``trainable`` False keeps ``weight`` and ``bias`` as buffers (saved, never optimised); True makes them
    parameters. Either way the state-dict keys are ``weight`` and ``bias``.
    """

    def __init__(self, clinical_dim: int, n_outputs: int, trainable: bool = False):
        super().__init__()
        weight, bias = torch.zeros(n_outputs, clinical_dim), torch.zeros(n_outputs)
        if trainable:
            self.weight, self.bias = nn.Parameter(weight), nn.Parameter(bias)
        else:
            self.register_buffer("weight", weight)
            self.register_buffer("bias", bias)

    def forward(self, clinical: torch.Tensor) -> torch.Tensor:
        """The term's outputs for a batch of encoded clinical features."""
        return torch.nn.functional.linear(clinical, self.weight, self.bias)


class MultiTaskModel(nn.Module):
    """``forward(x) -> {task: raw outputs (B, n_outputs)}`` with one backbone pass.

    Late fusion at the logits: a head named in ``fused`` outputs ``head(features) + clinical_term(clinical)``,
    a linear term of ``clinical_dim`` encoded clinical features (``ClinicalTerm``, keys ``clinical.<task>.*``);
    ``forward`` then needs ``clinical`` ``(B, clinical_dim)``.
    """

    def __init__(self, backbone: Backbone, heads: Mapping[str, nn.Module],
                 clinical: Mapping[str, ClinicalTerm] | None = None):
        super().__init__()
        if not heads:
            raise ConfigError("a model needs at least one task head")
        terms = dict(clinical or {})
        unknown = [name for name in terms if name not in heads]
        if unknown:
            raise ConfigError(f"clinical term(s) for {unknown} have no head (heads: {list(heads)})")
        if len({term.weight.shape[1] for term in terms.values()}) > 1:
            raise ConfigError("the clinical terms of a model must read the same clinical features")
        self.backbone = backbone.module
        self.heads = nn.ModuleDict(dict(heads))
        self.feature_dim = backbone.feature_dim
        self.backbone_name = backbone.name
        self._normalization = (backbone.mean, backbone.std)  # plain attributes: the state dict keeps its keys
        self.fused = tuple(terms)
        self.clinical_dim = next(iter(terms.values())).weight.shape[1] if terms else 0
        if terms:
            self.clinical = nn.ModuleDict(terms)
        self.spatial = tuple(name for name, head in heads.items() if getattr(head, "spatial", False))
        self._feature_map: torch.Tensor | None = None
        if self.spatial:
            global_pool(self.backbone, backbone.name).register_forward_pre_hook(self._keep_feature_map)

    def _keep_feature_map(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        self._feature_map = inputs[0]

    @property
    def normalization(self) -> tuple[Stats, Stats]:
        """The per-channel ``(mean, std)`` the backbone expects its input normalised with."""
        return self._normalization

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features ``(B, feature_dim)`` (a model with a spatial head also keeps the feature map)."""
        return self.backbone(x)

    def set_clinical_term(self, task: str, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Set the clinical term of fused head ``task`` (e.g. to a logistic regression's coefficients)."""
        term = self.clinical[task]
        with torch.no_grad():
            term.weight.copy_(weight)
            term.bias.copy_(bias)

    def forward(self, x: torch.Tensor, clinical: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every head's outputs from one shared feature pass (fused heads add their clinical term)."""
        return self.head_outputs(self.features(x), clinical)

    def head_outputs(self, features: torch.Tensor, clinical: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every head's outputs from pooled backbone features ``(B, feature_dim)`` (fused heads add their clinical
        term; spatial heads read the feature map of the same pass)."""
        outputs = {name: head(self._feature_map if name in self.spatial else features)
                   for name, head in self.heads.items()}
        if not self.fused:
            return outputs
        if clinical is None or clinical.shape[-1] != self.clinical_dim:
            raise ConfigError(f"heads {list(self.fused)} fuse {self.clinical_dim} clinical features; got "
                              f"{None if clinical is None else tuple(clinical.shape)}")
        clinical = clinical.to(features.dtype)
        for name in self.fused:
            outputs[name] = outputs[name] + self.clinical[name](clinical).to(outputs[name].dtype)
        return outputs


def global_pool(backbone: nn.Module, name: str) -> nn.Module:
    """The backbone's last global pooling module (``nn.AdaptiveAvgPool2d`` or timm's ``SelectAdaptivePool2d``);
    ConfigError naming the backbone when it pools in its ``forward`` code (torchvision's DenseNet) instead."""
    pools = [m for m in backbone.modules()
             if isinstance(m, nn.AdaptiveAvgPool2d) or type(m).__name__ == "SelectAdaptivePool2d"]
    if not pools:
        raise ConfigError(f"backbone {name!r} has no global pooling module to take the feature map from, which a "
                          f"mask decoder head needs")
    return pools[-1]


def head_refs(model_cfg: ModelConfig) -> dict[str, PluginRef]:
    """``model.heads`` keyed by task name (``severity`` resolved to ``model.severity_task``)."""
    refs: dict[str, PluginRef] = {}
    for key, ref in model_cfg.heads.items():
        task = model_cfg.severity_task if key == SEVERITY_ALIAS else key
        if task in refs:
            raise ConfigError(f"model.heads names task {task!r} twice ({SEVERITY_ALIAS!r} stands for it)")
        refs[task] = PluginRef.of(ref)
    return refs


def build_model(
    model_cfg: ModelConfig, tasks: Sequence[Task], clinical_dim: int = 0, fused: Sequence[str] = (),
    clinical_trainable: bool = False,
) -> MultiTaskModel:
    """The backbone ``model.backbone`` with ``model.weights`` and one head per task: ``model.heads[task]``, else
    the head the task's kind needs (the mask decoder), else ``model.head``; the heads of ``fused`` add a clinical
    term of ``clinical_dim`` features (zero until set)."""
    backbone = build_backbone(model_cfg.backbone, model_cfg.weights)
    refs = head_refs(model_cfg)
    heads = {t.name: build_head(refs.get(t.name, t.head or model_cfg.head), t, backbone.feature_dim) for t in tasks}
    terms = {t.name: ClinicalTerm(clinical_dim, t.n_outputs, clinical_trainable) for t in tasks if t.name in fused}
    missing = [name for name in fused if name not in terms]
    if missing:
        raise ConfigError(f"fused task(s) {missing} are not among the model's tasks {[t.name for t in tasks]}")
    return MultiTaskModel(backbone, heads, terms)


def check_input_size(model: MultiTaskModel, size: int) -> None:
    """Raise a ConfigError when ``size``×``size`` inputs are too small for the model's backbone.

    One dry forward pass of a zero image in eval mode without gradients (the model's mode is restored).
    """
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else None
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            clinical = torch.zeros(1, model.clinical_dim, device=device) if model.fused else None
            model(torch.zeros(1, 3, size, size, device=device), clinical)
    except torch.cuda.OutOfMemoryError:
        raise  # a full device, not a small input
    except RuntimeError as exc:
        reason = (str(exc).strip() or type(exc).__name__).splitlines()[0]
        raise ConfigError(f"model.input_size {size} is too small for backbone {model.backbone_name}: "
                          f"{reason}") from exc
    finally:
        model.train(training)


# ----------------------------------------------------------------------------------------- backbone states
def backbone_part(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The backbone entries of a whole-model state dict, prefix removed (a backbone-only dict is returned as is)."""
    if any(k.startswith(BACKBONE_PREFIX) for k in state):
        return {k.removeprefix(BACKBONE_PREFIX): v for k, v in state.items() if k.startswith(BACKBONE_PREFIX)}
    return dict(state)


def backbone_state_dict(model: MultiTaskModel) -> dict[str, torch.Tensor]:
    """The backbone's state dict (keys without the ``backbone.`` prefix)."""
    return model.backbone.state_dict()


def load_backbone_state(model: MultiTaskModel, state: Mapping[str, torch.Tensor]) -> None:
    """Load a backbone state (whole-model or backbone-only keys) strictly; heads are left as they are."""
    try:
        model.backbone.load_state_dict(backbone_part(state), strict=True)
    except RuntimeError as exc:
        raise ConfigError(f"backbone state does not fit {model.backbone_name!r}: {exc}") from exc


def average_backbones(
    states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """``Σ weights[i]·states[i]`` for every floating-point backbone entry, paired by name.

    Whole-model dicts are reduced to their backbone part first, so the models' different heads do not matter;
    the backbone key sets must be identical. Float buffers (BatchNorm running mean and variance) are averaged
    like the weights — a deliberate change from the official code, which left them at the ImageNet values:
    averaged statistics sit between the networks' feature statistics, and training re-estimates them within
    the first epochs. Integer buffers (``num_batches_tracked``) are taken from the first state. With two states
    and weights (β, 1−β) this is the paper's β·θ_prognosis + (1−β)·θ_severity.
    """
    if len(states) != len(weights) or len(states) < 2:
        raise ConfigError(f"averaging needs two or more backbone states and one weight each, got {len(states)} "
                          f"states and {len(weights)} weights")
    if any(w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
        raise ConfigError(f"the averaging weights {list(weights)} must be non-negative and sum to 1")
    parts = [backbone_part(state) for state in states]
    for i, part in enumerate(parts[1:], start=2):
        only_first, only_other = sorted(set(parts[0]) - set(part)), sorted(set(part) - set(parts[0]))
        if only_first or only_other:
            raise ConfigError(f"backbone states differ: only in the first {only_first[:10]}, only in state {i} "
                              f"{only_other[:10]}")
    averaged: dict[str, torch.Tensor] = {}
    for name, value in parts[0].items():
        if not value.is_floating_point():
            averaged[name] = value.clone()
            continue
        total = weights[0] * value
        for weight, part in zip(weights[1:], parts[1:]):
            if part[name].shape != value.shape:
                raise ConfigError(f"backbone entry {name!r}: shapes {tuple(value.shape)} and "
                                  f"{tuple(part[name].shape)} differ")
            total = total + weight * part[name]
        averaged[name] = total
    return averaged
