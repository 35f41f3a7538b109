"""Task heads, the shared-backbone model and the backbone-state helpers (loading, averaging)."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
from torch import nn

from mdmt.config import ModelConfig, PluginRef
from mdmt.data.augment import IMAGENET_MEAN, IMAGENET_STD
from mdmt.errors import ConfigError
from mdmt.models.backbones import build_backbone
from mdmt.models.heads import HEADS, build_head
from mdmt.models.multitask import (
    MultiTaskModel,
    average_backbones,
    backbone_state_dict,
    build_model,
    load_backbone_state,
)
from mdmt.tasks import TASK_NAMES, get_task, make_task

TINY = ModelConfig(backbone=PluginRef("tiny_cnn"), weights="none")


# ----------------------------------------------------------------------------------------- heads
@pytest.mark.parametrize("task_name", TASK_NAMES)
@pytest.mark.parametrize("style", ["mlp", "linear"])
def test_head_output_width_is_the_tasks(task_name, style):
    task = get_task(task_name)
    head = build_head(style, task, in_features=40)
    assert head(torch.randn(3, 40)).shape == (3, task.n_outputs)


def test_mlp_head_is_the_papers():
    task = get_task("prognosis")
    torch.manual_seed(0)
    head = build_head({"name": "mlp", "params": {"dropout": 0.3}}, task, in_features=512)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 128), (128, 32), (32, 2)]
    assert [type(m).__name__ for m in head] == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert all(m.p == 0.3 for m in head if isinstance(m, nn.Dropout))
    for m in linears:
        assert torch.all(m.bias == 0.01)
        bound = math.sqrt(6.0 / (m.in_features + m.out_features))  # Xavier-uniform
        assert m.weight.abs().max() <= bound and m.weight.abs().max() > 0.8 * bound


def test_linear_head_applies_relu_first():
    task = get_task("severity_global4")
    head = build_head("linear", task, in_features=8).eval()
    assert [type(m).__name__ for m in head] == ["ReLU", "Dropout", "Linear"]
    negative = -torch.rand(2, 8)
    assert torch.allclose(head(negative), head[2].bias.expand(2, 4))  # ReLU zeroes negative features


def test_default_heads_keep_their_state_dict_keys():
    task = get_task("prognosis")
    assert list(build_head("mlp", task, 8).state_dict()) == [f"{i}.{p}" for i in (0, 3, 6) for p in ("weight", "bias")]
    assert list(build_head("linear", task, 8).state_dict()) == ["2.weight", "2.bias"]


def test_mlp_hidden_widths():
    head = build_head(PluginRef("mlp", {"hidden": [16]}), get_task("severity_global4"), in_features=8)
    assert [(m.in_features, m.out_features) for m in head if isinstance(m, nn.Linear)] == [(8, 16), (16, 4)]
    direct = build_head(PluginRef("mlp", {"hidden": []}), get_task("prognosis"), in_features=8)
    assert [type(m).__name__ for m in direct] == ["Linear"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("transformer", "unknown head 'transformer'"),
        ({"name": "mlp", "params": {"dropout": 1.0}}, r"'prognosis'.*dropout must be in \[0, 1\)"),
        ({"name": "mlp", "params": {"hidden": [32, 0]}}, "hidden must be positive"),
        ({"name": "mlp", "params": {"hiden": [32]}}, r"unknown key\(s\) hiden"),
        ({"name": "linear", "params": {"dropout": "half"}}, r"params\.dropout: expected float"),
        ({"name": "linear", "params": {"hidden": [32]}}, r"unknown key\(s\) hidden"),
    ],
)
def test_bad_head_params_name_the_key(entry, message):
    with pytest.raises(ConfigError, match=message):
        build_head(entry, get_task("prognosis"), 8)


def test_describe_lists_the_heads():
    assert {name: params for name, _, params in HEADS.describe()} == {
        "mlp": "dropout=0.5, hidden=[128, 32]", "linear": "dropout=0.5", "mask_decoder": "width=32"}


# ----------------------------------------------------------------------------------------- model
def test_one_backbone_pass_feeds_every_head():
    tasks = [get_task("prognosis"), get_task("severity_global4"), get_task("severity_regions")]
    model = build_model(TINY, tasks).train()
    calls = []
    model.backbone.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    outputs = model(torch.randn(4, 3, 32, 32))
    assert len(calls) == 1
    assert {k: tuple(v.shape) for k, v in outputs.items()} == {t.name: (4, t.n_outputs) for t in tasks}
    assert model.features(torch.randn(2, 3, 32, 32)).shape == (2, model.feature_dim)


def test_build_model_chooses_heads_from_the_config():
    default = build_model(TINY, [get_task("prognosis"), get_task("severity_global4")])  # mlp for prognosis only
    assert {name: sum(isinstance(m, nn.Linear) for m in head.modules()) for name, head in default.heads.items()} == {
        "prognosis": 3, "severity_global4": 1}
    config = dataclasses.replace(
        TINY, head=PluginRef("linear", {"dropout": 0.2}),
        heads={"prognosis": PluginRef("mlp", {"dropout": 0.2}), "severity": PluginRef("mlp", {"hidden": [8]})},
        severity_task="severity_ordinal")
    extra = make_task("outcome", "death", classes=["no", "yes"])
    model = build_model(config, [get_task("prognosis"), get_task("severity_ordinal"), get_task("severity_global4"),
                                 extra])
    depth = {name: sum(isinstance(m, nn.Linear) for m in head.modules()) for name, head in model.heads.items()}
    assert depth == {"prognosis": 3, "severity_ordinal": 2, "severity_global4": 1, "outcome": 1}
    assert all(m.p == 0.2 for name in ("prognosis", "severity_global4", "outcome")
               for m in model.heads[name].modules() if isinstance(m, nn.Dropout))
    twice = dataclasses.replace(config, heads={"severity": PluginRef("mlp"), "severity_ordinal": PluginRef("linear")})
    with pytest.raises(ConfigError, match="'severity_ordinal' twice"):
        build_model(twice, [get_task("severity_ordinal")])


def test_model_normalization_follows_the_backbone_and_stays_out_of_the_state_dict():
    model = build_model(TINY, [get_task("prognosis")])
    assert model.normalization == (IMAGENET_MEAN, IMAGENET_STD)
    gray = dataclasses.replace(TINY, backbone=PluginRef("tiny_cnn", {"mean": [0.5] * 3, "std": [0.5] * 3}))
    other = build_model(gray, [get_task("prognosis")])
    assert other.normalization == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert list(other.state_dict()) == list(model.state_dict())
    assert all(k.startswith(("backbone.", "heads.prognosis.")) for k in model.state_dict())


# ----------------------------------------------------------------------------------------- backbone states
def _trained_state(seed: int) -> dict[str, torch.Tensor]:
    """A tiny_cnn state with distinct parameters and BN statistics (a few train-mode passes)."""
    torch.manual_seed(seed)
    module = build_backbone("tiny_cnn").module.train()
    for _ in range(seed + 1):
        module(torch.randn(4, 3, 16, 16) * (seed + 1))
    return module.state_dict()


def test_average_backbones_is_beta_weighted_for_floats_and_keeps_counters_of_a():
    a, b = _trained_state(0), _trained_state(1)
    averaged = average_backbones([a, b], [0.3, 0.7])
    assert averaged.keys() == a.keys()
    for name, value in averaged.items():
        if a[name].is_floating_point():
            assert torch.allclose(value, 0.3 * a[name] + 0.7 * b[name]), name
        else:
            assert torch.equal(value, a[name]), name
    assert not torch.equal(a["features.1.num_batches_tracked"], b["features.1.num_batches_tracked"])
    assert not torch.allclose(averaged["features.1.running_var"], a["features.1.running_var"])  # buffers averaged too


def test_average_backbones_pairs_by_name_not_order():
    a, b = _trained_state(0), _trained_state(1)
    keys = list(b)
    random.Random(0).shuffle(keys)
    shuffled = {k: b[k] for k in keys}
    assert list(shuffled) != list(b)
    ordered, reordered = average_backbones([a, b], [0.5, 0.5]), average_backbones([a, shuffled], [0.5, 0.5])
    assert all(torch.equal(ordered[k], reordered[k]) for k in ordered)


def test_average_backbones_takes_whole_model_states_with_different_heads():
    prognosis = build_model(TINY, [get_task("prognosis")]).state_dict()
    severity = build_model(TINY, [get_task("severity_regions")]).state_dict()
    averaged = average_backbones([prognosis, severity], [0.5, 0.5])
    assert set(averaged) == {k.removeprefix("backbone.") for k in prognosis if k.startswith("backbone.")}


def test_average_backbones_names_a_missing_key():
    a, b = _trained_state(0), _trained_state(1)
    b.pop("features.4.weight")
    with pytest.raises(ConfigError, match=r"features\.4\.weight"):
        average_backbones([a, b], [0.5, 0.5])
    with pytest.raises(ConfigError, match="sum to 1"):
        average_backbones([a, a], [1.5, -0.5])


def test_average_backbones_weights_any_number_of_states():
    a, b, c = _trained_state(0), _trained_state(1), _trained_state(2)
    averaged = average_backbones([a, b, c], [0.2, 0.3, 0.5])
    for name, value in averaged.items():
        if a[name].is_floating_point():
            assert torch.allclose(value, 0.2 * a[name] + 0.3 * b[name] + 0.5 * c[name]), name
    two = average_backbones([a, b], [0.5, 0.5])
    assert all(torch.equal(two[k], 0.5 * a[k] + 0.5 * b[k]) for k in two if a[k].is_floating_point())


def test_load_backbone_state_leaves_heads_and_checks_keys():
    model = build_model(TINY, [get_task("prognosis")])
    heads_before = {k: v.clone() for k, v in model.heads.state_dict().items()}
    state = _trained_state(2)
    load_backbone_state(model, state)
    assert all(torch.equal(backbone_state_dict(model)[k], v) for k, v in state.items())
    assert all(torch.equal(model.heads.state_dict()[k], v) for k, v in heads_before.items())
    other = build_model(TINY, [get_task("severity_regions")])
    load_backbone_state(other, model.state_dict())  # a whole-model state: its backbone part
    assert all(torch.equal(backbone_state_dict(other)[k], v) for k, v in state.items())
    state.pop("features.0.weight")
    with pytest.raises(ConfigError, match=r"features\.0\.weight"):
        load_backbone_state(model, state)


def test_model_needs_heads():
    with pytest.raises(ConfigError, match="head"):
        MultiTaskModel(build_backbone("tiny_cnn"), {})
