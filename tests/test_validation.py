"""Config value checks, declared on each field: out-of-range values name the key, the value and what is allowed;
renamed keys; the device check; the input-size check."""

from __future__ import annotations

import math
import typing

import pytest
import torch
from torch import nn

from mdmt.config import RENAMED, Config, config_fields, load_config, parse_override
from mdmt.errors import ConfigError
from mdmt.models.backbones import build_backbone
from mdmt.models.multitask import MultiTaskModel, check_input_size
from mdmt.validation import Interval, check_device, checked_values, validate


def load(*overrides: str) -> Config:
    return load_config(None, [parse_override(o) for o in overrides])


def _holds_float(tp: typing.Any) -> bool:
    return tp is float or any(_holds_float(arg) for arg in typing.get_args(tp))


FLOAT_FIELDS = [(key, f, tp) for key, f, tp in config_fields() if _holds_float(tp)]
"""Every config field whose type holds floats (a float, a pair, a mapping to floats)."""


def _nan_value(tp: typing.Any) -> typing.Any:
    """A value of type ``tp`` that holds a NaN: the float itself, the first of a pair, a mapping's value."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        return [math.nan, 1.0]
    if origin is dict:
        return {"x": math.nan}
    return math.nan


def _nested(key: str, value: typing.Any) -> dict:
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


def test_the_defaults_pass_and_the_checks_cover_every_section():
    config = Config()
    validate(config)
    checked = {key.split(".")[0] for key, _, _ in checked_values(config)}
    assert {"data", "augment", "train", "protocol", "grid", "synth", "calibration", "infer", "runtime",
            "seed"} <= checked


def test_every_float_field_declares_a_check():
    keys = [key for key, _, _ in FLOAT_FIELDS]
    assert "train.lr" in keys and "loss.task_weights" in keys and "synth.opacity" in keys
    assert [key for key, f, _ in FLOAT_FIELDS if "check" not in f.metadata] == []


@pytest.mark.parametrize("key, tp", [(key, tp) for key, _, tp in FLOAT_FIELDS], ids=[k for k, _, _ in FLOAT_FIELDS])
def test_nan_in_any_float_field_is_refused_naming_the_field(key, tp):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [_nested(key, _nan_value(tp))])
    message = str(caught.value)
    assert message.startswith(key) and "nan" in message and "is not allowed" in message


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
        ("runtime.device=gpu", "runtime.device = 'gpu'", "auto, cpu, cuda, cuda:N or mps"),
        ("runtime.device=cuda:x", "runtime.device = 'cuda:x'", "cuda:N"),
        ("runtime.workers=-1", "runtime.workers = -1", ">= 0"),
        ("runtime.threads=-2", "runtime.threads = -2", ">= 0"),
        ("infer.batch_size=0", "infer.batch_size = 0", ">= 1"),
        ("calibration.alpha=1", "calibration.alpha = 1.0", "in (0, 1)"),
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
    ["runtime.device=auto", "runtime.device=cpu", "runtime.device=cuda", "runtime.device=cuda:1", "runtime.device=mps",
     "train.max_epochs=1", "data.clip_percentiles=[0, 100]", "data.crop_margin=0", "augment.p=0", "augment.p=1",
     "protocol.cv_folds=3", "synth.opacity=null", "synth.opacity=0", "grid.folds=null", "train.lr=1e-3"],
)
def test_values_at_the_edge_of_the_range_are_accepted(override):
    load(override)


def test_every_bad_value_is_reported_at_once():
    with pytest.raises(ConfigError) as caught:
        load("train.lr=-1", "train.batch_size=0", "runtime.device=tpu")
    parts = str(caught.value).split("; ")
    assert sorted(p.split(" = ")[0] for p in parts) == ["runtime.device", "train.batch_size", "train.lr"]


@pytest.mark.parametrize("old, new", sorted(RENAMED.items()))
def test_a_moved_key_names_its_new_key_in_a_file_and_in_a_set(tmp_path, old, new):
    section, key = old.split(".")
    path = tmp_path / "old.yaml"
    path.write_text(f"{section}:\n  {key}: 1\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (f"{path}: {old} is now {new} (the runtime section holds the machine's settings)")
    with pytest.raises(ConfigError, match=f"^--set {old}=1: {old} is now {new} "):
        parse_override(f"{old}=1")


def test_a_bad_layer_is_refused_even_when_a_later_one_replaces_it(tmp_path):
    with pytest.raises(ConfigError, match=r"^--set train=5: config\.train: expected a mapping, got 5$"):
        parse_override("train=5")
    path = tmp_path / "c.yaml"
    path.write_text("train: 5\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: config\.train: expected a mapping, got 5"):
        load_config(path, [{"train": {"max_epochs": 3}}])
    with pytest.raises(ConfigError, match=r"^override 1: config\.train: expected a mapping, got 5"):
        load_config(None, [{"train": 5}, {"train": {"max_epochs": 3}}])


def test_an_unset_synth_seed_follows_the_seed():
    assert (load("seed=4").synth.seed, load("seed=4", "synth.seed=1").synth.seed) == (4, 1)


def test_a_device_this_machine_lacks_is_one_line(monkeypatch):
    check_device("cpu")
    check_device("auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as caught:
        check_device("cuda")
    assert str(caught.value) == ("runtime.device cuda: no CUDA device on this machine "
                                 "(torch.cuda.is_available() is False)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device("cuda:1")
    with pytest.raises(ConfigError, match=r"^runtime\.device cuda:2: this machine has 2 CUDA device\(s\), "
                                          r"cuda:0 to cuda:1$"):
        check_device("cuda:2")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^runtime\.device mps: no MPS device on this machine"):
        check_device("mps")
    with pytest.raises(ConfigError, match=r"^runtime\.device = 'tpu' is not allowed"):
        check_device("tpu")


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
