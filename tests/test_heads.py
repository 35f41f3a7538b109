"""Task heads, the shared-backbone model and the backbone-state helpers (loading, averaging)."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch
from torch import nn

from mdmt.config import ModelConfig
from mdmt.errors import ConfigError
from mdmt.models.backbones import build_backbone
from mdmt.models.heads import build_head
from mdmt.models.multitask import (
    MultiTaskModel,
    average_backbones,
    backbone_state_dict,
    build_model,
    load_backbone_state,
)
from mdmt.tasks import TASK_NAMES, get_task, make_task

TINY = ModelConfig(backbone="tiny_cnn", weights="none")


# ----------------------------------------------------------------------------------------- heads
@pytest.mark.parametrize("task_name", TASK_NAMES)
@pytest.mark.parametrize("style", ["mlp", "linear"])
def test_head_output_width_is_the_tasks(task_name, style):
    task = get_task(task_name)
    head = build_head(task, style, in_features=40, dropout=0.5)
    assert head(torch.randn(3, 40)).shape == (3, task.n_outputs)


def test_mlp_head_is_the_papers():
    task = get_task("prognosis")
    torch.manual_seed(0)
    head = build_head(task, "mlp", in_features=512, dropout=0.3)
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
    head = build_head(task, "linear", in_features=8, dropout=0.5).eval()
    assert [type(m).__name__ for m in head] == ["ReLU", "Dropout", "Linear"]
    negative = -torch.rand(2, 8)
    assert torch.allclose(head(negative), head[2].bias.expand(2, 4))  # ReLU zeroes negative features


def test_bad_head_options():
    with pytest.raises(ConfigError, match="head style"):
        build_head(get_task("prognosis"), "transformer", 8, 0.5)
    with pytest.raises(ConfigError, match="dropout"):
        build_head(get_task("prognosis"), "mlp", 8, 1.0)


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


def test_build_model_chooses_head_styles_from_the_config():
    config = dataclasses.replace(TINY, prognosis_head="mlp", severity_head="linear", dropout=0.2)
    extra = make_task("outcome", "death", classes=["no", "yes"])
    model = build_model(config, [get_task("prognosis"), get_task("severity_ordinal"), extra])
    depth = {name: sum(isinstance(m, nn.Linear) for m in head.modules()) for name, head in model.heads.items()}
    assert depth == {"prognosis": 3, "severity_ordinal": 1, "outcome": 1}
    swapped = build_model(dataclasses.replace(config, prognosis_head="linear", severity_head="mlp"),
                          [get_task("prognosis"), get_task("severity_ordinal")])
    assert sum(isinstance(m, nn.Linear) for m in swapped.heads["severity_ordinal"].modules()) == 3
    assert all(m.p == 0.2 for m in model.modules() if isinstance(m, nn.Dropout))


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
    averaged = average_backbones(a, b, 0.3)
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
    ordered, reordered = average_backbones(a, b, 0.5), average_backbones(a, shuffled, 0.5)
    assert all(torch.equal(ordered[k], reordered[k]) for k in ordered)


def test_average_backbones_takes_whole_model_states_with_different_heads():
    prognosis = build_model(TINY, [get_task("prognosis")]).state_dict()
    severity = build_model(TINY, [get_task("severity_regions")]).state_dict()
    averaged = average_backbones(prognosis, severity, 0.5)
    assert set(averaged) == {k.removeprefix("backbone.") for k in prognosis if k.startswith("backbone.")}


def test_average_backbones_names_a_missing_key():
    a, b = _trained_state(0), _trained_state(1)
    b.pop("features.4.weight")
    with pytest.raises(ConfigError, match=r"features\.4\.weight"):
        average_backbones(a, b, 0.5)
    with pytest.raises(ConfigError, match="beta"):
        average_backbones(a, a, 1.5)


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
