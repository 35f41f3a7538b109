"""Config value rules: out-of-range values name the key, the value and what is allowed; the input-size check."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest
import torch
from torch import nn

from mdmt.config import Config, load_config, parse_override
from mdmt.errors import ConfigError
from mdmt.models.backbones import build_backbone
from mdmt.models.multitask import MultiTaskModel, check_input_size
from mdmt.validation import EACH, RULES, Interval, validate, values_at


def load(*overrides: str) -> Config:
    return load_config(None, [parse_override(o) for o in overrides])


def _holds_float(tp: typing.Any) -> bool:
    return tp is float or any(_holds_float(arg) for arg in typing.get_args(tp))


def _float_keys(cls: type, prefix: str = "") -> list[str]:
    """Dotted keys of every config field whose type holds floats (a float, a pair, a mapping to floats)."""
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += _float_keys(tp, f"{prefix}{name}.")
        elif _holds_float(tp):
            keys.append(f"{prefix}{name}")
    return keys


def test_every_rule_names_a_config_key_and_the_defaults_pass():
    config = Config()
    for rule in RULES:
        list(values_at(config, rule.key))  # an AttributeError would name a key the config lacks
    validate(config)


def test_every_float_key_has_a_rule_so_nan_is_never_accepted():
    ruled = {rule.key.removesuffix(EACH) for rule in RULES}
    keys = _float_keys(Config)
    assert "train.lr" in keys and "loss.task_weights" in keys and "synth.opacity" in keys
    assert set(keys) <= ruled


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("data.image_size=-3", "data.image_size = -3", ">= 1"),
        ("data.image_size=0", "data.image_size = 0", ">= 1"),
        ("model.input_size=0", "model.input_size = 0", ">= 1"),
        ("train.batch_size=-1", "train.batch_size = -1", ">= 1"),
        ("train.lr=-0.1", "train.lr = -0.1", "> 0"),
        ("train.lr=0", "train.lr = 0.0", "> 0"),
        ("train.lr=.nan", "train.lr = nan", "> 0"),
        ("train.lr=.inf", "train.lr = inf", "> 0"),
        ("train.weight_decay=-1e-5", "train.weight_decay = -1e-05", ">= 0"),
        ("data.clip_percentiles=[98, 2]", "data.clip_percentiles = (98.0, 2.0)", "low < high, each in [0, 100]"),
        ("data.clip_percentiles=[2, 101]", "data.clip_percentiles = (2.0, 101.0)", "in [0, 100]"),
        ("data.crop_margin=0.5", "data.crop_margin = 0.5", "in [0, 0.5)"),
        ("data.crop_margin=-0.1", "data.crop_margin = -0.1", "in [0, 0.5)"),
        ("train.max_epochs=0", "train.max_epochs = 0", ">= 1"),
        ("train.warmup_epochs=-1", "train.warmup_epochs = -1", ">= 0"),
        ("train.early_stopping=-1", "train.early_stopping = -1", ">= 0"),
        ("train.scheduler_patience=-2", "train.scheduler_patience = -2", ">= 0"),
        ("protocol.cv_folds=2", "protocol.cv_folds = 2", ">= 3"),
        ("protocol.loco_val_fraction=1", "protocol.loco_val_fraction = 1.0", "in (0, 1)"),
        ("protocol.loco_val_fraction=0", "protocol.loco_val_fraction = 0.0", "in (0, 1)"),
        ("protocol.paired_cv_fold=5", "protocol.paired_cv_fold = 5", "< protocol.cv_folds"),
        ("data.max_drop_fraction=1.5", "data.max_drop_fraction = 1.5", "in [0, 1]"),
        ("grid.seeds=[0, -1]", "grid.seeds[1] = -1", ">= 0"),
        ("grid.folds=[-2]", "grid.folds[0] = -2", ">= 0"),
        ("grid.workers=0", "grid.workers = 0", ">= 1"),
        ("train.device=gpu", "train.device = 'gpu'", "auto, cpu, cuda, cuda:N or mps"),
        ("train.device=cuda:x", "train.device = 'cuda:x'", "cuda:N"),
        ("synth.opacity=.nan", "synth.opacity = nan", ">= 0"),
        ("synth.opacity=-0.2", "synth.opacity = -0.2", ">= 0"),
        ("augment.p=1.5", "augment.p = 1.5", "in [0, 1]"),
        ("augment.p=.nan", "augment.p = nan", "in [0, 1]"),
        ("loss.task_weights={prognosis: -1}", "loss.task_weights.prognosis = -1.0", ">= 0"),
    ],
)
def test_out_of_range_values_name_the_key_the_value_and_the_range(override, key, allowed):
    with pytest.raises(ConfigError) as caught:
        load(override)
    message = str(caught.value)
    assert key in message and allowed in message
    assert "\n" not in message


@pytest.mark.parametrize(
    "override",
    ["train.device=auto", "train.device=cpu", "train.device=cuda", "train.device=cuda:1", "train.device=mps",
     "train.max_epochs=1", "data.clip_percentiles=[0, 100]", "data.crop_margin=0", "augment.p=0", "augment.p=1",
     "protocol.cv_folds=3", "synth.opacity=null", "synth.opacity=0", "grid.folds=null", "train.lr=1e-3"],
)
def test_values_at_the_edge_of_the_range_are_accepted(override):
    load(override)


def test_every_bad_value_is_reported_at_once():
    with pytest.raises(ConfigError) as caught:
        load("train.lr=-1", "train.batch_size=0", "train.device=tpu")
    parts = str(caught.value).split("; ")
    assert sorted(p.split(" = ")[0] for p in parts) == ["train.batch_size", "train.device", "train.lr"]


def test_interval_text_and_membership():
    assert str(Interval(0, 0.5, high_open=True)) == "in [0, 0.5)"
    assert str(Interval(0, low_open=True)) == "> 0"
    assert 0.25 in Interval(0, 0.5)
    assert not any(value in Interval() for value in (math.nan, math.inf, -math.inf))


def test_a_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: 0.1\n  batch_size: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml:4:1: YAML syntax error: "):
        load_config(path)


def test_an_override_that_is_not_yaml_names_the_override():
    with pytest.raises(ConfigError, match=r"--set train\.lr=\[1,: the value is not valid YAML"):
        parse_override("train.lr=[1,")


def test_non_string_yaml_keys_are_named_not_a_crash(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text("1: 2\ntrainn: {}\n")
    with pytest.raises(ConfigError, match="unknown key.*1, trainn"):
        load_config(path)


# --------------------------------------------------------------------------------------------- input size
def model_of(backbone: str) -> MultiTaskModel:
    built = build_backbone(backbone)
    return MultiTaskModel(built, {"prognosis": nn.Linear(built.feature_dim, 1)})


def test_an_input_too_small_for_the_backbone_is_a_config_error():
    model = model_of("tiny_cnn")
    with pytest.raises(ConfigError, match=r"model\.input_size 8 is too small for backbone tiny_cnn: .*too small"):
        check_input_size(model, 8)
    assert model.training  # the mode is restored
    check_input_size(model, 32)


@pytest.mark.parametrize("backbone, fails, fits", [("googlenet", 8, 16), ("resnet18", None, 8)])
def test_input_size_limits_of_paper_backbones(backbone, fails, fits):
    model = model_of(backbone).eval()
    if fails is not None:
        with pytest.raises(ConfigError, match=f"input_size {fails} is too small for backbone {backbone}"):
            check_input_size(model, fails)
    check_input_size(model, fits)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())
    assert torch.is_grad_enabled()
